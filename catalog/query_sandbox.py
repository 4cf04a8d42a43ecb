"""The locked DuckDB database a query worker runs governed SQL in.

Set up once per worker process, then locked:
- no file and no URL may be read or written by name: external access is off and no directory is
  allowed, so not the warehouse, not the state directory, not the working directory; table data
  reaches the sandbox only as Arrow datasets registered for one call (catalog/arrow_relations.py);
- extensions are neither installed nor auto-loaded, and Python replacement scans are off, so a
  table name never resolves to a file or a Python object;
- the mask macros are defined, and the hash mask's keyed function is registered from Python, so
  its key is in no SQL text and no plan; the time zone is UTC, and the memory limit, thread count
  and spill directory of one query are set; then `lock_configuration` makes every setting final.

DuckDB's own parser must also see exactly one SELECT before anything runs, so that a difference
between the SQL guard's parser and DuckDB's can never run a statement that changes the sandbox.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lakegate.policies.columns import MASK_METHODS
from lakegate.policies.masks import KEYED_HASH_FUNCTION, MACRO_PREFIX, keyed_hash, mask_macro_name, mask_macros
from lakegate.policies.sql_functions import TABLE_FUNCTIONS, function_allowed

if TYPE_CHECKING:
    import duckdb

MASK_PREFIX = f"{MACRO_PREFIX}mask_"

__all__ = [
    "ErrorKind",
    "SandboxConfig",
    "SandboxRefusal",
    "classify_error",
    "open_sandbox",
    "require_allowed",
    "require_one_select",
    "without_values",
]


@dataclass(frozen=True)
class SandboxConfig:
    """What a sandbox is set up with (sent to each query worker when it starts)."""

    threads: int
    memory_limit: str  # DuckDB's own limit, e.g. "1GB"
    spill_dir: str
    spill_limit: str
    hash_key: str  # keys the hash mask; never leaves the worker's Python side
    # Appended to the mask macros' names: each worker draws its own, so that no text of a query
    # can name a mask (the governed scans name them by per-call names the worker maps to these).
    mask_suffix: str = ""

    def mask_functions(self) -> dict[str, str]:
        """The name of each mask method's macro in this sandbox."""
        return {method: f"{mask_macro_name(method)}{self.mask_suffix}" for method in MASK_METHODS}


class SandboxRefusal(Exception):
    """The sandbox refused to run SQL (not exactly one SELECT by DuckDB's reading)."""


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def open_sandbox(config: SandboxConfig) -> duckdb.DuckDBPyConnection:
    """A new locked in-memory DuckDB database (query workers use this; tests use it to prove the
    sandbox alone holds)."""
    import duckdb
    import pyarrow as pa
    from duckdb.func import FunctionNullHandling, PythonUDFType

    connection = duckdb.connect(":memory:", config={"threads": config.threads, "memory_limit": config.memory_limit})
    key = config.hash_key

    # Annotated with Any: DuckDB evaluates the annotations of the functions it registers.
    def hash_values(values: Any) -> Any:
        return pa.array(keyed_hash(key, values.to_pylist()), pa.string())

    # A name of its own per sandbox: SQL that got past both checks still could not call it.
    hash_function = f"{KEYED_HASH_FUNCTION}_{secrets.token_hex(8)}"
    connection.create_function(
        hash_function,
        hash_values,
        ["VARCHAR"],
        "VARCHAR",
        type=PythonUDFType.ARROW,
        null_handling=FunctionNullHandling.SPECIAL,
    )
    for statement in mask_macros(hash_function, config.mask_suffix):
        connection.execute(statement)
    for setting in (
        "SET TimeZone = 'UTC'",
        # Spill under the state directory, never into the server's working directory, and boundedly.
        f"SET temp_directory = {_literal(config.spill_dir)}",
        f"SET max_temp_directory_size = {_literal(config.spill_limit)}",
        "SET python_enable_replacements = false",
        "SET autoinstall_known_extensions = false",
        "SET autoload_known_extensions = false",
        # Progress is measured (query_progress) but never printed.
        "SET enable_progress_bar = true",
        "SET enable_progress_bar_print = false",
        "SET allowed_directories = []",
        "SET allowed_paths = []",
        "SET enable_external_access = false",
        "SET lock_configuration = true",
    ):
        connection.execute(setting)
    return connection


def require_one_select(connection: duckdb.DuckDBPyConnection, sql: str) -> None:
    """Refuse SQL that DuckDB's own parser does not read as exactly one SELECT.

    Raises:
        SandboxRefusal: it reads as something else, or as several statements.
    """
    import duckdb

    statements = connection.extract_statements(sql)
    if len(statements) != 1 or statements[0].type != duckdb.StatementType.SELECT:
        kinds = ", ".join(str(statement.type) for statement in statements)
        raise SandboxRefusal(f"refused to run SQL that DuckDB reads as [{kinds}], not one SELECT")


