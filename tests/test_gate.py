"""The gate is structural: every registered tool is denied to an unauthorised principal, and every
call, allowed or denied, leaves an audit record before anything is returned."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

import anyio
import pytest

from lakegate.catalog.warehouse import Warehouse
from lakegate.errors import NotFound
from lakegate.evals.mcp_client import connect, text_of
from lakegate.server.app import Runtime
from lakegate.server.audit.log import read_records, verify
from lakegate.server.audit.record_model import audit_record
from lakegate.server.gate.gate import redact_arguments
from lakegate.server.gate.identity import CallOrigin, stdio_principal
from lakegate.tools import ALL_TOOLS, ToolName
from tests.conftest import gate_call

REPO = Path(__file__).resolve().parents[1]

#: Minimal valid arguments for every tool; a new tool must be added here (checked below).
VALID_ARGUMENTS: dict[ToolName, dict[str, Any]] = {
    ToolName.LIST_DATASETS: {},
    ToolName.DESCRIBE_DATASET: {"name": "sales.orders"},
    ToolName.SEARCH_CATALOG: {"query": "orders"},
    ToolName.QUERY: {"sql": "SELECT count(*) FROM sales.orders"},
    ToolName.LIST_METRICS: {},
    ToolName.DESCRIBE_METRIC: {"name": "revenue"},
    ToolName.QUERY_METRICS: {"metrics": ["revenue"], "group_by": ["order__region"]},
    # Writes into the shared demo warehouse must be harmless: one open ticket (no metric and no
    # count in the suite reads support.tickets), and a restore to the current snapshot (a no-op).
    ToolName.APPEND_ROWS: {
        "table": "support.tickets",
        "rows": [
            {
                "ticket_id": 999_999_999,
                "customer_id": 1,
                "opened_ts": "2025-12-30T12:00:00Z",
                "priority": "low",
                "status": "open",
                "subject": "gate test",
                "body": "written by test_gate",
            }
        ],
    },
    ToolName.RESTORE_TABLE: {"table": "sales.products", "snapshot_id": -1},  # -1: resolved to the current one
    ToolName.SEARCH_DOCUMENTS: {"query": "refund approval limits", "k": 3},
    # One tiny restricted document only admin may read, without the words the document-search tests
    # count ("customer"): no other role's search results change.
    ToolName.ADD_DOCUMENTS: {
        "documents": [
            {
                "doc_id": "test-gate-note",
                "title": "Gate test note",
                "text": "Written by test_gate.",
                "classification": "restricted",
                "allowed_roles": ["role:admin"],
            }
        ],
    },
    ToolName.EXPLAIN_ACCESS: {"resource": "sales.customers.email", "principal": "analyst"},
    ToolName.CHANGE_STATUS: {"change_id": "0123456789abcdef"},
}


def test_every_tool_has_valid_arguments_for_the_enumeration() -> None:
    assert set(VALID_ARGUMENTS) == set(ToolName)
    assert {spec.name for spec in ALL_TOOLS} == set(ToolName)


def test_every_tool_denies_an_unauthorised_principal_and_audits_both_outcomes(
    demo_home: Path, audit_path: Path
) -> None:
    warehouse = Warehouse(demo_home)
    current = warehouse.describe("sales.products").current_version
    warehouse.close()
    valid = {name: dict(arguments) for name, arguments in VALID_ARGUMENTS.items()}
    valid[ToolName.RESTORE_TABLE]["snapshot_id"] = current

    async def scenario() -> tuple[list[str], dict[str, tuple[bool, str]], dict[str, tuple[bool, str]]]:
        denied: dict[str, tuple[bool, str]] = {}
        allowed: dict[str, tuple[bool, str]] = {}
        async with connect("mallory", demo_home, LAKEGATE_AUDIT__PATH=str(audit_path)) as client:
            listed = [tool.name for tool in (await client.list_tools()).tools]
            for name, arguments in VALID_ARGUMENTS.items():
                result = await client.call_tool(name.value, arguments)
                denied[name.value] = (bool(result.is_error), text_of(result))
                assert result.structured_content is None
        async with connect("admin", demo_home, LAKEGATE_AUDIT__PATH=str(audit_path)) as client:
            for name, arguments in valid.items():
                result = await client.call_tool(name.value, arguments)
                allowed[name.value] = (bool(result.is_error), text_of(result))
        return listed, denied, allowed

    listed, denied, allowed = anyio.run(scenario)
    assert listed == []
    for name, (is_error, text) in denied.items():
        assert is_error and f"may not call {name}" in text
    # The shared demo has no staged change: admin's call is let in and answers that there is none.
    is_error, text = allowed.pop(ToolName.CHANGE_STATUS.value)
    assert is_error and "There is no change 0123456789abcdef" in text
    for name, (is_error, text) in allowed.items():
        assert not is_error, f"{name}: {text}"

    # mallory's tools/list (empty); admin's client lists the tools once, to check its first result.
    listings = [r for r in read_records(audit_path) if audit_record(r).is_listing]
    assert [(r["principal"], r["tool"], r["rows"]) for r in listings] == [
        ("mallory", "tools/list", 0),
        ("admin", "tools/list", len(ToolName)),
    ]
    records = [r for r in read_records(audit_path) if not audit_record(r).is_listing]
    count = len(VALID_ARGUMENTS)
    assert len(records) == 2 * count
    for record, name in zip(records[:count], VALID_ARGUMENTS, strict=True):
        assert (record["tool"], record["principal"], record["decision"], record["outcome"]) == (
            name.value,
            "mallory",
            "deny",
            "denied",
        )
        assert record["rows"] == 0 and record["bytes"] == 0
    for record, name in zip(records[count:], VALID_ARGUMENTS, strict=True):
        if name is ToolName.CHANGE_STATUS:
            assert (record["outcome"], record["bytes"]) == ("not_found", 0)
            continue
        assert (record["tool"], record["principal"], record["outcome"]) == (name.value, "admin", "ok")
        assert record["decision"] == "allow" and record["rules"] and record["policy_version"]
        assert record["bytes"] > 0
    assert verify(audit_path).ok


def test_no_audit_record_means_no_data(demo_home: Path, tmp_path: Path) -> None:
    """Fail closed: the audit log path is a directory, so no record can be written."""
    blocked = tmp_path / "not-a-file"
    blocked.mkdir()

    async def scenario() -> tuple[bool, str, Any, bool, str]:
        async with connect("admin", demo_home, LAKEGATE_AUDIT__PATH=str(blocked)) as client:
            first = await client.call_tool("describe_dataset", {"name": "sales.customers"})
            second = await client.call_tool("list_datasets", {})
            structured = first.structured_content
            return bool(first.is_error), text_of(first), structured, bool(second.is_error), text_of(second)

    is_error, text, structured, second_error, second_text = anyio.run(scenario)
    assert is_error and structured is None
    assert "could not write the audit record" in text and "email" not in text
    assert second_error and "audit record" in second_text  # still serving, still closed


def test_in_process_gate_fails_closed_and_redacts(runtime: Runtime, tmp_path: Path) -> None:
    principal = stdio_principal("admin", runtime.enforcer)
    origin = CallOrigin(transport="in-process", session_id="s1")

    outcome = anyio.run(runtime.gate.call, "list_datasets", {}, principal, origin)
    assert outcome.error is None and outcome.record is not None and outcome.record["seq"] == 1

    runtime.audit.path.unlink()
    runtime.audit.path.mkdir()  # the log can no longer be written
    runtime.audit.close()
    outcome = anyio.run(runtime.gate.call, "list_datasets", {}, principal, origin)
    assert outcome.result is None and outcome.record is None and outcome.error is not None
    assert outcome.error.outcome == "audit_error"

    arguments = {"query": "x", "api_key": "s3cret", "nested": {"password": "p"}}
    cleaned = redact_arguments(arguments, ("api_key", "password"))
    assert cleaned == {"query": "x", "api_key": "[redacted]", "nested": {"password": "[redacted]"}}


@pytest.mark.parametrize(
    ("principal", "tool", "hidden", "missing"),
    [
        ("analyst", "describe_dataset", {"name": "support.tickets"}, {"name": "support.nothing"}),
        ("analyst", "query", {"sql": "SELECT * FROM support.tickets"}, {"sql": "SELECT * FROM support.nothing"}),
        ("support_agent", "describe_metric", {"name": "refunds"}, {"name": "no_such_metric"}),
    ],
)
def test_a_hidden_resource_is_audited_as_denied_and_answered_as_missing(
    runtime: Runtime, principal: str, tool: str, hidden: dict[str, Any], missing: dict[str, Any]
) -> None:
    refused = gate_call(runtime, principal, tool, hidden)
    absent = gate_call(runtime, principal, tool, missing)
    assert isinstance(refused.error, NotFound) and isinstance(absent.error, NotFound)
    # What the agent reads: the same answer for a hidden resource and a missing one.
    name, other = (next(iter(arguments.values())).split()[-1] for arguments in (hidden, missing))
    assert "available to you" in str(refused.error)
    assert str(refused.error).replace(name, "X") == str(absent.error).replace(other, "X")
    # What the reviewer reads: the policy refused it.
    assert refused.record is not None
    assert (refused.record["decision"], refused.record["outcome"]) == ("deny", "denied")
    assert any(r["access"] == "denied" and r["type"] != "tool" for r in refused.record["resources"])
    assert refused.record["error"] == str(refused.error)
    assert verify(runtime.audit.path).ok


def test_a_missing_resource_the_caller_may_read_stays_not_found(runtime: Runtime) -> None:
    outcome = gate_call(runtime, "analyst", "describe_dataset", {"name": "sales.nothing"})
    assert isinstance(outcome.error, NotFound) and outcome.record is not None
    assert (outcome.record["decision"], outcome.record["outcome"]) == ("allow", "not_found")


def test_tools_reach_data_only_through_the_scope() -> None:
    """Tool modules import no engine, no audit log and no transport: the gate is the only way in."""
    forbidden = (
        "pyiceberg",
        "lancedb",
        "duckdb",
        "pyarrow",
        "catalog.warehouse",
        "lakegate.server.audit.log",
        "server.app",
        "mcp",
    )
    for path in (REPO / "tools").glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            for name in names:
                assert not name.startswith(forbidden), f"{path.name} imports {name}"


@pytest.mark.parametrize("principal", ["analyst", "support_agent", "data_steward", "admin"])
def test_each_demo_role_sees_only_tools_it_may_call(runtime: Runtime, principal: str) -> None:
    who = stdio_principal(principal, runtime.enforcer)
    visible = {spec.name.value for spec in runtime.gate.visible_tools(who)}
    for spec in ALL_TOOLS:
        allowed = runtime.enforcer.decide(principal, f"tool:{spec.name.value}", "call").allowed
        assert (spec.name.value in visible) == allowed


def test_concurrent_first_decisions_equal_sequential_ones() -> None:
    """pycasbin's evaluation is not thread-safe: on a fresh policy set (a reload under load), eight
    threads deciding at once got wrong answers, which the decision cache then kept for the whole
    policy version (seen as "column hidden" refusals in the load test). Each decision must be the
    one a lone caller gets. (Switching threads often makes the race show within a few rounds.)"""
    import sys
    from itertools import product
    from threading import Barrier, Thread

    from lakegate.catalog.definitions import load_definitions
    from lakegate.policies.enforcer import PolicyEnforcer, policy_files
    from lakegate.server.app import resource_groups

    repo = Path(__file__).resolve().parents[1]
    groups = resource_groups(load_definitions(repo))
    subjects = ["role:support_agent", "role:analyst", "role:data_steward", "analyst", "support_agent"]
    objects = [
        f"{dataset}.{column}"
        for dataset in ("kb.articles", "sales.orders", "sales.customers", "support.tickets")
        for column in ("source", "text", "order_ts", "email", "region", "doc_id")
    ]
    keys = list(product(subjects, objects, ["read", "mask:partial", "mask:hash"]))
    lone = PolicyEnforcer(policy_files(repo), groups)
    truth = {key: lone.decide(*key).allowed for key in keys}

    def decide(enforcer: PolicyEnforcer, part: list[tuple[str, str, str]], go: Barrier, into: dict[Any, bool]) -> None:
        go.wait()
        for key in part:
            into[key] = enforcer.decide(*key).allowed

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        for _ in range(20):
            shared, start, answers = PolicyEnforcer(policy_files(repo), groups), Barrier(8), {}
            threads = [Thread(target=decide, args=(shared, keys[n::8], start, answers)) for n in range(8)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            assert answers == truth
    finally:
        sys.setswitchinterval(interval)
