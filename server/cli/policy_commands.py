"""``lakegate policy explain|test``: the governance team's view of a policy set, before it ships.

Both commands read the project's policies (or ``--policy-dir DIR``, a proposed set: policy.csv,
row_filters.yaml and, optionally, model.conf, else the project's) with the column tags of the
project's catalog/datasets.yaml, exactly as the server builds its enforcer. ``explain`` prints the
explain_access tool's answer for any principal (the CLI user owns the policy files); its columns
and datasets come from the catalog definitions, so no warehouse is needed. ``test`` checks the
intents of policies/intent.yaml (DIR's own intent.yaml when it has one: a proposed set without one
must meet the intents in force).

Exit codes: 0 fine; 1 an intent failed, the policy set does not load, or the resource is unknown
or malformed; 2 usage errors (click).
"""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from lakegate.catalog.definitions import CatalogDefinitions, load_definitions
from lakegate.errors import LakegateError, NotFound
from lakegate.policies.approvals import APPROVALS_FILE
from lakegate.policies.enforcer import MODEL_FILE, POLICY_FILE, PolicyEnforcer, PolicyFiles, policy_files
from lakegate.policies.explain import SubjectPolicy
from lakegate.policies.intent import IntentCheck, check_intents, load_intents
from lakegate.policies.quotas import QUOTAS_FILE
from lakegate.policies.row_filters import ROW_FILTER_FILE
from lakegate.policies.scan_limits import SCAN_LIMITS_FILE
from lakegate.server.cli.context import command_settings as _settings
from lakegate.server.settings import Settings

if TYPE_CHECKING:
    from lakegate.catalog.metric_query import CompiledQuery
    from lakegate.tools.access import AccessExplanation

__all__ = ["policy"]

EXIT_FAILED = 1
#: The CLI reads the files once; no reload while it runs.
_NO_RELOAD_S = 3600.0


def _console() -> Console:
    # Created per command so that it writes to the stdout in effect now (CliRunner swaps it).
    return Console(highlight=False, soft_wrap=True, width=160)


def _files(project: Path, policy_dir: Path | None) -> PolicyFiles:
    if policy_dir is None:
        return policy_files(project)
    if not (policy_dir / POLICY_FILE).is_file():
        raise click.ClickException(f"{policy_dir} holds no {POLICY_FILE}: --policy-dir names a policies/ directory.")
    model = policy_dir / MODEL_FILE
    in_force = policy_files(project)
    # Whatever else the policy set holds (files this command does not evaluate) stays the project's.
    return replace(
        in_force,
        model=model if model.is_file() else in_force.model,
        policy=policy_dir / POLICY_FILE,
        row_filters=policy_dir / ROW_FILTER_FILE,
        scan_limits=policy_dir / SCAN_LIMITS_FILE,
        quotas=policy_dir / QUOTAS_FILE,
        approvals=policy_dir / APPROVALS_FILE,
    )


def _load(settings: Settings, policy_dir: Path | None) -> tuple[PolicyEnforcer, CatalogDefinitions]:
    """The enforcer over the chosen policy set, as the server builds it.

    Raises:
        click.ClickException: the definitions or the policy set do not load.
    """
    from lakegate.server.app import resource_groups
    from lakegate.server.logs import configure_logging

    configure_logging(settings.log_level)  # diagnostics to stderr: stdout carries the answer (--json)
    try:
        definitions = load_definitions(settings.project)
    except LakegateError as exc:
        raise click.ClickException(str(exc)) from exc
    files = _files(settings.project, policy_dir)
    enforcer = PolicyEnforcer(files, resource_groups(definitions), reload_interval_s=_NO_RELOAD_S)
    if enforcer.load_error is not None:
        # The server would deny everything with this set: say why instead of explaining denials.
        raise click.ClickException(
            f"the policy set does not load ({files.policy}, {files.model}): {enforcer.load_error}"
        )
    return enforcer, definitions


class _DefinitionsCatalog:
    """Resources as the catalog definitions and the metric definitions name them."""

    def __init__(self, definitions: CatalogDefinitions, project: Path) -> None:
        self._definitions = definitions
        self._project = project

    def columns(self, dataset: str) -> list[str]:
        doc = self._definitions.dataset(dataset)
        if doc is None:
            raise NotFound(
                f"There is no dataset '{dataset}' in the catalog definitions.",
                hint="Name one documented in catalog/datasets.yaml.",
            )
        return [column.name for column in doc.columns]

    def metric_reads(self, name: str) -> CompiledQuery:
        from lakegate.catalog.metric_compiler import compile_query
        from lakegate.catalog.metric_definitions import load_semantic_catalog
        from lakegate.tools.access import metric_query

        semantic = load_semantic_catalog(self._project)
        return compile_query(semantic, metric_query(semantic, name))


@click.group("policy")
def policy() -> None:
    """Explain and test the policy set (policies/), or a proposed one (--policy-dir).

    \b
      lakegate policy explain analyst sales.customers.email     how analyst reads it, and why
      lakegate policy explain sam support.tickets write         may sam append tickets?
      lakegate policy test --policy-dir proposed/policies       do the intents still hold?
    """


