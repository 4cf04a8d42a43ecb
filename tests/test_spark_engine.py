"""Governed SQL on a real Spark cluster (issue 19): the same answers, masks, row filters and audit
record fields as on DuckDB, and the walls that Spark, not being a sandbox, needs.

Every query goes through the gate (real pyiceberg, Casbin, DuckDB and a real Spark standalone
cluster through Spark Connect); the DuckDB answer of the same runtime settings is the reference.
"""

from __future__ import annotations

from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from lakegate.catalog.spark_cluster import ClusterInfo
from lakegate.errors import ClientError, LimitExceeded
from lakegate.evals.leaks import Forbidden
from lakegate.server.app import Runtime, open_runtime
from lakegate.server.audit.log import read_records
from lakegate.server.settings import load_settings
from tests.conftest import REPO, gate_call
from tests.spark_support import spark_query_settings

pytestmark = pytest.mark.xdist_group("spark")

#: Queries whose governed answers must be equal on both engines, for each principal.
QUERIES = [
    "SELECT region, count(*) AS n, sum(total_amount) AS revenue FROM sales.orders GROUP BY region ORDER BY region",
    "SELECT c.country, count(DISTINCT o.customer_id) AS buyers, sum(o.total_amount) AS spent "
    "FROM sales.orders o JOIN sales.customers c ON o.customer_id = c.customer_id "
    "GROUP BY c.country ORDER BY buyers DESC, c.country LIMIT 10",
    "SELECT customer_id, name, email, phone, region FROM sales.customers ORDER BY customer_id LIMIT 25",
    "SELECT date_trunc('month', order_ts) AS month, count(*) AS n FROM sales.orders GROUP BY 1 ORDER BY 1",
    "SELECT order_id, total_amount, rank() OVER (PARTITION BY region ORDER BY total_amount DESC, order_id) AS r "
    "FROM sales.orders QUALIFY r <= 2 ORDER BY order_id",
    "WITH spend AS (SELECT customer_id, sum(total_amount) AS spent FROM sales.orders GROUP BY customer_id) "
    "SELECT count(*) AS big FROM spend WHERE spent > 1000",
    "SELECT status, channel, count(*) AS n FROM sales.orders WHERE order_ts >= TIMESTAMP '2025-03-01' "
    "AND status IN ('shipped', 'delivered') GROUP BY status, channel ORDER BY status, channel",
    "SELECT c.email, count(*) AS orders FROM sales.customers c JOIN sales.orders o USING (customer_id) "
    "GROUP BY c.email ORDER BY orders DESC, c.email LIMIT 5",
    "SELECT count(*) AS n, count(phone) AS phones, min(signup_date) AS first FROM sales.customers",
    # NULLs sort last in ascending order on both (Spark's default is first: sqlglot writes NULLS LAST),
    # and / divides integers into a double, // into an integer, on both.
    "SELECT customer_id, phone, customer_id / 8 AS ratio, customer_id // 8 AS whole FROM sales.customers "
    "ORDER BY phone, customer_id LIMIT 40",
    "SELECT customer_id, phone FROM sales.customers ORDER BY phone DESC, customer_id LIMIT 5",
]
PRINCIPALS = ["analyst", "support_agent", "data_steward", "admin"]  # hash, partial, redact, clear


def _runtime(demo_home: Path, audit: Path, query: dict[str, Any] | None = None) -> Runtime:
    settings = load_settings(
        REPO, home=demo_home, audit={"path": audit, "fsync": False}, principal=None, query=query or {}
    )
    return open_runtime(settings)


@pytest.fixture(scope="module")
def duckdb_runtime(demo_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runtime]:
    opened = _runtime(demo_home, tmp_path_factory.mktemp("duckdb-audit") / "audit.jsonl")
    yield opened
    opened.close()


@pytest.fixture(scope="module")
def spark_runtime(
    demo_home: Path, spark_cluster: ClusterInfo, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Runtime]:
    opened = _runtime(
        demo_home, tmp_path_factory.mktemp("spark-audit") / "audit.jsonl", spark_query_settings(spark_cluster)
    )
    yield opened
    opened.close()


def _answer(runtime: Runtime, principal: str, arguments: dict[str, Any]) -> dict[str, Any]:
    outcome = gate_call(runtime, principal, "query", arguments)
    assert outcome.error is None, str(outcome.error)
    assert outcome.result is not None
    shown = [outcome.text, outcome.payload, outcome.record]
    assert not Forbidden.of(runtime.settings.state_dir, REPO).found(shown, sent=arguments)
    return outcome.result.model_dump()


