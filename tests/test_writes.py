"""Governed writes with the real engines: pyiceberg on SQLite, Casbin with the demo policy, the gate,
and the MCP client over stdio. Every test writes into its own small warehouse, never the shared demo."""

from __future__ import annotations

import multiprocessing
import queue
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import anyio
import pyarrow as pa
import pytest
from pyiceberg.schema import Schema
from pyiceberg.types import (
    BooleanType,
    DateType,
    DecimalType,
    IntegerType,
    LongType,
    NestedField,
    StringType,
    TimestamptzType,
)

from lakegate.catalog.iceberg_writes import PreparedAppend, commit_append, prepare_append
from lakegate.catalog.warehouse import Warehouse
from lakegate.errors import LimitExceeded
from lakegate.evals.mcp_client import connect, text_of
from lakegate.server.app import Runtime, open_runtime
from lakegate.server.audit.log import read_records, verify
from lakegate.server.audit.record_model import audit_record
from lakegate.server.gate.gate import GateOutcome
from lakegate.server.gate.identity import CallOrigin, stdio_principal
from lakegate.server.settings import load_settings

REPO = Path(__file__).resolve().parents[1]
TICKETS = "support.tickets"
LEDGER = "ops.ledger"
EVENTS = "ops.events"
#: pyiceberg's own commit retries off, so that every lost race reaches lakegate's retry loop.
NO_PYICEBERG_RETRIES = {"commit.retry.num-retries": "0"}


def _tickets_schema() -> Schema:
    # The demo's support.tickets layout, so that the demo policy's rules apply to it.
    return Schema(
        NestedField(1, "ticket_id", LongType(), required=True),
        NestedField(2, "customer_id", LongType(), required=True),
        NestedField(3, "opened_ts", TimestamptzType(), required=True),
        NestedField(4, "closed_ts", TimestamptzType(), required=False),
        NestedField(5, "priority", StringType(), required=True),
        NestedField(6, "status", StringType(), required=True),
        NestedField(7, "subject", StringType(), required=True),
        NestedField(8, "body", StringType(), required=True),
    )


def _ledger_schema() -> Schema:
    return Schema(
        NestedField(1, "entry_id", LongType(), required=True),
        NestedField(2, "quantity", IntegerType(), required=True),
        NestedField(3, "amount", DecimalType(8, 2), required=True),
        NestedField(4, "booked_on", DateType(), required=False),
        NestedField(5, "booked_ts", TimestamptzType(), required=False),
        NestedField(6, "settled", BooleanType(), required=False),
        NestedField(7, "memo", StringType(), required=False),
    )


def _events_schema() -> Schema:
    return Schema(
        NestedField(1, "event_id", LongType(), required=True), NestedField(2, "writer", IntegerType(), required=True)
    )


def ticket(ticket_id: int, **overrides: Any) -> dict[str, Any]:
    row = {
        "ticket_id": ticket_id,
        "customer_id": 7,
        "opened_ts": "2025-03-01T09:30:00+01:00",
        "priority": "normal",
        "status": "open",
        "subject": "Where is my parcel?",
        "body": "Ordered last week, nothing yet.",
    }
    return row | overrides


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return build_write_home(tmp_path / "home")


def build_write_home(state: Path) -> Path:
    """A state directory with three small Iceberg tables; support.tickets holds one seeded ticket."""
    warehouse = Warehouse(state)
    catalog = warehouse.iceberg
    catalog.create_namespace("support")
    catalog.create_namespace("ops")
    tickets = catalog.create_table(TICKETS, _tickets_schema())
    catalog.create_table(LEDGER, _ledger_schema())
    catalog.create_table(EVENTS, _events_schema(), properties=NO_PYICEBERG_RETRIES)
    seed = {**ticket(1), "opened_ts": datetime(2025, 1, 1, tzinfo=UTC)}
    tickets.append(pa.Table.from_pylist([seed], schema=_tickets_schema().as_arrow()))
    warehouse.close()
    return state


@pytest.fixture
def runtime(home: Path, tmp_path: Path) -> Iterator[Runtime]:
    settings = load_settings(REPO, home=home, audit={"path": tmp_path / "audit.jsonl", "fsync": False}, principal=None)
    opened = open_runtime(settings)
    yield opened
    opened.close()


