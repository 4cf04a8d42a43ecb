"""One governed SQL query, from the agent's text to a page of rows.

    parse (guard) -> decide each table -> plan each scan (snapshot) -> decide each column
    -> resolve the columns read (refuse hidden ones) -> build governed scans (masks, row filters)
    -> rewrite -> run in a query worker's sandbox -> a page of JSON rows

Every decision goes through the caller's `CallScope`, and everything the audit record needs (the
original and rewritten SQL, the snapshot of each table read, the columns read with their access,
the row filters applied) is noted on it.

The engine gets the rewritten query (a `GovernedSql`: one tree, which it renders in its own dialect)
with a placeholder for each table and, for each placeholder, the planned files and the columns its
governed scan needs (visible and row-filter columns, never a hidden one): nothing else is readable
in its sandbox. The tables the audit record says were read are the ones the engine reports it
scanned; a scan the guard did not expect fails the call.
"""

from __future__ import annotations

import base64
import json
import math
import re
import secrets
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import replace
from datetime import date, datetime, time, timedelta
from decimal import Decimal
from typing import TYPE_CHECKING, Any, TypeVar

from lakegate.catalog.arrow_relations import TableSource
from lakegate.catalog.iceberg_scan import ScanPlan
from lakegate.errors import (
    BackendError,
    ConfigurationError,
    GovernanceViolation,
    LimitExceeded,
    NotFound,
    PolicyDenied,
    SourceUnavailable,
)
from lakegate.policies.columns import MASK_METHODS, ColumnAccess
from lakegate.policies.masks import mask_macro_name
from lakegate.policies.row_filters import RowFilter
from lakegate.policies.scan_limits import ScanLimit
from lakegate.policies.sql_filters import pushable_filters
from lakegate.policies.sql_guard import (
    GuardedQuery,
    InvalidQuery,
    TableColumns,
    parse_query,
    resolve_columns,
    rewrite,
)
from lakegate.server.gate.quotas import human_size
from lakegate.tools.scope import QueryPage

if TYPE_CHECKING:
    import pyarrow as pa

    from lakegate.server.gate.scope import CallScope

__all__ = ["QueryPage", "json_value", "run_query"]

