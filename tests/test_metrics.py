"""Metric correctness: every metric type checked against plain SQL written by hand from its definition.

The hand SQL follows catalog/metrics.yaml and the README's semantics, not the compiler's output, and
runs through the `query` tool as admin, so both sides read the same snapshots of the small demo
warehouse. The comparisons are exact for decimals and integers and 1e-9 relative for ratios.
"""

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
from lakegate.evals.mcp_client import connect, text_of
from lakegate.server.app import Runtime, open_runtime
from lakegate.server.audit.log import read_records
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


def test_the_demo_orders_span_two_whole_years(monthly: dict[str, dict[str, Any]]) -> None:
    assert list(monthly) == months("2024-01-01", "2025-12-01")


# --- the catalogue -------------------------------------------------------------------------------


def test_the_demo_catalog_defines_the_sixteen_metrics_and_analyst_sees_them_all(rt: Runtime) -> None:
    listed = ok(rt, "list_metrics", "analyst", limit=100)["metrics"]
    names = {m["name"] for m in listed}
    assert len(names) >= 12  # the floor
    assert names == DEMO_METRICS
    revenue = next(m for m in listed if m["name"] == "revenue")
    assert revenue["version"] == 2 and "gmv" in revenue["synonyms"] and revenue["type"] == "simple"


def test_support_agent_lists_exactly_its_five_metrics(rt: Runtime) -> None:
    listed = ok(rt, "list_metrics", "support_agent", limit=100)["metrics"]
    assert {m["name"] for m in listed} == SUPPORT_METRICS and len(listed) == 5
    found = ok(rt, "list_metrics", "support_agent", search="refund")["metrics"]
    assert [m["name"] for m in found] == ["refund_rate"]  # refunds and net_revenue stay out of sight


def test_describe_metric_says_support_agent_may_use_revenue(rt: Runtime) -> None:
    described = ok(rt, "describe_metric", "support_agent", name="revenue")
    assert described["usable"] is True and described["version"] == 2
    assert [v["version"] for v in described["versions"]] == [1, 2]
    assert described["definition"] == {
        "table": "sales.orders",
        "aggregation": "sum",
        "expression": "total_amount",
        "filter": "status <> 'cancelled'",
    }
    assert {(r["table"], r["column"]) for r in described["reads"]} == {
        ("sales.orders", "total_amount"),
        ("sales.orders", "status"),
        ("sales.orders", "order_ts"),  # its metric_time
    }
    assert "customer__segment" in described["dimensions"] and "month" in described["time_grains"]
    units = ok(rt, "describe_metric", "analyst", name="units_sold")
    assert units["time_grains"] == [] and "product__category" in units["dimensions"]


# --- grains and empty periods --------------------------------------------------------------------


def test_empty_months_read_zero_for_counts_and_none_for_other_aggregates(rt: Runtime) -> None:
    # Enterprise accounts are rare: many months have no signup at all.
    signups = dict(
        hand(
            rt,
            "SELECT strftime(signup_date, '%Y-%m-01'), count(*) FROM sales.customers "
            "WHERE segment = 'enterprise' GROUP BY 1 ORDER BY 1",
        )
    )
    spine = months(min(signups), max(signups))
    assert len(spine) > len(signups) + 10  # genuinely empty months exist
    answer = metric_rows(
        rt,
        metrics=["new_customers"],
        group_by=["metric_time__month"],
        where=[{"dimension": "customer__segment", "op": "=", "value": "enterprise"}],
    )
    assert answer == [[month, signups.get(month, 0)] for month in spine]


