"""The query engine: a pool of query worker processes that run governed SQL.

A governed query reaches the engine as a `GovernedSql`, whose DuckDB rendering names every table by
a placeholder, and one `TableSource` per placeholder: the planned files of the table's snapshot and
the columns its governed scan needs. The engine hands both to a worker process (catalog/query_worker.py), which
runs them in a locked DuckDB sandbox that can read nothing else (catalog/query_sandbox.py), and
answers the rows, whether they are whole, and which relations the engine scanned.

Each worker runs one query at a time under an operating-system memory limit
(`query.worker_memory_limit`), with DuckDB's own memory limit inside it. The pool holds at most
`query.concurrency` workers (starting one costs about half a second, so they are kept and reused);
a query waits for a free one up to the time limit. A worker that dies (over its memory limit,
or killed after running past the time limit) is replaced by a new one on the next query; the
query that killed it is answered with a clear error and the server goes on serving.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from lakegate.catalog.arrow_relations import TableSource
from lakegate.catalog.query_sandbox import SandboxConfig
from lakegate.catalog.query_worker import Job, WorkerInit
from lakegate.catalog.settings import QuerySettings, parse_bytes
from lakegate.errors import BackendError, InvalidArgument, LakegateError, LimitExceeded
from lakegate.policies.governed_sql import GovernedSql

if TYPE_CHECKING:
    import pyarrow as pa
    from pyarrow.fs import FileSystem

__all__ = ["EngineResult", "QueryEngine", "TableSource"]

log = structlog.get_logger(__name__)

OnCancel = Callable[[Callable[[], None]], None]
#: Receives the percentage of a running query that DuckDB reports done.
OnProgress = Callable[[float], None]
#: How long past the query's own time limit the server waits before it kills a worker that has
#: not answered (its own timer interrupts DuckDB first; this is for a worker that cannot).
KILL_GRACE_S = 5.0
#: How long a new worker may take to start and set up its sandbox.
START_TIMEOUT_S = 60.0
WORKER_MODULE = f"{__package__}.query_worker"


@dataclass(frozen=True)
class EngineResult:
    """What a worker answered for one statement."""

    table: pa.Table | None  # the rows (None for a plan)
    complete: bool  # the rows were read to the end of the result
    scanned: dict[str, list[str]] = field(default_factory=dict)  # placeholder -> columns the engine read
    plan: str | None = None
    bytes_read: int | None = None  # what the worker read from files while running it (local files only)


class _WorkerDied(Exception):
    pass


class _WorkerProcess:
    """One running worker and the server's end of its socket."""

    def __init__(self, init: WorkerInit) -> None:
        self._spill = Path(init.sandbox.spill_dir)
        ours, theirs = socket.socketpair()
        env = {**os.environ, "MALLOC_ARENA_MAX": "2", "OMP_NUM_THREADS": str(init.sandbox.threads)}
        try:
            self.process = subprocess.Popen(
                # -I: the worker imports lakegate from where it is installed, never from the
                # server's working directory or PYTHONPATH.
                [sys.executable, "-I", "-m", WORKER_MODULE, str(theirs.fileno())],
                pass_fds=[theirs.fileno()],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,  # stdout may be the MCP stdio stream: never write to it
                env=env,
            )
        finally:
            theirs.close()
        self.channel = Connection(ours.detach())
        self._send_lock = threading.Lock()
        self.send(init)
        if not self.channel.poll(START_TIMEOUT_S):
            self.kill()
            raise BackendError(f"a query worker did not start within {START_TIMEOUT_S:g} s")
        try:
            ready = json.loads(self.channel.recv_bytes())
        except (EOFError, OSError) as exc:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=5)  # its own exit status, before the kill below
            status = self.process.poll()
            self.kill()
            raise BackendError(f"a query worker failed to start (exit status {status})") from exc
        if ready.get("type") != "ready":
            self.kill()
            raise BackendError(f"a query worker answered {ready!r} when it started")

    def send(self, message: Any) -> None:
        with self._send_lock:
            self.channel.send_bytes(pickle.dumps(message))

    def receive(self, timeout: float) -> tuple[dict[str, Any], bytes | None] | None:
        """The next message (header, payload), or None when none came within `timeout` seconds.

        Raises:
            _WorkerDied: the worker's end closed.
        """
        try:
            if not self.channel.poll(timeout):
                return None
            header: dict[str, Any] = json.loads(self.channel.recv_bytes())
            payload = self.channel.recv_bytes() if header.get("type") == "result" else None
        except (EOFError, OSError) as exc:
            raise _WorkerDied from exc
        return header, payload

    def kill(self) -> int | None:
        """Stop the worker now; its exit status (negative: the signal that ended it)."""
        self.channel.close()
        if self.process.poll() is None:
            self.process.kill()
        try:
            status = self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            return None
        shutil.rmtree(self._spill / f"worker-{self.process.pid}", ignore_errors=True)
        return status


