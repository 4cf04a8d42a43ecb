"""Relations over planned Iceberg data files, the only way table data reaches the DuckDB sandbox.

The sandbox may read no file and no URL by name (catalog/query_sandbox.py). For each table a
governed query reads, the gate hands the query worker a `TableSource`: the planned Parquet files
of one snapshot and the columns the governed scan needs (visible columns and row-filter columns,
never a hidden one). The worker turns it into Arrow datasets over exactly those files, registered
in the sandbox for the one call under random names; the relation is SQL over those names, and the
governed scan is the only SQL that references it.

String columns with small dictionaries are read as Arrow dictionaries (see `_small_dictionaries`).

pyarrow matches a file's columns by name, Iceberg by field id: a column renamed after a file was
written keeps its id but has its old name in that file. So the files are grouped by how their
columns map to field ids (read from each file's footer once: Iceberg files never change), one
dataset per group, and the relation is the UNION ALL of one SELECT per group that gives each
column its current name, casts a promoted type (int read as long; a cast to the same type is free
and keeps the filter pushdown) and reads NULL for a column the group's files do not have.

Each dataset records when DuckDB scans it (`TrackedDataset`): that record, not the SQL guard's
analysis, is what the audit says the engine read. A group of small files may be read from the
worker's memory instead (catalog/column_cache.py): the same columns of the same files, held as one
table (`TrackedMemoryDataset`).
"""

from __future__ import annotations

import secrets
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.dataset as ds

from lakegate.catalog.read_counter import bytes_read, read_since

if TYPE_CHECKING:
    from pyarrow.fs import FileSystem

    from lakegate.catalog.column_cache import ColumnCache
    from lakegate.catalog.vended_credentials import VendedCredentials

__all__ = [
    "RELATION_PREFIX",
    "FragmentCache",
    "SourceColumn",
    "TableSource",
    "TrackedDataset",
    "TrackedMemoryDataset",
    "build_relation",
]

#: Registered datasets are named this plus 16 random hex digits, new for every call.
RELATION_PREFIX = "lakegate_rel_"
_FIELD_ID = b"PARQUET:field_id"
#: Footers read at once when a call names files this worker has not seen.
FOOTER_READERS = 8
#: Footers kept per worker; past this the cache starts again (a footer costs one small read).
MAX_CACHED_FRAGMENTS = 100_000
#: A string column is read as an Arrow dictionary when its dictionary page is at most this big
#: (on disk) in every row group: then no chunk fell back to plain pages.
SMALL_DICTIONARY_BYTES = 64 * 1024

# One file's columns: (field id or None where the file has none, name in the file, Arrow field).
Layout = tuple[tuple[int | None, str, str], ...]


@dataclass(frozen=True)
class SourceColumn:
    """A column of a table as the governed scan reads it."""

    name: str  # current name
    duckdb_type: str
    field_id: int  # Iceberg's column identity: files are read by it, not by name


@dataclass(frozen=True)
class TableSource:
    """What the query worker may read of one table for one call."""

    columns: tuple[SourceColumn, ...]  # only the columns the governed scan needs
    files: tuple[tuple[str, int], ...]  # (path on the worker's file system, size in bytes)
    store: str | None = None  # which file system: None the warehouse's, else an attached catalog's
    vended: VendedCredentials | None = field(default=None, repr=False, compare=False)  # the credentials
    # that catalog vended to read these files (catalog/vended_credentials.py); None: its own

    @property
    def store_key(self) -> str:
        """Which file system and credentials read the files: data read with one set of credentials is
        never handed to a read with another (each may reach other files)."""
        if self.store is None:
            return ""
        return self.store if self.vended is None else f"{self.store}#{self.vended.key}"


