"""Quotas (policies/quotas.yaml): calls per minute per tool family, calls running at once, and daily
budgets of scanned bytes and returned rows, checked by the gate before a call runs.

The clock is the one thing these tests choose: the ledger takes it as an argument, so that a
minute or a day can pass without waiting for it. The PostgreSQL ledger's tests, with two replicas,
are in tests/test_production_profile.py.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx2
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client
from mcp.types import Implementation

from lakegate.errors import PolicyDenied, QuotaExceeded
from lakegate.policies.quotas import QuotaSet, load_quotas
from lakegate.server.app import Runtime
from lakegate.server.gate.gate import RETRY_AFTER_META, to_call_result
from lakegate.server.gate.quota_ledger import InProcessLedger
from lakegate.server.gate.quotas import Quotas
from tests.conftest import REPO, gate_call, gate_ok, runtime_with_policy_file
from tests.test_http import Served, _sample, _serving


class Clock:
    """A clock that a test moves by hand, starting 30 s into a UTC minute, 90 s before 00:00 UTC."""

    def __init__(self, start: float = 1_796_000_000 - 1_796_000_000 % 86_400 + 86_400 - 90) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


def _quotas(tmp_path: Path, text: str) -> QuotaSet:
    path = tmp_path / "quotas.yaml"
    path.write_text(text)
    return load_quotas(path)


QUOTAS = """
defaults:
  calls_per_minute: {catalog: 100, query: 50}
  concurrent_calls: 8
quotas:
  - subject: role:analyst
    calls_per_minute: {query: 3}
    daily_rows: 40
  - subject: role:data_steward
    calls_per_minute: {query: 10}
  - subject: role:support_agent
    shared: true
    daily_rows: 25
  - subject: carol
    calls_per_minute: {query: 1}
"""


def test_the_most_specific_entry_decides_each_limit(tmp_path: Path) -> None:
    quotas = _quotas(tmp_path, QUOTAS)
    analyst = quotas.for_call("alice", ["role:analyst"], "query")
    assert analyst.calls_per_minute is not None and analyst.calls_per_minute.allowed == 3
    assert analyst.concurrent_calls is not None and analyst.concurrent_calls.source == "defaults"
    assert analyst.daily_scan_bytes is None  # set nowhere: not limited
    # Two roles: the more generous allowance; her own entry beats both.
    both = quotas.for_call("bob", ["role:analyst", "role:data_steward"], "query")
    assert both.calls_per_minute is not None and both.calls_per_minute.allowed == 10
    carol = quotas.for_call("carol", ["role:data_steward"], "query")
    assert carol.calls_per_minute is not None and carol.calls_per_minute.allowed == 1
    # A family without a role entry falls back to the defaults.
    catalog = quotas.for_call("alice", ["role:analyst"], "catalog")
    assert catalog.calls_per_minute is not None and catalog.calls_per_minute.allowed == 100
    # A shared entry is counted for the role, an ordinary one for the principal.
    shared = quotas.for_call("dan", ["role:support_agent"], "search")
    assert shared.daily_rows is not None and shared.daily_rows.counted_for == "role:support_agent"
    assert analyst.daily_rows is not None and analyst.daily_rows.counted_for == "alice"


def test_calls_per_minute_are_refused_then_reset_at_the_next_minute(tmp_path: Path) -> None:
    clock = Clock()
    quotas = Quotas(InProcessLedger(clock))
    policy = _quotas(tmp_path, QUOTAS)
    for _ in range(3):
        quotas.settle(quotas.admit(policy, "alice", ["role:analyst"], "query"), scan_bytes=0, rows=0)
    with pytest.raises(QuotaExceeded) as refused:
        quotas.admit(policy, "alice", ["role:analyst"], "query")
    error = refused.value
    assert (error.limit, error.used, error.allowed, error.retry_after_s) == ("calls_per_minute.query", 3, 3, 30)
    assert "3 query calls this minute" in str(error) and "Retry in 30 s" in str(error)
    # Another family, and another principal, are counted apart.
    quotas.admit(policy, "alice", ["role:analyst"], "catalog")
    quotas.admit(policy, "ann", ["role:analyst"], "query")
    clock.now += 30
    quotas.admit(policy, "alice", ["role:analyst"], "query")


def test_running_calls_hold_a_slot_until_they_settle(tmp_path: Path) -> None:
    quotas = Quotas(InProcessLedger(Clock()))
    policy = _quotas(tmp_path, "defaults:\n  concurrent_calls: 2\n")
    first = quotas.admit(policy, "alice", [], "query")
    quotas.admit(policy, "alice", [], "catalog")
    with pytest.raises(QuotaExceeded) as refused:
        quotas.admit(policy, "alice", [], "search")
    assert refused.value.limit == "concurrent_calls" and "running 2 calls at once" in str(refused.value)
    quotas.settle(first, scan_bytes=0, rows=0)
    quotas.admit(policy, "alice", [], "search")


def test_a_shared_daily_budget_is_drawn_on_by_the_whole_role_and_resets_at_midnight(tmp_path: Path) -> None:
    clock = Clock()
    quotas = Quotas(InProcessLedger(clock))
    policy = _quotas(tmp_path, QUOTAS)
    quotas.settle(quotas.admit(policy, "dan", ["role:support_agent"], "search"), scan_bytes=0, rows=20)
    quotas.settle(quotas.admit(policy, "eve", ["role:support_agent"], "query"), scan_bytes=0, rows=5)
    with pytest.raises(QuotaExceeded) as refused:
        quotas.admit(policy, "dan", ["role:support_agent"], "catalog")
    error = refused.value
    assert error.limit == "daily_rows" and error.used == 25 and error.retry_after_s == 90
    assert "The agents of role:support_agent together have received 25 rows today" in str(error)
    clock.now += 90  # 00:00 UTC
    quotas.admit(policy, "dan", ["role:support_agent"], "catalog")


def test_a_refused_call_counts_nothing(tmp_path: Path) -> None:
    quotas = Quotas(InProcessLedger(Clock()))
    policy = _quotas(tmp_path, "defaults:\n  concurrent_calls: 1\n  calls_per_minute: {query: 1}\n")
    quotas.settle(quotas.admit(policy, "alice", [], "query"), scan_bytes=0, rows=0)
    with pytest.raises(QuotaExceeded):
        quotas.admit(policy, "alice", [], "query")
    # The refusal gave its running-call slot back: another family still gets in.
    quotas.admit(policy, "alice", [], "catalog")


def test_invalid_quotas_are_rejected_with_where(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="calls_per_minute"):
        _quotas(tmp_path, "defaults:\n  calls_per_minute: {queries: 5}\n")
    with pytest.raises(ValueError, match="greater than 0"):
        _quotas(tmp_path, "defaults:\n  concurrent_calls: 0\n")


# -- through the gate ---------------------------------------------------------------------------

GATE_QUOTAS = """
quotas:
  - subject: role:analyst
    calls_per_minute: {query: 4}
    daily_rows: 30
  - subject: role:data_steward
    daily_scan_bytes: 40kB
