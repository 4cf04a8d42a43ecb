"""SQL fragments the metric compiler writes (catalog/metric_compiler.py): aggregations, periods,
literals, quoted names and derived expressions, in DuckDB's dialect."""

from __future__ import annotations

from typing import Any

import sqlglot
from sqlglot import exp

from lakegate.catalog.metric_definitions import Metric
from lakegate.catalog.metric_query import query_error

__all__ = [
    "AGG_SQL",
    "DIALECT",
    "GRAIN_STEP",
    "ZERO_FILLED",
    "derived_expression",
    "literal",
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
