"""The governed SQL tool: answers, masks, row filters, time travel, paging, limits, cancellation and
audit, against the real demo warehouse (pyiceberg on SQLite, DuckDB sandboxes, Casbin) and, where it
matters, through the real MCP client over stdio."""

from __future__ import annotations

import shutil
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import pytest

from lakegate.evals.mcp_client import connect, text_of
from lakegate.server.app import Runtime, open_runtime
from lakegate.server.audit.log import read_records, verify
from lakegate.server.audit.record_model import audit_record
from lakegate.server.gate.gate import GateOutcome
from lakegate.server.gate.identity import CallOrigin, stdio_principal
from lakegate.server.settings import Settings, load_settings

REPO = Path(__file__).resolve().parents[1]


def call(runtime: Runtime, principal: str, **arguments: Any) -> GateOutcome:
    who = stdio_principal(principal, runtime.enforcer)
    return anyio.run(runtime.gate.call, "query", arguments, who, CallOrigin(transport="in-process", session_id="t"))


def rows(outcome: GateOutcome) -> list[list[Any]]:
    assert outcome.error is None, str(outcome.error)
    assert outcome.result is not None
    return list(outcome.result.rows)  # type: ignore[attr-defined]


def result(outcome: GateOutcome) -> dict[str, Any]:
    assert outcome.error is None, str(outcome.error)
    assert outcome.result is not None
    return outcome.result.model_dump(mode="json")


def test_governed_answer_equals_the_plain_answer_for_a_clear_aggregate(runtime: Runtime) -> None:
    sql = "SELECT region, count(*) AS n, sum(total_amount) AS revenue FROM sales.orders GROUP BY region ORDER BY region"
    analyst = result(call(runtime, "analyst", sql=sql))
    admin = result(call(runtime, "admin", sql=sql))
    assert analyst["rows"] == admin["rows"] and len(analyst["rows"]) == 4
    assert [c["name"] for c in analyst["columns"]] == ["region", "n", "revenue"]
    # Types are kept: the decimal sum is exact, sent as a string, and typed as a decimal.
    assert analyst["columns"][2]["type"].startswith("decimal128")
    assert all(isinstance(row[2], str) and "." in row[2] for row in analyst["rows"])
    assert sum(row[1] for row in analyst["rows"]) == 5_000
    assert analyst["snapshots"]["sales.orders"] is not None and not analyst["masked_columns"]


def test_masked_columns_read_masked_everywhere_and_stay_joinable(runtime: Runtime) -> None:
    clear = rows(call(runtime, "admin", sql="SELECT customer_id, email FROM sales.customers ORDER BY 1 LIMIT 5"))
    hashed = rows(call(runtime, "analyst", sql="SELECT customer_id, email FROM sales.customers ORDER BY 1 LIMIT 5"))
    assert [r[0] for r in hashed] == [r[0] for r in clear]
    for (_, email), (_, digest) in zip(clear, hashed, strict=True):
        assert "@" in email and len(digest) == 16 and all(c in "0123456789abcdef" for c in digest)
    # The same value hashes the same in every query: a join on the hash still matches.
    joined = rows(
        call(
            runtime,
            "analyst",
            sql="SELECT count(*) FROM sales.customers a JOIN sales.customers b ON a.email = b.email",
        )
    )
    assert joined == [[500]]
    redacted = rows(call(runtime, "data_steward", sql="SELECT DISTINCT email, phone FROM sales.customers ORDER BY 2"))
    assert redacted == [["[redacted]", "[redacted]"], ["[redacted]", None]]  # NULL stays NULL
    partial = rows(call(runtime, "support_agent", sql="SELECT phone FROM sales.customers WHERE phone IS NOT NULL"))
    assert partial and all(p[0][:-4].strip("*") == "" and p[0][-4:].isdigit() for p in partial)


def test_hidden_column_is_refused_by_name_and_star_skips_it(runtime: Runtime) -> None:
    refused = call(runtime, "data_steward", sql="SELECT ticket_id, body FROM support.tickets")
    assert refused.error is not None and refused.error.outcome == "denied"
    assert "support.tickets.body" in str(refused.error) and "describe_dataset" in str(refused.error)
    star = result(call(runtime, "data_steward", sql="SELECT * FROM support.tickets LIMIT 1"))
    names = [c["name"] for c in star["columns"]]
    assert "body" not in names and "subject" in names and "ticket_id" in names


