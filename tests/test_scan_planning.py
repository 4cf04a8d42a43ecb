"""The query's own filters prune the Iceberg plan, and never change an answer; the plan's bytes
are checked against the caller's scan limit before anything runs.

`pushable_filters` decides on sqlglot's tree which conditions the plan may apply; the planner
drops the files whose partition values and column statistics rule them out. Checked here on the
real demo warehouse through the gate: what is pushed and what is not, the files read, and (with
hypothesis) that every generated filter gives the same rows with pruning as without it.
"""

from __future__ import annotations

import calendar
import json
import re
from collections.abc import Iterator
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lakegate.catalog.demo_iceberg import LAYOUTS
from lakegate.errors import LimitExceeded, PolicyDenied
from lakegate.policies.scan_limits import ScanLimit, ScanLimitSet
from lakegate.policies.sql_filters import ColumnFilter, pushable_filters
from lakegate.policies.sql_guard import TableColumns, parse_query, resolve_columns
from lakegate.server.app import Runtime, open_runtime
from lakegate.server.settings import load_settings
from tests.conftest import REPO, gate_call, gate_ok, runtime_with_policy_file

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


def test_a_period_of_a_time_column_is_pushed_as_the_range_of_times_in_it() -> None:
    # What the metric compiler writes for metric_time__month = '2025-06-01'.
    month = pushed(
        "SELECT count(*) FROM sales.orders AS m "
        "WHERE CAST(date_trunc('month', CAST(m.order_ts AS TIMESTAMP)) AS DATE) = '2025-06-01'"
    )
    assert month["sales.orders"] == (
        ColumnFilter("order_ts", ">=", datetime(2025, 6, 1, tzinfo=UTC)),
        ColumnFilter("order_ts", "<", datetime(2025, 7, 1, tzinfo=UTC)),
    )
    # A period before a time ends before the next period starts; 2025-06-04 is in the ISO week
    # that starts on Monday 2025-06-02.
    week = pushed("SELECT * FROM sales.orders WHERE date_trunc('week', order_ts) <= TIMESTAMP '2025-06-04 10:00'")
    assert week["sales.orders"] == (ColumnFilter("order_ts", "<", datetime(2025, 6, 9, tzinfo=UTC)),)
    quarter = pushed(
        "SELECT * FROM sales.customers WHERE date_trunc('quarter', signup_date) BETWEEN '2024-02-10' AND '2024-11-30'"
    )
    assert quarter["sales.customers"] == (
        ColumnFilter("signup_date", ">=", date(2024, 2, 10)),
        ColumnFilter("signup_date", "<", date(2025, 1, 1)),
    )
    hours = pushed("SELECT * FROM sales.orders WHERE date_trunc('hour', order_ts) > '2025-12-31 23:30'")
    assert hours["sales.orders"] == (ColumnFilter("order_ts", ">", datetime(2025, 12, 31, 23, 30, tzinfo=UTC)),)
    # Compared as DATEs the literal's time of day is dropped, by DuckDB and by the bound.
    as_dates = pushed(
        "SELECT * FROM sales.orders WHERE CAST(date_trunc('day', order_ts) AS DATE) >= '2024-01-31 23:00' "
        "AND date_trunc('hour', order_ts) < CAST('2024-03-01 10:00' AS DATE)"
    )
    assert as_dates["sales.orders"] == (
        ColumnFilter("order_ts", ">=", datetime(2024, 1, 31, tzinfo=UTC)),
        ColumnFilter("order_ts", "<", datetime(2024, 3, 1, 1, tzinfo=UTC)),
    )
    # The last period has no period after it: no upper bound, and no error.
    last = pushed("SELECT * FROM sales.orders WHERE date_trunc('year', order_ts) BETWEEN '2024-01-01' AND '9999-06-01'")
    assert last["sales.orders"] == (ColumnFilter("order_ts", ">=", datetime(2024, 1, 1, tzinfo=UTC)),)


@pytest.mark.parametrize(
    "sql",
    [
        # Not a period of a column of the table read in clear, or not compared with a time.
        "SELECT * FROM sales.orders WHERE date_trunc('month', order_ts) IN ('2025-01-01', '2025-02-01')",
        "SELECT * FROM sales.orders WHERE date_trunc('month', order_ts) <> '2025-01-01'",
        "SELECT * FROM sales.orders WHERE date_trunc('month', order_ts) = '2025-01-01 00:00:00+02'",
        "SELECT * FROM sales.orders WHERE date_trunc('decade', order_ts) = '2020-01-01'",
        "SELECT * FROM sales.orders WHERE date_trunc('month', order_id) = '2020-01-01'",
        "SELECT * FROM sales.orders WHERE date_trunc('month', CAST(order_ts AS DATE)) = '2020-01-01'",
        "SELECT * FROM sales.orders WHERE CAST(date_trunc('hour', order_ts) AS DATE) = '2020-01-01'",
        "SELECT * FROM sales.customers WHERE date_trunc('hour', signup_date) = '2020-01-01'",
        "SELECT * FROM sales.customers WHERE date_trunc('day', signup_date) = '2020-01-01 10:00'",
        "SELECT * FROM sales.orders WHERE date_trunc('month', order_ts) >= order_ts",
    ],
)
def test_a_period_is_not_pushed_unless_its_range_is_certain(sql: str) -> None:
    assert pushed(sql) == {}, sql