def call(runtime: Runtime, principal: str, tool: str, arguments: dict[str, Any]) -> GateOutcome:
    who = stdio_principal(principal, runtime.enforcer)
    return anyio.run(runtime.gate.call, tool, arguments, who, CallOrigin(transport="in-process", session_id="t"))


def snapshots(home: Path, name: str) -> tuple[int | None, int]:
    """(current snapshot id, number of snapshots) read straight from the catalog."""
    warehouse = Warehouse(home)
    try:
        metadata = warehouse.iceberg_table(name).metadata
        return metadata.current_snapshot_id, len(metadata.snapshots)
    finally:
        warehouse.close()


def read_rows(home: Path, name: str) -> list[dict[str, Any]]:
    warehouse = Warehouse(home)
    try:
        rows: list[dict[str, Any]] = warehouse.iceberg_table(name).scan().to_arrow().to_pylist()
        return rows
    finally:
        warehouse.close()


# --- append_rows ---------------------------------------------------------------------------------


def test_append_writes_one_snapshot_readable_afterwards_and_audited(runtime: Runtime, home: Path) -> None:
    before, _ = snapshots(home, TICKETS)
    outcome = call(runtime, "support_agent", "append_rows", {"table": TICKETS, "rows": [ticket(2), ticket(3)]})
    assert outcome.error is None, outcome.error
    result = outcome.result.model_dump() if outcome.result else {}
    assert result["rows"] == 2 and result["previous_snapshot_id"] == before
    assert result["snapshot_id"] != before and snapshots(home, TICKETS) == (result["snapshot_id"], 2)
    assert "Appended 2 row(s) to support.tickets" in outcome.text

    rows = {row["ticket_id"]: row for row in read_rows(home, TICKETS)}
    assert set(rows) == {1, 2, 3}
    assert rows[2]["opened_ts"] == datetime(2025, 3, 1, 8, 30, tzinfo=UTC)  # +01:00 stored as UTC
    assert rows[2]["closed_ts"] is None

    record = outcome.record or {}
    assert record["decision"] == "allow" and record["rows"] == 2
    assert {"type": "dataset", "name": TICKETS, "access": "write", "version": result["snapshot_id"]} in record[
        "resources"
    ]
    details = record["details"]
    assert (details["snapshot_before"], details["snapshot_after"], details["rows"]) == (
        before,
        result["snapshot_id"],
        2,
    )
    assert details["commit_attempts"] == 1


def test_types_are_converted_exactly(runtime: Runtime, home: Path) -> None:
    rows = [
        {
            "entry_id": 1,
            "quantity": 3,
            "amount": "12.30",
            "booked_on": "2025-02-28",
            "booked_ts": "2025-02-28T23:59:59Z",
        },
        {"entry_id": 2, "quantity": 2.0, "amount": 0.1, "settled": True, "memo": None},
        {"entry_id": 3, "quantity": -5, "amount": -999999.99},
    ]
    outcome = call(runtime, "admin", "append_rows", {"table": LEDGER, "rows": rows})
    assert outcome.error is None, outcome.error
    stored = sorted(read_rows(home, LEDGER), key=lambda row: row["entry_id"])
    assert [row["amount"] for row in stored] == [Decimal("12.30"), Decimal("0.10"), Decimal("-999999.99")]
    assert stored[0]["booked_on"] == date(2025, 2, 28)
    assert stored[0]["booked_ts"] == datetime(2025, 2, 28, 23, 59, 59, tzinfo=UTC)
    assert [row["quantity"] for row in stored] == [3, 2, -5] and stored[1]["settled"] is True


