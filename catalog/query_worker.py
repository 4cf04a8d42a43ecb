"""A query worker: a process of its own that runs governed SQL in one locked DuckDB sandbox.

The server starts workers (catalog/query_engine.py) and talks to each over a socket pair:

    server -> worker   pickled ("init", WorkerInit) once, then ("run", id, Job) and ("cancel", id)
    worker -> server   a JSON header per message: {"type": "progress" | "result" | "plan" | "error", ...};
                       a "result" is followed by one more message, the rows as an Arrow IPC stream

Why a process: a query the engine's own memory limit does not cover (a huge list built in one
expression) must not grow the server. The worker runs under an operating-system limit on its
memory (RLIMIT_DATA), so such a query fails in the worker, or kills it, and the server answers
"too much memory" and starts another. It also puts the sandbox's file system rights out of the
server's reach: DuckDB here may read nothing by name (catalog/query_sandbox.py), and the only data
it sees are the datasets registered for the call it runs.

For each call the worker builds the relations of the `TableSource`s it was handed
(catalog/arrow_relations.py), substitutes them for their placeholders in the governed SQL,
registers their datasets under new random names, runs the statement with a time limit, and sends
back the rows (at most about the byte budget of one page), with the engine's own account of which
relations it scanned and (on local files) the bytes of data it read from files for the call. Then
it unregisters them. Small tables are read from the worker's memory once they have been read
(catalog/column_cache.py).
"""

from __future__ import annotations

import json
import os
import pickle
import queue
import re
import resource
import secrets
import socket
import sys
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from multiprocessing.connection import Connection
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lakegate.catalog.arrow_relations import FragmentCache, TableSource, build_relation
from lakegate.catalog.column_cache import ColumnCache
from lakegate.catalog.query_sandbox import (
    SandboxConfig,
    classify_error,
    open_sandbox,
    require_allowed,
    require_one_select,
)
from lakegate.catalog.read_counter import bytes_read, read_since

if TYPE_CHECKING:
    import duckdb
    import pyarrow as pa
    from pyarrow.fs import FileSystem

__all__ = ["Job", "WorkerInit", "main"]

#: Rows per Arrow batch read from DuckDB: small, so that reading can stop soon after the byte budget.
FETCH_BATCH_ROWS = 64
#: How often a running query's progress is read and reported.
PROGRESS_INTERVAL_S = 1.0
#: A result is cut to this many times the byte budget (in Arrow bytes) before it is sent: the
#: server can only return one page, and sizes it exactly in JSON.
SEND_FACTOR = 2
#: File systems made with vended credentials kept at once (each holds its files' footers).
MAX_VENDED_STORES = 64


@dataclass(frozen=True)
class WorkerInit:
    sandbox: SandboxConfig
    memory_bytes: int | None  # the operating-system limit of the whole worker
    filesystem: FileSystem | None  # None: the local file system
    cache_bytes: int = 0  # decoded table data kept in memory (catalog/column_cache.py); 0: none
    filesystems: Mapping[str, FileSystem] = field(default_factory=dict)  # attached catalog -> its files


@dataclass(frozen=True)
class Job:
    sql: str  # the governed SQL, naming each table's relation by its placeholder ("lakegate_source_...")
    sources: Mapping[str, TableSource]  # placeholder -> what may be read for it
    explain: bool
    timeout_s: float
    max_bytes: int | None
    progress: bool
    # The call's name for each mask function -> its method: the worker renames them to its macros.
    masks: Mapping[str, str] = field(default_factory=dict)


@dataclass
class _Running:
    request: int
    interrupted: str | None = None  # "timeout" or "cancelled"
    scanned: dict[str, set[str]] = field(default_factory=dict)