def _same(value: Any) -> Any:
    # Spark averages and sums of decimals keep a decimal scale where DuckDB's may differ: compare numbers.
    if isinstance(value, str):
        try:
            return Decimal(value).normalize() if value.replace(".", "", 1).lstrip("-").isdigit() else value
        except ArithmeticError:
            return value
    return value


@pytest.mark.parametrize("principal", PRINCIPALS)
@pytest.mark.parametrize("sql", QUERIES, ids=[f"q{n}" for n in range(len(QUERIES))])
def test_the_governed_answer_is_the_same_on_spark(
    duckdb_runtime: Runtime, spark_runtime: Runtime, principal: str, sql: str
) -> None:
    arguments = {"sql": sql, "limit": 100}
    on_duckdb = _answer(duckdb_runtime, principal, arguments)
    on_spark = _answer(spark_runtime, principal, arguments)

    assert on_duckdb["engine"] == "duckdb" and on_spark["engine"] == "spark"
    assert [[_same(v) for v in row] for row in on_spark["rows"]] == [
        [_same(v) for v in row] for row in on_duckdb["rows"]
    ]
    assert on_spark["rows"], "every reference query answers rows"
    for key in ("masked_columns", "row_filters", "snapshots", "truncated"):
        assert on_spark[key] == on_duckdb[key], key


def test_the_audit_record_has_the_same_fields_and_names_the_engine(
    duckdb_runtime: Runtime, spark_runtime: Runtime
) -> None:
    sql = "SELECT region, count(*) AS n FROM sales.customers GROUP BY region ORDER BY region"
    _answer(duckdb_runtime, "support_agent", {"sql": sql})
    _answer(spark_runtime, "support_agent", {"sql": sql})
    duckdb_record = list(read_records(duckdb_runtime.settings.audit_path))[-1]
    spark_record = list(read_records(spark_runtime.settings.audit_path))[-1]

    assert spark_record["details"]["engine"] == "spark" and duckdb_record["details"]["engine"] == "duckdb"
    assert set(spark_record["details"]) - {"bytes_read"} == set(duckdb_record["details"]) - {"bytes_read"}
    assert spark_record["details"]["row_filters"] == {"sales.customers": ["region = 'EMEA'"]}
    # Spark's own account of what it read: the grouped column and the row filter's (the same column).
    assert spark_record["details"]["scanned"] == {"sales.customers": ["region"]}
    assert spark_record["resources"] == duckdb_record["resources"]


def test_the_hash_mask_gives_the_same_value_on_both_engines(duckdb_runtime: Runtime, spark_runtime: Runtime) -> None:
    sql = "SELECT email FROM sales.customers WHERE email IS NOT NULL ORDER BY customer_id LIMIT 5"
    on_duckdb = _answer(duckdb_runtime, "analyst", {"sql": sql})["rows"]
    on_spark = _answer(spark_runtime, "analyst", {"sql": sql})["rows"]

    assert on_spark == on_duckdb
    assert all(len(row[0]) == 16 and "@" not in row[0] for row in on_spark)


@pytest.mark.parametrize(
    ("sql", "fragment"),
    [
        ("SELECT reflect('java.lang.System', 'getenv', 'HOME') FROM sales.orders LIMIT 1", "reflect()"),
        ("SELECT java_method('java.lang.System', 'getenv', 'HOME') FROM sales.orders", "java_method()"),
        ("SELECT input_file_name() FROM sales.orders LIMIT 1", "input_file_name()"),
        ("SELECT raise_error(email) FROM sales.customers", "raise_error()"),
        ("SELECT current_user FROM sales.orders LIMIT 1", "current_user"),
        ("SELECT count(*) FROM sales.orders WHERE assert_true(region = 'NA')", "assert_true()"),
    ],
)
def test_spark_only_functions_are_refused(spark_runtime: Runtime, sql: str, fragment: str) -> None:
    outcome = gate_call(spark_runtime, "analyst", "query", {"sql": sql})

    assert isinstance(outcome.error, ClientError), outcome.text[:300]
    assert fragment in str(outcome.error)
    assert outcome.result is None


