"""Compiling metric queries to SQL over the governed tables.

The SQL this module writes names tables as `namespace.table`, so it runs through the same governed
path as the query tool: the guard rewrites it, masks and row filters apply, the audit record holds it.

How a query compiles:
- Simple metrics become aggregate columns of one scan per model, grouped by the requested
  dimensions, each with its own filter as FILTER (WHERE ...). A scan joins only from its model to a
  model whose *primary* entity it holds (many to one), so a measure is never fanned out; any other
  dimension is refused with the reason.
- An input a period earlier is the same values shifted by that many periods of the query's grain,
  read from a scan that the query's metric_time filters do not cut.
- Every requested metric is evaluated over one frame of result rows (`lakegate_frame`): the groups
  (dimension values) that some metric of the query has rows for, as dbt MetricFlow answers (the
  full outer join of each metric's own groups). A metric without rows in a group is NULL there, not
  0, as in MetricFlow. Only a query with a running total or an input a period earlier fills in every
  period between the first and the last, so that the total carries on and the earlier period is
  there to read (those read 0 for sum and count in an empty period: issue 17 lists what still
  differs from MetricFlow there).
- Cumulative metrics join the frame's periods to the measure's rows in each period's window;
  ratio and derived metrics combine their inputs on the frame.
- Division by zero gives NULL, never an error or infinity.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import sqlglot
from sqlglot import exp

from lakegate.catalog.metric_definitions import (
    GRAINS,
    REFERENCE_PREFIX,
    Measure,
    Metric,
    MetricInput,
    NonAdditive,
    SemanticCatalog,
    SemanticModel,
    split_references,
)
from lakegate.catalog.metric_query import (
    SUB_DAY_GRAINS,
    CompiledQuery,
    DimensionFilter,
    DimensionRef,
    FilterTree,
    MetricQuery,
    parse_dimension,
    sub_day_error,
)
from lakegate.catalog.metric_query import query_error as _invalid
from lakegate.catalog.metric_sql import (
    AGG_SQL,
    DIALECT,
    GRAIN_STEP,
    ZERO_FILLED,
    check_span,
    condition,
    derived_expression,
    period_condition,
    periods_interval,
    quote,
    truncated,
)

__all__ = ["compile_query"]


@dataclass(frozen=True)
class _Shift:
    """How much earlier an input is read: time spans to go back by (DuckDB intervals, summed
    along nested inputs), or the start of the period of a coarser grain (offset_to_grain)."""

    spans: tuple[str, ...] = ()
    to_grain: str | None = None

    def __bool__(self) -> bool:
        return bool(self.spans or self.to_grain)

    @property
    def interval(self) -> str:
        return " + ".join(self.spans) if self.spans else "INTERVAL 0 DAY"

    def then(self, used: MetricInput, grain: str | None) -> _Shift:
        """This shift, and the input's own after it."""
        spans = self.spans
        if used.offset:
            if grain is None:
                return _Shift((*spans, "INTERVAL 0 DAY"), self.to_grain)  # refused later: no metric_time
            spans = (*spans, periods_interval(used.offset, grain))
        if used.offset_interval:
            spans = (*spans, used.offset_interval)
        to_grain = used.offset_to_grain or self.to_grain
        if to_grain and spans:
            raise _invalid(f"Input {used.ref}: offset_to_grain does not combine with other offsets.", "Use one offset.")
        return _Shift(spans, to_grain)


@dataclass(frozen=True)
class _Ref:
    """Where a compiled metric's values are: a CTE with the query's dimensions, and a column."""

    cte: str
    column: str
    zero_filled: bool  # sum and count read 0 where there is no row (running totals and offsets only)
    fill: float | None = None  # the metric's fill_nulls_with: its value where it has no row


@dataclass
class _Scan:
    """One pass over a model's table, grouped by the query's dimensions, with a column per measure."""

    name: str
    model: SemanticModel
    dimensions: list[str]
    joins: dict[str, str]
    where: list[str]
    values: list[str] = field(default_factory=list)
    source: str | None = None  # what the scan reads as m, when not the model's whole table

    def column(self, sql: str) -> str:
        if sql not in self.values:
            self.values.append(sql)
        return f"v{self.values.index(sql)}"

    def sql(self) -> str:
        values = [f"{value} AS v{i}" for i, value in enumerate(self.values)]
        text = f"SELECT {', '.join([*self.dimensions, *values])} FROM {self.source or self.model.table} AS m"
        text += "".join(f" {join}" for join in self.joins.values())
        if self.where:
            text += " WHERE " + " AND ".join(f"({clause})" for clause in self.where)
        if self.dimensions:
            text += " GROUP BY " + ", ".join(str(i) for i in range(1, len(self.dimensions) + 1))
        return text


