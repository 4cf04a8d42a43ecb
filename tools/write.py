"""Write tools: append rows to an Iceberg table, restore a table to an earlier snapshot, and follow
an append that policy staged for a person's approval.

Policy decides per dataset (`write`, `restore`) and per column (`write`); the scope takes those
decisions before any storage call, and the audit record holds the snapshots before and after.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from lakegate.catalog.staged_changes import StagedChange
from lakegate.tools.base import SnapshotId, ToolArgs, ToolResult, ToolSpec
from lakegate.tools.names import ToolName
from lakegate.tools.scope import ToolScope

__all__ = ["WRITE_TOOLS"]

TABLE_DESCRIPTION = "Iceberg table name, 'namespace.table'."


# --- append_rows --------------------------------------------------------------------------------


class AppendRowsArgs(ToolArgs):
    table: str = Field(min_length=1, max_length=256, description=TABLE_DESCRIPTION)
    rows: list[dict[str, Any]] = Field(
        min_length=1,
        description="Rows to append, each an object of column -> value. Decimals as numbers or strings, "
        "dates 'YYYY-MM-DD', timestamps ISO 8601 with an offset. Omitted columns are null.",
    )


class AppendResult(ToolResult):
    table: str
    status: Literal["applied", "pending"] = Field(
        description="pending: staged for a person's approval, not in the table yet."
    )
    rows: int = Field(description="Rows written (applied) or staged (pending).")
    snapshot_id: SnapshotId | None = Field(description="The table's new snapshot, holding these rows.")
    previous_snapshot_id: SnapshotId | None = Field(
        description="The snapshot before this append (restore_table target)."
    )
    change_id: str | None = Field(default=None, description="For change_status (pending only).")


def append_rows(scope: ToolScope, args: AppendRowsArgs) -> AppendResult:
    outcome = scope.append_rows(args.table, args.rows)
    if isinstance(outcome, StagedChange):
        return AppendResult(
            table=args.table,
            status="pending",
            rows=outcome.rows,
            snapshot_id=None,
            previous_snapshot_id=outcome.base_snapshot_id,
            change_id=outcome.change_id,
        )
    return AppendResult(
        table=args.table,
        status="applied",
        rows=outcome.rows,
        snapshot_id=outcome.snapshot_id,
        previous_snapshot_id=outcome.previous_snapshot_id,
    )


def render_append(result: AppendResult) -> str:
    if result.status == "pending":
        return (
            f"Staged {result.rows} row(s) for {result.table} as change {result.change_id}, pending a person's "
            "approval: they are not in the table yet. Call change_status with this change_id to follow it."
        )
    return (
        f"Appended {result.rows} row(s) to {result.table}: new snapshot {result.snapshot_id}"
        f" (previous {result.previous_snapshot_id if result.previous_snapshot_id is not None else 'none'})."
    )


# --- change_status ------------------------------------------------------------------------------


class ChangeStatusArgs(ToolArgs):
    change_id: str = Field(min_length=1, max_length=64, description="change_id from append_rows (status pending).")


class ChangeStatusResult(ToolResult):
    change_id: str
    table: str
    status: Literal["pending", "approved", "rejected", "expired"]
    kind: Literal["append", "restore"]
    rows: int
    requested_by: str
    requested_at: str
    expires_at: str
    decided_by: str | None = None
    decided_at: str | None = None
    snapshot_id: SnapshotId | None = Field(default=None, description="Holds the rows (approved only).")


def change_status(scope: ToolScope, args: ChangeStatusArgs) -> ChangeStatusResult:
    change = scope.change(args.change_id)
    return ChangeStatusResult(
        change_id=change.change_id,
        table=change.table,
        status=change.status,
        kind=change.kind,
        rows=change.rows,
        requested_by=change.requested_by,
        requested_at=change.requested_at,
        expires_at=change.expires_at,
        decided_by=change.decided_by,
        decided_at=change.decided_at,
        snapshot_id=change.applied_snapshot_id,
    )


def render_change_status(result: ChangeStatusResult) -> str:
    what = "a restore" if result.kind == "restore" else f"{result.rows} row(s)"
    text = f"Change {result.change_id} to {result.table} ({what}): {result.status}"
    if result.status == "pending":
        return text + f", waiting for a person's approval until {result.expires_at}."
    if result.status == "approved":
        return (
            text
            + f" by {result.decided_by} at {result.decided_at}; the table holds it in snapshot {result.snapshot_id}."
        )
    if result.status == "rejected":
        return text + f" by {result.decided_by} at {result.decided_at}; nothing was written."
    return text + f" at {result.decided_at}, undecided; nothing was written."


# --- restore_table ------------------------------------------------------------------------------


class RestoreTableArgs(ToolArgs):
    table: str = Field(min_length=1, max_length=256, description=TABLE_DESCRIPTION)
    snapshot_id: SnapshotId = Field(description="Snapshot to make current again, from describe_dataset's versions.")


class RestoreResult(ToolResult):
    table: str
    status: Literal["applied", "pending"] = Field(description="pending: waits for a person's approval.")
    snapshot_id: SnapshotId = Field(description="The table's current snapshot now.")
    previous_snapshot_id: SnapshotId | None = Field(description="The snapshot that was current before.")
    changed: bool = Field(description="False when the snapshot was already current, or the restore is pending.")
    change_id: str | None = Field(default=None, description="For change_status (pending only).")


def restore_table(scope: ToolScope, args: RestoreTableArgs) -> RestoreResult:
    outcome = scope.restore_table(args.table, args.snapshot_id)
    if isinstance(outcome, StagedChange):
        return RestoreResult(
            table=args.table,
            status="pending",
            snapshot_id=outcome.base_snapshot_id,
            previous_snapshot_id=outcome.base_snapshot_id,
            changed=False,
            change_id=outcome.change_id,
        )
    return RestoreResult(
        table=args.table,
        status="applied",
        snapshot_id=outcome.snapshot_id,
        previous_snapshot_id=outcome.previous_snapshot_id,
        changed=outcome.changed,
    )


def render_restore(result: RestoreResult) -> str:
    if result.status == "pending":
        return (
            f"The restore of {result.table} is change {result.change_id}, pending a person's approval: the table "
            f"is still at snapshot {result.snapshot_id}. Call change_status with this change_id to follow it."
        )
    if not result.changed:
        return f"{result.table} is already at snapshot {result.snapshot_id}; nothing changed."
    return (
        f"Restored {result.table} to snapshot {result.snapshot_id} (was {result.previous_snapshot_id});"
        " later snapshots stay in its history."
    )


WRITE_TOOLS: tuple[ToolSpec[Any, Any], ...] = (
    ToolSpec(
        name=ToolName.APPEND_ROWS,
        title="Append rows to a table",
        args=AppendRowsArgs,
        result=AppendResult,
        handler=append_rows,
        render=render_append,
        read_only=False,
        destructive=False,
        idempotent=False,
        family="write",
    ),
    ToolSpec(
        name=ToolName.RESTORE_TABLE,
        title="Restore a table to a snapshot",
        args=RestoreTableArgs,
        result=RestoreResult,
        handler=restore_table,
        render=render_restore,
        read_only=False,
        destructive=True,
        idempotent=True,
        family="write",
    ),
    ToolSpec(
        name=ToolName.CHANGE_STATUS,
        title="Status of a staged change",
        args=ChangeStatusArgs,
        result=ChangeStatusResult,
        handler=change_status,
        render=render_change_status,
        read_only=True,
        destructive=False,
        idempotent=True,
        family="catalog",
    ),
)
