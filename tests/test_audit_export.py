"""``lakegate audit export`` with the real engines: audit records written by the real gate, a real
pyiceberg SQLite catalog, the demo policy, and the governed query path reading the exported table.
Every test exports into its own small warehouse, never the shared demo."""

from __future__ import annotations

import json
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
from click.testing import CliRunner, Result
from pyiceberg.schema import Schema
from pyiceberg.types import LongType, NestedField, StringType

from lakegate.catalog.audit_table import AUDIT_TABLE, LAST_SEQ_PROPERTY, audit_schema
from lakegate.catalog.definitions import load_definitions
from lakegate.catalog.warehouse import Warehouse
from lakegate.errors import BackendError, NotFound, PolicyDenied
from lakegate.server.app import Runtime, open_runtime
from lakegate.server.audit.export import AuditExportRefused, export_audit_log, record_row
from lakegate.server.audit.log import AuditLog, Rotation, log_files, read_all_records, read_records
from lakegate.server.audit.record_builders import call_record, refused_request_record
from lakegate.server.audit.record_model import audit_record
from lakegate.server.cli.audit_commands import audit
from lakegate.server.cli.main import cli
from lakegate.server.settings import load_settings
from tests.conftest import gate_call

REPO = Path(__file__).resolve().parents[1]
ORDERS = "sales.orders"

#: Calls with every decision the gate makes: allow, partial (a row filter), deny, and failures.
CALLS: list[tuple[str, str, dict[str, Any]]] = [
    ("analyst", "list_datasets", {}),
    ("analyst", "query", {"sql": "SELECT region, count(*) FROM sales.orders GROUP BY 1"}),
    ("support_agent", "query", {"sql": "SELECT * FROM sales.orders"}),
    ("mallory", "query", {"sql": "SELECT 1"}),
    ("analyst", "describe_dataset", {"name": "nope.nope"}),
    ("analyst", "append_rows", {"table": ORDERS, "rows": [{"order_id": 9, "region": "NA"}]}),
]

#: A record as the gate writes it, for logs written here directly.
RECORD = call_record(
    request_id="1",
    session_id="s-1",
    principal="alice",
    roles=["role:analyst"],
    authenticated_by="config",
    transport="stdio",
    client_name=None,
    client_version=None,
    tool="query",
    arguments={},
    decision="allow",
    rules=[],
    policy_version="v1",
    resources=[],
    rows=0,
    payload_bytes=0,
    duration_s=0.001,
    outcome="ok",
    error=None,
    details=None,
)


@pytest.fixture
def home(tmp_path: Path) -> Path:
    """A state directory with one small table the calls above read."""
    state = tmp_path / "home"
    warehouse = Warehouse(state)
    schema = Schema(
        NestedField(1, "order_id", LongType(), required=True), NestedField(2, "region", StringType(), required=False)
    )
    warehouse.iceberg.create_namespace("sales")
    table = warehouse.iceberg.create_table(ORDERS, schema)
    rows = [{"order_id": 1, "region": "EMEA"}, {"order_id": 2, "region": "NA"}]
    table.append(pa.Table.from_pylist(rows, schema=schema.as_arrow()))
    warehouse.close()
    return state


@pytest.fixture
def log_path(tmp_path: Path) -> Path:
    return tmp_path / "audit.jsonl"


@pytest.fixture
def runtime(home: Path, log_path: Path) -> Iterator[Runtime]:
    settings = load_settings(REPO, home=home, audit={"path": log_path, "fsync": False}, principal=None)
    opened = open_runtime(settings)
    yield opened
    opened.close()


call = gate_call


def make_calls(runtime: Runtime, times: int = 1) -> None:
    for _ in range(times):
        for principal, tool, arguments in CALLS:
            call(runtime, principal, tool, arguments)


def export(home: Path, log_path: Path, *extra: str) -> Result:
    return CliRunner().invoke(
        audit, ["export", "--log", str(log_path), "--home", str(home), *extra], obj={"project": REPO}
    )


def export_json(home: Path, log_path: Path) -> dict[str, Any]:
    result = export(home, log_path, "--json")
    assert result.exit_code == 0, result.output
    answer: dict[str, Any] = json.loads(result.output)
    return answer


def table_state(home: Path) -> tuple[list[dict[str, Any]], list[int]]:
    """(rows ordered by seq, snapshot ids) of the audit table, read straight from the catalog."""
    warehouse = Warehouse(home)
    try:
        table = warehouse.iceberg_table(AUDIT_TABLE)
        rows = sorted(table.scan().to_arrow().to_pylist(), key=lambda row: row["seq"])
        return rows, [snapshot.snapshot_id for snapshot in table.metadata.snapshots]
    finally:
        warehouse.close()