_POLICY_DIR = click.option(
    "--policy-dir",
    type=click.Path(file_okay=False, exists=True, path_type=Path),
    default=None,
    help="A policies directory to evaluate instead of the project's (a proposed change).",
)
_JSON = click.option("--json", "as_json", is_flag=True, help="Print JSON instead of tables.")


# --- explain ---------------------------------------------------------------------------------------

_STYLE = {"allow": "green", "clear": "green", "deny": "red", "hidden": "red"}


def _styled(access: str) -> str:
    return f"[{_STYLE.get(access, 'yellow')}]{escape(access)}[/]"


def _print_explanation(console: Console, result: AccessExplanation, subject: SubjectPolicy, files: PolicyFiles) -> None:
    console.print(
        f"[bold]{escape(result.principal)}[/] {result.action} [bold]{escape(result.resource)}[/]: "
        f"{_styled(result.access)}"
    )
    console.print(f"roles: {escape(', '.join(subject.roles) or 'none')}")
    console.print(f"rule:  {escape(result.rule)}")
    if result.columns:
        table = Table("column", "access", "rule", title="Columns", title_justify="left")
        for column in result.columns:
            table.add_row(escape(column.name), _styled(column.access), escape(column.rule))
        console.print(table)
    for row_filter in result.row_filters:
        console.print(f"row filter: {escape(row_filter)}")
    for advice in result.advice:
        console.print(f"- {escape(advice)}")
    console.print(f"policy version {subject.version} ({files.policy})", style="dim")


@policy.command("explain")
@click.argument("principal")
@click.argument("resource")
@click.argument("action", required=False, metavar="[ACTION]", type=click.Choice(["read", "write", "restore", "call"]))
@_POLICY_DIR
@_JSON
@click.pass_context
def explain_command(
    ctx: click.Context, /, principal: str, resource: str, action: str | None, policy_dir: Path | None, as_json: bool
) -> None:
    """What PRINCIPAL may do with RESOURCE (ACTION: read by default, write, restore; call for tools).

    \b
    RESOURCE is a dataset (sales.orders), a column (sales.orders.region), metric:<name>,
    <dataset>.classification:<value> or tool:<name>. Prints the deciding rule, each column's
    access (masked with which method, hidden), the row filters, and what the principal can do
    instead: the explain_access tool's answer, for any principal, roles (role:analyst) included.
    """
    from lakegate.tools.access import explain

    settings = _settings(ctx)
    enforcer, definitions = _load(settings, policy_dir)
    subject = SubjectPolicy(enforcer, principal)
    try:
        result = explain(subject, _DefinitionsCatalog(definitions, settings.project), resource, action)
    except LakegateError as exc:  # a client error (unknown or malformed resource), or metrics.yaml invalid
        raise click.ClickException(str(exc)) from exc
    if as_json:
        # The tool's structured answer, with what the governance team also wants to see.
        extra = {"roles": list(subject.roles), "policy_version": subject.version, "policy": str(enforcer.files.policy)}
        click.echo(json.dumps({**result.model_dump(mode="json"), **extra}, indent=2))
        return
    _print_explanation(_console(), result, subject, enforcer.files)


# --- test ------------------------------------------------------------------------------------------


def _checks(settings: Settings, policy_dir: Path | None) -> tuple[PolicyEnforcer, list[IntentCheck]]:
    enforcer, _ = _load(settings, policy_dir)
    try:
        intents = load_intents(settings.project, policy_dir)
        return enforcer, check_intents(enforcer, intents)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise click.ClickException(f"the intent file is not valid: {exc}") from exc


@policy.command("test")
@_POLICY_DIR
@_JSON
@click.pass_context
def test_command(ctx: click.Context, /, policy_dir: Path | None, as_json: bool) -> None:
    """Check every intent of policies/intent.yaml against the policy set; exit 1 if any fails.

    Each failing expectation is spelled out with what the policy set answers and the rule that
    decided, e.g. "analyst column sales.customers.email: expected masked:hash, got clear (...)".
    """
    settings = _settings(ctx)
    enforcer, checks = _checks(settings, policy_dir)
    failed = [check for check in checks if not check.ok]
    if as_json:
        document: dict[str, Any] = {
            "ok": not failed,
            "policy": str(enforcer.files.policy),
            "policy_version": enforcer.version,
            "passed": len(checks) - len(failed),
            "failed": len(failed),
            "checks": [{**asdict(check), "ok": check.ok} for check in checks],
        }
        click.echo(json.dumps(document, indent=2))
    else:
        console = _console()
        table = Table("principal", "kind", "resource", "expected", "actual", "result")
        for check in checks:
            verdict = "[green]pass[/]" if check.ok else "[bold red]FAIL[/]"
            cells = (check.principal, check.kind, check.resource, check.expected, check.actual)
            table.add_row(*(escape(cell) for cell in cells), verdict)
        console.print(table)
        for check in failed:
            console.print(f"[bold red]FAIL[/] {escape(check.describe())}")
        verdict = "FAILED" if failed else "OK"
        console.print(
            f"policy intents {verdict}: {len(checks) - len(failed)} passed, {len(failed)} failed "
            f"({enforcer.files.policy}, version {enforcer.version})"
        )
    if failed:
        raise SystemExit(EXIT_FAILED)