def test_an_empty_month_gives_zero_revenue_and_orders_and_null_median_and_ratios(rt: Runtime) -> None:
    # Orders of German enterprise customers: a few a month, none at all in some months, and in some
    # months only cancelled ones.
    where = [
        {"dimension": "customer__segment", "op": "=", "value": "enterprise"},
        {"dimension": "customer__country", "op": "=", "value": "DE"},
    ]
    raw = hand(
        rt,
        f"""
        SELECT {MONTH}, coalesce(sum(total_amount) FILTER (WHERE status <> 'cancelled'), 0),
               count(*), quantile_cont(total_amount, 0.5) FILTER (WHERE status <> 'cancelled'),
               count(DISTINCT customer_id) FILTER (WHERE status <> 'cancelled'),
               count(*) FILTER (WHERE status <> 'cancelled'), count(*) FILTER (WHERE status = 'cancelled')
        FROM sales.orders
        WHERE customer_id IN (SELECT customer_id FROM sales.customers WHERE segment = 'enterprise' AND country = 'DE')
        GROUP BY 1 ORDER BY 1
        """,
    )
    by_month = {row[0]: row[1:] for row in raw}
    spine = months(min(by_month), max(by_month))
    empty = [m for m in spine if m not in by_month]
    only_cancelled = [m for m, row in by_month.items() if row[4] == 0]
    assert empty and only_cancelled  # the case is what it claims to be

    got = metric_rows(
        rt,
        metrics=["revenue", "orders", "median_order_value", "active_customers"],
        group_by=["metric_time__month"],
        where=where,
    )
    assert [r[0] for r in got] == spine
    for month, revenue, orders, median, buyers in got:
        want = by_month.get(month, ("0", 0, None, 0, 0, 0))
        assert same(revenue, want[0]) and orders == want[1] and buyers == want[3], month
        if want[2] is None:
            assert median is None, month
        else:  # DuckDB's median of a decimal(12, 2) column keeps two decimal places
            assert abs(Decimal(median) - Decimal(str(want[2]))) <= Decimal("0.005"), (month, median, want[2])
    for month in empty:
        assert got[spine.index(month)][1:] == ["0.00", 0, None, 0]

    rates = metric_rows(
        rt, metrics=["average_order_value", "cancellation_rate"], group_by=["metric_time__month"], where=where
    )
    expected = []
    for month in spine:
        revenue, orders, _, _, kept, cancelled = by_month.get(month, ("0", 0, None, 0, 0, 0))
        expected.append([month, ratio(revenue, kept), ratio(cancelled, orders)])
    assert_table(rates, expected)
    assert all(rates[spine.index(m)][1:] == [None, None] for m in empty)  # 0 / 0 is NULL
    assert all(rates[spine.index(m)][1:] == [None, 1.0] for m in only_cancelled)


@pytest.mark.parametrize(
    ("grain", "period"),
    [
        ("month", MONTH),
        ("quarter", "make_date(year(order_ts), 3 * quarter(order_ts) - 2, 1)"),
        ("year", "make_date(year(order_ts), 1, 1)"),
        ("week", "CAST(order_ts AS DATE) - CAST(isodow(order_ts) - 1 AS INTEGER)"),  # ISO weeks start on Monday
    ],
)
def test_revenue_and_orders_at_every_grain(rt: Runtime, grain: str, period: str) -> None:
    expected = hand(
        rt,
        f"SELECT CAST({period} AS DATE) AS p, coalesce(sum(total_amount) FILTER (WHERE status <> 'cancelled'), 0), "
        "count(*) FROM sales.orders GROUP BY p ORDER BY p",
    )
    got = metric_rows(rt, metrics=["revenue", "orders"], group_by=[f"metric_time__{grain}"])
    assert_table(got, expected)
    assert sum(r[2] for r in got) == 5_000
    assert len(got) == {"month": 24, "quarter": 8, "year": 2}.get(grain, len(expected))


def test_new_customers_by_signup_date_a_date_column(rt: Runtime) -> None:
    expected = hand(
        rt, "SELECT make_date(year(signup_date), 1, 1) AS y, count(*) FROM sales.customers GROUP BY y ORDER BY y"
    )
    assert metric_rows(rt, metrics=["new_customers"], group_by=["metric_time__year"]) == expected
    # The same time dimension by its own name, and reached from orders through the customer key.
    assert metric_rows(rt, metrics=["new_customers"], group_by=["customer__signup_date__year"]) == expected
    by_cohort = hand(
        rt,
        """
        SELECT make_date(year(c.signup_date), 1, 1) AS cohort, sum(o.total_amount)
        FROM sales.orders o JOIN sales.customers c ON c.customer_id = o.customer_id
        WHERE o.status <> 'cancelled' GROUP BY cohort ORDER BY cohort
        """,
    )
    assert_table(metric_rows(rt, metrics=["revenue"], group_by=["customer__signup_date__year"]), by_cohort)


def test_median_order_value_by_quarter(rt: Runtime) -> None:
    expected = hand(
        rt,
        """
        SELECT make_date(year(order_ts), 3 * quarter(order_ts) - 2, 1) AS q, quantile_cont(total_amount, 0.5)
        FROM sales.orders WHERE status <> 'cancelled' GROUP BY q ORDER BY q
        """,
    )
    got = metric_rows(rt, metrics=["median_order_value"], group_by=["metric_time__quarter"])
    assert [r[0] for r in got] == [r[0] for r in expected]
    for (_, median), (_, want) in zip(got, expected, strict=True):
        assert abs(Decimal(median) - Decimal(str(want))) <= Decimal("0.005")


# --- ratios and derived metrics ------------------------------------------------------------------


