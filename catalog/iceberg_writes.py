"""Governed writes to Iceberg tables: validate a batch against the schema, append it, restore snapshots.

Policy is not decided here (the CallScope does that first); this module only knows storage.

Appends are exactly-once under concurrent writers. pyiceberg retries an optimistic commit that lost
a race a few times, then raises CommitFailedException (and guarantees nothing landed). lakegate then
retries itself: it reloads the table and appends the same materialised Arrow table again, with a
jittered backoff, up to `attempts` times. Every attempt tags its snapshot with one write id, so an
attempt whose outcome was unknown (e.g. a locked SQLite catalog) is found in the history instead of
being written twice.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from datetime import time as time_of_day
from decimal import Decimal, InvalidOperation
from typing import TYPE_CHECKING, Any

import structlog

from lakegate.catalog.change_snapshots import unapproved_snapshots
from lakegate.catalog.sealed_file_io import steering_properties
from lakegate.catalog.warehouse import Warehouse, translate_errors
from lakegate.errors import BackendError, InvalidArgument, LimitExceeded, NotFound

if TYPE_CHECKING:
    import pyarrow as pa
    from pyiceberg.schema import Schema
    from pyiceberg.table import Table as IcebergTable
    from pyiceberg.types import IcebergType

__all__ = [
    "WRITE_ID_PROPERTY",
    "WRITTEN_BY_PROPERTY",
    "AppendOutcome",
    "PreparedAppend",
    "RestoreOutcome",
    "RowError",
    "commit_append",
    "prepare_append",
    "register_table",
    "restore_snapshot",
    "restore_target",
    "retryable_commit_error",
    "rows_appended_since",
]

log = structlog.get_logger(__name__)

#: Snapshot summary property that carries the id of the lakegate write that made the snapshot.
WRITE_ID_PROPERTY = "lakegate.write-id"
#: Snapshot summary property naming the principal whose append made the snapshot.
WRITTEN_BY_PROPERTY = "lakegate.written-by"
#: Most row errors spelled out in one rejection; the rest are counted.
MAX_REPORTED_ERRORS = 20
BACKOFF_BASE_S = 0.02
BACKOFF_CAP_S = 0.5

_INT_RANGES = {"int": (-(2**31), 2**31 - 1), "long": (-(2**63), 2**63 - 1)}


@dataclass(frozen=True)
class RowError:
    """One problem with one value of a batch: which row, which column, what is wrong, what to send."""

    row: int
    column: str | None
    problem: str
    expected: str

    def __str__(self) -> str:
        where = f"rows[{self.row}]" + (f".{self.column}" if self.column else "")
        return f"{where}: {self.problem}; {self.expected}"


@dataclass(frozen=True)
class PreparedAppend:
    """A batch checked against a table's schema; `data` is set only when there are no errors."""

    name: str
    #: Columns some row sets to a non-null value (each needs a write decision).
    columns_set: tuple[str, ...]
    errors: tuple[RowError, ...]
    data: pa.Table | None
    rows: int

    def raise_if_invalid(self) -> None:
        """Raises: InvalidArgument naming every problem (row, column, what to send instead)."""
        if not self.errors:
            return
        shown = "; ".join(str(error) for error in self.errors[:MAX_REPORTED_ERRORS])
        more = len(self.errors) - MAX_REPORTED_ERRORS
        extra = f"; and {more} more problem(s)" if more > 0 else ""
        raise InvalidArgument(
            f"Nothing was written to {self.name}: {len(self.errors)} problem(s) in the batch: {shown}{extra}.",
            hint="Fix these rows and send the whole batch again; describe_dataset lists the columns and types.",
        )

    def batch(self) -> pa.Table:
        """The rows as one Arrow table.

        Raises:
            InvalidArgument: some rows do not fit the schema (each named), or there is nothing to write.
        """
        self.raise_if_invalid()
        if self.data is None:
            raise InvalidArgument(f"Nothing to write to {self.name}.")
        return self.data


@dataclass(frozen=True)
class AppendOutcome:
    snapshot_id: int
    previous_snapshot_id: int | None
    rows: int
    #: lakegate-level commit attempts (1 when the first commit landed).
    attempts: int


@dataclass(frozen=True)
class RestoreOutcome:
    snapshot_id: int
    previous_snapshot_id: int | None
    changed: bool


