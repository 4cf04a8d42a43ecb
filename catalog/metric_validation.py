"""Checking the semantic layer against the warehouse, and locking the versions of its metrics.

Loading catalog/metrics.yaml (catalog/metric_definitions.py) checks its structure and its internal
references. This module checks what loading cannot know:

- `check_against_schemas`: every semantic model's table exists; every column that an entity,
  dimension, measure or filter names is a column of that table; sum, avg, median and percentile
  aggregate numbers; time dimensions are dates or timestamps; a derived metric's expression names
  only its inputs; every entity has exactly one model that owns it (primary), so joins are not
  ambiguous. Schemas are given as Iceberg type strings ("long", "decimal(12, 2)", "timestamptz").
- `check_compiles`: every live metric version compiles, alone and by metric_time__month.
- `check_lock`: no locked (metric, version) changed or disappeared. The lock
  (catalog/metrics.lock.json, beside the metrics.yaml in use) holds a SHA-256 of each version's
  definition; `refresh_lock` adds new versions to it.

Every check returns a list of `Problem`s (empty: fine) and raises nothing for a bad definition.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import sqlglot
from sqlglot import exp
from sqlglot.optimizer.annotate_types import annotate_types

from lakegate.catalog.iceberg_scan import duckdb_type
from lakegate.catalog.metric_compiler import compile_query
from lakegate.catalog.metric_definitions import (
    LOCK_FILE,
    REFERENCE_PREFIX,
    Metric,
    MetricInput,
    MetricsFiles,
    SemanticCatalog,
    SemanticModel,
    locate_metrics,
    split_references,
)
from lakegate.catalog.metric_filters import saved_metric_query
from lakegate.catalog.metric_query import MetricQuery, available_dimensions, needs_periods, offsets_in_time
from lakegate.errors import ConfigurationError, InvalidArgument, LakegateError

__all__ = [
    "LOCK_FILE",
    "LockUpdate",
    "MetricsFiles",
    "Problem",
    "check_against_schemas",
    "check_compiles",
    "check_lock",
    "definition_hash",
    "locate_metrics",
    "lock_text",
    "parse_lock",
    "refresh_lock",
]

DIALECT = "duckdb"
#: Aggregations that only make sense over numbers (count, count_distinct, min and max take anything).
NUMERIC_AGGREGATIONS = frozenset({"sum", "avg", "median", "percentile"})
#: Fields of a metric that document it but do not change its number: editing them (or retiring a
#: version) is not a new version.
UNHASHED_FIELDS = frozenset({"description", "owner", "synonyms", "retired"})
_TIME_TYPES = exp.DataType.TEMPORAL_TYPES - {exp.DataType.Type.TIME, exp.DataType.Type.TIMETZ}

ProblemKind = Literal["load", "table", "column", "type", "expression", "entity", "compile", "lock"]


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the definitions: which file, which model or metric, which field, and why."""

    kind: ProblemKind
    file: str
    where: str  # "semantic model orders", "metric revenue v2"
    field: str  # "measures.order_total.expr", "filter", "inputs.revenue_last_period.filter"
    message: str

    def __str__(self) -> str:
        located = ": ".join(part for part in (self.file, self.where, self.field) if part)
        return f"{located}: {self.message}"


# --- against the live schemas ----------------------------------------------------------------------


def _sql_type(iceberg: str) -> str | None:
    """An Iceberg type string as the SQL type DuckDB reads it; None for nested types (not checked)."""
    try:
        return duckdb_type(iceberg)
    except InvalidArgument:
        return None


