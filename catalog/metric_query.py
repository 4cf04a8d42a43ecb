"""What a metric query asks, before it is compiled: dimension names, filters, the query itself,
its compiled form, and the dimensions a metric can be asked by (catalog/metric_compiler.py
compiles it)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from lakegate.catalog.metric_definitions import GRAINS, Metric, MetricInput, SemanticCatalog
from lakegate.errors import InvalidArgument, LakegateError

__all__ = [
    "DIMENSIONS_HINT",
    "METRIC_TIME",
    "SUB_DAY_GRAINS",
    "CompiledQuery",
    "DimensionFilter",
    "DimensionRef",
    "FilterOp",
    "FilterTree",
    "MetricQuery",
    "available_dimensions",
    "describing_query",
    "needs_periods",
    "offsets_in_time",
    "parse_dimension",
    "query_error",
    "sub_day_error",
]

METRIC_TIME = "metric_time"
FilterOp = Literal["=", "!=", "<", "<=", ">", ">=", "in", "not in", "is null", "is not null"]

DIMENSIONS_HINT = "Call describe_metric to see the dimensions and grains a metric offers."


def query_error(message: str, hint: str = DIMENSIONS_HINT) -> InvalidArgument:
    """A query the metrics cannot answer, with what to ask instead."""
    return InvalidArgument(message, hint=hint)


def sub_day_error(name: str) -> InvalidArgument:
    """`name` ends in one of dbt MetricFlow's grains finer than a day, which metrics do not offer."""
    head = name.lower().rsplit("__", 1)[0]
    return query_error(
        f"'{name}': metrics have no grain finer than a day ({', '.join(GRAINS)}).",
        f"Ask by {head}__day, or query the table with the query tool.",
    )


@dataclass(frozen=True)
class DimensionRef:
    """A dimension as a query names it: customer__region, order__order_ts__month, metric_time__month,
    or through more than one join, customer__country__region (dbt MetricFlow's entity path). An
    entity is one too: `customer` is the customer key of the metric's own model, and
    `customer__country` the country key of the customer's model when it has no dimension of that
    name (dbt MetricFlow groups by entities as by dimensions)."""

    name: str
    entity: str | None  # the first entity of the path; None for metric_time
    dimension: str | None  # None for metric_time and for an entity of the metric's own model
    grain: str | None
    path: tuple[str, ...] = ()  # every entity joined through, the first one included

    @property
    def is_metric_time(self) -> bool:
        return self.entity is None

    @property
    def owner(self) -> str | None:
        """The entity whose model holds the dimension: the last of the path."""
        return self.path[-1] if self.path else self.entity


#: dbt MetricFlow's grains finer than a day, which lakegate's metrics do not offer.
SUB_DAY_GRAINS = ("hour", "minute", "second", "millisecond", "nanosecond", "microsecond")
#: Joins one dimension may go through (customer__country__region is two).
MAX_HOPS = 3


def parse_dimension(name: str, *, grain_required: bool = True) -> DimensionRef:
    """Raises: InvalidArgument: not entity__dimension[__grain] or metric_time__grain."""
    parts = name.lower().split("__")
    if parts[:-1] == [METRIC_TIME] and parts[-1] in SUB_DAY_GRAINS:
        raise sub_day_error(name)
    grain = parts[-1] if len(parts) > 1 and parts[-1] in GRAINS else None
    head = parts[:-1] if grain else parts
    if head == [METRIC_TIME]:
        if grain is None and grain_required:
            raise query_error(f"'{name}' needs a grain, e.g. metric_time__month ({', '.join(GRAINS)}).")
        return DimensionRef(name.lower(), None, None, grain)
    if len(head) == 1 and head[0] and grain is None:
        return DimensionRef(name.lower(), head[0], None, None)  # an entity: its key
    if not 2 <= len(head) <= MAX_HOPS + 1 or not all(head):
        raise query_error(
            f"'{name}' is not a dimension name: use entity__dimension (customer__region), "
            "entity__time_dimension__grain, entity__entity__dimension through two joins, an entity (customer), "
            "or metric_time__grain."
        )
    return DimensionRef(name.lower(), head[0], head[-1], grain, tuple(head[:-1]))


