"""SQL fragments the metric compiler writes (catalog/metric_compiler.py): aggregations, periods,
literals, quoted names and derived expressions, in DuckDB's dialect."""

from __future__ import annotations

import math
from typing import Any

import sqlglot
from sqlglot import exp

from lakegate.catalog.metric_definitions import Metric
from lakegate.catalog.metric_query import DimensionFilter, query_error

__all__ = [
    "AGG_SQL",
    "DIALECT",
    "GRAIN_STEP",
    "ZERO_FILLED",
    "check_span",
    "condition",
    "derived_expression",
    "literal",
    "period_condition",
    "periods_interval",
    "quote",
    "truncated",
]

DIALECT = "duckdb"
ZERO_FILLED = {"sum", "count", "count_distinct"}
AGG_SQL = {
    "sum": "sum({x})",
    "count": "count({x})",
    "count_distinct": "count(DISTINCT {x})",
    "avg": "avg({x})",
    "min": "min({x})",
    "max": "max({x})",
    "median": "median({x})",
    "percentile": "quantile_cont({x}, {p})",
}
GRAIN_STEP = {"day": "INTERVAL 1 DAY", "week": "INTERVAL 7 DAY", "month": "INTERVAL 1 MONTH",
               "quarter": "INTERVAL 3 MONTH", "year": "INTERVAL 1 YEAR"}  # fmt: skip


def literal(value: Any) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, bool):
        return "TRUE" if value else "FALSE"
    if isinstance(value, float) and not math.isfinite(value):
        raise query_error("A filter value must be a finite number.", "Send a number such as 1e6, not one beyond it.")
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return "'" + value.replace("'", "''") + "'"
    # The value's type only: a value of a tagged dimension must not reach the error (nor its audit record).
    raise query_error(
        f"A filter value of type {type(value).__name__} is not accepted: send a string, number, boolean or null.",
        "Send a plain value.",
    )


def truncated(sql: str, grain: str) -> str:
    # On a plain TIMESTAMP (UTC in lakegate's sandboxes), date_trunc is several times faster than
    # on a TIMESTAMPTZ, which goes through the ICU calendar.
    return f"CAST(date_trunc('{grain}', CAST({sql} AS TIMESTAMP)) AS DATE)"


def quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def periods_interval(count: int, grain: str) -> str:
    """`count` periods of `grain` as a DuckDB interval."""
    unit, times = {"day": ("DAY", 1), "week": ("DAY", 7), "month": ("MONTH", 1), "quarter": ("MONTH", 3),
                   "year": ("YEAR", 1)}[grain]  # fmt: skip
    return f"INTERVAL {count * times} {unit}"


def derived_expression(metric: Metric, values: dict[str, str]) -> str:
    """The derived metric's expression with each input name replaced by its value; `/` never divides by 0."""
    assert metric.expr is not None

    def substitute(node: exp.Expr) -> exp.Expr:
        if not isinstance(node, exp.Column):
            return node
        if node.name not in values:
            raise query_error(f"Metric {metric.name}: expression names {node.name}, which is not one of its inputs.")
        return sqlglot.parse_one(values[node.name], dialect=DIALECT)

    # transform, not replace: the expression may be a single input, the root itself.
    tree = sqlglot.parse_one(metric.expr, dialect=DIALECT).transform(substitute)
    for division in list(tree.find_all(exp.Div)):
        division.set("this", exp.Cast(this=division.this, to=exp.DataType.build("DOUBLE")))
        division.set("expression", exp.Nullif(this=division.expression, expression=exp.Literal.number(0)))
    return tree.sql(DIALECT)


def condition(sql: str, spec: DimensionFilter) -> str:
    """A typed filter on `sql` (a dimension's SQL), its values as quoted literals."""
    if spec.op in ("is null", "is not null"):
        return f"{sql} {spec.op.upper()}"
    if spec.op in ("in", "not in"):
        if not isinstance(spec.value, list) or not spec.value:
            raise query_error(f"Filter '{spec.op}' on {spec.dimension} needs a non-empty list of values.")
        return f"{sql} {spec.op.upper()} ({', '.join(literal(v) for v in spec.value)})"
    if isinstance(spec.value, list):
        raise query_error(f"Filter '{spec.op}' on {spec.dimension} takes one value, not a list.")
    return f"{sql} {spec.op} {literal(spec.value)}"


def period_condition(period: str, grain: str, filter_grain: str | None, spec: DimensionFilter) -> str:
    """A metric_time filter on the result's periods (`period`, of `grain`): a period stays when
    some instant in it passes.

    The filter may be at another grain than the query (`filter_grain`), or on metric_time itself
    (None): the rows are filtered already, so a period the filter cuts through keeps its part
    (metric_time__day >= '2025-10-15' by month keeps October), and a filter by year keeps every
    month of the year.
    """
    plain = condition(period, spec)  # also checks the value's shape
    if filter_grain == grain or spec.op in ("is null", "is not null"):
        return plain
    start, end = f"CAST({period} AS TIMESTAMP)", f"({period} + {GRAIN_STEP[grain]})"
    values = spec.value if isinstance(spec.value, list) else [spec.value]

    def low(value: Any) -> str:
        return f"CAST({literal(value)} AS TIMESTAMP)"

    def high(value: Any) -> str:  # the end of the filter's own period (the instant itself without a grain)
        return f"({low(value)} + {GRAIN_STEP[filter_grain]})" if filter_grain else low(value)

    before = "<" if filter_grain else "<="
    if spec.op in ("=", "in"):
        return "(" + " OR ".join(f"({start} {before} {high(v)} AND {end} > {low(v)})" for v in values) + ")"
    if spec.op in ("!=", "not in"):
        if filter_grain is None:
            return "TRUE"  # no period is a single instant
        return " AND ".join(f"NOT ({start} >= {low(v)} AND {end} <= {high(v)})" for v in values)
    return {
        ">=": f"{end} > {low(spec.value)}",
        ">": f"{end} > {high(spec.value)}",
        "<": f"{start} < {low(spec.value)}",
        "<=": f"{start} {before} {high(spec.value)}",
    }[spec.op]


def check_span(span: str, grain: str) -> None:
    """Refuse a span (a DuckDB interval) that does not move the query's periods of `grain` by whole
    periods (7 days by month): shifting the month's total by 7 days is not the total of its days 7
    days earlier.

    Raises:
        InvalidArgument: the span does not move a period of `grain` by whole periods.
    """
    count, unit = span.removeprefix("INTERVAL ").split()
    whole = {
        "day": True,
        "week": unit == "DAY" and int(count) % 7 == 0,
        "month": unit in ("MONTH", "YEAR"),
        "quarter": (unit == "MONTH" and int(count) % 3 == 0) or unit == "YEAR",
        "year": unit == "YEAR",
    }
    if not whole[grain]:
        raise query_error(
            f"An input {count} {unit.lower()}s earlier cannot be read by {grain}: it does not move a {grain} "
            "by whole periods.",
            "Group by a finer grain (metric_time__day).",
        )
