"""The storage behind lakegate: Iceberg tables in a SQL catalog and Lance datasets in a directory.

Everything else in lakegate reaches pyiceberg and lancedb through `Warehouse`, and every error
they raise is translated by `translate_errors`, so callers only ever see `lakegate.errors` types.

Layout under the state directory::

    <state_dir>/iceberg/catalog.db      pyiceberg SqlCatalog "lakegate" (SQLite)
    <state_dir>/iceberg/warehouse/      Iceberg data and metadata files
    <state_dir>/lance/                  one Lance dataset per "namespace.table"

With `catalog_uri` (the production profile: a SQLAlchemy URL such as
``postgresql+psycopg://host/db``) the SqlCatalog lives in that database instead of catalog.db.
With `object_store` (catalog/object_store.py) the Iceberg data and metadata files and the Lance
datasets live on S3 instead of under the state directory, shared by replicas on other hosts.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Container, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import structlog

from lakegate.catalog.change_snapshots import unapproved_snapshots
from lakegate.errors import BackendError, LakegateError, NotFound

if TYPE_CHECKING:
    from lakegate.catalog.attached_catalogs import AttachedCatalog
    from lakegate.catalog.attached_documents import AttachedDocuments
    from lakegate.catalog.document_search import PassageLayout
    from lakegate.catalog.iceberg_scan import ScanPlanner
    from lakegate.catalog.object_store import ObjectStore
    from lakegate.catalog.query_engine import QueryEngine
    from lakegate.catalog.settings import QuerySettings
    from lakegate.catalog.spark_engine import SparkEngine

if TYPE_CHECKING:
    from lancedb.db import LanceDBConnection
    from lancedb.table import Table as LanceTable
    from pyarrow.fs import FileSystem
    from pyiceberg.catalog.sql import SqlCatalog
    from pyiceberg.table import Table as IcebergTable

__all__ = [
    "LIST_DATASETS_HINT",
    "AttachedReport",
    "ColumnInfo",
    "DatasetInfo",
    "VersionInfo",
    "Warehouse",
    "translate_errors",
]

log = structlog.get_logger(__name__)

CATALOG_NAME = "lakegate"
#: How long the embedded catalog's namespaces are kept for the checks of attached datasets' names.
NAMESPACES_KEPT_S = 1.0
#: How often a serving process reads whether a refresh of the attached catalogs was asked for.
REFRESH_CHECK_S = 1.0
LIST_DATASETS_HINT = "Call list_datasets to see the datasets you can use."
# Lance keeps the column documentation in the Arrow field metadata under this key.
LANCE_DOC_KEY = "doc"


@dataclass(frozen=True)
class ColumnInfo:
    """One column: Iceberg type string ("long", "decimal(12, 2)") or Arrow type string for Lance."""

    name: str
    type: str
    required: bool
    doc: str | None
    field_id: int | None = None  # Iceberg's identity of the column (it survives renames); None for Lance


@dataclass(frozen=True)
class VersionInfo:
    """One Iceberg snapshot or Lance version."""

    id: int
    timestamp: datetime
    operation: str
    summary: dict[str, str]


@dataclass(frozen=True)
class DatasetInfo:
    """What the storage layer knows about a dataset, without reading its data."""

    name: str
    kind: Literal["iceberg", "lance"]
    columns: tuple[ColumnInfo, ...]
    partitioning: tuple[str, ...]
    row_count: int
    last_updated: datetime | None
    current_version: int | None
    versions: tuple[VersionInfo, ...]  # newest first
    properties: dict[str, str]


@contextmanager
def translate_errors(action: str, name: str | None = None) -> Iterator[None]:
    """Turn pyiceberg, lancedb and pyarrow errors into lakegate errors.

    `action` says what was being done ("describe sales.orders") for the log.

    Raises:
        NotFound: pyiceberg reported a missing table or namespace (needs `name`).
        BackendError: any other failure of the storage libraries, with the original chained.
    """
    # Imported here so that importing this module stays cheap; pyiceberg's exceptions module is tiny.
    from pyiceberg.exceptions import NoSuchNamespaceError, NoSuchTableError

    try:
        yield
    except LakegateError:
        raise
    except (NoSuchTableError, NoSuchNamespaceError) as exc:
        raise NotFound(f"No dataset named {name or '?'!r}.", hint=LIST_DATASETS_HINT) from exc
    except Exception as exc:
        raise BackendError(f"{action} failed: {type(exc).__name__}: {exc}") from exc


class Warehouse:
    """The Iceberg catalog and the Lance directory under one state directory.

    Connections open on first use, so constructing a Warehouse touches no files.
    """

    def __init__(
        self,
        state_dir: Path,
        *,
        catalog_uri: str | None = None,
        object_store: ObjectStore | None = None,
        attached: Mapping[str, AttachedCatalog] | None = None,
        documents: Mapping[str, AttachedDocuments] | None = None,
        refresh_requested: Callable[[], float] | None = None,
    ) -> None:
        """`refresh_requested` gives the time of the latest request to list the attached catalogs
        again (server/catalog_refresh.py), read at most once a second."""
        self.state_dir = state_dir
        self.catalog_uri = catalog_uri
        self.object_store = object_store
        # Catalogs lakegate did not create: their tables are the datasets "<catalog>.<namespace>.<table>".
        self.attached: dict[str, AttachedCatalog] = dict(attached or {})
        # Lance datasets lakegate did not create, served for search under their configured names.
        self.documents: dict[str, AttachedDocuments] = dict(documents or {})
        self._iceberg: SqlCatalog | None = None
        self._lance: LanceDBConnection | None = None
        self._lock = threading.Lock()
        # describe() runs on every tool call; its result only changes with a new snapshot/version.
        self._described: dict[tuple[str, int | None, int, int], DatasetInfo] = {}
        # Loaded tables, kept while the catalog still points at the metadata file they were read from.
        self._tables: dict[str, IcebergTable] = {}
        self._engine: QueryEngine | None = None
        self._spark: SparkEngine | None = None
        self._namespaces: tuple[float, frozenset[str]] = (float("-inf"), frozenset())
        self._refresh_requested = refresh_requested
        self._refresh_checked = float("-inf")  # monotonic time the request was last read
        self._refresh_seen = 0.0  # the latest request acted on
        self._planner: ScanPlanner | None = None

    @property
    def iceberg_data_dir(self) -> Path:
        """Where the Iceberg data and metadata files live without an object store (the only
        directory SQL may read then)."""
        return self.state_dir / "iceberg" / "warehouse"

    @property
    def models_dir(self) -> Path:
        """Where files made from the embedding model live (the query encoder's ONNX graph)."""
        return self.state_dir / "models"

    @property
    def iceberg_location(self) -> str:
        """The Iceberg warehouse location: an s3:// URI with an object store, else a file:// URI."""
        if self.object_store is not None:
            return self.object_store.iceberg_location
        return self.iceberg_data_dir.resolve().as_uri()

    # -- connections ---------------------------------------------------------------------------

    @property
    def iceberg(self) -> SqlCatalog:
        """The pyiceberg SqlCatalog (created with its directories on first use).

        Raises:
            BackendError: the catalog database cannot be opened.
        """
        with self._lock:
            if self._iceberg is None:
                with translate_errors("open the Iceberg catalog"):
                    from pyiceberg.catalog.sql import SqlCatalog

                    from lakegate.catalog.sealed_file_io import seal

                    root = self.state_dir / "iceberg"
                    # SQLite needs the directory of catalog.db; the data files need theirs unless on S3.
                    (root if self.object_store else self.iceberg_data_dir).mkdir(parents=True, exist_ok=True)
                    store = self.object_store.iceberg_properties() if self.object_store else {}
                    self._iceberg = seal(
                        SqlCatalog(
                            CATALOG_NAME,
                            uri=self.catalog_uri or f"sqlite:///{root / 'catalog.db'}",
                            warehouse=self.iceberg_location,
                            **store,
                        )
                    )
            return self._iceberg

    def query_engine(self, settings: QuerySettings) -> QueryEngine:
        """The query worker pool that reads this warehouse's Iceberg files (created on first use).

        The workers' sandboxes may read no file by name: the planned files of each call reach them
        as Arrow datasets over this file system (the object store's, or the local one).
        """
        from lakegate.catalog.query_engine import QueryEngine

        with self._lock:
            if self._engine is None:
                self._engine = QueryEngine(
                    settings,
                    self._mask_key(),
                    spill_dir=self.state_dir / "spill",
                    filesystem=self.object_store.filesystem if self.object_store else None,
                    filesystems=self._attached_filesystems(),
                )
            return self._engine

    def spark_engine(self, settings: QuerySettings) -> SparkEngine:
        """The Spark Connect engine for queries routed to Spark (created on first use).

        Raises:
            ConfigurationError: query.spark.remote is not set.
        """
        from lakegate.catalog.spark_engine import SparkEngine

        with self._lock:
            if self._spark is None:
                self._spark = SparkEngine(settings, self._mask_key())
            return self._spark

    def own_locations(self) -> list[str]:
        """Where lakegate keeps its own files (state directory, object store locations): no attached
        catalog's table may name a file there."""
        places = [str(self.state_dir.resolve())]
        if self.object_store is not None:
            places += [self.object_store.iceberg_location, self.object_store.lance_location]
        return places

    def _attached_filesystems(self) -> dict[str, FileSystem]:
        """Each attached catalog's file system (one whose secrets or client are missing is left out:
        its tables' queries fail, naming the catalog, and the others are served)."""
        found: dict[str, FileSystem] = {}
        for name, attached in self.attached.items():
            try:
                found[name] = attached.filesystem
            except LakegateError as exc:
                log.warning("catalog.files_unreachable", catalog=name, error=str(exc))
        return found

    @property
    def scans(self) -> ScanPlanner:
        """Plans reads of Iceberg tables for the query engine (cached by table and snapshot)."""
        from lakegate.catalog.iceberg_scan import ScanPlanner

        with self._lock:
            if self._planner is None:
                self._planner = ScanPlanner(self)
            return self._planner

    def _mask_key(self) -> str:
        # The key of the hash mask: random per state directory, so hashes cannot be confirmed by
        # hashing a guess elsewhere, and stable, so hashed values stay joinable across calls.
        path = self.state_dir / "mask.key"
        if not path.is_file():
            import secrets

            path.parent.mkdir(parents=True, exist_ok=True)
            candidate = path.with_suffix(f".{secrets.token_hex(4)}.tmp")
            candidate.write_text(secrets.token_hex(32))
            candidate.chmod(0o600)
            try:
                os.link(candidate, path)  # first writer wins; others read its key
            except FileExistsError:
                pass
            finally:
                candidate.unlink()
        return path.read_text().strip()

    @property
    def lance(self) -> LanceDBConnection:
        """The lancedb connection to `<state_dir>/lance`, or to the object store's Lance location
        (created on first use).

        Raises:
            BackendError: the directory cannot be opened.
        """
        with self._lock:
            if self._lance is None:
                with translate_errors("open the Lance directory"):
                    import lancedb
                    from lancedb.db import LanceDBConnection

                    path: Path | str
                    if self.object_store is not None:
                        path = self.object_store.lance_location
                        connection = lancedb.connect(path, storage_options=self.object_store.lance_storage_options())
                    else:
                        path = self.state_dir / "lance"
                        path.mkdir(parents=True, exist_ok=True)
                        connection = lancedb.connect(path)
                    # A path or s3:// URI always gives the native connection class; the check narrows
                    # the type for the calls the remote one lacks (drop_table(ignore_missing=...)).
                    if not isinstance(connection, LanceDBConnection):
                        raise BackendError(f"lancedb opened {path} as {type(connection).__name__}")
                    self._lance = connection
            return self._lance

    def close(self) -> None:
        """Release the catalog's database connections; the Warehouse may be reopened by using it."""
        with self._lock:
            if self._iceberg is not None:
                self._iceberg.engine.dispose()
            self._iceberg = None
            self._lance = None
            self._described.clear()
            if self._engine is not None:
                self._engine.close()
            self._engine = None
            if self._spark is not None:
                self._spark.close()
            self._spark = None
            self._planner = None

    # -- listing -------------------------------------------------------------------------------

    def iceberg_table_names(self) -> list[str]:
        """Sorted names of the Iceberg tables: "namespace.table" in the embedded catalog, and
        "catalog.namespace.table" in each attached catalog that can be listed (one that cannot is
        left out, and the log says why).

        Raises:
            BackendError: the embedded catalog cannot be read.
        """
        catalog = self.iceberg
        with translate_errors("list Iceberg tables"):
            names = [
                ".".join(identifier)
                for namespace in catalog.list_namespaces()
                for identifier in catalog.list_tables(namespace)
            ]
        for report in self._attached_reports(relist=False):
            if report.problem is not None:
                log.warning("catalog.unavailable", catalog=report.catalog, error=report.problem)
            names += report.served
        return sorted(names)

    def _attached_dataset(self, name: str) -> AttachedCatalog:
        """The attached catalog that serves dataset `name`.

        A name is served only where it cannot be read as another resource's: its catalog is not
        named like a namespace of the embedded catalog (a rule `sales.*` would grant it), and no
        shorter part of it is a dataset (`lake.sales.orders.x` is also column x of
        `lake.sales.orders`: that table's column rules would grant it).

        Raises:
            NotFound: no attached catalog serves that name.
        """
        attached = self.attached_catalog(name)
        if attached is None:
            raise NotFound(f"No dataset named {name!r}.", hint=LIST_DATASETS_HINT)
        self._follow_refresh_requests()
        if attached.name in self._embedded_namespaces() or _shadowed(name, attached.listed()):
            raise NotFound(f"No dataset named {name!r}.", hint=LIST_DATASETS_HINT)
        return attached

    def _embedded_namespaces(self) -> frozenset[str]:
        """The first namespace levels of the embedded catalog's tables and Lance datasets, read at
        most once a second (every lookup of an attached dataset asks)."""
        now = time.monotonic()
        with self._lock:
            if now - self._namespaces[0] < NAMESPACES_KEPT_S:
                return self._namespaces[1]
        found = frozenset(
            [str(namespace[0]) for namespace in self.iceberg.list_namespaces() if namespace]
            + [name.partition(".")[0] for name in self.lance_dataset_names()]
        )
        with self._lock:
            self._namespaces = (now, found)
        return found

    def attached_report(self) -> list[AttachedReport]:
        """What each attached catalog serves now, and what it does not and why (for operators:
        `lakegate catalog list`). Lists every catalog again."""
        return self._attached_reports(relist=True)

    def _attached_reports(self, *, relist: bool) -> list[AttachedReport]:
        """Each attached catalog's listing (kept for its refresh_s, or listed again with `relist`),
        split into what is served and what is not: the same rules as `_attached_dataset`."""
        if not self.attached:
            return []
        if not relist:
            self._follow_refresh_requests()
        embedded = self._embedded_namespaces()
        reports = []
        for attached in self.attached.values():
            if attached.name in embedded:
                reports.append(AttachedReport(attached.name, problem=_NAME_TAKEN))
                continue
            try:
                listed = attached.refresh() if relist else attached.table_names()
            except LakegateError as exc:
                reports.append(AttachedReport(attached.name, problem=str(exc)))
                continue
            known = set(listed)
            served = tuple(name for name in listed if not _shadowed(name, known))
            shadowed = tuple(name for name in listed if _shadowed(name, known))
            reports.append(AttachedReport(attached.name, served, shadowed, attached.skipped()))
        return reports

    def _follow_refresh_requests(self) -> None:
        """Expire every attached catalog's listing and loaded tables when a refresh was asked for
        since the last one acted on (`lakegate catalog refresh`); the request is read at most once
        a second."""
        if self._refresh_requested is None:
            return
        now = time.monotonic()
        with self._lock:
            if now - self._refresh_checked < REFRESH_CHECK_S:
                return
            self._refresh_checked = now
        latest = self._refresh_requested()
        with self._lock:
            if latest <= self._refresh_seen:
                return
            self._refresh_seen = latest
        log.info("catalog.refresh_requested", catalogs=sorted(self.attached))
        for attached in self.attached.values():
            attached.expire()

    def documents_report(self) -> list[AttachedReport]:
        """Whether each attached dataset of documents is served now, opening each (for operators:
        `lakegate catalog list`)."""
        reports = []
        own = set(self._own_lance_names())
        for name, attached in sorted(self.documents.items()):
            if name in own or name in self.iceberg_table_names():
                reports.append(AttachedReport(name, problem=_DATASET_TAKEN))
                continue
            try:
                attached.open(forbidden=self.own_locations())
            except LakegateError as exc:
                reports.append(AttachedReport(name, problem=str(exc)))
                continue
            reports.append(AttachedReport(name, served=(name,)))
        return reports

    def attached_catalog(self, name: str) -> AttachedCatalog | None:
        """The attached catalog that dataset `name` (three parts or more) is in, if any."""
        if name.count(".") < 2:
            return None
        return self.attached.get(name.partition(".")[0])

    def lance_dataset_names(self) -> list[str]:
        """Sorted names of the Lance datasets: lakegate's own, and each attached one whose name none
        of its own has (an attached dataset's files are not opened to list it).

        Raises:
            BackendError: the Lance directory cannot be read.
        """
        own = self._own_lance_names()
        return sorted({*own, *self.documents})

    def attached_documents(self, name: str) -> AttachedDocuments | None:
        """The attached dataset of documents served as `name`, if it is one (a name lakegate's own
        Lance datasets have is theirs)."""
        attached = self.documents.get(name)
        if attached is None or name in self._own_lance_names():
            return None
        return attached

    def passage_layout(self, name: str) -> PassageLayout:
        """Which column of Lance dataset `name` holds each part of a passage."""
        from lakegate.catalog.document_search import OWN_LAYOUT

        attached = self.attached_documents(name)
        return OWN_LAYOUT if attached is None else attached.layout

    def _own_lance_names(self) -> list[str]:
        connection = self.lance
        names: list[str] = []
        with translate_errors("list Lance datasets"):
            # list_tables is paginated; follow the page token to the end.
            page_token: str | None = None
            while True:
                page = connection.list_tables(page_token=page_token)
                names.extend(page.tables)
                page_token = page.page_token
                if not page_token:
                    break
        return sorted(names)

    def dataset_names(self) -> list[str]:
        """Sorted names of every Iceberg table and every Lance dataset.

        Raises:
            BackendError: either store cannot be read.
        """
        return sorted({*self.iceberg_table_names(), *self.lance_dataset_names()})

    def is_empty(self) -> bool:
        """True when there is no Iceberg table and no Lance dataset.

        Raises:
            BackendError: either store cannot be read.
        """
        return not self.iceberg_table_names() and not self.lance_dataset_names()

    # -- opening -------------------------------------------------------------------------------

    def kind_of(self, name: str) -> Literal["iceberg", "lance"]:
        """Which store holds dataset `name`; Iceberg wins if both hold one of that name.

        Raises:
            NotFound: neither store has it.
            BackendError: a store cannot be read.
        """
        if name.count(".") >= 2:
            self._attached_dataset(name).identifier(name)
            return "iceberg"
        if name.count(".") != 1:
            raise NotFound(f"No dataset named {name!r}.", hint=LIST_DATASETS_HINT)
        with translate_errors(f"look up {name}", name):
            if self.iceberg.table_exists(name):
                return "iceberg"
        if name in self.lance_dataset_names():
            return "lance"
        raise NotFound(f"No dataset named {name!r}.", hint=LIST_DATASETS_HINT)

    def iceberg_table(self, name: str) -> IcebergTable:
        """Load Iceberg table `name`.

        Raises:
            NotFound: no such table.
            BackendError: the catalog or the table metadata cannot be read.
        """
        if name.count(".") >= 2:
            return self._attached_dataset(name).load_table(name)
        if name.count(".") != 1:
            raise NotFound(f"No dataset named {name!r}.", hint=LIST_DATASETS_HINT)
        catalog = self.iceberg
        with translate_errors(f"load Iceberg table {name}", name):
            location = _metadata_location(catalog, name)
            with self._lock:
                known = self._tables.get(name)
            if known is not None and location is not None and known.metadata_location == location:
                return known  # unchanged since it was loaded: no metadata file to read and parse
            try:
                table = catalog.load_table(name)
            except Exception:
                with self._lock:
                    self._tables.pop(name, None)
                raise
            with self._lock:
                self._tables[name] = table
            return table

    def lance_table(self, name: str) -> LanceTable:
        """Open Lance dataset `name`.

        Raises:
            NotFound: no such dataset.
            BackendError: the dataset cannot be opened.
        """
        # lancedb says "not found" with a plain ValueError, and its table_exists() is not supported
        # on local directories; check the listing first so that a missing dataset is a NotFound.
        if name not in self._own_lance_names():
            attached = self.documents.get(name)
            if attached is None:
                raise NotFound(f"No dataset named {name!r}.", hint=LIST_DATASETS_HINT)
            return attached.open(forbidden=self.own_locations())
        connection = self.lance
        with translate_errors(f"open Lance dataset {name}", name):
            return connection.open_table(name)

    # -- describing ----------------------------------------------------------------------------

    def describe(self, name: str, *, max_versions: int = 20) -> DatasetInfo:
        """Schema, partitioning, row count and recent versions of `name`, read from metadata only.

        Raises:
            NotFound: no dataset of that name (the hint says how to list datasets).
            BackendError: the metadata cannot be read.
        """
        if self.kind_of(name) == "iceberg":
            return self._describe_iceberg(name, max_versions)
        return self._describe_lance(name, max_versions)

    def _cached(self, key: tuple[str, int | None, int, int]) -> DatasetInfo | None:
        with self._lock:
            return self._described.get(key)

    def _remember(self, key: tuple[str, int | None, int, int], info: DatasetInfo) -> DatasetInfo:
        with self._lock:
            self._described[key] = info
        return info

    def _describe_iceberg(self, name: str, max_versions: int) -> DatasetInfo:
        table = self.iceberg_table(name)
        with translate_errors(f"describe {name}", name):
            metadata = table.metadata
            key = (name, metadata.current_snapshot_id, metadata.current_schema_id, max_versions)
            if (cached := self._cached(key)) is not None:
                return cached
            schema = table.schema()
            columns = tuple(
                ColumnInfo(field.name, str(field.field_type), field.required, field.doc, field.field_id)
                for field in schema.fields
            )
            partitioning = tuple(
                _partition_label(str(part.transform), schema.find_column_name(part.source_id) or "?")
                for part in table.spec().fields
            )
            current = table.current_snapshot()
            summary = current.summary if current is not None else None
            # The snapshot summary carries the table's row count; no data file is opened.
            row_count = int(summary["total-records"] or 0) if summary is not None else 0
            hidden = unapproved_snapshots(metadata.snapshots, table.properties)
            snapshots = sorted(
                (s for s in metadata.snapshots if s.snapshot_id not in hidden),
                key=lambda s: s.timestamp_ms,
                reverse=True,
            )
            versions = tuple(
                VersionInfo(
                    id=snapshot.snapshot_id,
                    timestamp=_from_millis(snapshot.timestamp_ms),
                    operation=snapshot.summary.operation.value if snapshot.summary else "unknown",
                    summary=dict(snapshot.summary.additional_properties) if snapshot.summary else {},
                )
                for snapshot in snapshots[:max_versions]
            )
            info = DatasetInfo(
                name=name,
                kind="iceberg",
                columns=columns,
                partitioning=partitioning,
                row_count=row_count,
                last_updated=_from_millis(metadata.last_updated_ms),
                current_version=metadata.current_snapshot_id,
                versions=versions,
                properties=dict(table.properties),
            )
        return self._remember(key, info)

    def _describe_lance(self, name: str, max_versions: int) -> DatasetInfo:
        table = self.lance_table(name)
        with translate_errors(f"describe {name}", name):
            version = int(table.version)
            key = (name, version, 0, max_versions)
            if (cached := self._cached(key)) is not None:
                return cached
            schema = table.schema
            columns = tuple(
                ColumnInfo(field.name, str(field.type), not field.nullable, _field_doc(field.metadata))
                for field in schema
            )
            history = sorted(table.list_versions(), key=lambda v: int(v["version"]), reverse=True)
            versions = tuple(_lance_version(entry) for entry in history[:max_versions])
            current = next((v for v in versions if v.id == version), None)
            info = DatasetInfo(
                name=name,
                kind="lance",
                columns=columns,
                partitioning=(),
                # count_rows without a filter is answered from the manifest, not by scanning.
                row_count=int(table.count_rows()),
                last_updated=current.timestamp if current else None,
                current_version=version,
                versions=versions,
                properties=self._lance_properties(name, schema.metadata),
            )
        return self._remember(key, info)

    def _lance_properties(self, name: str, metadata: dict[bytes, bytes] | None) -> dict[str, str]:
        """A Lance dataset's schema metadata. An attached one's is not shown (text another team wrote
        would reach agents as its description or owner): only the description lakegate.toml gives."""
        attached = self.attached_documents(name)
        if attached is None:
            return _decode_metadata(metadata)
        return {"comment": attached.spec.description} if attached.spec.description else {}


@dataclass(frozen=True)
class AttachedReport:
    """One attached catalog as lakegate sees it."""

    catalog: str
    served: tuple[str, ...] = ()  # dataset names
    shadowed: tuple[str, ...] = ()  # names inside another dataset's name: not served
    skipped: tuple[str, ...] = ()  # identifiers that are not plain names: not served
    problem: str | None = None  # why nothing of it is served


_NAME_TAKEN = (
    "the embedded catalog has a namespace of that name: the catalog's tables are not served (rename it in "
    "lakegate.toml)"
)


_DATASET_TAKEN = "lakegate has a dataset of that name, which is served instead (rename it in lakegate.toml)"


def _shadowed(name: str, datasets: Container[str]) -> bool:
    """Whether a shorter part of `name` (three parts or more) is itself one of `datasets`."""
    parts = name.split(".")
    return any(".".join(parts[:end]) in datasets for end in range(3, len(parts)))


def _partition_label(transform: str, column: str) -> str:
    # Iceberg spells transforms "month", "bucket[16]", "identity"; show identity as the bare column.
    return column if transform == "identity" else f"{transform}({column})"


def _from_millis(millis: int) -> datetime:
    return datetime.fromtimestamp(millis / 1000, tz=UTC)


def _lance_version(entry: dict[str, Any]) -> VersionInfo:
    timestamp: datetime = entry["timestamp"]
    # lancedb returns a naive datetime in the machine's local time zone; astimezone() on a naive
    # value assumes exactly that, so this is correct whatever TZ the server runs under.
    timestamp = timestamp.astimezone(UTC)
    number = int(entry["version"])
    return VersionInfo(
        id=number,
        timestamp=timestamp,
        # Lance keeps no operation name per version; the first version is always the creation.
        operation="create" if number == 1 else "write",
        summary={str(k): str(v) for k, v in (entry.get("metadata") or {}).items()},
    )


def _decode_metadata(metadata: dict[bytes, bytes] | None) -> dict[str, str]:
    return {key.decode("utf-8", "replace"): value.decode("utf-8", "replace") for key, value in (metadata or {}).items()}


def _field_doc(metadata: dict[bytes, bytes] | None) -> str | None:
    return _decode_metadata(metadata).get(LANCE_DOC_KEY)


def _metadata_location(catalog: SqlCatalog, name: str) -> str | None:
    """Where the catalog says table `name`'s current metadata file is (one indexed row read), or
    None when it holds no such row."""
    from pyiceberg.catalog import Catalog
    from pyiceberg.catalog.sql import IcebergTables
    from sqlalchemy import select
    from sqlalchemy.orm import Session

    namespace = Catalog.namespace_to_string(Catalog.namespace_from(name))
    with Session(catalog.engine) as session:
        location: str | None = session.scalar(
            select(IcebergTables.metadata_location).where(
                IcebergTables.catalog_name == catalog.name,
                IcebergTables.table_namespace == namespace,
                IcebergTables.table_name == Catalog.table_name_from(name),
            )
        )
    return location
