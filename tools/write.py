"""Write tools: append rows to an Iceberg table, restore a table to an earlier snapshot.

Policy decides per dataset (`write`, `restore`) and per column (`write`); the scope takes those
decisions before any storage call, and the audit record holds the snapshots before and after.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

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
    rows: int = Field(description="Rows written.")
    snapshot_id: SnapshotId = Field(description="The table's new snapshot, holding these rows.")
    previous_snapshot_id: SnapshotId | None = Field(
        description="The snapshot before this append (restore_table target)."
    )


def append_rows(scope: ToolScope, args: AppendRowsArgs) -> AppendResult:
    outcome = scope.append_rows(args.table, args.rows)
    return AppendResult(
        table=args.table,
        rows=outcome.rows,
        snapshot_id=outcome.snapshot_id,
        previous_snapshot_id=outcome.previous_snapshot_id,
    )


def render_append(result: AppendResult) -> str:
    return (
        f"Appended {result.rows} row(s) to {result.table}: new snapshot {result.snapshot_id}"
        f" (previous {result.previous_snapshot_id if result.previous_snapshot_id is not None else 'none'})."
    )


# --- restore_table ------------------------------------------------------------------------------


class RestoreTableArgs(ToolArgs):
    table: str = Field(min_length=1, max_length=256, description=TABLE_DESCRIPTION)
    snapshot_id: SnapshotId = Field(description="Snapshot to make current again, from describe_dataset's versions.")


class RestoreResult(ToolResult):
    table: str
    snapshot_id: SnapshotId = Field(description="The table's current snapshot now.")
    previous_snapshot_id: SnapshotId | None = Field(description="The snapshot that was current before.")
    changed: bool = Field(description="False when the snapshot was already current.")


def restore_table(scope: ToolScope, args: RestoreTableArgs) -> RestoreResult:
    outcome = scope.restore_table(args.table, args.snapshot_id)
    return RestoreResult(
        table=args.table,
        snapshot_id=outcome.snapshot_id,
        previous_snapshot_id=outcome.previous_snapshot_id,
        changed=outcome.changed,
    )


def render_restore(result: RestoreResult) -> str:
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
)