def test_a_period_of_a_masked_column_is_never_pushed() -> None:
    sql = "SELECT count(*) FROM sales.customers WHERE date_trunc('year', signup_date) = '2024-01-01'"
    assert pushed(sql, masked=frozenset({"signup_date"})) == {}


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
    found = re.search(r"sales\.orders: (\d+) files of (\d+) ", estimate)
    assert found is not None, estimate
    read, total = int(found.group(1)), int(found.group(2))
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
    planned = outcome.record["details"]["planned_scan"]["sales.orders"]
    assert {key: planned[key] for key in ("files", "file_bytes", "rows")} == {
        "files": 48,
        "file_bytes": 263_138,
        "rows": 5000,
    }
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


_PERIODS = [
    "date_trunc('{unit}', o.order_ts)",
    "date_trunc('{unit}', CAST(o.order_ts AS TIMESTAMP))",
    "CAST(date_trunc('{unit}', CAST(o.order_ts AS TIMESTAMP)) AS DATE)",
]
_UNITS = ["hour", "day", "week", "month", "quarter", "year"]
_PERIOD_VALUES = st.one_of(
    st.datetimes(datetime(2023, 6, 1), datetime(2026, 6, 1)),
    # The last day of a month, late: the orders' files are monthly, so a bound a few hours off
    # drops a whole file.
    st.builds(
        lambda year, month, hour: datetime(year, month, calendar.monthrange(year, month)[1], hour, 30),
        st.integers(2023, 2025),
        st.integers(1, 12),
        st.integers(0, 23),
    ),
    st.datetimes(datetime(9999, 1, 1), datetime(9999, 12, 31, 23)),  # no period after the last one
).map(lambda moment: f"'{moment.date().isoformat()}'" if moment.minute % 2 else f"'{moment.isoformat(sep=' ')}'")


@st.composite
def period_condition(draw: Any) -> str:
    """A condition on a period of order_ts, as a metric's time filter or an agent writes it."""
    unit = draw(st.sampled_from(_UNITS))
    shape = draw(st.sampled_from(_PERIODS[:2] if unit == "hour" else _PERIODS))
    period = shape.format(unit=unit)
    kind = draw(st.sampled_from(["=", "<", "<=", ">", ">=", "between"]))
    # A literal cast to DATE, or compared with a period cast to DATE, loses its time of day.
    value = draw(st.one_of(_PERIOD_VALUES, _PERIOD_VALUES.map(lambda text: f"CAST({text} AS DATE)")))
    if kind == "between":
        return f"{period} BETWEEN {value} AND {draw(_PERIOD_VALUES)}"
    return f"{period} {kind} {value}"


@st.composite
def conditions(draw: Any) -> str:
    terms = []
    for _ in range(draw(st.integers(1, 3))):
        if draw(st.integers(0, 3)) == 0:
            terms.append(draw(period_condition()))
            continue
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


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(where=period_condition())
def test_pruning_by_a_period_never_changes_an_answer(runtime: Runtime, where: str) -> None:
    sql = f"SELECT o.status, count(*) AS n, max(o.order_ts) AS last FROM sales.orders o WHERE {where} "
    sql += "GROUP BY 1 ORDER BY 1"
    pruned = gate_ok(runtime, "analyst", "query", {"sql": sql, "limit": 500})
    whole = gate_ok(runtime, "analyst", "query", {"sql": sql.replace(f"WHERE {where}", f"WHERE ({where}) OR false")})
    assert pruned["rows"] == whole["rows"], sql


@pytest.mark.parametrize(
    "where",
    [
        # Found by a red-team review: compared as DATEs the literal's time of day is dropped.
        "CAST(date_trunc('day', order_ts) AS DATE) >= '2024-01-31 23:00'",
        "CAST(date_trunc('day', CAST(order_ts AS TIMESTAMP)) AS DATE) >= '2024-01-31 21:00'",
        "date_trunc('hour', order_ts) >= CAST('2024-01-31 23:00' AS DATE)",
        "date_trunc('hour', order_ts) > CAST('2024-01-31 23:00' AS DATE)",
        "CAST(date_trunc('day', order_ts) AS DATE) = '2024-01-31 23:00'",
        "CAST(date_trunc('day', order_ts) AS DATE) BETWEEN '2024-01-31 23:00' AND '2024-02-01'",
        # ... and the year 9999 has no year after it.
        "date_trunc('year', order_ts) <= '9999-06-01'",
        "date_trunc('day', order_ts) BETWEEN '2024-01-01' AND '9999-12-31 12:00'",
    ],
)
def test_pruning_by_a_period_keeps_every_row_at_its_edges(runtime: Runtime, where: str) -> None:
    sql = f"SELECT count(*) FROM sales.orders WHERE {where}"
    pruned = gate_ok(runtime, "analyst", "query", {"sql": sql})["rows"]
    assert pruned == gate_ok(runtime, "analyst", "query", {"sql": sql.replace(where, f"({where}) OR false")})["rows"]