def test_row_filters_apply_to_every_scan_before_any_aggregate(runtime: Runtime) -> None:
    emea = rows(call(runtime, "admin", sql="SELECT count(*) FROM sales.orders WHERE region = 'EMEA'"))[0][0]
    total = rows(call(runtime, "admin", sql="SELECT count(*) FROM sales.orders"))[0][0]
    assert 0 < emea < total
    outcome = call(runtime, "support_agent", sql="SELECT count(*) FROM sales.orders")
    assert rows(outcome) == [[emea]]
    assert result(outcome)["row_filters"] == {"sales.orders": ["region = 'EMEA'"]}
    # In a join, a subquery and a set operation: the filtered rows never appear.
    sql = (
        "SELECT DISTINCT c.region FROM sales.orders o JOIN sales.customers c ON o.customer_id = c.customer_id "
        "WHERE o.order_id IN (SELECT order_id FROM sales.orders) "
        "UNION SELECT region FROM sales.customers"
    )
    assert rows(call(runtime, "support_agent", sql=sql)) == [["EMEA"]]


def test_time_travel_reads_the_named_snapshot_and_audits_it(runtime: Runtime, audit_path: Path) -> None:
    table = runtime.warehouse.iceberg_table("sales.orders")
    first, current = sorted(table.metadata.snapshots, key=lambda s: s.timestamp_ms)[:2]
    sql = "SELECT count(*) FROM sales.orders"
    assert rows(call(runtime, "analyst", sql=sql)) == [[5_000]]
    by_id = call(runtime, "analyst", sql=sql, as_of={"sales.orders": first.snapshot_id})
    assert rows(by_id) == [[2_500]]
    assert result(by_id)["snapshots"] == {"sales.orders": str(first.snapshot_id)}  # 64-bit ids travel as strings
    # A timestamp reads the snapshot current at that time.
    from datetime import UTC, datetime

    moment = datetime.fromtimestamp(first.timestamp_ms / 1000, tz=UTC) + timedelta(microseconds=500)
    by_time = call(runtime, "analyst", sql=sql, as_of={"sales.orders": moment.isoformat()})
    if current.timestamp_ms > first.timestamp_ms:
        assert rows(by_time) == [[2_500]]
    missing = call(runtime, "analyst", sql=sql, as_of={"sales.orders": 12345})
    assert missing.error is not None and missing.error.outcome == "not_found"
    assert "describe_dataset" in str(missing.error)
    stray = call(runtime, "analyst", sql=sql, as_of={"sales.customers": first.snapshot_id})
    assert stray.error is not None and "does not read" in str(stray.error)

    record = list(read_records(audit_path))[1]
    assert record["details"]["snapshots"] == {"sales.orders": first.snapshot_id}
    assert {"type": "dataset", "name": "sales.orders", "access": "read", "version": first.snapshot_id} in record[
        "resources"
    ]


def test_audit_record_holds_original_and_rewritten_sql_and_columns_read(runtime: Runtime, audit_path: Path) -> None:
    sql = "SELECT c.email, count(*) FROM sales.customers c JOIN sales.orders o USING (customer_id) GROUP BY 1"
    call(runtime, "support_agent", sql=sql)
    (record,) = read_records(audit_path)
    assert record["decision"] == "partial"  # rows were filtered
    assert {"type": "dataset", "name": "sales.orders", "access": "filtered"} in [
        {k: r[k] for k in ("type", "name", "access")} for r in record["resources"]
    ]
    details = record["details"]
    assert record["arguments"]["sql"] == sql
    # Each table's files appear as the snapshot they are: no server path, no list of hundreds of files.
    snapshot = details["snapshots"]["sales.orders"]
    assert f'"sales.orders@{snapshot}"' in details["rewritten_sql"] and "/" not in details["rewritten_sql"]
    assert "region = 'EMEA'" in details["rewritten_sql"]
    assert "lakegate_mask_partial" in details["rewritten_sql"].lower()  # phone is in the scan, masked
    columns = {r["name"]: r["access"] for r in record["resources"] if r["type"] == "column"}
    assert columns["sales.customers.email"] == "read" and columns["sales.orders.customer_id"] == "read"
    assert "sales.customers.phone" not in columns  # in the scan, but the query did not read it
    assert verify(audit_path).ok