@dataclass
class _Checker:
    catalog: SemanticCatalog
    schemas: Mapping[str, Mapping[str, str] | None]
    file: str
    problems: list[Problem] = field(default_factory=list)

    def add(self, kind: ProblemKind, where: str, field_: str, message: str) -> None:
        self.problems.append(Problem(kind, self.file, where, field_, message))

    def parse(self, sql: str, where: str, field_: str) -> exp.Expr | None:
        """`sql` parsed, with Dimension() references as placeholder columns (the compile check
        resolves them)."""
        try:
            text, _ = split_references(sql)
            return sqlglot.parse_one(text, dialect=DIALECT)
        except ValueError as exc:
            self.add("expression", where, field_, str(exc))
            return None
        except sqlglot.errors.ParseError as exc:
            self.add("expression", where, field_, f"{sql!r} is not valid DuckDB SQL: {exc}")
            return None

    def columns_of(self, model: SemanticModel) -> Mapping[str, str] | None:
        """The model's table's columns (lower-case name -> Iceberg type), None when it is missing."""
        found = self.schemas.get(model.table)
        return None if found is None else {name.lower(): type_ for name, type_ in found.items()}

    def check_sql(self, model: SemanticModel, sql: str, where: str, field_: str) -> exp.DataType | None:
        """Check that `sql` names only columns of the model's table; returns its type when known."""
        tree = self.parse(sql, where, field_)
        columns = self.columns_of(model)
        if tree is None or columns is None:
            return None
        unknown = sorted(
            {
                c.name
                for c in tree.find_all(exp.Column)
                if c.name.lower() not in columns and not c.name.startswith(REFERENCE_PREFIX)
            }
        )
        if unknown:
            names = ", ".join(unknown)
            self.add(
                "column",
                where,
                field_,
                f"{sql!r} names {names}, which {'is not a column' if len(unknown) == 1 else 'are not columns'} "
                f"of {model.table} (it has: {', '.join(sorted(columns))}).",
            )
            return None
        return _type_of(tree, columns)

    def type_name(self, model: SemanticModel, sql: str, type_: exp.DataType) -> str:
        """A column's Iceberg type ("string"), or the SQL type of an expression ("TEXT")."""
        tree = sqlglot.parse_one(sql, dialect=DIALECT)
        columns = self.columns_of(model) or {}
        if isinstance(tree, exp.Column) and tree.name.lower() in columns:
            return columns[tree.name.lower()]
        return type_.sql(DIALECT)

    def models(self) -> None:
        owners: dict[str, list[str]] = {}
        for model in self.catalog.semantic_models:
            owners.setdefault(model.primary_entity.name, []).append(model.name)
        for owned, names in owners.items():
            for name in names[1:]:
                self.add(
                    "entity",
                    f"semantic model {name}",
                    f"entities.{owned}",
                    f"{owned} is already the primary entity of {names[0]}, so joins on {owned} are ambiguous: "
                    "give each model its own primary entity, and refer to the other model's as foreign.",
                )
        for model in self.catalog.semantic_models:
            where = f"semantic model {model.name}"
            for entity in model.entities:
                if entity.type == "foreign" and entity.name not in owners:
                    self.add(
                        "entity",
                        where,
                        f"entities.{entity.name}",
                        f"foreign entity {entity.name} is no model's primary entity, so nothing joins on it: "
                        "define the model it identifies, or drop the entity.",
                    )
            if model.table not in self.schemas or self.schemas[model.table] is None:
                self.add(
                    "table",
                    where,
                    "table",
                    f"table {model.table} does not exist in the warehouse: fix the name, or create the table "
                    "before defining metrics on it.",
                )
            for entity in model.entities:
                self.check_sql(model, entity.expr, where, f"entities.{entity.name}.expr")
            for dimension in model.dimensions:
                type_ = self.check_sql(model, dimension.sql, where, f"dimensions.{dimension.name}")
                if dimension.type == "time" and type_ is not None and not _is(type_, _TIME_TYPES):
                    named = self.type_name(model, dimension.sql, type_)
                    self.add(
                        "type",
                        where,
                        f"dimensions.{dimension.name}",
                        f"time dimension {dimension.name} is {named}, not a date or timestamp: "
                        "make it categorical, or cast it to DATE or TIMESTAMP in expr.",
                    )
            for measure in model.measures:
                type_ = self.check_sql(model, measure.expr, where, f"measures.{measure.name}.expr")
                if (
                    measure.agg in NUMERIC_AGGREGATIONS
                    and type_ is not None
                    and not _is(type_, exp.DataType.NUMERIC_TYPES)
                ):
                    named = self.type_name(model, measure.expr, type_)
                    self.add(
                        "type",
                        where,
                        f"measures.{measure.name}.expr",
                        f"{measure.agg} over {measure.expr!r}, which is {named}, not a number: "
                        "aggregate a numeric column, or use count, count_distinct, min or max.",
                    )

    def leaf_models(self, used: MetricInput, seen: tuple[str, ...] = ()) -> list[SemanticModel]:
        """The models whose rows a filter on this input applies to (the inputs of inputs included)."""
        if used.name in seen:
            return []
        try:
            metric = self.catalog.metric(used.name, used.version)
        except LakegateError:
            return []  # reported by check_compiles
        if metric.measure is not None:
            found = self.catalog.measure_model(metric.measure)
            return [found[0]] if found else []
        return [m for inner in metric.referenced_inputs() for m in self.leaf_models(inner, (*seen, used.name))]

    def metrics(self) -> None:
        for metric in self.catalog.metrics:
            where = f"metric {metric.name} v{metric.version}"
            own = MetricInput(name=metric.name, version=metric.version)
            if metric.filter:
                for model in _unique(self.leaf_models(own)):
                    self.check_sql(model, metric.filter, where, "filter")
            for label, used in _labelled_inputs(metric):
                if used.filter:
                    for model in _unique(self.leaf_models(used)):
                        self.check_sql(model, used.filter, where, f"{label}.filter")
            if metric.type == "derived" and metric.expr:
                self.derived(metric, where)

    def derived(self, metric: Metric, where: str) -> None:
        assert metric.expr is not None
        tree = self.parse(metric.expr, where, "expr")
        if tree is None:
            return
        refs = {used.ref for used in metric.inputs}
        for name in sorted({c.name for c in tree.find_all(exp.Column) if c.name not in refs}):
            self.add(
                "expression",
                where,
                "expr",
                f"{metric.expr!r} names {name}, which is not one of its inputs ({', '.join(sorted(refs))}): "
                f"add {name} to inputs (with an alias if it is another version or offset), or fix the name.",
            )


