"""Compiling metric queries to SQL over the governed tables.

The SQL this module writes names tables as `namespace.table`, so it runs through the same governed
path as the query tool: the guard rewrites it, masks and row filters apply, the audit record holds it.

How a query compiles:
- Every metric becomes one CTE with the requested dimensions and a `value` column. A simple metric
  aggregates its measure over its model's table, joined to the models whose dimensions it is grouped
  or filtered by. Joins go only from a model to a model whose *primary* entity it holds (many to
  one), so a measure is never fanned out; any other dimension is refused with the reason.
- Ratio and derived metrics compile their inputs first, then combine them on the dimensions. An
  input with an offset is the same metric shifted by that many periods of the query's time grain.
- Cumulative metrics join a spine of periods to the measure's rows that fall in each period's window.
- With metric_time in the query, every period between the first and the last appears (a spine), so
  empty months show up: sum and count metrics read 0 there, other aggregates NULL.
- Division by zero gives NULL, never an error or infinity.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import sqlglot
from sqlglot import exp

from catalog.metric_definitions import GRAINS, Metric, MetricInput, SemanticCatalog, SemanticModel
from server.errors import InvalidArgument

__all__ = [
    "CompiledQuery",
    "DimensionFilter",
    "MetricQuery",
    "available_dimensions",
    "compile_query",
    "parse_dimension",
]

DIALECT = "duckdb"
METRIC_TIME = "metric_time"
FilterOp = Literal["=", "!=", "<", "<=", ">", ">=", "in", "not in", "is null", "is not null"]
_ZERO_FILLED = {"sum", "count", "count_distinct"}
_AGG_SQL = {
    "sum": "sum({x})",
    "count": "count({x})",
    "count_distinct": "count(DISTINCT {x})",
    "avg": "avg({x})",
    "min": "min({x})",
    "max": "max({x})",
    "median": "median({x})",
    "percentile": "quantile_cont({x}, {p})",
}
_GRAIN_STEP = {"day": "INTERVAL 1 DAY", "week": "INTERVAL 7 DAY", "month": "INTERVAL 1 MONTH",
               "quarter": "INTERVAL 3 MONTH", "year": "INTERVAL 1 YEAR"}  # fmt: skip


DIMENSIONS_HINT = "Call describe_metric to see the dimensions and grains a metric offers."


def _invalid(message: str, hint: str = DIMENSIONS_HINT) -> InvalidArgument:
    return InvalidArgument(message, hint=hint)


@dataclass(frozen=True)
class DimensionRef:
    """A dimension as a query names it: customer__region, order__order_ts__month, metric_time__month."""

    name: str
    entity: str | None  # None for metric_time
    dimension: str | None
    grain: str | None

    @property
    def is_metric_time(self) -> bool:
        return self.entity is None


def parse_dimension(name: str, *, grain_required: bool = True) -> DimensionRef:
    """Raises: InvalidArgument: not entity__dimension[__grain] or metric_time__grain."""
    parts = name.lower().split("__")
    grain = parts[-1] if len(parts) > 1 and parts[-1] in GRAINS else None
    head = parts[:-1] if grain else parts
    if head == [METRIC_TIME]:
        if grain is None and grain_required:
            raise _invalid(f"'{name}' needs a grain, e.g. metric_time__month ({', '.join(GRAINS)}).")
        return DimensionRef(name, None, None, grain)
    if len(head) != 2 or not all(head):
        raise _invalid(
            f"'{name}' is not a dimension name: use entity__dimension (customer__region), "
            "entity__time_dimension__grain, or metric_time__grain."
        )
    return DimensionRef(name, head[0], head[1], grain)


@dataclass(frozen=True)
class DimensionFilter:
    dimension: str
    op: FilterOp
    value: Any = None


@dataclass(frozen=True)
class MetricQuery:
    metrics: tuple[str, ...]
    group_by: tuple[str, ...] = ()
    where: tuple[DimensionFilter, ...] = ()
    order_by: tuple[str, ...] = ()  # a name, or -name for descending
    limit: int | None = None
    versions: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class CompiledQuery:
    sql: str
    metrics: dict[str, int]  # metric -> version used (inputs of ratios and derived metrics included)
    columns: dict[str, set[str]]  # table -> columns the SQL reads
    dimensions: tuple[str, ...]


def _literal(value: Any) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, bool):
        return "TRUE" if value else "FALSE"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return "'" + value.replace("'", "''") + "'"
    raise _invalid(f"Filter value {value!r} must be a string, number, boolean or null.", "Send a plain value.")


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


class _Compiler:
    def __init__(self, catalog: SemanticCatalog, query: MetricQuery) -> None:
        self.catalog = catalog
        self.query = query
        self.ctes: list[tuple[str, str]] = []
        self.used: dict[str, int] = {}
        self.columns: dict[str, set[str]] = {}
        self.dims = [parse_dimension(name) for name in query.group_by]
        self.time = next((d for d in self.dims if d.is_metric_time), None)
        if sum(1 for d in self.dims if d.is_metric_time) > 1:
            raise _invalid("Group by metric_time at one grain only.")
        self.filters = [(parse_dimension(f.dimension, grain_required=False), f) for f in query.where]

    # -- SQL over one model ---------------------------------------------------------------------

    def _on(self, sql: str, alias: str, model: SemanticModel) -> str:
        """`sql` over the model's columns, with every column qualified by `alias` (and recorded)."""
        try:
            tree = sqlglot.parse_one(sql, dialect=DIALECT)
        except sqlglot.errors.ParseError as exc:
            raise _invalid(f"Definition SQL {sql!r} of model {model.name} does not parse: {exc}") from exc
        for column in tree.find_all(exp.Column):
            if not column.table:
                self.columns.setdefault(model.table, set()).add(column.name)
                column.set("table", exp.to_identifier(alias))
        return tree.sql(DIALECT)

    def _time_sql(self, model: SemanticModel, alias: str, metric: Metric) -> str:
        if model.time_dimension is None:
            raise _invalid(
                f"Metric {metric.name} has no time dimension (model {model.name}), so it cannot use metric_time.",
                "Drop metric_time from group_by and where for this metric.",
            )
        dimension = model.dimension(model.time_dimension)
        assert dimension is not None
        return self._on(dimension.sql, alias, model)

    def _dimension_sql(
        self, ref: DimensionRef, model: SemanticModel, metric: Metric, joins: dict[str, str]
    ) -> str:
        """SQL for a dimension on a metric's model (alias m), adding the join it needs to `joins`."""
        if ref.is_metric_time:
            raw = self._time_sql(model, "m", metric)
            return f"CAST(date_trunc('{ref.grain}', {raw}) AS DATE)" if ref.grain else raw
        assert ref.entity is not None and ref.dimension is not None
        target = self.catalog.model_with_primary(ref.entity)
        if target is None:
            raise _invalid(f"'{ref.name}': there is no entity named {ref.entity}.")
        dimension = target.dimension(ref.dimension)
        if dimension is None:
            known = ", ".join(f"{ref.entity}__{d.name}" for d in target.dimensions) or "none"
            raise _invalid(f"'{ref.name}': {ref.entity} has no dimension {ref.dimension} (it has: {known}).")
        if dimension.type == "time" and ref.grain is None and ref.name in self.query.group_by:
            raise _invalid(f"'{ref.name}' is a time dimension: add a grain, e.g. {ref.name}__month.")
        if target.name == model.name:
            alias = "m"
        else:
            key = model.entity(ref.entity)
            if key is None:
                raise _invalid(
                    f"Metric {metric.name} (model {model.name}) cannot be broken down by '{ref.name}': "
                    f"{model.name} holds no {ref.entity} key, and lakegate joins only along one key to the "
                    "model that owns it, so that no measure is counted twice.",
                    f"Use a dimension of {model.name} or of a model it references.",
                )
            alias = f"j_{ref.entity}"
            if alias not in joins:
                here = self._on(key.expr, "m", model)
                there = self._on(target.primary_entity.expr, alias, target)
                joins[alias] = f"LEFT JOIN {target.table} AS {alias} ON {here} = {there}"
        sql = self._on(dimension.sql, alias, target)
        return f"CAST(date_trunc('{ref.grain}', {sql}) AS DATE)" if ref.grain else sql

    def _where(self, model: SemanticModel, metric: Metric, joins: dict[str, str], *, periods: bool) -> list[str]:
        """The query's filters as SQL on the model's rows (metric_time filters only when `periods`)."""
        clauses = []
        for ref, spec in self.filters:
            if ref.is_metric_time and self.time is not None and not periods:
                continue  # applied to the periods of the result instead
            clauses.append(self._condition(self._dimension_sql(ref, model, metric, joins), spec))
        return clauses

    def _condition(self, sql: str, spec: DimensionFilter) -> str:
        if spec.op in ("is null", "is not null"):
            return f"{sql} {spec.op.upper()}"
        if spec.op in ("in", "not in"):
            if not isinstance(spec.value, list) or not spec.value:
                raise _invalid(f"Filter '{spec.op}' on {spec.dimension} needs a non-empty list of values.")
            return f"{sql} {spec.op.upper()} ({', '.join(_literal(v) for v in spec.value)})"
        if isinstance(spec.value, list):
            raise _invalid(f"Filter '{spec.op}' on {spec.dimension} takes one value, not a list.")
        return f"{sql} {spec.op} {_literal(spec.value)}"

    # -- metrics --------------------------------------------------------------------------------

    def metric_cte(self, used: MetricInput, *, offset: int = 0, extra_filter: str | None = None) -> tuple[str, Metric]:
        """Compile one metric (at a version, with an extra filter and offset) to a CTE; returns its name."""
        version = used.version or self.query.versions.get(used.name)
        metric = self.catalog.metric(used.name, version)
        if self.used.get(metric.name, metric.version) != metric.version:
            raise _invalid(f"Metric {metric.name} is used at two versions in one query.", "Ask for one version.")
        self.used[metric.name] = metric.version
        if offset and self.time is None:
            raise _invalid(
                f"Metric {metric.name} compares with an earlier period: group by metric_time__<grain>.",
                "Add metric_time__month (or another grain) to group_by.",
            )
        filters = [f for f in (metric.filter, extra_filter) if f]
        if metric.type == "simple":
            body = self._simple(metric, filters, offset)
        elif metric.type == "cumulative":
            body = self._cumulative(metric, filters, offset)
        else:
            body = self._combined(metric, filters, offset)
        name = f"metric_{len(self.ctes) + 1}_{metric.name}"
        self.ctes.append((name, body))
        return name, metric

    def _dim_columns(self) -> list[str]:
        return [_quote(d.name) for d in self.dims]

    def _shift(self, sql: str, offset: int) -> str:
        if not offset:
            return sql
        assert self.time is not None and self.time.grain is not None
        step = _GRAIN_STEP[self.time.grain]
        return f"CAST({sql} + {offset} * {step} AS DATE)"

    def _simple(self, metric: Metric, filters: list[str], offset: int) -> str:
        assert metric.measure is not None
        found = self.catalog.measure_model(metric.measure)
        assert found is not None
        model, measure = found
        joins: dict[str, str] = {}
        selected = []
        for ref in self.dims:
            sql = self._dimension_sql(ref, model, metric, joins)
            selected.append(f"{self._shift(sql, offset) if ref.is_metric_time else sql} AS {_quote(ref.name)}")
        value = _AGG_SQL[measure.agg].format(x=self._on(measure.expr, "m", model), p=measure.percentile)
        where = [self._on(f, "m", model) for f in filters] + self._where(model, metric, joins, periods=not offset)
        sql = f"SELECT {', '.join([*selected, f'{value} AS value'])} FROM {model.table} AS m"
        sql += "".join(f" {join}" for join in joins.values())
        if where:
            sql += " WHERE " + " AND ".join(f"({clause})" for clause in where)
        if selected:
            sql += " GROUP BY " + ", ".join(str(i) for i in range(1, len(selected) + 1))
        return sql

    def _cumulative(self, metric: Metric, filters: list[str], offset: int) -> str:
        if self.time is None:
            # Without periods, the running total up to now is the plain total.
            return self._simple(metric, filters, offset)
        assert metric.measure is not None and self.time.grain is not None
        found = self.catalog.measure_model(metric.measure)
        assert found is not None
        model, measure = found
        joins: dict[str, str] = {}
        others = [d for d in self.dims if not d.is_metric_time]
        rows = [f"{self._time_sql(model, 'm', metric)} AS lakegate_ts"]
        rows += [f"{self._dimension_sql(d, model, metric, joins)} AS {_quote(d.name)}" for d in others]
        rows.append(f"{self._on(measure.expr, 'm', model)} AS lakegate_value")
        where = [self._on(f, "m", model) for f in filters] + self._where(model, metric, joins, periods=False)
        base = f"SELECT {', '.join(rows)} FROM {model.table} AS m" + "".join(f" {j}" for j in joins.values())
        if where:
            base += " WHERE " + " AND ".join(f"({clause})" for clause in where)
        grain, step = self.time.grain, _GRAIN_STEP[self.time.grain]
        spine = (
            f"SELECT CAST(unnest(generate_series(CAST(date_trunc('{grain}', min(lakegate_ts)) AS TIMESTAMP), "
            f"CAST(date_trunc('{grain}', max(lakegate_ts)) AS TIMESTAMP), {step})) AS DATE) AS period FROM rows"
        )
        window = [f"r.lakegate_ts < s.period + {step}"]
        if metric.window_interval:
            window.append(f"r.lakegate_ts >= s.period + {step} - {metric.window_interval}")
        if metric.grain_to_date:
            window.append(f"r.lakegate_ts >= date_trunc('{metric.grain_to_date}', s.period)")
        value = _AGG_SQL[measure.agg].format(x="r.lakegate_value", p=measure.percentile)
        selected = [
            f"{self._shift('s.period', offset)} AS {_quote(d.name)}" if d.is_metric_time else f"r.{_quote(d.name)}"
            for d in self.dims
        ]
        return (
            f"WITH rows AS ({base}), spine AS ({spine}) "
            f"SELECT {', '.join([*selected, f'{value} AS value'])} FROM spine AS s JOIN rows AS r "
            f"ON {' AND '.join(window)} GROUP BY {', '.join(str(i) for i in range(1, len(selected) + 1))}"
        )

    def _combined(self, metric: Metric, filters: list[str], offset: int) -> str:
        inputs: list[tuple[MetricInput, str, Metric]] = []
        for used in metric.referenced_inputs():
            extra = " AND ".join(f"({f})" for f in (*filters, used.filter) if f) or None
            name, resolved = self.metric_cte(used, offset=offset + (used.offset or 0), extra_filter=extra)
            inputs.append((used, name, resolved))
        # The rows of a combined metric are those of its inputs that are not shifted in time.
        frame = self._frame([name for used, name, _ in inputs if not used.offset] or [inputs[0][1]])
        if metric.type == "ratio":
            # By position: numerator and denominator are often the same metric with other filters.
            numerator, denominator = (self._filled(name, resolved) for _, name, resolved in inputs)
            value = f"CAST({numerator} AS DOUBLE) / NULLIF({denominator}, 0)"
        else:
            value = _derived_expression(metric, {used.ref: self._filled(n, r) for used, n, r in inputs})
        return f"SELECT {', '.join([*[f'f.{c}' for c in self._dim_columns()], f'{value} AS value'])} " + frame + (
            "".join(f" LEFT JOIN {name} ON {self._join_on('f', name)}" for _, name, _ in inputs)
        )

    def _filled(self, cte: str, metric: Metric) -> str:
        agg = None
        if metric.measure and (found := self.catalog.measure_model(metric.measure)):
            agg = found[1].agg
        return f"coalesce({cte}.value, 0)" if agg in _ZERO_FILLED else f"{cte}.value"

    def _join_on(self, left: str, right: str) -> str:
        if not self.dims:
            return "TRUE"
        return " AND ".join(f"{left}.{c} IS NOT DISTINCT FROM {right}.{c}" for c in self._dim_columns())

    def _frame(self, ctes: Sequence[str]) -> str:
        """FROM clause of the result's rows, aliased f: the dimension values the CTEs produce, with
        every period between the first and the last when grouped by metric_time."""
        columns = self._dim_columns()
        if not columns:
            return "FROM (SELECT 1 AS one) AS f"
        keys = " UNION ".join(f"SELECT {', '.join(columns)} FROM {cte}" for cte in ctes)
        if self.time is None:
            return f"FROM ({keys}) AS f"
        assert self.time.grain is not None
        period = _quote(self.time.name)
        others = [c for c in columns if c != period]
        spine = (
            f"SELECT CAST(unnest(generate_series(CAST(min({period}) AS TIMESTAMP), CAST(max({period}) AS TIMESTAMP), "
            f"{_GRAIN_STEP[self.time.grain]})) AS DATE) AS {period} FROM keys"
        )
        if not others:
            return f"FROM (WITH keys AS ({keys}) {spine}) AS f"
        combos = f"SELECT DISTINCT {', '.join(others)} FROM keys"
        ordered = ", ".join(f"p.{c}" if c == period else f"o.{c}" for c in columns)
        return f"FROM (WITH keys AS ({keys}) SELECT {ordered} FROM ({spine}) AS p CROSS JOIN ({combos}) AS o) AS f"

    # -- the whole query ------------------------------------------------------------------------

    def compile(self) -> CompiledQuery:
        if not self.query.metrics:
            raise _invalid("Ask for at least one metric.", "Call list_metrics to see them.")
        if len(set(self.query.metrics)) != len(self.query.metrics):
            raise _invalid("A metric is asked for twice.", "Name each metric once.")
        requested = [(name, *self.metric_cte(MetricInput(name=name))) for name in self.query.metrics]
        columns = self._dim_columns()
        selected = [f"f.{c}" for c in columns]
        selected += [f"{self._filled(cte, metric)} AS {_quote(name)}" for name, cte, metric in requested]
        sql = f"SELECT {', '.join(selected)} {self._frame([cte for _, cte, _ in requested])}"
        sql += "".join(f" LEFT JOIN {cte} ON {self._join_on('f', cte)}" for _, cte, _ in requested)
        period_filters = [
            self._period_condition(ref, spec)
            for ref, spec in self.filters
            if ref.is_metric_time and self.time is not None
        ]
        if period_filters:
            sql += " WHERE " + " AND ".join(period_filters)
        sql += self._order_by(columns, [name for name, _, _ in requested])
        if self.query.limit is not None:
            sql += f" LIMIT {int(self.query.limit)}"
        with_clause = "WITH " + ", ".join(f"{name} AS ({body})" for name, body in self.ctes)
        return CompiledQuery(f"{with_clause} {sql}", dict(self.used), self.columns, tuple(self.query.group_by))

    def _period_condition(self, ref: DimensionRef, spec: DimensionFilter) -> str:
        """A metric_time filter on the result's periods: a period stays when some instant in it passes.

        The filter may be at another grain than the query, or on metric_time itself: the rows are
        filtered already, so a period the filter cuts through keeps its part (metric_time__day >=
        '2025-10-15' by month keeps October), and a filter by year keeps every month of the year.
        """
        assert self.time is not None and self.time.grain is not None
        period = f"f.{_quote(self.time.name)}"
        plain = self._condition(period, spec)  # also checks the value's shape
        if ref.grain == self.time.grain or spec.op in ("is null", "is not null"):
            return plain
        start, end = f"CAST({period} AS TIMESTAMP)", f"({period} + {_GRAIN_STEP[self.time.grain]})"
        values = spec.value if isinstance(spec.value, list) else [spec.value]

        def low(value: Any) -> str:
            return f"CAST({_literal(value)} AS TIMESTAMP)"

        def high(value: Any) -> str:  # the end of the filter's own period (the instant itself without a grain)
            return f"({low(value)} + {_GRAIN_STEP[ref.grain]})" if ref.grain else low(value)

        before = "<" if ref.grain else "<="
        if spec.op in ("=", "in"):
            return "(" + " OR ".join(f"({start} {before} {high(v)} AND {end} > {low(v)})" for v in values) + ")"
        if spec.op in ("!=", "not in"):
            if ref.grain is None:
                return "TRUE"  # no period is a single instant
            return " AND ".join(f"NOT ({start} >= {low(v)} AND {end} <= {high(v)})" for v in values)
        return {
            ">=": f"{end} > {low(spec.value)}",
            ">": f"{end} > {high(spec.value)}",
            "<": f"{start} < {low(spec.value)}",
            "<=": f"{start} {before} {high(spec.value)}",
        }[spec.op]

    def _order_by(self, columns: list[str], metrics: list[str]) -> str:
        known = {*self.query.group_by, *metrics}
        terms = []
        for item in self.query.order_by:
            name = item.removeprefix("-")
            if name not in known:
                raise _invalid(f"order_by '{item}' is neither a requested metric nor a group_by dimension.",
                               "Order by names from metrics or group_by; prefix '-' for descending.")  # fmt: skip
            terms.append(f"{_quote(name)} {'DESC' if item.startswith('-') else 'ASC'} NULLS LAST")
        if not terms:
            terms = [f"{c} ASC NULLS LAST" for c in columns]  # a stable order by default
        return " ORDER BY " + ", ".join(terms) if terms else ""


