"""``lakegate metrics validate|lock|diff``: the life cycle of the metric definitions.

The definitions are the project's ``catalog/metrics.yaml`` (or the packaged demo copy), with the
lock ``catalog/metrics.lock.json`` beside it. Exit codes: validate 0 fine, 1 problems found; lock 0
written or up to date, 1 refused; diff 0 whether or not the versions differ; 2 usage errors (click).
"""

from __future__ import annotations

import json
import math
import uuid
from dataclasses import asdict, dataclass
from decimal import Decimal, InvalidOperation
from typing import Any

import anyio
import click
from rich.console import Console
from rich.table import Table

from lakegate.catalog.metric_definitions import SemanticCatalog, parse_semantic_catalog
from lakegate.catalog.metric_validation import (
    MetricsFiles,
    Problem,
    check_against_schemas,
    check_compiles,
    check_lock,
    locate_metrics,
    lock_text,
    parse_lock,
    refresh_lock,
)
from lakegate.errors import ConfigurationError, LakegateError
from lakegate.server.cli.context import command_settings as _settings
from lakegate.server.settings import Settings

__all__ = ["metrics"]

EXIT_PROBLEMS = 1
#: Pages of one diff query followed before giving up (each page holds up to limits.max_rows rows).
MAX_PAGES = 100


def _console() -> Console:
    # Created per command so that it writes to the stdout in effect now (CliRunner swaps it).
    return Console(highlight=False, soft_wrap=False, width=160)


def _load(files: MetricsFiles) -> SemanticCatalog:
    try:
        return parse_semantic_catalog(files.text, source=files.source)
    except ConfigurationError as exc:
        raise click.ClickException(f"{exc}\nFix the file, then run `lakegate metrics validate`.") from exc


@click.group("metrics")
def metrics() -> None:
    """Validate, version and compare the metric definitions.

    \b
    The definitions are <project>/catalog/metrics.yaml (without one: the packaged demo metrics);
    catalog/metrics.lock.json beside it records each metric version's definition.
    \b
      lakegate metrics validate        check them against the live tables (run it in CI)
      lakegate metrics lock            record new versions in the lock
      lakegate metrics diff revenue    compare two versions of a metric on the same data
    """


# --- validate --------------------------------------------------------------------------------------


def _live_schemas(settings: Settings, catalog: SemanticCatalog) -> dict[str, dict[str, str] | None]:
    from lakegate.errors import NotFound
    from lakegate.server.profile import open_warehouse

    if not catalog.semantic_models:
        return {}  # nothing defined yet (a new project): nothing to check against the tables
    warehouse = open_warehouse(settings)  # the profile's catalog and storage, as serve reads them
    try:
        if warehouse.is_empty():
            raise click.ClickException(
                f"the warehouse in {settings.state_dir} holds no tables, so there is nothing to check the "
                "metrics against: build the demo with `lakegate demo`, or point LAKEGATE_HOME (or --project) "
                "at the warehouse the metrics are for."
            )
        schemas: dict[str, dict[str, str] | None] = {}
        for table in sorted({model.table for model in catalog.semantic_models}):
            try:
                schemas[table] = {column.name: column.type for column in warehouse.describe(table).columns}
            except NotFound:
                schemas[table] = None
        return schemas
    finally:
        warehouse.close()


def _without_prefix(message: str, source: str) -> str:
    return message.removeprefix(f"{source}: ")


