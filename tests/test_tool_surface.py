"""What agents see is deliberate: tool names, descriptions, schemas and annotations are
snapshot-tested, and each tool meets the surface rules.

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
from lakegate.tools import ALL_TOOLS, ToolName

SNAPSHOT = Path(__file__).parent / "snapshots" / "tools.json"
#: Rough token count (4 characters a token) an agent pays per description, every conversation.
DESCRIPTION_TOKEN_BUDGET = 120
#: The whole tool list, schemas included (12 tools: ~7,500 tokens with pydantic titles stripped).
TOOL_LIST_TOKEN_BUDGET = 8000


#: What each writing tool does to its environment (MCP: destructive = may replace or remove what
#: exists; additive = only adds). Every tool not named here must be read-only.
WRITE_EFFECTS = {
    ToolName.APPEND_ROWS: "additive",
    ToolName.RESTORE_TABLE: "destructive",  # moves the table's current snapshot back
    ToolName.ADD_DOCUMENTS: "destructive",  # re-adding a doc_id replaces its passages
}


def _surface() -> dict[str, Any]:
    tools = [mcp_tool(spec).model_dump(mode="json", by_alias=True, exclude_none=True) for spec in ALL_TOOLS]
    return {"instructions": INSTRUCTIONS, "tools": tools}


def test_tool_surface_matches_snapshot() -> None:
    current = json.dumps(_surface(), indent=1, sort_keys=True) + "\n"
    if os.environ.get("LAKEGATE_UPDATE_SNAPSHOTS"):
        SNAPSHOT.write_text(current)
    assert SNAPSHOT.exists(), "no snapshot yet: run with LAKEGATE_UPDATE_SNAPSHOTS=1"
    assert current == SNAPSHOT.read_text(), "the tool surface changed: review it, then refresh the snapshot"


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
    assert annotations.read_only_hint is spec.read_only
    assert annotations.destructive_hint is spec.destructive
    effect = WRITE_EFFECTS.get(spec.name)
    assert spec.read_only is (effect is None), f"{spec.name} read-only hint is wrong"
    assert spec.destructive is (effect == "destructive"), f"{spec.name} destructive hint is wrong"


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