def test_ratios_with_their_own_filters_by_month_and_overall(rt: Runtime, monthly: dict[str, dict[str, Any]]) -> None:
    got = metric_rows(rt, metrics=["refund_rate", "cancellation_rate"], group_by=["metric_time__month"])
    expected = [
        [month, ratio(m["returned"], m["kept"]), ratio(m["cancelled"], m["orders"])] for month, m in monthly.items()
    ]
    assert_table(got, expected)
    assert all(0 < r[1] < 1 and 0 < r[2] < 1 for r in got)
    (overall,) = metric_rows(rt, metrics=["refund_rate", "cancellation_rate"])
    (totals,) = hand(
        rt,
        "SELECT count(*) FILTER (WHERE status = 'returned'), count(*) FILTER (WHERE status <> 'cancelled'), "
        "count(*) FILTER (WHERE status = 'cancelled'), count(*) FROM sales.orders",
    )
    assert_table([overall], [[ratio(totals[0], totals[1]), ratio(totals[2], totals[3])]], keys=0)
    # A ratio of totals, not an average of the monthly ratios.
    assert not same(overall[0], sum(r[1] for r in got) / len(got))


def test_average_order_value_and_revenue_per_customer_by_month(rt: Runtime, monthly: dict[str, dict[str, Any]]) -> None:
    got = metric_rows(rt, metrics=["average_order_value", "revenue_per_customer"], group_by=["metric_time__month"])
    expected = [
        [month, ratio(m["revenue"], m["kept"]), ratio(m["revenue"], m["buyers"])] for month, m in monthly.items()
    ]
    assert_table(got, expected)


def test_active_customers_counts_each_customer_once(rt: Runtime, monthly: dict[str, dict[str, Any]]) -> None:
    by_month = metric_rows(rt, metrics=["active_customers"], group_by=["metric_time__month"])
    assert by_month == [[month, m["buyers"]] for month, m in monthly.items()]
    ((overall,),) = metric_rows(rt, metrics=["active_customers"])
    ((distinct,),) = hand(rt, "SELECT count(DISTINCT customer_id) FROM sales.orders WHERE status <> 'cancelled'")
    assert overall == distinct and overall < sum(r[1] for r in by_month)  # not additive over months


def test_revenue_growth_mom_compares_each_month_with_the_one_before(
    rt: Runtime, monthly: dict[str, dict[str, Any]]
) -> None:
    got = metric_rows(rt, metrics=["revenue", "revenue_growth_mom"], group_by=["metric_time__month"])
    expected = []
    for month, m in monthly.items():
        before = monthly.get(previous_month(month))
        growth = None if before is None else ratio(m["revenue"] - before["revenue"], before["revenue"])
        expected.append([month, m["revenue"], growth])
    assert_table(got, expected)
    assert got[0][2] is None and all(r[2] is not None for r in got[1:])
    assert got[-1][0] == "2025-12-01"  # the shifted input adds no month after the last one
    # At quarter grain the period before is the quarter before.
    quarterly = hand(
        rt,
        "SELECT make_date(year(order_ts), 3 * quarter(order_ts) - 2, 1) AS q, sum(total_amount) FROM sales.orders "
        "WHERE status <> 'cancelled' GROUP BY q ORDER BY q",
    )
    quarter_growth = [
        None,
        *(ratio(Decimal(b) - Decimal(a), a) for (_, a), (_, b) in zip(quarterly, quarterly[1:], strict=False)),
    ]
    by_quarter = metric_rows(rt, metrics=["revenue_growth_mom"], group_by=["metric_time__quarter"])
    assert_table(by_quarter, [[q, g] for (q, _), g in zip(quarterly, quarter_growth, strict=True)])


def test_a_period_filter_keeps_the_earlier_period_an_offset_reads(
    rt: Runtime, monthly: dict[str, dict[str, Any]]
) -> None:
    got = metric_rows(
        rt,
        metrics=["revenue_growth_mom"],
        group_by=["metric_time__month"],
        where=[{"dimension": "metric_time__month", "op": ">=", "value": "2025-01-01"}],
    )
    assert [r[0] for r in got] == months("2025-01-01", "2025-12-01")
    december, january = monthly["2024-12-01"]["revenue"], monthly["2025-01-01"]["revenue"]
    assert same(got[0][1], ratio(january - december, december))  # not NULL: December 2024 is still read