"""
MONTH = (
    "SELECT status, count(*) AS n FROM sales.orders WHERE order_ts >= TIMESTAMPTZ '2025-11-01' "
    "AND order_ts < TIMESTAMPTZ '2025-12-01' GROUP BY status ORDER BY status"
)


def _runtime(demo_home: Path, tmp_path: Path, text: str) -> Runtime:
    return runtime_with_policy_file(demo_home, tmp_path, "quotas.yaml", text)


def _records(tmp_path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]


def test_a_call_over_a_quota_is_refused_audited_and_says_when_to_retry(demo_home: Path, tmp_path: Path) -> None:
    runtime = _runtime(demo_home, tmp_path, GATE_QUOTAS)
    try:
        for _ in range(4):
            gate_ok(runtime, "analyst", "query", {"sql": "SELECT 1 AS one"})
        refused = gate_call(runtime, "analyst", "query", {"sql": "SELECT 1 AS one"})
        assert isinstance(refused.error, QuotaExceeded) and refused.error.limit == "calls_per_minute.query"
        result = to_call_result(refused)
        assert result.is_error and "4 query calls this minute" in result.content[0].text  # type: ignore[union-attr]
        assert result.meta is not None and 1 <= result.meta[RETRY_AFTER_META] <= 60
        # Browsing the catalog is another family: still allowed.
        gate_ok(runtime, "analyst", "list_datasets", {})
    finally:
        runtime.close()
    limited = [r for r in _records(tmp_path) if r["outcome"] == "limited"]
    assert len(limited) == 1 and limited[0]["tool"] == "query"
    quota = limited[0]["details"]["quota"]
    assert quota["limit"] == "calls_per_minute.query" and quota["used"] == 4 and quota["allowed"] == 4


def test_rows_returned_count_against_the_daily_rows_quota(demo_home: Path, tmp_path: Path) -> None:
    runtime = _runtime(demo_home, tmp_path, GATE_QUOTAS)
    try:
        sql = "SELECT customer_id FROM sales.customers ORDER BY customer_id"
        assert len(gate_ok(runtime, "analyst", "query", {"sql": sql, "limit": 20})["rows"]) == 20
        assert len(gate_ok(runtime, "analyst", "query", {"sql": sql, "limit": 15})["rows"]) == 15
        refused = gate_call(runtime, "analyst", "list_datasets", {})
        assert isinstance(refused.error, QuotaExceeded) and refused.error.limit == "daily_rows"
        assert "received 35 rows today" in str(refused.error) and "00:00 UTC" in str(refused.error)
    finally:
        runtime.close()


def test_a_query_that_does_not_fit_in_the_daily_scan_budget_is_refused_before_it_runs(
    demo_home: Path, tmp_path: Path
) -> None:
    runtime = _runtime(demo_home, tmp_path, GATE_QUOTAS)
    try:
        # One month of orders is a few kB of columns; three columns of the whole table (about 87 kB)
        # are more than 40 kB.
        whole = "SELECT count(DISTINCT customer_id), sum(total_amount), max(order_ts) FROM sales.orders"
        refused = gate_call(runtime, "data_steward", "query", {"sql": whole})
        assert isinstance(refused.error, QuotaExceeded) and refused.error.limit == "daily_scan_bytes"
        assert "not run" in str(refused.error) and "40.0 kB" in str(refused.error)
        plan = gate_ok(runtime, "data_steward", "query", {"sql": whole, "explain": True})["plan"]
        assert "daily scan quota" in plan
        # Months fit until what they planned adds up to the budget; then no query runs today.
        month = gate_ok(runtime, "data_steward", "query", {"sql": MONTH})
        assert month["rows"]
        outcomes = [gate_call(runtime, "data_steward", "query", {"sql": MONTH}).error for _ in range(12)]
        assert any(isinstance(error, QuotaExceeded) for error in outcomes)
        # Another principal is counted apart.
        gate_ok(runtime, "analyst", "query", {"sql": MONTH})
    finally:
        runtime.close()
    records = _records(tmp_path)
    planned = [
        sum(table["bytes"] for table in r["details"]["planned_scan"].values())
        for r in records
        if r["principal"] == "data_steward" and r["outcome"] == "ok" and "scanned" in r.get("details", {})
    ]
    assert sum(planned) <= 40_000, planned  # one process: never over the budget


def test_concurrent_calls_over_the_quota_are_refused(demo_home: Path, tmp_path: Path) -> None:
    runtime = _runtime(demo_home, tmp_path, "defaults:\n  concurrent_calls: 2\n")
    heavy = "SELECT count(*) FROM range(400000000) a"
    errors: list[Any] = []

    def call() -> None:
        errors.append(gate_call(runtime, "admin", "query", {"sql": heavy}, session_id="c").error)

    try:
        threads = [threading.Thread(target=call) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        refused = [e for e in errors if isinstance(e, QuotaExceeded)]
        assert refused and all(e.limit == "concurrent_calls" for e in refused), errors
        assert all(e is None for e in errors if e not in refused), errors
        # Every slot was given back: the next call gets in.
        assert gate_ok(runtime, "admin", "query", {"sql": "SELECT 1 AS one"})["rows"] == [[1]]
    finally:
        runtime.close()


def test_an_invalid_quotas_file_denies_everything(demo_home: Path, tmp_path: Path) -> None:
    runtime = _runtime(demo_home, tmp_path, "defaults:\n  concurrent_calls: many\n")
    try:
        outcome = gate_call(runtime, "analyst", "list_datasets", {})
        assert isinstance(outcome.error, PolicyDenied), outcome.error
    finally:
        runtime.close()


def test_the_demo_sets_tighter_quotas_for_the_data_steward() -> None:
    demo = load_quotas(REPO / "policies" / "quotas.yaml")
    steward = demo.for_call("sam", ["role:data_steward"], "query")
    analyst = demo.for_call("ann", ["role:analyst"], "query")
    assert steward.calls_per_minute and analyst.calls_per_minute
    assert steward.calls_per_minute.allowed < analyst.calls_per_minute.allowed


# -- over HTTP, with the SDK's client ----------------------------------------------------------


@pytest.fixture
def served(demo_home: Path, tmp_path: Path) -> Iterator[Served]:
    with _serving(demo_home, tmp_path / "http") as serving:
        yield serving


def test_a_quota_refusal_carries_its_retry_time_and_is_counted_by_quota(served: Served) -> None:
    # The demo allows data_steward 60 queries a minute (policies/quotas.yaml), held here through the
    # token. Up to 121 calls: 60 a minute cannot all pass, even if a minute turns in the middle.
    token = served.token("quota-probe", ["data_steward"])
    auth = {"Authorization": f"Bearer {token}"}
    before = httpx2.get(served.base + "/metrics", headers=auth).text

    async def until_refused() -> list[Any]:
        http = create_mcp_http_client(headers={"Authorization": f"Bearer {token}"})
        transport = streamable_http_client(served.url, http_client=http)
        results: list[Any] = []
        async with http, Client(transport, client_info=Implementation(name="http-tests", version="1.0")) as client:
            while len(results) < 121 and not (results and results[-1].is_error):
                results.append(await client.call_tool("query", {"sql": "SELECT 1 AS one"}))
        return results

    results = anyio.run(until_refused)
    refused = results[-1]
    assert refused.is_error, "no call was refused"
    assert "query calls this minute; the quota is 60 a minute" in refused.content[0].text
    assert 1 <= refused.meta[RETRY_AFTER_META] <= 60
    after = httpx2.get(served.base + "/metrics", headers=auth).text
    label = {"quota": "calls_per_minute.query"}
    assert _sample(after, "lakegate_quota_refusals_total", **label) == (
        _sample(before, "lakegate_quota_refusals_total", **label) + 1
    )
