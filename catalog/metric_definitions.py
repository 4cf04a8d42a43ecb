"""The semantic layer's definitions: semantic models and versioned metrics, from catalog/metrics.yaml.

A project may keep its own `<project>/catalog/metrics.yaml`; without one lakegate uses the copy
shipped in this package, which defines the demo warehouse's metrics. Loading checks the file's
structure and its internal references (measures, metrics, entities, cycles); `check_against_schemas`
in catalog/metric_validation.py checks it against the live Iceberg schemas.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import date
from importlib import resources
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from lakegate.errors import ConfigurationError, NotFound

__all__ = [
    "GRAINS",
    "LOCK_FILE",
    "METRICS_FILE",
    "REFERENCE_PREFIX",
    "Dimension",
    "Entity",
    "Measure",
    "Metric",
    "MetricInput",
    "MetricsFiles",
    "NonAdditive",
    "SavedQuery",
    "SemanticCatalog",
    "SemanticModel",
    "TimeSpine",
    "load_semantic_catalog",
    "locate_metrics",
    "parse_semantic_catalog",
    "split_references",
]

#: A reference in a filter, in dbt MetricFlow's syntax: {{ Dimension('customer__country') }},
#: {{ Dimension('region', entity_path=['customer', 'country']) }}, {{ TimeDimension('metric_time',
#: 'month') }} and {{ Entity('customer') }}. Resolved through the join graph when the metric compiles.
_NAME_ARG = r"'[A-Za-z0-9_]+'"
# Every repeated part starts with a character the part before cannot match (a comma, a quote), so
# a failed match backtracks in linear time (an agent writes these; a nested quantifier over
# optional commas took exponential time).
_REFERENCE = re.compile(
    r"\{\{\s*(?P<kind>Dimension|TimeDimension|Entity)\(\s*'(?P<name>[A-Za-z0-9_]+)'"
    r"(?:\s*,\s*'(?P<grain>[A-Za-z]+)')?"
    rf"(?:\s*,\s*entity_path\s*=\s*\[\s*(?P<path>{_NAME_ARG}(?:\s*,\s*{_NAME_ARG})*)?(?:\s*,)?\s*\])?"
    r"\s*\)\s*\}\}"
)
#: What a reference stands for in the SQL text while it is parsed: a column of this name.
REFERENCE_PREFIX = "lakegate_ref_"


def split_references(sql: str) -> tuple[str, list[str]]:
    """A filter's SQL with each `{{ Dimension('name') }}` (or TimeDimension, or Entity) replaced
    by a column `lakegate_ref_<n>`, and the names referenced, in order, as a query names them
    (customer__country, metric_time__month, customer). Nothing of a reference reaches the SQL
    text: the compiler puts the dimension's own SQL in the parsed tree in place of the column.

    Raises:
        ValueError: a template lakegate does not understand, or a grain given to a Dimension or
            Entity, or an unknown grain.
    """
    names: list[str] = []

    def placeholder(match: re.Match[str]) -> str:
        # entity_path=['customer'] with 'country__region' is customer__country__region.
        path = re.findall(r"'([A-Za-z0-9_]+)'", match["path"] or "")
        grain = (match["grain"] or "").lower()
        if grain and (match["kind"] != "TimeDimension" or grain not in GRAINS):
            raise ValueError(
                f"filter {sql!r}: a grain ({', '.join(GRAINS)}) is the second argument of TimeDimension only"
            )
        names.append("__".join([*path, match["name"], *([grain] if grain else [])]).lower())
        return f"{REFERENCE_PREFIX}{len(names) - 1}"

    text = _REFERENCE.sub(placeholder, sql)
    if "{{" in text or "}}" in text:
        raise ValueError(
            f"filter {sql!r}: only {{{{ Dimension('entity__dimension') }}}}, {{{{ TimeDimension('metric_time', "
            "'day') }}, and {{ Entity('entity') }} references are understood, each with an optional entity_path"
        )
    return text, names


LOCK_FILE = "catalog/metrics.lock.json"
METRICS_FILE = "catalog/metrics.yaml"
GRAINS = ("day", "week", "month", "quarter", "year")
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
_WINDOW = re.compile(r"^(\d+) (day|week|month|quarter|year)s?$")

Aggregation = Literal["sum", "count", "count_distinct", "avg", "min", "max", "median", "percentile"]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


def _check_name(name: str) -> str:
    if not _NAME.match(name) or "__" in name:
        raise ValueError(f"name {name!r} must be lower-case letters, digits and single underscores")
    return name


class Entity(_Frozen):
    """A key: `primary` in the model it identifies, `foreign` in models that refer to it."""

    name: str
    type: Literal["primary", "foreign"]
    expr: str = Field(description="SQL over the model's columns that gives the key.")

    @model_validator(mode="after")
    def _valid(self) -> Entity:
        _check_name(self.name)
        return self


class Dimension(_Frozen):
    name: str
    type: Literal["categorical", "time"]
    expr: str | None = Field(default=None, description="SQL over the model's columns; default: the column `name`.")
    description: str = ""

    @model_validator(mode="after")
    def _valid(self) -> Dimension:
        _check_name(self.name)
        return self

    @property
    def sql(self) -> str:
        return self.expr or f'"{self.name}"'


class NonAdditive(_Frozen):
    """A measure that does not add up over time (a balance, a stock): in each period only the rows
    of its last (or first) instant count, as dbt MetricFlow's non_additive_dimension."""

    name: str = Field(description="The model's time dimension whose last (max) or first (min) day counts.")
    window_choice: Literal["max", "min"] = "max"
    window_groupings: tuple[str, ...] = Field(
        default=(), description="Entities of the model whose own last day counts (each account's latest balance)."
    )