def test_an_invalid_batch_is_rejected_whole_with_an_error_per_row(runtime: Runtime, home: Path) -> None:
    rows: list[dict[str, Any]] = [
        {"entry_id": 1, "quantity": 1, "amount": "1.00"},  # valid, and still not written
        {"entry_id": 2, "quantity": 1, "amount": "1.234"},  # too many decimal places
        {"entry_id": 3, "quantity": 2**31, "amount": "1000000.00"},  # int out of range; too many digits
        {"entry_id": 4, "quantity": 1, "amount": 1, "booked_on": "31/01/2025"},  # not an ISO date
        {"entry_id": 5, "quantity": 1, "amount": 1, "booked_ts": "2025-01-31T10:00:00"},  # no UTC offset
        {"entry_id": 6, "amount": 1},  # required quantity missing
        {"entry_id": 7, "quantity": 1, "amount": 1, "colour": "red"},  # no such column
        {"entry_id": "8", "quantity": True, "amount": 1, "settled": "yes", "memo": 5},  # wrong JSON types
    ]
    before = snapshots(home, LEDGER)
    outcome = call(runtime, "admin", "append_rows", {"table": LEDGER, "rows": rows})
    assert outcome.error is not None and outcome.error.outcome == "invalid"
    message = str(outcome.error)
    assert message.startswith("Nothing was written to ops.ledger: 11 problem(s)")
    for fragment in (
        "rows[1].amount: '1.234' has more than 2 decimal place(s)",
        "rows[2].quantity: 2147483648 is out of range for int; send a whole number from -2147483648 to 2147483647",
        "rows[2].amount: '1000000.00' has too many digits for decimal(8, 2)",
        "rows[3].booked_on: '31/01/2025' is not an ISO date; send 'YYYY-MM-DD'",
        "rows[4].booked_ts: '2025-01-31T10:00:00' is not an ISO 8601 timestamp with a UTC offset",
        "rows[5].quantity: missing a value for a required column",
        "rows[6].colour: no such column; use only these columns: entry_id, quantity, amount",
        "rows[7].entry_id: '8' is not an integer",
        "rows[7].quantity: True is not an integer",
        "rows[7].settled: 'yes' is not a boolean",
        "rows[7].memo: 5 is not a string",
    ):
        assert fragment in message, fragment
    assert "rows[0]" not in message
    assert snapshots(home, LEDGER) == before and read_rows(home, LEDGER) == []
    assert outcome.record is not None and outcome.record["rows"] == 0 and "details" not in outcome.record


def test_a_column_the_writer_may_not_set_rejects_the_batch_naming_it(runtime: Runtime, home: Path) -> None:
    before = snapshots(home, TICKETS)
    rows = [ticket(2), ticket(3, status="closed", closed_ts="2025-03-02T10:00:00Z")]
    outcome = call(runtime, "support_agent", "append_rows", {"table": TICKETS, "rows": rows})
    assert outcome.error is not None and outcome.error.outcome == "denied"
    message = str(outcome.error)
    assert "may not set column(s) closed_ts of support.tickets" in message and "Nothing was written" in message
    assert "support.tickets.closed_ts, write, deny" in message
    assert snapshots(home, TICKETS) == before
    record = outcome.record or {}
    assert record["decision"] == "deny"
    assert {"type": "column", "name": "support.tickets.closed_ts", "access": "denied", "version": None} in record[
        "resources"
    ]
    # Sending the column as null sets nothing, so it is allowed; admin may set it.
    nulled = call(runtime, "support_agent", "append_rows", {"table": TICKETS, "rows": [ticket(2, closed_ts=None)]})
    assert nulled.error is None, nulled.error
    assert call(runtime, "admin", "append_rows", {"table": TICKETS, "rows": rows[1:]}).error is None


@pytest.mark.parametrize(
    ("principal", "table", "outcome", "text"),
    [
        ("analyst", TICKETS, "denied", "may not call append_rows"),  # no tool rule
        ("data_steward", TICKETS, "denied", "may not call append_rows"),  # restores, does not append
        ("support_agent", "sales.orders", "denied", "may not write dataset 'sales.orders'"),  # reads, not writes
        ("support_agent", "finance.refunds", "not_found", "No dataset named 'finance.refunds'"),  # hidden
        ("support_agent", LEDGER, "not_found", "No dataset named 'ops.ledger'"),
    ],
)
def test_non_writers_are_denied_before_storage_is_touched(
    runtime: Runtime, principal: str, table: str, outcome: str, text: str
) -> None:
    result = call(runtime, principal, "append_rows", {"table": table, "rows": [ticket(9)]})
    assert result.error is not None and result.error.outcome == outcome
    assert text in str(result.error)


