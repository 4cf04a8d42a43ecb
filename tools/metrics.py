"""Metric tools: find a governed business number, read its definition, and query it."""

from __future__ import annotations

import re
from dataclasses import replace
from typing import Annotated, Any, Literal

from pydantic import Field

from lakegate.catalog.metric_definitions import Metric, MetricInput, SemanticCatalog
from lakegate.catalog.metric_filters import parse_filter, saved_metric_query
from lakegate.catalog.metric_query import DimensionFilter, MetricQuery, available_dimensions, describing_query
from lakegate.errors import InvalidArgument
from lakegate.tools.base import Page, PageArgs, ToolArgs, ToolResult, ToolSpec, paginate
from lakegate.tools.names import ToolName
from lakegate.tools.query import GovernedReadArgs, QueryResult, render_query, run_governed
from lakegate.tools.scope import ToolScope

__all__ = ["METRIC_TOOLS"]

_WORD = re.compile(r"[a-z0-9]+")


# --- list_metrics -------------------------------------------------------------------------------


class ListMetricsArgs(PageArgs):
    search: str | None = Field(
        default=None, max_length=200, description="Words to match in names, descriptions and synonyms, e.g. 'aov'."
    )


class MetricSummary(ToolResult):
    name: str
    version: int = Field(description="Current version (the one used unless a query names another).")
    type: Literal["simple", "ratio", "derived", "cumulative", "conversion"]
    description: str
    synonyms: list[str]
    owner: str


class MetricList(Page):
    metrics: list[MetricSummary]
    saved_queries: list[str] = Field(
        default_factory=list, description="'name: metrics by dimensions', for query_metrics saved_query; page 1 only."
    )


def _words(text: str) -> set[str]:
    return set(_WORD.findall(text.lower()))


def list_metrics(scope: ToolScope, args: ListMetricsArgs) -> MetricList:
    semantic = scope.semantic
    wanted = _words(args.search or "")
    found: list[tuple[float, MetricSummary]] = []
    for name in semantic.metric_names():
        if not scope.may_read_metric(name):
            continue
        metric = semantic.metric(name)
        score = 1.0
        if wanted:
            synonyms = set().union(*(_words(s) for s in metric.synonyms)) if metric.synonyms else set()
            described = _words(metric.description)
            score = 3 * len(wanted & _words(name)) + 2 * len(wanted & synonyms) + len(wanted & described)
            if not score:
                continue
        summary = MetricSummary(
            name=name,
            version=metric.version,
            type=metric.type,
            description=metric.description,
            synonyms=list(metric.synonyms),
            owner=metric.owner,
        )
        found.append((score, summary))
    found.sort(key=lambda item: (-item[0], item[1].name))
    page, truncated, cursor = paginate([summary for _, summary in found], args, scope)
    saved = [] if args.cursor else _saved_queries(scope, wanted)
    return MetricList(metrics=page, saved_queries=saved, truncated=truncated, next_cursor=cursor)


def _saved_queries(scope: ToolScope, wanted: set[str]) -> list[str]:
    """The saved queries whose every metric the caller may read, matching the search words."""
    found = []
    for saved in scope.saved_queries():
        if wanted and not wanted & (_words(saved.name) | _words(saved.description)):
            continue
        by = f" by {', '.join(saved.group_by)}" if saved.group_by else ""
        found.append(f"{saved.name}: {', '.join(saved.metrics)}{by}. {saved.description}".rstrip())
    return found


def render_metric_list(result: MetricList) -> str:
    if not result.metrics and not result.saved_queries:
        return "No metrics match. Call list_metrics without search to see them all."
    lines = [f"{len(result.metrics)} metric(s):"]
    for m in result.metrics:
        also = f" (also: {', '.join(m.synonyms)})" if m.synonyms else ""
        lines.append(f"- {m.name} v{m.version} [{m.type}]: {m.description}{also}")
    lines += [f"- saved query {saved}" for saved in result.saved_queries]
    if result.truncated:
        lines.append(f"More metrics: call again with cursor={result.next_cursor}")
    return "\n".join(lines)


# --- describe_metric ----------------------------------------------------------------------------


class DescribeMetricArgs(ToolArgs):
    name: str = Field(min_length=1, max_length=128, description="Metric name, from list_metrics.")
    version: int | None = Field(default=None, ge=1, description="A version to describe; default: the current one.")


class MetricVersionView(ToolResult):
    version: int
    retired: bool
    description: str