def test_explain_on_spark_shows_no_file_path_and_no_key(spark_runtime: Runtime) -> None:
    result = _answer(
        spark_runtime,
        "analyst",
        {"sql": "SELECT email, count(*) FROM sales.customers GROUP BY email", "explain": True},
    )

    plan = result["plan"]
    assert "Scan estimate" in plan and "FileScan parquet" in plan
    assert "file:" not in plan and str(spark_runtime.settings.state_dir) not in plan
    key = (spark_runtime.settings.state_dir / "mask.key").read_text().strip()
    assert key.lower() not in plan.lower() and key.encode().hex().lower() not in plan.lower()
    assert "sha2(" in plan and "[key]" in plan  # the mask's body, inlined by Spark, without its key


def test_a_query_past_the_time_limit_is_stopped_on_spark(
    demo_home: Path, spark_cluster: ClusterInfo, tmp_path: Path
) -> None:
    query = {**spark_query_settings(spark_cluster), "timeout_s": 3}
    runtime = _runtime(demo_home, tmp_path / "audit.jsonl", query)
    try:
        sql = (
            "SELECT count(*) FROM sales.orders a, sales.orders b, sales.orders c "
            "WHERE a.order_id + b.order_id > c.order_id"
        )
        outcome = gate_call(runtime, "admin", "query", {"sql": sql})
        assert isinstance(outcome.error, LimitExceeded), outcome.text[:300]
        assert "on Spark" in str(outcome.error)
    finally:
        runtime.close()
    # The stopped query does not hold the cluster: its tasks are interrupted, or their executor is
    # replaced (the task reaper, 10 s), and the next query answers within the usual time limit.
    runtime = _runtime(demo_home, tmp_path / "after.jsonl", spark_query_settings(spark_cluster))
    try:
        assert _answer(runtime, "admin", {"sql": "SELECT count(*) FROM sales.customers"})["rows"] == [[500]]
    finally:
        runtime.close()


def test_queries_route_to_spark_by_planned_scan_size(
    demo_home: Path, spark_cluster: ClusterInfo, tmp_path: Path
) -> None:
    query = spark_query_settings(spark_cluster, datasets=[], min_scan_bytes="5KB")
    runtime = _runtime(demo_home, tmp_path / "audit.jsonl", query)
    try:
        small = _answer(runtime, "admin", {"sql": "SELECT count(*) FROM sales.customers WHERE customer_id < 3"})
        large = _answer(runtime, "admin", {"sql": "SELECT sum(total_amount), count(*) FROM sales.orders"})
    finally:
        runtime.close()

    assert small["engine"] == "duckdb"
    assert large["engine"] == "spark"
    records = list(read_records(tmp_path / "audit.jsonl"))
    assert [r["details"]["engine"] for r in records] == ["duckdb", "spark"]
    assert records[1]["details"]["planned_scan"]["sales.orders"]["bytes"] >= 5000


METRIC_QUERIES = [
    {"metrics": ["revenue", "orders", "average_order_value"], "group_by": ["metric_time__month"]},
    {"metrics": ["revenue_growth_mom"], "group_by": ["metric_time__month"]},
    {"metrics": ["cumulative_revenue", "trailing_3_month_revenue", "revenue_ytd"], "group_by": ["metric_time__month"]},
    {"metrics": ["active_customers", "new_customers", "revenue_per_customer"], "group_by": ["metric_time__quarter"]},
    {"metrics": ["refund_rate", "cancellation_rate"], "group_by": ["customer__region"]},
]


@pytest.mark.parametrize("arguments", METRIC_QUERIES, ids=[a["metrics"][0] for a in METRIC_QUERIES])
def test_metrics_give_the_same_answer_on_spark(
    duckdb_runtime: Runtime, spark_runtime: Runtime, arguments: dict[str, Any]
) -> None:
    on_duckdb = gate_call(duckdb_runtime, "analyst", "query_metrics", {**arguments, "limit": 100})
    on_spark = gate_call(spark_runtime, "analyst", "query_metrics", {**arguments, "limit": 100})
    assert on_duckdb.result is not None and on_spark.result is not None, (on_duckdb.error, on_spark.error)

    duckdb_answer, spark_answer = on_duckdb.result.model_dump(), on_spark.result.model_dump()
    assert spark_answer["engine"] == "spark"
    assert spark_answer["rows"] and spark_answer["rows"] == duckdb_answer["rows"]


# -- the differences the README lists, one test each ---------------------------------------------


