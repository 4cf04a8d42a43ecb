"""Metric correctness: every metric type checked against plain SQL written by hand from its definition.

The hand SQL follows catalog/metrics.yaml and the README's semantics, not the compiler's output, and
runs through the `query` tool as admin, so both sides read the same snapshots of the small demo
warehouse. The comparisons are exact for decimals and integers and 1e-9 relative for ratios.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest

from lakegate.server.app import Runtime
from tests.metrics_support import (
    DEMO_METRICS,
    MONTH,
    SUPPORT_METRICS,
    assert_table,
    hand,
    metric_rows,
    months,
    ok,
    previous_month,
    ratio,
    same,
)


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


def test_a_month_without_rows_is_not_in_the_answer(rt: Runtime) -> None:
    # Enterprise accounts are rare: many months have no signup at all. As in dbt MetricFlow, the
    # answer holds the months that have rows, not every month between the first and the last.
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
    assert answer == [[month, signups[month]] for month in sorted(signups)]


def test_a_metric_whose_filter_leaves_no_row_in_a_month_is_null_there(rt: Runtime) -> None:
    # Orders of German enterprise customers: a few a month, none at all in some months, and in some
    # months only cancelled ones (which revenue, the median and active customers leave out).
    where = [
        {"dimension": "customer__segment", "op": "=", "value": "enterprise"},
        {"dimension": "customer__country", "op": "=", "value": "DE"},
    ]
    raw = hand(
        rt,
        f"""
        SELECT {MONTH}, sum(total_amount) FILTER (WHERE status <> 'cancelled'),
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
    assert [r[0] for r in got] == sorted(by_month)  # no row for a month without orders
    for month, revenue, orders, median, buyers in got:
        want = by_month[month]
        assert same(revenue, want[0]) and orders == want[1], month
        # A count whose filter leaves nothing in the month is NULL too, not 0 (MetricFlow's answer).
        assert buyers == (want[3] if want[4] else None), month
        if want[2] is None:
            assert median is None, month
        else:  # DuckDB's median of a decimal(12, 2) column keeps two decimal places
            assert abs(Decimal(median) - Decimal(str(want[2]))) <= Decimal("0.005"), (month, median, want[2])
    for month in only_cancelled:
        _, revenue, _, median, buyers = got[sorted(by_month).index(month)]
        assert [revenue, median, buyers] == [None, None, None], month

    rates = metric_rows(
        rt, metrics=["average_order_value", "cancellation_rate"], group_by=["metric_time__month"], where=where
    )
    expected = []
    for month in sorted(by_month):
        revenue, orders, _, _, kept, cancelled = by_month[month]
        expected.append(
            [month, ratio(revenue, kept) if kept else None, ratio(cancelled, orders) if cancelled else None]
        )
    assert_table(rates, expected)
    assert all(rates[sorted(by_month).index(m)][1:] == [None, 1.0] for m in only_cancelled)


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
    # As in MetricFlow, the month after the last has a row: the shifted input has a value there.
    assert got[-1][0] == "2026-01-01" and got[-1][1:] == [None, None]
    got = got[:-1]
    assert_table(got, expected)
    assert got[0][2] is None and all(r[2] is not None for r in got[1:])
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
    assert by_quarter[-1] == ["2026-01-01", None]  # the quarter after the last: its earlier quarter has data
    assert_table(by_quarter[:-1], [[q, g] for (q, _), g in zip(quarterly, quarter_growth, strict=True)])


def test_a_period_filter_keeps_the_earlier_period_an_offset_reads(
    rt: Runtime, monthly: dict[str, dict[str, Any]]
) -> None:
    got = metric_rows(
        rt,
        metrics=["revenue_growth_mom"],
        group_by=["metric_time__month"],
        where=[{"dimension": "metric_time__month", "op": ">=", "value": "2025-01-01"}],
    )
    assert [r[0] for r in got] == months("2025-01-01", "2026-01-01")  # January 2026: December's shift
    december, january = monthly["2024-12-01"]["revenue"], monthly["2025-01-01"]["revenue"]
    assert same(got[0][1], ratio(january - december, december))  # not NULL: December 2024 is still read