def test_explain_returns_the_rewritten_sql_and_plan_without_rows(runtime: Runtime) -> None:
    explained = result(call(runtime, "analyst", sql="SELECT email FROM sales.customers", explain=True))
    assert explained["rows"] == [] and "lakegate_mask_hash" in explained["rewritten_sql"].lower()
    estimate, physical = explained["plan"].split("\n\n", 1)
    assert "ARROW_SCAN" in physical.upper()
    assert "rows" not in physical.lower()  # DuckDB's estimates, made before row filters, are left out
    assert estimate.startswith("Scan estimate:\nsales.customers: 1 files, ") and estimate.endswith(" 500 rows")
    # The files and rows of a table the caller reads through a row filter count rows it may not see.
    filtered = result(call(runtime, "support_agent", sql="SELECT customer_id FROM sales.customers", explain=True))
    assert filtered["plan"].split("\n\n", 1)[0].endswith("sales.customers: not shown (a row filter applies to you)")


def test_pages_follow_a_cursor_on_the_same_snapshot_within_the_budgets(runtime: Runtime) -> None:
    sql = "SELECT order_id, status FROM sales.orders ORDER BY order_id"
    scanned = runtime.warehouse.iceberg_table("sales.orders").scan(selected_fields=("order_id",)).to_arrow()
    everything = sorted(scanned.column("order_id").to_pylist())[:600]
    seen: list[int] = []
    cursor = None
    for _ in range(4):
        args: dict[str, Any] = {"sql": sql, "limit": 150} | ({"cursor": cursor} if cursor else {})
        page = result(call(runtime, "admin", **args))
        seen += [r[0] for r in page["rows"]]
        assert page["truncated"] and page["note"] is None
        cursor = page["next_cursor"]
    assert seen == everything
    other = call(runtime, "admin", sql="SELECT 1 FROM sales.orders", cursor=cursor)
    assert other.error is not None and "different call" in str(other.error)
    unordered = result(call(runtime, "admin", sql="SELECT order_id FROM sales.orders", limit=10))
    assert unordered["truncated"] and "ORDER BY" in unordered["note"]


def test_byte_budget_cuts_a_page_and_says_so(settings: Settings) -> None:
    small = settings.model_copy(update={"limits": settings.limits.model_copy(update={"max_bytes": 2048})})
    runtime = open_runtime(small)
    try:
        page = result(call(runtime, "admin", sql="SELECT * FROM support.tickets ORDER BY ticket_id", limit=200))
    finally:
        runtime.close()
    assert 0 < len(page["rows"]) < 200 and page["truncated"] and page["next_cursor"]


def test_a_slow_query_is_stopped_at_the_time_limit(settings: Settings, audit_path: Path) -> None:
    quick = settings.model_copy(update={"query": settings.query.model_copy(update={"timeout_s": 0.5})})
    runtime = open_runtime(quick)
    try:
        slow = "SELECT sum(a.range * b.range) FROM range(200000) a, range(200000) b, sales.products"
        outcome = call(runtime, "admin", sql=slow)
        after = call(runtime, "admin", sql="SELECT count(*) FROM sales.products")
    finally:
        runtime.close()
    assert outcome.error is not None and outcome.error.outcome == "limit_exceeded"
    assert "0.5 s" in str(outcome.error)
    assert rows(after) == [[120]]  # the sandbox is reusable after an interrupt
    record = next(read_records(audit_path))
    assert record["outcome"] == "limit_exceeded" and record["rows"] == 0


def test_a_query_over_its_memory_budget_is_stopped_and_the_server_serves_on(settings: Settings) -> None:
    tight = settings.query.model_copy(update={"memory_limit": "64MB", "spill_limit": "1MB"})
    runtime = open_runtime(settings.model_copy(update={"query": tight}))
    try:
        greedy = "SELECT count(DISTINCT a.range::VARCHAR || c.email) FROM range(20000) a, sales.customers c"
        outcome = call(runtime, "admin", sql=greedy)
        after = call(runtime, "admin", sql="SELECT count(*) FROM sales.products")
    finally:
        runtime.close()
    assert outcome.error is not None and outcome.error.outcome == "limit_exceeded"
    assert "memory budget 64MB" in str(outcome.error) and "Aggregate" in str(outcome.error)
    assert rows(after) == [[120]]


