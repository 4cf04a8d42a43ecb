"""What the agent sees: every tool lakegate serves, by family."""

from __future__ import annotations

from typing import Any

from lakegate.tools.access import ACCESS_TOOLS
from lakegate.tools.base import ToolSpec
from lakegate.tools.catalog import CATALOG_TOOLS
from lakegate.tools.documents import DOCUMENT_TOOLS
from lakegate.tools.metrics import METRIC_TOOLS
from lakegate.tools.names import ToolName
from lakegate.tools.query import QUERY_TOOLS
from lakegate.tools.write import WRITE_TOOLS

__all__ = ["ALL_TOOLS", "ToolName", "ToolSpec", "tools_by_name"]

ALL_TOOLS: tuple[ToolSpec[Any, Any], ...] = (
    *CATALOG_TOOLS,
    *QUERY_TOOLS,
    *METRIC_TOOLS,
    *WRITE_TOOLS,
    *DOCUMENT_TOOLS,
    *ACCESS_TOOLS,
)


def tools_by_name() -> dict[str, ToolSpec[Any, Any]]:
    return {spec.name.value: spec for spec in ALL_TOOLS}
