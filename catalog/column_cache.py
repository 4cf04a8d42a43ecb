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

Only tables whose planned files are small next to the budget are kept (at most a quarter of it),
so that one large scan cannot push everything else out; larger ones are scanned from their files as
before. A table is kept whole (every permitted column of its files, read once), and the least
recently used columns go first when the budget is full.
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
FILE_READERS = 8


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
        if file_bytes > self.max_bytes // 4:
            return None
        names = list(schema.names)
        held = [self._get((store, fragment.path), names) for fragment in fragments]
        missing = [index for index, arrays in enumerate(held) if arrays is None]
        if missing:
            with ThreadPoolExecutor(max_workers=min(FILE_READERS, len(missing))) as pool:
                read = list(pool.map(lambda index: _read(fragments[index], names), missing))
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


def _read(fragment: ds.ParquetFileFragment, names: list[str]) -> list[pa.Array]:
    table = fragment.to_table(columns=names)
    return [table.column(name).combine_chunks() for name in names]
