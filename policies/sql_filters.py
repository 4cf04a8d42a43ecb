"""Filters of an agent's query that the Iceberg plan may apply before anything is read.

A query's WHERE says which rows it wants; pyiceberg can drop the data files (and partitions) whose
column statistics prove that no row in them passes. `pushable_filters` finds the conditions for
which dropping those files cannot change any answer, and hands them to the planner as plain
(column, operator, value) triples; everything else stays where it is, and the query's own WHERE
still filters every row it reads (a pushed filter only ever removes files, never adds a row).

A condition is pushed for table T only when all of this holds:
- T is named once in the whole query, directly in the FROM or a JOIN of one SELECT, without a
  sample, and that SELECT joins nothing with ASOF, POSITIONAL, SEMI or ANTI joins or LATERAL
  (an ASOF join would match a row of an older file instead of the dropped one);
- the condition is one of the top-level AND terms of that SELECT's WHERE, so every output row
  passed it;
- it compares a column of T with literals: =, <, <=, >, >=, BETWEEN (not NOT/SYMMETRIC), or IN a
  list. Each of these is false for NULL, so a row missing because its file was dropped is
  indistinguishable from a row the WHERE removed, in an outer join too;
- the caller reads the column in clear (not masked: the WHERE compares the masked value, the
  statistics hold the stored one), and the literal converts exactly to the column's type by the
  rules DuckDB uses (integers to integer columns, strings to VARCHAR, ISO dates and timestamps to
  DATE and TIMESTAMP columns, timestamps in the sandbox's UTC to TIMESTAMPTZ, decimals with no more
  digits after the point than the column keeps). Floating point columns are never pushed (NaN);
- or it compares a period of such a time column, `date_trunc('unit', column)` (perhaps cast to DATE,
  as the metric compiler writes `metric_time__month`), with a date or timestamp: then what is pushed
  is a range on the column itself that every row of the period passes (`_period_filters`).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta, timezone, tzinfo
from decimal import Decimal, InvalidOperation
from typing import Literal

from sqlglot import exp
from sqlglot.expressions.datatypes import DType
from sqlglot.optimizer.scope import Scope

from lakegate.policies.sql_guard import table_name

__all__ = ["ColumnFilter", "Operator", "pushable_filters"]

Operator = Literal["=", "<", "<=", ">", ">=", "in"]
Value = int | str | date | datetime | Decimal

_COMPARISONS: dict[type[exp.Expr], tuple[Operator, Operator]] = {
    # node -> (operator with the column on the left, operator with the column on the right)
    exp.EQ: ("=", "="),
    exp.GT: (">", "<"),
    exp.GTE: (">=", "<="),
    exp.LT: ("<", ">"),
    exp.LTE: ("<=", ">="),
}
_INTEGERS = frozenset({"TINYINT", "SMALLINT", "INTEGER", "BIGINT", "UTINYINT", "USMALLINT", "UINTEGER", "UBIGINT"})
_DECIMAL = re.compile(r"^DECIMAL\((\d+),(\d+)\)$")
_INTEGER_TEXT = re.compile(r"^\d+$")
_DECIMAL_TEXT = re.compile(r"^\d+(\.\d+)?$")
_DATE_TEXT = re.compile(r"^\d{4}-\d{2}-\d{2}$")
#: An ISO date, optionally with a time, and an offset only after a time.
_TIMESTAMP_TEXT = re.compile(
    r"^(?P<date>\d{4}-\d{2}-\d{2})"
    r"(?:[ T](?P<time>\d{2}:\d{2}(?::\d{2}(?:\.\d{1,6})?)?)(?P<offset>Z|[+-]\d{2}(?::?\d{2})?)?)?$"
)
_CASTS = {
    "DATE": {DType.DATE},
    "TIMESTAMP": {DType.TIMESTAMP, DType.TIMESTAMPNTZ},
    "TIMESTAMPTZ": {DType.TIMESTAMPTZ},
}
_UNSAFE_JOINS = frozenset({"ASOF", "POSITIONAL", "SEMI", "ANTI"})


@dataclass(frozen=True)
class ColumnFilter:
    """`column op value` (for "in": value is a tuple of values), over the table's own column name."""

    column: str
    op: Operator
    value: Value | tuple[Value, ...]