# --- validation --------------------------------------------------------------------------------


class _Bad(Exception):
    def __init__(self, problem: str, expected: str) -> None:
        super().__init__(problem)
        self.problem = problem
        self.expected = expected


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _convert(value: Any, field_type: IcebergType) -> Any:
    """A JSON value as the Python value pyarrow writes into a column of `field_type`.

    Raises:
        _Bad: the value does not fit the type (with what to send instead).
    """
    from pyiceberg.types import (
        BooleanType,
        DateType,
        DecimalType,
        DoubleType,
        FloatType,
        IntegerType,
        LongType,
        StringType,
        TimestampType,
        TimestamptzType,
        TimeType,
        UUIDType,
    )

    if isinstance(field_type, BooleanType):
        if isinstance(value, bool):
            return value
        raise _Bad(f"{_show(value)} is not a boolean", "send true or false")
    if isinstance(field_type, IntegerType | LongType):
        kind = "int" if isinstance(field_type, IntegerType) else "long"
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool):
            raise _Bad(f"{_show(value)} is not an integer", f"send a whole number ({kind})")
        low, high = _INT_RANGES[kind]
        if not low <= value <= high:
            raise _Bad(f"{value} is out of range for {kind}", f"send a whole number from {low} to {high}")
        return value
    if isinstance(field_type, FloatType | DoubleType):
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise _Bad(f"{_show(value)} is not a finite number", "send a JSON number")
        return float(value)
    if isinstance(field_type, DecimalType):
        return _decimal(value, field_type.precision, field_type.scale)
    if isinstance(field_type, StringType):
        if isinstance(value, str):
            return value
        raise _Bad(f"{_show(value)} is not a string", "send a JSON string")
    if isinstance(field_type, DateType):
        if isinstance(value, str):
            try:
                return date.fromisoformat(value)
            except ValueError:
                pass
        raise _Bad(f"{_show(value)} is not an ISO date", "send 'YYYY-MM-DD', e.g. '2025-01-31'")
    if isinstance(field_type, TimestamptzType):
        moment = _timestamp(value)
        if moment is None or moment.tzinfo is None:
            raise _Bad(
                f"{_show(value)} is not an ISO 8601 timestamp with a UTC offset",
                "send e.g. '2025-01-31T14:05:00Z' or '2025-01-31T15:05:00+01:00'",
            )
        return moment.astimezone(UTC)
    if isinstance(field_type, TimestampType):
        moment = _timestamp(value)
        if moment is None or moment.tzinfo is not None:
            raise _Bad(
                f"{_show(value)} is not an ISO 8601 timestamp without a time zone",
                "send e.g. '2025-01-31T14:05:00' (this column has no time zone)",
            )
        return moment
    if isinstance(field_type, TimeType):
        if isinstance(value, str):
            try:
                parsed = time_of_day.fromisoformat(value)
            except ValueError:
                parsed = None
            if parsed is not None and parsed.tzinfo is None:
                return parsed
        raise _Bad(f"{_show(value)} is not an ISO time of day", "send 'HH:MM:SS', e.g. '14:05:00'")
    if isinstance(field_type, UUIDType):
        if isinstance(value, str):
            try:
                return uuid.UUID(value).bytes
            except ValueError:
                pass
        raise _Bad(f"{_show(value)} is not a UUID", "send e.g. '123e4567-e89b-12d3-a456-426614174000'")
    raise _Bad(f"columns of type {field_type} cannot be written by append_rows", "omit this column")