def test_unnamed_expressions_are_named_by_each_engine(duckdb_runtime: Runtime, spark_runtime: Runtime) -> None:
    sql = {"sql": "SELECT count(*), count(*) AS n FROM sales.customers"}
    duckdb_columns = [c["name"] for c in _answer(duckdb_runtime, "admin", sql)["columns"]]
    spark_columns = [c["name"] for c in _answer(spark_runtime, "admin", sql)["columns"]]

    assert duckdb_columns == ["count_star()", "n"] and spark_columns == ["count(1)", "n"]


def test_a_median_of_decimals_is_a_double_on_spark(duckdb_runtime: Runtime, spark_runtime: Runtime) -> None:
    sql = {"sql": "SELECT median(total_amount) AS m, sum(total_amount) AS s FROM sales.orders"}
    (duckdb_median, duckdb_sum), *_ = _answer(duckdb_runtime, "admin", sql)["rows"]
    (spark_median, spark_sum), *_ = _answer(spark_runtime, "admin", sql)["rows"]

    assert isinstance(duckdb_median, str) and isinstance(spark_median, float)  # a decimal is sent as text
    # Between two middle values DuckDB rounds to the column's scale (103.96), Spark does not (103.965).
    assert abs(Decimal(duckdb_median) - Decimal(str(spark_median))) <= Decimal("0.005")
    assert Decimal(duckdb_sum) == Decimal(spark_sum)  # equal sums, at each engine's own scale


def test_tables_on_object_storage_are_refused_on_spark() -> None:
    from lakegate.catalog.arrow_relations import SourceColumn, TableSource
    from lakegate.catalog.spark_engine import _file_uri
    from lakegate.errors import ConfigurationError

    on_s3 = TableSource((SourceColumn("id", "BIGINT", 1),), (("bucket/key.parquet", 10),))
    with pytest.raises(ConfigurationError, match="route this table's queries to DuckDB"):
        _file_uri("bucket/key.parquet", on_s3)


def test_a_query_on_spark_through_the_real_mcp_client_over_stdio(
    demo_home: Path, spark_cluster: ClusterInfo, tmp_path: Path
) -> None:
    import anyio

    from lakegate.evals.mcp_client import connect, text_of

    env = {
        "LAKEGATE_AUDIT__PATH": str(tmp_path / "audit.jsonl"),
        "LAKEGATE_QUERY__SPARK__REMOTE": spark_cluster.remote,
        "LAKEGATE_QUERY__SPARK__TOKEN_FILE": spark_cluster.token_file,
        "LAKEGATE_QUERY__SPARK__DATASETS": '["sales.*"]',
    }

    async def scenario() -> tuple[dict[str, Any], str]:
        async with connect("support_agent", demo_home, **env) as client:
            sql = "SELECT region, count(*) AS n FROM sales.customers GROUP BY region"
            result = await client.call_tool("query", {"sql": sql})
            assert not result.is_error, text_of(result)
            assert result.structured_content is not None
            return result.structured_content, text_of(result)

    structured, text = anyio.run(scenario)

    assert structured["engine"] == "spark" and structured["rows"][0][0] == "EMEA"
    assert len(structured["rows"]) == 1 and structured["row_filters"] == {"sales.customers": ["region = 'EMEA'"]}
    assert "on spark" in text
    (record,) = [r for r in read_records(tmp_path / "audit.jsonl") if r["tool"] == "query"]
    assert record["details"]["engine"] == "spark" and record["transport"] == "stdio"


