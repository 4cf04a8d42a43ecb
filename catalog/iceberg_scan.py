"""Planning a read of an Iceberg table for DuckDB: which snapshot, which schema, which data files.

DuckDB 2.0's iceberg extension cannot be installed here, so lakegate lets pyiceberg plan the scan
(snapshot resolution, manifests, partition and file pruning) and hands the query worker the planned
Parquet files, which it reads as Arrow datasets with projection and filter pushdown
(catalog/arrow_relations.py). A plan depends only on the table and the snapshot, and Iceberg files
never change, so plans are cached by (table, snapshot id). Files are named as the worker's file
system reads them: local paths, or "bucket/key" on the object store (catalog/object_store.py).

Row-level deletes: pyiceberg plans equality deletes with an error, and a plain Parquet read would
silently ignore position-delete files written by other engines. A table whose planned scan holds
any delete file is refused with a clear error rather than read wrongly.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlparse

import structlog

from lakegate.catalog.arrow_relations import SourceColumn, TableSource
from lakegate.catalog.change_snapshots import unapproved_snapshots
from lakegate.catalog.warehouse import Warehouse, translate_errors
from lakegate.errors import BackendError, InvalidArgument, NotFound, SourceUnavailable

if TYPE_CHECKING:
    from pyiceberg.expressions import BooleanExpression
    from pyiceberg.table import FileScanTask
    from pyiceberg.table import Table as IcebergTable
    from pyiceberg.table.snapshots import Snapshot

    from lakegate.catalog.vended_credentials import VendedCredentials
    from lakegate.policies.sql_filters import ColumnFilter

log = structlog.get_logger(__name__)

__all__ = ["ScanColumn", "ScanPlan", "ScanPlanner", "duckdb_type", "refuse_row_deletes"]

_SIMPLE_TYPES = {
    "boolean": "BOOLEAN",
    "int": "INTEGER",
    "long": "BIGINT",
    "float": "FLOAT",
    "double": "DOUBLE",
    "date": "DATE",
    "time": "TIME",
    "timestamp": "TIMESTAMP",
    "timestamptz": "TIMESTAMPTZ",
    "timestamp_ns": "TIMESTAMP_NS",
    "timestamptz_ns": "TIMESTAMPTZ",
    "string": "VARCHAR",
    "uuid": "UUID",
    "binary": "BLOB",
}
_DECIMAL = re.compile(r"^decimal\((\d+),\s*(\d+)\)$")
_FIXED = re.compile(r"^fixed\[\d+\]$")


def _readable(iceberg_type: str) -> bool:
    try:
        duckdb_type(iceberg_type)
    except InvalidArgument:
        return False
    return True


def duckdb_type(iceberg_type: str) -> str:
    """The DuckDB type that reads an Iceberg primitive type ("decimal(12, 2)" -> "DECIMAL(12,2)").

    Raises:
        InvalidArgument: a nested or unknown type (lakegate's SQL path reads primitive columns only).
    """
    if iceberg_type in _SIMPLE_TYPES:
        return _SIMPLE_TYPES[iceberg_type]
    if match := _DECIMAL.match(iceberg_type):
        return f"DECIMAL({match.group(1)},{match.group(2)})"
    if _FIXED.match(iceberg_type):
        return "BLOB"
    raise InvalidArgument(
        f"Columns of type {iceberg_type} cannot be queried through lakegate's SQL tool yet.",
        hint="Select the table's other columns.",
    )


@dataclass(frozen=True)
class ScanColumn:
    name: str
    iceberg_type: str
    duckdb_type: str
    field_id: int  # Iceberg's column identity: Parquet files are read by it, not by name


@dataclass(frozen=True)
class ScanPlan:
    """What DuckDB needs to read one table as of one snapshot."""

    table: str
    snapshot_id: int | None  # None: the table has no snapshot yet (it is empty)
    columns: tuple[ScanColumn, ...]
    files: tuple[tuple[str, int], ...]  # the Parquet data files (path, size in bytes): local paths, or
    # "bucket/key" paths on the object store
    rows: int = 0  # rows in those files, from the manifests
    unpruned_files: int | None = None  # with the query's filters applied (`ScanPlanner.prune`): the
    # files of the whole snapshot
    column_bytes: tuple[tuple[int, int], ...] = ()  # (field id, compressed bytes of its column chunks
    # in those files, from the manifests' column sizes)
    store: str | None = None  # the file system the files are on: None the warehouse's, else the
    # attached catalog's of that name
    vended: VendedCredentials | None = field(default=None, repr=False, compare=False)  # the credentials
    # the attached catalog vended for this call's read (never cached with the plan)

    @property
    def bytes(self) -> int:
        return sum(size for _, size in self.files)

    def bytes_to_read(self, columns: Collection[str]) -> int:
        """The bytes of data a read of `columns` (names, any case) scans: their column chunks in the
        planned files. Footers are not counted: the worker reads each file's once and keeps it. Files
        whose manifests leave out column sizes count whole."""
        if self.files and not self.column_bytes:
            return self.bytes
        wanted = {column.lower() for column in columns}
        ids = {c.field_id for c in self.columns if c.name.lower() in wanted}
        return sum(size for field_id, size in self.column_bytes if field_id in ids)

    def source(self, columns: Collection[str] | None = None) -> TableSource:
        """What the query worker may read of this plan: its files, and `columns` (default: all)."""
        return TableSource(
            columns=tuple(
                SourceColumn(c.name, c.duckdb_type, c.field_id)
                for c in self.columns
                if columns is None or c.name in columns
            ),
            files=self.files,
            store=self.store,
            vended=self.vended,
        )


def _column_bytes(tasks: Sequence[FileScanTask]) -> tuple[tuple[int, int], ...]:
    """Per field id, the compressed bytes of its column chunks in the tasks' files (manifests that
    leave out column sizes count nothing)."""
    sizes: dict[int, int] = {}
    for task in tasks:
        for field_id, size in (task.file.column_sizes or {}).items():
            sizes[field_id] = sizes.get(field_id, 0) + size
    return tuple(sorted(sizes.items()))


def refuse_row_deletes(table: str, tasks: list[FileScanTask]) -> None:
    """Refuse a scan that carries delete files: reading only its data files would return deleted rows.

    Raises:
        InvalidArgument: some planned data file has position or equality delete files.
    """
    deletes = sum(len(task.delete_files) for task in tasks)
    if deletes:
        raise _row_deletes_refusal(table, f"{deletes} position")


def _row_deletes_refusal(table: str, what: str) -> InvalidArgument:
    return InvalidArgument(
        f"Table {table} has {what} row-level delete file(s) written by another engine; lakegate "
        "refuses to read it rather than return deleted rows.",
        hint="Ask the table's owner to compact it (rewrite its data files), or query an older snapshot.",
    )


def _expression(column: str, column_filter: ColumnFilter) -> BooleanExpression:
    """pyiceberg's expression for one filter of the query."""
    from pyiceberg.expressions import EqualTo, GreaterThan, GreaterThanOrEqual, In, LessThan, LessThanOrEqual

    value = column_filter.value
    if column_filter.op == "in":
        assert isinstance(value, tuple)
        return In(column, value)  # type: ignore[call-arg, arg-type]  # pydantic hides its __new__ from mypy
    assert not isinstance(value, tuple)
    operators = {"=": EqualTo, "<": LessThan, "<=": LessThanOrEqual, ">": GreaterThan, ">=": GreaterThanOrEqual}
    expression: BooleanExpression = operators[column_filter.op](column, value)
    return expression


