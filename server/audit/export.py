"""The verified audit log as an append-only Iceberg table (``lakegate audit export``).

Each export verifies the whole hash chain first and exports nothing from a log that does not
verify. It then appends the records the table does not hold yet as ONE snapshot, so an export is
atomic and exporting again without new records adds nothing (no snapshot).

Where the table ends is read from the table itself, never from a side file: the current snapshot's
summary carries the last exported ``seq`` and ``hash`` (written in the same commit as the rows, so
a crash can leave neither duplicates nor gaps), and a snapshot without them (another engine wrote
it) makes the exporter read ``max(seq)`` from the data. Before appending, the log's record at that
seq must have that hash: a log that does not continue the table (replaced, cut off at the end,
rewritten and re-chained) is refused, which makes the table an anchor for the log's tail too.

Two exports at once cannot both append the same records: pyiceberg's own commit retry (which
would re-apply the append on top of the winner's) is off for this table, so the loser's commit
fails, and it starts again from the table as it is now, finding nothing or only what is new.

Columns hold the record's fields; lists and objects (roles, rules, resources, arguments, details)
are JSON text, since lakegate's SQL path reads primitive columns only. Fields without a column of
their own land in ``extra`` (JSON text), so nothing the log holds is dropped: the ``count`` of a
grouped refusal record (`lakegate.server.audit.refusals.RefusalLog`; the requests it stands for, one when absent)
is there, as are fields a later gate version adds. A column of its own would need the column's
description in the catalog definitions (``catalog/datasets.yaml``) and existing tables to gain it.

The table is not partitioned: pyiceberg streams Arrow batches (memory bounded however many records
a first export finds) into unpartitioned tables only, and lakegate's SQL path plans every file of
a table anyway; DuckDB still skips row groups by their ``time`` and ``seq`` statistics.
"""

from __future__ import annotations

import dataclasses
import random
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lakegate.catalog.definitions import CatalogDefinitions
from lakegate.catalog.warehouse import Warehouse, translate_errors
from lakegate.errors import BackendError, ConfigurationError, ServerError
from lakegate.server.audit.log import GENESIS_HASH, VerifyReport, canonical_json, read_all_records, record_hash, verify

if TYPE_CHECKING:
    import pyarrow as pa
    from pyiceberg.schema import Schema
    from pyiceberg.table import Table as IcebergTable
    from pyiceberg.table.snapshots import Snapshot

__all__ = [
    "AUDIT_TABLE",
    "LAST_HASH_PROPERTY",
    "LAST_SEQ_PROPERTY",
    "AuditExportRefused",
    "ExportProgress",
    "ExportResult",
    "audit_schema",
    "describe_result",
    "export_audit_log",
    "record_row",
]

AUDIT_TABLE = "audit.records"
#: Snapshot summary properties: the last record the table holds after that snapshot.
LAST_SEQ_PROPERTY = "lakegate.audit.last-seq"
LAST_HASH_PROPERTY = "lakegate.audit.last-hash"
#: Snapshot summary property naming the export run that made it: a commit whose answer was lost
#: (a busy catalog) is recognised as this run's own on the next attempt.
EXPORT_ID_PROPERTY = "lakegate.audit.export-id"
#: Records per Arrow batch streamed to pyiceberg (bounds memory on a large first export).
BATCH_RECORDS = 10_000
COMMIT_ATTEMPTS = 5
#: Problems of a failed verification spelled out in the refusal; the rest are counted.
SHOWN_PROBLEMS = 3

#: progress(step, done, total): "verify" (0 then 1 of 1), then "export" after each batch of records.
ExportProgress = Callable[[str, int, int], None]

# Record fields that become columns of their own (under the same name, except the client's).
_TEXT_FIELDS = (
    "principal",
    "tool",
    "decision",
    "outcome",
    "error",
    "policy_version",
    "request_id",
    "session_id",
    "transport",
    "authenticated_by",
)
_JSON_FIELDS = ("roles", "rules", "resources", "arguments", "details")
_INT_FIELDS = ("rows", "bytes")
_KNOWN_FIELDS = frozenset(
    {"seq", "time", "hash", "prev_hash", "duration_ms", "client", *_TEXT_FIELDS, *_JSON_FIELDS, *_INT_FIELDS}
)


class AuditExportRefused(ServerError):
    """Nothing was exported: the log does not verify, or does not continue what the table holds."""

    outcome = "audit_error"