class Worker:
    def __init__(
        self,
        channel: Connection,
        sandbox: duckdb.DuckDBPyConnection,
        cache: FragmentCache,
        mask_functions: Mapping[str, str],
        *,
        columns: ColumnCache | None = None,
        filesystems: Mapping[str, FileSystem] | None = None,
        count_reads: bool = False,
    ) -> None:
        self._channel = channel
        self._columns = columns
        self._filesystems: Mapping[str, FileSystem] = dict(filesystems or {})
        self._stores: dict[str, FragmentCache] = {}  # TableSource.store_key -> the footers of its files
        self._dropped_footer_bytes = 0  # of the stores dropped (so that a call's read count stays right)
        self._count_reads = count_reads  # local files: the process's read counter measures what a query read
        self._sandbox = sandbox
        self._cache = cache
        self._mask_functions = dict(mask_functions)  # method -> this sandbox's macro
        self._jobs: queue.SimpleQueue[tuple[int, Job] | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._running: _Running | None = None

    def _send(self, header: Mapping[str, Any], payload: bytes | None = None) -> None:
        self._channel.send_bytes(json.dumps(header).encode())
        if payload is not None:
            self._channel.send_bytes(payload)

    def listen(self) -> None:
        """Read the server's messages (in a thread of its own, so that a cancel reaches a running query)."""
        while True:
            try:
                message = pickle.loads(self._channel.recv_bytes())
            except (EOFError, OSError):
                self._jobs.put(None)  # the server went away: stop
                return
            if message[0] == "run":
                self._jobs.put((message[1], message[2]))
            elif message[0] == "cancel":
                self._interrupt(message[1], "cancelled")

    def _interrupt(self, request: int, reason: str) -> None:
        with self._lock:
            if self._running is not None and self._running.request == request and not self._running.interrupted:
                self._running.interrupted = reason
                self._sandbox.interrupt()

    def _footer_bytes(self) -> int:
        held = sum(cache.footer_bytes for cache in self._stores.values())
        return self._cache.footer_bytes + held + self._dropped_footer_bytes

    def _footers(self, source: TableSource) -> FragmentCache:
        """The footer cache of the file system that reads `source`'s files: the warehouse's, an
        attached catalog's, or one made with the credentials that catalog vended for the table.

        Raises:
            OSError: no file system was configured for that catalog (its settings are incomplete).
            BackendError: pyarrow cannot create an S3 client with the vended credentials.
        """
        if source.store is None:
            return self._cache
        key = source.store_key
        if key not in self._stores:
            if source.vended is not None:
                filesystem = source.vended.filesystem(source.store)
            elif source.store in self._filesystems:
                filesystem = self._filesystems[source.store]
            else:
                raise OSError(f"the data files of catalog {source.store} cannot be reached: check its settings")
            vended = [name for name in self._stores if "#" in name]
            if source.vended is not None and len(vended) >= MAX_VENDED_STORES:
                # Vended credentials are replaced about hourly: drop the longest held.
                self._dropped_footer_bytes += self._stores.pop(vended[0]).footer_bytes
            self._stores[key] = FragmentCache(filesystem)
        return self._stores[key]

    def serve(self) -> None:
        while (item := self._jobs.get()) is not None:
            request, job = item
            self._run(request, job)

    def _run(self, request: int, job: Job) -> None:
        running = _Running(request)
        with self._lock:
            self._running = running
        registered: list[str] = []
        timer = threading.Timer(job.timeout_s, self._interrupt, args=(request, "timeout"))
        timer.daemon = True

        def register(name: str, dataset: Any) -> None:
            self._sandbox.register(name, dataset)
            registered.append(name)

        def on_scan(tag: str, columns: list[str]) -> None:
            running.scanned.setdefault(tag, set()).update(columns)

        # What the call reads from files: its relations' data not held in memory, and its scan.
        before, footers = (bytes_read() if self._count_reads else None), self._footer_bytes()
        try:
            sql = job.sql
            for placeholder, source in job.sources.items():
                cache = self._footers(source)
                # explain reads no data: it neither fills nor uses the memory of tables
                columns = None if job.explain else self._columns
                relation = build_relation(source, cache, register, placeholder, on_scan, columns)
                sql = sql.replace(f'"{placeholder}"', relation)
            for name, method in job.masks.items():
                sql = re.sub(re.escape(name), self._mask_functions[method], sql, flags=re.IGNORECASE)
            require_one_select(self._sandbox, sql)
            require_allowed(self._sandbox, sql, registered, self._mask_functions.values())
            timer.start()
            if job.explain:
                rows = self._sandbox.execute(f"EXPLAIN {sql}").fetchall()
                self._send({"type": "plan", "plan": "\n".join(str(row[-1]) for row in rows)})
            else:
                table, complete = self._execute(sql, job)
                read = None if before is None else read_since(before)
                if read is not None:
                    read -= self._footer_bytes() - footers  # data only: footers are read once
                table, complete, oversize = _trim(table, complete, job.max_bytes)
                if oversize is not None:
                    self._send({"type": "error", "kind": "row_too_large", "message": "", "bytes": oversize})
                else:
                    scanned = {tag: sorted(columns) for tag, columns in running.scanned.items()}
                    header = {"type": "result", "complete": complete, "scanned": scanned, "bytes_read": read}
                    self._send(header, _ipc(table))
        except BaseException as exc:  # every failure is answered; the worker goes on serving
            kind, message = classify_error(exc, job.sql)
            if running.interrupted is not None and kind in ("timeout", "backend", "invalid"):
                kind = running.interrupted
            self._send({"type": "error", "kind": kind, "message": message})
        finally:
            timer.cancel()
            if timer.is_alive():
                timer.join()  # an interrupt in flight must not reach the next call's query
            with self._lock:
                self._running = None
            for name in registered:
                self._sandbox.unregister(name)

    def _execute(self, sql: str, job: Job) -> tuple[pa.Table, bool]:
        """Run `sql`; while it runs, this thread reads DuckDB's progress and reports it."""
        if not job.progress:
            return _fetch(self._sandbox, sql, job.max_bytes)
        outcome: dict[str, Any] = {}

        def execute() -> None:
            try:
                outcome["result"] = _fetch(self._sandbox, sql, job.max_bytes)
            except BaseException as exc:  # handed to the calling thread, which raises it
                outcome["error"] = exc

        runner = threading.Thread(target=execute, name="lakegate-query", daemon=True)
        runner.start()
        try:
            while runner.is_alive():
                runner.join(PROGRESS_INTERVAL_S)
                if runner.is_alive() and (done := self._sandbox.query_progress()) >= 0:
                    self._send({"type": "progress", "done": float(done)})
        finally:
            if runner.is_alive():
                self._sandbox.interrupt()
                runner.join()
        if "error" in outcome:
            raise outcome["error"]
        result: tuple[pa.Table, bool] = outcome["result"]
        return result


def _fetch(connection: duckdb.DuckDBPyConnection, sql: str, max_bytes: int | None) -> tuple[pa.Table, bool]:
    """The result, read until it holds more than `max_bytes` (Arrow bytes), and whether it is whole."""
    import pyarrow as pa

    reader = connection.sql(sql).to_arrow_reader(batch_size=FETCH_BATCH_ROWS)
    batches = []
    held = 0
    complete = True
    for batch in reader:
        batches.append(batch)
        held += batch.nbytes
        if max_bytes is not None and held > max_bytes:
            complete = False  # enough to fill (or overflow) the page; the rest is never read
            break
    return pa.Table.from_batches(batches, schema=reader.schema), complete


def _trim(table: pa.Table, complete: bool, max_bytes: int | None) -> tuple[pa.Table, bool, int | None]:
    """At most SEND_FACTOR x `max_bytes` of rows (at least one), or the size of a first row that is
    alone over that much."""
    if max_bytes is None or table.nbytes <= SEND_FACTOR * max_bytes:
        return table, complete, None
    low, high = 0, table.num_rows  # the most rows that fit: binary search on the slices' sizes
    while low < high:
        middle = (low + high + 1) // 2
        if table.slice(0, middle).nbytes <= SEND_FACTOR * max_bytes:
            low = middle
        else:
            high = middle - 1
    if low == 0:
        return table, complete, table.slice(0, 1).nbytes
    return table.slice(0, low), False, None


def _ipc(table: pa.Table) -> bytes:
    import pyarrow as pa

    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return bytes(sink.getvalue().to_pybytes())


def _limit_memory(limit: int | None) -> None:
    if limit is not None:
        resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))


