"""explain_access: the gate's own decisions, explained, with the real Casbin enforcer, the demo
policies and the small demo warehouse; through the gate in process and over stdio."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import jsonschema
import pytest

from lakegate.errors import ClientError, InvalidArgument, NotFound, PolicyDenied
from lakegate.evals.mcp_client import connect, text_of
from lakegate.server.app import Runtime, open_runtime
from lakegate.server.audit.log import read_records
from lakegate.server.audit.record_model import audit_record
from lakegate.server.gate.gate import GateOutcome
from lakegate.server.settings import load_settings
from tests.conftest import gate_call

REPO = Path(__file__).resolve().parents[1]
PII_DENY = "role:analyst, tag:pii, read, deny"
PII_HASH = "role:analyst, tag:pii, mask:hash, allow"


@pytest.fixture(scope="module")
def rt(demo_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runtime]:
    """One runtime for the read-only explanations of this module (the audit test opens its own)."""
    audit = tmp_path_factory.mktemp("explain-audit") / "audit.jsonl"
    opened = open_runtime(load_settings(REPO, home=demo_home, audit={"path": audit, "fsync": False}, principal=None))
    yield opened
    opened.close()


def call(runtime: Runtime, who: str, tool: str = "explain_access", **arguments: Any) -> GateOutcome:
    return gate_call(runtime, who, tool, arguments)


def explained(runtime: Runtime, who: str, **arguments: Any) -> dict[str, Any]:
    outcome = call(runtime, who, **arguments)
    assert outcome.error is None, str(outcome.error)
    assert outcome.result is not None
    answer: dict[str, Any] = outcome.result.model_dump(mode="json")
    answer["text"] = outcome.text
    return answer


def refused(runtime: Runtime, who: str, tool: str = "explain_access", **arguments: Any) -> ClientError:
    outcome = call(runtime, who, tool, **arguments)
    assert outcome.result is None and isinstance(outcome.error, ClientError), outcome.error
    return outcome.error


def test_analyst_reads_email_as_a_keyed_hash_and_is_told_what_that_allows(rt: Runtime) -> None:
    answer = explained(rt, "analyst", resource="sales.customers.email")
    assert (answer["principal"], answer["action"], answer["allowed"], answer["access"]) == (
        "analyst", "read", True, "masked:hash"
    )  # fmt: skip
    # Both rules, in the order the gate applies them: clear read denied, then the mask allowed.
    assert answer["rule"] == f"{PII_DENY}; {PII_HASH}"
    assert answer["row_filters"] == []
    (advice,) = answer["advice"]
    assert advice.startswith("email is readable as a keyed hash") and "joins work" in advice
    assert "masked:hash" in answer["text"] and PII_HASH in answer["text"]


def test_dataset_explanation_matches_what_describe_dataset_applies(rt: Runtime) -> None:
    """Every column of every demo table, for every demo role: the explanation is the gate's answer."""
    for who in ("analyst", "support_agent", "data_steward", "admin"):
        for dataset in ("sales.customers", "finance.payments", "support.tickets"):
            described = call(rt, who, "describe_dataset", name=dataset)
            if described.error is not None:
                assert isinstance(described.error, NotFound)
                assert isinstance(refused(rt, who, resource=dataset), NotFound)
                continue
            assert described.result is not None
            seen = {
                c["name"]: f"masked:{c['mask']}" if c["access"] == "masked" else c["access"]
                for c in described.result.model_dump()["columns"]
            }
            answer = explained(rt, who, resource=dataset)
            assert answer["allowed"] and answer["access"] == "allow"
            assert {c["name"]: c["access"] for c in answer["columns"]} == seen, (who, dataset)