def test_invalid_row_filter_file_fails_closed(tmp_path: Path, demo_home: Path) -> None:
    project = tmp_path / "project"
    shutil.copytree(REPO / "policies", project / "policies", ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    bad = "filters:\n  - {subject: x, dataset: bad name, where: '1'}\n"
    (project / "policies" / "row_filters.yaml").write_text(bad)
    runtime = open_runtime(load_settings(project, home=demo_home, audit={"path": tmp_path / "a.jsonl", "fsync": False}))
    try:
        assert runtime.enforcer.load_error is not None
        outcome = call(runtime, "admin", sql="SELECT count(*) FROM sales.orders")
    finally:
        runtime.close()
    assert outcome.error is not None and outcome.error.outcome == "denied"


def test_query_over_stdio_with_a_denial_progress_and_cancellation(demo_home: Path, audit_path: Path) -> None:
    """The real MCP client: a query, a refusal, a long query that reports progress and is cancelled,
    and the server keeps serving."""
    progress: list[tuple[float, float | None, str | None]] = []
    reported = anyio.Event()

    async def on_progress(done: float, total: float | None, message: str | None) -> None:
        progress.append((done, total, message))
        reported.set()

    async def scenario() -> tuple[Any, Any, Any]:
        # One sandbox only: the query after the cancelled one gets a sandbox only if the cancel
        # really interrupted DuckDB (else it waits the whole time limit and fails).
        env = {"LAKEGATE_AUDIT__PATH": str(audit_path), "LAKEGATE_QUERY__CONCURRENCY": "1"}
        async with connect("analyst", demo_home, **env) as client:
            answer = await client.call_tool(
                "query", {"sql": "SELECT region, count(*) FROM sales.orders GROUP BY 1 ORDER BY 1"}
            )
            refused = await client.call_tool("query", {"sql": "DROP TABLE sales.orders"})
            slow = {"sql": "SELECT count(*) FROM range(100000000000) a WHERE a.range % 7 = 1"}
            async with anyio.create_task_group() as group:  # cancelled once it reported progress
                group.start_soon(partial(client.call_tool, "query", slow, progress_callback=on_progress))
                with anyio.move_on_after(30):
                    await reported.wait()
                group.cancel_scope.cancel()
            after = await client.call_tool("query", {"sql": "SELECT count(*) FROM sales.products"})
            return answer, refused, after

    answer, refused, after = anyio.run(scenario)
    assert not answer.is_error and len(answer.structured_content["rows"]) == 4
    assert "EMEA" in text_of(answer) and "region" in text_of(answer)
    assert refused.is_error and "Only read-only queries" in text_of(refused)
    assert not after.is_error and after.structured_content["rows"] == [[120]]
    # MCP progress notifications while the query ran: percent done, rising.
    assert progress and all(total == 100.0 and message and "query running" in message for _, total, message in progress)
    assert [done for done, _, _ in progress] == sorted(done for done, _, _ in progress)
    records = [record for record in read_records(audit_path) if not audit_record(record).is_listing]
    outcomes = [r["outcome"] for r in records]
    assert outcomes[:2] == ["ok", "invalid"] and outcomes[-1] == "ok"
    assert "cancelled" in outcomes, outcomes
    assert records[-1]["duration_ms"] < 15_000  # it did not wait out the cancelled query's 30 s limit
    assert verify(audit_path).ok


@pytest.mark.parametrize(
    ("sql", "fragment"),
    [
        ("SELECT * FROM kb.articles", "No dataset named 'kb.articles'"),  # analyst may not read it
        ("SELECT * FROM orders", "namespace.table"),
        ("SELECT nope FROM sales.orders", "does not exist"),
        ("SELECT 1 +", "does not parse"),
        ("SELECT 'a'::INTEGER FROM sales.orders", "DuckDB could not run the query"),
    ],
)
def test_bad_queries_get_errors_that_say_what_to_do(runtime: Runtime, sql: str, fragment: str) -> None:
    outcome = call(runtime, "analyst", sql=sql)
    assert outcome.error is not None and fragment in str(outcome.error)
    assert outcome.error.outcome in {"invalid", "not_found"}


def test_lance_datasets_are_pointed_away_from_sql(runtime: Runtime) -> None:
    outcome = call(runtime, "support_agent", sql="SELECT text FROM kb.articles")
    assert outcome.error is not None and "Lance dataset" in str(outcome.error)


def test_a_scan_with_row_level_deletes_is_refused_not_read_wrongly() -> None:
    """pyiceberg writes no delete files, so the planned task is built from pyiceberg's own classes,
    as plan_files returns it for a table another engine wrote position deletes into."""
    from pyiceberg.manifest import DataFile, DataFileContent, FileFormat
    from pyiceberg.table import FileScanTask

    from lakegate.catalog.iceberg_scan import refuse_row_deletes
    from lakegate.errors import InvalidArgument

    def data_file(content: DataFileContent, path: str) -> DataFile:
        return DataFile.from_args(
            content=content, file_path=path, file_format=FileFormat.PARQUET, record_count=1, file_size_in_bytes=1
        )

    clean = FileScanTask(data_file(DataFileContent.DATA, "file:///w/a.parquet"))
    deleted = FileScanTask(
        data_file(DataFileContent.DATA, "file:///w/b.parquet"),
        delete_files={data_file(DataFileContent.POSITION_DELETES, "file:///w/b-deletes.parquet")},
    )
    refuse_row_deletes("sales.orders", [clean])  # no delete file: readable
    with pytest.raises(InvalidArgument, match="1 position row-level delete file"):
        refuse_row_deletes("sales.orders", [clean, deleted])


def test_the_engine_runs_only_what_duckdb_itself_reads_as_one_select(runtime: Runtime) -> None:
    """Behind the guard: a statement that would change a pooled sandbox never runs, even if handed
    to the engine directly (as a guard bug would)."""
    from lakegate.errors import BackendError

    engine = runtime.warehouse.query_engine(runtime.settings.query)
    for sql in (
        "SELECT 1; CREATE OR REPLACE MACRO lakegate_mask_hash(x) AS x",
        "CREATE OR REPLACE MACRO lakegate_mask_hash(x) AS x",
        "COPY (SELECT 1) TO 'x.csv'",
    ):
        with pytest.raises(BackendError, match="not one SELECT"):
            engine.run_sql(sql, {})
    # DuckDB's own reading is checked too: a mask on a literal would be a hash oracle.
    with pytest.raises(BackendError, match="refused"):
        engine.run_sql("SELECT lakegate_mask_hash('a') AS oracle", {})
    masked = rows(call(runtime, "analyst", sql="SELECT email FROM sales.customers ORDER BY customer_id LIMIT 1"))
    assert "@" not in masked[0][0]


def test_schema_evolution_reads_columns_by_field_id(tmp_path: Path) -> None:
    """A rename, an added column and a dropped-then-re-added name: old files still read right."""
    import pyarrow as pa
    from pyiceberg.schema import Schema
    from pyiceberg.types import LongType, NestedField, StringType

    from lakegate.catalog.warehouse import Warehouse

    home = tmp_path / "home"
    warehouse = Warehouse(home)
    try:
        warehouse.iceberg.create_namespace("ns")
        schema = Schema(
            NestedField(1, "id", LongType(), required=False), NestedField(2, "name", StringType(), required=False)
        )
        table = warehouse.iceberg.create_table("ns.t", schema)
        table.append(pa.table({"id": pa.array([1, 2], pa.int64()), "name": ["a", "b"]}))
        with table.update_schema() as update:
            update.rename_column("name", "label")
            update.add_column("note", StringType())
        table = warehouse.iceberg_table("ns.t")
        later = {"id": pa.array([3], pa.int64()), "label": ["c"], "note": ["new"]}
        table.append(pa.table(later, schema=table.schema().as_arrow()))
        with table.update_schema() as update:
            update.delete_column("note")
        with warehouse.iceberg_table("ns.t").update_schema() as update:
            update.add_column("note", StringType())  # same name, a new column: old values must not show
    finally:
        warehouse.close()
    runtime = open_runtime(load_settings(REPO, home=home, audit={"path": tmp_path / "a.jsonl", "fsync": False}))
    try:
        answer = rows(call(runtime, "admin", sql="SELECT id, label, note FROM ns.t ORDER BY id"))
    finally:
        runtime.close()
    assert answer == [[1, "a", None], [2, "b", None], [3, "c", None]]


def test_a_failing_progress_report_neither_frees_a_busy_sandbox_nor_loses_the_query(tmp_path: Path) -> None:
    """The client went away mid-query: reporting fails, the query still ends, the sandbox is reusable."""
    import threading

    from lakegate.catalog.query_engine import QueryEngine
    from lakegate.server.settings import QuerySettings

    engine = QueryEngine(QuerySettings(concurrency=1, timeout_s=20), "abc123", tmp_path / "spill")

    def gone(done: float) -> None:
        raise RuntimeError("client went away")

    try:
        counted = engine.run_sql(
            "SELECT count(*) AS n FROM range(400000000) r WHERE r.range % 7 = 1", {}, on_progress=gone
        )
        assert counted.complete and counted.table is not None and counted.table.to_pylist() == [{"n": 57142857}]
        answer = engine.run_sql("SELECT 42 AS answer", {}).table
        assert answer is not None and answer.to_pylist() == [{"answer": 42}]
        assert not [t for t in threading.enumerate() if t.name == "lakegate-query"]
    finally:
        engine.close()
