"""Importing a dbt project's semantic layer (MetricFlow's semantic_manifest.json) as lakegate's metrics.

`translate_manifest` turns dbt's semantic models and metrics into the entries of catalog/metrics.yaml,
and names in a report every construct it could not translate, or translated with another meaning,
with where it is defined. `merge_definitions` folds them into existing definitions: a semantic
model replaces the one of its name; a metric whose definition is unchanged is left as it is, a
changed one is added as its next version (the lock then records it: `lakegate metrics lock`), so
a second import of the same manifest changes nothing and drift shows as versions.

What maps (MetricFlow -> lakegate): entities (primary, foreign), categorical and time dimensions
(day grain and coarser), measures sum, count, count_distinct, average, min, max, median,
percentile (continuous), sum_boolean (a sum of the condition as 0 or 1); metrics simple, ratio,
derived, cumulative and conversion; saved queries; filters on dimensions through joins, kept in MetricFlow's
syntax (`{{ Dimension('country__region', entity_path=['customer']) }} = 'NA'`), which lakegate
resolves.
Offsets (`offset_window`, `offset_to_grain`) map as they are. Everything else is reported, not
guessed: conversion metrics with constant properties, a saved query's exports, `join_to_timespine` without
the time spine's days (`--time-spine`), per-measure time dimensions,
and sub-day grains.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from lakegate.catalog.metric_definitions import split_references
from lakegate.catalog.metric_filters import parse_filter
from lakegate.errors import LakegateError

__all__ = ["ImportNote", "Translation", "find_definition", "merge_definitions", "translate_manifest"]

_AGGREGATIONS = {"sum": "sum", "count": "count", "count_distinct": "count_distinct", "average": "avg",
                 "min": "min", "max": "max", "median": "median", "percentile": "percentile"}  # fmt: skip
_GRAINS = ("day", "week", "month", "quarter", "year")


@dataclass(frozen=True)
class ImportNote:
    """One construct not translated (`dropped`: its definition was left out) or translated with
    another meaning (`differs`: imported, and the note says how it differs)."""

    kind: Literal["dropped", "differs"]
    where: str  # "metric cancellations_mx", "semantic model transactions, measure x"
    what: str
    location: str | None = None  # file:line in the dbt project, when its YAML is at hand


@dataclass
class Translation:
    semantic_models: list[dict[str, Any]] = field(default_factory=list)
    metrics: list[dict[str, Any]] = field(default_factory=list)
    notes: list[ImportNote] = field(default_factory=list)
    time_spine: dict[str, str] | None = None  # {"start": ..., "end": ...}, ISO days
    saved_queries: list[dict[str, Any]] = field(default_factory=list)


class _Dropped(Exception):
    """A construct that cannot be translated: the definition holding it is left out."""


def find_definition(project: Path | None, name: str) -> str | None:
    """`file:line` of the YAML entry `- name: NAME` in the dbt project's models, if found."""
    if project is None:
        return None
    pattern = re.compile(rf"^\s*-\s*name:\s*['\"]?{re.escape(name)}['\"]?\s*$")
    for path in sorted(project.rglob("*.yml")):
        if "target" in path.parts or "dbt_packages" in path.parts:
            continue
        for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if pattern.match(line):
                return f"{path.relative_to(project)}:{number}"
    return None