MAX_SAFE_INTEGER = 2**53 - 1
T = TypeVar("T")


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def governed_scan(
    plan: ScanPlan,
    accesses: Mapping[str, ColumnAccess],
    filters: list[RowFilter],
    source: str,
    masks: Mapping[str, str] | None = None,
) -> str:
    """The SELECT a table reference becomes: visible columns (masked where policy says), filtered rows.

    `source` is what the scan reads from: a placeholder name, replaced by the table's relation in
    the query worker. `masks` names the function of each mask method for this call (default: the
    masks' own names): per-call names that no agent text can know, which the worker maps to its
    mask macros, so that SQL the guard and DuckDB read differently cannot call a mask as an oracle.

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
            function = (masks or {}).get(access.mask) or mask_macro_name(access.mask)
            selected.append(f"{function}({_quote(column.name)}) AS {_quote(column.name)}")
        else:
            selected.append(_quote(column.name))
    if not selected:
        raise NotFound(f"No column of {plan.table} is visible to you.", hint="Call list_datasets.")
    where = " AND ".join(f"({row_filter.sql()})" for row_filter in filters)
    return f"SELECT {', '.join(selected)} FROM {_quote(source)}" + (f" WHERE {where}" if where else "")


def table_source(plan: ScanPlan, accesses: Mapping[str, ColumnAccess], filters: list[RowFilter]) -> TableSource:
    """What the engine may read of a table for one call: its planned files, and of its columns only
    those the governed scan needs (the visible ones, and those a row filter reads)."""
    filtered = {column for row_filter in filters for column in row_filter.columns()}
    return plan.source({c.name for c in plan.columns if accesses[c.name].visible or c.name.lower() in filtered})


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


@contextmanager
def _attached_failures(plans: Mapping[str, ScanPlan]) -> Iterator[None]:
    """The engine's failure to read files, where the query reads an attached catalog's table (its
    files moved, or the catalog's storage settings are wrong), as SourceUnavailable: which table, and
    that the server's settings are at fault."""
    try:
        yield
    except BackendError as exc:
        attached = [(name, plan.store) for name, plan in plans.items() if plan.store is not None]
        if not attached or type(exc) is not BackendError:
            raise
        raise SourceUnavailable(str(exc), table=attached[0][0], catalog=str(attached[0][1])) from exc


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
        field_ids = {column.name: column.field_id for column in plans[name].columns}
        accesses[name] = dict(zip(columns, scope.columns(name, columns, field_ids), strict=True))

    tables = {
        name: TableColumns(
            types={c.name.lower(): c.duckdb_type for c in plans[name].columns if accesses[name][c.name].visible},
            hidden=frozenset(c.name.lower() for c in plans[name].columns if not accesses[name][c.name].visible),
        )
        for name in query.tables
    }
    for name, seen in tables.items():
        if not seen.types and seen.hidden:
            raise PolicyDenied(
                f"Every column of {name} is hidden from you by policy, so the query cannot read it.",
                hint="describe_dataset shows each column's access; ask a data steward if you need one.",
            )
    resolved = resolve_columns(query, tables)
    read = resolved.read
    # The query's own filters, where they provably cannot change an answer, prune the files read.
    # Not for a table the caller reads through a row filter: which files survive depends on rows
    # the caller may not see, and explain's plan or a scan-limit refusal would show it. Nor for
    # nanosecond timestamps, which pyiceberg cannot compare and DuckDB reads truncated.
    filters: dict[str, list[RowFilter]] = {name: scope.row_filters(name) for name in query.tables}
    clear = {
        name: {
            c.name.lower(): c.duckdb_type
            for c in plans[name].columns
            if accesses[name][c.name].access == "clear" and not c.iceberg_type.endswith("_ns")
        }
        for name in query.tables
        if not filters[name]
    }
    for name, pushed in pushable_filters(query.tree, resolved.scopes, clear).items():
        if name not in as_of:
            plans[name] = scope.prune_scan(plans[name], pushed)
    masked: dict[str, str] = {}
    scans: dict[str, str] = {}
    # Placeholders for the tables' relations, unguessable so that no agent text can collide with one.
    placeholders = {f"lakegate_source_{secrets.token_hex(8)}": name for name in query.tables}
    token = secrets.token_hex(8)
    masks = {method: f"{mask_macro_name(method)}_{token}" for method in MASK_METHODS}
    sources: dict[str, TableSource] = {}
    for placeholder, name in placeholders.items():
        by_lower = {column.lower(): access for column, access in accesses[name].items()}
        for column in sorted(read[name]):
            access = by_lower[column]
            scope.record("column", access.column, "masked" if access.access == "masked" else "read")
            if access.mask:
                masked[access.column] = access.mask
        scans[name] = governed_scan(plans[name], accesses[name], filters[name], placeholder, masks)
        sources[placeholder] = table_source(plans[name], accesses[name], filters[name])
    statement = rewrite(query, scans, masks=_by_function(masks))
    # What the audit record and explain show: each table's relation named by the snapshot it is,
    # so that records stay small and nothing of the server's files reaches the agent.
    labels = {p: f'"{name}@{plans[name].snapshot_id}"' for p, name in placeholders.items()}
    rewritten = _substitute(statement.sql, labels)
    for method, function in masks.items():  # shown under the masks' own names (sqlglot upper-cases them)
        rewritten = re.sub(re.escape(function), mask_macro_name(method).upper(), rewritten, flags=re.IGNORECASE)
    snapshots = {name: plan.snapshot_id for name, plan in plans.items()}
    applied = {name: [f.sql() for f in found] for name, found in filters.items() if found}
    # The bytes each scan reads: the column chunks of the columns the query and its row filters read
    # (a scan that needs none, as count(*), reads its source's first column).
    to_read: dict[str, int] = {}
    for placeholder, name in placeholders.items():
        needed = set(read[name]) | {column for found in filters[name] for column in found.columns()}
        to_read[name] = plans[name].bytes_to_read(needed or [c.name for c in sources[placeholder].columns[:1]])
    scope.details.update(
        rewritten_sql=rewritten,
        snapshots=snapshots,
        row_filters=applied,
        masked_columns=masked,
        planned_scan={name: _scan_estimate(plan, to_read[name]) for name, plan in plans.items()},
    )
    limit = scope.scan_limit()
    over: LimitExceeded | None = _over_limit(plans, to_read, filters, limit)
    if over is not None and not explain:
        scope.details["scan_limit"] = limit.max_scan_bytes if limit else None
        raise over
    planned = sum(to_read.values())
    budget = scope.scan_budget
    # A query through a row filter is counted after it runs but not compared with what is left
    # first: the caller steers what is left to the byte (with queries of clear tables), so the
    # comparison would tell the whole size of a table it sees only part of.
    filtered = any(filters.values())
    if over is None and budget is not None and not filtered and scope.scan_bytes + planned > budget.left:
        over = budget.refusal(scope.scan_bytes + planned)
        if not explain:
            raise over
    # Spark for the datasets configured to run there, or for a scan too big for one machine.
    local = all(plan.store is None and all(path.startswith("/") for path, _ in plan.files) for plan in plans.values())
    engine = scope.query_engine("spark" if settings.spark.runs(list(query.tables), planned, local=local) else "duckdb")
    scope.details["engine"] = engine.name
    if explain:
        for name in query.tables:
            scope.record("dataset", name, "planned", plans[name].snapshot_id)
        with _attached_failures(plans):
            physical = _without_estimates(engine.explain(statement, sources))
        summary = _scan_summary(plans, to_read, filters)
        if over is not None:
            summary += f"\n{over.message}"
        plan = f"{summary}\n\n{physical}"
        return QueryPage([], [], 0, False, snapshots, rewritten, masked, applied, query.ordered, plan, engine.name)

    def progress(done: float) -> None:
        scope.report_progress(round(done, 1), 100.0, "query running (percent done, as the engine estimates it)")

    scanned: dict[str, list[str]] = {}
    scope.scan_bytes += planned  # counted against the daily scan quota, whatever happens next
    try:
        with _attached_failures(plans):
            result = engine.run_page(
                statement.page(offset, count + 1), sources, scope.on_cancel, progress, max_bytes=scope.limits.max_bytes
            )
        scanned = _scanned_tables(result.scanned, placeholders, sources)
        if result.bytes_read is not None:
            scope.details["bytes_read"] = result.bytes_read  # measured, beside planned_scan's estimate
    finally:
        # What the engine says it read; a table it did not scan (the call failed, or the optimiser
        # dropped it) was only planned.
        for name in query.tables:
            read_as = ("filtered" if filters[name] else "read") if name in scanned else "planned"
            scope.record("dataset", name, read_as, plans[name].snapshot_id)
            # Columns the engine read that the guard did not count as read by the query (a row
            # filter's, one counted rows by, or SQL the guard misread): recorded all the same.
            for column in sorted(set(scanned.get(name, ())) - {c.lower() for c in read[name]}):
                scope.record("column", f"{name}.{column}", "scanned")
        scope.details["scanned"] = scanned
    assert result.table is not None
    shown = _page(query, result.table, offset, count, scope.limits.max_bytes, snapshots, rewritten, masked, applied)
    return replace(shown, engine=engine.name, more=shown.more or not result.complete)


def _scan_estimate(plan: ScanPlan, to_read: int) -> dict[str, int]:
    """What the plan will read: files, their bytes, the bytes of the columns read in them, and rows
    (and the snapshot's files before the query's filters pruned them)."""
    estimate = {"files": len(plan.files), "file_bytes": plan.bytes, "bytes": to_read, "rows": plan.rows}
    if plan.unpruned_files is not None:
        estimate["files_before_pruning"] = plan.unpruned_files
    return estimate


def _scan_summary(
    plans: Mapping[str, ScanPlan], to_read: Mapping[str, int], filters: Mapping[str, list[RowFilter]]
) -> str:
    """The scan estimate as explain shows it, one line per table. Not for a table the caller reads
    through a row filter: its files, bytes and rows count rows the caller may not see."""
    lines = []
    for name, plan in plans.items():
        if filters.get(name):
            lines.append(f"{name}: not shown (a row filter applies to you)")
            continue
        pruned = "" if plan.unpruned_files is None else f" of {plan.unpruned_files:,} (pruned by the query's filters)"
        lines.append(
            f"{name}: {len(plan.files):,} files{pruned}, {to_read[name]:,} bytes to read (the columns read, "
            f"of {plan.bytes:,} bytes in those files), {plan.rows:,} rows"
        )
    return "Scan estimate:\n" + "\n".join(lines)


def _over_limit(
    plans: Mapping[str, ScanPlan],
    to_read: Mapping[str, int],
    filters: Mapping[str, list[RowFilter]],
    limit: ScanLimit | None,
) -> LimitExceeded | None:
    """The refusal of a query whose scans read more bytes than the caller's scan limit, or None.

    The message gives each table's files and bytes, unless the caller reads one of them through a
    row filter (its files count rows the caller may not see): then only that the limit is exceeded.
    """
    if limit is None or sum(to_read.values()) <= limit.max_scan_bytes:
        return None
    sizes = ""
    if not any(filters.get(name) for name in plans):
        sizes = (
            " ("
            + "; ".join(
                f"{name}: {len(p.files):,} files, {human_size(to_read[name])} of the columns read"
                for name, p in plans.items()
            )
            + ")"
        )
    return LimitExceeded(
        f"This query would read more than the {human_size(limit.max_scan_bytes)} of data files one query of yours "
        f"may read{sizes}: it was not run.",
        hint="Select only the columns you need, narrow it with WHERE conditions comparing columns with values "
        "(a time range on the table's partition column prunes the most; describe_dataset shows the "
        "partitioning), or ask for a metric. "
        "query with explain: true shows the estimate.",
    )


def _by_function(masks: Mapping[str, str]) -> dict[str, str]:
    return {function: method for method, function in masks.items()}


def _scanned_tables(
    scanned: Mapping[str, list[str]], placeholders: Mapping[str, str], sources: Mapping[str, TableSource]
) -> dict[str, list[str]]:
    """The engine's own account of what it read, by table: the columns each scan projected.

    Raises:
        GovernanceViolation: the engine read a relation or a column it was not handed for this
            call (the guard's analysis and the engine disagree: no data leaves the call).
    """
    tables: dict[str, list[str]] = {}
    for placeholder, columns in scanned.items():
        if placeholder not in placeholders:
            raise GovernanceViolation(f"the engine scanned relation {placeholder!r}, which no governed scan names")
        handed = {column.name for column in sources[placeholder].columns}
        name = placeholders[placeholder]
        if not set(columns) <= handed:
            raise GovernanceViolation(
                f"the engine read columns of {name} it was not handed: {sorted(set(columns) - handed)}"
            )
        tables[name] = sorted(set(tables.get(name, [])) | set(columns))
    return tables


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
