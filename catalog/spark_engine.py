"""The Spark engine: governed SQL on an Apache Spark cluster, through Spark Connect.

The same governed statement the DuckDB engine runs (catalog/query_engine.py, a `GovernedSql`)
reaches this engine with one `TableSource` per placeholder: the planned Parquet files of one Iceberg
snapshot and the columns its governed scan needs. For each call, on a Spark Connect session of its own:

- each placeholder is a temporary view over exactly those files, read with a schema of only those
  columns whose fields carry their Iceberg field ids (`parquet.field.id`), so that Spark reads
  columns by id as pyiceberg does (renamed, widened, dropped-and-re-added columns are right), and
  can read no other column or file of the table. A session keeps its views for later calls handed
  the same files and columns (the same snapshot, the same permitted columns), so that Spark does
  not list the files again;
- the statement's tree is rendered in Spark's dialect, its placeholders named by the views and its
  masks by the session's functions (policies/spark_sql.py: an unsupported construct is refused,
  and every function must be on the Spark allow-list, in sqlglot's reading and in Spark's plan);
- hash, partial and redact masks are the session's temporary SQL functions, with outputs identical
  to the DuckDB macros (the keyed hash gives the same value); a `null` mask is a typed NULL.

Sessions run with `spark.sql.runSQLOnFiles=false` (no path reads), ANSI mode and UTC. Spark is not
a sandbox the way the DuckDB worker is: the allow-list and the views are the walls, and nothing a
query can name reaches a file the gate did not plan. The hash mask's key is sent to the cluster (as
hex inside the function's body); it is cut out of every plan and error this engine returns.

What the engine read is Spark's own account: the query's input files (each must be a planned file
of this call, or the call fails), and the columns of each view its plan reads (each view's fields
are named by its placeholder, random per call, and Spark prunes the fields a query does not read).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import re
import secrets
import threading
import time
import warnings
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, unquote, urlsplit

import structlog

from lakegate.catalog.arrow_relations import SourceColumn, TableSource
from lakegate.catalog.query_engine import EngineResult, OnCancel, OnProgress
from lakegate.catalog.query_sandbox import without_values
from lakegate.catalog.settings import QuerySettings, SparkSettings
from lakegate.errors import (
    BackendError,
    ConfigurationError,
    InvalidArgument,
    InvalidQuery,
    LakegateError,
    LimitExceeded,
)
from lakegate.extras import require_extra
from lakegate.policies.governed_sql import GovernedSql
from lakegate.policies.spark_sql import check_spark_plan, plan_sections, to_spark

if TYPE_CHECKING:
    from pyspark.sql.connect.session import SparkSession

__all__ = ["SparkEngine", "register_views", "spark_type"]

log = structlog.get_logger(__name__)

#: Session settings that must hold before a session serves a query.
SESSION_CONF = {
    "spark.sql.runSQLOnFiles": "false",
    # No ${env:X}, ${system:X}, ${spark:X} substitution in the SQL text (inside strings and names too):
    # it answered the Connect server's token, server paths and environment variables.
    "spark.sql.variable.substitute": "false",
    "spark.sql.ansi.enabled": "true",
    "spark.sql.session.timeZone": "UTC",
    "spark.sql.parquet.fieldId.read.enabled": "true",
    # A column whose id no file has reads NULL (a column added after the file was written).
    "spark.sql.parquet.fieldId.read.ignoreMissing": "true",
    # Plans show a scan's first file whole (not cut at 100 characters): it says which view it reads.
    "spark.sql.maxMetadataStringLength": "8192",
    # No predicates inferred from the query's own (country = name AND f(country) -> f(name)): Spark
    # placed such a predicate ahead of the row filter, where an error on a filtered row was an oracle.
    "spark.sql.constraintPropagation.enabled": "false",
    # Plans list every field (not "... 5 more fields"): explain shows the whole scan.
    "spark.sql.debug.maxToStringFields": "100000",
    # Plans are never cut short (a cut analysed plan could not be checked whole; the check refuses one).
    "spark.sql.maxPlanStringLength": "2147483632b",
}
#: A row of a result may hold at most this many times the call's byte budget: a larger one fails the
#: call on the executors, before it reaches the Spark Connect server or lakegate.
ROW_BUDGET_FACTOR = 4
ROW_TOO_LARGE = "lakegate_row_too_large"
_DECIMAL = re.compile(r"^DECIMAL\((\d+),\s*(\d+)\)$")
_SPARK_TYPES = {
    "BOOLEAN": "BOOLEAN",
    "INTEGER": "INT",
    "BIGINT": "BIGINT",
    "FLOAT": "FLOAT",
    "DOUBLE": "DOUBLE",
    "DATE": "DATE",
    "TIMESTAMP": "TIMESTAMP_NTZ",
    "TIMESTAMPTZ": "TIMESTAMP",
    "VARCHAR": "STRING",
    "BLOB": "BINARY",
}
_LOCATION = re.compile(r"Location: \w+(?:\(\d+ paths?\))? ?\[[^\]]*\]")
_FILE_URI = re.compile(r"file:/\S*")
_BINARY_LITERAL = re.compile(r"\b0x[0-9A-Fa-f]+")
_HEX_RUN = re.compile(r"[0-9A-Fa-f]{8,}")
_SOURCE = re.compile(r"`?lakegate_(?:source|view)_[0-9a-f]+`?")
_JVM_TRACE = re.compile(r"\n\s*(JVM stacktrace:|== SQL|== DataFrame).*", re.DOTALL)


def spark_type(duckdb_type: str) -> str:
    """The Spark SQL type that reads a column lakegate reads as `duckdb_type`.

    Raises:
        InvalidArgument: Spark has no such type (TIME, nanosecond timestamps, UUID).
    """
    if duckdb_type in _SPARK_TYPES:
        return _SPARK_TYPES[duckdb_type]
    if match := _DECIMAL.match(duckdb_type):
        return f"DECIMAL({match.group(1)},{match.group(2)})"
    raise InvalidArgument(
        f"Columns of type {duckdb_type} cannot be read when a query runs on Spark.",
        hint="Select the table's other columns.",
    )


def _mask_bodies(key: str) -> dict[str, str]:
    """The Spark SQL of each mask over a STRING `x`, giving what policies/masks.py gives on DuckDB."""
    keyed = f"concat(unhex('{key.encode().hex()}'), encode(x, 'UTF-8'))"
    return {
        "hash": f"CASE WHEN x IS NULL THEN NULL ELSE substr(sha2({keyed}, 256), 1, 16) END",
        "partial": "CASE WHEN x IS NULL THEN NULL "
        "ELSE concat(repeat('*', greatest(char_length(x) - 4, 0)), right(x, 4)) END",
        "redact": "CASE WHEN x IS NULL THEN NULL ELSE '[redacted]' END",
    }


#: Views of planned files a session keeps for the next calls (a view reused is not listed again).
VIEWS_PER_SESSION = 64
ViewKey = tuple[tuple[tuple[str, int], ...], tuple[SourceColumn, ...]]


class _Session:
    """One Spark Connect session, the names of its mask functions and its views of planned files."""

    def __init__(self, spark: SparkSession, masks: dict[str, str]) -> None:
        self.spark = spark
        self.masks = masks  # method -> this session's function name
        # (files, columns) -> view name, least recently used first: a view is exactly what one
        # TableSource hands a call, so any later call handed the same files and columns may read it.
        self.views: OrderedDict[ViewKey, str] = OrderedDict()

    def views_of(self, sources: Mapping[str, TableSource]) -> dict[str, str]:
        """Each placeholder's view, registered now where the session has none of the same source."""
        views: dict[str, str] = {}
        for placeholder, source in sources.items():
            key = (source.files, source.columns)
            if key not in self.views:
                name = f"lakegate_view_{secrets.token_hex(8)}"
                register_views(self.spark, {name: source}, fields_by_name=True)
                self.views[key] = name
                while len(self.views) > VIEWS_PER_SESSION:
                    _, evicted = self.views.popitem(last=False)
                    self.spark.catalog.dropTempView(evicted)
            self.views.move_to_end(key)
            views[placeholder] = self.views[key]
        return views