def _timestamp(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        return None


def _decimal(value: Any, precision: int, scale: int) -> Decimal:
    example = "'" + "1" * max(1, min(3, precision - scale)) + ("." + "5" * scale if scale else "") + "'"
    expected = f"send a number or a string such as {example} (decimal({precision}, {scale}))"
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise _Bad(f"{_show(value)} is not a decimal number", expected)
    try:
        # str(float) is the shortest repr, so 12.34 stays 12.34 rather than its binary expansion.
        number = Decimal(str(value).strip())
    except InvalidOperation:
        raise _Bad(f"{_show(value)} is not a decimal number", expected) from None
    if not number.is_finite():
        raise _Bad(f"{_show(value)} is not a finite decimal number", expected)
    exponent = number.as_tuple().exponent
    assert isinstance(exponent, int)  # finite
    if -exponent > scale:
        raise _Bad(
            f"{_show(value)} has more than {scale} decimal place(s)",
            f"round it to {scale} place(s) yourself (lakegate does not round)",
        )
    quantized = number.quantize(Decimal(1).scaleb(-scale))
    if len(quantized.as_tuple().digits) > precision:
        raise _Bad(
            f"{_show(value)} has too many digits for decimal({precision}, {scale})",
            f"send at most {precision - scale} digit(s) before the decimal point",
        )
    return quantized


def _check_rows(schema: Schema, rows: Sequence[Mapping[str, Any]]) -> tuple[list[dict[str, Any]], list[RowError]]:
    fields = {field.name: field for field in schema.fields}
    names = ", ".join(fields)
    converted: list[dict[str, Any]] = []
    errors: list[RowError] = []
    for index, row in enumerate(rows):
        out: dict[str, Any] = {}
        for column in row:
            if column not in fields:
                errors.append(RowError(index, column, "no such column", f"use only these columns: {names}"))
        for name, field in fields.items():
            value = row.get(name)
            if value is None:
                if field.required:
                    errors.append(RowError(index, name, "missing a value for a required column", "send a value"))
                out[name] = None
                continue
            try:
                out[name] = _convert(value, field.field_type)
            except _Bad as bad:
                errors.append(RowError(index, name, bad.problem, bad.expected))
        converted.append(out)
    return converted, errors


def prepare_append(warehouse: Warehouse, name: str, rows: Sequence[Mapping[str, Any]]) -> PreparedAppend:
    """Check a batch against the current schema of Iceberg table `name` and build its Arrow table.

    Invalid values do not raise: they are returned as `errors` (see `PreparedAppend.raise_if_invalid`),
    so that the caller can take its policy decisions on `columns_set` first.

    Raises:
        NotFound: no such dataset.
        InvalidArgument: the dataset is not an Iceberg table.
        BackendError: the catalog or the table metadata cannot be read.
    """
    if warehouse.kind_of(name) != "iceberg":
        raise InvalidArgument(
            f"{name} is a Lance dataset; append_rows writes Iceberg tables only.",
            hint="Call list_datasets to see which datasets are Iceberg tables.",
        )
    table = warehouse.iceberg_table(name)
    with translate_errors(f"read the schema of {name}", name):
        schema = table.schema()
    known = {field.name for field in schema.fields}
    columns_set = tuple(
        sorted({column for row in rows for column, value in row.items() if value is not None and column in known})
    )
    converted, errors = _check_rows(schema, rows)
    if errors:
        return PreparedAppend(name, columns_set, tuple(errors), None, len(rows))
    with translate_errors(f"build the batch for {name}", name):
        import pyarrow as pa

        data = pa.Table.from_pylist(converted, schema=schema.as_arrow())
    return PreparedAppend(name, columns_set, (), data, len(rows))


# --- committing --------------------------------------------------------------------------------


def _landed(table: IcebergTable, write_id: str) -> Any | None:
    """The snapshot an earlier attempt of this write committed, if it did."""
    for snapshot in table.metadata.snapshots:
        if snapshot.summary is not None and snapshot.summary[WRITE_ID_PROPERTY] == write_id:
            return snapshot
    return None


def retryable_commit_error(exc: Exception) -> bool:
    """A commit that lost a race (nothing landed), or a catalog too busy to answer (outcome unknown).

    pyiceberg 0.12 reports some lost races as a ValueError: a commit built on metadata that another
    writer's commit (to any branch of the table) moved on gets "Cannot add snapshot with sequence
    number N older than last sequence number N" from the catalog, before anything is written.
    """
    from pyiceberg.exceptions import CommitFailedException
    from sqlalchemy.exc import OperationalError

    if isinstance(exc, CommitFailedException):
        return True
    if isinstance(exc, ValueError) and "older than last sequence number" in str(exc):
        return True
    return isinstance(exc, OperationalError) and "locked" in str(exc).lower()


def _backoff(attempt: int) -> float:
    # Full jitter: writers that collided spread out instead of colliding again in step.
    return random.uniform(BACKOFF_BASE_S / 2, min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2**attempt))


