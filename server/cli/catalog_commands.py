"""`lakegate catalog review`: the columns nobody has reviewed, what their values look like, and (with
--accept) the reviewer's decision written into policies/column_review.yaml.

The reviewer acts as a principal (`--as`) through the gate: it lists and describes the datasets it
may read, and reads a small sample of each unreviewed column with a governed query (audited, masks
and row filters applied: a principal allowed to `review` a dataset sees its unreviewed columns as
its other rules say). Nothing is written until `--accept`; then each listed column is recorded as
reviewed, with the suggested tags (or none), the reviewer, the date and the evidence, and the policy
set reloads it like any other change to policies/.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
import yaml
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from lakegate.policies.column_detectors import MIN_VALUES, Suggestion, suggest
from lakegate.policies.column_review import COLUMN_REVIEW_FILE, ReviewedColumn, parse_column_review
from lakegate.server.cli.context import as_principal, command_settings, through_gate

if TYPE_CHECKING:
    from lakegate.catalog.warehouse import ColumnInfo
    from lakegate.server.gate.scope import CallScope

__all__ = ["catalog"]

err = Console(stderr=True)
#: Values read of each column to suggest its tags.
SAMPLE_ROWS = 50


@dataclass(frozen=True)
class Finding:
    column: str  # dataset.column
    type: str
    field_id: int | None
    suggestion: Suggestion | None
    sampled: int
    unreadable: str | None = None  # why no sample could be read

    @property
    def enough(self) -> bool:
        """Whether the sample can back a decision: a suggestion, or enough values with none."""
        return self.suggestion is not None or self.sampled >= MIN_VALUES


@click.group("catalog")
def catalog() -> None:
    """See what attached catalogs serve, and review their columns."""


@catalog.command("list")
@click.option("--tables", is_flag=True, help="Name every table served, not only how many.")
@click.pass_context
def list_catalogs(ctx: click.Context, tables: bool) -> None:
    """What each attached catalog ([catalogs.NAME] in lakegate.toml) serves now, listed afresh,
    and what it does not serve and why; then whether each attached dataset of documents
    ([documents."NS.NAME"]) is served. Names only: no data is read, no policy is applied (run it
    where lakegate.toml and the catalogs' credentials are)."""
    from lakegate.server.profile import open_warehouse

    settings = command_settings(ctx)
    if not settings.catalogs and not settings.documents:
        err.print('lakegate.toml attaches no catalog ([catalogs.NAME]) and no documents ([documents."NS.NAME"]).')
        return
    warehouse = open_warehouse(settings)
    try:
        reports = warehouse.attached_report()
        documents = warehouse.documents_report()
    finally:
        warehouse.close()
    failed = False
    for report in documents:
        failed = failed or report.problem is not None
        click.echo(
            f"documents {report.catalog}: {'served' if report.problem is None else 'not served: ' + report.problem}"
        )
    for report in reports:
        if report.problem is not None:
            failed = True
            click.echo(f"{report.catalog}: nothing served: {report.problem}")
            continue
        click.echo(f"{report.catalog}: {len(report.served)} tables served")
        for name in report.served if tables else ():
            click.echo(f"  {name}")
        for name in report.shadowed:
            click.echo(f"  not served: {name} (its name holds another table's name, as a column would)")
        for identifier in report.skipped:
            click.echo(f"  not served: {identifier} (not plain lower-case names)")
    if failed:
        ctx.exit(1)


@catalog.command("refresh")
@click.pass_context
def refresh(ctx: click.Context) -> None:
    """List the attached catalogs again now, in every serving process: tables created or dropped
    upstream are served (or no longer served) from the next call, not after each catalog's
    refresh_s. Then shows what each catalog serves, as `catalog list` does."""
    from lakegate.server.profile import refresh_requests

    settings = command_settings(ctx)
    if not settings.catalogs:
        err.print("lakegate.toml attaches no catalog ([catalogs.NAME]): there is nothing to refresh.")
        return
    refresh_requests(settings).request()
    click.echo("Asked every lakegate serving this project to list its attached catalogs again at its next call.")
    ctx.invoke(list_catalogs, tables=False)


@catalog.command("review")
@click.argument("scopes", nargs=-1)
@click.option("--sample", default=SAMPLE_ROWS, show_default=True, help="Values read of each column.")
@click.option("--accept", is_flag=True, help="Record every listed column as reviewed, with the suggested tags.")
@click.option(
    "--set",
    "decided",
    multiple=True,
    metavar="COLUMN=TAGS",
    help="With --accept: your tags for one column instead of the suggestion (comma-separated; empty for none), "
    "e.g. --set lake.sales.products.name= . Repeatable.",
)
@as_principal
@click.pass_context
def review(
    ctx: click.Context, scopes: tuple[str, ...], sample: int, accept: bool, decided: tuple[str, ...], principal: str
) -> None:
    """List the columns nobody has reviewed in SCOPES (catalogs or namespaces, e.g. `lake` or
    `lake.sales`; default: those policies/column_review.yaml hides), with tags suggested from a
    sample of their values. With --accept, write them to policies/column_review.yaml."""
    overrides = _overrides(decided)
    settings = command_settings(ctx)
    path = settings.project / "policies" / COLUMN_REVIEW_FILE
    # The audit record says whether the reviewer meant to record the review, and what it set by hand.
    arguments = {"scopes": ",".join(scopes), "sample": str(sample), "accept": str(accept).lower()}
    if decided:
        arguments["set"] = ",".join(decided)

    def answer(scope: CallScope) -> list[Finding]:
        return _findings(scope, scopes, sample)

    findings = through_gate(ctx, principal, "catalog/review", arguments, answer)
    _show(findings)
    if not findings:
        err.print("Every column in scope has been reviewed.")
        return
    if not accept:
        err.print(f"Nothing was written. --accept records these {len(findings)} columns as reviewed in {path}.")
        return
    unknown = set(overrides) - {finding.column for finding in findings}
    if unknown:
        raise click.ClickException(f"--set names columns that are not listed above: {', '.join(sorted(unknown))}")
    _record(path, findings, principal, overrides)
    err.print(f"Recorded {len(findings)} columns as reviewed in {path}; the policy set reloads it.")


def _findings(scope: CallScope, scopes: tuple[str, ...], sample: int) -> list[Finding]:
    review = scope.column_review()
    wanted = scopes or review.scopes
    if not wanted:
        raise click.ClickException(
            f"Name the catalogs or namespaces to review, or list them under hide_unreviewed in {COLUMN_REVIEW_FILE}."
        )
    tagged = scope.tagged_columns()
    findings = []
    for name in scope.readable_datasets():
        if not any(name.startswith(prefix + ".") for prefix in wanted) or scope.dataset_kind(name) != "iceberg":
            continue
        info, _ = scope.dataset(name)
        for column in info.columns:
            full = f"{name}.{column.name.lower()}"
            if full in tagged or review.is_reviewed(full, column.field_id):
                continue
            findings.append(_finding(scope, name, column, sample))
    return findings


def _finding(scope: CallScope, dataset: str, column: ColumnInfo, sample: int) -> Finding:
    full, kind, field_id = f"{dataset}.{column.name.lower()}", column.type, column.field_id
    access = scope.columns(dataset, [column.name])[0]
    if not access.visible:
        reason = f"hidden from you ({access.decision.rule_text})"
        return Finding(full, kind, field_id, None, 0, unreadable=reason)
    if access.access == "masked":
        reason = f"you read it masked ({access.mask}): its values say nothing"
        return Finding(full, kind, field_id, None, 0, unreadable=reason)
    quoted = '"' + column.name.replace('"', '""') + '"'
    sql = f"SELECT {quoted} FROM {_sql_name(dataset)} WHERE {quoted} IS NOT NULL LIMIT {int(sample)}"
    page = scope.query(sql, as_of={}, offset=0, count=sample)
    values: list[Any] = [row[0] for row in page.rows]
    return Finding(full, kind, field_id, suggest(column.name, values), len(values))


def _sql_name(dataset: str) -> str:
    """A dataset's name in SQL: a nested namespace is one quoted part."""
    parts = dataset.split(".")
    if len(parts) <= 3:
        return ".".join(f'"{part}"' for part in parts)
    return f'"{parts[0]}"."' + ".".join(parts[1:-1]) + f'"."{parts[-1]}"'


def _show(findings: list[Finding]) -> None:
    table = Table(title="Columns nobody has reviewed", title_justify="left")
    for heading in ("column", "type", "suggested tags", "evidence"):
        table.add_column(heading)
    for finding in findings:
        if finding.unreadable is not None:
            tags, evidence = "?", finding.unreadable
        elif finding.suggestion is not None:
            tags, evidence = ", ".join(finding.suggestion.tags), finding.suggestion.evidence
        elif finding.enough:
            tags, evidence = "(none)", f"nothing recognised in {finding.sampled} sampled values"
        else:
            tags, evidence = "?", f"only {finding.sampled} values: not recorded without --set"
        table.add_row(escape(finding.column), escape(finding.type), escape(tags), escape(evidence))
    console = Console()
    if not console.is_terminal:  # piped or captured: whole column names, not wrapped at 80
        console = Console(width=200)
    console.print(table)


def _overrides(decided: tuple[str, ...]) -> dict[str, tuple[str, ...]]:
    found: dict[str, tuple[str, ...]] = {}
    for item in decided:
        column, sep, tags = item.partition("=")
        if not sep or column.count(".") < 2:
            raise click.BadParameter(f"{item!r}: write COLUMN=TAGS, e.g. lake.sales.products.name=", param_hint="--set")
        chosen = tuple(tag.strip() for tag in tags.split(",") if tag.strip())
        try:
            ReviewedColumn(tags=chosen)
        except ValidationError as exc:
            raise click.BadParameter(f"{item!r}: {exc.errors()[0]['msg']}", param_hint="--set") from None
        found[column.strip().lower()] = chosen
    return found


def _record(path: Path, findings: list[Finding], principal: str, overrides: dict[str, tuple[str, ...]]) -> None:
    """Add the findings to the `reviewed` entries of the review file, keeping its comments."""
    text = path.read_text(encoding="utf-8") if path.is_file() else ""
    header = "".join(line for line in text.splitlines(keepends=True) if line.startswith("#"))
    data = yaml.safe_load(text) or {}
    reviewed = dict(data.get("reviewed") or {})
    today = datetime.now(UTC).date().isoformat()
    for finding in findings:
        if finding.column not in overrides and (finding.unreadable is not None or not finding.enough):
            continue  # not seen, or too few values to judge: left for a later review
        evidence = (
            finding.suggestion.evidence if finding.suggestion else f"{finding.sampled} values, nothing recognised"
        )
        tags = finding.suggestion.tags if finding.suggestion else ()
        if finding.column in overrides:
            tags, evidence = overrides[finding.column], f"set by the reviewer ({evidence})"
        entry = ReviewedColumn(tags=tags, field_id=finding.field_id, by=principal, at=today, evidence=evidence)
        reviewed[finding.column.lower()] = entry.model_dump(exclude_none=True) | {"tags": list(entry.tags)}
    data = {"hide_unreviewed": list(data.get("hide_unreviewed") or []), "reviewed": reviewed}
    try:
        parse_column_review(data)  # a file the policy set would refuse denies everything: never write one
    except ValidationError as exc:
        raise click.ClickException(
            f"the review would not be valid, nothing was written: {exc.errors()[0]['msg']}"
        ) from None
    path.parent.mkdir(parents=True, exist_ok=True)
    body = yaml.safe_dump(data, sort_keys=False, allow_unicode=True, default_flow_style=None, width=110)
    temporary = path.with_suffix(".tmp")
    temporary.write_text(header + body, encoding="utf-8")
    temporary.replace(path)  # the policy watcher never reads half a file