class SparkEngine:
    """Governed queries on a Spark cluster through a small pool of Spark Connect sessions."""

    name = "spark"

    def __init__(self, query: QuerySettings, hash_key: str) -> None:
        if query.spark.remote is None:
            raise ConfigurationError("query.spark.remote is not set: there is no Spark Connect endpoint")
        require_extra("spark", "a query routed to Spark")
        self.settings: SparkSettings = query.spark
        self.timeout_s = query.timeout_s
        self._key = hash_key
        self._key_forms = (hash_key, hash_key.encode().hex())
        self._token_forms: tuple[str, ...] = ()  # the token as read and as quoted in the URL
        self._idle: list[_Session] = []
        self._open = 0
        self._available = threading.Condition()
        self._tags = itertools.count(1)
        self._closed = False

    # -- sessions ------------------------------------------------------------------------------

    def _url(self) -> str:
        """The Spark Connect URL with the token as its last parameter (`sc://host:port/;use_ssl=true`
        keeps its own parameters)."""
        url = str(self.settings.remote)
        token = os.environ.get(self.settings.token_env)
        if self.settings.token_file is not None:
            try:
                token = Path(self.settings.token_file).expanduser().read_text().strip()
            except OSError as exc:
                raise ConfigurationError(f"cannot read query.spark.token_file: {exc.strerror}") from None
        if not token:
            return url
        quoted = quote(token, safe="")
        self._token_forms = (token, quoted)  # replaced, not appended to: a rotated token is re-read
        return f"{url};token={quoted}" if "/;" in url else f"{url.rstrip('/')}/;token={quoted}"

    def _connect(self) -> _Session:
        with _quiet_pyspark():
            from pyspark.sql.connect.session import SparkSession

        spark = None
        try:
            spark = SparkSession.builder.remote(self._url()).create()
            for name, value in SESSION_CONF.items():
                spark.conf.set(name, value)
                taken = str(spark.conf.get(name))
                if taken.lower() != value.lower():  # fail closed: no session without them
                    raise ConfigurationError(f"the Spark session did not take {name}={value} (it holds {taken})")
            suffix = secrets.token_hex(8)
            masks = {}
            for method, body in _mask_bodies(self._key).items():
                function = f"lakegate_mask_{method}_{suffix}"
                spark.sql(f"CREATE TEMPORARY FUNCTION {function}(x STRING) RETURNS STRING RETURN {body}").collect()
                masks[method] = function
        except BaseException as exc:
            if spark is not None:
                with contextlib.suppress(Exception):
                    spark.stop()
            if isinstance(exc, LakegateError) or not isinstance(exc, Exception):
                raise
            log.error("spark.connect_failed", error=self._scrub(str(exc))[:500])
            raise BackendError(
                f"could not open a Spark Connect session at {self.settings.remote}: {type(exc).__name__}"
            ) from None
        return _Session(spark, masks)

    def _acquire(self) -> _Session:
        deadline = time.monotonic() + self.timeout_s
        with self._available:
            while True:
                if self._closed:
                    raise BackendError("the Spark engine is closed")
                if self._idle:
                    return self._idle.pop()
                if self._open < self.settings.sessions:
                    self._open += 1
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise LimitExceeded(
                        f"lakegate is already running {self.settings.sessions} queries on Spark and none "
                        "finished in time.",
                        hint="Try again in a moment.",
                    )
                self._available.wait(remaining)
        try:
            return self._connect()
        except BaseException:
            self._forget()
            raise

    def _release(self, session: _Session) -> None:
        with self._available:
            if not self._closed:
                self._idle.append(session)
                self._available.notify()
                return
        with contextlib.suppress(Exception):  # the engine closed while the call ran
            session.spark.stop()

    def _forget(self) -> None:
        with self._available:
            self._open -= 1
            self._available.notify()

    def warm(self) -> None:
        """Open one session ahead of the first query.

        Raises:
            BackendError: Spark Connect cannot be reached.
        """
        self._release(self._acquire())

    def close(self) -> None:
        with self._available:
            self._closed = True
            sessions, self._idle = self._idle, []
        for session in sessions:
            with contextlib.suppress(Exception):
                session.spark.stop()

    # -- queries -------------------------------------------------------------------------------

    def run_page(
        self,
        statement: GovernedSql,
        sources: Mapping[str, TableSource],
        on_cancel: OnCancel | None = None,
        on_progress: OnProgress | None = None,
        max_bytes: int | None = None,
    ) -> EngineResult:
        """Run one governed statement on Spark (see QueryEngine.run_page; `on_progress` is not called:
        Spark Connect reports no estimate of the part done).

        Raises:
            LimitExceeded: the query ran past the time limit.
            InvalidArgument: the query cannot run on Spark, or Spark rejected it (the message says why).
            BackendError: Spark failed, or cannot be reached.
        """
        with self._call(statement, sources, on_cancel) as (session, spark_sql, views):
            scanned = self._scanned(session, spark_sql, sources, views)
            bounded = spark_sql
            if max_bytes is not None:
                # Checked on the executors, row by row: lakegate's own SQL, around the checked query.
                limit = max_bytes * ROW_BUDGET_FACTOR
                bounded = (
                    f"SELECT lakegate_rows.* FROM ({spark_sql}) AS lakegate_rows WHERE CASE WHEN "
                    f"octet_length(to_json(struct(lakegate_rows.*))) > {limit} "
                    f"THEN raise_error('{ROW_TOO_LARGE}') ELSE true END"
                )
            table = session.spark.sql(bounded).toArrow()
        return EngineResult(table, True, scanned)

    def explain(self, statement: GovernedSql, sources: Mapping[str, TableSource]) -> str:
        """Spark's physical plan of `statement`, without running it and without the files' locations.

        Raises:
            InvalidArgument: Spark cannot plan the SQL.
            BackendError: Spark failed, or cannot be reached.
        """
        with self._call(statement, sources, None) as (session, spark_sql, _):
            plan = self._plan(session, spark_sql)
        return self._scrub(_FILE_URI.sub("[file]", _LOCATION.sub("Location: [planned files]", plan)), session)

    @contextlib.contextmanager
    def _call(
        self, statement: GovernedSql, sources: Mapping[str, TableSource], on_cancel: OnCancel | None
    ) -> Iterator[tuple[_Session, str, dict[str, str]]]:
        session = self._acquire()
        tag = f"lakegate-{next(self._tags)}-{secrets.token_hex(4)}"
        ended = threading.Event()
        why: list[str] = []

        def interrupt(reason: str) -> None:
            if not ended.is_set():
                why.append(reason)
                with contextlib.suppress(Exception):
                    session.spark.interruptTag(tag)

        timer = threading.Timer(self.timeout_s, interrupt, ("timeout",))
        healthy = True
        spark_sql = ""
        try:
            views = session.views_of(sources)
            spark_sql = to_spark(statement, views=views, functions=session.masks)
            session.spark.addTag(tag)
            if on_cancel is not None:
                on_cancel(lambda: interrupt("cancelled"))
            timer.start()
            yield session, spark_sql, views
        except LakegateError:
            raise
        except Exception as exc:
            healthy = _session_usable(exc)
            raise self._translate(exc, spark_sql, why, session) from None
        except BaseException:
            healthy = False
            raise
        finally:
            ended.set()
            timer.cancel()
            self._end(session, tag, healthy)

    def _end(self, session: _Session, tag: str, healthy: bool) -> None:
        try:
            session.spark.removeTag(tag)
        except Exception:
            healthy = False
        if healthy:
            self._release(session)
        else:
            with contextlib.suppress(Exception):
                session.spark.stop()
            self._forget()

    def _plan(self, session: _Session, spark_sql: str) -> str:
        """Spark's physical plan of `spark_sql`, once its analysed plan passed the allow-list.

        The allow-list was checked on sqlglot's reading of the SQL; this is the second wall, on
        Spark's own reading: every function the analyser resolved must be on it too
        (policies/spark_sql.py, check_spark_plan).

        Raises:
            GovernanceViolation: the analysed plan calls a function off the allow-list.
            InvalidQuery: text of the query reads as such a call.
        """
        explained = str(session.spark.sql(f"EXPLAIN EXTENDED {spark_sql}").collect()[0][0])
        try:
            analysed, physical = plan_sections(explained)
        except InvalidQuery:
            session.spark.sql(spark_sql).schema  # noqa: B018  Spark's own error where it could not plan the SQL
            raise
        check_spark_plan(analysed, spark_sql, own_functions=session.masks.values())
        return physical

    def _scanned(
        self, session: _Session, spark_sql: str, sources: Mapping[str, TableSource], views: Mapping[str, str]
    ) -> dict[str, list[str]]:
        """Spark's account of what the query reads: placeholder -> columns.

        The files: Spark's own list of the query's input files, which must all be planned files of
        this call. The columns: each view's fields are named by its placeholder (random per call, so
        no text of the query can spell one) and their index, and column pruning leaves in the plan
        only the fields the query reads. (Named by its view, which only calls handed the same
        files and columns read.)

        Raises:
            BackendError: the query reads a file that no governed scan of this call names (fail closed).
        """
        by_file = {path: placeholder for placeholder, source in sources.items() for path, _ in source.files}
        read_files = {_local_path(uri) for uri in session.spark.sql(spark_sql).inputFiles()}
        if not read_files <= set(by_file):
            raise BackendError("Spark's plan reads files that no governed scan of this call names")
        plan = self._plan(session, spark_sql)
        scanned: dict[str, set[str]] = {by_file[path]: set() for path in read_files}
        for placeholder, source in sources.items():
            for index in re.findall(rf"\b{re.escape(views[placeholder])}_(\d+)#", plan):
                scanned.setdefault(placeholder, set()).add(source.columns[int(index)].name)
        return {placeholder: sorted(columns) for placeholder, columns in scanned.items()}

    # -- errors --------------------------------------------------------------------------------

    def _scrub(self, text: str, session: _Session | None = None) -> str:
        """`text` without the mask key, the call's placeholder names and the session's function names.

        The key reaches Spark as a binary literal in the hash mask's body, and Spark cuts long plan
        text anywhere: every binary literal goes, whole or cut, and any run of hex digits that is
        part of the key or of its hex.
        """
        text = _BINARY_LITERAL.sub("0x[key]", text)
        hidden = (*self._key_forms, *self._token_forms)
        hexes = [secret.lower() for secret in hidden]

        def hide(match: re.Match[str]) -> str:
            found = match.group(0).lower()
            return "[key]" if any(found in secret for secret in hexes) else match.group(0)

        text = _HEX_RUN.sub(hide, text)
        for secret in hidden:  # Spark writes a binary literal's hex digits in upper case
            text = re.sub(re.escape(secret), "[key]", text, flags=re.IGNORECASE)
        if session is not None:
            for method, function in session.masks.items():
                text = re.sub(re.escape(function), f"LAKEGATE_MASK_{method.upper()}", text, flags=re.IGNORECASE)
        return _SOURCE.sub("governed_table", text)

    def _translate(self, exc: BaseException, sql: str, why: list[str], session: _Session) -> LakegateError:
        with _quiet_pyspark():
            import pyspark.errors as spark_errors

        if why and why[0] == "timeout":
            return LimitExceeded(
                f"The query ran longer than {self.timeout_s:g} s on Spark and was stopped.",
                hint="Filter on the partition column (e.g. a date range), aggregate, or select fewer columns.",
            )
        if why:
            return BackendError("the client cancelled the query")
        # The first line only: Spark's message goes on with the SQL text, which names the check too.
        first = _JVM_TRACE.sub("", str(exc)).strip().split("\n", 1)[0]
        if first.startswith("[USER_RAISED_EXCEPTION]") and ROW_TOO_LARGE in first:
            return LimitExceeded(
                "One row of the result is far more than the byte budget of a call.",
                hint="Select fewer or shorter columns (e.g. left(text, 200)).",
            )
        message = self._scrub(_FILE_URI.sub("[file]", first), session)
        if isinstance(exc, spark_errors.AnalysisException | spark_errors.ParseException):
            return InvalidArgument(
                f"Spark could not run the query: {message}",
                hint="Fix the SQL and call query again; describe_dataset lists columns and types.",
            )
        data_errors = (
            spark_errors.ArithmeticException,
            spark_errors.NumberFormatException,
            spark_errors.DateTimeException,
            spark_errors.IllegalArgumentException,
            spark_errors.ArrayIndexOutOfBoundsException,
        )
        if isinstance(exc, data_errors):
            # Raised while rows are read: may quote a value of a row or column the caller cannot see.
            return InvalidArgument(
                f"Spark could not run the query: {without_values(message, sql)}",
                hint="Fix the SQL (e.g. try_cast for values that may not convert) and call query again.",
            )
        log.error("spark.query_failed", error=without_values(message, sql)[:1000])
        return BackendError(f"Spark failed: {type(exc).__name__}")


