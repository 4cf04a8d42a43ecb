"""The query's own filters prune the Iceberg plan, and never change an answer; the plan's bytes
are checked against the caller's scan limit before anything runs.

`pushable_filters` decides on sqlglot's tree which conditions the plan may apply; the planner
drops the files whose partition values and column statistics rule them out. Checked here on the
real demo warehouse through the gate: what is pushed and what is not, the files read, and (with
hypothesis) that every generated filter gives the same rows with pruning as without it.
"""

from __future__ import annotations

import json
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lakegate.errors import LimitExceeded, PolicyDenied
from lakegate.policies.scan_limits import ScanLimit, ScanLimitSet
from lakegate.policies.sql_filters import ColumnFilter, pushable_filters
from lakegate.policies.sql_guard import TableColumns, parse_query, resolve_columns
from lakegate.server.app import Runtime
from tests.conftest import gate_call, gate_ok, runtime_with_policy_file

ORDERS = {
    "order_id": "BIGINT",
    "customer_id": "BIGINT",
    "order_ts": "TIMESTAMPTZ",
    "status": "VARCHAR",
    "channel": "VARCHAR",
    "region": "VARCHAR",
    "total_amount": "DECIMAL(12,2)",
}
CUSTOMERS = {"customer_id": "BIGINT", "segment": "VARCHAR", "signup_date": "DATE", "email": "VARCHAR"}


def pushed(sql: str, masked: frozenset[str] = frozenset()) -> dict[str, tuple[ColumnFilter, ...]]:
    query = parse_query(sql, max_chars=100_000)
    tables = {
        "sales.orders": TableColumns(ORDERS, frozenset()),
        "sales.customers": TableColumns(CUSTOMERS, frozenset()),
    }
    tables = {name: columns for name, columns in tables.items() if name in query.tables}
    resolved = resolve_columns(query, tables)
    clear = {
        name: {column: kind for column, kind in columns.types.items() if column not in masked}
        for name, columns in tables.items()
    }
    return pushable_filters(query.tree, resolved.scopes, clear)


def test_comparisons_with_literals_are_pushed_in_the_columns_types() -> None:
    found = pushed(
        "SELECT count(*) FROM sales.orders o WHERE o.order_ts >= TIMESTAMPTZ '2025-11-01' "
        "AND order_ts < '2025-12-01 06:30:00+02' AND 10 < order_id AND status IN ('placed', 'shipped') "
        "AND total_amount BETWEEN 5 AND 10.5 AND customer_id = -3"
    )
    assert set(found["sales.orders"]) == {
        ColumnFilter("order_ts", ">=", datetime(2025, 11, 1, tzinfo=UTC)),
        ColumnFilter("order_ts", "<", datetime(2025, 12, 1, 4, 30, tzinfo=UTC)),
        ColumnFilter("order_id", ">", 10),
        ColumnFilter("status", "in", ("placed", "shipped")),
        ColumnFilter("total_amount", ">=", Decimal("5.00")),
        ColumnFilter("total_amount", "<=", Decimal("10.50")),
        ColumnFilter("customer_id", "=", -3),
    }
    dates = pushed("SELECT * FROM sales.customers WHERE signup_date = DATE '2024-02-29'")
    assert dates["sales.customers"] == (ColumnFilter("signup_date", "=", date(2024, 2, 29)),)


@pytest.mark.parametrize(
    "sql",
    [
        # Not one AND term of the WHERE of the SELECT that reads the table.
        "SELECT * FROM sales.orders WHERE order_id = 1 OR order_id = 2",
        "SELECT * FROM sales.orders WHERE NOT (order_id = 1)",
        "SELECT * FROM sales.orders WHERE order_id NOT BETWEEN 1 AND 5",
        "SELECT * FROM sales.orders WHERE order_id <> 1",
        "SELECT * FROM sales.orders WHERE order_id IS NULL",
        "SELECT * FROM sales.orders WHERE order_id + 0 = 1",
        "SELECT * FROM sales.orders WHERE CAST(order_ts AS DATE) = DATE '2025-01-01'",
        "SELECT * FROM sales.orders WHERE order_id IN (SELECT customer_id FROM sales.customers)",
        "SELECT * FROM (SELECT * FROM sales.orders) o WHERE o.order_id = 1",
        "SELECT count(*) FROM sales.orders GROUP BY status HAVING min(order_id) = 1",
        # A literal that does not convert exactly to the column's type.
        "SELECT * FROM sales.orders WHERE order_id = 1.5",
        "SELECT * FROM sales.orders WHERE order_id = '1'",
        "SELECT * FROM sales.orders WHERE total_amount > 10.125",
        "SELECT * FROM sales.orders WHERE total_amount < 1000000000000000000000000000",
        "SELECT * FROM sales.orders WHERE order_ts >= '2024-01-01 10:00:00+25'",
        "SELECT * FROM sales.orders WHERE order_ts >= DATE '2025-01-01'",
        "SELECT * FROM sales.orders WHERE order_ts >= TIMESTAMP '2025-01-01'",
        "SELECT * FROM sales.orders WHERE order_ts >= 'yesterday'",
        "SELECT * FROM sales.customers WHERE signup_date = '2024-2-29'",
        "SELECT * FROM sales.customers WHERE signup_date = '2023-02-29'",
        # The table read twice, or through a join that matches rows by order or by nearest key.
        "SELECT * FROM sales.orders a JOIN sales.orders b USING (order_id) WHERE a.order_id = 1",
        "SELECT * FROM sales.customers c ASOF JOIN sales.orders o ON c.customer_id = o.customer_id "
        "AND c.signup_date >= o.order_ts WHERE o.order_id = 1",
        "SELECT * FROM sales.customers c POSITIONAL JOIN sales.orders o WHERE o.order_id = 1",
        "SELECT * FROM sales.orders USING SAMPLE 10 WHERE order_id = 1",
        # Positional column aliases rename the table's columns.
        "SELECT * FROM sales.orders AS o(customer_id, order_id) WHERE o.order_id = 1",
    ],
)
def test_nothing_is_pushed_that_could_change_an_answer(sql: str) -> None:
    assert pushed(sql) == {}, sql