class Measure(_Frozen):
    name: str
    agg: Aggregation
    expr: str = Field(description="SQL over the model's columns that is aggregated.")
    percentile: float | None = Field(default=None, gt=0, lt=1, description="For agg percentile: which one.")
    non_additive_dimension: NonAdditive | None = None
    description: str = ""

    @model_validator(mode="after")
    def _valid(self) -> Measure:
        _check_name(self.name)
        if (self.agg == "percentile") != (self.percentile is not None):
            raise ValueError(f"measure {self.name}: percentile is set exactly when agg is percentile")
        return self


class SemanticModel(_Frozen):
    name: str
    table: str = Field(pattern=r"^[a-z_][a-z0-9_]*\.[a-z_][a-z0-9_]*$")
    description: str = ""
    time_dimension: str | None = Field(default=None, description="The time dimension that is metric_time.")
    entities: tuple[Entity, ...]
    dimensions: tuple[Dimension, ...] = ()
    measures: tuple[Measure, ...] = ()

    @model_validator(mode="after")
    def _valid(self) -> SemanticModel:
        _check_name(self.name)
        primaries = [e for e in self.entities if e.type == "primary"]
        if len(primaries) != 1:
            raise ValueError(f"semantic model {self.name} needs exactly one primary entity")
        for kind, names in (
            ("entity", [e.name for e in self.entities]),
            ("dimension", [d.name for d in self.dimensions]),
            ("measure", [m.name for m in self.measures]),
        ):
            duplicates = {n for n in names if names.count(n) > 1}
            if duplicates:
                raise ValueError(f"semantic model {self.name} defines {kind} {sorted(duplicates)} twice")
        if self.time_dimension is not None:
            time = self.dimension(self.time_dimension)
            if time is None or time.type != "time":
                raise ValueError(f"semantic model {self.name}: {self.time_dimension} is not a time dimension")
        return self

    @property
    def primary_entity(self) -> Entity:
        return next(e for e in self.entities if e.type == "primary")

    def entity(self, name: str) -> Entity | None:
        return next((e for e in self.entities if e.name == name), None)

    def dimension(self, name: str) -> Dimension | None:
        return next((d for d in self.dimensions if d.name == name), None)

    def measure(self, name: str) -> Measure | None:
        return next((m for m in self.measures if m.name == name), None)