class ColumnUse(ToolResult):
    table: str
    column: str
    access: Literal["clear", "masked", "hidden", "no_table"] = Field(
        description="How you read it: clear, masked, hidden (the metric fails for you), or no_table."
    )


class MetricDescription(ToolResult):
    name: str
    version: int
    type: Literal["simple", "ratio", "derived", "cumulative", "conversion"]
    description: str
    owner: str
    synonyms: list[str]
    definition: dict[str, Any] = Field(description="The definition: measure and aggregation, filters, inputs, window.")
    versions: list[MetricVersionView] = Field(description="Every version, oldest first.")
    dimensions: list[str] = Field(
        description="Names to group_by or filter on, e.g. customer__region; replace <grain> with day ... year."
    )
    time_grains: list[str] = Field(description="Grains of metric_time (metric_time__month); empty: no time.")
    reads: list[ColumnUse] = Field(description="Tables and columns the metric reads, and your access to each.")
    usable: bool = Field(description="True when you may read every table and column the metric needs.")


def _definition(semantic: SemanticCatalog, metric: Metric) -> dict[str, Any]:
    def used(item: MetricInput) -> dict[str, Any]:
        return item.model_dump(exclude_none=True)

    if metric.type in ("simple", "cumulative"):
        assert metric.measure is not None
        found = semantic.measure_model(metric.measure)
        assert found is not None
        model, measure = found
        out: dict[str, Any] = {"table": model.table, "aggregation": measure.agg, "expression": measure.expr}
        if measure.percentile is not None:
            out["percentile"] = measure.percentile
        if metric.filter:
            out["filter"] = metric.filter
        if metric.window:
            out["window"] = metric.window
        if metric.grain_to_date:
            out["grain_to_date"] = metric.grain_to_date
        if metric.type == "cumulative" and not (metric.window or metric.grain_to_date):
            out["window"] = "all time"
        return out
    if metric.type == "conversion":
        return {
            "base_measure": metric.measure,
            "conversion_measure": metric.conversion_measure,
            "entity": metric.entity,
            "window": metric.window,
            "calculation": metric.calculation,
            **({"filter": metric.filter} if metric.filter else {}),
        }
    if metric.type == "ratio":
        assert metric.numerator is not None and metric.denominator is not None
        return {"numerator": used(metric.numerator), "denominator": used(metric.denominator)}
    return {"expression": metric.expr, "inputs": [used(i) for i in metric.inputs]}


def describe_metric(scope: ToolScope, args: DescribeMetricArgs) -> MetricDescription:
    scope.require_metric(args.name)
    semantic = scope.semantic
    metric = semantic.metric(args.name, args.version)
    dimensions, grains = available_dimensions(semantic, metric)
    # By metric_time where the metric has time: a metric comparing with an earlier period needs
    # periods, and so the time column it reads is listed too.
    compiled = scope.compile_metrics(describing_query(semantic, metric))
    reads: list[ColumnUse] = []
    for table, columns in sorted(compiled.columns.items()):
        if not scope.decide(table, "read").allowed:
            reads += [ColumnUse(table=table, column=c, access="no_table") for c in sorted(columns)]
            continue
        for access in scope.columns(table, sorted(columns)):
            reads.append(ColumnUse(table=table, column=access.column.rsplit(".", 1)[1], access=access.access))
    scope.rows += 1
    return MetricDescription(
        name=metric.name,
        version=metric.version,
        type=metric.type,
        description=metric.description,
        owner=metric.owner,
        synonyms=list(metric.synonyms),
        definition=_definition(semantic, metric),
        versions=[
            MetricVersionView(version=v.version, retired=v.retired, description=v.description)
            for v in semantic.versions(metric.name)
        ],
        dimensions=dimensions,
        time_grains=grains,
        reads=reads,
        usable=all(r.access in ("clear", "masked") for r in reads),
    )


def render_metric_description(result: MetricDescription) -> str:
    lines = [f"{result.name} v{result.version} [{result.type}], owner {result.owner}: {result.description}"]
    lines.append("Definition: " + "; ".join(f"{k}={v}" for k, v in result.definition.items()))
    if result.time_grains:
        lines.append(f"metric_time grains: {', '.join(result.time_grains)}")
    lines.append(f"Dimensions: {', '.join(result.dimensions) or 'none'}")
    versions = ", ".join(f"v{v.version}{' (retired)' if v.retired else ''}" for v in result.versions)
    lines.append(f"Versions: {versions}")
    blocked = [f"{r.table}.{r.column} ({r.access})" for r in result.reads if r.access not in ("clear", "masked")]
    lines.append("You may use it." if result.usable else f"You may not use it: {', '.join(blocked)}.")
    return "\n".join(lines)