@metrics.command("validate")
@click.option("--json", "as_json", is_flag=True, help="Print the problems (or the summary) as JSON.")
@click.pass_context
def validate_command(ctx: click.Context, /, as_json: bool) -> None:
    """Check the definitions against the live tables and the lock.

    \b
    Reports, with the file, the model or metric, and the field:
      - a semantic model over a table that does not exist
      - columns that are not in the table (entities, dimensions, measures, filters)
      - sum/avg/median/percentile over a column that is not a number; time dimensions that are not
        dates or timestamps
      - a derived metric's expression naming something that is not one of its inputs
      - entities owned by two models, or by none (ambiguous or impossible joins)
      - cycles and other errors the file has on its own
      - a locked version whose definition changed, a locked version that disappeared, a version
        not locked yet
      - any live version that does not compile (alone, and by metric_time__month)
    Exit 1 with the list of problems, 0 with a summary.
    """
    settings = _settings(ctx)
    files = locate_metrics(settings.project)
    problems: list[Problem] = []
    try:
        catalog = parse_semantic_catalog(files.text, source=files.source)
    except ConfigurationError as exc:
        problems.append(Problem("load", files.source, "", "", _without_prefix(str(exc), files.source)))
        _report(problems, files, as_json, summary=None)
        return
    try:
        lock = parse_lock(files.lock, source=files.lock_source) if files.lock is not None else None
        problems += check_lock(catalog, lock, file=files.source, lock_file=files.lock_source)
    except ConfigurationError as exc:
        problems.append(Problem("lock", files.lock_source, "", "", _without_prefix(str(exc), files.lock_source)))
    problems += check_against_schemas(catalog, _live_schemas(settings, catalog), file=files.source)
    # A derived expression naming a non-input fails to compile too: report it once.
    flagged = {p.where for p in problems if p.kind == "expression" and p.where.startswith("metric ")}
    compile_problems, compiled = check_compiles(catalog, file=files.source, skip=flagged)
    problems += compile_problems
    summary = {
        "models": len(catalog.semantic_models),
        "metrics": len({m.name for m in catalog.metrics}),
        "versions": len(catalog.metrics),
        "compiled": compiled,
        "warehouse": str(settings.state_dir),
    }
    _report(problems, files, as_json, summary=summary)


def _report(problems: list[Problem], files: MetricsFiles, as_json: bool, *, summary: dict[str, Any] | None) -> None:
    if as_json:
        document = {"ok": not problems, "file": files.source, "problems": [asdict(p) for p in problems]}
        click.echo(json.dumps({**document, **(summary or {})}, indent=2))
    elif problems:
        count = len(problems)
        click.echo(f"metrics FAILED: {count} problem{'s' if count != 1 else ''} in {files.source}")
        for problem in problems:
            click.echo(f"  {problem.kind}: {problem}")
    elif summary is not None:
        click.echo(
            f"metrics OK: {summary['models']} models, {summary['metrics']} metrics, {summary['versions']} versions "
            f"checked against {summary['warehouse']} ({summary['compiled']} live versions compile; lock "
            f"{files.lock_source})"
        )
    if problems:
        raise SystemExit(EXIT_PROBLEMS)


# --- lock ------------------------------------------------------------------------------------------


def _versions(keys: list[tuple[str, int]]) -> str:
    return ", ".join(f"{name} v{version}" for name, version in keys)


@metrics.command("lock")
@click.option(
    "--force",
    is_flag=True,
    help="Also re-lock versions whose definition changed and drop versions no longer defined. Only for "
    "versions nobody has used yet: a used version that changes should be a new version.",
)
@click.pass_context
def lock_command(ctx: click.Context, /, force: bool) -> None:
    """Record new metric versions in catalog/metrics.lock.json.

    Versions already locked are kept as they are. A locked version whose definition changed (or that
    was deleted) is refused and nothing is written, unless --force.
    """
    settings = _settings(ctx)
    files = locate_metrics(settings.project)
    if files.lock_path is None:
        raise click.ClickException(
            f"{settings.project} has no catalog/metrics.yaml, so it uses the packaged metrics, which come locked. "
            "To define your own, copy them to <project>/catalog/metrics.yaml and lock that (the lock goes beside it)."
        )
    catalog = _load(files)
    try:
        lock = parse_lock(files.lock, source=files.lock_source) if files.lock is not None else None
    except ConfigurationError as exc:
        raise click.ClickException(str(exc)) from exc
    update = refresh_lock(catalog, lock, force=force)
    if update.refused and not force:
        lines = ["nothing written:"]
        for name, version in update.changed:
            later = max(m.version for m in catalog.versions(name)) + 1
            lines.append(
                f"  metric {name} v{version} changed since it was locked; a changed definition is a new version: "
                f"add it as version {later} and keep v{version} (retire it if it must not be used)"
            )
        for name, version in update.removed:
            lines.append(f"  metric {name} v{version} is locked but no longer defined: put it back (retired: true)")
        lines.append("Pass --force to re-lock them as they are now, only if no one has used those versions.")
        raise click.ClickException("\n".join(lines))
    text = lock_text(update.entries)
    if files.lock == text:
        click.echo(f"lock up to date: {len(update.entries)} versions in {files.lock_source}")
        return
    files.lock_path.parent.mkdir(parents=True, exist_ok=True)
    files.lock_path.write_text(text, encoding="utf-8")
    done = [f"{len(update.entries)} versions locked in {files.lock_source}"]
    if update.added:
        done.append(f"new: {_versions(update.added)}")
    if force and update.changed:
        done.append(f"re-locked: {_versions(update.changed)}")
    if force and update.removed:
        done.append(f"dropped: {_versions(update.removed)}")
    click.echo("; ".join(done))