@dataclass(frozen=True)
class ExportResult:
    """What one export did. ``snapshot_id`` is None when there was nothing new to export."""

    table: str
    exported: int
    first_seq: int | None  # first seq exported by this run
    last_seq: int  # last seq the table holds now (0: none)
    snapshot_id: int | None
    previous_snapshot_id: int | None
    table_records: int
    created: bool  # this run created the table

    def as_dict(self) -> dict[str, Any]:
        """The result as JSON-ready values."""
        return dataclasses.asdict(self)


def audit_schema(definitions: CatalogDefinitions | None = None, table: str = AUDIT_TABLE) -> Schema:
    """The Iceberg schema of the exported log, with column docs from the catalog definitions."""
    from pyiceberg.schema import Schema
    from pyiceberg.types import DoubleType, LongType, NestedField, PrimitiveType, StringType, TimestamptzType

    columns: list[tuple[str, PrimitiveType, bool]] = [
        ("seq", LongType(), True),
        ("time", TimestamptzType(), True),
        ("principal", StringType(), False),
        ("roles", StringType(), False),
        ("tool", StringType(), False),
        ("decision", StringType(), False),
        ("outcome", StringType(), False),
        ("error", StringType(), False),
        ("rules", StringType(), False),
        ("resources", StringType(), False),
        ("arguments", StringType(), False),
        ("details", StringType(), False),
        ("rows", LongType(), False),
        ("bytes", LongType(), False),
        ("duration_ms", DoubleType(), False),
        ("policy_version", StringType(), False),
        ("request_id", StringType(), False),
        ("session_id", StringType(), False),
        ("transport", StringType(), False),
        ("client_name", StringType(), False),
        ("client_version", StringType(), False),
        ("authenticated_by", StringType(), False),
        ("extra", StringType(), False),
        ("prev_hash", StringType(), True),
        ("hash", StringType(), True),
    ]
    doc = definitions.dataset(table) if definitions is not None else None
    fields = []
    for field_id, (name, field_type, required) in enumerate(columns, start=1):
        column_doc = doc.column(name) if doc is not None else None
        fields.append(
            NestedField(
                field_id=field_id,
                name=name,
                field_type=field_type,
                required=required,
                doc=column_doc.description if column_doc is not None else None,
            )
        )
    return Schema(*fields)


# --- reading the log ----------------------------------------------------------------------------


def _refusal_for(path: Path, report: VerifyReport) -> AuditExportRefused:
    shown = "; ".join(f"{p.kind}: {p.message}" for p in report.problems[:SHOWN_PROBLEMS])
    more = len(report.problems) - SHOWN_PROBLEMS
    extra = f"; and {more} more problem(s)" if more > 0 else ""
    return AuditExportRefused(
        f"audit log {path} does not verify ({shown}{extra}); nothing was exported. "
        "Run `lakegate audit verify` for every problem, and export once the log is repaired or explained."
    )


# --- the table ------------------------------------------------------------------------------------


def _table_properties(definitions: CatalogDefinitions | None, table: str) -> dict[str, str]:
    from pyiceberg.table import TableProperties

    # pyiceberg would otherwise retry a lost commit by re-applying the append on top of the
    # winner's snapshot: two concurrent exports would then both land the same records.
    properties = {"lakegate.generated-by": "lakegate audit export", TableProperties.COMMIT_NUM_RETRIES: "0"}
    doc = definitions.dataset(table) if definitions is not None else None
    if doc is not None:
        properties |= {"comment": doc.description, "owner": doc.owner, "tags": ",".join(doc.tags)}
    return properties


def _open_table(warehouse: Warehouse, table: str, definitions: CatalogDefinitions | None) -> tuple[IcebergTable, bool]:
    """The audit table, created (empty, no snapshot) when it does not exist yet; (table, created).

    Raises:
        ConfigurationError: an existing table lacks columns the export writes.
        BackendError: the catalog failed.
    """
    from pyiceberg.exceptions import TableAlreadyExistsError
    from pyiceberg.table import TableProperties

    catalog = warehouse.iceberg
    schema = audit_schema(definitions, table)
    created = False
    with translate_errors(f"open the audit table {table}", table):
        if not catalog.table_exists(table):
            namespace = table.split(".")[0]
            try:
                catalog.create_namespace_if_not_exists(namespace)
            except Exception:
                # The SQL catalog reports a namespace created meanwhile as an IntegrityError.
                if not catalog.namespace_exists(namespace):
                    raise
            try:
                catalog.create_table(table, schema=schema, properties=_table_properties(definitions, table))
                created = True
            except TableAlreadyExistsError:
                pass  # another export created it meanwhile
        loaded = catalog.load_table(table)
        if loaded.properties.get(TableProperties.COMMIT_NUM_RETRIES) != "0":
            # A table made by something else: switch the rebasing retry off (a metadata change, no snapshot).
            with loaded.transaction() as transaction:
                transaction.set_properties({TableProperties.COMMIT_NUM_RETRIES: "0"})
            loaded = catalog.load_table(table)
    missing = [field.name for field in schema.fields if field.name not in {f.name for f in loaded.schema().fields}]
    if missing:
        raise ConfigurationError(
            f"table {table} exists but lacks the audit column(s) {', '.join(missing)}; export to another "
            "table with --table, or drop it"
        )
    return loaded, created


