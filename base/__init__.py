"""lakegate: an MCP server through which AI agents reach an organisation's data safely.

The import package `lakegate` is installed from the repository's top-level folders (pyproject.toml
maps them): this folder is the package itself (`lakegate`, `lakegate.errors`), and `server/`,
`tools/`, `policies/`, `catalog/` and `evals/` are its sub-packages. README.md's "Layout" says what
lives in each and what it may import; tests/test_layout.py holds those arrows.
"""

from __future__ import annotations

__all__ = ["__version__"]

__version__ = "0.1.0"