class QueryEngine:
    """A pool of query worker processes, each with one locked DuckDB sandbox."""

    name = "duckdb"

    def __init__(
        self,
        settings: QuerySettings,
        hash_key: str,
        spill_dir: Path,
        filesystem: FileSystem | None = None,
        filesystems: Mapping[str, FileSystem] | None = None,
    ) -> None:
        self.settings = settings
        spill_dir.mkdir(parents=True, exist_ok=True)
        self._init = WorkerInit(
            sandbox=SandboxConfig(
                threads=settings.threads,
                memory_limit=settings.memory_limit,
                spill_dir=str(spill_dir),
                spill_limit=settings.spill_limit,
                hash_key=hash_key,
            ),
            memory_bytes=parse_bytes(settings.worker_memory_limit) if settings.worker_memory_limit else None,
            filesystem=filesystem,
            cache_bytes=parse_bytes(settings.cache_bytes),
            filesystems=dict(filesystems or {}),
        )
        self._idle: list[_WorkerProcess] = []  # most recently used last: its caches are warm
        self._all: list[_WorkerProcess] = []
        self._starting = 0
        # Woken when a worker is released, discarded or fails to start: a waiting query may then
        # take it, or start one in the room it left.
        self._available = threading.Condition()
        self._requests = itertools.count(1)
        self._closed = False

    def warm(self) -> None:
        """Start one worker ahead of the first query, if none is running yet.

        Raises:
            BackendError: the worker cannot start (the first query would fail the same way).
        """
        with self._available:
            running = bool(self._all) or self._starting > 0
        if not running:
            self._release(self._acquire())

    def _acquire(self) -> _WorkerProcess:
        deadline = time.monotonic() + self.settings.timeout_s
        with self._available:
            while True:
                if self._closed:
                    raise BackendError("the query engine is closed")
                if self._idle:
                    return self._idle.pop()
                if len(self._all) + self._starting < self.settings.concurrency:
                    self._starting += 1
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise LimitExceeded(
                        f"lakegate is already running {self.settings.concurrency} queries and none finished in time.",
                        hint="Try again in a moment, or make the query cheaper (filter, aggregate, fewer columns).",
                    )
                self._available.wait(remaining)
        try:
            worker = _WorkerProcess(self._init)
        except BaseException:
            with self._available:
                self._starting -= 1
                self._available.notify()
            raise
        with self._available:
            self._starting -= 1
            self._all.append(worker)
        return worker

    def _release(self, worker: _WorkerProcess) -> None:
        with self._available:
            self._idle.append(worker)
            self._available.notify()

    def _discard(self, worker: _WorkerProcess) -> int | None:
        status = worker.kill()
        with self._available:
            if worker in self._all:
                self._all.remove(worker)
            self._available.notify()
        return status

    def run_page(
        self,
        statement: GovernedSql,
        sources: Mapping[str, TableSource],
        on_cancel: OnCancel | None = None,
        on_progress: OnProgress | None = None,
        max_bytes: int | None = None,
    ) -> EngineResult:
        """Run a governed statement: its DuckDB rendering, the SQL the guard checked (see run_sql)."""
        return self.run_sql(statement.sql, sources, on_cancel, on_progress, max_bytes, statement.masks)

    def explain(self, statement: GovernedSql, sources: Mapping[str, TableSource]) -> str:
        """DuckDB's physical plan of a governed statement (see explain_sql)."""
        return self.explain_sql(statement.sql, sources, statement.masks)

    def run_sql(
        self,
        sql: str,
        sources: Mapping[str, TableSource],
        on_cancel: OnCancel | None = None,
        on_progress: OnProgress | None = None,
        max_bytes: int | None = None,
        masks: Mapping[str, str] | None = None,
    ) -> EngineResult:
        """Run one statement and return its result as Arrow (with `max_bytes`, reading stops once the
        rows read hold more than that many bytes: the caller can only return so much). `masks` maps
        the statement's name of each mask function to its method (see governed_scan). The sandbox
        runs any text it is handed here: what it can read is its wall, whatever the SQL says.

        Raises:
            LimitExceeded: the query ran past the time limit or out of memory, or one row is far
                over `max_bytes`.
            InvalidArgument: DuckDB rejected the SQL (binder, type or conversion errors: the message says why).
            BackendError: anything else went wrong in DuckDB or the worker.
        """
        job = Job(
            sql, dict(sources), False, self.settings.timeout_s, max_bytes, on_progress is not None, dict(masks or {})
        )
        header, payload = self._call(job, on_cancel, on_progress)
        import pyarrow as pa

        table = pa.ipc.open_stream(payload).read_all()
        scanned = {str(tag): [str(c) for c in columns] for tag, columns in header.get("scanned", {}).items()}
        read = header.get("bytes_read")
        return EngineResult(table, bool(header["complete"]), scanned, bytes_read=None if read is None else int(read))

    def explain_sql(self, sql: str, sources: Mapping[str, TableSource], masks: Mapping[str, str] | None = None) -> str:
        """DuckDB's physical plan for `sql`, without running it.

        Raises:
            InvalidArgument: DuckDB cannot plan the SQL.
            BackendError: anything else went wrong in DuckDB or the worker.
        """
        job = Job(sql, dict(sources), True, self.settings.timeout_s, None, False, dict(masks or {}))
        header, _ = self._call(job, None, None)
        return str(header["plan"])

    def _call(
        self, job: Job, on_cancel: OnCancel | None, on_progress: OnProgress | None
    ) -> tuple[dict[str, Any], bytes | None]:
        worker = self._acquire()
        request = next(self._requests)
        healthy = False
        try:
            try:
                worker.send(("run", request, job))
            except OSError as exc:
                raise _WorkerDied from exc
            if on_cancel is not None:
                on_cancel(lambda: _quietly(worker.send, ("cancel", request)))
            deadline = time.monotonic() + job.timeout_s + KILL_GRACE_S
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    log.error("query.worker_unresponsive", pid=worker.process.pid)
                    raise self._timeout()
                message = worker.receive(min(remaining, 1.0))
                if message is None:
                    continue
                header, payload = message
                if header["type"] == "progress":
                    if on_progress is not None:
                        try:
                            on_progress(float(header["done"]))
                        except Exception:  # progress is best effort; the query goes on
                            log.warning("query.progress_failed", exc_info=True)
                    continue
                # A worker that ran out of memory may hold on to what it could not free (or fail to
                # start the threads of its next query): it is replaced.
                healthy = header.get("kind") != "memory"
                if header["type"] == "error":
                    raise self._translate(header)
                return header, payload
        except _WorkerDied:
            status = self._discard(worker)
            log.error("query.worker_died", pid=worker.process.pid, status=status)
            raise self._died(status) from None
        finally:
            if healthy:
                self._release(worker)
            else:
                self._discard(worker)

    def _timeout(self) -> LimitExceeded:
        return LimitExceeded(
            f"The query ran longer than {self.settings.timeout_s:g} s and was stopped.",
            hint="Filter on the partition column (e.g. a date range), aggregate, or select fewer columns.",
        )

    def _memory(self) -> LimitExceeded:
        return LimitExceeded(
            f"The query used too much memory and was stopped (memory budget {self.settings.memory_limit}).",
            hint="Aggregate before joining, filter earlier, select fewer columns, or build smaller lists and strings.",
        )

    def _died(self, status: int | None) -> LakegateError:
        # Under its memory limit a worker that cannot allocate may abort or crash rather than raise.
        if status is not None and -status in (signal.SIGKILL, signal.SIGABRT, signal.SIGSEGV, signal.SIGBUS):
            return self._memory()
        if status == 1:  # a MemoryError the worker could not even report
            return self._memory()
        return BackendError(f"a query worker exited with status {status}")

    def _translate(self, header: Mapping[str, Any]) -> LakegateError:
        kind, message = header.get("kind"), str(header.get("message", ""))
        if kind == "invalid":
            return InvalidArgument(
                f"DuckDB could not run the query: {message}",
                hint="Fix the SQL (DuckDB dialect) and call query again; describe_dataset lists columns and types.",
            )
        if kind == "timeout":
            return self._timeout()
        if kind == "memory":
            return self._memory()
        if kind == "row_too_large":
            return LimitExceeded(
                f"One row of the result is about {int(header.get('bytes', 0)):,} bytes, far more than the "
                "byte budget of a call.",
                hint="Select fewer or shorter columns (e.g. left(text, 200)).",
            )
        if kind == "cancelled":
            # The gate has already answered (and audited) the cancelled call; nobody reads this.
            return BackendError("the client cancelled the query")
        if kind == "refused":
            # Only SQL that got past the guard can reach this: the sandbox held.
            return BackendError(f"the DuckDB sandbox refused an operation: {message}")
        return BackendError(f"DuckDB failed: {message}")

    def close(self) -> None:
        with self._available:
            self._closed = True
            workers = list(self._all)
            self._all.clear()
            self._idle.clear()
            self._available.notify_all()
        for worker in workers:
            worker.kill()


def _quietly(send: Callable[[Any], None], message: Any) -> None:
    with contextlib.suppress(OSError):  # the worker is gone: nothing left to cancel
        send(message)