def pushable_filters(
    tree: exp.Expr, scopes: list[Scope], clear: Mapping[str, Mapping[str, str]]
) -> dict[str, tuple[ColumnFilter, ...]]:
    """The filters each table's plan may apply, by "namespace.table" (tables with none left out).

    `tree` is the query as parsed, `scopes` those of its qualified copy (sql_guard.resolve_columns),
    and `clear` maps each table to the columns the caller reads unmasked (lower-case name -> DuckDB
    type). Anything this cannot prove safe is simply not pushed.
    """
    once = _named_once(tree) & (_named_once(scopes[0].expression.root()) if scopes else frozenset())
    found: dict[str, tuple[ColumnFilter, ...]] = {}
    for scope in scopes:
        select = scope.expression
        if not isinstance(select, exp.Select) or not isinstance(select.args.get("where"), exp.Where):
            continue
        if select.args.get("sample") is not None or not _plain_joins(select):
            continue
        for alias, source in scope.sources.items():
            if not isinstance(source, exp.Table) or source.args.get("sample") is not None:
                continue
            name = table_name(source)
            if name is None or name not in clear or name not in once:
                continue
            if _renames_columns(source) or source.args.get("pivots"):
                continue  # the WHERE sees other names than the table's own: push nothing
            filters = tuple(_filters(select.args["where"].this, alias, clear[name]))
            if filters:
                found[name] = filters
    return found


def _named_once(tree: exp.Expr) -> frozenset[str]:
    """The governed tables that `tree` names exactly once."""
    counts: dict[str, int] = {}
    for node in tree.find_all(exp.Table):
        if (name := table_name(node)) is not None:
            counts[name] = counts.get(name, 0) + 1
    return frozenset(name for name, count in counts.items() if count == 1)


def _plain_joins(select: exp.Select) -> bool:
    for join in select.args.get("joins") or []:
        kind = str(join.args.get("kind") or "").upper()
        method = str(join.args.get("method") or "").upper()
        if kind in _UNSAFE_JOINS or method in _UNSAFE_JOINS or isinstance(join.this, exp.Lateral):
            return False
    return not any(isinstance(node, exp.Lateral) for node in select.args.get("laterals") or [])


def _renames_columns(source: exp.Table) -> bool:
    alias = source.args.get("alias")
    return alias is not None and bool(alias.columns)


def _conjuncts(condition: exp.Expr) -> Iterator[exp.Expr]:
    while isinstance(condition, exp.Paren):
        condition = condition.this
    if isinstance(condition, exp.And):
        yield from _conjuncts(condition.this)
        yield from _conjuncts(condition.expression)
    else:
        yield condition


def _filters(where: exp.Expr, alias: str, columns: Mapping[str, str]) -> Iterator[ColumnFilter]:
    for term in _conjuncts(where):
        yield from _term_filters(term, alias, columns)


def _term_filters(term: exp.Expr, alias: str, columns: Mapping[str, str]) -> list[ColumnFilter]:
    if type(term) in _COMPARISONS:
        left_op, right_op = _COMPARISONS[type(term)]
        for column, other, op in ((term.this, term.expression, left_op), (term.expression, term.this, right_op)):
            if (found := _column(column, alias, columns)) is not None:
                value = _value(other, columns[found])
                return [] if value is None else [ColumnFilter(found, op, value)]
            if (truncated := _truncated(column, alias, columns)) is not None:
                return _period_filters(truncated, op, other, columns[truncated.column])
        return []
    if isinstance(term, exp.Between) and not term.args.get("symmetric"):
        if (truncated := _truncated(term.this, alias, columns)) is not None:
            kind = columns[truncated.column]
            since = _period_filters(truncated, ">=", term.args.get("low"), kind)
            until = _period_filters(truncated, "<=", term.args.get("high"), kind)
            return since + until  # each is implied on its own
        if (found := _column(term.this, alias, columns)) is None:
            return []
        low, high = _value(term.args.get("low"), columns[found]), _value(term.args.get("high"), columns[found])
        if low is None or high is None:
            return []
        return [ColumnFilter(found, ">=", low), ColumnFilter(found, "<=", high)]
    if isinstance(term, exp.In) and not term.args.get("query") and not term.args.get("unnest") and term.expressions:
        if (found := _column(term.this, alias, columns)) is None:
            return []
        values = [_value(item, columns[found]) for item in term.expressions]
        if any(value is None for value in values):
            return []
        return [ColumnFilter(found, "in", tuple(value for value in values if value is not None))]
    return []


def _column(node: exp.Expr | None, alias: str, columns: Mapping[str, str]) -> str | None:
    """The table's column `node` names, when it is a bare column of the table under `alias`."""
    if not isinstance(node, exp.Column) or node.table != alias or node.args.get("db") or node.args.get("catalog"):
        return None
    name = str(node.name).lower()
    return name if name in columns else None


