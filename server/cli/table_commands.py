"""`lakegate table`: bring an organisation's own data in: load files into an Iceberg table, or
register a table that already exists elsewhere.

Both act as a principal (`--as`, else `LAKEGATE_PRINCIPAL`) through the gate: policy decides
(`write` on the table and its columns; deny by default), and the audit record names the files, the
rows set aside and the snapshot written (never the files' full paths).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

import click
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from lakegate.catalog.staged_changes import StagedChange
from lakegate.errors import InvalidArgument
from lakegate.server.cli.context import as_principal, through_gate

if TYPE_CHECKING:
    import pyarrow as pa

    from lakegate.catalog.file_loader import LoadMode, Rejected

__all__ = ["table"]

err = Console(stderr=True)
#: Rows set aside that are spelled out; the rest are counted.
SHOWN_REJECTS = 20


@click.group("table")
def table() -> None:
    """Load files into Iceberg tables, or register existing tables."""


@table.command("load")
@click.argument("paths", nargs=-1, required=True)
@click.option("--table", "name", required=True, help="The Iceberg table, namespace.table.")
@click.option(
    "--create",
    "mode",
    flag_value="create",
    help="Create the table from the files (the default when it does not exist).",
)
@click.option("--append", "mode", flag_value="append", help="Add the rows to the existing table.")
@click.option(
    "--replace", "mode", flag_value="replace", help="Replace the existing table's rows (one snapshot; history kept)."
)
@click.option(
    "--partition-by",
    multiple=True,
    help="With --create: a partition field, COLUMN or COLUMN:year|month|day|hour|bucket[N]|truncate[N]. Repeatable.",
)
@click.option(
    "--type",
    "types",
    multiple=True,
    help="COLUMN=TYPE (DuckDB type names: BIGINT, DOUBLE, DATE, TIMESTAMP, DECIMAL(12,2), VARCHAR). Repeatable.",
)
@click.option(
    "--dry-run", is_flag=True, help="Read and check the files, show the schema and the rows set aside; write nothing."
)
@as_principal
@click.pass_context
def load_command(
    ctx: click.Context,
    paths: tuple[str, ...],
    name: str,
    mode: str | None,
    partition_by: tuple[str, ...],
    types: tuple[str, ...],
    dry_run: bool,
    principal: str,
) -> None:
    """Load CSV, Parquet or JSON lines files (files, folders, globs) into an Iceberg table.

    \b
    Examples:
      lakegate table load orders/*.csv --table sales.orders --partition-by order_ts:month --as admin
      lakegate table load more.csv --table sales.orders --append --type amount=DECIMAL(12,2) --as admin

    Types are inferred from the files (shown before anything is written); a row whose values do
    not fit is set aside and reported by file and line, and the rest are loaded in one snapshot.
    """
    from lakegate.catalog.file_loader import expand_paths, read_files

    try:
        overrides = dict(_type_override(text) for text in types)
        files = expand_paths(paths)
    except InvalidArgument as exc:
        raise click.ClickException(str(exc)) from exc
    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=err
    ) as bar:
        task = bar.add_task("reading", total=len(files))
        try:
            loaded = read_files(files, overrides, progress=lambda path: bar.advance(task))
        except InvalidArgument as exc:
            raise click.ClickException(str(exc)) from exc
    _show_schema(loaded.data.schema, loaded.data.num_rows, len(files))
    _show_rejects(loaded.rejected)
    if dry_run:
        err.print("Dry run: nothing was written.")
        return
    if loaded.data.num_rows == 0:
        raise click.ClickException("No row of the files can be loaded; nothing was written.")
    chosen = cast("LoadMode", mode or "create")  # click's flag values are the three modes
    arguments = {"table": name, "mode": chosen, "files": str(len(files)), "partition_by": ",".join(partition_by)}
    outcome = through_gate(
        ctx,
        principal,
        "table/load",
        arguments,
        lambda scope: scope.load_table(loaded, name, mode=chosen, partition_by=partition_by),
    )
    if isinstance(outcome, StagedChange):
        click.echo(
            f"Staged {outcome.rows:,} rows for {name} as change {outcome.change_id}: a person must approve it "
            "(lakegate changes approve) before they are in the table."
        )
        return
    verb = {"create": "Created", "append": "Appended to", "replace": "Replaced the rows of"}[chosen]
    click.echo(f"{verb} {name}: {outcome.rows:,} rows in snapshot {outcome.snapshot_id}.")


@table.command("register")
@click.argument("name")
@click.argument("metadata_location")
@as_principal
@click.pass_context
def register_command(ctx: click.Context, name: str, metadata_location: str, principal: str) -> None:
    """Add an existing Iceberg table to lakegate's (writable, SQL) catalog as NAME.

    METADATA_LOCATION is the table's current metadata file (…/metadata/NNNNN-….metadata.json), a
    local path or an s3:// URI this machine can read. The table's files stay where they are.
    """
    snapshot = through_gate(
        ctx, principal, "table/register", {"table": name}, lambda scope: scope.register_table(name, metadata_location)
    )
    click.echo(f"Registered {name} (current snapshot {snapshot}). Policy decides who reads it: deny by default.")


def _type_override(text: str) -> tuple[str, str]:
    column, sep, kind = text.partition("=")
    if not sep or not column.strip() or not kind.strip():
        raise InvalidArgument(f"--type {text}: expected COLUMN=TYPE.", hint="For example --type amount=DECIMAL(12,2).")
    return column.strip(), kind.strip()


def _show_schema(schema: pa.Schema, rows: int, files: int) -> None:
    shown = Table("column", "type", title=f"{rows:,} rows from {files} file(s)")
    for field in schema:
        shown.add_row(escape(field.name), escape(str(field.type)))
    err.print(shown)


def _show_rejects(rejected: tuple[Rejected, ...]) -> None:
    if not rejected:
        return
    shown = Table(
        "file", "line", "column", "problem", title=f"{len(rejected):,} row problem(s): those rows are set aside"
    )
    for problem in rejected[:SHOWN_REJECTS]:
        shown.add_row(
            escape(problem.file), str(problem.line or ""), escape(problem.column or ""), escape(problem.problem)
        )
    err.print(shown)
    if len(rejected) > SHOWN_REJECTS:
        err.print(f"... and {len(rejected) - SHOWN_REJECTS:,} more.")