class _Tracked:
    """Notes every scan DuckDB starts on a dataset, with the columns projected.

    DuckDB (through pyarrow's Scanner.from_dataset) asks the dataset for its scanner options
    whenever it scans it; that is the engine's own account of what it read.
    """

    source: str
    on_scan: Callable[[str, list[str]], None]
    current_names: dict[str, str]  # the file's name of a column -> its current name
    schema: pa.Schema

    def _scanner_options(self, options: dict[str, Any]) -> Any:
        columns = options.get("columns")
        projected = list(columns) if columns is not None else list(self.schema.names)
        self.on_scan(self.source, [self.current_names[name] for name in projected])
        return super()._scanner_options(options)  # type: ignore[misc]  # the pyarrow dataset's


class TrackedDataset(_Tracked, ds.FileSystemDataset):  # type: ignore[misc]  # pyarrow has no type stubs
    """A dataset over data files that notes DuckDB's scans."""


class TrackedMemoryDataset(_Tracked, ds.InMemoryDataset):  # type: ignore[misc]
    """A dataset of data files' columns held in memory (catalog/column_cache.py) that notes DuckDB's
    scans."""


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _parquet(local: bool, dictionary_columns: Sequence[str] = ()) -> ds.ParquetFileFormat:
    # Pre-buffering fetches a row group's column chunks in a few coalesced, concurrent requests
    # rather than one request per chunk: on object storage the round trips are the cost, and reading
    # the other columns' chunks between two wanted ones (up to 8 KiB) is cheaper than a round trip.
    # On local disk a read costs no round trip: only the wanted chunks are read, which is also what
    # the scan estimate counts (ScanPlan.bytes_to_read).
    import pyarrow as pa

    cache = pa.CacheOptions(hole_size_limit=1) if local else pa.CacheOptions()
    return ds.ParquetFileFormat(
        read_options=ds.ParquetReadOptions(dictionary_columns=list(dictionary_columns)),
        default_fragment_scan_options=ds.ParquetFragmentScanOptions(pre_buffer=True, cache_options=cache),
    )


def _small_dictionaries(fragment: ds.ParquetFileFragment) -> list[str]:
    """String columns whose every chunk is dictionary-encoded with a small dictionary.

    Read as Arrow dictionaries they reach DuckDB as dictionary vectors, which it groups and
    compares by code, not by string (a GROUP BY region over 10M rows: 3x faster). A chunk whose
    dictionary grew past the writer's limit fell back to plain pages, which pyarrow would have to
    dictionary-encode row by row: such columns (unique emails, free text) are read plainly.
    """
    metadata = fragment.metadata
    chosen = []
    for index in range(metadata.num_columns):
        chunks = [metadata.row_group(group).column(index) for group in range(metadata.num_row_groups)]
        if chunks and all(
            chunk.physical_type == "BYTE_ARRAY"
            and chunk.has_dictionary_page
            and chunk.data_page_offset - chunk.dictionary_page_offset <= SMALL_DICTIONARY_BYTES
            for chunk in chunks
        ):
            chosen.append(chunks[0].path_in_schema)
    return chosen


def _layout(schema: pa.Schema) -> Layout:
    columns = []
    for column in schema:
        raw = (column.metadata or {}).get(_FIELD_ID)
        columns.append((int(raw) if raw is not None else None, column.name, str(column.type)))
    return tuple(columns)


