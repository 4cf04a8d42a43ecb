"""Columns of data files decoded into a query worker's memory, so that a table read again is read
from memory, not from its files.

An agent asks many questions of the same few tables; each question read the same Parquet files
again, and on small tables the cost of a query was mostly opening and decoding many small files
(a count over the small demo's 48 order files: 6 ms from the files, under 1 ms from memory). Iceberg
data files never change once written, so a column of a file, decoded, is good for as long as the
file is planned: the cache keys it by (file path, the column's name in the file) and never needs
to invalidate it.

What a query sees does not change: the worker still builds each relation from the call's own
`TableSource` (its planned files, its permitted columns), and only the table it builds comes from
memory instead of a file scan. A cached column of a file that this call was not handed, or a
column it may not read, never reaches its relation.

Only tables whose planned files, and whose decoded data, are small next to the budget are kept (at
most a quarter of it each: the files are decoded in small batches and given up on past that, since
one long text repeated compresses to nothing), so that one large scan cannot push everything else
out; others are scanned from their files as before. A table is kept whole (every permitted column
of its files, read once), and the least recently used columns go first when the budget is full.
So the first query of a table in a worker reads all the columns its caller may read (the audit
record's `bytes_read` says so), and later ones read nothing from files; quotas and scan limits
count, every time, the columns the query reads. `explain` neither fills nor uses the cache.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
import pyarrow.dataset as ds

__all__ = ["ColumnCache"]

#: Files read at once when a table is first kept.
FILE_READERS = 4
#: Rows decoded at a time while a table is read into memory (the most held beyond the budget is
#: about FILE_READERS batches).
BATCH_ROWS = 512


class ColumnCache:
    """Decoded columns by (file system, file path, name in the file), within `max_bytes` (one per
    worker)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._arrays: OrderedDict[tuple[str, str, str], pa.Array] = OrderedDict()
        self._held = 0
        self._lock = threading.Lock()

    @property
    def held_bytes(self) -> int:
        return self._held

    def table(
        self, fragments: Sequence[ds.ParquetFileFragment], file_bytes: int, schema: pa.Schema, store: str = ""
    ) -> pa.Table | None:
        """The columns of `schema` in `fragments` (files of `file_bytes` in all, on file system
        `store`) as one table in memory, reading the files whose columns are not held yet; None when
        they are too big to keep.
        """
        share = self.max_bytes // 4
        if file_bytes > share:
            return None
        names = list(schema.names)
        held = [self._get((store, fragment.path), names) for fragment in fragments]
        missing = [index for index, arrays in enumerate(held) if arrays is None]
        if missing:
            # Decoded data can be far larger than its compressed files (one long text repeated):
            # the files are read in small batches and given up on once they pass the share.
            budget = _Budget(share - sum(array.nbytes for arrays in held if arrays is not None for array in arrays))
            try:
                with ThreadPoolExecutor(max_workers=min(FILE_READERS, len(missing))) as pool:
                    read = list(pool.map(lambda index: _read(fragments[index], names, budget), missing))
            except _TooBig:
                return None
            for index, arrays in zip(missing, read, strict=True):
                held[index] = arrays
                self._put((store, fragments[index].path), names, arrays)
        tables = [pa.Table.from_arrays(arrays, schema=schema) for arrays in held if arrays is not None]
        return pa.concat_tables(tables).combine_chunks()

    def _get(self, file: tuple[str, str], names: list[str]) -> list[pa.Array] | None:
        with self._lock:
            keys = [(*file, name) for name in names]
            if not all(key in self._arrays for key in keys):
                return None
            for key in keys:
                self._arrays.move_to_end(key)
            return [self._arrays[key] for key in keys]

    def _put(self, file: tuple[str, str], names: list[str], arrays: list[pa.Array]) -> None:
        with self._lock:
            for name, array in zip(names, arrays, strict=True):
                key = (*file, name)
                if key in self._arrays:
                    continue
                self._arrays[key] = array
                self._held += array.nbytes
            while self._held > self.max_bytes and self._arrays:
                _, dropped = self._arrays.popitem(last=False)
                self._held -= dropped.nbytes


class _TooBig(Exception):
    pass


class _Budget:
    """Bytes left to decode for one table, shared by the threads reading its files."""

    def __init__(self, left: int) -> None:
        self.left = left
        self._lock = threading.Lock()

    def take(self, count: int) -> None:
        with self._lock:
            self.left -= count
            if self.left < 0:
                raise _TooBig


def _read(fragment: ds.ParquetFileFragment, names: list[str], budget: _Budget) -> list[pa.Array]:
    batches = []
    for batch in fragment.to_batches(columns=names, batch_size=BATCH_ROWS, use_threads=False):
        budget.take(batch.nbytes)
        batches.append(batch)
    schema = batches[0].schema if batches else pa.schema([fragment.physical_schema.field(name) for name in names])
    table = pa.Table.from_batches(batches, schema=schema)
    return [table.column(name).combine_chunks() for name in names]