def test_more_rows_than_the_setting_allows_is_a_limit_error(home: Path, tmp_path: Path) -> None:
    settings = load_settings(
        REPO, home=home, audit={"path": tmp_path / "a.jsonl", "fsync": False}, writes={"max_rows": 2}
    )
    opened = open_runtime(settings)
    try:
        outcome = call(opened, "admin", "append_rows", {"table": TICKETS, "rows": [ticket(i) for i in range(2, 5)]})
    finally:
        opened.close()
    assert outcome.error is not None and outcome.error.outcome == "limit_exceeded"
    assert "at most 2 rows per call; this call sent 3" in str(outcome.error)
    assert snapshots(home, TICKETS)[1] == 1


# --- lakegate's own commit retries --------------------------------------------------------------


class RacingWarehouse(Warehouse):
    """Each load hands back a table that another writer commits to right afterwards: a real lost race."""

    def __init__(self, state_dir: Path, races: int) -> None:
        super().__init__(state_dir)
        self.races = races
        self._rival_id = 10_000

    def iceberg_table(self, name: str) -> Any:
        table = super().iceberg_table(name)
        if self.races > 0:
            self.races -= 1
            self._rival_id += 1
            rival = Warehouse(self.state_dir)
            row = {"event_id": self._rival_id, "writer": 99}
            rival.iceberg_table(name).append(pa.Table.from_pylist([row], schema=_events_schema().as_arrow()))
            rival.close()
        return table


def _prepared(home: Path, ids: range) -> PreparedAppend:
    warehouse = Warehouse(home)
    try:
        return prepare_append(warehouse, EVENTS, [{"event_id": i, "writer": 1} for i in ids])
    finally:
        warehouse.close()


def test_a_lost_race_is_retried_with_the_same_rows(home: Path) -> None:
    warehouse = RacingWarehouse(home, races=2)
    outcome = commit_append(warehouse, _prepared(home, range(3)), attempts=3, sleep=lambda _: None)
    warehouse.close()
    assert outcome.attempts == 3 and outcome.rows == 3
    ids = sorted(row["event_id"] for row in read_rows(home, EVENTS))
    assert ids == [0, 1, 2, 10_001, 10_002]  # ours once, both rivals once
    current, count = snapshots(home, EVENTS)
    assert current == outcome.snapshot_id and count == 3


def test_giving_up_says_so_and_writes_nothing(home: Path) -> None:
    warehouse = RacingWarehouse(home, races=10)
    with pytest.raises(LimitExceeded, match="other writers committed first on all 2 attempts"):
        commit_append(warehouse, _prepared(home, range(3)), attempts=2, sleep=lambda _: None)
    warehouse.close()
    assert sorted(row["event_id"] for row in read_rows(home, EVENTS)) == [10_001, 10_002, 10_003]


# --- restore_table -------------------------------------------------------------------------------


def test_restore_moves_the_current_snapshot_back_and_is_audited(runtime: Runtime, home: Path) -> None:
    seeded, _ = snapshots(home, TICKETS)
    appended = call(runtime, "admin", "append_rows", {"table": TICKETS, "rows": [ticket(2)]})
    assert appended.result is not None
    after_append = appended.result.model_dump()["snapshot_id"]

    outcome = call(runtime, "data_steward", "restore_table", {"table": TICKETS, "snapshot_id": seeded})
    assert outcome.error is None, outcome.error
    assert snapshots(home, TICKETS) == (seeded, 2)  # the undone snapshot stays in the history
    assert [row["ticket_id"] for row in read_rows(home, TICKETS)] == [1]
    assert f"Restored support.tickets to snapshot {seeded} (was {after_append})" in outcome.text
    record = outcome.record or {}
    assert record["details"] == {
        "operation": "restore",
        "table": TICKETS,
        "snapshot_before": after_append,
        "snapshot_after": seeded,
        "changed": True,
    }
    assert {"type": "dataset", "name": TICKETS, "access": "restore", "version": seeded} in record["resources"]

    # Restoring forward undoes the restore; restoring the current snapshot changes nothing.
    forward = call(runtime, "data_steward", "restore_table", {"table": TICKETS, "snapshot_id": after_append})
    assert forward.error is None and snapshots(home, TICKETS)[0] == after_append
    again = call(runtime, "data_steward", "restore_table", {"table": TICKETS, "snapshot_id": after_append})
    assert again.result is not None and again.result.model_dump()["changed"] is False


def test_restore_to_a_foreign_snapshot_is_not_found_and_non_stewards_are_denied(runtime: Runtime, home: Path) -> None:
    seeded, _ = snapshots(home, TICKETS)
    unknown = call(runtime, "admin", "restore_table", {"table": TICKETS, "snapshot_id": 12345})
    assert unknown.error is not None and unknown.error.outcome == "not_found"
    assert f"Table support.tickets has no snapshot 12345 (its most recent snapshots: {seeded})" in str(unknown.error)
    denied = call(runtime, "support_agent", "restore_table", {"table": TICKETS, "snapshot_id": seeded})
    assert denied.error is not None and "may not call restore_table" in str(denied.error)
    missing = call(runtime, "data_steward", "restore_table", {"table": "ops.nothing", "snapshot_id": seeded})
    assert missing.error is not None and missing.error.outcome == "not_found"
    assert snapshots(home, TICKETS) == (seeded, 1)


# --- over stdio, as an agent would ---------------------------------------------------------------


def test_append_denial_and_restore_over_stdio(home: Path, tmp_path: Path) -> None:
    audit = tmp_path / "stdio-audit.jsonl"
    seeded, _ = snapshots(home, TICKETS)

    async def scenario() -> tuple[set[str], Any, Any, set[str], Any]:
        async with connect("support_agent", home, LAKEGATE_AUDIT__PATH=str(audit)) as client:
            tools = {tool.name: tool for tool in (await client.list_tools()).tools}
            appended = await client.call_tool("append_rows", {"table": TICKETS, "rows": [ticket(2)]})
            denied = await client.call_tool(
                "append_rows", {"table": TICKETS, "rows": [ticket(3, closed_ts="2025-03-02T10:00:00Z")]}
            )
            annotations = tools["append_rows"].annotations
            assert annotations is not None and annotations.read_only_hint is False
        async with connect("data_steward", home, LAKEGATE_AUDIT__PATH=str(audit)) as client:
            steward_tools = {tool.name for tool in (await client.list_tools()).tools}
            restored = await client.call_tool("restore_table", {"table": TICKETS, "snapshot_id": seeded})
        return set(tools), appended, denied, steward_tools, restored

    tools, appended, denied, steward_tools, restored = anyio.run(scenario)
    assert "append_rows" in tools and "restore_table" not in tools
    assert "restore_table" in steward_tools and "append_rows" not in steward_tools
    assert not appended.is_error, text_of(appended)
    # Over the wire, 64-bit snapshot ids are strings (JavaScript clients would round a number).
    new_snapshot = int(appended.structured_content["snapshot_id"])
    assert appended.structured_content["previous_snapshot_id"] == str(seeded)
    assert denied.is_error and "closed_ts" in text_of(denied) and denied.structured_content is None
    assert not restored.is_error, text_of(restored)
    assert restored.structured_content == {
        "table": TICKETS,
        "status": "applied",
        "snapshot_id": str(seeded),
        "previous_snapshot_id": str(new_snapshot),
        "changed": True,
        "change_id": None,
    }
    assert [row["ticket_id"] for row in read_rows(home, TICKETS)] == [1]

    records = list(read_records(audit))
    listings = [(r["principal"], r["rows"]) for r in records if audit_record(r).is_listing]
    assert listings == [("support_agent", len(tools)), ("data_steward", len(steward_tools))]
    calls = [r for r in records if not audit_record(r).is_listing]
    assert [(r["principal"], r["tool"], r["outcome"]) for r in calls] == [
        ("support_agent", "append_rows", "ok"),
        ("support_agent", "append_rows", "denied"),
        ("data_steward", "restore_table", "ok"),
    ]
    assert calls[0]["details"]["snapshot_after"] == new_snapshot
    assert calls[2]["details"]["snapshot_before"] == new_snapshot
    assert calls[2]["details"]["snapshot_after"] == seeded
    assert verify(audit).ok