def _labelled_inputs(metric: Metric) -> list[tuple[str, MetricInput]]:
    if metric.type == "ratio":
        assert metric.numerator is not None and metric.denominator is not None
        return [("numerator", metric.numerator), ("denominator", metric.denominator)]
    return [(f"inputs.{used.ref}", used) for used in metric.inputs]


def _unique(models: Iterable[SemanticModel]) -> list[SemanticModel]:
    return list({model.name: model for model in models}.values())


def _is(type_: exp.DataType, types: Iterable[exp.DType]) -> bool:
    return type_.is_type(*types)


def _type_of(tree: exp.Expr, columns: Mapping[str, str]) -> exp.DataType | None:
    """The SQL type of an expression over one table's columns; None when it cannot be told."""
    tree = tree.copy()
    for column in tree.find_all(exp.Column):
        column.set("table", exp.to_identifier("t"))
        column.set("this", exp.to_identifier(column.name.lower()))
    schema: dict[str, object] = {
        "t": {name: sql for name, iceberg in columns.items() if (sql := _sql_type(iceberg)) is not None}
    }
    select = exp.select(exp.alias_(tree, "lakegate_value")).from_("t")
    try:
        annotated = annotate_types(select, schema=schema, dialect=DIALECT)
    except Exception:  # sqlglot cannot type every expression; an untyped one is simply not checked
        return None
    type_ = annotated.selects[0].type
    if type_ is None or type_.is_type(exp.DataType.Type.UNKNOWN, exp.DataType.Type.NULL):
        return None
    return type_


def check_against_schemas(
    catalog: SemanticCatalog, schemas: Mapping[str, Mapping[str, str] | None], *, file: str
) -> list[Problem]:
    """Check the semantic layer against table schemas: table -> {column: Iceberg type}, None or
    absent for a table that does not exist. `file` names the definitions in the messages."""
    checker = _Checker(catalog, schemas, file)
    checker.models()
    checker.metrics()
    return checker.problems


def check_compiles(catalog: SemanticCatalog, *, file: str, skip: Iterable[str] = ()) -> tuple[list[Problem], int]:
    """Compile every version that is not retired, alone and (with a time dimension) by month.

    `skip` names metric versions ("revenue v2") whose problems are already reported. Returns the
    problems and how many versions were compiled.
    """
    problems: list[Problem] = []
    skipped = set(skip)
    checked = 0
    for metric in catalog.metrics:
        where = f"metric {metric.name} v{metric.version}"
        if metric.retired or where in skipped:
            continue
        checked += 1
        versions = {metric.name: metric.version}
        # A metric comparing with an earlier period only exists by period.
        groupings: list[tuple[str, ...]] = [] if needs_periods(catalog, metric) else [()]
        try:
            if available_dimensions(catalog, metric)[1]:
                # By day where an input is a time span or a period start earlier: every such offset
                # can be read by day, not every one by month (7 days earlier).
                groupings.append(("metric_time__day",) if offsets_in_time(catalog, metric) else ("metric_time__month",))
        except Exception as exc:  # a compiler failure of any kind is what this check reports
            problems.append(Problem("compile", file, where, "", f"does not compile: {type(exc).__name__}: {exc}"))
            continue
        groupings = groupings or [()]  # no periods to compare: compiling says why
        for group_by in groupings:
            try:
                compile_query(catalog, MetricQuery((metric.name,), group_by=group_by, versions=versions))
            except Exception as exc:
                by = f" by {', '.join(group_by)}" if group_by else ""
                message = f"does not compile{by}: {type(exc).__name__}: {exc}"
                problems.append(Problem("compile", file, where, "", message))
                break
    for saved in catalog.saved_queries:
        try:
            compile_query(catalog, saved_metric_query(saved))
        except Exception as exc:
            message = f"does not compile: {type(exc).__name__}: {exc}"
            problems.append(Problem("compile", file, f"saved query {saved.name}", "", message))
    return problems, checked


