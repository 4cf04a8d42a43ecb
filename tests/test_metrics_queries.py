"""Metrics through joins, by version, with NULLs and division by zero, refused when they cannot
answer, and under policy (row filters, hidden metrics, the audit record)."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path
from typing import Any

import anyio
import pytest

from lakegate.evals.mcp_client import connect, text_of
from lakegate.server.app import Runtime
from lakegate.server.audit.log import read_records
from tests.metrics_support import (
    Row,
    assert_table,
    gate,
    hand,
    metric_rows,
    metrics,
    ok,
    ratio,
    refused,
    same,
)

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


def test_division_by_zero_gives_null_and_a_metric_without_rows_is_null(rt: Runtime) -> None:
    delivered = [{"dimension": "order__status", "op": "=", "value": "delivered"}]
    assert metric_rows(rt, metrics=["cancellation_rate"], where=delivered) == [[0.0]]  # 0 / n: no groups, count 0
    cancelled = [{"dimension": "order__status", "op": "=", "value": "cancelled"}]
    # Numerator (returned) and denominator (not cancelled) are both empty: NULL.
    assert metric_rows(rt, metrics=["refund_rate", "average_order_value"], where=cancelled) == [[None, None]]
    ((revenue, orders),) = metric_rows(rt, metrics=["revenue", "orders"], where=cancelled)
    assert revenue is None and orders > 0  # the sum of no rows is NULL, as in SQL and MetricFlow
    by_status = metric_rows(rt, metrics=["cancellation_rate", "refund_rate"], group_by=["order__status"])
    rates = {status: (cancel, refund) for status, cancel, refund in by_status}
    # By status, a numerator whose filter leaves no row of the group is NULL (MetricFlow filters the
    # rows before grouping them), so each rate is 1.0 in its own status and NULL elsewhere.
    assert rates["cancelled"] == (1.0, None) and rates["returned"] == (None, 1.0)
    assert rates["delivered"] == (None, None)


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

    from lakegate.catalog.metric_compiler import compile_query
    from lakegate.catalog.metric_definitions import load_semantic_catalog
    from lakegate.catalog.metric_query import MetricQuery

    catalog = load_semantic_catalog(Path(__file__).resolve().parents[1])
    query = MetricQuery(("revenue", "orders", "average_order_value", "revenue_growth_mom"), ("metric_time__month",))
    compiled = compile_query(catalog, query)
    assert compiled.sql.count("FROM sales.orders") == 1
    assert "shift_0_scan_orders" in compiled.sql and "+ INTERVAL 1 MONTH" in compiled.sql


def test_a_metric_reads_the_same_with_or_without_an_offset_metric_beside_it(rt: Runtime) -> None:
    """A period filter cuts the current period for every metric; only the earlier period is whole."""
    where = [{"dimension": "metric_time__day", "op": ">=", "value": "2025-10-15"}]
    alone = metric_rows(rt, metrics=["revenue"], group_by=["metric_time__month"], where=where)
    beside = metric_rows(rt, metrics=["revenue", "revenue_growth_mom"], group_by=["metric_time__month"], where=where)
    # The shifted input adds the month after the last (MetricFlow's rows); every other row is the same.
    assert [r[:2] for r in beside[:-1]] == alone and beside[-1][:2] == ["2026-01-01", None]
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


def test_a_dimension_two_joins_away(rt: Runtime) -> None:
    """Units sold (order lines) by the region of the customer who placed the order: order lines ->
    orders -> customers, each join to a model's primary key, so no line is counted twice."""
    expected = hand(
        rt,
        """
        SELECT c.region, sum(i.quantity) FROM sales.order_items i JOIN sales.orders o ON o.order_id = i.order_id
        JOIN sales.customers c ON c.customer_id = o.customer_id GROUP BY 1 ORDER BY 1
        """,
    )
    got = metric_rows(rt, metrics=["units_sold"], group_by=["order__customer__region"])
    assert_table(got, expected)
    assert "order__customer__region" in ok(rt, "describe_metric", "analyst", name="units_sold")["dimensions"]
    # A filter through the same path.
    emea = metric_rows(
        rt, metrics=["units_sold"], where=[{"dimension": "order__customer__region", "op": "=", "value": "EMEA"}]
    )
    assert same(emea[0][0], dict((row[0], row[1]) for row in expected)["EMEA"])


OFFSETS = """
semantic_models:
  - name: orders
    table: sales.orders
    time_dimension: order_ts
    entities:
      - {name: order, type: primary, expr: order_id}
    dimensions:
      - {name: order_ts, type: time}
    measures:
      - {name: order_rows, agg: count, expr: "1"}
metrics:
  - {name: orders, version: 1, type: simple, measure: order_rows, description: d, owner: o}
  - {name: orders_filled, version: 1, type: simple, measure: order_rows, fill_nulls_with: 0, description: d, owner: o}
  - {name: week_before, version: 1, type: derived, expr: o, inputs: [{name: orders, offset_window: 1 week, alias: o}],
     description: d, owner: o}
  - {name: quarter_before, version: 1, type: derived, expr: o,
     inputs: [{name: orders, offset_window: 1 quarter, alias: o}], description: d, owner: o}
  - {name: seven_days_before, version: 1, type: derived, expr: o,
     inputs: [{name: orders, offset_window: 7 days, alias: o}], description: d, owner: o}
  - {name: running, version: 1, type: cumulative, measure: order_rows, description: d, owner: o}
  - {name: running_before, version: 1, type: derived, expr: r, inputs: [{name: running, offset: 1, alias: r}],
     description: d, owner: o}
"""


@pytest.mark.parametrize(
    ("metric", "grain"),
    [
        ("week_before", "week"),
        ("week_before", "day"),
        ("quarter_before", "quarter"),
        ("quarter_before", "month"),
        ("seven_days_before", "week"),
        ("running_before", "month"),
        ("orders_filled", "month"),
    ],
)
def test_offsets_in_weeks_and_quarters_and_an_earlier_running_total_compile_to_sql_that_parses(
    metric: str, grain: str
) -> None:
    import sqlglot

    from lakegate.catalog.metric_compiler import compile_query
    from lakegate.catalog.metric_definitions import parse_semantic_catalog
    from lakegate.catalog.metric_query import MetricQuery, describing_query

    catalog = parse_semantic_catalog(OFFSETS, source="test")
    compiled = compile_query(catalog, MetricQuery((metric,), (f"metric_time__{grain}",)))
    sqlglot.parse_one(compiled.sql, dialect="duckdb")  # a frame with rows to read (it had none)
    # describe_metric and explain_access compile it as well, by a grain every offset can be read by.
    compile_query(catalog, describing_query(catalog, catalog.metric(metric)))
    if metric == "orders_filled":
        assert "coalesce(r0.v0, 0)" in compiled.sql  # a count filled with 0 stays an integer