def test_net_revenue_subtracts_the_refunds_of_the_same_period(
    rt: Runtime, monthly: dict[str, dict[str, Any]], monthly_refunds: dict[str, Decimal]
) -> None:
    got = metric_rows(rt, metrics=["revenue", "refunds", "net_revenue"], group_by=["metric_time__month"])
    spine = months(min([*monthly, *monthly_refunds]), max([*monthly, *monthly_refunds]))
    assert spine[-1] == "2026-01-01"  # refunds of December's returns are paid in January 2026
    expected = []
    for month in spine:
        revenue = monthly[month]["revenue"] if month in monthly else Decimal(0)
        refunds = monthly_refunds.get(month, Decimal(0))
        expected.append([month, revenue, refunds, revenue - refunds])
    assert_table(got, expected)
    assert same(got[-1][1], 0) and Decimal(got[-1][3]) == -monthly_refunds["2026-01-01"] < 0
    ((net,),) = metric_rows(rt, metrics=["net_revenue"])
    ((revenue, refunds),) = hand(
        rt,
        "SELECT (SELECT sum(total_amount) FROM sales.orders WHERE status <> 'cancelled'), "
        "(SELECT sum(amount) FROM finance.refunds)",
    )
    assert Decimal(net) == Decimal(revenue) - Decimal(refunds)


def test_net_revenue_by_the_region_the_order_was_booked_in(rt: Runtime) -> None:
    expected = hand(
        rt,
        """
        SELECT r.region, r.revenue - coalesce(f.refunded, 0)
        FROM (SELECT region, sum(total_amount) AS revenue FROM sales.orders WHERE status <> 'cancelled'
              GROUP BY region) AS r
        LEFT JOIN (SELECT o.region, sum(x.amount) AS refunded FROM finance.refunds x
                   JOIN sales.orders o ON o.order_id = x.order_id GROUP BY o.region) AS f ON f.region = r.region
        ORDER BY r.region
        """,
    )
    assert_table(metric_rows(rt, metrics=["net_revenue"], group_by=["order__region"]), expected)


def test_a_period_filter_at_another_grain_keeps_the_periods_it_lets_rows_through(
    rt: Runtime, monthly: dict[str, dict[str, Any]]
) -> None:
    # By year, every month of the year (the filter used to be compared with each month as if a year).
    year = [{"dimension": "metric_time__year", "op": "=", "value": "2025-01-01"}]
    got = metric_rows(rt, metrics=["revenue", "cumulative_revenue"], group_by=["metric_time__month"], where=year)
    assert [r[0] for r in got] == months("2025-01-01", "2025-12-01")
    assert all(same(r[1], monthly[r[0]]["revenue"]) for r in got)
    # By a finer grain: the month the filter cuts through keeps its part (it used to vanish), so the
    # months add up to the total without a breakdown.
    for dimension in ("metric_time__day", "metric_time"):
        where = [{"dimension": dimension, "op": ">=", "value": "2025-10-15"}]
        expected = hand(
            rt,
            f"SELECT {MONTH} AS month, sum(total_amount), count(*) FROM sales.orders "
            "WHERE status <> 'cancelled' AND order_ts >= TIMESTAMPTZ '2025-10-15 00:00:00+00' GROUP BY 1 ORDER BY 1",
        )
        got = metric_rows(rt, metrics=["revenue", "active_customers"], group_by=["metric_time__month"], where=where)
        assert [r[:2] for r in got] == [r[:2] for r in expected] and got[0][0] == "2025-10-01"
        ((total,),) = metric_rows(rt, metrics=["revenue"], where=where)
        assert Decimal(total) == sum(Decimal(r[1]) for r in got)
    months_in = [{"dimension": "metric_time__month", "op": "in", "value": ["2024-05-01", "2025-02-01"]}]
    got = metric_rows(rt, metrics=["orders"], group_by=["metric_time__quarter"], where=months_in)
    assert got == [["2024-04-01", monthly["2024-05-01"]["orders"]], ["2025-01-01", monthly["2025-02-01"]["orders"]]]
    upto = [{"dimension": "metric_time__month", "op": "<=", "value": "2024-03-01"}]
    q1 = sum(monthly[m]["revenue"] for m in months("2024-01-01", "2024-03-01"))
    assert_table(metric_rows(rt, metrics=["revenue"], group_by=["metric_time__year"], where=upto), [["2024-01-01", q1]])


def test_describe_metric_of_a_metric_with_an_offset(rt: Runtime) -> None:
    described = ok(rt, "describe_metric", "analyst", name="revenue_growth_mom")
    assert described["usable"] and described["definition"]["inputs"][1]["offset"] == 1


# --- cumulative metrics --------------------------------------------------------------------------


def test_cumulative_revenue_trailing_three_months_and_year_to_date(
    rt: Runtime, monthly: dict[str, dict[str, Any]]
) -> None:
    got = metric_rows(
        rt,
        metrics=["cumulative_revenue", "trailing_3_month_revenue", "revenue_ytd"],
        group_by=["metric_time__month"],
    )
    spine = list(monthly)
    revenue = [monthly[m]["revenue"] for m in spine]
    expected = []
    for i, month in enumerate(spine):
        year_start = next(j for j, m in enumerate(spine) if m[:4] == month[:4])
        expected.append(
            [month, sum(revenue[: i + 1]), sum(revenue[max(0, i - 2) : i + 1]), sum(revenue[year_start : i + 1])]
        )
    assert_table(got, expected)
    january = spine.index("2025-01-01")
    assert same(got[january][3], revenue[january])  # year to date starts again in January
    assert same(got[january - 1][3], sum(revenue[:january]))
    assert same(got[-1][1], sum(revenue))