# --- diff ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Value:
    number: Decimal | None
    exact: bool  # False for floats: compared with a tolerance

    @classmethod
    def of(cls, raw: Any) -> _Value:
        if raw is None:
            return cls(None, True)
        try:
            return cls(Decimal(repr(raw) if isinstance(raw, float) else str(raw)), not isinstance(raw, float))
        except InvalidOperation:
            raise click.ClickException(f"the metric returned {raw!r}, which is not a number") from None


def _same(old: _Value, new: _Value) -> bool:
    if old.number is None or new.number is None:
        return old.number is None and new.number is None
    if old.exact and new.exact:
        return old.number == new.number
    return math.isclose(old.number, new.number, rel_tol=1e-12, abs_tol=1e-12)


def _relative(old: _Value, new: _Value) -> float | None:
    if old.number is None or new.number is None or old.number == 0:
        return None
    return float((new.number - old.number) / abs(old.number))


def _fmt(value: Decimal | None, exact: bool = True) -> str:
    if value is None:
        return "NULL"
    if not exact:
        return f"{float(value):,.6g}"
    return f"{value:,}"


def _run_all(runtime: Any, principal: Any, sql: str, as_of: dict[str, int], label: str) -> list[list[Any]]:
    """Every row of a governed query run as `principal` (through the gate, so it is audited)."""
    from lakegate.server.gate.identity import CallOrigin

    origin = CallOrigin(transport="cli", session_id=f"metrics-diff-{uuid.uuid4().hex[:12]}")
    rows: list[list[Any]] = []
    arguments: dict[str, Any] = {"sql": sql, "limit": 1000, "as_of": dict(as_of)}
    for _ in range(MAX_PAGES):
        outcome = anyio.run(runtime.gate.call, "query", arguments, principal, origin)
        if outcome.error is not None or outcome.result is None:
            raise click.ClickException(f"{label} failed as {principal.name}: {outcome.error}")
        result = outcome.result
        rows += [list(row) for row in result.rows]
        if not result.truncated:
            return rows
        arguments = {**arguments, "cursor": result.next_cursor}
    raise click.ClickException(f"{label} has more than {MAX_PAGES} pages: group by fewer dimensions.")