def test_net_revenue_subtracts_the_refunds_of_the_same_period(
    rt: Runtime, monthly: dict[str, dict[str, Any]], monthly_refunds: dict[str, Decimal]
) -> None:
    got = metric_rows(rt, metrics=["revenue", "refunds", "net_revenue"], group_by=["metric_time__month"])
    answer_months = sorted({*monthly, *monthly_refunds})
    assert answer_months[-1] == "2026-01-01"  # refunds of December's returns are paid in January 2026
    expected = []
    for month in answer_months:
        revenue = monthly[month]["revenue"] if month in monthly else None
        refunds = monthly_refunds.get(month)
        net = None if revenue is None else revenue - (refunds or Decimal(0))  # revenue - coalesce(refunds, 0)
        expected.append([month, revenue, refunds, net])
    assert_table(got, expected)
    # January 2026 has refunds and no revenue: revenue is NULL there (MetricFlow's answer), and so
    # is net revenue, whose expression coalesces only the refunds.
    assert got[-1][1] is None and got[-1][3] is None and got[-1][2] is not None
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
    # As in MetricFlow, a month's trailing total is that of its last day: the days after the day
    # 3 months before it (April 30 reads from January 31 on). It goes on after the last order
    # (December 31, 2025) while its window holds it: to March 30, 2026.
    trailing = trailing_by_hand(rt, "least(last_day(m), DATE '2026-03-30')", "2024-01-01", "2026-03-01")
    expected = []
    for i, month in enumerate(spine):
        year_start = next(j for j, m in enumerate(spine) if m[:4] == month[:4])
        expected.append([month, sum(revenue[: i + 1]), trailing[month], sum(revenue[year_start : i + 1])])
    # Year to date stops with its year; the all-time total goes on.
    assert [row[0] for row in got[len(spine) :]] == ["2026-01-01", "2026-02-01", "2026-03-01"]
    assert all(same(row[1], sum(revenue)) and row[3] is None for row in got[len(spine) :])
    assert all(same(row[2], trailing[row[0]]) for row in got[len(spine) :])
    assert same(got[len(spine)][2], sum(revenue[-2:]))  # January 31: after October 31, November and December
    got = got[: len(spine)]
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


def trailing_by_hand(rt: Runtime, day: str, first: str, last: str) -> dict[str, Any]:
    """Revenue over the 3 months back from `day` (SQL of the month m), by month from first to last."""
    rows = hand(
        rt,
        f"""
        WITH days AS (
            SELECT CAST(order_ts AS DATE) AS d, sum(total_amount) AS r FROM sales.orders
            WHERE status <> 'cancelled' GROUP BY 1),
        months AS (
            SELECT CAST(unnest(generate_series(DATE '{first}', DATE '{last}', INTERVAL 1 MONTH)) AS DATE) AS m)
        SELECT strftime(m, '%Y-%m-%d'), (SELECT sum(r) FROM days WHERE d <= {day} AND d > {day} - INTERVAL 3 MONTH)
        FROM months ORDER BY 1
        """,
    )
    return {month: Decimal(str(value)) for month, value in rows}


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
    # The window still reaches back into the months the filter leaves out of the answer: from
    # November 29, 2024 (3 months before February 28, the day after).
    trailing = trailing_by_hand(rt, "last_day(m)", "2025-02-01", "2025-02-01")
    assert same(got[0][1], trailing["2025-02-01"])
    assert trailing["2025-02-01"] > revenue["2024-12-01"] + revenue["2025-01-01"] + revenue["2025-02-01"]
    assert same(got[0][2], revenue["2025-01-01"] + revenue["2025-02-01"])


def test_a_cumulative_metric_carries_on_in_periods_after_its_last_row(
    rt: Runtime, monthly: dict[str, dict[str, Any]]
) -> None:
    # Refunds run into January 2026, so the answer has that month; revenue has no order in it.
    got = metric_rows(
        rt, metrics=["cumulative_revenue", "trailing_3_month_revenue", "refunds"], group_by=["metric_time__month"]
    )
    january = next(row for row in got if row[0] == "2026-01-01")
    revenue = [m["revenue"] for m in monthly.values()]
    assert same(january[1], sum(revenue)) and same(january[2], sum(revenue[-2:]))
