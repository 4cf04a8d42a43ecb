"""The real server over stdio, driven by the MCP SDK client, as an agent would use it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import anyio
import jsonschema
import pytest
from mcp.shared.exceptions import MCPError

from lakegate.evals.mcp_client import connect, text_of
from lakegate.server.audit.log import read_records, verify
from lakegate.server.audit.record_model import audit_record


def run(fn: Any, *args: Any) -> Any:
    return anyio.run(fn, *args)


def test_analyst_sees_catalog_tools_and_its_datasets(demo_home: Path, audit_path: Path) -> None:
    async def scenario() -> None:
        async with connect("analyst", demo_home, LAKEGATE_AUDIT__PATH=str(audit_path)) as client:
            assert client.instructions and "list_datasets" in client.instructions
            tools = {tool.name: tool for tool in (await client.list_tools()).tools}
            assert set(tools) == {
                "list_datasets",
                "describe_dataset",
                "search_catalog",
                "query",
                "list_metrics",
                "describe_metric",
                "query_metrics",
                "explain_access",
                "change_status",
            }
            assert all(tool.annotations and tool.annotations.read_only_hint for tool in tools.values())

            result = await client.call_tool("list_datasets", {})
            assert not result.is_error, text_of(result)
            jsonschema.validate(result.structured_content, tools["list_datasets"].output_schema)
            names = {d["name"] for d in result.structured_content["datasets"]}
            assert {"sales.orders", "sales.customers", "finance.payments"} <= names
            assert not any(name.startswith(("support.", "kb.")) for name in names)
            assert "sales.orders" in text_of(result)
            orders = next(d for d in result.structured_content["datasets"] if d["name"] == "sales.orders")
            assert orders["row_count"] > 1000 and orders["owner"]

    run(scenario)
    listing, call = read_records(audit_path)
    assert (listing["tool"], listing["principal"], listing["rows"]) == ("tools/list", "analyst", 9)
    assert call["tool"] == "list_datasets"
    assert call["decision"] == "allow" and call["principal"] == "analyst"
    assert call["client"] == {"name": "lakegate-tests", "version": "1.0"}
    assert call["transport"] == "stdio" and call["rows"] == len(
        [r for r in call["resources"] if r["type"] == "dataset"]
    )
    assert verify(audit_path).ok


@pytest.mark.parametrize(
    ("principal", "email", "phone"),
    [
        ("analyst", ("masked", "hash"), ("masked", "hash")),
        ("support_agent", ("clear", None), ("masked", "partial")),
        ("data_steward", ("masked", "redact"), ("masked", "redact")),
        ("admin", ("clear", None), ("clear", None)),
    ],
)
def test_describe_shows_column_access_per_role(
    demo_home: Path, audit_path: Path, principal: str, email: tuple[str, str | None], phone: tuple[str, str | None]
) -> None:
    async def scenario() -> dict[str, Any]:
        async with connect(principal, demo_home, LAKEGATE_AUDIT__PATH=str(audit_path)) as client:
            result = await client.call_tool("describe_dataset", {"name": "sales.customers"})
            assert not result.is_error, text_of(result)
            return result.structured_content or {}

    described = run(scenario)
    columns = {c["name"]: c for c in described["columns"]}
    assert (columns["email"]["access"], columns["email"]["mask"]) == email
    assert (columns["phone"]["access"], columns["phone"]["mask"]) == phone
    assert columns["customer_id"]["access"] == "clear"
    assert "pii" in columns["email"]["tags"]
    record = next(read_records(audit_path))
    expected = "allow" if email[0] == phone[0] == "clear" else "partial"
    assert record["decision"] == expected


def test_denials_and_bad_arguments_are_clear_errors_and_the_server_keeps_serving(
    demo_home: Path, audit_path: Path
) -> None:
    async def scenario() -> list[tuple[bool, str]]:
        outcomes = []
        async with connect("analyst", demo_home, LAKEGATE_AUDIT__PATH=str(audit_path)) as client:
            calls: list[tuple[str, dict[str, Any]]] = [
                ("describe_dataset", {"name": "support.tickets"}),  # not readable by analyst
                ("describe_dataset", {"name": "support.nothing"}),  # not readable, and there is none
                ("describe_dataset", {"name": "sales.nothing"}),  # readable, but there is none
                ("describe_dataset", {}),  # missing argument
                ("describe_dataset", {"name": "sales.orders", "principal": "admin"}),  # unknown argument
                ("list_datasets", {"limit": "many"}),  # wrong type
                ("list_datasets", {"cursor": "not-a-cursor"}),
                ("drop_everything", {}),  # no such tool
                ("describe_dataset", {"name": "sales.orders"}),  # still serving
            ]
            for name, arguments in calls:
                result = await client.call_tool(name, arguments)
                outcomes.append((bool(result.is_error), text_of(result)))
        return outcomes

    outcomes = run(scenario)
    hidden, missing, _, *errors = [text for is_error, text in outcomes[:-1]]
    assert all(is_error for is_error, _ in outcomes[:-1])
    assert "No dataset named 'support.tickets'" in hidden and "list_datasets" in hidden
    # The agent cannot tell a dataset it may not read from one that does not exist...
    assert hidden.replace("support.tickets", "T") == missing.replace("support.nothing", "T")
    assert "Invalid arguments for describe_dataset" in errors[0] and "name" in errors[0]
    assert "principal" in errors[1]
    assert "limit" in errors[2]
    assert "cursor" in errors[3].lower()
    assert "drop_everything" in errors[4]
    assert outcomes[-1][0] is False and "sales.orders" in outcomes[-1][1]

    # (the client lists the tools once to check the first result it gets against its schema)
    records = [r for r in read_records(audit_path) if not audit_record(r).is_listing]
    assert len(records) == 9
    assert [(r["decision"], r["outcome"]) for r in records] == [
        ("deny", "denied"),  # ... but the audit log says what the policy did
        ("deny", "denied"),
        ("allow", "not_found"),
        *[("allow", "invalid")] * 4,
        ("deny", "not_found"),  # an unknown tool is really missing
        ("allow", "ok"),
    ]
    assert {"type": "dataset", "name": "support.tickets", "access": "denied", "version": None} in records[0][
        "resources"
    ]
    assert verify(audit_path).ok


def test_unknown_principal_sees_nothing_and_is_denied(demo_home: Path, audit_path: Path) -> None:
    async def scenario() -> tuple[list[str], bool, str, int]:
        async with connect("mallory", demo_home, LAKEGATE_AUDIT__PATH=str(audit_path)) as client:
            tools = [tool.name for tool in (await client.list_tools()).tools]
            resources = (await client.list_resources()).resources
            result = await client.call_tool("list_datasets", {})
            return tools, bool(result.is_error), text_of(result), len(resources)

    tools, is_error, text, resources = run(scenario)
    assert tools == [] and resources == 0
    assert is_error and "may not call list_datasets" in text
    tools_listed, resources_listed, record = read_records(audit_path)
    assert [(r["tool"], r["rows"], r["decision"]) for r in (tools_listed, resources_listed)] == [
        ("tools/list", 0, "allow"),
        ("resources/list", 0, "allow"),
    ]
    assert record["decision"] == "deny" and record["outcome"] == "denied" and record["rows"] == 0


def test_every_listing_leaves_an_audit_record(demo_home: Path, audit_path: Path) -> None:
    async def scenario() -> tuple[int, list[str], int]:
        async with connect("analyst", demo_home, LAKEGATE_AUDIT__PATH=str(audit_path)) as client:
            tools = (await client.list_tools()).tools
            resources = (await client.list_resources()).resources
            templates = (await client.list_resource_templates()).resource_templates
            return len(tools), [str(r.uri) for r in resources], len(templates)

    tools, uris, templates = run(scenario)
    records = list(read_records(audit_path))
    assert [r["tool"] for r in records] == ["tools/list", "resources/list", "resources/templates/list"]
    assert [r["rows"] for r in records] == [tools, len(uris), templates] and tools > 0 and templates == 1
    assert "lakegate://datasets/sales.orders" in uris
    for record in records:
        assert audit_record(record).is_listing and record["details"] == {"listing": record["tool"]}
        assert (record["principal"], record["transport"]) == ("analyst", "stdio")
        assert (record["decision"], record["outcome"]) == ("allow", "ok")
        assert "role:analyst" in record["roles"] and record["authenticated_by"] == "config"
        assert record["client"] == {"name": "lakegate-tests", "version": "1.0"}
        assert record["bytes"] > 0 and record["policy_version"] and record["request_id"]
    assert len({r["session_id"] for r in records}) == 1 and records[0]["session_id"]
    assert verify(audit_path).ok


def test_a_listing_that_cannot_be_audited_is_not_answered(demo_home: Path, tmp_path: Path) -> None:
    """Fail closed, as for calls: the audit log path is a directory, so no record can be written."""
    blocked = tmp_path / "not-a-file"
    blocked.mkdir()

    async def scenario() -> list[str]:
        refused = []
        async with connect("admin", demo_home, LAKEGATE_AUDIT__PATH=str(blocked)) as client:
            for listing in (client.list_tools, client.list_resources, client.list_resource_templates):
                with pytest.raises(MCPError) as caught:
                    await listing()
                refused.append(str(caught.value))
        return refused

    refused = run(scenario)
    assert len(refused) == 3
    assert all("could not write the audit record" in message for message in refused), refused


def test_pagination_has_a_cursor_and_no_silent_cut(demo_home: Path, audit_path: Path) -> None:
    async def scenario() -> tuple[list[dict[str, Any]], list[str]]:
        pages = []
        async with connect("admin", demo_home, LAKEGATE_AUDIT__PATH=str(audit_path)) as client:
            everything = await client.call_tool("list_datasets", {"limit": 1000})
            cursor = None
            while True:
                args: dict[str, Any] = {"limit": 3} | ({"cursor": cursor} if cursor else {})
                page = (await client.call_tool("list_datasets", args)).structured_content or {}
                pages.append(page)
                cursor = page["next_cursor"]
                if not page["truncated"]:
                    break
        all_names = [d["name"] for d in (everything.structured_content or {})["datasets"]]
        return pages, all_names

    pages, all_names = run(scenario)
    assert len(pages) > 1 and all(p["truncated"] for p in pages[:-1]) and pages[-1]["next_cursor"] is None
    assert [d["name"] for p in pages for d in p["datasets"]] == all_names


def test_search_catalog_and_resources(demo_home: Path, audit_path: Path) -> None:
    async def scenario() -> tuple[dict[str, Any], dict[str, Any], list[str]]:
        async with connect("support_agent", demo_home, LAKEGATE_AUDIT__PATH=str(audit_path)) as client:
            found = await client.call_tool("search_catalog", {"query": "customer email"})
            denied = await client.call_tool("search_catalog", {"query": "refund reason"})
            uris = [str(r.uri) for r in (await client.list_resources()).resources]
            read = await client.read_resource("lakegate://datasets/support.tickets")
            return found.structured_content or {}, denied.structured_content or {}, uris + [read.contents[0].text]

    found, other, uris_and_text = run(scenario)
    hits = {(m["dataset"], m["column"]) for m in found["matches"]}
    assert ("sales.customers", "email") in hits
    # finance.refunds is not readable by support_agent: searching cannot reveal it.
    assert all(not (m["dataset"] or "").startswith("finance.") for m in other["matches"])
    assert "refunds" not in {m["metric"] for m in other["matches"]}  # metric:refunds is denied too
    *uris, text = uris_and_text
    assert "lakegate://datasets/support.tickets" in uris and "lakegate://datasets/finance.refunds" not in uris
    assert json.loads(text)["name"] == "support.tickets"