def test_support_agent_on_orders_is_told_the_emea_row_filter(rt: Runtime) -> None:
    answer = explained(rt, "support_agent", resource="sales.orders")
    assert answer["allowed"] and answer["rule"] == "role:support_agent, sales.orders, read, allow"
    assert answer["row_filters"] == ["sales.orders: region = 'EMEA' (role:support_agent)"]
    assert {c["access"] for c in answer["columns"]} == {"clear"}
    assert any("region = 'EMEA'" in advice and "EMEA customers only" in advice for advice in answer["advice"])
    # The same filter explains a column of the table, and a metric built on it.
    assert explained(rt, "support_agent", resource="sales.orders.total_amount")["row_filters"] == answer["row_filters"]
    revenue = explained(rt, "support_agent", resource="metric:revenue")
    assert revenue["allowed"] and revenue["rule"] == "role:support_agent, metric:revenue, read, allow"
    assert revenue["row_filters"] == answer["row_filters"]
    assert "sales.orders.total_amount" in {c["name"] for c in revenue["columns"]}


def test_an_unreadable_dataset_looks_missing_as_in_describe_dataset(rt: Runtime) -> None:
    hidden = refused(rt, "analyst", resource="support.tickets")
    absent = refused(rt, "analyst", resource="support.no_such_table")
    described = refused(rt, "analyst", "describe_dataset", name="support.tickets")
    assert isinstance(hidden, NotFound) and isinstance(absent, NotFound)
    assert str(hidden) == str(described)
    assert str(hidden).replace("support.tickets", "X") == str(absent).replace("support.no_such_table", "X")
    # Columns and classifications of it, too; and a metric the caller may not read.
    assert str(refused(rt, "analyst", resource="support.tickets.body")) == str(hidden)
    metric = refused(rt, "support_agent", resource="metric:net_revenue")
    assert str(metric) == str(refused(rt, "support_agent", "describe_metric", name="net_revenue"))


def test_a_steward_explains_the_analyst_denial_with_its_rule(rt: Runtime) -> None:
    answer = explained(rt, "data_steward", resource="support.tickets", principal="analyst")
    assert (answer["principal"], answer["allowed"], answer["access"]) == ("analyst", False, "deny")
    assert answer["rule"] == "no matching allow rule (deny by default)"
    assert answer["columns"] == [] and any("list_datasets" in advice for advice in answer["advice"])
    # An admin may as well (admin's *, *), and sees the analyst's masks, not its own clear view.
    email = explained(rt, "admin", resource="sales.customers.email", principal="analyst")
    assert email["access"] == "masked:hash" and email["rule"] == f"{PII_DENY}; {PII_HASH}"
    net = explained(rt, "data_steward", resource="metric:net_revenue", principal="support_agent")
    assert (net["allowed"], net["rule"]) == (False, "no matching allow rule (deny by default)")


def test_explaining_another_principal_is_itself_authorised(rt: Runtime) -> None:
    error = refused(rt, "analyst", resource="sales.customers.email", principal="support_agent")
    assert isinstance(error, PolicyDenied)
    assert "may not explain the access of another principal" in str(error)
    assert "Leave principal out" in str(error)
    # Decided before the resource is looked at: an unknown name gets the same denial.
    assert str(refused(rt, "support_agent", resource="nope.nothing", principal="analyst")) == str(
        refused(rt, "support_agent", resource="sales.orders", principal="analyst")
    )
    # Naming oneself needs no such right.
    assert explained(rt, "analyst", resource="sales.customers.email", principal="analyst")["allowed"]