def register_views(spark: SparkSession, sources: Mapping[str, TableSource], *, fields_by_name: bool = False) -> None:
    """Each source a temporary view (named by its key) of its planned files, reading its columns by
    Iceberg field id. The files' fields are named c0, c1, ... or (`fields_by_name`) NAME_0, NAME_1,
    ... after the view's name, which is what the plan shows; the view renames them."""
    from pyspark.sql import types as T

    for name, source in sources.items():
        prefix = f"{name}_" if fields_by_name else "c"
        fields = [
            T.StructField(
                f"{prefix}{index}",
                _data_type(spark_type(column.duckdb_type)),
                metadata={"parquet.field.id": column.field_id},
            )
            for index, column in enumerate(source.columns)
        ]
        schema = T.StructType(fields)
        paths = [_file_uri(path, source) for path, _ in source.files]
        frame = spark.read.schema(schema).parquet(*paths) if paths else spark.createDataFrame([], schema)
        # A name Spark might read as a pattern or a path is never one: files are handed as URIs.
        frame.toDF(*(column.name for column in source.columns)).createOrReplaceTempView(name)


def _data_type(name: str) -> Any:
    """The pyspark DataType of a Spark SQL type name that spark_type gives."""
    from pyspark.sql import types as T

    simple = {
        "BOOLEAN": T.BooleanType(), "INT": T.IntegerType(), "BIGINT": T.LongType(), "FLOAT": T.FloatType(),
        "DOUBLE": T.DoubleType(), "DATE": T.DateType(), "TIMESTAMP_NTZ": T.TimestampNTZType(),
        "TIMESTAMP": T.TimestampType(), "STRING": T.StringType(), "BINARY": T.BinaryType(),
    }  # fmt: skip
    if name in simple:
        return simple[name]
    precision, scale = _DECIMAL.match(name).groups()  # type: ignore[union-attr]  # spark_type gave it
    return T.DecimalType(int(precision), int(scale))


def _local_path(uri: str) -> str:
    """The local path of a file URI Spark reports (file:/a/b, file:///a/b, percent-encoded)."""
    return unquote(urlsplit(uri).path) if uri.startswith("file:") else uri


def _file_uri(path: str, source: TableSource) -> str:
    if source.store is not None or not path.startswith("/"):
        raise ConfigurationError(
            "the Spark engine reads local Iceberg files only in this build (object storage needs the "
            "cluster's own connector): route this table's queries to DuckDB"
        )
    return f"file:{path}"


def _session_usable(exc: BaseException) -> bool:
    """Whether a session that raised `exc` may serve the next query (not when its connection failed)."""
    return "UNAVAILABLE" not in str(exc) and "SESSION_CLOSED" not in str(exc)


@contextlib.contextmanager
def _quiet_pyspark() -> Iterator[None]:
    # pyspark warns about pandas on import and logs every failed query's values to stderr with its
    # own logger: lakegate reports errors itself, without the values.
    logging.getLogger("SQLQueryContextLogger").disabled = True
    logging.getLogger("pyspark").setLevel(logging.CRITICAL)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield
