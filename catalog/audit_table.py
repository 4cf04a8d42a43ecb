"""An append-only Iceberg table of audit records whose last exported seq and hash ride in the snapshot summary.

The storage half of ``lakegate audit export`` (the log half, which verifies the log and turns records
into rows, is `lakegate.server.audit.export`). What this module guarantees:

- Where the table ends is read from the table itself, never from a side file: every snapshot this
  module commits carries the seq and hash of the last record the table holds after it in its
  summary (`LAST_SEQ_PROPERTY`, `LAST_HASH_PROPERTY`), written in the same commit as the rows, so a
  crash can leave neither duplicates nor gaps. A snapshot without them (another engine made it) is
  read from the data: ``max(seq)`` and that row's hash.
- An append is ONE snapshot. pyiceberg's own commit retry, which would re-apply an append on top of
  the snapshot that won the race, is off for the table (``commit.retry.num-retries`` 0), so of two
  appends after the same tail only one lands; the other is retried from the table as it is then,
  asking the caller again what follows its new tail. Each append run tags its snapshot with an id
  of its own, so a commit whose answer was lost (a busy catalog) is recognised on the next attempt
  instead of being written twice.

The table is not partitioned: pyiceberg streams Arrow batches (memory bounded however many rows an
append brings) into unpartitioned tables only, and lakegate's SQL path plans every file of a table
anyway; DuckDB still skips row groups by their ``time`` and ``seq`` statistics.
"""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lakegate.catalog.definitions import CatalogDefinitions
from lakegate.catalog.warehouse import Warehouse, translate_errors
from lakegate.errors import BackendError, ConfigurationError

if TYPE_CHECKING:
    import pyarrow as pa
    from pyiceberg.schema import Schema
    from pyiceberg.table import Table as IcebergTable
    from pyiceberg.table.snapshots import Snapshot

__all__ = [
    "AUDIT_TABLE",
    "BATCH_ROWS",
    "COMMIT_ATTEMPTS",
    "LAST_HASH_PROPERTY",
    "LAST_SEQ_PROPERTY",
    "AppendedSnapshot",
    "AuditTable",
    "RowsAfter",
    "audit_schema",
]

AUDIT_TABLE = "audit.records"
#: Snapshot summary properties: the last record the table holds after that snapshot.
LAST_SEQ_PROPERTY = "lakegate.audit.last-seq"
LAST_HASH_PROPERTY = "lakegate.audit.last-hash"
#: Snapshot summary property naming the append run that made it: a commit whose answer was lost
#: (a busy catalog) is recognised as this run's own on the next attempt.
EXPORT_ID_PROPERTY = "lakegate.audit.export-id"
#: Rows per Arrow batch streamed to pyiceberg (bounds memory on a large first export).
BATCH_ROWS = 10_000
COMMIT_ATTEMPTS = 5

#: (seq, hash) of the last record a table holds.
Tail = tuple[int, str]
#: Given the table's tail (None: it holds no record), the rows to append after it, or None when
#: there is nothing to append. Called again after a commit that lost a race.
RowsAfter = Callable[[Tail | None], Iterable[Mapping[str, Any]] | None]

# (name, Iceberg type name, required) of every column, in field-id order.
_COLUMNS: tuple[tuple[str, str, bool], ...] = (
    ("seq", "long", True),
    ("time", "timestamptz", True),
    ("principal", "string", False),
    ("roles", "string", False),
    ("tool", "string", False),
    ("decision", "string", False),
    ("outcome", "string", False),
    ("error", "string", False),
    ("rules", "string", False),
    ("resources", "string", False),
    ("arguments", "string", False),
    ("details", "string", False),
    ("rows", "long", False),
    ("bytes", "long", False),
    ("duration_ms", "double", False),
    ("policy_version", "string", False),
    ("request_id", "string", False),
    ("session_id", "string", False),
    ("transport", "string", False),
    ("client_name", "string", False),
    ("client_version", "string", False),
    ("authenticated_by", "string", False),
    ("extra", "string", False),
    ("prev_hash", "string", True),
    ("hash", "string", True),
)


@dataclass(frozen=True)
class AppendedSnapshot:
    """The snapshot an append committed: ``added`` rows ending with the record at ``last_seq``."""

    snapshot_id: int
    previous_snapshot_id: int | None
    last_seq: int
    added: int
    total_records: int

    @classmethod
    def of(cls, snapshot: Snapshot) -> AppendedSnapshot:
        summary = snapshot.summary
        assert summary is not None, "only snapshots found by their append id get here"
        return cls(
            snapshot_id=snapshot.snapshot_id,
            previous_snapshot_id=snapshot.parent_snapshot_id,
            last_seq=int(summary[LAST_SEQ_PROPERTY] or 0),
            added=int(summary["added-records"] or 0),
            total_records=int(summary["total-records"] or 0),
        )


