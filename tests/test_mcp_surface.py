"""Prompts, completions, subscriptions and the logging level: the real server over stdio, driven by
the MCP SDK client, each request decided by policy and audited."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import Client
from mcp.shared.exceptions import MCPError
from mcp.types import (
    Implementation,
    PromptListChangedNotification,
    PromptReference,
    ResourceTemplateReference,
    ResourceUpdatedNotification,
    ToolListChangedNotification,
)

from lakegate.evals.mcp_client import REPO, connect, server_params
from lakegate.server.audit.log import read_records, verify
from lakegate.tools.prompts import ALL_PROMPTS

TICKET = {
    "ticket_id": 880_001,
    "customer_id": 7,
    "opened_ts": "2025-12-01T09:30:00+00:00",
    "priority": "low",
    "status": "open",
    "subject": "Subscribed",
    "body": "A write a subscriber hears about.",
}


def run(fn: Any) -> Any:
    return anyio.run(fn)


def test_prompts_are_listed_by_policy_and_filled_through_the_gate(demo_home: Path, audit_path: Path) -> None:
    async def scenario() -> dict[str, Any]:
        seen: dict[str, Any] = {}
        async with connect("analyst", demo_home, LAKEGATE_AUDIT__PATH=str(audit_path)) as client:
            assert client.server_capabilities and client.server_capabilities.prompts
            prompts = {p.name: p for p in (await client.list_prompts()).prompts}
            seen["analyst"] = set(prompts)
            assert all(p.description and p.title for p in prompts.values())
            explore = await client.get_prompt("explore_dataset", {"dataset": "sales.orders"})
            seen["text"] = explore.messages[0].content.text  # type: ignore[union-attr]
            seen["errors"] = []
            for name, arguments in [
                ("explore_dataset", {"dataset": "support.tickets"}),  # not readable by the analyst
                ("explore_dataset", {}),
                ("explore_dataset", {"dataset": "sales.orders", "sql": "x"}),
                ("cite_documents", {"question": "q", "dataset": "kb.articles"}),  # teaches a tool it lacks
                ("no_such_prompt", {}),
            ]:
                with pytest.raises(MCPError) as caught:
                    await client.get_prompt(name, arguments)
                seen["errors"].append(caught.value.error.message)
            metric = await client.get_prompt("answer_with_metric", {"question": "How much did we sell?"})
            seen["metric_text"] = metric.messages[0].content.text  # type: ignore[union-attr]
        async with connect("support_agent", demo_home, LAKEGATE_AUDIT__PATH=str(audit_path)) as client:
            seen["support_agent"] = {p.name for p in (await client.list_prompts()).prompts}
        return seen

    seen = run(scenario)
    assert seen["analyst"] == {"explore_dataset", "answer_with_metric", "explain_denial"}
    assert seen["support_agent"] == {p.name for p in ALL_PROMPTS}
    assert 'describe_dataset with name "sales.orders"' in seen["text"]
    assert "How much did we sell?" in seen["metric_text"] and "(none given)" in seen["metric_text"]
    hidden, missing, unknown, untaught, nothing = seen["errors"]
    assert (
        hidden
        == "No dataset named 'support.tickets' is available to you. Call list_datasets to see the datasets you can use."
    )
    assert "needs the argument 'dataset'" in missing and "has no argument 'sql'" in unknown
    assert untaught.startswith("There is no prompt named 'cite_documents'") and nothing.startswith("There is no prompt")

    records = [r for r in read_records(audit_path) if r["tool"].startswith("prompts/")]
    gets = [r for r in records if r["tool"] == "prompts/get"]
    assert [r["outcome"] for r in gets] == ["ok", "denied", "invalid", "invalid", "denied", "not_found", "ok"]
    assert gets[0]["arguments"] == {"name": "explore_dataset", "arguments": {"dataset": "sales.orders"}}
    assert {"type": "prompt", "name": "explore_dataset", "access": "get"}.items() <= gets[0]["resources"][0].items()
    assert [r["rows"] for r in records if r["tool"] == "prompts/list"] == [3, 4]
    assert verify(audit_path).ok


def test_completions_offer_only_what_the_caller_may_see(demo_home: Path, audit_path: Path) -> None:
    async def scenario() -> dict[str, Any]:
        template = ResourceTemplateReference(type="ref/resource", uri="lakegate://datasets/{name}")
        explore = PromptReference(type="ref/prompt", name="explore_dataset")
        found: dict[str, Any] = {}
        async with connect("analyst", demo_home, LAKEGATE_AUDIT__PATH=str(audit_path)) as client:
            assert client.server_capabilities and client.server_capabilities.completions is not None
            found["all"] = (await client.complete(template, {"name": "name", "value": ""})).completion
            found["sales"] = (await client.complete(template, {"name": "name", "value": "sales.c"})).completion
            found["support"] = (await client.complete(explore, {"name": "dataset", "value": "support"})).completion
            found["inside"] = (await client.complete(explore, {"name": "dataset", "value": "order"})).completion
            metric = PromptReference(type="ref/prompt", name="answer_with_metric")
            found["metric"] = (await client.complete(metric, {"name": "metric", "value": "rev"})).completion
            secret = await client.complete(explore, {"name": "api_key", "value": "sk-live-123"})
            assert secret.completion.values == []
            hidden_prompt = PromptReference(type="ref/prompt", name="cite_documents")
            found["hidden"] = (await client.complete(hidden_prompt, {"name": "dataset", "value": ""})).completion
        return found

    found = run(scenario)
    assert "sales.orders" in found["all"].values and not any(
        v.startswith(("support.", "kb.")) for v in found["all"].values
    )
    assert found["all"].total == len(found["all"].values) and not found["all"].has_more
    assert found["sales"].values == ["sales.customers"]
    assert found["support"].values == []  # support.tickets exists, but the analyst may not read it
    assert found["inside"].values == ["sales.order_items", "sales.orders"]  # names that contain it
    assert "revenue" in found["metric"].values
    assert found["hidden"].values == []
    completions = [r for r in read_records(audit_path) if r["tool"] == "completion/complete"]
    assert len(completions) == 7 and all(r["outcome"] == "ok" for r in completions)
    assert completions[1]["arguments"] == {"ref": "lakegate://datasets/{name}", "argument": {"name": "sales.c"}}
    assert completions[1]["rows"] == 1
    # A value under a name the redaction rules list is hashed, as in a tool call's arguments.
    assert (
        "sk-live-123" not in json.dumps(completions[5])
        and "redacted" in completions[5]["arguments"]["argument"]["api_key"]
    )


def _client(home: Path, audit: Path, **options: Any) -> Client:
    params = server_params("support_agent", home, LAKEGATE_AUDIT__PATH=str(audit))
    return Client(
        params, client_info=Implementation(name="lakegate-tests", version="1.0"), read_timeout_seconds=120, **options
    )


@pytest.fixture
def writable_home(demo_home: Path, tmp_path: Path) -> Path:
    home = tmp_path / "home"
    shutil.copytree(demo_home, home)  # these tests write
    return home


@pytest.mark.filterwarnings("ignore::mcp.shared.exceptions.MCPDeprecationWarning")  # the 2025 methods, on purpose
def test_a_legacy_subscriber_hears_of_a_write_and_the_logging_level_is_accepted(
    writable_home: Path, tmp_path: Path
) -> None:
    audit = tmp_path / "audit.jsonl"
    uri = "lakegate://datasets/support.tickets"

    async def scenario() -> tuple[list[str], list[str]]:
        heard: list[str] = []
        errors: list[str] = []

        async def on_message(message: Any) -> None:
            if isinstance(message, ResourceUpdatedNotification):
                heard.append(str(message.params.uri))

        # Protocol 2025-11-25 and before: resources/subscribe, and logging/setLevel.
        async with _client(writable_home, audit, mode="legacy", message_handler=on_message) as client:
            caps = client.server_capabilities
            assert caps and caps.resources and caps.resources.subscribe and caps.logging is not None
            await client.set_logging_level("info")
            await client.subscribe_resource(uri)
            await client.set_logging_level("debug")  # audited, though it changes nothing
            for refused in (
                "lakegate://datasets/finance.refunds",
                "lakegate://datasets/sales.nope",
                "test://watched-resource",
            ):
                with pytest.raises(MCPError) as caught:
                    await client.subscribe_resource(refused)
                errors.append(caught.value.error.message)
            written = await client.call_tool("append_rows", {"table": "support.tickets", "rows": [TICKET]})
            assert not written.is_error
            with anyio.fail_after(10):
                while not heard:
                    await anyio.sleep(0.05)
            await client.unsubscribe_resource(uri)
            again = await client.call_tool("append_rows", {"table": "support.tickets", "rows": [TICKET]})
            assert not again.is_error
            await client.send_ping()  # a notification sent before the ping's answer would be here by now
        return heard, errors

    heard, errors = run(scenario)
    assert heard == [uri]
    assert errors[0].startswith("No dataset named 'finance.refunds' is available to you.")
    assert errors[1].startswith("No dataset named 'sales.nope' is available to you.")  # hidden and missing alike
    assert errors[2].startswith("Unknown resource test://watched-resource")
    subscribes = [r for r in read_records(audit) if r["tool"] == "resources/subscribe"]
    assert [(r["decision"], r["outcome"]) for r in subscribes] == [
        ("allow", "ok"),
        ("deny", "denied"),
        ("allow", "not_found"),
        ("allow", "not_found"),
    ]
    levels = [r["arguments"] for r in read_records(audit) if r["tool"] == "logging/setLevel"]
    assert levels == [{"level": "info"}, {"level": "debug"}]
    assert [r["rows"] for r in read_records(audit) if r["tool"] == "resources/unsubscribe"] == [1]


def test_a_listen_stream_is_told_only_of_datasets_the_caller_may_read(writable_home: Path, tmp_path: Path) -> None:
    audit = tmp_path / "audit.jsonl"
    tickets, refunds = "lakegate://datasets/support.tickets", "lakegate://datasets/finance.refunds"

    async def scenario() -> tuple[list[str] | None, list[str]]:
        heard: list[str] = []
        # Protocol 2026-07-28: one subscriptions/listen stream, with the URIs in its filter.
        async with (
            _client(writable_home, audit) as client,
            client.listen(resource_subscriptions=[tickets, refunds, "test://watched-resource"]) as stream,
        ):
            honored = stream.honored.resource_subscriptions
            written = await client.call_tool("append_rows", {"table": "support.tickets", "rows": [TICKET]})
            assert not written.is_error
            with anyio.fail_after(10):
                async for event in stream:
                    heard.append(event.uri)  # type: ignore[union-attr]
                    break
        return honored, heard

    honored, heard = run(scenario)
    assert honored == [tickets]  # finance.refunds is hidden from support_agent; the test URI is not a dataset
    assert heard == [tickets]
    (listen,) = [r for r in read_records(audit) if r["tool"] == "subscriptions/listen"]
    assert listen["decision"] == "deny" and listen["rows"] == 1  # it asked for a dataset it may not read
    assert {(r["name"], r["access"]) for r in listen["resources"]} == {
        ("support.tickets", "subscribe"),
        ("finance.refunds", "denied"),
    }


async def _listed(client: Client) -> set[str]:
    listed = await client.call_tool("list_datasets", {})
    return {d["name"] for d in (listed.structured_content or {}).get("datasets", [])}


@pytest.mark.filterwarnings("ignore::mcp.shared.exceptions.MCPDeprecationWarning")  # the 2025 methods, on purpose
def test_a_subscriber_that_may_no_longer_read_is_dropped_not_notified(writable_home: Path, tmp_path: Path) -> None:
    project = _project(tmp_path)
    policy = project / "policies" / "policy.csv"
    audit = tmp_path / "audit.jsonl"
    uri = "lakegate://datasets/support.tickets"
    params = server_params("support_agent", writable_home, project=project, LAKEGATE_AUDIT__PATH=str(audit))

    async def scenario() -> list[str]:
        heard: list[str] = []

        async def on_message(message: Any) -> None:
            if isinstance(message, ResourceUpdatedNotification):
                heard.append(str(message.params.uri))

        info = Implementation(name="lakegate-tests", version="1.0")
        client = Client(params, client_info=info, read_timeout_seconds=120, mode="legacy", message_handler=on_message)
        async with client:
            await client.subscribe_resource(uri)
            # support_agent may still append to the tickets, but no longer read them.
            policy.write_text(policy.read_text() + "p, role:support_agent, support.tickets, read, deny\n")
            with anyio.fail_after(20):  # until the server has reloaded the policy
                while "support.tickets" in await _listed(client):
                    await anyio.sleep(0.5)
            written = await client.call_tool("append_rows", {"table": "support.tickets", "rows": [TICKET]})
            assert not written.is_error, written.content
            await client.send_ping()  # a notification sent before the ping's answer would be here by now
        return heard

    assert run(scenario) == []


def _project(tmp_path: Path) -> Path:
    """A copy of the repository's project, whose policy a test may change."""
    project = tmp_path / "project"
    shutil.copytree(REPO / "policies", project / "policies", ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    shutil.copytree(REPO / "catalog", project / "catalog", ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    return project


#: The analyst loses explain_access (and with it the explain_denial prompt).
REVOKE = "p, role:analyst, tool:explain_access, call, deny\n"


def test_a_policy_change_tells_a_listener_that_its_tool_list_changed(demo_home: Path, tmp_path: Path) -> None:
    project = _project(tmp_path)
    policy = project / "policies" / "policy.csv"
    params = server_params("analyst", demo_home, project=project, LAKEGATE_AUDIT__PATH=str(tmp_path / "a.jsonl"))

    async def scenario() -> tuple[list[str], list[str], list[str]]:
        events: list[str] = []
        client = Client(
            params, client_info=Implementation(name="lakegate-tests", version="1.0"), read_timeout_seconds=120
        )
        async with client, client.listen(tools_list_changed=True, prompts_list_changed=True) as stream:
            before = [tool.name for tool in (await client.list_tools()).tools]
            policy.write_text(policy.read_text() + REVOKE)
            with anyio.fail_after(20):
                async for event in stream:
                    events.append(type(event).__name__)
                    if len(events) == 2:
                        break
            after = [tool.name for tool in (await client.list_tools()).tools]
        return events, before, after

    events, before, after = run(scenario)
    assert sorted(events) == ["PromptsListChanged", "ToolsListChanged"]
    assert "explain_access" in before and "explain_access" not in after


def test_a_policy_change_tells_a_2025_session_that_listed_its_tools(demo_home: Path, tmp_path: Path) -> None:
    project = _project(tmp_path)
    policy = project / "policies" / "policy.csv"
    params = server_params("analyst", demo_home, project=project, LAKEGATE_AUDIT__PATH=str(tmp_path / "a.jsonl"))

    async def scenario() -> set[str]:
        changed: set[str] = set()

        async def on_message(message: Any) -> None:
            if isinstance(message, ToolListChangedNotification | PromptListChangedNotification):
                changed.add(type(message).__name__)

        info = Implementation(name="lakegate-tests", version="1.0")
        client = Client(params, client_info=info, read_timeout_seconds=120, mode="legacy", message_handler=on_message)
        async with client:
            caps = client.server_capabilities
            assert caps and caps.tools and caps.tools.list_changed and caps.prompts and caps.prompts.list_changed
            await client.list_tools()
            policy.write_text(policy.read_text() + REVOKE)
            with anyio.fail_after(20):
                while len(changed) < 2:
                    await anyio.sleep(0.1)
        return changed

    assert run(scenario) == {"ToolListChangedNotification", "PromptListChangedNotification"}