def run_worker(channel: Connection) -> None:
    """Serve one server connection until it closes."""
    init: WorkerInit = pickle.loads(channel.recv_bytes())
    _limit_memory(init.memory_bytes)
    from pyarrow.fs import LocalFileSystem

    # A spill directory of its own: DuckDB may read its temp directory, and another worker's spill
    # files hold another call's rows.
    spill = Path(init.sandbox.spill_dir) / f"worker-{os.getpid()}"
    spill.mkdir(parents=True, exist_ok=True)
    config = replace(init.sandbox, spill_dir=str(spill), mask_suffix=f"_{secrets.token_hex(8)}")
    sandbox = open_sandbox(config)
    cache = FragmentCache(init.filesystem or LocalFileSystem())
    columns = ColumnCache(init.cache_bytes) if init.cache_bytes else None
    worker = Worker(
        channel,
        sandbox,
        cache,
        config.mask_functions(),
        columns=columns,
        filesystems=init.filesystems,
        count_reads=init.filesystem is None,
    )
    channel.send_bytes(json.dumps({"type": "ready", "pid": os.getpid()}).encode())
    threading.Thread(target=worker.listen, name="lakegate-worker-listen", daemon=True).start()
    worker.serve()


def main() -> None:
    """`python -m catalog.query_worker FD`: serve the socket inherited as file descriptor FD."""
    fd = int(sys.argv[1])
    channel = Connection(socket.socket(fileno=fd).detach())
    try:
        run_worker(channel)
    finally:
        channel.close()


if __name__ == "__main__":
    main()