@dataclass(frozen=True)
class _Truncated:
    """`date_trunc(unit, column)`, perhaps read as a DATE: the period a row's time falls in."""

    column: str
    unit: str  # second, minute, hour, day, week, month, quarter or year
    as_date: bool = False  # cast to DATE: compared with a date, a literal's time of day is dropped


_UNITS = ("second", "minute", "hour", "day", "week", "month", "quarter", "year")
_TIMESTAMP_CASTS = frozenset({DType.TIMESTAMP, DType.TIMESTAMPNTZ})


def _truncated(node: exp.Expr | None, alias: str, columns: Mapping[str, str]) -> _Truncated | None:
    """What `node` truncates, when it is `date_trunc('unit', C)` of a time column C of the table
    (C perhaps cast to TIMESTAMP, the whole perhaps cast to DATE): the shape the metric compiler
    writes for `metric_time__month` and an agent for a period."""
    as_date = isinstance(node, exp.Cast) and isinstance(node.to, exp.DataType) and node.to.this == DType.DATE
    if as_date:
        assert isinstance(node, exp.Cast)
        node = node.this
    if not isinstance(node, (exp.TimestampTrunc, exp.DateTrunc)) or node.args.get("zone") is not None:
        return None
    unit = str(node.args["unit"].name if node.args.get("unit") is not None else "").lower()
    inner = node.this
    if isinstance(inner, exp.Cast) and isinstance(inner.to, exp.DataType) and inner.to.this in _TIMESTAMP_CASTS:
        inner = inner.this
    if unit not in _UNITS or (found := _column(inner, alias, columns)) is None:
        return None
    family = _family(columns[found].upper())
    if family not in ("DATE", "TIMESTAMP", "TIMESTAMPTZ"):
        return None
    if (as_date or family == "DATE") and _UNITS.index(unit) < _UNITS.index("day"):
        return None  # a day's part of a date: left to DuckDB
    return _Truncated(found, unit, as_date)


def _period_filters(truncated: _Truncated, op: Operator, other: exp.Expr | None, kind: str) -> list[ColumnFilter]:
    """Filters on the column itself that every row passing `date_trunc(unit, column) op other` also
    passes (so dropping files by them loses none of its rows). A period starts at or before any time
    in it, and ends before the next period starts:

        trunc(c) >= L  =>  c >= L                      trunc(c) > L  =>  c > L
        trunc(c) <= L or trunc(c) < L  =>  c < the start of the period after L's
        trunc(c) = L   =>  both
    """
    if op == "in":
        return []
    found = _time_literal(other)
    if found is None:
        return []
    bound, date_literal = found
    family = _family(kind.upper())
    if truncated.as_date or date_literal:
        # Compared as DATEs, DuckDB reads '2024-01-31 23:00' as 2024-01-31: so does the bound.
        bound = bound.replace(hour=0, minute=0, second=0, microsecond=0)
    if family == "DATE" and bound.time() != datetime.min.time():
        return []
    lower: list[ColumnFilter] = []
    upper: list[ColumnFilter] = []
    if op in (">=", ">", "="):
        lower = [ColumnFilter(truncated.column, ">" if op == ">" else ">=", _as_column_value(bound, family))]
    if op in ("<=", "<", "="):
        try:
            after = _next_period(_period_start(bound, truncated.unit), truncated.unit)
        except (ValueError, OverflowError):
            after = None  # the period after the year 9999's: no upper bound is pushed
        if after is not None:
            upper = [ColumnFilter(truncated.column, "<", _as_column_value(after, family))]
    return lower + upper


def _time_literal(node: exp.Expr | None) -> tuple[datetime, bool] | None:
    """A string literal (perhaps cast to DATE or TIMESTAMP) holding an ISO date or a timestamp
    without an offset, as a naive datetime, and whether it is cast to DATE."""
    as_date = False
    if isinstance(node, exp.Cast) and isinstance(node.to, exp.DataType):
        if node.to.this not in _TIMESTAMP_CASTS | {DType.DATE}:
            return None
        as_date = node.to.this == DType.DATE
        node = node.this
    if not isinstance(node, exp.Literal) or not node.is_string:
        return None
    match = _TIMESTAMP_TEXT.match(str(node.this))
    if match is None or match.group("offset"):
        return None
    try:
        return datetime.fromisoformat(f"{match.group('date')}T{match.group('time') or '00:00'}"), as_date
    except ValueError:
        return None