def test_a_masked_column_is_never_pushed() -> None:
    # The WHERE compares the masked value; the file statistics hold the stored one.
    sql = "SELECT count(*) FROM sales.customers WHERE email = 'a@example.com' AND segment = 'smb'"
    assert pushed(sql, masked=frozenset({"email"}))["sales.customers"] == (ColumnFilter("segment", "=", "smb"),)


def test_a_month_of_orders_reads_the_files_of_that_month(runtime: Runtime) -> None:
    sql = (
        "SELECT status, count(*) AS n FROM sales.orders WHERE order_ts >= TIMESTAMPTZ '2025-11-01' "
        "AND order_ts < TIMESTAMPTZ '2025-12-01' GROUP BY status ORDER BY status"
    )
    plan = gate_ok(runtime, "analyst", "query", {"sql": sql, "explain": True})["plan"]
    estimate = plan.split("\n\n", 1)[0]
    assert "sales.orders: " in estimate and "(pruned by the query's filters)" in estimate, estimate
    read, total = (int(part.split()[0].replace(",", "")) for part in estimate.split(": ", 1)[1].split(" of "))
    assert 0 < read <= 4 < total, estimate
    pruned = gate_ok(runtime, "analyst", "query", {"sql": sql})["rows"]
    whole = gate_ok(runtime, "analyst", "query", {"sql": sql.replace("GROUP BY", "OR false GROUP BY")})
    assert pruned == whole["rows"] and sum(row[1] for row in pruned) > 0


def test_a_table_read_through_a_row_filter_is_not_pruned(runtime: Runtime) -> None:
    # Which files survive pruning depends on every row of the file, also those the row filter hides
    # from the caller: explain's plan (an empty scan or not) or a scan-limit refusal would tell.
    sql = "SELECT DISTINCT region FROM sales.orders WHERE order_ts >= TIMESTAMPTZ '2025-06-01' ORDER BY region"
    outcome = gate_call(runtime, "support_agent", "query", {"sql": sql})
    assert outcome.error is None and outcome.record is not None, outcome.error
    assert outcome.result is not None and outcome.result.model_dump()["rows"] == [["EMEA"]]
    assert outcome.record["details"]["planned_scan"]["sales.orders"] == {"files": 48, "bytes": 263_138, "rows": 5000}
    # The analyst, who reads every row, gets the same query pruned.
    analyst = gate_call(runtime, "analyst", "query", {"sql": sql})
    assert analyst.record is not None and analyst.record["details"]["planned_scan"]["sales.orders"]["files"] < 48


_COLUMNS: dict[str, st.SearchStrategy[str]] = {
    "order_id": st.integers(100_000, 105_500).map(str),
    "customer_id": st.integers(-5, 520).map(str),
    "order_ts": st.datetimes(datetime(2023, 6, 1), datetime(2026, 6, 1)).map(
        lambda moment: f"TIMESTAMPTZ '{moment.isoformat(sep=' ', timespec='seconds')}'"
    ),
    "status": st.sampled_from(["'placed'", "'shipped'", "'delivered'", "'returned'", "'cancelled'", "'x'"]),
    "region": st.sampled_from(["'EMEA'", "'NA'", "'APAC'", "'LATAM'", "''"]),
    "total_amount": st.decimals(0, 2000, places=2).map(str),
}


@st.composite
def conditions(draw: Any) -> str:
    terms = []
    for _ in range(draw(st.integers(1, 3))):
        column = draw(st.sampled_from(sorted(_COLUMNS)))
        kind = draw(st.sampled_from(["=", "<", "<=", ">", ">=", "between", "in"]))
        if kind == "between":
            terms.append(f"o.{column} BETWEEN {draw(_COLUMNS[column])} AND {draw(_COLUMNS[column])}")
        elif kind == "in":
            values = draw(st.lists(_COLUMNS[column], min_size=1, max_size=3))
            terms.append(f"o.{column} IN ({', '.join(values)})")
        else:
            terms.append(f"o.{column} {kind} {draw(_COLUMNS[column])}")
    return " AND ".join(terms)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(where=conditions(), joined=st.booleans())