class MetricInput(_Frozen):
    """A metric used by a ratio or derived metric, optionally filtered or a number of periods earlier."""

    name: str
    version: int | None = Field(default=None, description="Default: the metric's current version.")
    filter: str | None = None
    offset: int | None = Field(default=None, ge=1, description="Periods earlier, at the query's time grain.")
    offset_window: str | None = Field(
        default=None, description="A time span earlier, e.g. '1 month' or '7 days' (dbt MetricFlow's offset_window)."
    )
    offset_to_grain: Literal["week", "month", "quarter", "year"] | None = Field(
        default=None,
        description="The value at the start of the period of this grain (dbt MetricFlow's offset_to_grain), e.g. "
        "month: each day reads the first day of its month.",
    )
    alias: str | None = None

    @model_validator(mode="after")
    def _one_offset(self) -> MetricInput:
        if sum(x is not None for x in (self.offset, self.offset_window, self.offset_to_grain)) > 1:
            raise ValueError(f"input {self.ref}: give one of offset, offset_window and offset_to_grain")
        if self.offset_window is not None and not _WINDOW.match(self.offset_window):
            raise ValueError(f"input {self.ref}: offset_window {self.offset_window!r} must look like '1 month'")
        return self

    @property
    def ref(self) -> str:
        """The name the derived expression uses for this input."""
        return self.alias or self.name

    @property
    def offset_interval(self) -> str | None:
        """offset_window as a DuckDB interval in days, months or years ("1 week" -> "INTERVAL 7 DAY",
        "1 quarter" -> "INTERVAL 3 MONTH"), the units the compiler checks whole periods in."""
        match = _WINDOW.match(self.offset_window or "")
        if match is None:
            return None
        unit, times = {"day": ("DAY", 1), "week": ("DAY", 7), "month": ("MONTH", 1), "quarter": ("MONTH", 3),
                       "year": ("YEAR", 1)}[match.group(2)]  # fmt: skip
        return f"INTERVAL {int(match.group(1)) * times} {unit}"


class Metric(_Frozen):
    name: str
    version: int = Field(ge=1)
    retired: bool = False
    type: Literal["simple", "ratio", "derived", "cumulative", "conversion"]
    description: str
    owner: str
    synonyms: tuple[str, ...] = ()
    measure: str | None = None
    filter: str | None = None
    numerator: MetricInput | None = None
    denominator: MetricInput | None = None
    expr: str | None = None
    inputs: tuple[MetricInput, ...] = ()
    window: str | None = Field(default=None, description="Cumulative over a trailing window, e.g. '3 months'.")
    grain_to_date: Literal["week", "month", "quarter", "year"] | None = None
    join_to_timespine: bool = Field(
        default=False, description="A row for every period of the time spine, not only those with rows."
    )
    fill_nulls_with: float | None = Field(default=None, description="The value where the metric has no rows.")
    conversion_measure: str | None = Field(
        default=None, description="Conversion metrics: the measure of the events that count as conversions."
    )
    entity: str | None = Field(
        default=None, description="Conversion metrics: the entity whose base event a conversion event follows."
    )
    calculation: Literal["conversion_rate", "conversions"] = Field(
        default="conversion_rate",
        description="Conversion metrics: the conversions divided by the base events, or the conversions alone.",
    )
    period_agg: Literal["first", "last", "average"] = Field(
        default="last",
        description="A cumulative metric by a grain coarser than a day: its value on the period's last day "
        "(lakegate's default), on its first day (dbt MetricFlow's default), or the average over its days.",
    )

    @model_validator(mode="after")
    def _valid(self) -> Metric:
        _check_name(self.name)
        needs = {
            "simple": {"measure"},
            "cumulative": {"measure"},
            "conversion": {"measure"},
            "ratio": {"numerator", "denominator"},
            "derived": {"expr", "inputs"},
        }[self.type]
        given = {name for name in ("measure", "numerator", "denominator", "expr", "inputs") if getattr(self, name)}
        if given != needs:
            raise ValueError(f"metric {self.name} ({self.type}) takes {sorted(needs)}, not {sorted(given)}")
        if self.type != "cumulative" and self.grain_to_date:
            raise ValueError(f"metric {self.name}: grain_to_date is for cumulative metrics")
        if self.type not in ("cumulative", "conversion") and self.window:
            raise ValueError(f"metric {self.name}: window is for cumulative and conversion metrics")
        conversion = (self.conversion_measure, self.entity, self.window)
        if self.type == "conversion" and not all(conversion):
            raise ValueError(f"metric {self.name}: a conversion metric needs conversion_measure, entity and window")
        if self.join_to_timespine and self.type != "simple":
            raise ValueError(f"metric {self.name}: join_to_timespine is for simple metrics")
        if self.type != "conversion" and (self.conversion_measure or self.entity):
            raise ValueError(f"metric {self.name}: conversion_measure and entity are for conversion metrics")
        if self.window and self.grain_to_date:
            raise ValueError(f"metric {self.name}: give a window or grain_to_date, not both")
        if self.window and not _WINDOW.match(self.window):
            raise ValueError(f"metric {self.name}: window {self.window!r} must look like '3 months'")
        if self.type == "derived":
            refs = [i.ref for i in self.inputs]
            if len(set(refs)) != len(refs):
                raise ValueError(f"metric {self.name}: two inputs have the same name; give one an alias")
        return self

    @property
    def window_interval(self) -> str | None:
        """The window as a DuckDB interval ("3 months" -> "INTERVAL 3 MONTH")."""
        if self.window is None:
            return None
        match = _WINDOW.match(self.window)
        assert match is not None
        return f"INTERVAL {match.group(1)} {match.group(2).upper()}"

    def referenced_inputs(self) -> tuple[MetricInput, ...]:
        if self.type == "ratio":
            assert self.numerator is not None and self.denominator is not None
            return (self.numerator, self.denominator)
        return self.inputs


