"""`lakegate changes`: the changes that policy staged for a person's approval, and their decisions.

A person decides as their own principal (`--as`, else `LAKEGATE_PRINCIPAL`), through the gate like
any call: the Casbin decision (`approve` on the dataset), the refusal of one's own change, the
audit record (tool `changes/approve`, ...) with the change, its requester and the resulting
snapshot. No MCP tool decides a change: an agent cannot approve anything, its own change included.
"""

from __future__ import annotations

import json
from dataclasses import asdict

import click
from rich.console import Console
from rich.table import Table

from lakegate.server.cli.context import as_principal, through_gate

__all__ = ["changes"]


@click.group("changes")
def changes() -> None:
    """Appends staged for approval (policies/approvals.yaml): list, show, approve, reject."""


@changes.command("list")
@as_principal
@click.option("--all", "show_all", is_flag=True, help="Decided changes too, not only pending ones.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON lines.")
@click.pass_context
def list_command(ctx: click.Context, principal: str, show_all: bool, as_json: bool) -> None:
    """The changes you may decide (pending ones; expired ones are removed first)."""

    listed = through_gate(
        ctx, principal, "changes/list", {"all": str(show_all)}, lambda scope: scope.changes_to_decide(show_all)
    )
    if as_json:
        for change in listed:
            click.echo(json.dumps(asdict(change)))
        return
    if not listed:
        click.echo("No changes" + (" pending." if not show_all else "."))
        return
    table = Table("change", "table", "status", "rows", "requested by", "requested at", "decided by")
    for change in listed:
        table.add_row(
            change.change_id,
            change.table,
            change.status,
            str(change.rows),
            change.requested_by,
            change.requested_at[:19],
            change.decided_by or "",
        )
    Console().print(table)


@changes.command("show")
@click.argument("change_id")
@as_principal
@click.pass_context
def show_command(ctx: click.Context, change_id: str, principal: str) -> None:
    """One change: its table, rows, requester, status, and the snapshots that hold it."""
    change = through_gate(ctx, principal, "changes/show", {"change_id": change_id}, lambda s: s.change(change_id))
    click.echo(json.dumps(asdict(change), indent=2))


@changes.command("approve")
@click.argument("change_id")
@as_principal
@click.pass_context
def approve_command(ctx: click.Context, change_id: str, principal: str) -> None:
    """Apply a staged change to its table (exactly once), as a person allowed to approve it."""
    decided = through_gate(
        ctx,
        principal,
        "changes/approve",
        {"change_id": change_id},
        lambda scope: scope.decide_change(change_id, approve=True),
    )
    click.echo(
        f"Approved change {change_id}: {decided.rows} row(s) in {decided.table}, "
        f"snapshot {decided.applied_snapshot_id}."
    )


@changes.command("reject")
@click.argument("change_id")
@as_principal
@click.pass_context
def reject_command(ctx: click.Context, change_id: str, principal: str) -> None:
    """Discard a staged change; nothing is written to its table."""
    through_gate(
        ctx,
        principal,
        "changes/reject",
        {"change_id": change_id},
        lambda scope: scope.decide_change(change_id, approve=False),
    )
    click.echo(f"Rejected change {change_id}; its staged rows were discarded.")