def test_cumulative_revenue_by_quarter_and_region_matches_a_window_query(rt: Runtime) -> None:
    expected = hand(
        rt,
        """
        WITH quarterly AS (
            SELECT make_date(year(order_ts), 3 * quarter(order_ts) - 2, 1) AS q, region, sum(total_amount) AS revenue
            FROM sales.orders WHERE status <> 'cancelled' GROUP BY ALL)
        SELECT q, region, sum(revenue) OVER (PARTITION BY region ORDER BY q) AS running,
               sum(revenue) OVER (PARTITION BY region, year(q) ORDER BY q) AS ytd
        FROM quarterly ORDER BY q, region
        """,
    )
    got = metric_rows(
        rt,
        metrics=["cumulative_revenue", "revenue_ytd"],
        group_by=["metric_time__quarter", "order__region"],
    )
    assert_table(got, expected, keys=2)


def test_trailing_window_and_year_to_date_after_a_period_filter(
    rt: Runtime, monthly: dict[str, dict[str, Any]]
) -> None:
    got = metric_rows(
        rt,
        metrics=["trailing_3_month_revenue", "revenue_ytd"],
        group_by=["metric_time__month"],
        where=[{"dimension": "metric_time__month", "op": ">=", "value": "2025-02-01"}],
    )
    revenue = {m: v["revenue"] for m, v in monthly.items()}
    assert got[0][0] == "2025-02-01"
    # The window still reaches back into the months the filter leaves out of the answer.
    assert same(got[0][1], revenue["2024-12-01"] + revenue["2025-01-01"] + revenue["2025-02-01"])
    assert same(got[0][2], revenue["2025-01-01"] + revenue["2025-02-01"])


def test_a_cumulative_metric_carries_on_in_periods_after_its_last_row(
    rt: Runtime, monthly: dict[str, dict[str, Any]]
) -> None:
    # Refunds run into January 2026, so the answer has that month; revenue has no order in it.
    got = metric_rows(
        rt, metrics=["cumulative_revenue", "trailing_3_month_revenue", "refunds"], group_by=["metric_time__month"]
    )
    assert got[-1][0] == "2026-01-01"
    revenue = [m["revenue"] for m in monthly.values()]
    assert same(got[-1][1], sum(revenue)) and same(got[-1][2], sum(revenue[-2:]))


# --- joins ---------------------------------------------------------------------------------------


def test_dimensions_reached_through_a_join(rt: Runtime) -> None:
    by_segment = hand(
        rt,
        """
        SELECT c.segment, sum(o.total_amount)
        FROM sales.orders o JOIN sales.customers c ON c.customer_id = o.customer_id
        WHERE o.status <> 'cancelled' GROUP BY c.segment ORDER BY c.segment
        """,
    )
    assert [r[0] for r in by_segment] == ["consumer", "enterprise", "smb"]
    assert_table(metric_rows(rt, metrics=["revenue"], group_by=["customer__segment"]), by_segment)

    by_category = hand(
        rt,
        """
        SELECT p.category, sum(i.quantity) FROM sales.order_items i JOIN sales.products p ON p.product_id = i.product_id
        GROUP BY p.category ORDER BY p.category
        """,
    )
    assert metric_rows(rt, metrics=["units_sold"], group_by=["product__category"]) == by_category
    by_status = hand(
        rt,
        "SELECT o.status, sum(i.quantity) FROM sales.order_items i JOIN sales.orders o ON o.order_id = i.order_id "
        "GROUP BY o.status ORDER BY o.status",
    )
    assert metric_rows(rt, metrics=["units_sold"], group_by=["order__status"]) == by_status


def test_a_filter_on_a_joined_dimension(rt: Runtime) -> None:
    expected = hand(
        rt,
        """
        SELECT o.region, sum(o.total_amount), count(*) FROM sales.orders o
        JOIN sales.customers c ON c.customer_id = o.customer_id
        WHERE o.status <> 'cancelled' AND c.segment = 'smb' GROUP BY o.region ORDER BY o.region
        """,
    )
    got = metric_rows(
        rt,
        metrics=["revenue", "average_order_value"],
        group_by=["order__region"],
        where=[{"dimension": "customer__segment", "op": "=", "value": "smb"}],
    )
    assert_table(got, [[region, revenue, ratio(revenue, n)] for region, revenue, n in expected])
    everyone = metric_rows(rt, metrics=["revenue"], group_by=["order__region"])
    assert all(Decimal(smb[1]) < Decimal(all_[1]) for smb, all_ in zip(got, everyone, strict=True))


