"""What a metric query asks, before it is compiled: dimension names, filters, the query itself,
its compiled form, and the dimensions a metric can be asked by (catalog/metric_compiler.py
compiles it)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from lakegate.catalog.metric_definitions import GRAINS, Metric, SemanticCatalog
from lakegate.errors import InvalidArgument

__all__ = [
    "DIMENSIONS_HINT",
    "METRIC_TIME",
    "CompiledQuery",
    "DimensionFilter",
    "DimensionRef",
    "FilterOp",
    "MetricQuery",
    "available_dimensions",
    "parse_dimension",
    "query_error",
]

METRIC_TIME = "metric_time"
FilterOp = Literal["=", "!=", "<", "<=", ">", ">=", "in", "not in", "is null", "is not null"]

DIMENSIONS_HINT = "Call describe_metric to see the dimensions and grains a metric offers."


def query_error(message: str, hint: str = DIMENSIONS_HINT) -> InvalidArgument:
    """A query the metrics cannot answer, with what to ask instead."""
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
            raise query_error(f"'{name}' needs a grain, e.g. metric_time__month ({', '.join(GRAINS)}).")
        return DimensionRef(name.lower(), None, None, grain)
    if len(head) != 2 or not all(head):
        raise query_error(
            f"'{name}' is not a dimension name: use entity__dimension (customer__region), "
            "entity__time_dimension__grain, or metric_time__grain."
        )
    return DimensionRef(name.lower(), head[0], head[1], grain)


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
    versions: dict[str, int] = field(default_factory=dict)


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
    names = set()
    for entity in model.entities:
        owner = catalog.model_with_primary(entity.name)
        if owner is None:
            continue
        for dimension in owner.dimensions:
            suffix = "__<grain>" if dimension.type == "time" else ""
            names.add(f"{entity.name}__{dimension.name}{suffix}")
    return sorted(names), list(GRAINS) if model.time_dimension else []