def has_table(home: Path) -> bool:
    warehouse = Warehouse(home)
    try:
        return AUDIT_TABLE in warehouse.iceberg_table_names()
    finally:
        warehouse.close()


def rewrite_line(path: Path, index: int, **changes: Any) -> None:
    lines = path.read_text().splitlines(keepends=True)
    record = json.loads(lines[index])
    record.update(changes)
    lines[index] = json.dumps(record) + "\n"
    path.write_text("".join(lines))


# --- exporting ------------------------------------------------------------------------------------


def test_export_writes_every_record_once_and_a_second_export_adds_nothing(
    runtime: Runtime, home: Path, log_path: Path
) -> None:
    make_calls(runtime)
    records = list(read_records(log_path))
    assert {r["decision"] for r in records} == {"allow", "partial", "deny"}

    first = export_json(home, log_path)
    assert first["exported"] == len(records) == first["table_records"] == first["last_seq"]
    assert first["first_seq"] == 1 and first["created"] and first["table"] == AUDIT_TABLE
    rows, snapshots = table_state(home)
    assert snapshots == [first["snapshot_id"]]
    assert [row["seq"] for row in rows] == [r["seq"] for r in records]
    assert [row["hash"] for row in rows] == [r["hash"] for r in records]
    assert [row["prev_hash"] for row in rows] == [r["prev_hash"] for r in records]
    for row, record in zip(rows, records, strict=True):
        assert row["principal"] == record["principal"] and row["tool"] == record["tool"]
        assert row["decision"] == record["decision"] and row["outcome"] == record["outcome"]
        assert json.loads(row["roles"]) == record["roles"]
        assert json.loads(row["rules"]) == record["rules"]
        assert json.loads(row["resources"]) == record["resources"]
        assert json.loads(row["arguments"]) == record["arguments"]
        assert row["time"].isoformat() == record["time"]
        assert row["duration_ms"] == record["duration_ms"] and row["rows"] == record["rows"]
        assert row["error"] == record["error"] and row["transport"] == "in-process"
        assert (json.loads(row["details"]) if row["details"] else None) == record.get("details")
        assert row["extra"] is None
    partial = next(row for row in rows if row["principal"] == "support_agent")
    assert json.loads(partial["details"])["row_filters"] == {ORDERS: ["region = 'EMEA'"]}

    again = export(home, log_path)
    assert again.exit_code == 0, again.output
    assert again.output.startswith(f"0 new records: {AUDIT_TABLE} is up to date ({len(records)} records")
    assert table_state(home) == (rows, snapshots)  # no new snapshot, same rows
    assert export_json(home, log_path)["snapshot_id"] is None


def test_records_appended_after_an_export_are_exported_by_the_next_exactly_once(
    runtime: Runtime, home: Path, log_path: Path
) -> None:
    make_calls(runtime)
    first = export_json(home, log_path)
    make_calls(runtime, times=2)
    total = len(list(read_records(log_path)))
    result = export(home, log_path)
    assert result.exit_code == 0, result.output
    added = total - first["last_seq"]
    rows, snapshots = table_state(home)
    assert result.output.startswith(
        f"exported {added} new records (seq {first['last_seq'] + 1}..{total}) to {AUDIT_TABLE} "
        f"in snapshot {snapshots[-1]}; the table holds {total} records."
    )
    assert [row["seq"] for row in rows] == list(range(1, total + 1))
    assert len(snapshots) == 2  # one snapshot per export that found something new
    assert export_json(home, log_path)["exported"] == 0