def require_allowed(
    connection: duckdb.DuckDBPyConnection, sql: str, relations: Collection[str], masks: Collection[str]
) -> None:
    """Check DuckDB's own parse of `sql` against what governed SQL may hold, before it runs.

    The SQL guard decided on sqlglot's reading of the agent's query; this is DuckDB's reading of the
    statement that will run, so that text the two parsers read differently cannot call what the
    guard refuses. Every function must be one an agent may call (policies/sql_functions.py); a mask
    must be one of this sandbox's `masks`, applied to a column; table functions only generate rows;
    and every table named must be a relation registered for this call or a CTE in scope where it
    is named (DuckDB looks any other name up in its catalog: pg_settings, duckdb_views, ...).

    Raises:
        SandboxRefusal: the statement holds something else (the message says what).
    """
    import json

    rows = connection.execute("SELECT json_serialize_sql(?)", [sql]).fetchall()  # all: no result left open
    tree = json.loads(rows[0][0]) if rows else {"error": True}
    if tree.get("error"):
        raise SandboxRefusal("DuckDB cannot parse the statement to check it")
    registered = {name.lower() for name in relations}
    own_masks = {name.lower() for name in masks}
    for node, ctes in _nodes_in_scope(tree):
        kind = node.get("class") or node.get("type")
        if kind == "FUNCTION":
            name = str(node.get("function_name", "")).lower()
            if name.startswith(MASK_PREFIX):
                arguments = node.get("arguments", [])
                on_column = len(arguments) == 1 and (arguments[0].get("expression") or {}).get("class") == "COLUMN_REF"
                if name not in own_masks or not on_column:
                    raise SandboxRefusal(f"{name}(...) is not a mask of a governed scan")
            elif not node.get("is_operator") and not function_allowed(name):
                raise SandboxRefusal(f"the statement calls {name}(), which governed SQL may not call")
        elif kind == "TABLE_FUNCTION":
            name = str((node.get("function") or {}).get("function_name", "")).lower()
            if name not in TABLE_FUNCTIONS:
                raise SandboxRefusal(f"the statement reads the table function {name}(), which governed SQL may not")
        elif kind == "BASE_TABLE":
            name = str(node.get("table_name", "")).lower()
            if node.get("schema_name") or node.get("catalog_name") or name not in registered | ctes:
                raise SandboxRefusal("the statement names a table that is neither a relation of this call nor a CTE")


def _nodes_in_scope(tree: Any) -> Iterator[tuple[dict[str, Any], frozenset[str]]]:
    """Every JSON object of DuckDB's serialised parse tree, with the CTE names in scope there: those
    of the WITH of every enclosing query node (a superset of DuckDB's scoping within one WITH, never
    a name defined elsewhere in the statement)."""
    stack: list[tuple[Any, frozenset[str]]] = [(tree, frozenset())]
    while stack:
        item, ctes = stack.pop()
        if isinstance(item, dict):
            cte_map = item.get("cte_map")
            if isinstance(cte_map, dict):
                ctes = ctes | {str(entry.get("key", "")).lower() for entry in cte_map.get("map", [])}
            yield item, ctes
            stack.extend((value, ctes) for value in item.values())
        elif isinstance(item, list):
            stack.extend((value, ctes) for value in item)


#: What went wrong in a worker, as the engine tells its caller.
ErrorKind = str  # "invalid" | "memory" | "timeout" | "cancelled" | "refused" | "backend"

_LINE = re.compile(r"\n\s*LINE \d+:.*", re.DOTALL)
#: In the message of an error raised while rows were read: a type with its arguments (kept), or a
#: quoted string or a number (a value of some row, unless the SQL itself holds it).
_VALUE = re.compile(
    r"""(?P<type>\b[A-Za-z_]+\(\d+(?:,\s*\d+)?\))"""
    r"""|(?P<quoted>'(?:[^']|'')*'|"(?:[^"]|"")*")"""
    r"""|(?P<number>(?<![\w.])-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?(?![\w.]))"""
)


def without_values(message: str, sql: str) -> str:
    """`message` with every quoted string and number that `sql` does not hold replaced by <value>.

    An error raised while rows are read can quote a row's value, and the row or the column may be
    one the caller cannot read (a cast evaluated before the row filter of the governed scan).
    """

    def hide(match: re.Match[str]) -> str:
        if match.group("type"):
            return match.group(0)
        found = match.group(0)
        inner = found[1:-1] if match.group("quoted") else found
        return found if inner in sql else ("'<value>'" if match.group("quoted") else "<value>")

    return _VALUE.sub(hide, message)


#: DuckDB's words when an Arrow dataset it reads fails on I/O (pyarrow's IOError inside).
_STREAM_FAILED = re.compile(r"reading the stream registered as .* failed: IOError", re.DOTALL)


def classify_error(exc: BaseException, sql: str = "") -> tuple[ErrorKind, str]:
    """The kind of a DuckDB failure and its message, without DuckDB's echo of the SQL text and, for
    an error raised while rows were read, without any value `sql` does not hold itself."""
    import duckdb

    if isinstance(exc, SandboxRefusal | duckdb.PermissionException):
        return "refused", str(exc)
    if isinstance(exc, duckdb.InterruptException):
        return "timeout", str(exc)
    if isinstance(exc, duckdb.OutOfMemoryException | MemoryError) or (
        # pyarrow reports a failed allocation (building a huge result) as an OSError; a thread's
        # stack that does not fit under the worker's limit fails to start.
        isinstance(exc, OSError)
        and "memory" in str(exc).lower()
        or isinstance(exc, RuntimeError)
        and "can't start new thread" in str(exc)
    ):
        return "memory", str(exc)
    message = _LINE.sub("", str(exc)).strip()
    # Raised before any row is read: they name the SQL's own parts, never a value of the data.
    if isinstance(exc, duckdb.BinderException | duckdb.CatalogException | duckdb.ParserException):
        return "invalid", message
    data_errors = (
        duckdb.ConversionException,
        duckdb.InvalidInputException,
        duckdb.OutOfRangeException,
        duckdb.NotImplementedException,
        duckdb.TypeMismatchException,
    )
    if isinstance(exc, duckdb.InvalidInputException) and _STREAM_FAILED.search(message):
        # Reading a registered dataset failed (a data file gone or unreachable): not the query's fault.
        return "backend", f"{type(exc).__name__}: {without_values(message, sql)}"
    if isinstance(exc, data_errors):
        return "invalid", without_values(message, sql)
    return "backend", f"{type(exc).__name__}: {without_values(message, sql)}"