# --- four writer processes -----------------------------------------------------------------------

WRITERS = 4
CALLS_PER_WRITER = 8
ROWS_PER_CALL = 3


@dataclass(frozen=True)
class WriterReport:
    writer: int
    acknowledged: list[int]
    failed: list[str]
    attempts: list[int]
    seconds: float


def _writer(writer: int, home: str, audit: str, start: Any, results: Any) -> None:
    """One process appending through the gate, as a separate lakegate server would."""
    settings = load_settings(REPO, home=Path(home), audit={"path": Path(audit), "fsync": False}, principal=None)
    runtime = open_runtime(settings)
    acknowledged: list[int] = []
    failed: list[str] = []
    attempts: list[int] = []
    started = time.perf_counter()
    try:
        start.wait(timeout=60)
        started = time.perf_counter()
        for number in range(CALLS_PER_WRITER):
            ids = [writer * 10_000 + number * 100 + j for j in range(ROWS_PER_CALL)]
            rows = [{"event_id": i, "writer": writer} for i in ids]
            outcome = call(runtime, "admin", "append_rows", {"table": EVENTS, "rows": rows})
            if outcome.error is None and outcome.record is not None:
                acknowledged.extend(ids)
                attempts.append(int(outcome.record["details"]["commit_attempts"]))
            else:
                failed.append(str(outcome.error))
    finally:
        runtime.close()
        results.put(WriterReport(writer, acknowledged, failed, attempts, time.perf_counter() - started))


def test_four_writer_processes_lose_no_row_and_duplicate_none(home: Path, tmp_path: Path) -> None:
    context = multiprocessing.get_context("spawn")
    start = context.Barrier(WRITERS)
    results = context.Queue()
    processes = [
        context.Process(target=_writer, args=(n, str(home), str(tmp_path / f"audit-{n}.jsonl"), start, results))
        for n in range(WRITERS)
    ]
    for process in processes:
        process.start()
    reports: list[WriterReport] = []
    try:
        for _ in processes:
            reports.append(results.get(timeout=120))
    except queue.Empty:
        pytest.fail(f"only {len(reports)} of {WRITERS} writers reported")
    finally:
        for process in processes:
            process.join(timeout=30)
            if process.is_alive():
                process.kill()

    acknowledged = [i for report in reports for i in report.acknowledged]
    stored = [row["event_id"] for row in read_rows(home, EVENTS)]
    assert all(not report.failed for report in reports), [report.failed for report in reports]
    assert len(acknowledged) == WRITERS * CALLS_PER_WRITER * ROWS_PER_CALL
    assert sorted(stored) == sorted(acknowledged)  # every acknowledged row once, nothing else
    current, count = snapshots(home, EVENTS)
    assert count == WRITERS * CALLS_PER_WRITER
    attempts = [a for report in reports for a in report.attempts]
    print(
        f"{len(attempts)} calls, {len(acknowledged)} rows acknowledged, {len(stored)} stored;"
        f" commit attempts per call: max {max(attempts)}, {sum(a > 1 for a in attempts)} calls retried,"
        f" {sum(attempts) - len(attempts)} retries; slowest writer {max(r.seconds for r in reports):.1f} s"
    )


def test_a_cancelled_append_still_finishes_and_is_audited_as_what_happened(runtime: Runtime, home: Path) -> None:
    """A write is never abandoned half-way: the cancel waits for it, and the record says it committed."""
    before, _ = snapshots(home, TICKETS)
    who = stdio_principal("support_agent", runtime.enforcer)

    async def cancelled_call() -> bool:
        with anyio.move_on_after(0.01) as scope:
            await runtime.gate.call(
                "append_rows",
                # 20 rows: the most the demo lets support_agent append without approval
                {"table": TICKETS, "rows": [ticket(i) for i in range(10, 30)]},
                who,
                CallOrigin(transport="in-process", session_id="t"),
            )
        return scope.cancelled_caught or scope.cancel_called

    assert anyio.run(cancelled_call)
    after, _ = snapshots(home, TICKETS)
    (record,) = read_records(runtime.audit.path)
    assert record["outcome"] == "ok" and record["details"]["snapshot_after"] == after != before
    assert record["rows"] == 20
