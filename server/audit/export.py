"""The verified audit log as an append-only Iceberg table (``lakegate audit export``): the log's side.

Each export verifies the whole hash chain first and exports nothing from a log that does not
verify. It then appends the records the table does not hold yet as ONE snapshot, so an export is
atomic and exporting again without new records adds nothing (no snapshot).

The table is `lakegate.catalog.audit_table.AuditTable`: where it ends (the last exported ``seq``
and ``hash``) rides in its snapshot summary, and two exports at once cannot both append the same
records (the loser's commit fails, and it starts again from the table as it is then, finding
nothing or only what is new). Before appending, the log's record at the table's last seq must have
that hash: a log that does not continue the table (replaced, cut off at the end, rewritten and
re-chained) is refused, which makes the table an anchor for the log's tail too.

Columns hold the record's fields (`record_row`); lists and objects (roles, rules, resources,
arguments, details) are JSON text, since lakegate's SQL path reads primitive columns only. Fields
without a column of their own land in ``extra`` (JSON text), so nothing the log holds is dropped:
the ``count`` of a grouped refusal record (`lakegate.server.audit.refusals.RefusalLog`; the requests
it stands for, one when absent) is there, as are fields the model does not know (a later gate
version's, the production mirror's ``replica`` and ``global_seq``). A column of its own would need
the column's description in the catalog definitions (``catalog/datasets.yaml``) and existing tables
to gain it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from lakegate.catalog.audit_table import AUDIT_TABLE, BATCH_ROWS, COMMIT_ATTEMPTS, AuditTable
from lakegate.catalog.definitions import CatalogDefinitions
from lakegate.catalog.warehouse import Warehouse
from lakegate.errors import ServerError
from lakegate.server.audit.log import (
    GENESIS_HASH,
    AuditFormatError,
    VerifyReport,
    canonical_json,
    read_all_records,
    record_hash,
    verify,
)
from lakegate.server.audit.record_model import AuditRecord, audit_record

__all__ = [
    "AuditExportRefused",
    "ExportProgress",
    "ExportResult",
    "describe_result",
    "export_audit_log",
    "record_row",
]

#: Problems of a failed verification spelled out in the refusal; the rest are counted.
SHOWN_PROBLEMS = 3

#: progress(step, done, total): "verify" (0 then 1 of 1), then "export" after each batch of records.
ExportProgress = Callable[[str, int, int], None]
#: (seq, hash) of a record: the last one the table holds, or the last one the log holds.
Tail = tuple[int, str]


class AuditExportRefused(ServerError):
    """Nothing was exported: the log does not verify, does not continue what the table holds, or holds
    a line that is not an audit record."""

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


# --- reading the log ----------------------------------------------------------------------------


def _refusal_for(path: Path, report: VerifyReport) -> AuditExportRefused:
    shown = "; ".join(f"{p.kind}: {p.message}" for p in report.problems[:SHOWN_PROBLEMS])
    more = len(report.problems) - SHOWN_PROBLEMS
    extra = f"; and {more} more problem(s)" if more > 0 else ""
    return AuditExportRefused(
        f"audit log {path} does not verify ({shown}{extra}); nothing was exported. "
        "Run `lakegate audit verify` for every problem, and export once the log is repaired or explained."
    )


def _time(record: AuditRecord) -> datetime:
    moment = record.written_at
    if moment is None:
        raise AuditExportRefused(
            f"audit record seq {record.seq} has no valid ISO 8601 time ({record.time!r}); nothing was exported"
        )
    return moment


def record_row(record: AuditRecord) -> dict[str, Any]:
    """One audit record as a row of the audit table (`lakegate.catalog.audit_table.audit_schema`).

    Raises:
        AuditExportRefused: the record has no valid time.
    """
    written = record.model_dump()
    extra = dict(record.model_extra or {})
    if record.count is not None:
        extra["count"] = record.count
    return {
        "seq": record.seq,
        "time": _time(record),
        "principal": record.principal,
        "roles": canonical_json(written["roles"]),
        "tool": record.tool,
        "decision": record.decision,
        "outcome": record.outcome,
        "error": record.error,
        "rules": canonical_json(written["rules"]),
        "resources": canonical_json(written["resources"]),
        "arguments": canonical_json(written["arguments"]),
        "details": canonical_json(written["details"]) if record.details is not None else None,
        "rows": record.rows,
        "bytes": record.bytes,
        "duration_ms": float(record.duration_ms),
        "policy_version": record.policy_version,
        "request_id": record.request_id,
        "session_id": record.session_id,
        "transport": record.transport,
        "client_name": record.client.name,
        "client_version": record.client.version,
        "authenticated_by": record.authenticated_by,
        "extra": canonical_json(extra) if extra else None,
        "prev_hash": record.prev_hash,
        "hash": record.hash,
    }


def _new_records(path: Path, after: Tail, until: Tail) -> Iterator[AuditRecord]:
    """The log's records with ``after[0] < seq <= until[0]``, checked as they are read.

    Verification ran over the file a moment ago; these checks tie what is exported to it (the
    file may have changed since) and to what the table already holds. The chain is checked on the
    line as read (what was hashed), then the record is parsed into the model.

    Raises:
        AuditExportRefused: the log does not continue the table, changed since it was verified, or
            holds a line that is not an audit record.
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
        try:
            parsed = audit_record(record)
        except AuditFormatError as exc:
            raise AuditExportRefused(f"audit record seq {seq} of {path} is {exc.reason}; nothing was exported") from exc
        yield parsed
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


def _rows(records: Iterable[AuditRecord], total: int, progress: ExportProgress | None) -> Iterator[dict[str, Any]]:
    """The records as rows, saying how far it got after every `BATCH_ROWS` of them and at the end."""
    done = 0
    for record in records:
        yield record_row(record)
        done += 1
        if progress is not None and done % BATCH_ROWS == 0:
            progress("export", done, total)
    if progress is not None:
        progress("export", done, total)


# --- the export -----------------------------------------------------------------------------------


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
        AuditExportRefused: the log does not verify, does not continue the table, changed while it
            was exported, or holds a line that is not an audit record; nothing was exported.
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
    first_kept = report.first_seq or 1
    audit_table = AuditTable.open(warehouse, table, definitions)

    def rows_after(tail: Tail | None) -> Iterator[dict[str, Any]] | None:
        exported = tail or (0, GENESIS_HASH)
        if _up_to_date(log_path, table, exported, end):
            return None
        expected = end[0] - max(exported[0], first_kept - 1)
        return _rows(_new_records(log_path, exported, end), expected, progress)

    appended = audit_table.append(rows_after, end, attempts=attempts)
    if appended is None:
        return ExportResult(
            table=table,
            exported=0,
            first_seq=None,
            last_seq=end[0],
            snapshot_id=None,
            previous_snapshot_id=audit_table.snapshot_id,
            table_records=audit_table.total_records,
            created=audit_table.created,
        )
    # The records an export appends are consecutive seqs up to the snapshot's last one.
    return ExportResult(
        table=table,
        exported=appended.added,
        first_seq=appended.last_seq - appended.added + 1,
        last_seq=appended.last_seq,
        snapshot_id=appended.snapshot_id,
        previous_snapshot_id=appended.previous_snapshot_id,
        table_records=appended.total_records,
        created=audit_table.created,
    )


def _up_to_date(log_path: Path, table: str, tail: Tail, end: Tail) -> bool:
    """Whether the table already holds the log up to its end (True) or lacks records after `tail`.

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
        return False
    if tail[1] != end[1]:
        raise _not_continued(log_path, tail[0])
    return True


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