@dataclass(frozen=True)
class DimensionFilter:
    dimension: str
    op: FilterOp
    value: Any = None


@dataclass(frozen=True)
class FilterTree:
    """Filters combined by AND, OR or NOT (one item), from a filter written as dbt MetricFlow writes
    one (catalog/metric_filters.py)."""

    op: Literal["and", "or", "not"]
    items: tuple[DimensionFilter | FilterTree, ...]

    def leaves(self) -> list[DimensionFilter]:
        return [leaf for item in self.items for leaf in (item.leaves() if isinstance(item, FilterTree) else [item])]


@dataclass(frozen=True)
class MetricQuery:
    metrics: tuple[str, ...]
    group_by: tuple[str, ...] = ()
    where: tuple[DimensionFilter | FilterTree, ...] = ()  # joined by AND
    order_by: tuple[str, ...] = ()  # a name, or -name for descending
    versions: dict[str, int] = field(default_factory=dict)
    limit: int | None = None  # the most rows of the answer (a saved query's own limit)


@dataclass(frozen=True)
class CompiledQuery:
    sql: str
    metrics: dict[str, int]  # metric -> version used (inputs of ratios and derived metrics included)
    columns: dict[str, set[str]]  # table -> columns the SQL reads


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
    names = {entity.name for entity in model.entities}  # an entity's key
    # One join, and two (customer__country__region): every hop to a model's primary entity.
    paths: list[tuple[str, ...]] = [(entity.name,) for entity in model.entities]
    for first, *_ in list(paths):
        middle = catalog.model_with_primary(first)
        if middle is not None and middle.name != model.name:
            paths += [(first, entity.name) for entity in middle.entities if entity.type == "foreign"]
    for path in paths:
        owner = catalog.model_with_primary(path[-1])
        if owner is None:
            continue
        for dimension in owner.dimensions:
            suffix = "__<grain>" if dimension.type == "time" else ""
            names.add(f"{'__'.join(path)}__{dimension.name}{suffix}")
        if len(path) == 1:  # customer__country: a key the joined model holds
            names |= {
                f"{path[0]}__{e.name}" for e in owner.entities if e.name != path[0] and not owner.dimension(e.name)
            }
    return sorted(names), list(GRAINS) if model.time_dimension else []


def _uses(
    catalog: SemanticCatalog,
    metric: Metric,
    found: Callable[[Metric, MetricInput | None], bool],
    seen: tuple[str, ...] = (),
) -> bool:
    """Whether `found` holds for the metric (input None) or for one of its inputs, at any depth."""
    if found(metric, None):
        return True
    for used in metric.referenced_inputs():
        if found(metric, used):
            return True
        if used.name in seen:
            continue
        try:
            inner = catalog.metric(used.name, used.version)
        except LakegateError:
            continue
        if _uses(catalog, inner, found, (*seen, metric.name)):
            return True
    return False


def needs_periods(catalog: SemanticCatalog, metric: Metric) -> bool:
    """Whether a metric can only be asked for by metric_time: it (or an input) compares with an
    earlier period, or is a running total over a window or to date."""

    def found(m: Metric, used: MetricInput | None) -> bool:
        if used is None:
            return m.type == "cumulative" and bool(m.window or m.grain_to_date)
        return bool(used.offset or used.offset_window or used.offset_to_grain)

    return _uses(catalog, metric, found)


def offsets_in_time(catalog: SemanticCatalog, metric: Metric) -> bool:
    """Whether the metric or an input of it reads an input a time span or a period start earlier."""
    return _uses(catalog, metric, lambda _, used: used is not None and bool(used.offset_window or used.offset_to_grain))


def describing_query(catalog: SemanticCatalog, metric: Metric) -> MetricQuery:
    """The query describe_metric and explain_access compile a metric with, to learn what it reads:
    alone, or by metric_time where it has time (by day where an input is read a time span or a
    period start earlier: every such offset can be read by day, not every one by month)."""
    _, grains = available_dimensions(catalog, metric)
    by: tuple[str, ...] = ()
    if grains:
        by = ("metric_time__day",) if offsets_in_time(catalog, metric) else ("metric_time__month",)
    return MetricQuery((metric.name,), by, versions={metric.name: metric.version})