def _as_column_value(value: datetime, family: str) -> Value:
    if family == "DATE":
        return value.date()
    if family == "TIMESTAMPTZ":
        return value.replace(tzinfo=UTC)  # the sandbox truncates and casts in UTC
    return value


def _period_start(value: datetime, unit: str) -> datetime:
    """DuckDB's date_trunc(unit, value)."""
    if unit == "second":
        return value.replace(microsecond=0)
    if unit == "minute":
        return value.replace(second=0, microsecond=0)
    if unit == "hour":
        return value.replace(minute=0, second=0, microsecond=0)
    day = value.replace(hour=0, minute=0, second=0, microsecond=0)
    if unit == "day":
        return day
    if unit == "week":
        return day - timedelta(days=day.weekday())  # ISO weeks start on Monday
    if unit == "month":
        return day.replace(day=1)
    if unit == "quarter":
        return day.replace(month=(day.month - 1) // 3 * 3 + 1, day=1)
    return day.replace(month=1, day=1)


def _next_period(start: datetime, unit: str) -> datetime:
    steps = {"second": timedelta(seconds=1), "minute": timedelta(minutes=1), "hour": timedelta(hours=1)}
    if unit in steps:
        return start + steps[unit]
    if unit in ("day", "week"):
        return start + timedelta(days=1 if unit == "day" else 7)
    months = {"month": 1, "quarter": 3, "year": 12}[unit]
    index = start.year * 12 + start.month - 1 + months
    return start.replace(year=index // 12, month=index % 12 + 1)


def _value(node: exp.Expr | None, duckdb_type: str) -> Value | None:
    """The Python value of literal `node` as a value of the column's type, or None when it is not a
    literal or does not convert exactly."""
    negative = False
    if isinstance(node, exp.Neg):
        negative, node = True, node.this
    cast: set[DType] = set()
    if isinstance(node, exp.Cast) and isinstance(node.to, exp.DataType):
        cast, node = {node.to.this}, node.this
    if not isinstance(node, exp.Literal):
        return None
    text = str(node.this)
    kind = duckdb_type.upper()
    if node.is_string:
        if negative or (cast and not cast <= _CASTS.get(_family(kind), set())):
            return None
        return _text_value(text, kind)
    if cast:
        return None
    if kind in _INTEGERS and _INTEGER_TEXT.match(text):
        return -int(text) if negative else int(text)
    if (decimal := _DECIMAL.match(kind)) and _DECIMAL_TEXT.match(text):
        try:
            value = Decimal(text)
        except InvalidOperation:
            return None
        precision, scale = int(decimal.group(1)), int(decimal.group(2))
        digits = value.as_tuple()
        if -int(digits.exponent) > scale or len(digits.digits) + int(digits.exponent) > precision - scale:
            return None  # more digits than the column holds: compared exactly by DuckDB, not here
        try:
            value = value.quantize(Decimal(1).scaleb(-scale))
        except InvalidOperation:
            return None
        return -value if negative else value
    return None


def _family(kind: str) -> str:
    if kind in ("TIMESTAMP WITH TIME ZONE", "TIMESTAMPTZ"):
        return "TIMESTAMPTZ"
    return kind


def _text_value(text: str, kind: str) -> Value | None:
    family = _family(kind)
    if kind == "VARCHAR":
        return text
    if family == "DATE" and _DATE_TEXT.match(text):
        try:
            return date.fromisoformat(text)
        except ValueError:
            return None
    if family in ("TIMESTAMP", "TIMESTAMPTZ") and (match := _TIMESTAMP_TEXT.match(text)):
        offset = match.group("offset")
        if offset and family == "TIMESTAMP":
            return None  # DuckDB would convert it; leave it to DuckDB
        try:
            value = datetime.fromisoformat(f"{match.group('date')}T{match.group('time') or '00:00'}")
        except ValueError:
            return None
        if family == "TIMESTAMP":
            return value
        if not offset:
            return value.replace(tzinfo=UTC)  # without an offset, DuckDB reads the sandbox's time zone, UTC
        try:
            return value.replace(tzinfo=_offset(offset))
        except ValueError:
            return None  # an offset of a day or more: DuckDB takes it, Python's time zones do not
    return None


def _offset(text: str) -> tzinfo:
    if text == "Z":
        return UTC
    digits = text[1:].replace(":", "")
    minutes = int(digits[:2]) * 60 + int(digits[2:] or 0)
    return timezone(timedelta(minutes=-minutes if text[0] == "-" else minutes))
