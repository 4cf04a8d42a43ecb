"""Shared by the metric tests: calling the metric tools through the gate, comparing answers with
hand-written SQL, and the hand-written baselines (fixtures, offered to the tests by conftest)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from datetime import date
from decimal import Decimal
from pathlib import Path
from typing import Any

import anyio
import pytest

from lakegate.errors import ClientError
from lakegate.server.app import Runtime, open_runtime
from lakegate.server.gate.gate import GateOutcome
from lakegate.server.gate.identity import CallOrigin, stdio_principal
from lakegate.server.settings import load_settings

REPO = Path(__file__).resolve().parents[1]

DEMO_METRICS = {
    "revenue", "orders", "average_order_value", "median_order_value", "refund_rate", "cancellation_rate",
    "refunds", "active_customers", "new_customers", "revenue_per_customer", "revenue_growth_mom", "net_revenue",
    "cumulative_revenue", "trailing_3_month_revenue", "revenue_ytd", "units_sold",
}  # fmt: skip
SUPPORT_METRICS = {"orders", "revenue", "average_order_value", "cancellation_rate", "refund_rate"}
MONTH = "strftime(order_ts, '%Y-%m-01')"  # the hand SQL's own month key: 'YYYY-MM-01'
Row = list[Any]


# --- calling the tools -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rt(demo_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runtime]:
    """One runtime for the read-only comparisons of this module (the audit test opens its own)."""
    audit = tmp_path_factory.mktemp("metrics-audit") / "audit.jsonl"
    opened = open_runtime(load_settings(REPO, home=demo_home, audit={"path": audit, "fsync": False}, principal=None))
    yield opened
    opened.close()


def gate(runtime: Runtime, tool: str, who: str, arguments: dict[str, Any]) -> GateOutcome:
    principal = stdio_principal(who, runtime.enforcer)
    origin = CallOrigin(transport="in-process", session_id="t")
    return anyio.run(runtime.gate.call, tool, arguments, principal, origin)


def ok(runtime: Runtime, tool: str, who: str = "admin", **arguments: Any) -> dict[str, Any]:
    outcome = gate(runtime, tool, who, arguments)
    assert outcome.error is None, str(outcome.error)
    assert outcome.result is not None
    answer: dict[str, Any] = outcome.result.model_dump(mode="json")
    assert not answer.get("truncated"), "raise the limit: the comparison needs the whole result"
    return answer


def refused(runtime: Runtime, tool: str, who: str = "admin", **arguments: Any) -> ClientError:
    outcome = gate(runtime, tool, who, arguments)
    assert outcome.result is None and isinstance(outcome.error, ClientError), outcome.error
    return outcome.error


def hand(runtime: Runtime, sql: str) -> list[Row]:
    """Plain SQL over the demo tables, as admin."""
    return list(ok(runtime, "query", sql=sql, limit=1000)["rows"])


def metrics(runtime: Runtime, who: str = "admin", **arguments: Any) -> dict[str, Any]:
    return ok(runtime, "query_metrics", who, limit=1000, **arguments)


def metric_rows(runtime: Runtime, who: str = "admin", **arguments: Any) -> list[Row]:
    answer = metrics(runtime, who, **arguments)
    names = [c["name"] for c in answer["columns"]]
    assert names == [*arguments.get("group_by", []), *arguments["metrics"]]
    return list(answer["rows"])


# --- comparing ---------------------------------------------------------------------------------


def _number(value: Any) -> Decimal | float | int | None:
    if value is None or isinstance(value, int | float):
        return value
    return Decimal(value)  # decimals travel as strings


def same(actual: Any, expected: Any) -> bool:
    """Equal values: decimals and integers exactly, floats (ratios) to 1e-9 relative; NULL only with NULL."""
    a, e = _number(actual), _number(expected)
    if a is None or e is None:
        return a is None and e is None
    if isinstance(a, float) or isinstance(e, float):
        return math.isclose(float(a), float(e), rel_tol=1e-9, abs_tol=1e-12)
    return a == e


def assert_table(actual: list[Row], expected: list[Row], keys: int = 1) -> None:
    """Same rows in the same order: key columns equal, value columns `same`."""
    assert [r[:keys] for r in actual] == [r[:keys] for r in expected]
    for got, want in zip(actual, expected, strict=True):
        assert len(got) == len(want)
        assert all(same(g, w) for g, w in zip(got[keys:], want[keys:], strict=True)), (got, want)


def ratio(numerator: Any, denominator: Any) -> float | None:
    n, d = _number(numerator), _number(denominator)
    return None if not d else float(n or 0) / float(d)


def months(first: str, last: str) -> list[str]:
    """Every month from `first` to `last` ('YYYY-MM-01'), both included."""
    start, end = date.fromisoformat(first), date.fromisoformat(last)
    out = []
    while start <= end:
        out.append(start.isoformat())
        start = date(start.year + start.month // 12, start.month % 12 + 1, 1)
    return out


def previous_month(month: str) -> str:
    day = date.fromisoformat(month)
    return date(day.year - (day.month == 1), (day.month - 2) % 12 + 1, 1).isoformat()


# --- hand-written baselines ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def monthly(rt: Runtime) -> dict[str, dict[str, Any]]:
    """Per month of order_ts: the raw counts and sums every orders metric is built from."""
    rows = hand(
        rt,
        f"""
        SELECT {MONTH} AS month,
               coalesce(sum(total_amount) FILTER (WHERE status <> 'cancelled'), 0) AS revenue,
               sum(total_amount) AS booked,
               coalesce(sum(total_amount) FILTER (WHERE status = 'cancelled'), 0) AS cancelled_total,
               count(*) AS orders,
               count(*) FILTER (WHERE status = 'cancelled') AS cancelled,
               count(*) FILTER (WHERE status = 'returned') AS returned,
               count(*) FILTER (WHERE status <> 'cancelled') AS kept,
               count(DISTINCT customer_id) FILTER (WHERE status <> 'cancelled') AS buyers
        FROM sales.orders GROUP BY month ORDER BY month
        """,
    )
    fields = ("revenue", "booked", "cancelled_total", "orders", "cancelled", "returned", "kept", "buyers")
    return {row[0]: dict(zip(fields, (_number(v) for v in row[1:]), strict=True)) for row in rows}


@pytest.fixture(scope="module")
def monthly_refunds(rt: Runtime) -> dict[str, Decimal]:
    rows = hand(rt, "SELECT strftime(refunded_ts, '%Y-%m-01'), sum(amount) FROM finance.refunds GROUP BY 1 ORDER BY 1")
    return {month: Decimal(total) for month, total in rows}


@pytest.fixture(scope="module")
def revenue_by_month(rt: Runtime) -> list[Row]:
    return metric_rows(rt, metrics=["revenue"], group_by=["metric_time__month"])