def audit_schema(definitions: CatalogDefinitions | None = None, table: str = AUDIT_TABLE) -> Schema:
    """The Iceberg schema of the exported log, with column docs from the catalog definitions."""
    from pyiceberg.schema import Schema
    from pyiceberg.types import DoubleType, LongType, NestedField, PrimitiveType, StringType, TimestamptzType

    types: dict[str, PrimitiveType] = {
        "long": LongType(),
        "string": StringType(),
        "double": DoubleType(),
        "timestamptz": TimestamptzType(),
    }
    doc = definitions.dataset(table) if definitions is not None else None
    fields = []
    for field_id, (name, type_name, required) in enumerate(_COLUMNS, start=1):
        column_doc = doc.column(name) if doc is not None else None
        fields.append(
            NestedField(
                field_id=field_id,
                name=name,
                field_type=types[type_name],
                required=required,
                doc=column_doc.description if column_doc is not None else None,
            )
        )
    return Schema(*fields)


def _table_properties(definitions: CatalogDefinitions | None, table: str) -> dict[str, str]:
    from pyiceberg.table import TableProperties

    # pyiceberg would otherwise retry a lost commit by re-applying the append on top of the
    # winner's snapshot: two concurrent exports would then both land the same records.
    properties = {"lakegate.generated-by": "lakegate audit export", TableProperties.COMMIT_NUM_RETRIES: "0"}
    doc = definitions.dataset(table) if definitions is not None else None
    if doc is not None:
        properties |= {"comment": doc.description, "owner": doc.owner, "tags": ",".join(doc.tags)}
    return properties


def _retryable(exc: Exception) -> bool:
    """A commit that lost a race (nothing landed), or a catalog too busy to answer (outcome unknown)."""
    from pyiceberg.exceptions import CommitFailedException
    from sqlalchemy.exc import OperationalError

    if isinstance(exc, CommitFailedException):
        return True
    return isinstance(exc, OperationalError) and "locked" in str(exc).lower()


