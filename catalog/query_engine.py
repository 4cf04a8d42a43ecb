"""DuckDB sandboxes that run lakegate's rewritten SQL.

Each sandbox is an in-memory DuckDB database set up once and then locked:
- external access is off, except for the Iceberg warehouse's data directory (`allowed_directories`),
  so that even SQL that slipped past the guard cannot read a local file, a URL or another database;
  with the data files on object storage no directory is allowed at all, and the planned files reach
  the sandbox as Arrow datasets registered for the one statement that names them
  (catalog/arrow_scan.py);
- extensions are neither installed nor auto-loaded, and Python replacement scans are off, so a
  table name never resolves to a file or a Python object;
- the mask macros are defined, the time zone is UTC, and the memory limit and thread count of one
  query are set; then `lock_configuration` makes every setting final.

What the sandbox does not do: it may read every file of the warehouse directory, so column masks,
hidden columns and row filters are enforced by the guard's rewrite alone (policies/sql_guard.py),
with DuckDB's own parser checking that exactly one SELECT runs. The sandbox is the wall against
files, URLs, other databases and extensions outside the warehouse, and against changed settings.

A pool holds `concurrency` sandboxes (creating one costs ~40 ms, reusing one costs nothing): a
query takes one, runs with a time limit enforced by `interrupt()`, and gives it back, so each query
has its own memory budget and no agent can take every core.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from policies.masks import mask_macros
from server.errors import BackendError, InvalidArgument, LakegateError, LimitExceeded
from server.settings import QuerySettings

if TYPE_CHECKING:
    import duckdb
    import pyarrow as pa

__all__ = ["QueryEngine"]

log = structlog.get_logger(__name__)

OnCancel = Callable[[Callable[[], None]], None]
#: Receives the percentage of a running query that DuckDB reports done.
OnProgress = Callable[[float], None]
#: How often a running query's progress is read and reported.
PROGRESS_INTERVAL_S = 1.0
#: The Arrow datasets (pyarrow Dataset objects) a statement scans, by the relation name it uses.
Relations = Callable[[str], Mapping[str, Any]]


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


class QueryEngine:
    """A pool of locked DuckDB sandboxes that may read only `allowed_dirs`, and the Arrow datasets
    that `relations` finds named in a statement."""

    def __init__(
        self,
        allowed_dirs: list[Path],
        settings: QuerySettings,
        hash_key: str,
        spill_dir: Path,
        relations: Relations | None = None,
    ) -> None:
        self.allowed_dirs = [str(path.resolve()).rstrip("/") + "/" for path in allowed_dirs]
        self._relations = relations
        self.spill_dir = spill_dir
        self.settings = settings
        self._hash_key = hash_key
        self._idle: queue.LifoQueue[duckdb.DuckDBPyConnection] = queue.LifoQueue()
        self._created = 0
        self._all: list[duckdb.DuckDBPyConnection] = []
        self._lock = threading.Lock()

    def sandbox(self) -> duckdb.DuckDBPyConnection:
        """A new locked sandbox (the pool uses this; tests use it to prove the sandbox alone holds)."""
        import duckdb

        connection = duckdb.connect(
            ":memory:",
            config={"threads": self.settings.threads, "memory_limit": self.settings.memory_limit},
        )
        for statement in mask_macros(self._hash_key):
            connection.execute(statement)
        directories = ", ".join(_literal(path) for path in self.allowed_dirs)
        for setting in (
            "SET TimeZone = 'UTC'",
            # Spill under the state directory, never into the server's working directory, and boundedly.
            f"SET temp_directory = {_literal(str(self.spill_dir))}",
            f"SET max_temp_directory_size = {_literal(self.settings.spill_limit)}",
            "SET python_enable_replacements = false",
            "SET autoinstall_known_extensions = false",
            "SET autoload_known_extensions = false",
            # Progress is measured (query_progress) but never printed.
            "SET enable_progress_bar = true",
            "SET enable_progress_bar_print = false",
            f"SET allowed_directories = [{directories}]",
            "SET enable_external_access = false",
            "SET lock_configuration = true",
        ):
            connection.execute(setting)
        return connection

    def _acquire(self) -> duckdb.DuckDBPyConnection:
        with self._lock:
            if self._idle.empty() and self._created < self.settings.concurrency:
                self._created += 1
                try:
                    connection = self.sandbox()
                except Exception as exc:
                    self._created -= 1
                    raise BackendError(f"cannot create a DuckDB sandbox: {exc}") from exc
                self._all.append(connection)
                return connection
        try:
            return self._idle.get(timeout=self.settings.timeout_s)
        except queue.Empty:
            raise LimitExceeded(
                f"lakegate is already running {self.settings.concurrency} queries and none finished in time.",
                hint="Try again in a moment, or make the query cheaper (filter, aggregate, fewer columns).",
            ) from None

    def _release(self, connection: duckdb.DuckDBPyConnection) -> None:
        self._idle.put(connection)

    def _attach(self, connection: duckdb.DuckDBPyConnection, sql: str) -> list[str]:
        # Registered for this statement only, so that a pooled sandbox holds no dataset between
        # queries; register is an explicit view, not a replacement scan, so it works when locked.
        names = []
        for name, dataset in (self._relations(sql) if self._relations else {}).items():
            connection.register(name, dataset)
            names.append(name)
        return names

    @staticmethod
    def _detach(connection: duckdb.DuckDBPyConnection, names: list[str]) -> None:
        for name in names:
            try:
                connection.unregister(name)
            except Exception:  # a leftover view harms nobody: only a plan's SQL names it
                log.warning("query.unregister_failed", relation=name, exc_info=True)

    def run(self, sql: str, on_cancel: OnCancel | None = None, on_progress: OnProgress | None = None) -> pa.Table:
        """Run one statement and return its whole result as Arrow (see `run_page` for what it raises)."""
        return self.run_page(sql, on_cancel, on_progress)[0]

    def run_page(
        self,
        sql: str,
        on_cancel: OnCancel | None = None,
        on_progress: OnProgress | None = None,
        max_bytes: int | None = None,
    ) -> tuple[pa.Table, bool]:
        """Run one statement and return its result as Arrow, reporting progress every second, and
        whether the result was read to its end.

        With `max_bytes`, reading stops once the rows read hold more than that many bytes (in
        Arrow): the caller can only return so much, and a result of huge cells must not fill the
        server's memory (DuckDB's memory limit does not cover the Python side).

        Raises:
            LimitExceeded: the query ran past the time limit or out of its memory budget.
            InvalidArgument: DuckDB rejected the SQL (binder, type or conversion errors: the message says why).
            BackendError: anything else went wrong in DuckDB.
        """
        connection = self._acquire()
        state = {"timed_out": False, "cancelled": False}

        def interrupt(reason: str) -> None:
            state[reason] = True
            connection.interrupt()

        timer = threading.Timer(self.settings.timeout_s, interrupt, args=("timed_out",))
        timer.daemon = True
        attached: list[str] = []
        try:
            if on_cancel is not None:
                on_cancel(lambda: interrupt("cancelled"))
            _require_one_select(connection, sql)
            attached = self._attach(connection, sql)
            timer.start()
            return _execute(connection, sql, on_progress, max_bytes)
        except Exception as exc:
            raise self._translate(exc, state) from exc
        finally:
            timer.cancel()
            if timer.is_alive():
                timer.join()  # an interrupt in flight must not reach the next caller's query
            self._detach(connection, attached)
            self._release(connection)

    def explain(self, sql: str) -> str:
        """DuckDB's physical plan for `sql`, without running it.

        Raises:
            InvalidArgument: DuckDB cannot plan the SQL.
            BackendError: anything else went wrong in DuckDB.
        """
        connection = self._acquire()
        attached: list[str] = []
        try:
            _require_one_select(connection, sql)
            attached = self._attach(connection, sql)
            rows = connection.execute(f"EXPLAIN {sql}").fetchall()
        except Exception as exc:
            raise self._translate(exc, {}) from exc
        finally:
            self._detach(connection, attached)
            self._release(connection)
        return "\n".join(str(row[-1]) for row in rows)

    def _translate(self, exc: Exception, state: dict[str, bool]) -> LakegateError:
        import duckdb

        if isinstance(exc, LakegateError):
            return exc
        if state.get("cancelled"):
            # The gate has already answered (and audited) the cancelled call; nobody reads this.
            return BackendError("the client cancelled the query")
        if isinstance(exc, duckdb.InterruptException) or state.get("timed_out"):
            return LimitExceeded(
                f"The query ran longer than {self.settings.timeout_s:g} s and was stopped.",
                hint="Filter on the partition column (e.g. a date range), aggregate, or select fewer columns.",
            )
        if isinstance(exc, duckdb.OutOfMemoryException):
            return LimitExceeded(
                f"The query needed more than its memory budget ({self.settings.memory_limit}).",
                hint="Aggregate before joining, filter earlier, or select fewer columns.",
            )
        if isinstance(exc, duckdb.PermissionException):
            # Only SQL that got past the guard can reach this: the sandbox held.
            return BackendError(f"the DuckDB sandbox refused an operation: {exc}")
        client_errors = (
            duckdb.BinderException,
            duckdb.CatalogException,
            duckdb.ParserException,
            duckdb.ConversionException,
            duckdb.InvalidInputException,
            duckdb.OutOfRangeException,
            duckdb.NotImplementedException,
            duckdb.TypeMismatchException,
        )
        if isinstance(exc, client_errors):
            message = str(exc).split("\n\nLINE", 1)[0].strip()
            return InvalidArgument(
                f"DuckDB could not run the query: {message}",
                hint="Fix the SQL (DuckDB dialect) and call query again; describe_dataset lists columns and types.",
            )
        return BackendError(f"DuckDB failed: {type(exc).__name__}: {exc}")

    def close(self) -> None:
        with self._lock:
            for connection in self._all:
                connection.close()
            self._all.clear()
            self._created = 0
            self._idle = queue.LifoQueue()


def _require_one_select(connection: duckdb.DuckDBPyConnection, sql: str) -> None:
    """DuckDB's own parser must see exactly one SELECT: a second wall behind the guard's parser, so
    that a difference between sqlglot and DuckDB can never run a statement that changes a pooled
    sandbox (a macro redefined there would unmask the next caller's query)."""
    import duckdb

    statements = connection.extract_statements(sql)
    if len(statements) != 1 or statements[0].type != duckdb.StatementType.SELECT:
        kinds = ", ".join(str(statement.type) for statement in statements)
        raise BackendError(f"refused to run SQL that DuckDB reads as [{kinds}], not one SELECT")


#: Rows per Arrow batch read from DuckDB: small, so that reading can stop soon after the byte budget.
FETCH_BATCH_ROWS = 64


def _fetch(connection: duckdb.DuckDBPyConnection, sql: str, max_bytes: int | None) -> tuple[pa.Table, bool]:
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


def _execute(
    connection: duckdb.DuckDBPyConnection, sql: str, on_progress: OnProgress | None, max_bytes: int | None
) -> tuple[pa.Table, bool]:
    """Run `sql`; while it runs, the calling thread reads DuckDB's progress and reports it.

    The connection is never handed back while its query still runs: if reporting fails (the client
    went away), the query is interrupted and waited for before the error goes up.
    """
    if on_progress is None:
        return _fetch(connection, sql, max_bytes)
    outcome: dict[str, Any] = {}

    def execute() -> None:
        try:
            outcome["result"] = _fetch(connection, sql, max_bytes)
        except BaseException as exc:  # handed to the calling thread, which raises it
            outcome["error"] = exc

    worker = threading.Thread(target=execute, name="lakegate-query", daemon=True)
    worker.start()
    try:
        while worker.is_alive():
            worker.join(PROGRESS_INTERVAL_S)
            if worker.is_alive() and (done := connection.query_progress()) >= 0:
                try:
                    on_progress(float(done))
                except Exception:  # progress is best effort; the query goes on
                    log.warning("query.progress_failed", exc_info=True)
    finally:
        if worker.is_alive():
            connection.interrupt()
            worker.join()
    if "error" in outcome:
        raise outcome["error"]
    result: tuple[pa.Table, bool] = outcome["result"]
    return result