# --- query_metrics ------------------------------------------------------------------------------


class WhereFilter(ToolArgs):
    dimension: str = Field(max_length=128, description="A dimension name, e.g. customer__region or metric_time.")
    op: Literal["=", "!=", "<", "<=", ">", ">=", "in", "not in", "is null", "is not null"] = Field(
        description="Comparison."
    )
    value: str | int | float | bool | list[str | int | float] | None = Field(
        default=None, description="The value (a list for in / not in; none for is null). Dates as 'YYYY-MM-DD'."
    )


FilterText = Annotated[str, Field(min_length=1, max_length=4000)]


class QueryMetricsArgs(GovernedReadArgs):
    metrics: list[str] = Field(default_factory=list, max_length=10, description="Metric names, from list_metrics.")
    saved_query: str | None = Field(
        default=None, max_length=128, description="Instead of metrics and group_by: a saved query, from list_metrics."
    )
    group_by: list[str] = Field(
        default_factory=list,
        max_length=6,
        description="Dimensions or entities, e.g. ['metric_time__month', 'customer__region', 'customer'].",
    )
    where: list[WhereFilter | FilterText] = Field(
        default_factory=list,
        max_length=20,
        description="Filters joined by AND: objects, or dbt MetricFlow filter text, e.g. "
        "\"{{ Dimension('customer__region') }} = 'EMEA' OR {{ Dimension('order__channel') }} = 'web'\".",
    )
    order_by: list[str] = Field(
        default_factory=list, max_length=8, description="Metric or dimension names; prefix '-' for descending."
    )
    versions: dict[str, int] | None = Field(default=None, description="A metric version to use, by metric name.")


class MetricsResult(QueryResult):
    metrics: dict[str, int] = Field(description="Version of every metric used, inputs of ratios and derived included.")
    compiled_sql: str = Field(
        description="The SQL the metrics compiled to; rewritten_sql is it after policy (masks, row filters)."
    )


def query_metrics(scope: ToolScope, args: QueryMetricsArgs) -> MetricsResult:
    where = tuple(
        condition
        for item in args.where
        for condition in (
            parse_filter(item) if isinstance(item, str) else [DimensionFilter(item.dimension, item.op, item.value)]
        )
    )
    if args.saved_query is not None:
        if args.metrics or args.group_by:
            raise InvalidArgument(
                "A saved query brings its own metrics and group_by.",
                hint="Send saved_query alone, or with where and order_by to narrow and order it.",
            )
        saved = scope.saved_query(args.saved_query)
        query = saved_metric_query(saved, where=where)
        query = replace(query, order_by=tuple(args.order_by) or query.order_by, versions=dict(args.versions or {}))
    else:
        query = MetricQuery(
            metrics=tuple(args.metrics),
            group_by=tuple(args.group_by),
            where=where,
            order_by=tuple(args.order_by),
            versions=dict(args.versions or {}),
        )
    compiled = scope.compile_metrics(query)
    scope.details.update(metrics=compiled.metrics, compiled_sql=compiled.sql)
    page = run_governed(scope, compiled.sql, args, show_rewritten=True)
    return MetricsResult(**page, metrics=compiled.metrics, compiled_sql=compiled.sql)


def render_metrics(result: MetricsResult) -> str:
    versions = ", ".join(f"{name} v{version}" for name, version in result.metrics.items())
    return render_query(result) + f"\nMetric versions: {versions}."


METRIC_TOOLS: tuple[ToolSpec[Any, Any], ...] = (
    ToolSpec(
        name=ToolName.LIST_METRICS,
        title="List metrics",
        args=ListMetricsArgs,
        result=MetricList,
        handler=list_metrics,
        render=render_metric_list,
        read_only=True,
        destructive=False,
        idempotent=True,
        family="catalog",
    ),
    ToolSpec(
        name=ToolName.DESCRIBE_METRIC,
        title="Describe a metric",
        args=DescribeMetricArgs,
        result=MetricDescription,
        handler=describe_metric,
        render=render_metric_description,
        read_only=True,
        destructive=False,
        idempotent=True,
        family="catalog",
    ),
    ToolSpec(
        name=ToolName.QUERY_METRICS,
        title="Query metrics",
        args=QueryMetricsArgs,
        result=MetricsResult,
        handler=query_metrics,
        render=render_metrics,
        read_only=True,
        destructive=False,
        idempotent=True,
        family="query",
    ),
)