@metrics.command("diff")
@click.argument("name")
@click.option("--from", "from_version", type=click.IntRange(min=1), help="Old version (default: the one before --to).")
@click.option("--to", "to_version", type=click.IntRange(min=1), help="New version (default: the current one).")
@click.option(
    "--group-by",
    "group_by",
    multiple=True,
    help="Dimension to compare by, e.g. metric_time__month or customer__region; repeat for more. "
    "Default: metric_time__month when the metric has a time dimension.",
)
@click.option(
    "--principal",
    default="admin",
    show_default=True,
    help="Who runs both queries (policy, masks and row filters apply as for them).",
)
@click.option("--json", "as_json", is_flag=True, help="Print every row and the totals as JSON.")
@click.pass_context
def diff_command(
    ctx: click.Context,
    /,
    name: str,
    from_version: int | None,
    to_version: int | None,
    group_by: tuple[str, ...],
    principal: str,
    as_json: bool,
) -> None:
    """Compare two versions of metric NAME on the same data.

    Both versions are compiled and run through the governed query path as --principal, pinned to
    the same Iceberg snapshots; the rows where they differ are listed with both values, and the
    totals (the metric without grouping) below. Exit 0 whether they differ or not.
    """
    from lakegate.catalog.metric_compiler import compile_query
    from lakegate.catalog.metric_query import MetricQuery, available_dimensions
    from lakegate.server.app import open_runtime
    from lakegate.server.gate.identity import stdio_principal
    from lakegate.server.logs import configure_logging

    settings = _settings(ctx)
    catalog = _load(locate_metrics(settings.project))
    versions = catalog.versions(name)
    if not versions:
        known = ", ".join(sorted({m.name for m in catalog.metrics}))
        raise click.BadParameter(f"there is no metric named {name!r} (metrics: {known})", param_hint="NAME")
    numbers = [m.version for m in versions]
    live = [m.version for m in versions if not m.retired]
    new_v = to_version or (live or numbers)[-1]
    older = [v for v in numbers if v < new_v]
    if from_version is None and not older:
        raise click.UsageError(
            f"metric {name} has no version before v{new_v}, so there is nothing to compare with: "
            f"pass --from and --to (versions: {', '.join(map(str, numbers))})."
        )
    old_v = from_version or older[-1]
    for version, option in ((old_v, "--from"), (new_v, "--to")):
        if version not in numbers:
            raise click.BadParameter(
                f"metric {name} has no version {version} (versions: {', '.join(map(str, numbers))})", param_hint=option
            )
    if old_v == new_v:
        raise click.BadParameter(f"--from and --to are both v{old_v}: give two different versions", param_hint="--to")
    # Retired versions stay comparable: this copy lets the compiler use the two asked for.
    compared = catalog.model_copy(
        update={
            "metrics": tuple(
                m.model_copy(update={"retired": False}) if m.name == name and m.version in (old_v, new_v) else m
                for m in catalog.metrics
            )
        }
    )
    old_metric, new_metric = compared.metric(name, old_v), compared.metric(name, new_v)
    if not group_by and available_dimensions(compared, old_metric)[1] and available_dimensions(compared, new_metric)[1]:
        group_by = ("metric_time__month",)
    try:
        grouped = {
            v: compile_query(compared, MetricQuery((name,), group_by=group_by, versions={name: v}))
            for v in (old_v, new_v)
        }
    except LakegateError as exc:
        raise click.ClickException(
            f"metric {name} cannot be compared by {', '.join(group_by) or 'total'}: {exc}"
        ) from exc
    totals: dict[int, Any] = {}
    if group_by:
        try:
            totals = {v: compile_query(compared, MetricQuery((name,), versions={name: v})) for v in (old_v, new_v)}
        except LakegateError:
            totals = {}  # e.g. growth against the period before exists only by period

    configure_logging(settings.log_level)  # the diagnostic log goes to stderr, at WARNING by default
    runtime = open_runtime(settings, draft_metrics=True)  # the new version may not be locked yet
    try:
        who = stdio_principal(principal, runtime.enforcer)
        scope = runtime.gate.scope(who)
        for used in sorted({m for compiled in grouped.values() for m in compiled.metrics}):
            if not scope.may_read_metric(used):
                raise click.ClickException(
                    f"principal {principal!r} may not read metric {used}: pass --principal with one who may "
                    "(the default, admin, reads everything)."
                )
        tables = sorted({t for compiled in (*grouped.values(), *totals.values()) for t in compiled.columns})
        snapshots = {t: runtime.warehouse.describe(t).current_version for t in tables}

        def pinned(compiled: Any) -> dict[str, int]:
            # The query tool takes as_of only for the tables a query reads.
            return {t: s for t in compiled.columns if (s := snapshots[t]) is not None}

        rows = {v: _run_all(runtime, who, c.sql, pinned(c), f"metric {name} v{v}") for v, c in grouped.items()}
        total_rows = {v: _run_all(runtime, who, c.sql, pinned(c), f"total of {name} v{v}") for v, c in totals.items()}
    finally:
        runtime.close()

    def keyed(found: list[list[Any]]) -> dict[tuple[Any, ...], _Value]:
        return {tuple(row[:-1]): _Value.of(row[-1]) for row in found}

    old_rows, new_rows = keyed(rows[old_v]), keyed(rows[new_v])
    keys = sorted(set(old_rows) | set(new_rows), key=lambda k: tuple("" if v is None else str(v) for v in k))
    missing = _Value(None, True)
    compared_rows = [(k, old_rows.get(k, missing), new_rows.get(k, missing)) for k in keys]
    differing = [(k, o, n) for k, o, n in compared_rows if not _same(o, n)]
    total = None
    if total_rows:
        total = (_Value.of(total_rows[old_v][0][-1]), _Value.of(total_rows[new_v][0][-1]))
    unit = "periods" if len(group_by) == 1 and group_by[0].startswith("metric_time__") else "rows"
    summary = _summary_line(name, old_v, new_v, len(differing), len(compared_rows), unit, differing)

    if as_json:
        document = {
            "metric": name,
            "from": old_v,
            "to": new_v,
            "group_by": list(group_by),
            "principal": principal,
            "snapshots": snapshots,
            "rows": len(compared_rows),
            "differing": [_row_json(group_by, k, o, n) for k, o, n in differing],
            "total": _row_json((), (), *total) if total else None,
            "summary": summary,
        }
        click.echo(json.dumps(document, indent=2))
        return
    console = _console()
    read = ", ".join(f"{t}@{s}" for t, s in snapshots.items())
    console.print(f"metric {name} v{old_v} -> v{new_v} as {principal}, both reading {read}")
    if differing or total:
        console.print(_diff_table(group_by, old_v, new_v, differing, total))
    console.print(summary)