class _Translator:
    def __init__(
        self,
        manifest: Mapping[str, Any],
        tables: Mapping[str, str],
        owner: str,
        project: Path | None,
        time_spine: Mapping[str, str] | None = None,
    ):
        self.manifest = manifest
        self.time_spine = time_spine
        self.tables = tables
        self.owner = owner
        self.project = project
        self.result = Translation()
        self.measure_model: dict[str, dict[str, Any]] = {}  # measure name -> its semantic model (raw)
        self.metric_by_name = {m["name"]: m for m in manifest.get("metrics", [])}

    def note(self, kind: Literal["dropped", "differs"], where: str, what: str, name: str) -> None:
        self.result.notes.append(ImportNote(kind, where, what, find_definition(self.project, name)))

    # -- semantic models -------------------------------------------------------------------------

    def models(self) -> None:
        for model in self.manifest.get("semantic_models", []):
            for measure in model.get("measures", []):
                self.measure_model[measure["name"]] = model
            where = f"semantic model {model['name']}"
            table = self.tables.get(model["name"]) or self.tables.get(
                (model.get("node_relation") or {}).get("alias", "")
            )
            if table is None:
                self.note(
                    "dropped",
                    where,
                    "no Iceberg table named for it (pass --table MODEL=NAMESPACE.TABLE)",
                    model["name"],
                )
                continue
            entry: dict[str, Any] = {"name": model["name"], "table": table}
            if model.get("description"):
                entry["description"] = " ".join(model["description"].split())
            time_dimension = (model.get("defaults") or {}).get("agg_time_dimension")
            if time_dimension:
                entry["time_dimension"] = time_dimension
            entry["entities"] = [e for e in (self.entity(model, e) for e in model.get("entities", [])) if e]
            entry["dimensions"] = [d for d in (self.dimension(model, d) for d in model.get("dimensions", [])) if d]
            entry["measures"] = [m for m in (self.measure(model, m) for m in model.get("measures", [])) if m]
            self.result.semantic_models.append(entry)

    def entity(self, model: Mapping[str, Any], entity: Mapping[str, Any]) -> dict[str, Any] | None:
        if entity["type"] not in ("primary", "foreign"):
            self.note(
                "dropped",
                f"semantic model {model['name']}, entity {entity['name']}",
                f"entity type {entity['type']} (lakegate joins primary and foreign keys only)",
                entity["name"],
            )
            return None
        return {"name": entity["name"], "type": entity["type"], "expr": entity.get("expr") or entity["name"]}

    def dimension(self, model: Mapping[str, Any], dimension: Mapping[str, Any]) -> dict[str, Any] | None:
        entry: dict[str, Any] = {"name": dimension["name"], "type": dimension["type"]}
        if dimension["type"] == "time":
            grain = ((dimension.get("type_params") or {}).get("time_granularity") or "day").lower()
            if grain not in _GRAINS:
                where = f"semantic model {model['name']}, dimension {dimension['name']}"
                self.note("dropped", where, f"time grain {grain} (lakegate's finest grain is day)", dimension["name"])
                return None
        if dimension.get("expr"):
            entry["expr"] = " ".join(str(dimension["expr"]).split())
        if dimension.get("description"):
            entry["description"] = " ".join(dimension["description"].split())
        return entry

    def measure(self, model: Mapping[str, Any], measure: Mapping[str, Any]) -> dict[str, Any] | None:
        where = f"semantic model {model['name']}, measure {measure['name']}"
        expr = " ".join(str(measure.get("expr") or measure["name"]).split())
        agg = measure["agg"].lower()
        default_time = (model.get("defaults") or {}).get("agg_time_dimension")
        problem = None
        if measure.get("agg_time_dimension") and measure["agg_time_dimension"] != default_time:
            problem = f"its own agg_time_dimension {measure['agg_time_dimension']} (lakegate: one per model)"
        elif agg == "percentile" and (measure.get("agg_params") or {}).get("use_discrete_percentile"):
            problem = "a discrete percentile (lakegate computes continuous percentiles)"
        elif agg not in (*_AGGREGATIONS, "sum_boolean"):
            problem = f"aggregation {agg}"
        if problem:
            self.note("dropped", where, problem, measure["name"])
            return None
        entry: dict[str, Any] = {"name": measure["name"], "agg": _AGGREGATIONS.get(agg, "sum"), "expr": expr}
        if agg == "sum_boolean":
            entry["expr"] = f"CAST(({expr}) AS INTEGER)"
        if agg == "percentile":
            entry["percentile"] = float((measure.get("agg_params") or {})["percentile"])
        if edge := measure.get("non_additive_dimension"):
            entry["non_additive_dimension"] = {
                "name": edge["name"],
                "window_choice": str(edge.get("window_choice") or "max").lower(),
                "window_groupings": list(edge.get("window_groupings") or []),
            }
        if measure.get("description"):
            entry["description"] = " ".join(measure["description"].split())
        return entry

    # -- metrics --------------------------------------------------------------------------------

    def metrics(self) -> None:
        translated_models = {m["name"] for m in self.result.semantic_models}
        kept_measures = {measure["name"] for model in self.result.semantic_models for measure in model["measures"]}
        pending = list(self.manifest.get("metrics", []))
        done: set[str] = set()
        # Inputs first: a ratio or derived metric is kept only when its inputs are.
        while pending:
            progressed = False
            for metric in list(pending):
                inputs = _input_names(metric)
                if any(name in {m["name"] for m in pending} for name in inputs):
                    continue
                pending.remove(metric)
                progressed = True
                if any(name not in done for name in inputs):
                    missing = sorted(name for name in inputs if name not in done)
                    self.note(
                        "dropped",
                        f"metric {metric['name']}",
                        f"inputs not imported: {', '.join(missing)}",
                        metric["name"],
                    )
                    continue
                try:
                    entry = self.metric(metric, kept_measures, translated_models)
                except _Dropped as exc:
                    self.note("dropped", f"metric {metric['name']}", str(exc), metric["name"])
                    continue
                self.result.metrics.append(entry)
                done.add(metric["name"])
            if not progressed:  # a cycle: nothing can be imported
                for metric in pending:
                    self.note("dropped", f"metric {metric['name']}", "its inputs refer to each other", metric["name"])
                break
        for saved in self.manifest.get("saved_queries", []):
            try:
                self.result.saved_queries.append(self.saved_query(saved, done))
            except _Dropped as exc:
                self.note("dropped", f"saved query {saved['name']}", str(exc), saved["name"])

    def saved_query(self, saved: Mapping[str, Any], metrics: set[str]) -> dict[str, Any]:
        """A saved query as lakegate's: its metrics, group_by names (TimeDimension('metric_time',
        'day') is metric_time__day), filters in MetricFlow's syntax, order and limit."""
        params = saved.get("query_params") or {}
        missing = sorted(set(params.get("metrics") or []) - metrics)
        if missing:
            raise _Dropped(f"metrics not imported: {', '.join(missing)}")
        group_by = [_item_name(item, "group_by") for item in params.get("group_by") or []]
        entry: dict[str, Any] = {"name": saved["name"], "description": saved.get("description") or "",
                                 "metrics": list(params["metrics"]), "group_by": group_by}  # fmt: skip
        where = [" ".join(template.split()) for template in _where_templates(params.get("where"))]
        for template in where:  # read as query_metrics reads a filter's text: a saved query must compile
            try:
                parse_filter(template)
            except LakegateError as exc:
                raise _Dropped(f"a filter lakegate does not read: {exc}") from exc
        if where:
            entry["where"] = where
        if params.get("order_by"):
            entry["order_by"] = [_order_name(item) for item in params["order_by"]]
        if params.get("limit"):
            entry["limit"] = int(params["limit"])
        if saved.get("exports"):
            self.note(
                "differs", f"saved query {saved['name']}", "exports (dbt's tables of it) are not made", saved["name"]
            )
        return entry

    def metric(self, metric: Mapping[str, Any], kept_measures: set[str], models: set[str]) -> dict[str, Any]:
        params = metric.get("type_params") or {}
        kind = metric["type"].lower()
        entry: dict[str, Any] = {"name": metric["name"], "version": 1, "type": kind}
        if kind in ("simple", "cumulative"):
            measure = params.get("measure") or {}
            if kind == "cumulative" and (
                measure.get("fill_nulls_with") is not None or measure.get("join_to_timespine")
            ):
                raise _Dropped("fill_nulls_with / join_to_timespine on a cumulative metric (not in lakegate yet)")
            if measure.get("join_to_timespine"):
                if self.time_spine is None:
                    raise _Dropped("join_to_timespine needs the time spine's days: pass --time-spine START:END")
                entry["join_to_timespine"] = True
            if measure.get("fill_nulls_with") is not None:
                entry["fill_nulls_with"] = float(measure["fill_nulls_with"])
            if measure["name"] not in kept_measures:
                raise _Dropped(f"its measure {measure['name']} was not imported")
            entry["measure"] = measure["name"]
            filters = [self.filter_sql(w, measure["name"]) for w in _where_templates(metric.get("filter"))]
            filters += [self.filter_sql(w, measure["name"]) for w in _where_templates(measure.get("filter"))]
            if filters:
                entry["filter"] = " AND ".join(f"({f})" for f in filters) if len(filters) > 1 else filters[0]
            if kind == "cumulative":
                self.cumulative(metric, params.get("cumulative_type_params") or {}, params, entry)
        elif kind == "ratio":
            if _where_templates(metric.get("filter")):
                raise _Dropped("a filter on a ratio metric itself (lakegate filters its inputs)")
            entry["numerator"] = self.metric_input(params["numerator"])
            entry["denominator"] = self.metric_input(params["denominator"])
        elif kind == "derived":
            if _where_templates(metric.get("filter")):
                raise _Dropped("a filter on a derived metric itself (lakegate filters its inputs)")
            entry["expr"] = " ".join(str(params["expr"]).split())
            entry["inputs"] = [self.metric_input(used) for used in params.get("metrics", [])]
        elif kind == "conversion":
            self.conversion(params.get("conversion_type_params") or {}, kept_measures, entry)
        else:
            raise _Dropped(f"metric type {kind} (not in lakegate yet)")
        entry["description"] = " ".join((metric.get("description") or metric.get("label") or metric["name"]).split())
        entry["owner"] = self.owner
        label = metric.get("label")
        if label and label.strip().lower() not in (metric["name"].lower(), entry["description"].lower()):
            entry["synonyms"] = [label.strip()]
        return entry

    def cumulative(
        self, metric: Mapping[str, Any], cumulative: Mapping[str, Any], params: Mapping[str, Any], entry: dict[str, Any]
    ) -> None:
        window = cumulative.get("window") or params.get("window")
        grain_to_date = cumulative.get("grain_to_date") or params.get("grain_to_date")
        if window:
            grain = str(window["granularity"]).lower()
            if grain not in _GRAINS:
                raise _Dropped(f"a window in {grain}s (lakegate's finest grain is day)")
            entry["window"] = f"{int(window['count'])} {grain}{'s' if int(window['count']) != 1 else ''}"
        if grain_to_date:
            if str(grain_to_date).lower() not in _GRAINS[1:]:
                raise _Dropped(f"grain_to_date {grain_to_date}")
            entry["grain_to_date"] = str(grain_to_date).lower()
        period_agg = str(cumulative.get("period_agg") or "first").lower()  # MetricFlow's default is first
        if period_agg not in ("first", "last", "average"):
            raise _Dropped(f"period_agg {period_agg}")
        entry["period_agg"] = period_agg

    def conversion(self, conversion: Mapping[str, Any], kept_measures: set[str], entry: dict[str, Any]) -> None:
        base, converted = conversion.get("base_measure") or {}, conversion.get("conversion_measure") or {}
        if conversion.get("constant_properties"):
            raise _Dropped("constant_properties of a conversion metric (not in lakegate yet)")
        for measure in (base, converted):
            if measure.get("filter") or measure.get("fill_nulls_with") is not None or measure.get("join_to_timespine"):
                raise _Dropped("a filter, fill_nulls_with or join_to_timespine on a conversion metric's measure")
            if measure.get("name") not in kept_measures:
                raise _Dropped(f"its measure {measure.get('name')} was not imported")
        window = conversion.get("window")
        if not window or str(window["granularity"]).lower() not in _GRAINS:
            raise _Dropped("a conversion window that is missing or finer than a day")
        count = int(window["count"])
        entry["measure"] = base["name"]
        entry["conversion_measure"] = converted["name"]
        entry["entity"] = conversion["entity"]
        entry["window"] = f"{count} {str(window['granularity']).lower()}{'s' if count != 1 else ''}"
        entry["calculation"] = str(conversion.get("calculation") or "conversion_rate").lower()

    def metric_input(self, used: Mapping[str, Any]) -> dict[str, Any]:
        entry: dict[str, Any] = {"name": used["name"]}
        if window := used.get("offset_window"):
            grain = str(window["granularity"]).lower()
            if grain not in _GRAINS:
                raise _Dropped(f"an offset_window in {grain}s (lakegate's finest grain is day)")
            entry["offset_window"] = f"{int(window['count'])} {grain}{'s' if int(window['count']) != 1 else ''}"
        if to_grain := used.get("offset_to_grain"):
            if str(to_grain).lower() not in _GRAINS[1:]:
                raise _Dropped(f"offset_to_grain {to_grain}")
            entry["offset_to_grain"] = str(to_grain).lower()
        if used.get("alias"):
            entry["alias"] = used["alias"]
        filters = [
            self.filter_sql(w, _measure_of(self.metric_by_name, used["name"]))
            for w in _where_templates(used.get("filter"))
        ]
        if filters:
            entry["filter"] = " AND ".join(f"({f})" for f in filters) if len(filters) > 1 else filters[0]
        return entry

    def filter_sql(self, template: str, measure: str | None) -> str:
        """A MetricFlow filter as lakegate's: the same text, which lakegate resolves through its join
        graph (entity paths of up to three hops), or _Dropped for what it does not understand yet."""
        if measure not in self.measure_model:
            raise _Dropped("a filter on a metric whose model is not known")
        try:
            split_references(template)
        except ValueError as exc:
            raise _Dropped(f"a filter lakegate does not understand: {exc}") from exc
        return " ".join(template.split())