def test_hidden_columns_writes_restores_classifications_and_tools(rt: Runtime) -> None:
    body = explained(rt, "data_steward", resource="support.tickets.body")
    assert (body["allowed"], body["access"]) == (False, "hidden")
    assert body["rule"] == "role:data_steward, support.tickets.body, read, deny"
    assert "leave it out" in body["advice"][0] and "hidden from you" in body["advice"][0]

    tickets = explained(rt, "support_agent", resource="support.tickets", action="write")
    assert tickets["allowed"] and tickets["rule"] == "role:support_agent, support.tickets, write, allow"
    writable = {c["name"]: c["access"] for c in tickets["columns"]}
    assert writable["closed_ts"] == "deny" and writable["status"] == "allow"
    assert any("may not set closed_ts" in advice for advice in tickets["advice"])
    closed = explained(rt, "support_agent", resource="support.tickets.closed_ts", action="write")
    assert (closed["allowed"], closed["rule"]) == (False, "role:support_agent, support.tickets.closed_ts, write, deny")

    restore = explained(rt, "analyst", resource="sales.orders", action="restore")
    assert not restore["allowed"] and "restore_table" in restore["advice"][0]
    assert explained(rt, "data_steward", resource="sales.orders", action="restore")["allowed"]

    restricted = explained(rt, "support_agent", resource="kb.articles.classification:restricted")
    assert not restricted["allowed"]
    assert restricted["rule"] == "role:support_agent, kb.articles.classification:restricted, read, deny"
    internal = explained(rt, "support_agent", resource="kb.articles.classification:internal")
    assert internal["allowed"] and "role:support_agent" in internal["advice"][0]

    tool = explained(rt, "admin", resource="tool:restore_table", principal="analyst")
    assert (tool["action"], tool["allowed"]) == ("call", False)
    assert explained(rt, "admin", resource="tool:restore_table", principal="dana")["allowed"]


def test_unknown_principals_hold_no_role(rt: Runtime) -> None:
    answer = explained(rt, "admin", resource="sales.orders", principal="mallory")
    assert not answer["allowed"] and answer["advice"][-1] == "mallory holds no role: everything is denied by default."


def test_bad_resources_and_actions_say_what_to_send(rt: Runtime) -> None:
    malformed = refused(rt, "analyst", resource="orders")
    assert isinstance(malformed, InvalidArgument) and "metric:revenue" in str(malformed)
    wrong = refused(rt, "analyst", resource="metric:revenue", action="write")
    assert isinstance(wrong, InvalidArgument) and "Use read" in str(wrong)
    column = refused(rt, "analyst", resource="sales.orders.no_such_column")
    assert isinstance(column, NotFound) and "describe_dataset" in str(column)
    klass = refused(rt, "support_agent", resource="kb.articles.classification:secret")
    assert isinstance(klass, NotFound) and "public" in str(klass)


def test_explanations_are_audited(runtime: Runtime) -> None:
    call(runtime, "data_steward", resource="support.tickets", principal="analyst")
    call(runtime, "analyst", resource="sales.orders", principal="data_steward")
    allowed, denied = read_records(runtime.audit.path)
    assert (allowed["tool"], allowed["principal"], allowed["decision"], allowed["outcome"]) == (
        "explain_access", "data_steward", "allow", "ok"
    )  # fmt: skip
    assert allowed["details"]["explained_principal"] == "analyst"
    assert allowed["details"]["explained_access"] == "deny"
    assert ["role:data_steward", "explain:others", "call", "allow"] in allowed["rules"]
    assert (denied["decision"], denied["outcome"]) == ("deny", "denied")
    assert {"type": "policy", "name": "explain:others", "access": "denied", "version": None} in denied["resources"]


def test_explain_access_over_stdio(demo_home: Path, tmp_path: Path) -> None:
    async def scenario() -> tuple[Any, Any, Any]:
        async with connect("analyst", demo_home, LAKEGATE_AUDIT__PATH=str(tmp_path / "a.jsonl")) as client:
            tools = {tool.name: tool for tool in (await client.list_tools()).tools}
            result = await client.call_tool("explain_access", {"resource": "sales.customers.email"})
            other = await client.call_tool("explain_access", {"resource": "sales.orders", "principal": "admin"})
            return tools["explain_access"], result, other

    tool, result, other = anyio.run(scenario)
    assert tool.annotations and tool.annotations.read_only_hint and not tool.annotations.destructive_hint
    assert not result.is_error, text_of(result)
    jsonschema.validate(result.structured_content, tool.output_schema)
    assert result.structured_content["access"] == "masked:hash"
    assert "keyed hash" in text_of(result)
    assert other.is_error and other.structured_content is None
    assert "may not explain the access of another principal" in text_of(other)
    records = list(read_records(tmp_path / "a.jsonl"))
    assert [r["tool"] for r in records if audit_record(r).is_listing] == ["tools/list"]
    assert [r["outcome"] for r in records if not audit_record(r).is_listing] == ["ok", "denied"]
