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
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from policies.masks import KEYED_HASH_FUNCTION, keyed_hash, mask_macros

if TYPE_CHECKING:
    import duckdb

__all__ = [
    "ErrorKind",
    "SandboxConfig",
    "SandboxRefusal",
    "classify_error",
    "open_sandbox",
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

    connection.create_function(
        KEYED_HASH_FUNCTION,
        hash_values,
        ["VARCHAR"],
        "VARCHAR",
        type=PythonUDFType.ARROW,
        null_handling=FunctionNullHandling.SPECIAL,
    )
    for statement in mask_macros():
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


def classify_error(exc: BaseException, sql: str = "") -> tuple[ErrorKind, str]:
    """The kind of a DuckDB failure and its message, without DuckDB's echo of the SQL text and, for
    an error raised while rows were read, without any value `sql` does not hold itself."""
    import duckdb

    if isinstance(exc, SandboxRefusal | duckdb.PermissionException):
        return "refused", str(exc)
    if isinstance(exc, duckdb.InterruptException):
        return "timeout", str(exc)
    if isinstance(exc, duckdb.OutOfMemoryException | MemoryError):
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
    if isinstance(exc, data_errors):
        return "invalid", without_values(message, sql)
    return "backend", f"{type(exc).__name__}: {without_values(message, sql)}"