def _exported_tail(table: IcebergTable) -> tuple[int, str]:
    """(seq, hash) of the last record the table holds; (0, GENESIS_HASH) when it holds none."""
    snapshot = table.current_snapshot()
    if snapshot is None:
        return 0, GENESIS_HASH
    summary = snapshot.summary
    seq = summary[LAST_SEQ_PROPERTY] if summary is not None else None
    digest = summary[LAST_HASH_PROPERTY] if summary is not None else None
    if seq is not None and digest is not None:
        return int(seq), digest
    # A snapshot another engine made: read the tail from the data itself.
    import pyarrow.compute as pc

    data = table.scan(selected_fields=("seq", "hash"), snapshot_id=snapshot.snapshot_id).to_arrow()
    if data.num_rows == 0:
        return 0, GENESIS_HASH
    last = pc.max(data.column("seq")).as_py()
    match = data.filter(pc.equal(data.column("seq"), last))
    return int(last), str(match.column("hash")[0].as_py())


# --- records as rows ------------------------------------------------------------------------------


def _text(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    return canonical_json(value)


def _integer(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _time(record: Mapping[str, Any]) -> datetime:
    value = record.get("time")
    try:
        moment = datetime.fromisoformat(value) if isinstance(value, str) else None
    except ValueError:
        moment = None
    if moment is None:
        raise AuditExportRefused(
            f"audit record seq {record.get('seq')} has no valid ISO 8601 time ({value!r}); nothing was exported"
        )
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def record_row(record: Mapping[str, Any]) -> dict[str, Any]:
    """One audit record as a row of the audit table.

    Raises:
        AuditExportRefused: the record has no valid time.
    """
    client = record.get("client")
    client = client if isinstance(client, Mapping) else {}
    extra = {key: value for key, value in record.items() if key not in _KNOWN_FIELDS}
    if not isinstance(record.get("client"), Mapping | None):
        extra["client"] = record.get("client")
    row: dict[str, Any] = {
        "seq": record["seq"],
        "time": _time(record),
        "hash": record["hash"],
        "prev_hash": record["prev_hash"],
        "duration_ms": _number(record.get("duration_ms")),
        "client_name": _text(client.get("name")),
        "client_version": _text(client.get("version")),
        "extra": canonical_json(extra) if extra else None,
    }
    row |= {name: _text(record.get(name)) for name in _TEXT_FIELDS}
    row |= {name: canonical_json(record[name]) if name in record else None for name in _JSON_FIELDS}
    row |= {name: _integer(record.get(name)) for name in _INT_FIELDS}
    return row


def _new_records(path: Path, after: tuple[int, str], until: tuple[int, str]) -> Iterator[dict[str, Any]]:
    """The log's records with ``after[0] < seq <= until[0]``, checked as they are read.

    Verification ran over the file a moment ago; these checks tie what is exported to it (the
    file may have changed since) and to what the table already holds.

    Raises:
        AuditExportRefused: the log does not continue the table, or changed since it was verified.
    """
    last_seq, last_hash = after
    end_seq, end_hash = until
    previous: str | None = last_hash
    anchored = False
    for record in read_all_records(path):
        seq = record.get("seq")
        if not isinstance(seq, int) or seq < last_seq:
            continue
        if seq == last_seq:
            if record.get("hash") != last_hash:
                raise _not_continued(path, last_seq)
            anchored = True
            continue
        if not anchored:
            # The first record after the table's tail in a log whose older files retention pruned.
            if last_seq == 0:
                previous = None  # an empty table starts where the retained log starts
            elif seq > last_seq + 1:
                raise AuditExportRefused(
                    f"records seq {last_seq + 1}..{seq - 1} were pruned from audit log {path} before they were "
                    "exported; nothing was exported. Export into a new table with --table (it starts at the "
                    "oldest record kept), or keep more rotated files (LAKEGATE_AUDIT__KEEP_FILES)."
                )
            elif record.get("prev_hash") != last_hash:
                raise _not_continued(path, last_seq)
            anchored = True
        linked = previous is None or record.get("prev_hash") == previous
        if not linked or record_hash(record) != record.get("hash"):
            raise AuditExportRefused(
                f"audit log {path} changed at seq {seq} after it was verified; nothing was exported. "
                "Run `lakegate audit verify`."
            )
        previous = record["hash"]
        yield record
        if seq == end_seq:
            if previous != end_hash:
                raise AuditExportRefused(f"audit log {path} changed after it was verified; nothing was exported.")
            return
    raise AuditExportRefused(
        f"audit log {path} ended before seq {end_seq} it held when verified; nothing was exported."
    )


def _not_continued(path: Path, seq: int) -> AuditExportRefused:
    return AuditExportRefused(
        f"audit log {path} does not continue the exported table: the table's last record (seq {seq}) is not "
        "in the log with the same hash (the log was replaced, cut off or rewritten); nothing was exported. "
        "Export into a new table with --table, or find the log the table was exported from."
    )


def _batches(
    records: Iterator[dict[str, Any]], schema: pa.Schema, total: int, progress: ExportProgress | None
) -> Iterator[pa.RecordBatch]:
    """Rows in Arrow batches of `BATCH_RECORDS`."""
    import pyarrow as pa

    rows: list[dict[str, Any]] = []
    done = 0
    for record in records:
        rows.append(record_row(record))
        if len(rows) >= BATCH_RECORDS:
            yield pa.RecordBatch.from_pylist(rows, schema=schema)
            done += len(rows)
            rows = []
            if progress is not None:
                progress("export", done, total)
    if rows:
        yield pa.RecordBatch.from_pylist(rows, schema=schema)
        done += len(rows)
    if progress is not None:
        progress("export", done, total)


# --- the export -----------------------------------------------------------------------------------


def _retryable(exc: Exception) -> bool:
    """A commit that lost a race (nothing landed), or a catalog too busy to answer (outcome unknown)."""
    from pyiceberg.exceptions import CommitFailedException
    from sqlalchemy.exc import OperationalError

    if isinstance(exc, CommitFailedException):
        return True
    return isinstance(exc, OperationalError) and "locked" in str(exc).lower()


def export_audit_log(
    log_path: Path,
    warehouse: Warehouse,
    *,
    table: str = AUDIT_TABLE,
    definitions: CatalogDefinitions | None = None,
    progress: ExportProgress | None = None,
    attempts: int = COMMIT_ATTEMPTS,
) -> ExportResult:
    """Append the verified log's records that `table` does not hold yet, as one snapshot.

    `definitions` documents the table and its columns when this export creates it.

    Raises:
        AuditExportRefused: the log does not verify, does not continue the table, or changed while
            it was exported; nothing was exported.
        OSError: the log exists but cannot be read.
        ConfigurationError: `table` exists without the audit columns.
        BackendError: pyiceberg failed; or every commit lost a race (nothing was exported).
    """
    if progress is not None:
        progress("verify", 0, 1)
    report = verify(log_path)
    if progress is not None:
        progress("verify", 1, 1)
    if not report.ok:
        raise _refusal_for(log_path, report)
    end = (report.last_seq or 0, report.last_hash or GENESIS_HASH)
    iceberg, created = _open_table(warehouse, table, definitions)
    export_id = uuid.uuid4().hex
    last_error: Exception | None = None
    for attempt in range(1, attempts + 1):
        if attempt > 1:
            iceberg = warehouse.iceberg_table(table)
            if (landed := _landed(iceberg, export_id)) is not None:
                return _result(table, landed, created)
        with translate_errors(f"read the tail of {table}", table):
            tail = _exported_tail(iceberg)
        result = _up_to_date(log_path, table, iceberg, tail, end, created)
        if result is not None:
            return result
        try:
            _append(log_path, iceberg, tail, end, report.first_seq or 1, progress, export_id)
        except AuditExportRefused:
            raise
        except Exception as exc:
            if not _retryable(exc):
                with translate_errors(f"append the audit log to {table}", table):
                    raise
            # Lost a race with another export (or the catalog was busy): start again from the
            # table as it is now, which holds whatever the other export appended.
            last_error = exc
            time.sleep(random.uniform(0.01, min(0.5, 0.02 * 2**attempt)))
            continue
        # The append put the committed metadata on `iceberg`: its current snapshot is this one.
        landed = _landed(iceberg, export_id)
        if landed is None:
            raise BackendError(f"export to {table} committed, but its snapshot is not in the table's metadata")
        return _result(table, landed, created)
    raise BackendError(
        f"export to {table}: all {attempts} commits lost a race with other writers ({last_error!r}); nothing was "
        "exported. Run the export again."
    )


def _up_to_date(
    log_path: Path, table: str, iceberg: IcebergTable, tail: tuple[int, str], end: tuple[int, str], created: bool
) -> ExportResult | None:
    """The result of an export with nothing to do, or None when there are records to append.

    Raises:
        AuditExportRefused: the table holds records past the log's end, or another last record.
    """
    if tail[0] > end[0]:
        raise AuditExportRefused(
            f"table {table} holds records up to seq {tail[0]} but the audit log {log_path} ends at seq {end[0]}: "
            "the log was cut off or replaced; nothing was exported. Compare them with `lakegate audit verify "
            f"--expect-records {tail[0]} --expect-last-hash {tail[1]}`."
        )
    if tail[0] < end[0]:
        return None
    if tail[1] != end[1]:
        raise _not_continued(log_path, tail[0])
    return ExportResult(
        table=table,
        exported=0,
        first_seq=None,
        last_seq=tail[0],
        snapshot_id=None,
        previous_snapshot_id=iceberg.metadata.current_snapshot_id,
        table_records=_total_records(iceberg),
        created=created,
    )


def _append(
    log_path: Path,
    iceberg: IcebergTable,
    tail: tuple[int, str],
    end: tuple[int, str],
    first_kept: int,
    progress: ExportProgress | None,
    export_id: str,
) -> None:
    """Append the log's records after `tail` up to `end` to `iceberg` as one snapshot."""
    import pyarrow as pa

    schema = iceberg.schema().as_arrow()
    expected = end[0] - max(tail[0], first_kept - 1)
    batches = _batches(_new_records(log_path, tail, end), schema, expected, progress)
    # Streamed in batches: memory stays bounded on a large first export, and the snapshot's summary
    # can name the last record before it is read, since verification already said which one it is.
    reader = pa.RecordBatchReader.from_batches(schema, batches)
    properties = {LAST_SEQ_PROPERTY: str(end[0]), LAST_HASH_PROPERTY: end[1], EXPORT_ID_PROPERTY: export_id}
    iceberg.append(reader, snapshot_properties=properties)


def _landed(iceberg: IcebergTable, export_id: str) -> Snapshot | None:
    """The snapshot this export run committed, if it did."""
    for snapshot in iceberg.metadata.snapshots:
        if snapshot.summary is not None and snapshot.summary[EXPORT_ID_PROPERTY] == export_id:
            return snapshot
    return None


def _result(table: str, snapshot: Snapshot, created: bool) -> ExportResult:
    """What the export that made `snapshot` did (its records are consecutive seqs up to last-seq)."""
    summary = snapshot.summary
    assert summary is not None, "only snapshots found by their export id get here"
    last = int(summary[LAST_SEQ_PROPERTY] or 0)
    added = int(summary["added-records"] or 0)
    return ExportResult(
        table=table,
        exported=added,
        first_seq=last - added + 1,
        last_seq=last,
        snapshot_id=snapshot.snapshot_id,
        previous_snapshot_id=snapshot.parent_snapshot_id,
        table_records=int(summary["total-records"] or 0),
        created=created,
    )


def _total_records(iceberg: IcebergTable) -> int:
    snapshot = iceberg.current_snapshot()
    if snapshot is None or snapshot.summary is None:
        return 0
    return int(snapshot.summary["total-records"] or 0)


def describe_result(result: ExportResult) -> str:
    """One line for people: what the export added and where."""
    if result.exported == 0:
        return (
            f"0 new records: {result.table} is up to date ({result.table_records} records, last seq {result.last_seq})."
        )
    return (
        f"exported {result.exported} new record{'s' if result.exported != 1 else ''} "
        f"(seq {result.first_seq}..{result.last_seq}) to {result.table} in snapshot {result.snapshot_id}; "
        f"the table holds {result.table_records} records."
    )