def _row_json(group_by: tuple[str, ...], key: tuple[Any, ...], old: _Value, new: _Value) -> dict[str, Any]:
    def text(value: _Value) -> str | None:
        return None if value.number is None else str(value.number)

    difference = None if old.number is None or new.number is None else str(new.number - old.number)
    return {
        "key": dict(zip(group_by, key, strict=True)),
        "old": text(old),
        "new": text(new),
        "difference": difference,
        "relative": _relative(old, new),
    }


def _diff_table(
    group_by: tuple[str, ...],
    old_v: int,
    new_v: int,
    differing: list[tuple[tuple[Any, ...], _Value, _Value]],
    total: tuple[_Value, _Value] | None,
) -> Table:
    table = Table(show_lines=False)
    for column in group_by or ("",):
        table.add_column(column)
    for header in (f"v{old_v}", f"v{new_v}", "difference", "relative"):
        table.add_column(header, justify="right")

    def cells(old: _Value, new: _Value) -> list[str]:
        exact = old.exact and new.exact
        difference = None if old.number is None or new.number is None else new.number - old.number
        relative = _relative(old, new)
        return [
            _fmt(old.number, old.exact),
            _fmt(new.number, new.exact),
            _fmt(difference, exact) if difference is None or difference <= 0 else "+" + _fmt(difference, exact),
            "" if relative is None else f"{relative:+.2%}",
        ]

    for index, (key, old, new) in enumerate(differing):
        labels = [str(v) for v in key] if group_by else ["value"]
        table.add_row(*labels, *cells(old, new), end_section=index == len(differing) - 1)
    if total is not None:
        labels = ["total"] + [""] * (max(len(group_by), 1) - 1)
        table.add_row(*labels, *cells(*total), style="bold")
    return table


def _summary_line(
    name: str,
    old_v: int,
    new_v: int,
    differ: int,
    rows: int,
    unit: str,
    differing: list[tuple[tuple[Any, ...], _Value, _Value]],
) -> str:
    line = f"{name} v{old_v} -> v{new_v}: {differ} of {rows} {unit} differ"
    relatives = [r for _, o, n in differing if (r := _relative(o, n)) is not None]
    if relatives:
        line += f", largest {max(relatives, key=abs):+.2%}"
    return line


def _register_import() -> None:
    from lakegate.server.cli.metrics_import_command import import_group

    metrics.add_command(import_group)


_register_import()