class FragmentCache:
    """Parquet fragments with their footers read, and their column layouts, by path (one per worker
    process)."""

    def __init__(self, filesystem: FileSystem) -> None:
        from pyarrow.fs import LocalFileSystem

        self.filesystem = filesystem
        self.local = isinstance(filesystem, LocalFileSystem)
        self.footer_bytes = 0  # read from files for footers so far (local files: read_counter)
        self._fragments: dict[str, tuple[ds.ParquetFileFragment, Layout]] = {}
        self._lock = threading.Lock()

    def fragments(self, files: Sequence[tuple[str, int]]) -> list[tuple[ds.ParquetFileFragment, Layout]]:
        """The fragments of `files` with their layouts, reading the footers not read before (several
        at once)."""
        with self._lock:
            found = {path: self._fragments[path] for path, _ in files if path in self._fragments}
        missing = [(path, size) for path, size in files if path not in found]
        if missing:
            parquet = _parquet(self.local)

            def read_footer(file: tuple[str, int]) -> tuple[ds.ParquetFileFragment, Layout]:
                path, size = file
                fragment = parquet.make_fragment(path, filesystem=self.filesystem, file_size=size)
                fragment.ensure_complete_metadata()  # kept on the fragment: scans do not read it again
                if dictionaries := _small_dictionaries(fragment):
                    fragment = _parquet(self.local, dictionaries).make_fragment(
                        path, filesystem=self.filesystem, file_size=size
                    )
                    fragment.ensure_complete_metadata()
                return fragment, _layout(fragment.physical_schema)

            before = bytes_read()
            with ThreadPoolExecutor(max_workers=min(FOOTER_READERS, len(missing))) as pool:
                read = list(pool.map(read_footer, missing))
            self.footer_bytes += read_since(before) or 0
            found.update((path, entry) for (path, _), entry in zip(missing, read, strict=True))
            with self._lock:
                if len(self._fragments) + len(read) > MAX_CACHED_FRAGMENTS:
                    self._fragments.clear()
                self._fragments.update(found)
        return [found[path] for path, _ in files]


def build_relation(
    source: TableSource,
    cache: FragmentCache,
    register: Callable[[str, ds.Dataset], object],
    tag: str,
    on_scan: Callable[[str, list[str]], None],
    columns: ColumnCache | None = None,
) -> str:
    """SQL of a relation with the source's columns (current names, DuckDB types) over its files.

    Each dataset is handed to `register` under a new random name; its scans are reported to
    `on_scan` as (`tag`, columns projected). With `columns`, the files' data comes from memory
    where the cache keeps it.
    """
    sizes = dict(source.files)
    if not source.files:
        # An empty table has no file: an empty relation of the same columns and types.
        empty = ", ".join(f"CAST(NULL AS {c.duckdb_type}) AS {_quote(c.name)}" for c in source.columns)
        return f"(SELECT {empty} LIMIT 0)"
    groups: dict[Layout, list[ds.ParquetFileFragment]] = {}
    for fragment, layout in cache.fragments(source.files):
        groups.setdefault(layout, []).append(fragment)
    selects = []
    for layout, members in groups.items():
        physical = members[0].physical_schema
        by_id = {field_id: name for field_id, name, _ in layout if field_id is not None}
        # A file written without field ids (imported, not written by an Iceberg writer): by name.
        by_name = {name: name for field_id, name, _ in layout if field_id is None}
        wanted = {column.name: by_id.get(column.field_id) or by_name.get(column.name) for column in source.columns}
        current = {found: name for name, found in wanted.items() if found is not None}
        selected = []
        for column in source.columns:
            found = wanted[column.name]
            value = _quote(found) if found is not None else "NULL"
            selected.append(f"CAST({value} AS {column.duckdb_type}) AS {_quote(column.name)}")
        if not current:
            # Files written before every column the scan needs was added: as many rows of NULLs,
            # counted from the footers, and no file is read at all.
            rows = sum(fragment.metadata.num_rows for fragment in members)
            selects.append(f"SELECT {', '.join(selected)} FROM range({rows})")
            continue
        # The dataset holds only the columns the governed scan needs: nothing else of the file can
        # be read through it.
        schema = pa.schema([physical.field(name) for name in physical.names if name in current])
        kept = None
        if columns is not None:
            kept = columns.table(members, sum(sizes[fragment.path] for fragment in members), schema, source.store_key)
        dataset: _Tracked
        if kept is not None:
            dataset = TrackedMemoryDataset(kept)
        else:
            dataset = TrackedDataset(members, schema, members[0].format, cache.filesystem)
        dataset.source, dataset.on_scan, dataset.current_names = tag, on_scan, current
        relation = RELATION_PREFIX + secrets.token_hex(8)
        register(relation, dataset)
        selects.append(f"SELECT {', '.join(selected)} FROM {_quote(relation)}")
    return "(" + " UNION ALL ".join(selects) + ")"
