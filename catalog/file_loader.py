"""Loading files into an Iceberg table: CSV, Parquet and JSON lines, read and checked by DuckDB on
this machine, written by pyiceberg as one commit.

Reading (`read_files`): DuckDB reads each file (its CSV sniffer infers the types; `types`
overrides them by column), and every row that does not fit (a value that does not convert, a
line with too few or too many fields) is set aside with its file, line and reason instead of
failing the load. The files of one load must share their columns. Types Iceberg has no place for
(unsigned and 128-bit integers, intervals, nanosecond timestamps) are refused, naming the column and
the `--type` that would fit it.

Writing (`write_loaded`) creates the table (and its namespace) from the data's schema, partitioned
as asked, appends to it (one snapshot), or replaces its rows (pyiceberg's overwrite: a delete and an
append snapshot, in one commit). Policy is not
decided here: the gate's scope decides first (`write` on the table and on each column).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from lakegate.catalog.iceberg_writes import WRITTEN_BY_PROPERTY
from lakegate.catalog.warehouse import Warehouse, translate_errors
from lakegate.errors import InvalidArgument

if TYPE_CHECKING:
    import duckdb
    import pyarrow as pa
    from pyiceberg.table import Table as IcebergTable

__all__ = [
    "FORMATS",
    "LoadMode",
    "LoadOutcome",
    "ReadFiles",
    "Rejected",
    "expand_paths",
    "fit_to_table",
    "read_files",
    "table_columns",
    "write_loaded",
]

FORMATS = {".csv": "csv", ".tsv": "csv", ".parquet": "parquet", ".jsonl": "json", ".ndjson": "json", ".json": "json"}
LoadMode = Literal["create", "append", "replace"]
#: DuckDB types Iceberg cannot hold, and what to ask for instead.
_UNSUPPORTED = ("HUGEINT", "UHUGEINT", "UBIGINT", "UINTEGER", "USMALLINT", "UTINYINT", "INTERVAL", "TIMESTAMP_NS")
_TRANSFORM = re.compile(
    r"^(?P<column>[A-Za-z_][A-Za-z0-9_]*)(?::(?P<transform>identity|year|month|day|hour|bucket\[\d+\]|truncate\[\d+\]))?$"
)
_TYPE = re.compile(r"^[A-Za-z][A-Za-z0-9_ ]*(\(\d+(, ?\d+)?\))?$")


@dataclass(frozen=True)
class Rejected:
    """A row that was not loaded: where it is and why."""

    file: str  # the file's name (never its full path)
    line: int | None
    column: str | None
    problem: str


@dataclass(frozen=True)
class ReadFiles:
    data: pa.Table
    files: tuple[str, ...]  # names, in the order read
    rejected: tuple[Rejected, ...]


@dataclass(frozen=True)
class LoadOutcome:
    table: str
    created: bool
    rows: int
    snapshot_id: int | None
    previous_snapshot_id: int | None


def expand_paths(paths: Sequence[str]) -> list[Path]:
    """The files `paths` name: files, folders (their files of a known format, recursively) and globs.

    Raises:
        InvalidArgument: nothing matches, a format is not known, or the files mix formats.
    """
    found: list[Path] = []
    for text in paths:
        path = Path(text).expanduser()
        if path.is_file():
            found.append(path)
        elif path.is_dir():
            found += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in FORMATS)
        elif any(char in text for char in "*?["):
            found += sorted(p for p in Path(path.anchor or ".").glob(str(path.relative_to(path.anchor))) if p.is_file())
        else:
            raise InvalidArgument(f"{text}: no such file or folder.", hint="Name files, folders or globs to load.")
    if not found:
        raise InvalidArgument("No file to load was found.", hint="Name CSV, Parquet or JSON lines files.")
    found = list(dict.fromkeys(p.resolve() for p in found))  # a file named twice is read once
    globbed = sorted(p.name for p in found if any(char in p.name for char in "*?[]{}"))
    if globbed:
        # DuckDB reads such a name as a pattern: another file's rows would load instead of these.
        raise InvalidArgument(
            f"Cannot load {', '.join(globbed)}: the name holds a pattern character (* ? [ ] {{ }}).",
            hint="Rename the file, then load it again.",
        )
    unknown = sorted({p.suffix or p.name for p in found if p.suffix.lower() not in FORMATS})
    if unknown:
        raise InvalidArgument(
            f"Cannot tell the format of {', '.join(unknown)}.",
            hint="Load .csv/.tsv, .parquet or .jsonl/.ndjson/.json (JSON lines) files.",
        )
    formats = {FORMATS[p.suffix.lower()] for p in found}
    if len(formats) > 1:
        raise InvalidArgument(
            f"The files mix formats ({', '.join(sorted(formats))}).", hint="Load one format per command."
        )
    return found


def read_files(
    files: Sequence[Path], types: dict[str, str], progress: Callable[[Path], None] | None = None
) -> ReadFiles:
    """Read `files` (one format) into one Arrow table, setting aside the rows that do not fit.

    Raises:
        InvalidArgument: a file cannot be read, the files do not share their columns, a `types`
            entry names no column or no type, or a column has a type Iceberg cannot hold.
    """
    import duckdb
    import pyarrow as pa

    for column, kind in types.items():
        if not _TYPE.match(kind):
            raise InvalidArgument(
                f"--type {column}={kind}: not a type.",
                hint="Use DuckDB type names: BIGINT, DOUBLE, DATE, TIMESTAMP, DECIMAL(12,2), VARCHAR.",
            )
    connection = duckdb.connect()
    connection.execute("SET TimeZone = 'UTC'")  # zoned timestamps load as UTC, whatever this host's zone
    tables: list[pa.Table] = []
    rejected: list[Rejected] = []
    try:
        for number, path in enumerate(files):
            table, problems = _read_one(connection, path, types, number)
            tables.append(table)
            rejected += problems
            if progress is not None:
                progress(path)
    finally:
        connection.close()
    columns = [tuple(t.column_names) for t in tables]
    if len(set(columns)) > 1:
        raise InvalidArgument(
            f"The files do not share their columns: {files[0].name} has {', '.join(columns[0])}; "
            + "; ".join(
                f"{path.name} has {', '.join(cols)}"
                for path, cols in zip(files, columns, strict=True)
                if cols != columns[0]
            ),
            hint="Load files of one layout per command.",
        )
    unknown = sorted(set(types) - set(columns[0]))
    if unknown:
        raise InvalidArgument(
            f"--type names no column: {', '.join(unknown)}.", hint=f"The columns: {', '.join(columns[0])}."
        )
    try:
        data = pa.concat_tables(tables, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise InvalidArgument(
            f"The files' column types differ: {exc}", hint="Set one type with --type COLUMN=TYPE."
        ) from exc
    return ReadFiles(data, tuple(path.name for path in files), tuple(rejected))


def _read_one(
    connection: duckdb.DuckDBPyConnection, path: Path, types: dict[str, str], number: int
) -> tuple[pa.Table, list[Rejected]]:
    import duckdb

    kind = FORMATS[path.suffix.lower()]
    rejects = f"rejects_{number}"
    try:
        source = _literal(str(path))
        if kind == "csv":
            given = ", ".join(f"{_literal(c)}: {_literal(t)}" for c, t in types.items())
            options = f", types = {{{given}}}" if types else ""
            relation = connection.sql(
                f"SELECT * FROM read_csv({source}, store_rejects = true, rejects_table = '{rejects}', "
                f"rejects_scan = '{rejects}_scan'{options})"
            )
        elif kind == "parquet":
            relation = _override(connection.sql(f"SELECT * FROM read_parquet({source})"), types)
        else:
            shape = "auto" if path.suffix.lower() == ".json" else "newline_delimited"  # .json: lines or an array
            relation = _override(connection.sql(f"SELECT * FROM read_json({source}, format = '{shape}')"), types)
        for name, kind_of in zip(relation.columns, relation.types, strict=True):
            if str(kind_of).split("(")[0] in _UNSUPPORTED:
                raise InvalidArgument(
                    f"Column {name} of {path.name} is {kind_of}, which an Iceberg table cannot hold.",
                    hint=f"Load it as another type: --type {name}=BIGINT (or DECIMAL(38,0), VARCHAR, TIMESTAMP).",
                )
        table = relation.to_arrow_table()
        problems: list[Rejected] = []
        if kind == "csv":
            for line, column, message in connection.sql(
                f"SELECT line, column_name, error_message FROM {rejects} ORDER BY line"
            ).fetchall():
                problems.append(Rejected(path.name, int(line), column, str(message)))
        else:
            table, problems = _drop_unconverted(table, types, path.name)
    except InvalidArgument:
        raise
    except duckdb.Error as exc:
        first = str(exc).splitlines()[0].replace(str(path), path.name)  # the name, not where it lies
        raise InvalidArgument(
            f"{path.name} cannot be read as {kind}: {first}", hint="Check the file's format."
        ) from exc
    return table, problems


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _override(relation: duckdb.DuckDBPyRelation, types: dict[str, str]) -> duckdb.DuckDBPyRelation:
    """A relation with `types` applied by TRY_CAST, the original kept beside it to find failures."""
    if not types:
        return relation
    selects = []
    for name in relation.columns:
        quoted = '"' + name.replace('"', '""') + '"'
        if name in types:
            selects.append(f"TRY_CAST({quoted} AS {types[name]}) AS {quoted}")
            selects.append(f"{quoted} IS NOT NULL AS {_given(list(types).index(name))}")
        else:
            selects.append(quoted)
    return relation.project(", ".join(selects))


def _given(index: int) -> str:
    """The column that says whether the `index`th --type column had a value before its TRY_CAST."""
    return f"lakegate_given_{index}"


def _drop_unconverted(table: pa.Table, types: dict[str, str], file: str) -> tuple[pa.Table, list[Rejected]]:
    """Rows where a --type conversion failed (a value given, none after TRY_CAST) are set aside."""
    import pyarrow as pa
    import pyarrow.compute as pc

    problems: list[Rejected] = []
    keep = pa.array([True] * table.num_rows)
    for index, name in enumerate(types):
        if _given(index) not in table.column_names:
            continue  # the file lacks that column: read_files says so for the load as a whole
        given = table.column(_given(index))
        failed = pc.and_(given, pc.is_null(table.column(name)))
        for row in pc.indices_nonzero(failed).to_pylist():
            problems.append(Rejected(file, row + 1, name, f"Could not convert the value of {name} to {types[name]}"))
        keep = pc.and_(keep, pc.invert(failed))
        table = table.drop_columns([_given(index)])
    return table.filter(keep), problems


def table_columns(warehouse: Warehouse, name: str) -> list[str]:
    """The column names of existing table `name`.

    Raises:
        NotFound: no such table.
    """
    with translate_errors(f"read the schema of {name}", name):
        return [field.name for field in warehouse.iceberg_table(name).schema().fields]


def fit_to_table(warehouse: Warehouse, name: str, data: pa.Table) -> pa.Table:
    """`data` in the layout of existing table `name` (see `_fit`).

    Raises:
        InvalidArgument: the rows do not fit the table.
    """
    with translate_errors(f"fit rows to {name}", name):
        return _fit(data, warehouse.iceberg_table(name))


def write_loaded(
    warehouse: Warehouse,
    name: str,
    data: pa.Table,
    *,
    mode: LoadMode,
    partition_by: Sequence[str] = (),
    written_by: str | None = None,
) -> LoadOutcome:
    """Write loaded rows to table `name`: create it, append to it, or replace its rows; one snapshot.

    Raises:
        InvalidArgument: create of a table that exists, append/replace of one that does not, a
            partition field that is not a column, or rows that do not fit the table's schema.
        BackendError: pyiceberg failed.
    """
    exists = name in warehouse.iceberg_table_names()
    if mode == "create" and exists:
        raise InvalidArgument(f"{name} exists already.", hint="Use --append to add rows, or --replace to replace them.")
    if mode != "create" and not exists:
        raise InvalidArgument(f"There is no table {name} to {mode}.", hint="Use --create to create it from the files.")
    with translate_errors(f"load into {name}", name):
        if mode == "create":
            table = _create(warehouse, name, data, partition_by)
            previous = None
        else:
            table = warehouse.iceberg_table(name)
            previous = table.metadata.current_snapshot_id
            data = _fit(data, table)
        properties = {WRITTEN_BY_PROPERTY: written_by} if written_by else {}
        if mode == "replace":
            table.overwrite(data, snapshot_properties=properties)
        else:
            table.append(data, snapshot_properties=properties)
        current = warehouse.iceberg_table(name).metadata.current_snapshot_id
    return LoadOutcome(name, mode == "create", data.num_rows, current, previous)


def _create(warehouse: Warehouse, name: str, data: pa.Table, partition_by: Sequence[str]) -> IcebergTable:
    from pyiceberg.transforms import parse_transform

    fields = [_partition_field(spec, data.schema) for spec in partition_by]
    catalog = warehouse.iceberg
    catalog.create_namespace_if_not_exists(name.rsplit(".", 1)[0])
    table = catalog.create_table(name, schema=data.schema)
    try:
        if fields:
            with table.update_spec() as spec_update:
                for column, transform in fields:
                    label = column if transform == "identity" else f"{column}_{transform.split('[')[0]}"
                    spec_update.add_field(column, parse_transform(transform), label)
    except BaseException:  # pyiceberg's Rust transforms may panic: no half-made table stays behind
        catalog.drop_table(name)
        raise
    return warehouse.iceberg_table(name)


def _partition_field(spec: str, schema: pa.Schema) -> tuple[str, str]:
    """(column, transform) of a --partition-by value, checked against the files' columns before anything
    is created.

    Raises:
        InvalidArgument: not COLUMN[:transform], not a top-level column, or a transform its type does not take.
    """
    import pyarrow as pa

    match = _TRANSFORM.match(spec)
    if match is None or match["column"] not in schema.names:
        raise InvalidArgument(
            f"--partition-by {spec}: not a column of the files with a transform.",
            hint="Use COLUMN or COLUMN:year|month|day|hour|bucket[N]|truncate[N], e.g. order_ts:month.",
        )
    column, transform = match["column"], match["transform"] or "identity"
    kind = schema.field(column).type
    temporal = pa.types.is_timestamp(kind) or (pa.types.is_date(kind) and transform != "hour")
    fits = {
        "identity": not pa.types.is_nested(kind),
        "bucket": pa.types.is_integer(kind)
        or pa.types.is_string(kind)
        or pa.types.is_large_string(kind)
        or pa.types.is_decimal(kind)
        or pa.types.is_date(kind)
        or pa.types.is_timestamp(kind),
        "truncate": pa.types.is_integer(kind)
        or pa.types.is_string(kind)
        or pa.types.is_large_string(kind)
        or pa.types.is_decimal(kind),
    }.get(transform.split("[")[0], temporal)
    width = int(transform.split("[")[1].rstrip("]")) if "[" in transform else 1
    if not fits or width < 1:
        raise InvalidArgument(
            f"--partition-by {spec}: {column} is {kind}, which the {transform} transform does not take.",
            hint="year/month/day take dates and timestamps, hour timestamps, bucket[N>=1] and truncate[N>=1] "
            "numbers and strings.",
        )
    return column, transform


def _fit(data: pa.Table, table: IcebergTable) -> pa.Table:
    """`data` in the layout of an existing table: its columns in its order, missing optional ones null.

    Raises:
        InvalidArgument: a column the table does not have, a required one missing, or a type that does not cast.
    """
    import pyarrow as pa

    schema = table.schema()
    target = schema.as_arrow()
    extra = sorted(set(data.column_names) - set(target.names))
    if extra:
        raise InvalidArgument(
            f"The files have columns the table does not: {', '.join(extra)}.",
            hint="Load files of the table's layout (describe_dataset lists its columns).",
        )
    columns = []
    for field in target:
        if field.name in data.column_names:
            try:
                columns.append(data.column(field.name).cast(field.type))
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                raise InvalidArgument(
                    f"Column {field.name} does not convert to the table's {field.type}: {exc}",
                    hint=f"Set its type with --type {field.name}=TYPE.",
                ) from exc
        elif schema.find_field(field.name).required:
            raise InvalidArgument(f"The files lack {field.name}, which the table requires.")
        else:
            columns.append(pa.nulls(data.num_rows, field.type))
    return pa.Table.from_arrays(columns, schema=target)
