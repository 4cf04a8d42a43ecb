"""One governed SQL query, from the agent's text to a page of rows.

    parse (guard) -> decide each table -> plan each scan (snapshot) -> decide each column
    -> resolve the columns read (refuse hidden ones) -> build governed scans (masks, row filters)
    -> rewrite -> run in a DuckDB sandbox -> a page of JSON rows

Every decision goes through the caller's `CallScope`, and everything the audit record needs (the
original and rewritten SQL, the snapshot of each table read, the columns read with their access,
the row filters applied) is noted on it.
"""

from __future__ import annotations

import base64
import json
import math
import re
import secrets
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import date, datetime, time, timedelta
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from catalog.iceberg_scan import ScanPlan
from policies.columns import ColumnAccess
from policies.masks import mask_macro_name
from policies.row_filters import RowFilter
from policies.sql_guard import GuardedQuery, InvalidQuery, TableColumns, page, parse_query, resolve_columns, rewrite
from server.errors import ConfigurationError, LimitExceeded, NotFound

if TYPE_CHECKING:
    import pyarrow as pa

    from server.scope import CallScope

__all__ = ["QueryPage", "json_value", "run_query"]

MAX_SAFE_INTEGER = 2**53 - 1


@dataclass(frozen=True)
class QueryPage:
    """One page of a governed query's result (or its plan, for explain)."""

    columns: list[tuple[str, str]]  # (name, type)
    rows: list[list[Any]]  # JSON-ready values
    offset: int
    more: bool  # rows exist past this page
    snapshots: dict[str, int | None]  # table -> snapshot id read
    rewritten_sql: str
    masked: dict[str, str]  # "table.column" -> mask method, for the columns the query read
    row_filters: dict[str, list[str]]  # table -> predicates applied
    ordered: bool
    plan: str | None = None


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def governed_scan(
    plan: ScanPlan, accesses: Mapping[str, ColumnAccess], filters: list[RowFilter], source: str
) -> str:
    """The SELECT a table reference becomes: visible columns (masked where policy says), filtered rows.

    `source` is what the scan reads from: a placeholder name, replaced by `scan_source(plan)` in the
    rewritten SQL.

    Raises:
        ConfigurationError: a row filter names a column the table does not have (fail closed).
    """
    names = {column.name.lower() for column in plan.columns}
    for row_filter in filters:
        unknown = row_filter.columns() - names
        if unknown:
            raise ConfigurationError(
                f"row filter {row_filter.where!r} on {plan.table} for {row_filter.subject} names unknown "
                f"column(s) {sorted(unknown)}; every query of {plan.table} is refused until it is fixed"
            )
    selected = []
    for column in plan.columns:
        access = accesses[column.name]
        if access.access == "hidden":
            continue
        if access.access == "masked" and access.mask is not None:
            selected.append(f"{mask_macro_name(access.mask)}({_quote(column.name)}) AS {_quote(column.name)}")
        else:
            selected.append(_quote(column.name))
    if not selected:
        raise NotFound(f"No column of {plan.table} is visible to you.", hint="Call list_datasets.")
    where = " AND ".join(f"({row_filter.sql()})" for row_filter in filters)
    return f"SELECT {', '.join(selected)} FROM {_quote(source)}" + (f" WHERE {where}" if where else "")


def scan_source(plan: ScanPlan) -> str:
    """The relation holding a table's rows at the planned snapshot: its Parquet files."""
    if plan.relation is not None:
        return plan.relation  # files on object storage: Arrow datasets, mapped by field id already
    if plan.files:
        files = ", ".join(_literal(path) for path in plan.files)
        # Columns by Iceberg field id, not by name: files written before a rename or a dropped and
        # re-added column still read right, and a column added later reads NULL in older files.
        fields = ", ".join(
            f"{c.field_id}: {{name: {_literal(c.name)}, type: {_literal(c.duckdb_type)}, default_value: NULL}}"
            for c in plan.columns
        )
        return f"read_parquet([{files}], schema = MAP {{{fields}}})"
    # An empty table has no file: an empty relation of the same columns and types.
    empty = ", ".join(f"CAST(NULL AS {c.duckdb_type}) AS {_quote(c.name)}" for c in plan.columns)
    return f"(SELECT {empty} LIMIT 0)"


def _substitute(template: str, sources: Mapping[str, str]) -> str:
    for placeholder, source in sources.items():
        template = template.replace(f'"{placeholder}"', source)
    return template


_ESTIMATE = re.compile(r"~[\d,.]+\s*rows?", re.IGNORECASE)


def _without_estimates(plan: str) -> str:
    """DuckDB's plan without its row estimates: those are made before row filters apply."""
    return _ESTIMATE.sub("", plan)


def _lance_refusal(name: str) -> InvalidQuery:
    return InvalidQuery(
        f"{name} is a Lance dataset of documents, not a table SQL can read.",
        hint="Query Iceberg tables with SQL; list_datasets shows each dataset's kind.",
    )