def commit_append(
    warehouse: Warehouse,
    prepared: PreparedAppend,
    *,
    attempts: int,
    written_by: str | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> AppendOutcome:
    """Append a prepared batch as one new snapshot, retrying commits that lose a race.

    Raises:
        LimitExceeded: every attempt lost a race with other writers; nothing was written.
        NotFound: the table was dropped meanwhile.
        BackendError: pyiceberg failed otherwise.
    """
    data = prepared.batch()
    name = prepared.name
    write_id = uuid.uuid4().hex
    last_error: Exception | None = None
    for attempt in range(1, attempts + 1):
        table = warehouse.iceberg_table(name)
        if attempt > 1 and (snapshot := _landed(table, write_id)) is not None:
            return AppendOutcome(snapshot.snapshot_id, snapshot.parent_snapshot_id, prepared.rows, attempt - 1)
        try:
            properties = {WRITE_ID_PROPERTY: write_id}
            if written_by is not None:
                properties[WRITTEN_BY_PROPERTY] = written_by
            table.append(data, snapshot_properties=properties)
        except Exception as exc:
            if not retryable_commit_error(exc):
                with translate_errors(f"append to {name}", name):
                    raise
            last_error = exc
            log.info("write.commit_retry", table=name, attempt=attempt, error=type(exc).__name__)
            if attempt < attempts:
                sleep(_backoff(attempt))
            continue
        # pyiceberg puts the committed metadata on the table object; reload only if it did not.
        snapshot = _landed(table, write_id) or _landed(warehouse.iceberg_table(name), write_id)
        if snapshot is None:
            raise BackendError(f"append to {name}: write {write_id} committed but its snapshot is not in the metadata")
        return AppendOutcome(snapshot.snapshot_id, snapshot.parent_snapshot_id, prepared.rows, attempt)
    # The last attempt's outcome may have been unknown: look once more before saying nothing landed.
    snapshot = _landed(warehouse.iceberg_table(name), write_id)
    if snapshot is not None:
        return AppendOutcome(snapshot.snapshot_id, snapshot.parent_snapshot_id, prepared.rows, attempts)
    log.warning("write.gave_up", table=name, attempts=attempts, error=repr(last_error))
    raise LimitExceeded(
        f"Nothing was written to {name}: other writers committed first on all {attempts} attempts.",
        hint="Send the same rows again in a moment (none of them were written), or fewer, larger batches.",
    )


def rows_appended_since(warehouse: Warehouse, name: str, principal: str, since: datetime) -> int:
    """Rows that `principal`'s appends added to table `name` since `since` (main's history).

    Raises:
        NotFound: no such table.
    """
    table = warehouse.iceberg_table(name)
    since_ms = int(since.timestamp() * 1000)
    total = 0
    snapshot = table.current_snapshot()
    while snapshot is not None and snapshot.timestamp_ms >= since_ms:
        summary = snapshot.summary
        if summary is not None and summary.get(WRITTEN_BY_PROPERTY) == principal:
            total += int(summary.get("added-records") or 0)
        parent = snapshot.parent_snapshot_id
        snapshot = table.metadata.snapshot_by_id(parent) if parent is not None else None
    return total


# --- restoring ---------------------------------------------------------------------------------


def restore_target(warehouse: Warehouse, name: str, snapshot_id: int) -> IcebergTable:
    """Table `name`, loaded, once `snapshot_id` is known to be one of its snapshots a restore may
    go to (not one that holds rows staged for approval).

    Raises:
        NotFound: no such table, or the snapshot is not one of this table's (the message lists recent ones).
        InvalidArgument: a Lance dataset.
    """
    if warehouse.kind_of(name) != "iceberg":
        raise InvalidArgument(
            f"{name} is a Lance dataset; restore_table restores Iceberg tables only.",
            hint="Call list_datasets to see which datasets are Iceberg tables.",
        )
    table = warehouse.iceberg_table(name)
    staged = unapproved_snapshots(table.metadata.snapshots, table.properties)
    if table.metadata.snapshot_by_id(snapshot_id) is None or snapshot_id in staged:
        kept = (s for s in table.metadata.snapshots if s.snapshot_id not in staged)
        recent = sorted(kept, key=lambda s: s.timestamp_ms, reverse=True)[:5]
        listed = ", ".join(str(s.snapshot_id) for s in recent) or "none"
        raise NotFound(
            f"Table {name} has no snapshot {snapshot_id} (its most recent snapshots: {listed}).",
            hint=f"Call describe_dataset on {name} to list its snapshots, and pass one of those ids.",
        )
    return table


def restore_snapshot(warehouse: Warehouse, name: str, snapshot_id: int) -> RestoreOutcome:
    """Make `snapshot_id`, one of the table's own snapshots, its current snapshot again.

    Later snapshots stay in the history, so a restore can itself be undone by restoring forward.

    Raises:
        NotFound: no such table, or the snapshot is not one of this table's.
        InvalidArgument: a Lance dataset, or the table changed while restoring (nothing was changed).
        BackendError: pyiceberg failed otherwise.
    """
    from pyiceberg.exceptions import CommitFailedException

    table = restore_target(warehouse, name, snapshot_id)
    current = table.metadata.current_snapshot_id
    if current == snapshot_id:
        return RestoreOutcome(snapshot_id, current, changed=False)
    # No retry on a lost race: restoring over a snapshot the caller has not seen would silently undo it.
    with translate_errors(f"restore {name} to snapshot {snapshot_id}", name):
        try:
            table.manage_snapshots().set_current_snapshot(snapshot_id=snapshot_id).commit()
        except CommitFailedException as exc:
            raise InvalidArgument(
                f"{name} changed while it was being restored; nothing was changed.",
                hint=f"Call describe_dataset on {name} to see its new snapshots, then restore again.",
            ) from exc
    return RestoreOutcome(snapshot_id, current, changed=True)


# --- registering -------------------------------------------------------------------------------


def register_table(warehouse: Warehouse, name: str, metadata_location: str) -> int | None:
    """Add an existing Iceberg table (its metadata file) to the catalog as `name`; returns its
    current snapshot.

    Raises:
        InvalidArgument: `name` exists already, or the metadata file cannot be read.
        BackendError: pyiceberg failed otherwise.
    """
    from pyiceberg.exceptions import TableAlreadyExistsError
    from pyiceberg.io import load_file_io
    from pyiceberg.serializers import FromInputFile

    if name in warehouse.iceberg_table_names():
        raise InvalidArgument(f"{name} exists already.", hint="Register the table under another name.")
    try:  # read and check the metadata before the catalog holds anything of it, with lakegate's own FileIO
        io = load_file_io(dict(warehouse.iceberg.properties), metadata_location)
        metadata = FromInputFile.table_metadata(io.new_input(metadata_location))
    except Exception as exc:
        raise InvalidArgument(
            f"The metadata file cannot be read as Iceberg table metadata: {type(exc).__name__}.",
            hint="Give the table's current metadata file (…/metadata/NNNNN-….metadata.json), readable from here.",
        ) from exc
    if steering := steering_properties(metadata.properties):
        # pyiceberg would build the table's FileIO with them: its author would choose how (and with
        # which of lakegate's credentials) lakegate reads, or which module it imports.
        raise InvalidArgument(
            f"The table's own properties configure how its files are read ({', '.join(steering)}), which lakegate "
            "does not allow.",
            hint="Remove those table properties where the table was written, then register its new metadata file.",
        )
    for other in warehouse.iceberg_table_names():
        if warehouse.iceberg_table(other).metadata.table_uuid == metadata.table_uuid:
            # Under a second name its data would escape the policy written for the first.
            raise InvalidArgument(
                f"That metadata is table {other}'s, which this catalog holds already.",
                hint=f"Grant access to {other} instead of registering it again.",
            )
    try:
        warehouse.iceberg.create_namespace_if_not_exists(name.rsplit(".", 1)[0])
        table = warehouse.iceberg.register_table(name, metadata_location)
    except TableAlreadyExistsError as exc:
        raise InvalidArgument(f"{name} exists already.", hint="Register the table under another name.") from exc
    except Exception as exc:
        with contextlib.suppress(Exception):  # no half-registered table stays behind
            warehouse.iceberg.drop_table(name)
        raise BackendError(f"register {name} failed: {type(exc).__name__}: {exc}") from exc
    return table.metadata.current_snapshot_id