def _item_name(item: str, what: str) -> str:
    """A saved query's group_by or order_by item as lakegate names it: TimeDimension('metric_time',
    'day') is metric_time__day, Dimension('customer__country') customer__country."""
    try:
        _, names = split_references("{{ " + item + " }}")
    except ValueError as exc:
        raise _Dropped(f"a {what} lakegate does not understand: {exc}") from exc
    if len(names) != 1:
        raise _Dropped(f"a {what} lakegate does not understand: {item!r}")
    return names[0]


def _order_name(item: str) -> str:
    """An order_by item: Metric('revenue') or a group_by item, `.descending(True)` as a leading '-'."""
    text, descending = item.strip(), False
    if (found := re.fullmatch(r"(.+)\.descending\((True|False)\)", text)) is not None:
        text, descending = found[1], found[2] == "True"
    metric = re.fullmatch(r"Metric\(\s*'([A-Za-z0-9_]+)'\s*\)", text)
    name = metric[1] if metric else _item_name(text, "order_by")
    return f"-{name}" if descending else name


def _where_templates(filter_spec: Mapping[str, Any] | None) -> list[str]:
    return [w["where_sql_template"] for w in (filter_spec or {}).get("where_filters", [])]


def _input_names(metric: Mapping[str, Any]) -> list[str]:
    params = metric.get("type_params") or {}
    if metric["type"].lower() == "ratio":
        return [params["numerator"]["name"], params["denominator"]["name"]]
    if metric["type"].lower() == "derived":
        return [used["name"] for used in params.get("metrics", [])]
    return []