def test_pruning_never_changes_an_answer(runtime: Runtime, where: str, joined: bool) -> None:
    if joined:
        sql = (
            "SELECT c.segment, count(*) AS n, sum(o.total_amount) AS total FROM sales.customers c "
            f"LEFT JOIN sales.orders o ON o.customer_id = c.customer_id WHERE {where} GROUP BY 1 ORDER BY 1"
        )
    else:
        sql = f"SELECT o.region, o.status, count(*) AS n, min(o.order_id) AS first FROM sales.orders o WHERE {where} "
        sql += "GROUP BY 1, 2 ORDER BY 1, 2"
    pruned = gate_ok(runtime, "analyst", "query", {"sql": sql, "limit": 500})
    # "(...) OR false" is the same condition, which the planner does not push.
    unpruned_sql = sql.replace(f"WHERE {where}", f"WHERE ({where}) OR false")
    whole = gate_ok(runtime, "analyst", "query", {"sql": unpruned_sql, "limit": 500})
    assert pruned["rows"] == whole["rows"], sql


# -- scan limits (policies/scan_limits.yaml) ------------------------------------------------------


def _limited_runtime(demo_home: Path, tmp_path: Path, text: str) -> Runtime:
    return runtime_with_policy_file(demo_home, tmp_path, "scan_limits.yaml", text)


MONTH = (
    "SELECT status, count(*) AS n FROM sales.orders WHERE order_ts >= TIMESTAMPTZ '2025-11-01' "
    "AND order_ts < TIMESTAMPTZ '2025-12-01' GROUP BY status ORDER BY status"
)
LIMITS = """
limits:
  - subject: role:analyst
    max_scan_bytes: 30kB
  - subject: role:data_steward
    max_scan_bytes: 1MB
  - subject: support_agent
    max_scan_bytes: 1kB
"""


def test_a_query_over_the_callers_scan_limit_is_refused_before_it_runs(demo_home: Path, tmp_path: Path) -> None:
    runtime = _limited_runtime(demo_home, tmp_path, LIMITS)
    try:
        # One month of orders fits in 30 kB; the whole table (about 260 kB) does not.
        assert gate_ok(runtime, "analyst", "query", {"sql": MONTH})["rows"]
        whole = gate_call(runtime, "analyst", "query", {"sql": "SELECT count(*) FROM sales.orders"})
        assert isinstance(whole.error, LimitExceeded), whole.error
        message = str(whole.error)
        assert "30.0 kB" in message and "sales.orders: 48 files" in message and "not run" in message, message
        assert "partition" in (whole.error.hint or "")
        # explain is not refused: it shows the estimate and says the query is over the limit.
        plan = gate_ok(runtime, "analyst", "query", {"sql": "SELECT count(*) FROM sales.orders", "explain": True})
        assert "would read more than the 30.0 kB" in plan["plan"]
        # support_agent's own entry (1 kB) is the most specific; it reads orders through a row
        # filter, so the refusal gives no size of the table.
        refused = gate_call(runtime, "support_agent", "query", {"sql": MONTH})
        assert isinstance(refused.error, LimitExceeded) and "sales.orders" not in str(refused.error), refused.error
        # A role without an entry is not capped.
        assert gate_ok(runtime, "admin", "query", {"sql": "SELECT count(*) FROM sales.orders"})["rows"]
    finally:
        runtime.close()
    records = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    limited = [r for r in records if r["outcome"] == "limit_exceeded"]
    assert len(limited) == 2 and limited[0]["details"]["scan_limit"] == 30_000
    assert limited[0]["details"]["planned_scan"]["sales.orders"]["files"] == 48


def test_the_most_generous_role_limit_applies() -> None:
    limits = ScanLimitSet(
        (ScanLimit("role:a", 10, ""), ScanLimit("role:b", 1_000, ""), ScanLimit("carol", 5, "her own"))
    )
    assert limits.for_caller("bob", {"role:a", "role:b"}).max_scan_bytes == 1_000  # type: ignore[union-attr]
    assert limits.for_caller("carol", {"role:b"}).reason == "her own"  # type: ignore[union-attr]
    assert limits.for_caller("dave", {"role:c"}) is None


def test_an_invalid_scan_limits_file_denies_everything(demo_home: Path, tmp_path: Path) -> None:
    runtime = _limited_runtime(demo_home, tmp_path, "limits:\n  - subject: role:analyst\n    max_scan_bytes: lots\n")
    try:
        outcome = gate_call(runtime, "analyst", "query", {"sql": MONTH})
        assert isinstance(outcome.error, PolicyDenied), outcome.error
    finally:
        runtime.close()
