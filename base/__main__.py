"""`python -m lakegate`: the `lakegate` command."""

from lakegate.server.cli import main

main()