def _local_path(location: str) -> str:
    parsed = urlparse(location)
    if parsed.scheme in ("", "file"):
        return unquote(parsed.path) if parsed.scheme else location
    raise BackendError(f"data file {location} is not on the local file system; lakegate reads local files only")


class ScanPlanner:
    """Plans reads of a warehouse's Iceberg tables, with a cache of plans by (table, snapshot)."""

    def __init__(self, warehouse: Warehouse) -> None:
        self._warehouse = warehouse
        self._plans: dict[tuple[str, int | None, int | None], ScanPlan] = {}
        self._pruned: dict[tuple[object, ...], ScanPlan] = {}
        self._lock = threading.Lock()

    def plan(self, name: str, as_of: int | datetime | None = None) -> ScanPlan:
        """The plan to read table `name` now, or at snapshot id / timestamp `as_of`.

        Raises:
            NotFound: no such table, or no such snapshot (the hint says how to list snapshots).
            InvalidArgument: the table has row-level deletes or a column type lakegate cannot read.
            SourceUnavailable: an attached catalog's table whose metadata or manifests cannot be read.
            BackendError: the catalog, metadata or manifests cannot be read.
        """
        try:
            return self._plan(name, as_of)
        except BackendError as exc:
            attached = self._warehouse.attached_catalog(name)
            if attached is None or type(exc) is not BackendError:
                raise
            raise SourceUnavailable(str(exc), table=name, catalog=attached.name) from exc

    def _plan(self, name: str, as_of: int | datetime | None) -> ScanPlan:
        table = self._warehouse.iceberg_table(name)
        with translate_errors(f"plan a scan of {name}", name):
            metadata = table.metadata
            if as_of is None:
                snapshot = table.current_snapshot()
            elif isinstance(as_of, datetime):
                snapshot = table.snapshot_as_of_timestamp(int(as_of.timestamp() * 1000))
                if snapshot is None:
                    raise NotFound(
                        f"Table {name} has no snapshot at or before {as_of.isoformat()}.",
                        hint=f"Call describe_dataset on {name} to list its snapshots.",
                    )
            else:
                snapshot = table.snapshot_by_id(as_of)
                if snapshot is not None and as_of in unapproved_snapshots(metadata.snapshots, table.properties):
                    snapshot = None  # rows staged for approval are not the table's until approved
                if snapshot is None:
                    raise NotFound(
                        f"Table {name} has no snapshot {as_of}.",
                        hint=f"Call describe_dataset on {name} to list its snapshot ids.",
                    )
            snapshot_id = snapshot.snapshot_id if snapshot is not None else None
            key = (name, snapshot_id, metadata.current_schema_id if as_of is None else None)
            with self._lock:
                cached = self._plans.get(key)
            if cached is not None:
                return self._with_credentials(cached, table)
            # The current read uses the current schema (a rename makes no snapshot); a read of the
            # past uses the schema its snapshot was written with.
            schema = table.schema()
            if as_of is not None and snapshot is not None and snapshot.schema_id is not None:
                schema = next((s for s in metadata.schemas if s.schema_id == snapshot.schema_id), schema)
            # Columns of a type SQL cannot read here (struct, list, map) are left out of the scan: the
            # table's other columns stay queryable (describe_dataset still lists them).
            columns = tuple(
                ScanColumn(field.name, str(field.field_type), duckdb_type(str(field.field_type)), field.field_id)
                for field in schema.fields
                if _readable(str(field.field_type))
            )
            files: tuple[tuple[str, int], ...] = ()
            rows = 0
            column_bytes: tuple[tuple[int, int], ...] = ()
            if snapshot_id is not None:
                self._check_manifests(name, table, snapshot)
                try:
                    tasks = list(table.scan(snapshot_id=snapshot_id).plan_files())
                except (ValueError, NotImplementedError) as exc:
                    if "equality delete" not in str(exc):
                        raise
                    raise _row_deletes_refusal(name, "equality") from exc
                refuse_row_deletes(name, tasks)
                files = tuple(
                    (self._path(name, task.file.file_path, metadata.location), task.file.file_size_in_bytes)
                    for task in tasks
                )
                rows = sum(task.file.record_count for task in tasks)
                column_bytes = _column_bytes(tasks)
        attached = self._warehouse.attached_catalog(name)
        store = attached.name if attached is not None else None
        plan = ScanPlan(name, snapshot_id, columns, files, rows, column_bytes=column_bytes, store=store)
        with self._lock:
            self._plans[key] = plan
        return self._with_credentials(plan, table)

    def _check_manifests(self, name: str, table: IcebergTable, snapshot: Snapshot | None) -> None:
        """An attached catalog's table: its manifest list and manifests must lie where its data files
        may (`_path`), before pyiceberg opens them. Whoever commits to the catalog writes their paths,
        and pyiceberg would open any of them (a local file, another bucket) with lakegate's rights.

        Raises:
            SourceUnavailable: one lies elsewhere.
        """
        if snapshot is None or self._warehouse.attached_catalog(name) is None:
            return
        location = table.metadata.location
        self._path(name, snapshot.manifest_list, location)
        for manifest in snapshot.manifests(table.io):
            self._path(name, manifest.manifest_path, location)

    def _with_credentials(self, plan: ScanPlan, table: IcebergTable) -> ScanPlan:
        """`plan` with the credentials its attached catalog vends for reading it now, if any.

        Raises:
            SourceUnavailable: the catalog vends no credentials for the table and has no warehouse
                location.
        """
        attached = self._warehouse.attached_catalog(plan.table)
        if attached is None:
            return plan
        vended = attached.vended(plan.table, table)
        if vended is not None:
            return replace(plan, vended=vended)
        # With a warehouse location, every planned file lies under it (`_path`), read with the
        # catalog's own file system; without one, only vended credentials read them.
        if attached.files_root is None and plan.files:
            raise SourceUnavailable(
                f"catalog {attached.name} has no warehouse location, so the files of {plan.table} are read only with "
                "credentials the catalog vends for it, and it vended none",
                table=plan.table,
                catalog=attached.name,
            )
        return plan

    def prune(self, plan: ScanPlan, filters: Sequence[ColumnFilter]) -> ScanPlan:
        """`plan` (of the current snapshot) with only the files that may hold a row passing every
        one of `filters` (policies/sql_filters.py), by the manifests' partition values and column
        statistics. Pruning only ever saves work: when it cannot be done (a filter's column no
        longer has its planned name, pyiceberg cannot convert a value, the manifests cannot be
        read), the whole plan is read.
        """
        if not filters or plan.snapshot_id is None or not plan.files:
            return plan
        key = (plan.table, plan.snapshot_id, plan.columns, tuple(filters))
        with self._lock:
            cached = self._pruned.get(key)
        if cached is not None:
            return replace(cached, vended=plan.vended)
        try:
            pruned = self._pruned_plan(plan, filters)
        except Exception:  # the unpruned plan answers the same, only slower
            log.warning("scan.prune_failed", table=plan.table, exc_info=True)
            return plan
        with self._lock:
            self._pruned[key] = replace(pruned, vended=None)
        return pruned

    def _pruned_plan(self, plan: ScanPlan, filters: Sequence[ColumnFilter]) -> ScanPlan:
        from pyiceberg.expressions import And

        table = self._warehouse.iceberg_table(plan.table)
        current = {field.field_id: field.name for field in table.schema().fields}
        planned = {column.name.lower(): column for column in plan.columns}
        terms = []
        for column_filter in filters:
            column = planned.get(column_filter.column)
            if column is None or current.get(column.field_id) != column.name:
                return plan  # the schema changed since the plan was made: read the whole plan
            terms.append(_expression(column.name, column_filter))
        row_filter = terms[0] if len(terms) == 1 else And(*terms)
        tasks = list(table.scan(snapshot_id=plan.snapshot_id, row_filter=row_filter).plan_files())
        refuse_row_deletes(plan.table, tasks)  # the same snapshot's unpruned plan had none: never raises
        location = table.metadata.location
        files = tuple(
            (self._path(plan.table, task.file.file_path, location), task.file.file_size_in_bytes) for task in tasks
        )
        rows = sum(task.file.record_count for task in tasks)
        return replace(plan, files=files, rows=rows, unpruned_files=len(plan.files), column_bytes=_column_bytes(tasks))

    def _path(self, name: str, location: str, table_location: str) -> str:
        """Where the worker reads a planned file of table `name`: a local path, or "bucket/key" under
        the warehouse, or on an attached catalog's object store (catalog/attached_catalogs.py says
        which of its files may be read).

        Raises:
            BackendError: a file outside the warehouse location on the object store, or not local;
                for an attached catalog, outside its warehouse or in lakegate's own storage.
        """
        attached = self._warehouse.attached_catalog(name)
        if attached is not None:
            try:
                return attached.file_path(location, table_location, forbidden=self._warehouse.own_locations())
            except BackendError as exc:
                raise SourceUnavailable(str(exc), table=name, catalog=attached.name) from exc
        store = self._warehouse.object_store
        if store is None:
            return _local_path(location)
        if not store.in_warehouse(location):
            raise BackendError(
                f"data file {location} is outside the warehouse location {store.iceberg_location}; "
                "lakegate reads only files under it"
            )
        return store.path_of(location)