class TimeSpine(_Frozen):
    """The days metrics may be read over where they have no rows (dbt MetricFlow's time spine): a
    metric with join_to_timespine has a row for every period in it, and an all-time running total
    goes on to its end."""

    start: date
    end: date


class SavedQuery(_Frozen):
    """A metric query kept under a name (dbt MetricFlow's saved query), asked with
    query_metrics(saved_query=NAME): its metrics, by its dimensions, with its filters."""

    name: str
    description: str = ""
    metrics: tuple[str, ...] = Field(min_length=1)
    group_by: tuple[str, ...] = ()
    where: tuple[str, ...] = Field(default=(), description="Filters, as dbt MetricFlow writes them, joined by AND.")
    order_by: tuple[str, ...] = ()
    limit: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _valid(self) -> SavedQuery:
        _check_name(self.name)
        return self


class SemanticCatalog(_Frozen):
    semantic_models: tuple[SemanticModel, ...]
    metrics: tuple[Metric, ...]
    time_spine: TimeSpine | None = None
    saved_queries: tuple[SavedQuery, ...] = ()

    @model_validator(mode="after")
    def _valid(self) -> SemanticCatalog:
        models = [m.name for m in self.semantic_models]
        if len(set(models)) != len(models):
            raise ValueError("two semantic models have the same name")
        measures = [measure.name for model in self.semantic_models for measure in model.measures]
        if len(set(measures)) != len(measures):
            raise ValueError("measure names must be unique across semantic models")
        seen: set[tuple[str, int]] = set()
        for metric in self.metrics:
            if (metric.name, metric.version) in seen:
                raise ValueError(f"metric {metric.name} version {metric.version} is defined twice")
            seen.add((metric.name, metric.version))
            for measure in (metric.measure, metric.conversion_measure):
                if measure and self.measure_model(measure) is None:
                    raise ValueError(f"metric {metric.name} v{metric.version}: no measure named {measure}")
            for used in metric.referenced_inputs():
                if not any(m.name == used.name for m in self.metrics):
                    raise ValueError(f"metric {metric.name} v{metric.version}: no metric named {used.name}")
        self._check_cycles()
        saved = [q.name for q in self.saved_queries]
        if len(set(saved)) != len(saved):
            raise ValueError("two saved queries have the same name")
        for query in self.saved_queries:
            unknown = sorted(set(query.metrics) - {m.name for m in self.metrics})
            if unknown:
                raise ValueError(f"saved query {query.name}: no metric named {', '.join(unknown)}")
        return self

    def _check_cycles(self) -> None:
        def visit(name: str, path: tuple[str, ...]) -> None:
            if name in path:
                raise ValueError(f"metrics refer to each other in a cycle: {' -> '.join((*path, name))}")
            for metric in (m for m in self.metrics if m.name == name):
                for used in metric.referenced_inputs():
                    visit(used.name, (*path, name))

        for name in {m.name for m in self.metrics}:
            visit(name, ())

    def measure_model(self, measure: str) -> tuple[SemanticModel, Measure] | None:
        for model in self.semantic_models:
            if (found := model.measure(measure)) is not None:
                return model, found
        return None

    def model_with_primary(self, entity: str) -> SemanticModel | None:
        return next((m for m in self.semantic_models if m.primary_entity.name == entity), None)

    def metric_names(self) -> list[str]:
        """Names of the metrics with at least one version that is not retired, sorted."""
        return sorted({m.name for m in self.metrics if not m.retired})

    def versions(self, name: str) -> list[Metric]:
        """Every version of a metric, oldest first."""
        return sorted((m for m in self.metrics if m.name == name), key=lambda m: m.version)

    def metric(self, name: str, version: int | None = None) -> Metric:
        """A metric at `version`, or its newest version that is not retired.

        Raises:
            NotFound: no such metric or version, or the version asked for is retired.
        """
        versions = self.versions(name)
        if not versions:
            raise NotFound(f"There is no metric named '{name}'.", hint="Call list_metrics to see the metrics.")
        if version is None:
            live = [m for m in versions if not m.retired]
            if not live:
                raise NotFound(f"Every version of metric '{name}' is retired.", hint="Call list_metrics.")
            return live[-1]
        chosen = next((m for m in versions if m.version == version), None)
        if chosen is None or chosen.retired:
            known = ", ".join(str(m.version) for m in versions if not m.retired)
            raise NotFound(
                f"Metric '{name}' has no {'live ' if chosen else ''}version {version}.",
                hint=f"Versions you can query: {known}.",
            )
        return chosen