def test_order_by_a_metric_descending(rt: Runtime) -> None:
    got = metric_rows(rt, metrics=["revenue"], group_by=["customer__region"], order_by=["-revenue"])
    expected = hand(
        rt,
        """
        SELECT c.region, sum(o.total_amount) AS revenue FROM sales.orders o
        JOIN sales.customers c ON c.customer_id = o.customer_id
        WHERE o.status <> 'cancelled' GROUP BY c.region ORDER BY revenue DESC
        """,
    )
    assert_table(got, expected)


# --- versions ------------------------------------------------------------------------------------


def test_revenue_v1_and_v2_differ_exactly_by_the_cancelled_orders(
    rt: Runtime, monthly: dict[str, dict[str, Any]], revenue_by_month: list[Row]
) -> None:
    v1 = metrics(rt, metrics=["revenue"], group_by=["metric_time__month"], versions={"revenue": 1})
    assert v1["metrics"] == {"revenue": 1}
    assert_table(v1["rows"], [[month, m["booked"]] for month, m in monthly.items()])
    for (month, old), (_, new) in zip(v1["rows"], revenue_by_month, strict=True):
        assert Decimal(old) - Decimal(new) == monthly[month]["cancelled_total"] > 0


def test_a_version_that_does_not_exist_is_not_found_with_the_versions_listed(rt: Runtime) -> None:
    error = refused(rt, "query_metrics", metrics=["revenue"], versions={"revenue": 7})
    assert error.outcome == "not_found"
    assert "no version 7" in str(error) and "Versions you can query: 1, 2." in str(error)
    error = refused(rt, "describe_metric", name="revenue", version=3)
    assert error.outcome == "not_found" and "1, 2" in str(error)


@pytest.mark.parametrize(
    ("metric", "versions"),
    [
        ("revenue", {"revenue": 2}),
        ("average_order_value", {"average_order_value": 1, "revenue": 2, "orders": 1}),
        ("revenue_growth_mom", {"revenue_growth_mom": 1, "revenue": 2}),
        ("net_revenue", {"net_revenue": 1, "revenue": 2, "refunds": 1}),
        ("revenue_per_customer", {"revenue_per_customer": 1, "revenue": 2, "active_customers": 1}),
    ],
)
def test_the_answer_reports_every_metric_version_used(rt: Runtime, metric: str, versions: dict[str, int]) -> None:
    answer = metrics(rt, metrics=[metric], group_by=["metric_time__year"])
    assert answer["metrics"] == versions
    assert "sales.orders" in answer["compiled_sql"] and answer["snapshots"]["sales.orders"] is not None


# --- NULL and division by zero -------------------------------------------------------------------


def test_division_by_zero_gives_null_and_an_empty_numerator_gives_zero(rt: Runtime) -> None:
    delivered = [{"dimension": "order__status", "op": "=", "value": "delivered"}]
    assert metric_rows(rt, metrics=["cancellation_rate"], where=delivered) == [[0.0]]  # 0 / n
    cancelled = [{"dimension": "order__status", "op": "=", "value": "cancelled"}]
    # Numerator (returned) and denominator (not cancelled) are both empty: 0 / 0 is NULL.
    assert metric_rows(rt, metrics=["refund_rate", "average_order_value"], where=cancelled) == [[None, None]]
    ((revenue, orders),) = metric_rows(rt, metrics=["revenue", "orders"], where=cancelled)
    assert same(revenue, 0) and orders > 0  # an empty sum is 0
    by_status = metric_rows(rt, metrics=["cancellation_rate", "refund_rate"], group_by=["order__status"])
    rates = {status: (cancel, refund) for status, cancel, refund in by_status}
    assert rates["cancelled"] == (1.0, None)  # refund_rate: no order of the group is in its denominator
    assert rates["returned"] == (0.0, 1.0) and rates["delivered"] == (0.0, 0.0)