def _measure_of(metrics: Mapping[str, Mapping[str, Any]], name: str) -> str | None:
    metric = metrics.get(name)
    if metric is None or metric["type"].lower() not in ("simple", "cumulative"):
        return None
    return str(((metric.get("type_params") or {}).get("measure") or {}).get("name"))


def translate_manifest(
    manifest: Mapping[str, Any],
    tables: Mapping[str, str],
    *,
    owner: str,
    project: Path | None = None,
    time_spine: Mapping[str, str] | None = None,
) -> Translation:
    """lakegate's definitions for a semantic_manifest.json, and what could not be translated.

    `tables` maps a semantic model's name (or its dbt model's alias) to the Iceberg table
    (namespace.table) it reads; `project` is the dbt project, for file:line in the notes;
    `time_spine` ({"start", "end"} ISO days) the days of the dbt project's time spine, which the
    manifest does not hold (join_to_timespine needs them).
    """
    translator = _Translator(manifest, tables, owner, project, time_spine)
    translator.models()
    translator.metrics()
    translator.result.time_spine = dict(time_spine) if time_spine else None
    return translator.result


def _content(metric: Mapping[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in metric.items() if key not in ("version", "retired")}


def merge_definitions(existing: Mapping[str, Any], translation: Translation) -> dict[str, Any]:
    """`existing` (metrics.yaml's content) with the translation folded in: models replaced by name,
    a changed metric added as its next version, an unchanged one left as it is."""
    models = {m["name"]: m for m in existing.get("semantic_models") or []}
    for model in translation.semantic_models:
        models[model["name"]] = model
    metrics = list(existing.get("metrics") or [])
    for metric in translation.metrics:
        versions = [m for m in metrics if m["name"] == metric["name"]]
        if versions:
            latest = max(versions, key=lambda m: int(m.get("version", 1)))
            if _content(latest) == _content(metric):
                continue
            metric = {**metric, "version": int(latest.get("version", 1)) + 1}
        metrics.append(metric)
    merged = {**existing, "semantic_models": list(models.values()), "metrics": metrics}
    if translation.saved_queries:
        saved = {q["name"]: q for q in existing.get("saved_queries") or []}
        merged["saved_queries"] = list((saved | {q["name"]: q for q in translation.saved_queries}).values())
    if translation.time_spine:
        merged["time_spine"] = translation.time_spine
    return merged