# -- where the definitions live --------------------------------------------------------------------


@dataclass(frozen=True)
class MetricsFiles:
    """The metrics.yaml in use and its lock: the project's own, or the copies shipped in the package."""

    source: str  # shown in messages: a path, or "package catalog/metrics.yaml"
    text: str
    lock_source: str
    lock: str | None  # the lock's text; None when there is none yet
    lock_path: Path | None  # where `lakegate metrics lock` writes; None for the packaged definitions


def locate_metrics(project: Path) -> MetricsFiles:
    """The definitions `load_semantic_catalog(project)` uses, with the lock beside them."""
    path = project / METRICS_FILE
    if path.is_file():
        lock_path = project / LOCK_FILE
        lock = lock_path.read_text(encoding="utf-8") if lock_path.is_file() else None
        return MetricsFiles(str(path), path.read_text(encoding="utf-8"), str(lock_path), lock, lock_path)
    package = resources.files("lakegate.catalog")
    packaged_lock = package.joinpath("metrics.lock.json")
    return MetricsFiles(
        f"package {METRICS_FILE}",
        package.joinpath("metrics.yaml").read_text(encoding="utf-8"),
        f"package {LOCK_FILE}",
        packaged_lock.read_text(encoding="utf-8") if packaged_lock.is_file() else None,
        None,
    )


def load_semantic_catalog(project: Path) -> SemanticCatalog:
    """Load `<project>/catalog/metrics.yaml`, or the packaged demo metrics.

    Raises:
        ConfigurationError: the file cannot be read, is not YAML, or is not a valid semantic layer.
    """
    files = locate_metrics(project)
    return parse_semantic_catalog(files.text, source=files.source)


def parse_semantic_catalog(text: str, *, source: str) -> SemanticCatalog:
    """Validate a semantic layer given as YAML text.

    Raises:
        ConfigurationError: not YAML, or not matching the schema (the message names the field).
    """
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigurationError(f"{source}: not valid YAML: {exc}") from exc
    try:
        return SemanticCatalog.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in error['loc']) or 'file'}: {error['msg']}" for error in exc.errors()[:10]
        )
        raise ConfigurationError(f"{source}: {problems}") from exc