# --- refusals ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("arguments", "says"),
    [
        ({"metrics": ["revenue"], "group_by": ["refund__reason"]}, "counted twice"),
        ({"metrics": ["revenue"], "group_by": ["customer__shoe_size"]}, "customer has no dimension shoe_size"),
        ({"metrics": ["revenue"], "group_by": ["planet__name"]}, "no entity named planet"),
        ({"metrics": ["revenue"], "group_by": ["region"]}, "is not a dimension name"),
        ({"metrics": ["units_sold"], "group_by": ["metric_time__month"]}, "has no time dimension"),
        ({"metrics": ["revenue"], "group_by": ["customer__signup_date"]}, "add a grain"),
        ({"metrics": ["revenue"], "group_by": ["metric_time"]}, "needs a grain"),
        ({"metrics": ["revenue_growth_mom"]}, "group by metric_time__<grain>"),
        ({"metrics": ["revenue_growth_mom"], "group_by": ["order__region"]}, "group by metric_time__<grain>"),
        ({"metrics": ["revenue"], "group_by": ["order__region"], "order_by": ["-profit"]}, "order_by '-profit'"),
        ({"metrics": ["net_revenue"], "group_by": ["customer__segment"]}, "refunds holds no customer key"),
        ({"metrics": ["revenue"], "where": [{"dimension": "order__region", "op": "in", "value": []}]}, "non-empty"),
    ],
)
def test_queries_the_metrics_cannot_answer_are_refused_with_the_reason(
    rt: Runtime, arguments: dict[str, Any], says: str
) -> None:
    error = refused(rt, "query_metrics", "analyst", **arguments)
    assert error.outcome == "invalid" and says in str(error), str(error)
    assert error.hint  # and what to do instead


def test_a_fan_out_breakdown_is_refused_before_anything_runs(rt: Runtime) -> None:
    error = refused(rt, "query_metrics", "analyst", metrics=["revenue"], group_by=["refund__reason"])
    assert "orders holds no refund key" in str(error) and "Use a dimension of orders" in str(error)


# --- policy --------------------------------------------------------------------------------------


def test_support_agent_gets_emea_revenue_only_and_the_same_number_as_admin(rt: Runtime) -> None:
    support = metrics(rt, "support_agent", metrics=["revenue", "orders"], group_by=["order__region"])
    admin = metric_rows(rt, metrics=["revenue", "orders"], group_by=["order__region"])
    assert [r[0] for r in admin] == ["APAC", "EMEA", "LATAM", "NA"]
    assert support["rows"] == [r for r in admin if r[0] == "EMEA"]
    assert support["row_filters"]["sales.orders"] == ["region = 'EMEA'"]
    # Without a breakdown the total is EMEA's too: the row filter applies before any aggregate.
    assert metric_rows(rt, "support_agent", metrics=["revenue"]) == [[r[1] for r in admin if r[0] == "EMEA"]]


def test_metrics_support_agent_may_not_read_look_missing(rt: Runtime) -> None:
    def missing(name: str, tool: str = "query_metrics") -> str:
        arguments = {"metrics": [name]} if tool == "query_metrics" else {"name": name}
        error = refused(rt, tool, "support_agent", **arguments)
        assert error.outcome == "not_found"
        return str(error).replace(name, "<name>")

    for tool in ("query_metrics", "describe_metric"):
        unknown = missing("no_such_metric", tool)
        assert missing("net_revenue", tool) == unknown and missing("refunds", tool) == unknown
    # Through a metric it may read, it still cannot reach one it may not.
    error = refused(rt, "query_metrics", "support_agent", metrics=["revenue", "refunds"])
    assert error.outcome == "not_found" and "'refunds'" in str(error)


def test_every_query_metrics_call_leaves_an_audit_record(runtime: Runtime, audit_path: Path) -> None:
    gate(runtime, "query_metrics", "analyst", {"metrics": ["revenue_growth_mom"], "group_by": ["metric_time__year"]})
    gate(runtime, "query_metrics", "support_agent", {"metrics": ["average_order_value"]})
    gate(runtime, "query_metrics", "support_agent", {"metrics": ["net_revenue"]})
    gate(runtime, "query_metrics", "analyst", {"metrics": ["units_sold"], "group_by": ["metric_time__month"]})
    records = list(read_records(audit_path))
    # net_revenue is hidden from the support agent: told it is not found, recorded as denied.
    assert [(r["tool"], r["decision"], r["outcome"]) for r in records] == [
        ("query_metrics", "allow", "ok"),
        ("query_metrics", "partial", "ok"),
        ("query_metrics", "deny", "denied"),
        ("query_metrics", "allow", "invalid"),
    ]
    growth, aov = records[0]["details"], records[1]["details"]
    assert growth["metrics"] == {"revenue_growth_mom": 1, "revenue": 2}
    assert aov["metrics"] == {"average_order_value": 1, "revenue": 2, "orders": 1}
    for details in (growth, aov):
        assert details["compiled_sql"].startswith("WITH ") and "FROM sales.orders" in details["compiled_sql"]
        assert details["rewritten_sql"] and details["rewritten_sql"] != details["compiled_sql"]
    assert "region = 'EMEA'" in aov["rewritten_sql"]
    read = {(r["type"], r["name"], r["version"]) for r in records[1]["resources"] if r["access"] == "read"}
    assert {("metric", "average_order_value", 1), ("metric", "revenue", 2), ("metric", "orders", 1)} <= read
    denied = [r for r in records[2]["resources"] if r["type"] == "metric"]
    assert [(r["name"], r["access"]) for r in denied] == [("net_revenue", "denied")]


