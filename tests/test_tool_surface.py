"""What agents see is deliberate: tool names, descriptions, schemas and annotations, and the
prompts with their text, are snapshot-tested, and each tool meets the surface rules.

After an intended change, refresh the snapshot with:
    LAKEGATE_UPDATE_SNAPSHOTS=1 python -m pytest tests/test_tool_surface.py
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import anyio
import pytest

from lakegate.evals.mcp_client import connect
from lakegate.server.app import INSTRUCTIONS, mcp_tool
from lakegate.server.surface import mcp_prompt
from lakegate.tools import ALL_TOOLS, ToolName
from lakegate.tools.base import ToolArgs, ToolResult, ToolSpec
from lakegate.tools.prompts import ALL_PROMPTS

SNAPSHOT = Path(__file__).parent / "snapshots" / "tools.json"
#: Rough token count (4 characters a token) an agent pays per description, every conversation.
DESCRIPTION_TOKEN_BUDGET = 120
#: The whole tool list, schemas included (13 tools: ~8,550 tokens with pydantic titles stripped; query_metrics
#: grew filters in dbt MetricFlow's syntax and saved queries).
TOOL_LIST_TOKEN_BUDGET = 8700


#: The three MCP hints of every tool, pinned: (read-only, destructive = may replace or remove what
#: exists, idempotent = calling twice with the same arguments is the same as calling once).
HINTS = {
    ToolName.LIST_DATASETS: (True, False, True),
    ToolName.CHANGE_STATUS: (True, False, True),
    ToolName.DESCRIBE_DATASET: (True, False, True),
    ToolName.SEARCH_CATALOG: (True, False, True),
    ToolName.QUERY: (True, False, True),
    ToolName.LIST_METRICS: (True, False, True),
    ToolName.DESCRIBE_METRIC: (True, False, True),
    ToolName.QUERY_METRICS: (True, False, True),
    ToolName.APPEND_ROWS: (False, False, False),  # only adds, and twice adds twice
    ToolName.RESTORE_TABLE: (False, True, True),  # moves the table's current snapshot back
    ToolName.SEARCH_DOCUMENTS: (True, False, True),
    ToolName.ADD_DOCUMENTS: (False, True, True),  # re-adding a doc_id replaces its passages
    ToolName.EXPLAIN_ACCESS: (True, False, True),
}


def _surface() -> dict[str, Any]:
    tools = [mcp_tool(spec).model_dump(mode="json", by_alias=True, exclude_none=True) for spec in ALL_TOOLS]
    prompts = [
        {**mcp_prompt(spec).model_dump(mode="json", by_alias=True, exclude_none=True), "template": spec.template}
        for spec in ALL_PROMPTS
    ]
    return {"instructions": INSTRUCTIONS, "tools": tools, "prompts": prompts}


def test_tool_surface_matches_snapshot() -> None:
    current = json.dumps(_surface(), indent=1, sort_keys=True) + "\n"
    if os.environ.get("LAKEGATE_UPDATE_SNAPSHOTS"):
        SNAPSHOT.write_text(current)
    assert SNAPSHOT.exists(), "no snapshot yet: run with LAKEGATE_UPDATE_SNAPSHOTS=1"
    assert current == SNAPSHOT.read_text(), "the tool surface changed: review it, then refresh the snapshot"


def test_prompts_teach_only_tools_that_exist_and_fill_every_argument() -> None:
    for spec in ALL_PROMPTS:
        assert spec.name.replace("_", "").isalnum() and spec.title and spec.description
        assert spec.tools and all(tool in ToolName for tool in spec.tools)
        assert all(f"{{{arg.name}}}" in spec.template for arg in spec.arguments), spec.name
        assert all(tool.value in spec.template for tool in spec.tools), spec.name


def test_tool_names_match_the_registry() -> None:
    assert [spec.name for spec in ALL_TOOLS] == list(ToolName)
    assert len({spec.name for spec in ALL_TOOLS}) == len(ALL_TOOLS)


@pytest.mark.parametrize("spec", ALL_TOOLS, ids=[spec.name.value for spec in ALL_TOOLS])
def test_tool_meets_surface_rules(spec: Any) -> None:
    tool = mcp_tool(spec)
    assert 0 < len(tool.name) < 64 and tool.name.replace("_", "").isalnum()
    assert tool.title and tool.description
    assert len(tool.description) / 4 <= DESCRIPTION_TOKEN_BUDGET
    for name, schema in tool.input_schema["properties"].items():
        assert schema.get("description"), f"argument {name} has no description"
        assert "type" in schema or "anyOf" in schema, f"argument {name} is untyped"
    for model, definition in tool.input_schema.get("$defs", {}).items():
        for name, schema in definition.get("properties", {}).items():
            assert schema.get("description"), f"field {model}.{name} has no description"
    assert tool.output_schema and tool.output_schema["type"] == "object"
    annotations = tool.annotations
    assert annotations is not None
    assert (annotations.read_only_hint, annotations.destructive_hint, annotations.idempotent_hint) == HINTS[spec.name]
    assert (spec.read_only, spec.destructive, spec.idempotent) == HINTS[spec.name]


def test_every_tool_is_pinned_and_declares_its_hints() -> None:
    assert set(HINTS) == set(ToolName)
    with pytest.raises(TypeError):
        ToolSpec(  # type: ignore[call-arg]  # the hints have no defaults
            name=ToolName.QUERY, title="t", args=ToolArgs, result=ToolResult, handler=lambda s, a: a, render=str
        )


def test_tool_list_stays_small() -> None:
    size = len(json.dumps([t for t in _surface()["tools"]]))
    assert size / 4 <= TOOL_LIST_TOKEN_BUDGET, f"tool list is ~{size // 4} tokens"


@pytest.mark.parametrize("principal", ["analyst", "support_agent", "data_steward", "admin", "kate"])
def test_tool_list_at_connect_time_is_measured_and_small(principal: str, demo_home: Path, tmp_path: Path) -> None:
    """What an agent really receives from tools/list over stdio, per role (listing applies policy)."""

    async def listed() -> tuple[int, int]:
        async with connect(principal, demo_home, LAKEGATE_AUDIT__PATH=str(tmp_path / "audit.jsonl")) as client:
            tools = (await client.list_tools()).tools
            payload = [t.model_dump(mode="json", by_alias=True, exclude_none=True) for t in tools]
            return len(tools), len(json.dumps(payload)) + len(client.instructions or "")

    count, size = anyio.run(listed)
    assert count >= 5, f"{principal} sees only {count} tools"
    print(f"{principal}: {count} tools, ~{size // 4} tokens at connect time")
    assert size / 4 <= TOOL_LIST_TOKEN_BUDGET + len(INSTRUCTIONS) / 4