def run_query(
    scope: CallScope,
    sql: str,
    *,
    as_of: Mapping[str, int | datetime],
    offset: int,
    count: int,
    explain: bool = False,
) -> QueryPage:
    """Run one governed query as the scope's principal and return one page of it.

    Raises:
        InvalidQuery: the SQL is not an acceptable read-only query, or DuckDB rejects it.
        NotFound: a table or snapshot does not exist or is not visible to the caller.
        PolicyDenied: the query reads a column hidden from the caller.
        LimitExceeded: the query ran out of time or memory, or one row exceeds the byte budget.
        ConfigurationError, BackendError: lakegate's own failures (details go to the log).
    """
    settings = scope.settings.query
    query = parse_query(sql, max_chars=settings.max_sql_chars)
    unknown = sorted(set(as_of) - set(query.tables))
    if unknown:
        raise InvalidQuery(
            f"as_of names {', '.join(unknown)}, which the query does not read.",
            hint="Key as_of by the tables named in the SQL (namespace.table).",
        )
    plans: dict[str, ScanPlan] = {}
    accesses: dict[str, dict[str, ColumnAccess]] = {}
    for name in query.tables:
        scope.require_dataset(name)
        try:
            plans[name] = scope.plan_scan(name, as_of.get(name))
        except NotFound:
            # Not an Iceberg table: say so if it is a Lance dataset (the caller may read it).
            if scope.dataset_kind(name) == "lance":
                raise _lance_refusal(name) from None
            raise
        columns = [column.name for column in plans[name].columns]
        accesses[name] = dict(zip(columns, scope.columns(name, columns), strict=True))

    tables = {
        name: TableColumns(
            types={c.name.lower(): c.duckdb_type for c in plans[name].columns if accesses[name][c.name].visible},
            hidden=frozenset(c.name.lower() for c in plans[name].columns if not accesses[name][c.name].visible),
        )
        for name in query.tables
    }
    read = resolve_columns(query, tables)
    masked: dict[str, str] = {}
    filters: dict[str, list[RowFilter]] = {}
    scans: dict[str, str] = {}
    # Placeholders for the scans' sources, unguessable so that no agent text can collide with one.
    sources = {f"lakegate_source_{secrets.token_hex(8)}": scan_source(plans[name]) for name in query.tables}
    for name, placeholder in zip(query.tables, sources, strict=True):
        by_lower = {column.lower(): access for column, access in accesses[name].items()}
        for column in sorted(read[name]):
            access = by_lower[column]
            scope.record("column", access.column, "masked" if access.access == "masked" else "read")
            if access.mask:
                masked[access.column] = access.mask
        filters[name] = scope.row_filters(name)
        scans[name] = governed_scan(plans[name], accesses[name], filters[name], placeholder)
        scope.record("dataset", name, "filtered" if filters[name] else "read", plans[name].snapshot_id)
    template = rewrite(query, scans)
    runnable = _substitute(template, sources)
    # What the audit record and explain show: each table's files named by the snapshot they are,
    # so that records stay small and no server path reaches the agent.
    labels = {p: f'"{name}@{plans[name].snapshot_id}"' for name, p in zip(query.tables, sources, strict=True)}
    rewritten = _substitute(template, labels)
    snapshots = {name: plan.snapshot_id for name, plan in plans.items()}
    applied = {name: [f.sql() for f in found] for name, found in filters.items() if found}
    scope.details.update(rewritten_sql=rewritten, snapshots=snapshots, row_filters=applied, masked_columns=masked)
    engine = scope.query_engine()
    if explain:
        plan = _without_estimates(engine.explain(runnable))
        return QueryPage([], [], 0, False, snapshots, rewritten, masked, applied, query.ordered, plan)

    def progress(done: float) -> None:
        scope.report_progress(round(done, 1), 100.0, "query running (percent done, as DuckDB estimates it)")

    table, complete = engine.run_page(
        page(runnable, offset, count + 1), scope.on_cancel, progress, max_bytes=scope.limits.max_bytes
    )
    shown = _page(query, table, offset, count, scope.limits.max_bytes, snapshots, rewritten, masked, applied)
    return shown if complete else replace(shown, more=True)


def _page(
    query: GuardedQuery,
    table: pa.Table,
    offset: int,
    count: int,
    max_bytes: int,
    snapshots: dict[str, int | None],
    rewritten: str,
    masked: dict[str, str],
    applied: dict[str, list[str]],
) -> QueryPage:
    columns = [(field.name, str(field.type)) for field in table.schema]
    shown = table.slice(0, count)
    # Column by column: output names may repeat (SELECT a.id, b.id), which a dict per row would merge.
    values = [shown.column(i).to_pylist() for i in range(shown.num_columns)]
    rows: list[list[Any]] = []
    used = 0
    for raw in zip(*values, strict=True):
        row = [json_value(value) for value in raw]
        size = len(json.dumps(row, separators=(",", ":")))
        if rows and used + size > max_bytes:
            break
        if not rows and size > max_bytes:
            raise LimitExceeded(
                f"One row of the result is {size:,} bytes, more than the {max_bytes:,}-byte budget of a call.",
                hint="Select fewer or shorter columns (e.g. left(text, 200)).",
            )
        rows.append(row)
        used += size
    more = table.num_rows > len(rows)
    return QueryPage(columns, rows, offset, more, snapshots, rewritten, masked, applied, query.ordered)


def json_value(value: Any) -> Any:
    """A result value as JSON: exact decimals and huge integers as strings, ISO 8601 times, base64 bytes."""
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, int):
        # Beyond 2^53 a JSON number is rounded by JavaScript clients: send those as strings.
        return value if abs(value) <= MAX_SAFE_INTEGER else str(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, datetime | date | time):
        return value.isoformat()
    if isinstance(value, timedelta):
        return str(value)
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, dict):
        return {str(k): json_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_value(v) for v in value]
    return str(value)
