"""Planned Iceberg data files on object storage, read in the DuckDB sandbox by field id.

The sandbox cannot open a file on S3: DuckDB's httpfs extension is not available, and external
access is off. So the planned files reach it as pyarrow datasets over the store's S3FileSystem,
which `QueryEngine` registers in the sandbox for the one statement that names them; DuckDB scans a
registered dataset lazily and pushes its projections and filters into pyarrow (row groups are
skipped by their statistics). A registered dataset is the only way from the sandbox to the data.

pyarrow matches a file's columns by name, Iceberg by field id: a column renamed after a file was
written keeps its id but has its old name in that file. So the files are grouped by how their
columns map to field ids (read from each file's footer once: Iceberg files never change), one
dataset per group, and the relation is the UNION ALL of one SELECT per group that gives each
column its current name, casts a promoted type (int read as long; a cast to the same type is free
and keeps the filter pushdown) and reads NULL for a column the group's files do not have.
"""

from __future__ import annotations

import re
import secrets
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from catalog.object_store import ObjectStore
from server.errors import BackendError

if TYPE_CHECKING:
    import pyarrow as pa
    import pyarrow.dataset as ds

    from catalog.iceberg_scan import ScanColumn

__all__ = ["RELATION_PREFIX", "ArrowScans"]

#: Registered datasets are named this plus 16 hex digits: unguessable, and found again in SQL text.
RELATION_PREFIX = "lakegate_arrow_"
_RELATION = re.compile(RELATION_PREFIX + "[0-9a-f]{16}")
_FIELD_ID = b"PARQUET:field_id"
#: Footers read at once when a plan names files not seen before.
FOOTER_READERS = 8

# One file's columns: (field id or None where the file has none, name in the file, Arrow type).
Layout = tuple[tuple[int | None, str, str], ...]


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _parquet() -> ds.ParquetFileFormat:
    import pyarrow.dataset as ds

    # Pre-buffering fetches a row group's column chunks in a few coalesced, concurrent requests
    # rather than one request per chunk: on object storage the round trips are the cost.
    return ds.ParquetFileFormat(default_fragment_scan_options=ds.ParquetFragmentScanOptions(pre_buffer=True))


def _layout(schema: pa.Schema) -> Layout:
    columns = []
    for column in schema:
        raw = (column.metadata or {}).get(_FIELD_ID)
        columns.append((int(raw) if raw is not None else None, column.name, str(column.type)))
    return tuple(columns)


class ArrowScans:
    """Relations over planned data files of one object store, and the datasets behind them."""

    def __init__(self, store: ObjectStore) -> None:
        self._store = store
        self._fragments: dict[str, ds.ParquetFileFragment] = {}
        self._datasets: dict[str, ds.Dataset] = {}
        self._lock = threading.Lock()

    def relation(self, columns: Sequence[ScanColumn], files: Sequence[tuple[str, int]]) -> str:
        """SQL of a relation with `columns` (current names, DuckDB types) over data `files`, given
        as (s3:// URI, size in bytes) from the scan plan. Reads each new file's footer.

        Raises:
            BackendError: a file lies outside the Iceberg location, or a footer cannot be read.
        """
        import pyarrow.dataset as ds

        for uri, _ in files:
            if not self._store.in_warehouse(uri):
                raise BackendError(
                    f"data file {uri} is outside the warehouse location {self._store.iceberg_location}; "
                    "lakegate reads only files under it"
                )
        fragments = self._fragments_of(files)
        groups: dict[Layout, list[ds.ParquetFileFragment]] = {}
        for fragment in fragments:
            groups.setdefault(_layout(fragment.physical_schema), []).append(fragment)
        selects = []
        for layout, members in groups.items():
            dataset = ds.FileSystemDataset(members, members[0].physical_schema, _parquet(), self._store.filesystem)
            selects.append(self._select(columns, layout, self._register(dataset)))
        return "(" + " UNION ALL ".join(selects) + ")"

    def datasets_in(self, sql: str) -> dict[str, ds.Dataset]:
        """The registered datasets that `sql` names, by relation name (for the sandbox to register)."""
        with self._lock:
            return {name: self._datasets[name] for name in set(_RELATION.findall(sql)) if name in self._datasets}

    def _register(self, dataset: ds.Dataset) -> str:
        name = RELATION_PREFIX + secrets.token_hex(8)
        with self._lock:
            self._datasets[name] = dataset
        return name

    @staticmethod
    def _select(columns: Sequence[ScanColumn], layout: Layout, relation: str) -> str:
        by_id = {field_id: name for field_id, name, _ in layout if field_id is not None}
        # A file written without field ids (imported, not written by an Iceberg writer): by name.
        by_name = {name: name for field_id, name, _ in layout if field_id is None}
        selected = []
        for column in columns:
            physical = by_id.get(column.field_id) or by_name.get(column.name)
            value = _quote(physical) if physical is not None else "NULL"
            selected.append(f"CAST({value} AS {column.duckdb_type}) AS {_quote(column.name)}")
        return f"SELECT {', '.join(selected)} FROM {_quote(relation)}"

    def _fragments_of(self, files: Sequence[tuple[str, int]]) -> list[ds.ParquetFileFragment]:
        with self._lock:
            missing = [(uri, size) for uri, size in files if uri not in self._fragments]
        if missing:
            parquet = _parquet()
            filesystem = self._store.filesystem

            def read_footer(file: tuple[str, int]) -> ds.ParquetFileFragment:
                uri, size = file
                fragment = parquet.make_fragment(ObjectStore.path_of(uri), filesystem=filesystem, file_size=size)
                fragment.ensure_complete_metadata()  # kept on the fragment: scans do not read it again
                return fragment

            with ThreadPoolExecutor(max_workers=min(FOOTER_READERS, len(missing))) as pool:
                read = list(pool.map(read_footer, missing))
            with self._lock:
                for (uri, _), fragment in zip(missing, read, strict=True):
                    self._fragments.setdefault(uri, fragment)
        with self._lock:
            return [self._fragments[uri] for uri, _ in files]