def _derived_expression(metric: Metric, values: dict[str, str]) -> str:
    """The derived metric's expression with each input name replaced by its value; `/` never divides by 0."""
    assert metric.expr is not None
    tree = sqlglot.parse_one(metric.expr, dialect=DIALECT)
    for column in list(tree.find_all(exp.Column)):
        if column.name not in values:
            raise _invalid(f"Metric {metric.name}: expression names {column.name}, which is not one of its inputs.")
        column.replace(sqlglot.parse_one(values[column.name], dialect=DIALECT))
    for division in list(tree.find_all(exp.Div)):
        division.set("this", exp.Cast(this=division.this, to=exp.DataType.build("DOUBLE")))
        division.set("expression", exp.Nullif(this=division.expression, expression=exp.Literal.number(0)))
    return tree.sql(DIALECT)


def available_dimensions(catalog: SemanticCatalog, metric: Metric) -> tuple[list[str], list[str]]:
    """The dimension names a metric can be grouped and filtered by, and its metric_time grains.

    A ratio or derived metric offers what all of its inputs offer.
    """
    if metric.type in ("ratio", "derived"):
        names: set[str] | None = None
        grains: list[str] = list(GRAINS)
        for used in metric.referenced_inputs():
            dims, own = available_dimensions(catalog, catalog.metric(used.name, used.version))
            names = set(dims) if names is None else names & set(dims)
            grains = [g for g in grains if g in own]
        return sorted(names or ()), grains
    assert metric.measure is not None
    found = catalog.measure_model(metric.measure)
    assert found is not None
    model = found[0]
    names = set()
    for entity in model.entities:
        owner = catalog.model_with_primary(entity.name)
        if owner is None:
            continue
        for dimension in owner.dimensions:
            suffix = "__<grain>" if dimension.type == "time" else ""
            names.add(f"{entity.name}__{dimension.name}{suffix}")
    return sorted(names), list(GRAINS) if model.time_dimension else []


def compile_query(catalog: SemanticCatalog, query: MetricQuery) -> CompiledQuery:
    """Compile a metric query to one SQL statement over the governed tables.

    Raises:
        NotFound: a metric or version does not exist (or is retired).
        InvalidArgument: a dimension, grain, filter or order is not valid for these metrics (the
            message says why and what to ask instead).
    """
    return _Compiler(catalog, query).compile()