def test_a_query_on_spark_cancelled_by_the_client_stops_and_the_server_goes_on(
    demo_home: Path, spark_cluster: ClusterInfo, tmp_path: Path
) -> None:
    # One Spark session only: the query after the cancelled one gets it only once the cancel
    # interrupted the Spark job (by its tag) and the call ended, not after the 90 s time limit.
    import anyio

    from lakegate.evals.mcp_client import connect

    audit = tmp_path / "audit.jsonl"
    env = {
        "LAKEGATE_AUDIT__PATH": str(audit),
        "LAKEGATE_QUERY__TIMEOUT_S": "90",
        "LAKEGATE_QUERY__SPARK__REMOTE": spark_cluster.remote,
        "LAKEGATE_QUERY__SPARK__TOKEN_FILE": spark_cluster.token_file,
        "LAKEGATE_QUERY__SPARK__DATASETS": '["sales.*"]',
        "LAKEGATE_QUERY__SPARK__SESSIONS": "1",
    }
    slow = (
        "SELECT count(*) FROM sales.orders a, sales.orders b, sales.orders c WHERE a.order_id + b.order_id > c.order_id"
    )

    async def scenario() -> Any:
        async with connect("admin", demo_home, **env) as client:
            warm = await client.call_tool("query", {"sql": "SELECT count(*) AS n FROM sales.products"})
            assert not warm.is_error
            with anyio.move_on_after(6):
                await client.call_tool("query", {"sql": slow})
            return await client.call_tool("query", {"sql": "SELECT count(*) AS n FROM sales.customers"})

    after = anyio.run(scenario)

    assert not after.is_error and after.structured_content is not None
    assert after.structured_content["rows"] == [[500]] and after.structured_content["engine"] == "spark"
    records = [record for record in read_records(audit) if record["tool"] == "query"]
    assert [record["outcome"] for record in records] == ["ok", "cancelled", "ok"]
    assert records[1]["details"]["engine"] == "spark" and records[1]["duration_ms"] < 30_000


def test_pages_of_a_result_follow_each_other_on_spark(duckdb_runtime: Runtime, spark_runtime: Runtime) -> None:
    sql = "SELECT order_id, status FROM sales.orders WHERE region = 'EMEA' ORDER BY order_id"
    pages: dict[str, list[list[Any]]] = {}
    for name, runtime in (("duckdb", duckdb_runtime), ("spark", spark_runtime)):
        first = _answer(runtime, "support_agent", {"sql": sql, "limit": 7})
        assert first["truncated"] and first["next_cursor"]
        second = _answer(runtime, "support_agent", {"sql": sql, "limit": 7, "cursor": first["next_cursor"]})
        pages[name] = first["rows"] + second["rows"]

    assert pages["spark"] == pages["duckdb"] and len(pages["spark"]) == 14


def test_time_travel_reads_the_same_snapshot_on_spark(duckdb_runtime: Runtime, spark_runtime: Runtime) -> None:
    table = spark_runtime.warehouse.iceberg_table("sales.orders")
    first = min(table.metadata.snapshots, key=lambda snapshot: snapshot.timestamp_ms)
    sql = "SELECT count(*) AS n, max(order_id) AS last FROM sales.orders"
    then = {"sql": sql, "as_of": {"sales.orders": first.snapshot_id}}

    on_duckdb = _answer(duckdb_runtime, "analyst", then)
    on_spark = _answer(spark_runtime, "analyst", then)
    now = _answer(spark_runtime, "analyst", {"sql": sql})

    assert on_spark["engine"] == "spark" and on_spark["rows"] == on_duckdb["rows"] != now["rows"]
    assert on_spark["snapshots"] == on_duckdb["snapshots"] == {"sales.orders": first.snapshot_id}


def test_a_null_mask_is_a_null_of_the_columns_type_on_spark(
    demo_home: Path, spark_cluster: ClusterInfo, tmp_path: Path
) -> None:
    from tests.conftest import copy_demo_project

    project = copy_demo_project(tmp_path / "project")
    rules = project / "policies" / "policy.csv"
    rules.write_text(
        rules.read_text() + "\ng, nuller, role:nuller\ng, role:nuller, role:agent\n"
        "p, role:nuller, sales.*, read, allow\np, role:nuller, tag:pii, read, deny\n"
        "p, role:nuller, tag:pii, mask:null, allow\n"
    )
    answers = {}
    for engine, query in (("duckdb", {}), ("spark", spark_query_settings(spark_cluster))):
        settings = load_settings(
            project,
            home=demo_home,
            audit={"path": tmp_path / f"{engine}.jsonl", "fsync": False},
            principal=None,
            query=query,
        )
        runtime = open_runtime(settings)
        try:
            sql = "SELECT customer_id, email, phone FROM sales.customers ORDER BY customer_id LIMIT 3"
            answers[engine] = _answer(runtime, "nuller", {"sql": sql})
        finally:
            runtime.close()

    assert answers["spark"]["rows"] == answers["duckdb"]["rows"] == [[1, None, None], [2, None, None], [3, None, None]]
    assert answers["spark"]["masked_columns"] == answers["duckdb"]["masked_columns"]
    assert [c["type"] for c in answers["spark"]["columns"]] == ["int64", "string", "string"]
