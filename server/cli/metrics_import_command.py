"""``lakegate metrics import dbt PATH``: bring a dbt project's semantic layer in (catalog/metric_import.py).

Exit codes: 0 imported (the report may still name what was not), 1 nothing could be read or the
result does not validate (nothing written), 2 usage errors (click).
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import click
import yaml

from lakegate.catalog.metric_definitions import METRICS_FILE, parse_semantic_catalog
from lakegate.catalog.metric_import import Translation, merge_definitions, translate_manifest
from lakegate.errors import ConfigurationError
from lakegate.server.cli.context import command_settings

__all__ = ["import_group"]

MANIFEST = Path("target") / "semantic_manifest.json"


@click.group("import")
def import_group() -> None:
    """Import metric definitions from another semantic layer."""


def _manifest_path(path: Path) -> tuple[Path, Path | None]:
    """The manifest, and the dbt project it belongs to (None when only the manifest was given)."""
    if path.is_dir():
        if (path / MANIFEST).is_file():
            return path / MANIFEST, path
        raise click.ClickException(
            f"{path} has no {MANIFEST}: run `dbt parse` in the dbt project first, or pass the manifest file."
        )
    if path.is_file():
        # The dbt project around target/semantic_manifest.json, else the manifest's own directory
        # when it holds the models' YAML (a copy of both, as the reference fixtures keep them).
        project = path.parent.parent if path.parent.name == "target" else path.parent
        return path, project if any(project.rglob("*.yml")) else None
    raise click.ClickException(f"{path} is neither a dbt project nor a semantic_manifest.json.")


def _tables(pairs: tuple[str, ...]) -> dict[str, str]:
    tables = {}
    for pair in pairs:
        model, sep, table = pair.partition("=")
        if not sep or table.count(".") != 1:
            raise click.BadParameter(f"{pair!r}: use MODEL=NAMESPACE.TABLE", param_hint="--table")
        tables[model.strip()] = table.strip()
    return tables


@import_group.command("dbt")
@click.argument("path", type=click.Path(path_type=Path))
@click.option(
    "--table",
    "pairs",
    multiple=True,
    metavar="MODEL=NAMESPACE.TABLE",
    help="The Iceberg table a semantic model (or the dbt model it reads) is served from. Repeatable.",
)
@click.option("--owner", default="dbt import", show_default=True, help="Owner recorded on each imported metric.")
@click.option(
    "--time-spine",
    metavar="START:END",
    help="The days of the dbt project's time spine (its date_spine's range, e.g. 2022-01-01:2022-12-31), which "
    "the manifest does not hold: metrics that join to the time spine need them.",
)
@click.option("--dry-run", is_flag=True, help="Show what would change and the report; write nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.pass_context
def import_dbt(
    ctx: click.Context,
    /,
    path: Path,
    pairs: tuple[str, ...],
    owner: str,
    time_spine: str | None,
    dry_run: bool,
    as_json: bool,
) -> None:
    """Import the semantic models and metrics of a dbt project (MetricFlow's semantic_manifest.json).

    PATH is the dbt project (after `dbt parse`) or its target/semantic_manifest.json. The result is
    merged into the project's catalog/metrics.yaml for review: models replace those of the same
    name; a metric whose definition changed since the last import is added as its next version
    (run `lakegate metrics lock` to record it); an unchanged one is left alone, so importing the
    same manifest again changes nothing. Every construct that could not be translated, or that
    means something else in lakegate, is listed with its file and line. Comments in metrics.yaml
    are not kept when it is rewritten.
    """
    settings = command_settings(ctx)
    manifest_path, dbt_project = _manifest_path(path)
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise click.ClickException(f"cannot read {manifest_path}: {exc}") from exc
    spine = None
    if time_spine is not None:
        start, sep, end = time_spine.partition(":")
        if not sep:
            raise click.BadParameter(
                f"{time_spine!r}: use START:END, e.g. 2022-01-01:2022-12-31", param_hint="--time-spine"
            )
        spine = {"start": start.strip(), "end": end.strip()}
    translation = translate_manifest(manifest, _tables(pairs), owner=owner, project=dbt_project, time_spine=spine)
    target = settings.project / METRICS_FILE
    before = target.read_text(encoding="utf-8") if target.is_file() else ""
    existing = yaml.safe_load(before) or {} if before else {}
    merged = merge_definitions(existing, translation)
    text = yaml.safe_dump(merged, sort_keys=False, allow_unicode=True, width=120)
    try:
        parse_semantic_catalog(text, source=str(target))
    except ConfigurationError as exc:
        raise click.ClickException(f"the imported definitions do not validate, nothing written: {exc}") from exc
    changed = (
        bool(translation.semantic_models or translation.metrics)
        and (yaml.safe_load(before) if before else None) != merged
    )
    _report(translation, target, changed=changed, dry_run=dry_run, as_json=as_json)
    if changed and not dry_run:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text, encoding="utf-8")


def _report(translation: Translation, target: Path, *, changed: bool, dry_run: bool, as_json: bool) -> None:
    if as_json:
        click.echo(
            json.dumps(
                {
                    "file": str(target),
                    "changed": changed,
                    "written": changed and not dry_run,
                    "semantic_models": [m["name"] for m in translation.semantic_models],
                    "metrics": [m["name"] for m in translation.metrics],
                    "notes": [asdict(note) for note in translation.notes],
                },
                indent=1,
            )
        )
        return
    action = "would change" if dry_run else "changed" if changed else "unchanged"
    click.echo(
        f"{len(translation.semantic_models)} semantic models and {len(translation.metrics)} metrics translated; "
        f"{target} {action if changed else 'unchanged'}."
    )
    if changed and not dry_run:
        click.echo("Review it, then run `lakegate metrics validate` and `lakegate metrics lock`.")
    for kind, title in (("dropped", "Not imported"), ("differs", "Imported with another meaning")):
        notes = [note for note in translation.notes if note.kind == kind]
        if notes:
            click.echo(f"{title} ({len(notes)}):")
        for note in notes:
            click.echo(f"  - {note.where}{f' ({note.location})' if note.location else ''}: {note.what}")