class _Compiler:
    def __init__(self, catalog: SemanticCatalog, query: MetricQuery) -> None:
        self.catalog = catalog
        self.query = query
        self.scans: dict[str, _Scan] = {}
        self.early: list[tuple[str, str]] = []  # CTEs that read tables
        self.late: list[tuple[str, str]] = []  # CTEs over lakegate_frame (and shifts)
        self.keys: list[str] = []  # SELECTs of the dimension values each metric has rows for
        self.every_period = False  # a running total or an earlier period: the frame holds every period
        self.spine = False  # join_to_timespine: the frame holds every period of the time spine
        self.to_spine_end = False  # an all-time running total goes on to the time spine's end
        self.used: dict[str, int] = {}
        self.columns: dict[str, set[str]] = {}
        self.dims = [parse_dimension(name) for name in query.group_by]
        if len({d.name for d in self.dims}) != len(self.dims):
            raise _invalid("A dimension is in group_by twice.", "Name each dimension once.")
        self.time = next((d for d in self.dims if d.is_metric_time), None)
        if sum(1 for d in self.dims if d.is_metric_time) > 1:
            raise _invalid("Group by metric_time at one grain only.")
        self.filters = [
            (parse_dimension(f.dimension, grain_required=False), f)
            for f in query.where
            if isinstance(f, DimensionFilter)
        ]
        self.trees = [tree for tree in query.where if isinstance(tree, FilterTree)]
        for tree in self.trees:
            if any(parse_dimension(leaf.dimension, grain_required=False).is_metric_time for leaf in tree.leaves()):
                raise _invalid(
                    "A filter on metric_time may not be inside OR or NOT.",
                    "Filter metric_time on its own (joined to the rest by AND), or by a model's time dimension.",
                )

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

    def _filter(self, sql: str, model: SemanticModel, metric: Metric, joins: dict[str, str]) -> str:
        """A metric or input filter as SQL on the model's rows (alias m): its own columns qualified,
        and each {{ Dimension('entity__dimension') }} replaced, in the parsed tree, by that
        dimension's SQL, joined like a group_by dimension (the join goes into `joins`)."""
        try:
            text, names = split_references(sql)
        except ValueError as exc:
            raise _invalid(f"Metric {metric.name}: {exc}") from exc
        resolved = [
            self._dimension_sql(parse_dimension(name, grain_required=False), model, metric, joins) for name in names
        ]
        own = self._on(text, "m", model) if not names else None
        if own is not None:
            return own
        try:
            tree = sqlglot.parse_one(text, dialect=DIALECT)
        except sqlglot.errors.ParseError as exc:
            raise _invalid(f"Filter {sql!r} of metric {metric.name} does not parse: {exc}") from exc

        def substitute(node: exp.Expr) -> exp.Expr:
            if not isinstance(node, exp.Column) or node.table:
                return node
            if node.name.startswith(REFERENCE_PREFIX):
                return sqlglot.parse_one(resolved[int(node.name.removeprefix(REFERENCE_PREFIX))], dialect=DIALECT)
            self.columns.setdefault(model.table, set()).add(node.name)
            return exp.column(node.name, table="m")

        return tree.transform(substitute).sql(DIALECT)

    def _time_sql(self, model: SemanticModel, alias: str, metric: Metric) -> str:
        if model.time_dimension is None:
            raise _invalid(
                f"Metric {metric.name} has no time dimension (model {model.name}), so it cannot use metric_time.",
                "Drop metric_time from group_by and where for this metric.",
            )
        dimension = model.dimension(model.time_dimension)
        assert dimension is not None
        return self._on(dimension.sql, alias, model)

    def _dimension_sql(self, ref: DimensionRef, model: SemanticModel, metric: Metric, joins: dict[str, str]) -> str:
        """SQL for a dimension on a metric's model (alias m), adding the join it needs to `joins`."""
        if ref.is_metric_time:
            raw = self._time_sql(model, "m", metric)
            return truncated(raw, ref.grain) if ref.grain else raw
        assert ref.entity is not None and ref.owner is not None
        if ref.dimension is None:  # an entity: the key the metric's own model holds
            key = model.entity(ref.entity)
            if key is None and not any(m.entity(ref.entity) for m in self.catalog.semantic_models):
                raise _invalid(
                    f"'{ref.name}' is not a dimension name, nor an entity: use entity__dimension (e.g. "
                    f"customer__{ref.name}), entity__time_dimension__grain, metric_time__grain or an entity's name."
                )
            if key is None:
                held = ", ".join(entity.name for entity in model.entities)
                raise _invalid(
                    f"Metric {metric.name} cannot be broken down by entity '{ref.name}': its model {model.name} holds "
                    f"no {ref.entity} key (it holds: {held}).",
                    "Group by an entity of the metric's model, or by entity__entity through a join.",
                )
            return self._on(key.expr, "m", model)
        alias, here = "m", model
        for hop, entity in enumerate(ref.path or (ref.entity,)):
            target = self.catalog.model_with_primary(entity)
            if target is None and ref.dimension in SUB_DAY_GRAINS and here.dimension(entity) is not None:
                raise sub_day_error(ref.name)  # order__order_ts__hour
            if target is None:
                raise _invalid(f"'{ref.name}': there is no entity named {entity}.")
            if target.name == here.name:
                continue  # the model's own primary entity: no join
            key = here.entity(entity)
            if key is None:
                raise _invalid(
                    f"Metric {metric.name} cannot be broken down by '{ref.name}': {here.name} holds no {entity} key, "
                    f"and lakegate joins only along keys to the model that owns them, so that no measure is counted "
                    "twice.",
                    f"Use a dimension of {model.name} or of a model it references.",
                )
            joined = "j_" + "__".join((ref.path or (ref.entity,))[: hop + 1])
            if joined not in joins:
                there = self._on(target.primary_entity.expr, joined, target)
                joins[joined] = f"LEFT JOIN {target.table} AS {joined} ON {self._on(key.expr, alias, here)} = {there}"
            alias, here = joined, target
        dimension = here.dimension(ref.dimension)
        held_key = here.entity(ref.dimension)
        if dimension is None and held_key is not None:  # customer__country: the customer's country key
            return self._on(held_key.expr, alias, here)
        if dimension is None:
            known = ", ".join(f"{ref.owner}__{d.name}" for d in here.dimensions) or "none"
            raise _invalid(f"'{ref.name}': {ref.owner} has no dimension {ref.dimension} (it has: {known}).")
        if dimension.type == "time" and ref.grain is None and ref in self.dims:
            raise _invalid(f"'{ref.name}' is a time dimension: add a grain, e.g. {ref.name}__month.")
        if dimension.type != "time" and ref.grain is not None:
            raise _invalid(f"'{ref.name}': {ref.dimension} is not a time dimension, so it takes no grain.")
        sql = self._on(dimension.sql, alias, here)
        return truncated(sql, ref.grain) if ref.grain else sql

    def _where(self, model: SemanticModel, metric: Metric, joins: dict[str, str], *, periods: bool) -> list[str]:
        """The query's filters as SQL on the model's rows (metric_time filters only when `periods`)."""
        clauses = []
        for ref, spec in self.filters:
            if ref.is_metric_time and self.time is not None and not periods:
                continue  # applied to the periods of the result instead
            clauses.append(condition(self._dimension_sql(ref, model, metric, joins), spec))
        return clauses + [self._tree(tree, model, metric, joins) for tree in self.trees]

    def _tree(self, tree: FilterTree, model: SemanticModel, metric: Metric, joins: dict[str, str]) -> str:
        """Filters combined by AND, OR or NOT, as SQL on the model's rows."""
        parts = []
        for item in tree.items:
            if isinstance(item, FilterTree):
                parts.append(f"({self._tree(item, model, metric, joins)})")
            else:
                ref = parse_dimension(item.dimension, grain_required=False)
                parts.append(f"({condition(self._dimension_sql(ref, model, metric, joins), item)})")
        if tree.op == "not":
            return f"NOT {parts[0]}"
        return f" {tree.op.upper()} ".join(parts)

    # -- metrics --------------------------------------------------------------------------------
    #
    # Every metric resolves to a `_Ref`: a CTE and the column holding its value, by the query's
    # dimensions. Simple metrics of one model share one scan of its table (one aggregate column each,
    # with its filter as FILTER (WHERE ...)), so asking for revenue, orders and their ratio reads
    # sales.orders once. An input a period earlier is a shift of the same CTE, not another scan.
    # Cumulative metrics, ratios and derived metrics are evaluated over one frame of result rows
    # (`lakegate_frame`: the dimension values of every metric, and every period between the first and
    # the last), so that a running total carries on into periods where only another metric has rows.

    def value(self, used: MetricInput, *, offset: _Shift = _Shift(), extra_filter: str | None = None) -> _Ref:
        """Compile one metric (at a version, with an extra filter, read `offset` earlier)."""
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
        if metric.type == "cumulative" and self.time is None and (metric.window or metric.grain_to_date):
            raise _invalid(
                f"Metric {metric.name} is a running total over a window or to date: group by metric_time__<grain>.",
                "Add metric_time__month (or another grain) to group_by.",
            )
        if metric.type == "simple" or (metric.type == "cumulative" and self.time is None):
            # Without periods, the running total over all time up to now is the plain total.
            if metric.join_to_timespine and self.time is not None:
                if self.catalog.time_spine is None:
                    raise _invalid(
                        f"Metric {metric.name} joins to the time spine, and metrics.yaml defines none.",
                        "Ask the metrics' owner to add time_spine (start, end) to catalog/metrics.yaml.",
                    )
                self.spine = True
            if not offset:
                found = self._simple(metric, filters, keyed=True, periods=True)
            else:  # earlier: the whole earlier period, whatever the query's period filters cut
                found = self._shifted(self._simple(metric, filters, keyed=False, periods=False), offset)
            return replace(found, fill=metric.fill_nulls_with)
        if metric.type == "cumulative":
            self.every_period = True
            if not (metric.window or metric.grain_to_date) and self.catalog.time_spine is not None:
                self.to_spine_end = True  # as MetricFlow: an all-time total goes on to the spine's end
            return self._cumulative(metric, filters, offset)
        if metric.type == "conversion":
            if offset:
                raise _invalid(f"Metric {metric.name} is a conversion metric: it cannot be read a period earlier.")
            return self._conversion(metric, filters)
        return self._combined(metric, filters, offset)

    def _measure(self, metric: Metric) -> tuple[SemanticModel, Measure]:
        assert metric.measure is not None
        found = self.catalog.measure_model(metric.measure)
        assert found is not None
        return found

    def _simple(self, metric: Metric, filters: list[str], *, keyed: bool, periods: bool) -> _Ref:
        model, measure = self._measure(metric)
        scan = self._scan(model, metric, periods=periods, edge=measure)
        condition = " AND ".join(f"({self._filter(f, model, metric, scan.joins)})" for f in filters)
        value = AGG_SQL[measure.agg].format(x=self._on(measure.expr, "m", model), p=measure.percentile)
        keys = f"SELECT {', '.join(self._dim_columns()) or '1 AS one'} FROM {scan.name}"
        if condition:
            # As in MetricFlow, a metric's filter decides which groups it has at all: a group none
            # of whose rows pass it is not the metric's (NULL, and no row unless another metric has
            # one), even for a count, which FILTER alone would make 0 (MetricFlow filters the rows
            # before it groups them).
            present = scan.column(f"count(*) FILTER (WHERE {condition})")
            keys += f" WHERE {present} > 0"
            value = f"{value} FILTER (WHERE {condition})"
            if measure.agg in ZERO_FILLED and self.dims:  # without groups, an empty count is 0, as in SQL
                value = f"CASE WHEN count(*) FILTER (WHERE {condition}) > 0 THEN {value} END"
        column = scan.column(value)
        if keyed and keys not in self.keys:
            self.keys.append(keys)
        return _Ref(scan.name, column, False)

    def _scan(self, model: SemanticModel, metric: Metric, *, periods: bool, edge: Measure | None = None) -> _Scan:
        """The one pass over a model's table that computes all of its measures the query needs;
        with `periods`, the query's metric_time filters apply to its rows too. A measure that does
        not add up over time (`edge`, with a non_additive_dimension) gets a pass of its own over
        the rows of its last (or first) day in each period."""
        if not any(ref.is_metric_time for ref, _ in self.filters):
            periods = True  # no period filter: one scan serves shifted and unshifted inputs alike
        key = f"scan_{model.name}" if periods else f"scan_{model.name}_all_periods"
        source = None
        if edge is not None and edge.non_additive_dimension is not None:
            key += f"_edge_{edge.name}"
            source = self._edge_rows(model, metric, edge.non_additive_dimension)
        if key in self.scans:
            return self.scans[key]
        joins: dict[str, str] = {}
        selected = [f"{self._dimension_sql(ref, model, metric, joins)} AS {quote(ref.name)}" for ref in self.dims]
        where = self._where(model, metric, joins, periods=periods)
        scan = _Scan(key, model, selected, joins, where, source=source)
        self.scans[key] = scan
        return scan

    def _edge_rows(self, model: SemanticModel, metric: Metric, edge: NonAdditive) -> str:
        """The model's rows of the last (or first) day of `edge`'s time dimension in each period of
        the query (and each of its window_groupings), as dbt MetricFlow keeps them for a
        non-additive measure: a subquery to read as the model's table."""
        dimension = model.dimension(edge.name)
        if dimension is None or dimension.type != "time":
            raise _invalid(f"Metric {metric.name}: {edge.name} is not a time dimension of model {model.name}.")
        day = f"CAST(date_trunc('day', CAST({self._on(dimension.sql, 'e', model)} AS TIMESTAMP)) AS DATE)"
        partition = []
        if self.time is not None and self.time.grain is not None:
            partition.append(truncated(self._time_sql(model, "e", metric), self.time.grain))
        for name in edge.window_groupings:
            entity = model.entity(name)
            if entity is None:
                raise _invalid(f"Metric {metric.name}: model {model.name} has no entity {name} to group the window by.")
            partition.append(self._on(entity.expr, "e", model))
        over = f"PARTITION BY {', '.join(partition)}" if partition else ""
        return f"(SELECT * FROM {model.table} AS e QUALIFY {day} = {edge.window_choice}({day}) OVER ({over}))"

    def _shifted(self, ref: _Ref, shift: _Shift) -> _Ref:
        """The same values read later, as dbt MetricFlow's offsets do: each period moved on by the
        spans (what a period reads as "a month earlier"), or each period's value at the start of the
        period of `to_grain` (every period in it reads that value). The moved periods are rows of
        the answer too, as MetricFlow's full outer join makes them."""
        assert self.time is not None and self.time.grain is not None
        grain, period = self.time.grain, quote(self.time.name)
        others = [c for c in self._dim_columns() if c != period]
        if shift.to_grain == grain:
            body = f"SELECT {', '.join([period, *others, f'{ref.column} AS value'])} FROM {ref.cte}"
        elif shift.to_grain:
            if GRAINS.index(shift.to_grain) < GRAINS.index(grain) or grain == "week":
                raise _invalid(
                    f"offset_to_grain {shift.to_grain} reads the start of a {shift.to_grain}: group by a finer grain "
                    f"than {shift.to_grain} (day, or month for quarter and year), not by {grain}."
                )
            first = f"CAST({period} AS TIMESTAMP)"
            last = f"{first} + {GRAIN_STEP[shift.to_grain]} - {GRAIN_STEP[grain]}"
            spread = f"CAST(unnest(generate_series({first}, {last}, {GRAIN_STEP[grain]})) AS DATE) AS {period}"
            body = (
                f"SELECT {', '.join([spread, *others, f'{ref.column} AS value'])} FROM {ref.cte} "
                f"WHERE {period} = CAST(date_trunc('{shift.to_grain}', {period}) AS DATE)"
            )
        else:
            for span in shift.spans:
                check_span(span, grain)
            moved = f"CAST({period} + {shift.interval} AS DATE) AS {period}"
            # A day reads the day the span before it (MetricFlow): April 30 reads March 30, and
            # March 31, which no day reads a month later, is read by none (not twice April 30).
            exact = f"CAST(CAST({period} + {shift.interval} AS DATE) - ({shift.interval}) AS DATE) = {period}"
            body = f"SELECT {', '.join([moved, *others, f'{ref.column} AS value'])} FROM {ref.cte} WHERE {exact}"
        # Early: it reads only a scan, and the frame's rows include its periods.
        name = self._early(f"shift_{len(self.early)}_{ref.cte}_{ref.column}", body)
        keys = f"SELECT {', '.join(self._dim_columns())} FROM {name}"
        if keys not in self.keys:
            self.keys.append(keys)
        return _Ref(name, "value", ref.zero_filled)

    def _cumulative(self, metric: Metric, filters: list[str], offset: _Shift) -> _Ref:
        assert self.time is not None and self.time.grain is not None
        model, measure = self._measure(metric)
        others = [d for d in self.dims if not d.is_metric_time]
        body = self._row_source(model, metric, filters, others, {"lakegate_value": measure.expr}, periods=False)
        source = self._early(f"rows_{metric.name}_{len(self.early)}", body)
        grain, step = self.time.grain, GRAIN_STEP[self.time.grain]
        period = quote(self.time.name)
        if offset.to_grain is None:
            # The periods its rows fall in (moved on by the offset, for an input read earlier).
            moved = f"lakegate_ts + ({offset.interval})"
            keys = [f"CAST(date_trunc('{grain}', {moved}) AS DATE) AS {period}", *(quote(d.name) for d in others)]
            self.keys.append(f"SELECT DISTINCT {', '.join(keys)} FROM {source}")
            # As in MetricFlow, a running total goes on after the last row while its window still
            # holds rows: to the window's end, or to the end of the grain-to-date period.
            if metric.window_interval or metric.grain_to_date:
                last = self._last_day(metric, f"({moved})")
                keys[0] = f"CAST(date_trunc('{grain}', {last}) AS DATE) AS {period}"
                self.keys.append(f"SELECT DISTINCT {', '.join(keys)} FROM {source}")
        value = AGG_SQL[measure.agg].format(x="r.lakegate_value", p=measure.percentile)
        columns = [f"f.{c}" for c in self._dim_columns()]
        if offset.to_grain:
            raise _invalid(f"Metric {metric.name}: a running total cannot be read at the start of a period.")
        start = f"(f.{period} - ({offset.interval}))"  # the (shifted) period
        if (
            (metric.period_agg == "last" or grain == "day")
            and not (metric.window_interval or metric.grain_to_date or offset)
            and measure.agg in ("sum", "count")
        ):
            # An all-time total of a measure that adds up: each period's own total, summed in period
            # order (one pass; joining each period to every earlier row grows with their product).
            keys = [f"CAST(date_trunc('{grain}', lakegate_ts) AS DATE) AS {period}", *(quote(d.name) for d in others)]
            own = f"SELECT {', '.join(keys)}, {measure.agg}(lakegate_value) AS v FROM {source} GROUP BY ALL"
            partition = f"PARTITION BY {', '.join(c for c in columns if c != f'f.{period}')} " if others else ""
            running = f"coalesce(sum(p.v) OVER ({partition}ORDER BY f.{period} ROWS UNBOUNDED PRECEDING), 0)"
            value = f"CAST({running} AS BIGINT)" if measure.agg == "count" else running
            body = (
                f"SELECT {', '.join([*columns, f'{value} AS value'])} FROM lakegate_frame AS f LEFT JOIN ({own}) AS p "
            )
            body += f"ON {self._join_on('f', 'p')}"
        elif metric.period_agg == "last" or grain == "day":
            # The value on the period's last day that the total has (MetricFlow's period_agg last):
            # the period's end, or sooner where a windowed or to-date total stops; after that, none.
            # An all-time total goes on to the end of the answer (MetricFlow: of its time spine).
            end = f"{start} + {step}"
            if metric.window_interval or metric.grain_to_date:
                stop = f"(SELECT max({self._last_day(metric, 'lakegate_ts')}) FROM {source}) + INTERVAL 1 DAY"
                end = f"least({end}, {stop})"
            if measure.agg in ZERO_FILLED:
                value = f"coalesce({value}, 0)"  # a window without rows, between rows, counts 0
            if metric.window_interval or metric.grain_to_date:
                value = f"CASE WHEN {start} < {stop} THEN {value} END"
            on = self._window(metric, f"({end})", others, "f")
            body = (
                f"SELECT {', '.join([*columns, f'{value} AS value'])} FROM lakegate_frame AS f LEFT JOIN {source} AS r "
                f"ON {on} GROUP BY {', '.join(columns)}"
            )
        else:
            body = self._by_day(metric, source, value, columns, start, step, others)
        name = self._late(f"cumulative_{metric.name}_{len(self.late)}", body)
        return _Ref(name, "value", False)

    def _row_source(
        self,
        model: SemanticModel,
        metric: Metric,
        filters: list[str],
        dims: list[DimensionRef],
        extra: dict[str, str],
        *,
        periods: bool,
    ) -> str:
        """The model's rows one by one (not grouped): `dims`, the time as lakegate_ts and each of
        `extra` (name -> SQL over the model's columns), with the metric's and the query's filters."""
        joins: dict[str, str] = {}
        columns = [f"{self._dimension_sql(d, model, metric, joins)} AS {quote(d.name)}" for d in dims]
        columns.append(f"CAST({self._time_sql(model, 'm', metric)} AS TIMESTAMP) AS lakegate_ts")
        columns += [f"{self._on(sql, 'm', model)} AS {name}" for name, sql in extra.items()]
        where = [self._filter(f, model, metric, joins) for f in filters]
        where += self._where(model, metric, joins, periods=periods)
        body = f"SELECT {', '.join(columns)} FROM {model.table} AS m" + "".join(f" {j}" for j in joins.values())
        if where:
            body += " WHERE " + " AND ".join(f"({clause})" for clause in where)
        return body

    def _last_day(self, metric: Metric, ts: str) -> str:
        """The last day on which a running total still counts a row at `ts`."""
        if metric.window_interval:
            # The last day whose window (see _window) starts on or before the row's day: the day
            # before the row's day + window, or that day itself where the month had fewer days
            # (January 31 + 3 months is April 30, whose window starts January 31).
            day, span = f"CAST({ts} AS DATE)", metric.window_interval
            later = f"{day} + {span}"
            return f"CAST(CASE WHEN {later} - {span} < {day} THEN {later} ELSE {later} - INTERVAL 1 DAY END AS DATE)"
        if metric.grain_to_date:
            to_date = GRAIN_STEP[metric.grain_to_date]
            return f"CAST(date_trunc('{metric.grain_to_date}', {ts}) + {to_date} - INTERVAL 1 DAY AS DATE)"
        return f"CAST({ts} AS DATE)"

    def _window(self, metric: Metric, end: str, others: list[DimensionRef], frame: str) -> str:
        """The join condition of a running total's rows (r) to a period or day of `frame` that ends
        at `end` (exclusive)."""
        window = [f"r.lakegate_ts < {end}"]
        if metric.window_interval:
            # The rows of the days after (last day - window), as MetricFlow counts a window back from a
            # day: for April 30 and 3 months, January 31 on (not February 1: months are not days).
            window.append(
                f"r.lakegate_ts >= CAST({end} AS DATE) - INTERVAL 1 DAY - {metric.window_interval} + INTERVAL 1 DAY"
            )
        if metric.grain_to_date:
            window.append(
                f"r.lakegate_ts >= date_trunc('{metric.grain_to_date}', CAST({end} AS TIMESTAMP) - INTERVAL 1 DAY)"
            )
        window += [f"{frame}.{quote(d.name)} IS NOT DISTINCT FROM r.{quote(d.name)}" for d in others]
        return " AND ".join(window)

    def _by_day(
        self,
        metric: Metric,
        source: str,
        value: str,
        columns: list[str],
        start: str,
        step: str,
        others: list[DimensionRef],
    ) -> str:
        """A running total by a grain coarser than a day, as MetricFlow computes it: its value on
        each day the total has (from the first row's day to its last day), then the period's
        first value or the average over its days (`period_agg`)."""
        first = f"(SELECT CAST(min(lakegate_ts) AS DATE) FROM {source})"
        last = f"(SELECT max({self._last_day(metric, 'lakegate_ts')}) FROM {source})"
        days = (
            f"CAST(unnest(generate_series(CAST(greatest(CAST({start} AS DATE), {first}) AS TIMESTAMP), "
            f"CAST(least(CAST({start} + {step} AS DATE) - 1, {last}) AS TIMESTAMP), INTERVAL 1 DAY)) AS DATE)"
        )
        keys = [c.removeprefix("f.") for c in columns]
        day_rows = f"SELECT {', '.join([*columns, f'{days} AS lakegate_day'])} FROM lakegate_frame AS f"
        on = self._window(metric, "(d.lakegate_day + INTERVAL 1 DAY)", others, "d")
        daily = (
            f"SELECT {', '.join(f'd.{k}' for k in keys)}, d.lakegate_day, {value} AS v FROM ({day_rows}) AS d "
            f"LEFT JOIN {source} AS r ON {on} GROUP BY ALL"
        )
        pick = "arg_min(v, lakegate_day)" if metric.period_agg == "first" else "avg(v)"
        return f"SELECT {', '.join(keys)}, {pick} AS value FROM ({daily}) AS x GROUP BY ALL"

    def _conversion(self, metric: Metric, filters: list[str]) -> _Ref:
        """A conversion metric, as dbt MetricFlow computes it: each conversion event is matched to
        the latest base event of the same entity at most `window` before it (the same instant
        included), and counts for that base event's groups; the rate divides the conversions'
        measure by the base events' measure, by the base events' groups."""
        assert metric.conversion_measure is not None and metric.entity is not None and metric.window_interval
        base_model, base_measure = self._measure(metric)
        found = self.catalog.measure_model(metric.conversion_measure)
        assert found is not None
        conversion_model, conversion_measure = found
        base_key, conversion_key = base_model.entity(metric.entity), conversion_model.entity(metric.entity)
        if base_key is None or conversion_key is None or conversion_model.time_dimension is None:
            raise _invalid(
                f"Metric {metric.name}: models {base_model.name} and {conversion_model.name} must both hold the "
                f"entity {metric.entity}, and {conversion_model.name} a time dimension."
            )
        extra = {"lakegate_entity": base_key.expr, "lakegate_value": base_measure.expr}
        body = self._row_source(base_model, metric, filters, self.dims, extra, periods=True)
        base = self._early(f"conversion_base_{metric.name}", body)
        conversion_time = self._time_sql(conversion_model, "m", metric)
        events = (
            f"SELECT CAST({conversion_time} AS TIMESTAMP) AS lakegate_ts, "
            f"{self._on(conversion_key.expr, 'm', conversion_model)} AS lakegate_entity, "
            f"{self._on(conversion_measure.expr, 'm', conversion_model)} AS lakegate_value, "
            f"row_number() OVER () AS lakegate_event FROM {conversion_model.table} AS m"
        )
        conversions = self._early(f"conversion_events_{metric.name}", events)
        columns = self._dim_columns()
        matched = (
            f"SELECT {', '.join([*(f'b.{c}' for c in columns), 'c.lakegate_value'])} FROM {base} AS b "
            f"JOIN {conversions} AS c ON c.lakegate_entity = b.lakegate_entity AND b.lakegate_ts <= c.lakegate_ts "
            f"AND c.lakegate_ts <= b.lakegate_ts + {metric.window_interval} "
            "QUALIFY row_number() OVER (PARTITION BY c.lakegate_event ORDER BY b.lakegate_ts DESC) = 1"
        )

        def totals(name: str, source: str, measure: Measure) -> str:
            value = AGG_SQL[measure.agg].format(x="lakegate_value", p=measure.percentile)
            return self._early(name, f"SELECT {', '.join([*columns, f'{value} AS value'])} FROM {source} GROUP BY ALL")

        converted = totals(f"conversion_totals_{metric.name}", f"({matched})", conversion_measure)
        based = totals(f"conversion_base_totals_{metric.name}", base, base_measure)
        keys = f"SELECT {', '.join(columns) or '1 AS one'} FROM {based}"
        if keys not in self.keys:
            self.keys.append(keys)
        # A base group without any conversion converted nothing: 0, not NULL.
        value = "coalesce(c.value, 0)"
        if metric.calculation == "conversion_rate":
            value = f"CAST({value} AS DOUBLE) / NULLIF(b.value, 0)"
        frame = [f"f.{c}" for c in columns]
        body = (
            f"SELECT {', '.join([*frame, f'{value} AS value'])} FROM lakegate_frame AS f "
            f"LEFT JOIN {converted} AS c ON {self._join_on('f', 'c')} "
            f"LEFT JOIN {based} AS b ON {self._join_on('f', 'b')}"
        )
        return _Ref(self._late(f"metric_{metric.name}_{len(self.late)}", body), "value", False)

    def _combined(self, metric: Metric, filters: list[str], offset: _Shift) -> _Ref:
        refs: list[tuple[MetricInput, _Ref]] = []
        grain = self.time.grain if self.time is not None else None
        for used in metric.referenced_inputs():
            extra = " AND ".join(f"({f})" for f in (*filters, used.filter) if f) or None
            refs.append((used, self.value(used, offset=offset.then(used, grain), extra_filter=extra)))
        joins = "".join(self._left_join(ref, f"i{i}") for i, (_, ref) in enumerate(refs))
        values = [self._filled(f"i{i}", ref) for i, (_, ref) in enumerate(refs)]
        if metric.type == "ratio":
            # By position: numerator and denominator are often the same metric with other filters.
            value = f"CAST({values[0]} AS DOUBLE) / NULLIF({values[1]}, 0)"
        else:
            value = derived_expression(metric, {used.ref: v for (used, _), v in zip(refs, values, strict=True)})
        columns = [f"f.{c}" for c in self._dim_columns()]
        body = f"SELECT {', '.join([*columns, f'{value} AS value'])} FROM lakegate_frame AS f{joins}"
        return _Ref(self._late(f"metric_{metric.name}_{len(self.late)}", body), "value", False)

    def _early(self, name: str, body: str) -> str:
        for existing, text in self.early:
            if text == body:
                return existing
        self.early.append((name, body))
        return name

    def _late(self, name: str, body: str) -> str:
        for existing, text in self.late:
            if text == body:
                return existing  # the same input twice (revenue asked for and inside a ratio) is one CTE
        self.late.append((name, body))
        return name

    def _dim_columns(self) -> list[str]:
        return [quote(d.name) for d in self.dims]

    def _filled(self, alias: str, ref: _Ref) -> str:
        column = f"{alias}.{ref.column}"
        if ref.fill is not None:  # a whole number stays an integer: a count filled with 0 stays a count
            fill = int(ref.fill) if float(ref.fill).is_integer() else ref.fill
            return f"coalesce({column}, {fill!r})"
        return f"coalesce({column}, 0)" if ref.zero_filled and self.every_period else column

    def _left_join(self, ref: _Ref, alias: str) -> str:
        return f" LEFT JOIN {ref.cte} AS {alias} ON {self._join_on('f', alias)}"

    def _join_on(self, left: str, right: str) -> str:
        if not self.dims:
            return "TRUE"
        return " AND ".join(f"{left}.{c} IS NOT DISTINCT FROM {right}.{c}" for c in self._dim_columns())

    def _frame(self) -> str:
        """The result's rows: the groups the metrics have rows for; with a running total or an
        earlier period grouped by metric_time, every period between the first and the last too."""
        columns = self._dim_columns()
        if not columns:
            return "SELECT 1 AS one"
        keys = " UNION ".join(self.keys)
        if self.time is None or not (self.every_period or self.spine):
            return keys
        assert self.time.grain is not None
        grain, period = self.time.grain, quote(self.time.name)
        others = [c for c in columns if c != period]
        first, last = f"min({period})", f"max({period})"
        time_spine = self.catalog.time_spine
        if time_spine is not None and (self.spine or self.to_spine_end):
            # As MetricFlow: every period of the time spine (the query's period filters then cut
            # it), or, for an all-time running total, on to the spine's end.
            end = f"CAST(date_trunc('{grain}', DATE '{time_spine.end.isoformat()}') AS DATE)"
            last = f"greatest({last}, {end})" if not self.spine else end
            if self.spine:
                first = f"CAST(date_trunc('{grain}', DATE '{time_spine.start.isoformat()}') AS DATE)"
        spine = (
            f"SELECT CAST(unnest(generate_series(CAST({first} AS TIMESTAMP), CAST({last} AS TIMESTAMP), "
            f"{GRAIN_STEP[grain]})) AS DATE) AS {period}"
        )
        if not self.spine:  # bounds from the rows' own periods (aggregates: one series)
            spine += " FROM lakegate_keys"
        if not others:
            return f"WITH lakegate_keys AS ({keys}) {spine}"
        combos = f"SELECT DISTINCT {', '.join(others)} FROM lakegate_keys"
        ordered = ", ".join(f"p.{c}" if c == period else f"o.{c}" for c in columns)
        return f"WITH lakegate_keys AS ({keys}) SELECT {ordered} FROM ({spine}) AS p CROSS JOIN ({combos}) AS o"

    # -- the whole query ------------------------------------------------------------------------

    def compile(self) -> CompiledQuery:
        if not self.query.metrics:
            raise _invalid("Ask for at least one metric, or a saved_query.", "Call list_metrics to see them.")
        if len(set(self.query.metrics)) != len(self.query.metrics):
            raise _invalid("A metric is asked for twice.", "Name each metric once.")
        requested = [(name, self.value(MetricInput(name=name))) for name in self.query.metrics]
        columns = self._dim_columns()
        selected = [f"f.{c}" for c in columns]
        selected += [f"{self._filled(f'r{i}', ref)} AS {quote(name)}" for i, (name, ref) in enumerate(requested)]
        sql = f"SELECT {', '.join(selected)} FROM lakegate_frame AS f"
        sql += "".join(self._left_join(ref, f"r{i}") for i, (_, ref) in enumerate(requested))
        period_filters = []
        if self.time is not None:
            assert self.time.grain is not None  # a metric_time in group_by has one (parse_dimension)
            period = f"f.{quote(self.time.name)}"
            period_filters = [
                period_condition(period, self.time.grain, ref.grain, spec)
                for ref, spec in self.filters
                if ref.is_metric_time
            ]
        if period_filters:
            sql += " WHERE " + " AND ".join(period_filters)
        sql += self._order_by(columns, [name for name, _ in requested])
        sql += f" LIMIT {int(self.query.limit)}" if self.query.limit is not None else ""
        ctes = [(scan.name, scan.sql()) for scan in self.scans.values()]
        ctes += [*self.early, ("lakegate_frame", self._frame()), *self.late]
        with_clause = "WITH " + ", ".join(f"{name} AS ({body})" for name, body in ctes)
        return CompiledQuery(f"{with_clause} {sql}", dict(self.used), self.columns)

    def _order_by(self, columns: list[str], metrics: list[str]) -> str:
        known = {*(d.name for d in self.dims), *metrics}
        terms = []
        for item in self.query.order_by:
            name = item.removeprefix("-")
            name = name.lower() if name.lower() in known else name
            if name not in known:
                raise _invalid(f"order_by '{item}' is neither a requested metric nor a group_by dimension.",
                               "Order by names from metrics or group_by; prefix '-' for descending.")  # fmt: skip
            terms.append(f"{quote(name)} {'DESC' if item.startswith('-') else 'ASC'} NULLS LAST")
        # Then every dimension, so that ties come in a stable order and pages never overlap.
        terms += [f"{c} ASC NULLS LAST" for c in columns if f"{c} ASC NULLS LAST" not in terms]
        return " ORDER BY " + ", ".join(terms) if terms else ""


def compile_query(catalog: SemanticCatalog, query: MetricQuery) -> CompiledQuery:
    """Compile a metric query to one SQL statement over the governed tables.

    Raises:
        NotFound: a metric or version does not exist (or is retired).
        InvalidArgument: a dimension, grain, filter or order is not valid for these metrics (the
            message says why and what to ask instead).
    """
    return _Compiler(catalog, query).compile()