# -- scan limits (policies/scan_limits.yaml) ------------------------------------------------------


def _limited_runtime(demo_home: Path, tmp_path: Path, text: str) -> Runtime:
    return runtime_with_policy_file(demo_home, tmp_path, "scan_limits.yaml", text)


MONTH = (
    "SELECT status, count(*) AS n FROM sales.orders WHERE order_ts >= TIMESTAMPTZ '2025-11-01' "
    "AND order_ts < TIMESTAMPTZ '2025-12-01' GROUP BY status ORDER BY status"
)
#: Reads three columns of every file of sales.orders.
WHOLE = "SELECT count(DISTINCT customer_id), sum(total_amount), max(order_ts) FROM sales.orders"
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
        # One month of orders fits in 30 kB; the whole table's columns WHOLE reads (about 87 kB) do not.
        assert gate_ok(runtime, "analyst", "query", {"sql": MONTH})["rows"]
        whole = gate_call(runtime, "analyst", "query", {"sql": WHOLE})
        assert isinstance(whole.error, LimitExceeded), whole.error
        message = str(whole.error)
        assert "30.0 kB" in message and "sales.orders: 48 files" in message and "not run" in message, message
        assert "partition" in (whole.error.hint or "")
        # explain is not refused: it shows the estimate and says the query is over the limit.
        plan = gate_ok(runtime, "analyst", "query", {"sql": WHOLE, "explain": True})
        assert "would read more than the 30.0 kB" in plan["plan"]
        # support_agent's own entry (1 kB) is the most specific; it reads orders through a row
        # filter, so the refusal gives no size of the table.
        refused = gate_call(runtime, "support_agent", "query", {"sql": MONTH})
        assert isinstance(refused.error, LimitExceeded) and "sales.orders" not in str(refused.error), refused.error
        # A role without an entry is not capped.
        assert gate_ok(runtime, "admin", "query", {"sql": WHOLE})["rows"]
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


# -- the estimate and what was read -----------------------------------------------------------------


def test_a_metric_for_one_month_reads_only_that_months_files(runtime: Runtime) -> None:
    where = [{"dimension": "metric_time__month", "op": "=", "value": "2025-06-01"}]
    outcome = gate_call(
        runtime, "analyst", "query_metrics", {"metrics": ["revenue"], "group_by": ["order__channel"], "where": where}
    )
    assert outcome.error is None and outcome.record is not None and outcome.result is not None, outcome.error
    planned = outcome.record["details"]["planned_scan"]["sales.orders"]
    assert 0 < planned["files"] <= 4 < planned["files_before_pruning"], planned
    by_hand = gate_ok(
        runtime,
        "analyst",
        "query",
        {
            "sql": "SELECT channel, sum(total_amount) FROM sales.orders WHERE status <> 'cancelled' "
            "AND order_ts >= TIMESTAMPTZ '2025-06-01' AND order_ts < TIMESTAMPTZ '2025-07-01' OR false "
            "GROUP BY 1 ORDER BY 1"
        },
    )
    rows = outcome.result.model_dump()["rows"]
    assert [[str(value) for value in row] for row in rows] == [[str(value) for value in row] for row in by_hand["rows"]]


@pytest.fixture(scope="module")
def uncached(demo_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runtime]:
    """A runtime whose query workers keep no table data in memory: every query reads its files."""
    audit = {"path": tmp_path_factory.mktemp("uncached") / "audit.jsonl", "fsync": False}
    opened = open_runtime(load_settings(REPO, home=demo_home, audit=audit, principal=None, query={"cache_bytes": "0"}))
    yield opened
    opened.close()


@pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="the bytes read are counted only on Linux")
@pytest.mark.parametrize("table", sorted(LAYOUTS))
def test_the_scan_estimate_is_within_a_tenth_of_the_bytes_read(uncached: Runtime, table: str) -> None:
    columns = [c["name"] for c in gate_ok(uncached, "admin", "describe_dataset", {"name": table})["columns"]]
    queries = [
        "SELECT " + ", ".join(f'count("{column}")' for column in columns) + f" FROM {table}",  # every column
        f'SELECT count(DISTINCT "{columns[-1]}") FROM {table}',  # one column
        f"SELECT count(*) FROM {table}",  # none: the scan reads its first column
    ]
    for sql in queries:
        outcome = gate_call(uncached, "admin", "query", {"sql": sql})
        assert outcome.error is None and outcome.record is not None, outcome.error
        details = outcome.record["details"]
        estimate, read = details["planned_scan"][table]["bytes"], details["bytes_read"]
        assert estimate > 0 and abs(read - estimate) <= 0.1 * estimate, (sql, estimate, read)
