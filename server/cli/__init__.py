"""The `lakegate` command and its command groups."""

from lakegate.server.cli.main import main

__all__ = ["main"]