def test_the_top_level_cli_mounts_export_with_the_configured_home(
    runtime: Runtime, home: Path, log_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_calls(runtime)
    monkeypatch.setenv("LAKEGATE_HOME", str(home))
    monkeypatch.setenv("LAKEGATE_AUDIT__PATH", str(log_path))
    result = CliRunner().invoke(cli, ["--project", str(REPO), "audit", "export", "--json"])
    assert result.exit_code == 0, result.output
    answer = json.loads(result.output)
    assert answer["log"] == str(log_path) and answer["exported"] == len(CALLS)
    assert len(table_state(home)[0]) == len(CALLS)


def test_an_export_that_crashes_before_its_commit_leaves_nothing_and_the_next_exports_all(
    runtime: Runtime, home: Path, log_path: Path
) -> None:
    make_calls(runtime)

    def crash(step: str, done: int, total: int) -> None:
        if step == "export" and done == total:
            raise RuntimeError("killed while writing")

    warehouse = Warehouse(home)
    try:
        with pytest.raises(BackendError, match="killed while writing"):
            export_audit_log(log_path, warehouse, progress=crash)
        assert warehouse.iceberg_table(AUDIT_TABLE).current_snapshot() is None
        result = export_audit_log(log_path, warehouse)
    finally:
        warehouse.close()
    assert result.exported == len(CALLS)
    assert [row["seq"] for row in table_state(home)[0]] == list(range(1, len(CALLS) + 1))


def test_a_snapshot_without_the_export_summary_is_continued_from_max_seq(
    runtime: Runtime, home: Path, log_path: Path
) -> None:
    """Another engine appended some records (its snapshot names no last seq): the data says where to go on."""
    make_calls(runtime)
    records = list(read_records(log_path))
    warehouse = Warehouse(home)
    try:
        catalog = warehouse.iceberg
        catalog.create_namespace("audit")
        table = catalog.create_table(AUDIT_TABLE, audit_schema(load_definitions(REPO)))
        table.append(
            pa.Table.from_pylist([record_row(audit_record(r)) for r in records[:2]], schema=table.schema().as_arrow())
        )
        assert LAST_SEQ_PROPERTY not in table.current_snapshot().summary.additional_properties  # type: ignore[union-attr]
        result = export_audit_log(log_path, warehouse)
    finally:
        warehouse.close()
    assert (result.exported, result.first_seq, result.last_seq) == (len(records) - 2, 3, len(records))
    assert [row["seq"] for row in table_state(home)[0]] == [r["seq"] for r in records]


def test_two_exports_at_once_export_each_record_once(runtime: Runtime, home: Path, log_path: Path) -> None:
    make_calls(runtime, times=3)
    total = len(list(read_records(log_path)))
    outcomes: list[int] = []
    failures: list[BaseException] = []
    start = threading.Barrier(2)

    def run() -> None:
        warehouse = Warehouse(home)
        try:
            start.wait()
            outcomes.append(export_audit_log(log_path, warehouse).exported)
        except BaseException as exc:  # reported below
            failures.append(exc)
        finally:
            warehouse.close()

    threads = [threading.Thread(target=run) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures, failures
    assert sorted(outcomes) == [0, total]
    rows, snapshots = table_state(home)
    assert [row["seq"] for row in rows] == list(range(1, total + 1))
    assert len(snapshots) == 1


def test_a_rotated_log_is_exported_across_its_files(home: Path, tmp_path: Path) -> None:
    log_path = tmp_path / "rotated" / "audit.jsonl"
    audit_settings = {"path": log_path, "fsync": False, "rotate_bytes": 2048}
    settings = load_settings(REPO, home=home, audit=audit_settings, principal=None)
    runtime = open_runtime(settings)
    try:
        make_calls(runtime, times=2)
    finally:
        runtime.close()
    assert len(log_files(log_path)) > 2
    records = list(read_all_records(log_path))
    exported = export_json(home, log_path)
    assert exported["exported"] == len(records) == len(CALLS) * 2
    assert [row["hash"] for row in table_state(home)[0]] == [r["hash"] for r in records]


def test_retention_pruning_exported_records_is_followed_and_pruning_unexported_ones_is_refused(
    home: Path, tmp_path: Path
) -> None:
    """One record per file (rotate before every append), two rotated files kept."""
    log_path = tmp_path / "pruned" / "audit.jsonl"
    log = AuditLog(log_path, fsync=False, rotation=Rotation(max_bytes=1, keep_files=2))

    def append(count: int) -> None:
        for _ in range(count):
            log.append(RECORD.model_dump())

    def seqs() -> list[int]:
        return [row["seq"] for row in table_state(home)[0]]

    warehouse = Warehouse(home)
    try:
        append(5)  # seq 1 and 2 pruned: the log holds 3..5
        first = export_audit_log(log_path, warehouse)
        assert (first.first_seq, first.last_seq, first.exported) == (3, 5, 3)
        append(3)  # 3..5 pruned: the log holds 6..8, which continue the table's seq 5 by their chain
        second = export_audit_log(log_path, warehouse)
        assert (second.first_seq, second.last_seq, second.exported) == (6, 8, 3)
        assert seqs() == [3, 4, 5, 6, 7, 8]
        append(4)  # the log holds 10..12: seq 9 was pruned before any export saw it
        with pytest.raises(AuditExportRefused, match=r"records seq 9\.\.9 were pruned .* before they were exported"):
            export_audit_log(log_path, warehouse)
        assert seqs() == [3, 4, 5, 6, 7, 8]
    finally:
        warehouse.close()
        log.close()


def test_fields_the_model_does_not_know_land_in_extra_and_a_line_that_is_no_record_is_refused(
    home: Path, tmp_path: Path
) -> None:
    """A later version's field, the production mirror's, and a grouped refusal's count: kept in
    `extra`. A line that verifies but is not an audit record (a field missing) stops the export."""
    log_path = tmp_path / "extra" / "audit.jsonl"
    refused = refused_request_record(
        request_id="2",
        session_id=None,
        principal="anonymous",
        roles=[],
        authenticated_by=None,
        transport="http",
        policy_version="v1",
        duration_s=0.0005,
        outcome="unauthenticated",
        error="invalid_token",
        details={"reason": "expired"},
    )
    with AuditLog(log_path, fsync=False) as log:
        log.append(RECORD.model_dump() | {"replica": "r-1", "global_seq": 7, "later": {"field": True}})
        log.append(refused.model_copy(update={"count": 3}).model_dump())
    warehouse = Warehouse(home)
    try:
        assert export_audit_log(log_path, warehouse).exported == 2
        with AuditLog(log_path, fsync=False) as log:
            log.append({key: value for key, value in RECORD.model_dump().items() if key != "principal"})
        with pytest.raises(AuditExportRefused, match=r"seq 3 .* is not an audit record \(principal: Field required"):
            export_audit_log(log_path, warehouse)
    finally:
        warehouse.close()
    rows, snapshots = table_state(home)
    assert [json.loads(row["extra"]) for row in rows] == [
        {"replica": "r-1", "global_seq": 7, "later": {"field": True}},
        {"count": 3},
    ]
    assert rows[1]["tool"] is None and rows[1]["client_name"] is None and len(snapshots) == 1


# --- refusing -------------------------------------------------------------------------------------


def test_a_tampered_log_is_refused_and_nothing_is_exported(runtime: Runtime, home: Path, log_path: Path) -> None:
    make_calls(runtime)
    rewrite_line(log_path, 3, decision="allow")  # seq 4, mallory's denied query, now says allowed
    result = export(home, log_path)
    assert result.exit_code == 1
    assert "does not verify (edited: record seq 4 (line 4) was edited" in result.output
    assert "nothing was exported" in result.output
    assert not has_table(home)  # refused before the table was even created


def test_a_log_tampered_after_an_export_is_refused_and_the_table_keeps_its_snapshot(
    runtime: Runtime, home: Path, log_path: Path
) -> None:
    make_calls(runtime)
    export_json(home, log_path)
    before = table_state(home)
    make_calls(runtime)
    lines = log_path.read_text().splitlines(keepends=True)
    log_path.write_text("".join(lines[:3] + lines[4:]))  # delete seq 4
    result = export(home, log_path)
    assert result.exit_code == 1 and "deleted" in result.output and "nothing was exported" in result.output
    assert table_state(home) == before


def test_a_log_that_does_not_continue_the_table_is_refused(runtime: Runtime, home: Path, log_path: Path) -> None:
    make_calls(runtime)
    export_json(home, log_path)
    before = table_state(home)
    # Another log, longer, with a chain of its own: it verifies, but it is not the one exported.
    fresh = log_path.with_name("fresh.jsonl")
    with AuditLog(fresh, fsync=False) as other:
        for record in list(read_records(log_path)) * 2:
            other.append(record | {"session_id": "another"})
    result = export(home, fresh)
    assert result.exit_code == 1
    assert f"the table's last record (seq {len(CALLS)}) is not in the log with the same hash" in result.output
    # The exported log cut off at the end: the table is the anchor that shows it.
    lines = log_path.read_text().splitlines(keepends=True)
    log_path.write_text("".join(lines[:-2]))
    cut = export(home, log_path)
    assert cut.exit_code == 1
    assert f"holds records up to seq {len(CALLS)} but the audit log {log_path} ends at seq {len(CALLS) - 2}" in (
        cut.output
    )
    assert table_state(home) == before


def test_an_unreadable_log_exits_2(home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LAKEGATE_HOME", str(home))
    # The configured log (the parent CLI's) is a directory: --log would not even accept it.
    result = CliRunner().invoke(audit, ["export"], obj={"project": REPO, "audit_path": tmp_path})
    assert result.exit_code == 2 and "cannot read audit log" in result.output


def test_refusal_is_a_server_error_of_the_tree(home: Path, log_path: Path) -> None:
    log_path.write_text('{"not": "a record"}\n')
    warehouse = Warehouse(home)
    try:
        with pytest.raises(AuditExportRefused, match="malformed"):
            export_audit_log(log_path, warehouse)
    finally:
        warehouse.close()


# --- reading it through lakegate ------------------------------------------------------------------


def test_data_steward_and_admin_query_the_exported_log_through_the_gate(
    runtime: Runtime, home: Path, log_path: Path
) -> None:
    before = call(runtime, "data_steward", "list_datasets", {})
    assert before.error is None and AUDIT_TABLE not in before.payload  # not exported yet: not listed
    missing = call(runtime, "data_steward", "describe_dataset", {"name": AUDIT_TABLE})
    assert isinstance(missing.error, NotFound)
    make_calls(runtime)
    exported = export_json(home, log_path)
    records = [r for r in read_records(log_path) if r["seq"] <= exported["last_seq"]]
    expected = sorted(Counter(r["decision"] for r in records).items())

    for principal in ("data_steward", "admin"):
        outcome = call(
            runtime, principal, "query", {"sql": f"SELECT decision, count(*) FROM {AUDIT_TABLE} GROUP BY 1 ORDER BY 1"}
        )
        assert outcome.error is None, outcome.error
        result = json.loads(outcome.payload)
        assert [tuple(row) for row in result["rows"]] == expected
        assert result["snapshots"] == {AUDIT_TABLE: str(exported["snapshot_id"])}
        assert outcome.record is not None and outcome.record["decision"] == "allow"

    # JSON columns and the time column work in SQL as reviewers write it.
    outcome = call(
        runtime,
        "data_steward",
        "query",
        {
            "sql": f"SELECT principal, count(*) AS calls, max(time) <= now() AS past FROM {AUDIT_TABLE} "
            "WHERE json_contains(roles, '\"role:analyst\"') AND decision <> 'allow' GROUP BY 1"
        },
    )
    assert outcome.error is None, outcome.error
    analyst_not_allowed = sum(1 for r in records if "role:analyst" in r["roles"] and r["decision"] != "allow")
    assert json.loads(outcome.payload)["rows"] == [["analyst", analyst_not_allowed, True]]

    listed = json.loads(call(runtime, "data_steward", "list_datasets", {"namespace": "audit"}).payload)
    assert [d["name"] for d in listed["datasets"]] == [AUDIT_TABLE]
    assert listed["datasets"][0]["row_count"] == len(records)
    assert listed["datasets"][0]["owner"] == "governance@lakegate.example"
    described = json.loads(call(runtime, "data_steward", "describe_dataset", {"name": AUDIT_TABLE}).payload)
    assert [c["name"] for c in described["columns"]] == [f.name for f in audit_schema().fields]
    assert all(c["access"] == "clear" and c["description"] for c in described["columns"])
    assert described["row_count"] == len(records)


@pytest.mark.parametrize("principal", ["analyst", "support_agent", "kate", "mallory"])
def test_every_other_role_is_denied_the_exported_log(
    runtime: Runtime, home: Path, log_path: Path, principal: str
) -> None:
    make_calls(runtime)
    export_json(home, log_path)
    outcome = call(runtime, principal, "query", {"sql": f"SELECT decision, count(*) FROM {AUDIT_TABLE} GROUP BY 1"})
    assert outcome.payload == "" and outcome.record is not None
    if principal == "mallory":  # no role at all: not even the query tool
        assert isinstance(outcome.error, PolicyDenied)
    else:
        assert isinstance(outcome.error, NotFound)
        assert f"No dataset named '{AUDIT_TABLE}' is available to you." in str(outcome.error)
        # Told it does not exist, so as not to learn that it does; the record says the policy refused it.
        assert (outcome.record["decision"], outcome.record["outcome"]) == ("deny", "denied")
        listed = call(runtime, principal, "list_datasets", {})
        assert listed.error is None and AUDIT_TABLE not in listed.payload


def test_nobody_appends_to_or_restores_the_exported_log_through_lakegate(
    runtime: Runtime, home: Path, log_path: Path
) -> None:
    make_calls(runtime)
    exported = export_json(home, log_path)
    forged = {"seq": 1, "time": "2025-01-01T00:00:00Z", "prev_hash": "0" * 64, "hash": "f" * 64}
    append = call(runtime, "admin", "append_rows", {"table": AUDIT_TABLE, "rows": [forged]})
    assert isinstance(append.error, PolicyDenied) and "may not write" in str(append.error)
    restore = call(
        runtime, "data_steward", "restore_table", {"table": AUDIT_TABLE, "snapshot_id": exported["snapshot_id"]}
    )
    assert isinstance(restore.error, PolicyDenied) and "may not restore" in str(restore.error)
    assert len(table_state(home)[1]) == 1