class AuditTable:
    """One audit table of a warehouse, opened (and created when missing) by `open`."""

    def __init__(self, warehouse: Warehouse, name: str, table: IcebergTable, *, created: bool) -> None:
        self.warehouse = warehouse
        self.name = name
        self.created = created  # whether `open` created the table
        self._table = table

    @classmethod
    def open(
        cls, warehouse: Warehouse, name: str = AUDIT_TABLE, definitions: CatalogDefinitions | None = None
    ) -> AuditTable:
        """The audit table `name`, created (empty, no snapshot) when it does not exist yet;
        `definitions` documents the table and its columns when this creates it.

        Raises:
            ConfigurationError: an existing table lacks columns the export writes.
            BackendError: the catalog failed.
        """
        from pyiceberg.exceptions import TableAlreadyExistsError
        from pyiceberg.table import TableProperties

        catalog = warehouse.iceberg
        schema = audit_schema(definitions, name)
        created = False
        with translate_errors(f"open the audit table {name}", name):
            if not catalog.table_exists(name):
                namespace = name.split(".")[0]
                try:
                    catalog.create_namespace_if_not_exists(namespace)
                except Exception:
                    # The SQL catalog reports a namespace created meanwhile as an IntegrityError.
                    if not catalog.namespace_exists(namespace):
                        raise
                try:
                    catalog.create_table(name, schema=schema, properties=_table_properties(definitions, name))
                    created = True
                except TableAlreadyExistsError:
                    pass  # another export created it meanwhile
            loaded = catalog.load_table(name)
            if loaded.properties.get(TableProperties.COMMIT_NUM_RETRIES) != "0":
                # A table made by something else: switch the rebasing retry off (a metadata change, no snapshot).
                with loaded.transaction() as transaction:
                    transaction.set_properties({TableProperties.COMMIT_NUM_RETRIES: "0"})
                loaded = catalog.load_table(name)
        present = {field.name for field in loaded.schema().fields}
        missing = [field.name for field in schema.fields if field.name not in present]
        if missing:
            raise ConfigurationError(
                f"table {name} exists but lacks the audit column(s) {', '.join(missing)}; export to another "
                "table with --table, or drop it"
            )
        return cls(warehouse, name, loaded, created=created)

    @property
    def snapshot_id(self) -> int | None:
        """The table's current snapshot, as last loaded (None: nothing was ever appended)."""
        return self._table.metadata.current_snapshot_id

    @property
    def total_records(self) -> int:
        """Rows in the current snapshot, as its summary says."""
        snapshot = self._table.current_snapshot()
        if snapshot is None or snapshot.summary is None:
            return 0
        return int(snapshot.summary["total-records"] or 0)

    def tail(self) -> Tail | None:
        """(seq, hash) of the last record the table holds; None when it holds none.

        Raises:
            BackendError: the table's data cannot be read (a snapshot without the summary properties).
        """
        with translate_errors(f"read the tail of {self.name}", self.name):
            return self._tail()

    def _tail(self) -> Tail | None:
        snapshot = self._table.current_snapshot()
        if snapshot is None:
            return None
        summary = snapshot.summary
        seq = summary[LAST_SEQ_PROPERTY] if summary is not None else None
        digest = summary[LAST_HASH_PROPERTY] if summary is not None else None
        if seq is not None and digest is not None:
            return int(seq), digest
        # A snapshot another engine made: read the tail from the data itself.
        import pyarrow.compute as pc

        data = self._table.scan(selected_fields=("seq", "hash"), snapshot_id=snapshot.snapshot_id).to_arrow()
        if data.num_rows == 0:
            return None
        last = pc.max(data.column("seq")).as_py()
        match = data.filter(pc.equal(data.column("seq"), last))
        return int(last), str(match.column("hash")[0].as_py())

    def append(
        self, rows_after: RowsAfter, through: Tail, *, attempts: int = COMMIT_ATTEMPTS
    ) -> AppendedSnapshot | None:
        """Append, as one snapshot whose summary names `through` as the table's last record, the rows
        `rows_after` gives for the table's tail; None when it gives none (the table is up to date).

        A commit that loses a race with another writer (or whose outcome a busy catalog left
        unknown) is tried again, up to `attempts` times in all, from the table as it is then:
        `rows_after` is asked again with the new tail (it may find nothing left to append).

        Raises:
            LakegateError: what `rows_after` (or the rows it gives) raised, as raised; nothing landed.
            BackendError: pyiceberg failed, or the rows do not fit the table; or every commit lost a
                race (nothing landed).
        """
        append_id = uuid.uuid4().hex
        last_error: Exception | None = None
        for attempt in range(1, attempts + 1):
            if attempt > 1:
                with translate_errors(f"reload {self.name}", self.name):
                    self._table = self.warehouse.iceberg_table(self.name)
                if (landed := self._landed(append_id)) is not None:
                    return AppendedSnapshot.of(landed)
            rows = rows_after(self.tail())
            if rows is None:
                return None
            try:
                self._append(rows, through, append_id)
            except Exception as exc:
                if not _retryable(exc):
                    with translate_errors(f"append to {self.name}", self.name):
                        raise
                # Lost a race with another writer (or the catalog was busy): start again from the
                # table as it is now, which holds whatever the other writer appended.
                last_error = exc
                time.sleep(random.uniform(0.01, min(0.5, 0.02 * 2**attempt)))
                continue
            # The append put the committed metadata on the table: its current snapshot is this one.
            landed = self._landed(append_id)
            if landed is None:
                raise BackendError(f"append to {self.name} committed, but its snapshot is not in the table's metadata")
            return AppendedSnapshot.of(landed)
        raise BackendError(
            f"append to {self.name}: all {attempts} commits lost a race with other writers ({last_error!r}); "
            "nothing was appended. Try again."
        )

    def _append(self, rows: Iterable[Mapping[str, Any]], through: Tail, append_id: str) -> None:
        import pyarrow as pa

        schema = self._table.schema().as_arrow()
        # Streamed in batches: memory stays bounded on a large append, and the snapshot's summary
        # can name the last record before it is read, since the caller already knows which one it is.
        reader = pa.RecordBatchReader.from_batches(schema, _batches(rows, schema))
        properties = {LAST_SEQ_PROPERTY: str(through[0]), LAST_HASH_PROPERTY: through[1], EXPORT_ID_PROPERTY: append_id}
        self._table.append(reader, snapshot_properties=properties)

    def _landed(self, append_id: str) -> Snapshot | None:
        """The snapshot the append run `append_id` committed, if it did."""
        for snapshot in self._table.metadata.snapshots:
            if snapshot.summary is not None and snapshot.summary[EXPORT_ID_PROPERTY] == append_id:
                return snapshot
        return None


def _batches(rows: Iterable[Mapping[str, Any]], schema: pa.Schema) -> Iterator[pa.RecordBatch]:
    """Rows in Arrow batches of `BATCH_ROWS`."""
    import pyarrow as pa

    batch: list[Mapping[str, Any]] = []
    for row in rows:
        batch.append(row)
        if len(batch) >= BATCH_ROWS:
            yield pa.RecordBatch.from_pylist(batch, schema=schema)
            batch = []
    if batch:
        yield pa.RecordBatch.from_pylist(batch, schema=schema)
