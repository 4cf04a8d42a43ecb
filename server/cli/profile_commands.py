"""``lakegate profile sync-policies|verify-audit``: the production profile's shared state.

Exit codes: 0 fine, 1 the audit chain failed verification, 2 PostgreSQL cannot be used (or a
usage error, as click does).
"""

from __future__ import annotations

from typing import NoReturn

import click
from rich.console import Console

from lakegate.errors import LakegateError
from lakegate.server.cli.context import command_settings as _settings

__all__ = ["profile"]

EXIT_FAILED = 1
EXIT_UNUSABLE = 2


def _fail(exc: LakegateError) -> NoReturn:
    Console(stderr=True, highlight=False).print(f"error: {exc}")
    raise SystemExit(EXIT_UNUSABLE)


@click.group("profile")
def profile() -> None:
    """The production profile's shared state in PostgreSQL (LAKEGATE_PROFILE=production)."""


@profile.command("sync-policies")
@click.pass_context
def sync_policies_command(ctx: click.Context) -> None:
    """Replace the Casbin rules in PostgreSQL by the project's policies/policy.csv (every replica
    applies them within the bound of LAKEGATE_POSTGRES__POLICY_POLL_INTERVAL_S + 1 s)."""
    from lakegate.policies.enforcer import policy_files
    from lakegate.server.profile import sync_policies

    settings = _settings(ctx)
    try:
        count = sync_policies(settings)
    except LakegateError as exc:
        _fail(exc)
    click.echo(f"{count} rules in PostgreSQL, from {policy_files(settings.project).policy}")


@profile.command("verify-audit")
@click.pass_context
def verify_audit_command(ctx: click.Context) -> None:
    """Verify the global audit hash chain in PostgreSQL (every replica's records)."""
    from lakegate.server.profile import verify_audit

    try:
        report = verify_audit(_settings(ctx))
    except LakegateError as exc:
        _fail(exc)
    for problem in report.problems:
        click.echo(f"{problem.kind}: {problem.message}")
    if not report.ok:
        click.echo(f"FAILED: {len(report.problems)} problem(s) in {report.records} records")
        raise SystemExit(EXIT_FAILED)
    click.echo(f"ok: {report.records} records, seq {report.first_seq or 0}..{report.last_seq or 0}")