# --- over stdio ----------------------------------------------------------------------------------


def test_metrics_over_stdio_with_paging(demo_home: Path, tmp_path: Path, revenue_by_month: list[Row]) -> None:
    async def scenario() -> tuple[Any, Any, list[Any]]:
        async with connect("analyst", demo_home, LAKEGATE_AUDIT__PATH=str(tmp_path / "audit.jsonl")) as client:
            listed = await client.call_tool("list_metrics", {"search": "aov"})
            described = await client.call_tool("describe_metric", {"name": "average_order_value"})
            arguments: dict[str, Any] = {"metrics": ["revenue"], "group_by": ["metric_time__month"], "limit": 5}
            pages = [await client.call_tool("query_metrics", arguments)]
            while pages[-1].structured_content.get("next_cursor") and len(pages) < 10:
                cursor = pages[-1].structured_content["next_cursor"]
                pages.append(await client.call_tool("query_metrics", {**arguments, "cursor": cursor}))
            return listed, described, pages

    listed, described, pages = anyio.run(scenario)
    assert not listed.is_error and listed.structured_content["metrics"][0]["name"] == "average_order_value"
    assert not described.is_error and described.structured_content["type"] == "ratio"
    assert "You may use it." in text_of(described)
    assert all(not page.is_error for page in pages) and len(pages) == 5
    assert [page.structured_content["truncated"] for page in pages] == [True] * 4 + [False]
    rows = [row for page in pages for row in page.structured_content["rows"]]
    assert rows == revenue_by_month and len(rows) == 24
    assert len({str(page.structured_content["snapshots"]) for page in pages}) == 1
    assert "Metric versions: revenue v2." in text_of(pages[0])


def test_simple_metrics_of_one_model_share_one_scan_and_an_offset_is_a_shift() -> None:
    """Revenue, orders, their ratio and growth against last month read sales.orders once."""
    from pathlib import Path

    from lakegate.catalog.metric_compiler import MetricQuery, compile_query
    from lakegate.catalog.metric_definitions import load_semantic_catalog

    catalog = load_semantic_catalog(Path(__file__).resolve().parents[1])
    query = MetricQuery(("revenue", "orders", "average_order_value", "revenue_growth_mom"), ("metric_time__month",))
    compiled = compile_query(catalog, query)
    assert compiled.sql.count("FROM sales.orders") == 1
    assert "shift_1_scan_orders" in compiled.sql and "+ 1 * INTERVAL 1 MONTH" in compiled.sql


def test_a_metric_reads_the_same_with_or_without_an_offset_metric_beside_it(rt: Runtime) -> None:
    """A period filter cuts the current period for every metric; only the earlier period is whole."""
    where = [{"dimension": "metric_time__day", "op": ">=", "value": "2025-10-15"}]
    alone = metric_rows(rt, metrics=["revenue"], group_by=["metric_time__month"], where=where)
    beside = metric_rows(rt, metrics=["revenue", "revenue_growth_mom"], group_by=["metric_time__month"], where=where)
    assert [r[:2] for r in beside] == alone
    october = hand(
        rt,
        "SELECT sum(total_amount) FROM sales.orders WHERE status <> 'cancelled' "
        "AND order_ts >= TIMESTAMPTZ '2025-10-15' AND order_ts < TIMESTAMPTZ '2025-11-01'",
    )[0][0]
    assert same(alone[0][1], october)


def test_windowed_running_totals_need_periods_and_all_time_does_not(rt: Runtime) -> None:
    total = metric_rows(rt, metrics=["cumulative_revenue", "revenue"])
    assert same(total[0][0], total[0][1])  # all time up to now is the plain total
    for name in ("trailing_3_month_revenue", "revenue_ytd"):
        assert "group by metric_time" in str(refused(rt, "query_metrics", "analyst", metrics=[name]))


def test_many_metrics_fit_the_guard_and_a_denied_metric_names_only_itself(rt: Runtime) -> None:
    many = ["revenue_growth_mom", "net_revenue", "refund_rate", "average_order_value", "revenue_per_customer"]
    assert metric_rows(rt, metrics=many, group_by=["metric_time__month"])  # 2 tables, many CTEs
    # support_agent may not read net_revenue (nor its input refunds): the refusal names what was
    # asked for and nothing it is built on.
    error = str(refused(rt, "query_metrics", "support_agent", metrics=["net_revenue"], group_by=["order__region"]))
    assert "net_revenue" in error and "refunds" not in error