# --- the lock --------------------------------------------------------------------------------------


def definition_hash(metric: Metric) -> str:
    """SHA-256 of what makes the metric's number: the metric entry itself, without its
    documentation (description, owner, synonyms) and without `retired`.

    Only the entry is hashed, not the measure or semantic model it is built on (kept simple on
    purpose): the lock does not notice an edited measure expression. Defaults are left out, so that
    a new optional field in the schema does not change every hash.
    """
    content = metric.model_dump(mode="json", exclude_defaults=True, exclude=set(UNHASHED_FIELDS))
    content.update(name=metric.name, version=metric.version)
    canonical = json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


LockEntries = dict[tuple[str, int], str]


def parse_lock(text: str, *, source: str) -> LockEntries:
    """Raises: ConfigurationError: not a lock file (the message says what is wrong)."""
    try:
        data = json.loads(text)
        metrics = data["metrics"]
        return {
            (str(name), int(version)): str(digest)
            for name, versions in metrics.items()
            for version, digest in versions.items()
        }
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ConfigurationError(
            f"{source} is not a metrics lock ({type(exc).__name__}: {exc}); "
            "delete it and run `lakegate metrics lock` to write it again."
        ) from exc


def lock_text(entries: LockEntries) -> str:
    """The lock file's content: stable order, one metric per key, so that diffs stay small."""
    metrics: dict[str, dict[str, str]] = {}
    for (name, version), digest in sorted(entries.items()):
        metrics.setdefault(name, {})[str(version)] = digest
    document: dict[str, Any] = {
        "about": "SHA-256 of each metric version's definition, written by `lakegate metrics lock`. "
        "`lakegate metrics validate` refuses a version whose definition changed: add a new version instead.",
        "metrics": metrics,
    }
    return json.dumps(document, indent=2, sort_keys=False) + "\n"


def check_lock(catalog: SemanticCatalog, lock: LockEntries | None, *, file: str, lock_file: str) -> list[Problem]:
    """Locked versions that changed or disappeared, and versions not locked yet."""
    if lock is None:
        if not catalog.metrics:
            return []  # nothing to lock yet (a new project)
        return [Problem("lock", lock_file, "", "", "there is no lock file: run `lakegate metrics lock` to write it.")]
    problems = []
    current = {(m.name, m.version): m for m in catalog.metrics}
    for (name, version), digest in sorted(lock.items()):
        metric = current.get((name, version))
        where = f"metric {name} v{version}"
        if metric is None:
            later = [m.version for m in catalog.versions(name)]
            problems.append(
                Problem(
                    "lock",
                    file,
                    where,
                    "",
                    f"metric {name} v{version} is in {lock_file} but no longer in the definitions"
                    f"{f' (versions now: {later})' if later else ''}: a version is never deleted; put it back, "
                    "with retired: true if it must not be used.",
                )
            )
        elif definition_hash(metric) != digest:
            problems.append(
                Problem(
                    "lock",
                    file,
                    where,
                    "",
                    f"metric {name} v{version} changed; a changed definition is a new version: add it as version "
                    f"{max(m.version for m in catalog.versions(name)) + 1} and keep v{version} "
                    "(retire it if it must not be used).",
                )
            )
    for key in sorted(set(current) - set(lock)):
        problems.append(
            Problem(
                "lock",
                file,
                f"metric {key[0]} v{key[1]}",
                "",
                f"not in {lock_file} yet: run `lakegate metrics lock` once the definition is final.",
            )
        )
    return problems


@dataclass(frozen=True)
class LockUpdate:
    entries: LockEntries
    added: list[tuple[str, int]]
    changed: list[tuple[str, int]]  # locked versions whose definition differs (replaced only with force)
    removed: list[tuple[str, int]]  # locked versions no longer defined (dropped only with force)

    @property
    def refused(self) -> bool:
        return bool(self.changed or self.removed)


def refresh_lock(catalog: SemanticCatalog, lock: LockEntries | None, *, force: bool = False) -> LockUpdate:
    """The lock with every new version added. A changed or vanished locked version is kept as it
    was (and listed) unless `force`, which re-hashes or drops it."""
    old = dict(lock or {})
    current = {(m.name, m.version): definition_hash(m) for m in catalog.metrics}
    added = sorted(key for key in current if key not in old)
    changed = sorted(key for key in current if key in old and old[key] != current[key])
    removed = sorted(key for key in old if key not in current)
    entries = dict(old)
    for key in added:
        entries[key] = current[key]
    if force:
        for key in changed:
            entries[key] = current[key]
        for key in removed:
            del entries[key]
    return LockUpdate(entries, added, changed, removed)
