"""Staged changes: appends that wait on an Iceberg branch until a person approves them.

A staged append writes its rows to a branch of the table, `lakegate-change-<id>`, made from main's
current snapshot; main does not change. What the change is (who asked, when, how many rows, which
rule, its status) is kept in a table property, `lakegate.change.<id>`, so that it lives in the
catalog with the table: every replica of the production profile sees the same changes, and a
decision is one Iceberg commit.

Deciding (`decide`), in one commit:
- approve: main fast-forwards to the branch when main has not moved since the change was staged,
  otherwise the staged data files are committed on top of main (one new snapshot); the branch
  becomes the tag `lakegate-approved-<id>`, which keeps its history;
- reject or expire: the branch is removed.
The property records the decision either way. Applied exactly once: the commit asserts main's
snapshot, so of two approvals at the same time one commits and the other, reloading, finds the
change decided.

Policy (who may stage, who may decide) is not decided here: the gate's scope does that first.
"""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Literal

import structlog

from lakegate.catalog.change_snapshots import CHANGE_PROPERTY_PREFIX, STAGED_CHANGE_PROPERTY
from lakegate.catalog.iceberg_writes import (
    WRITE_ID_PROPERTY,
    PreparedAppend,
    restore_target,
    retryable_commit_error,
)
from lakegate.catalog.warehouse import Warehouse, translate_errors
from lakegate.errors import BackendError, InvalidArgument, LakegateError, LimitExceeded, NotFound

if TYPE_CHECKING:
    import pyarrow as pa
    from pyiceberg.table import Table as IcebergTable

__all__ = [
    "ChangeStatus",
    "StagedChange",
    "decide",
    "expire_due",
    "find_change",
    "list_changes",
    "stage_append",
    "stage_restore",
]

log = structlog.get_logger(__name__)

ChangeStatus = Literal["pending", "approved", "rejected", "expired"]

BRANCH_PREFIX = "lakegate-change-"
APPROVED_TAG_PREFIX = "lakegate-approved-"
#: Snapshot summary property of the snapshot that applied a change on top of a moved main.
CHANGE_ID_PROPERTY = "lakegate.change-id"
ATTEMPTS = 8
#: An approval still unapplied this long after its decision stopped (its process died): the next
#: decision on the change finishes it.
STALLED_APPLY_S = 300


@dataclass(frozen=True)
class StagedChange:
    """One staged append, as its table property records it."""

    change_id: str
    table: str
    status: ChangeStatus
    requested_by: str
    requested_at: str  # ISO 8601, UTC
    expires_at: str
    rows: int
    base_snapshot_id: int  # main's snapshot when it was staged
    reason: str = ""
    kind: Literal["append", "restore"] = "append"
    #: a restore's: the snapshot main is to be set to (the branch points at it meanwhile)
    target_snapshot_id: int | None = None
    #: approved by moving main to the staged snapshot (main had not moved since it was staged)
    fast_forward: bool = False
    decided_by: str | None = None
    decided_at: str | None = None
    #: main's snapshot that holds the rows (approved changes only; found in main's history).
    applied_snapshot_id: int | None = None
    #: the branch's (or, once approved, the tag's) snapshot holding the staged rows.
    staged_snapshot_id: int | None = None

    @property
    def branch(self) -> str:
        return BRANCH_PREFIX + self.change_id

    def expired(self, now: datetime) -> bool:
        return self.status == "pending" and now >= datetime.fromisoformat(self.expires_at)

    def _stored(self) -> str:
        kept = {k: v for k, v in asdict(self).items() if k not in ("applied_snapshot_id", "staged_snapshot_id")}
        return json.dumps(kept, separators=(",", ":"), sort_keys=True)


def _now() -> datetime:
    return datetime.now(UTC)


def stage_append(
    warehouse: Warehouse,
    prepared: PreparedAppend,
    *,
    requested_by: str,
    reason: str,
    expire_after_s: float,
) -> StagedChange:
    """Write a prepared batch to a new branch of its table, leaving main as it is.

    Raises:
        InvalidArgument: the table has no snapshot to branch from yet.
        LimitExceeded: other writers committed first on every attempt; nothing was staged.
        NotFound: the table was dropped meanwhile.
        BackendError: pyiceberg failed otherwise.
    """

    data = prepared.batch()
    name = prepared.name
    asked = _asked(name, requested_by, reason, expire_after_s)
    for _ in _attempts(name):
        table = warehouse.iceberg_table(name)
        base = table.metadata.current_snapshot_id
        if base is None:
            raise InvalidArgument(
                f"{name} has no snapshot yet, so a change to it cannot be staged for approval.",
                hint="Ask a data steward to load its first rows.",
            )
        change = replace(asked, rows=prepared.rows, base_snapshot_id=base)
        if _record(table, change, branch_at=base):
            break
    try:
        _append_to_branch(warehouse, change, data)
    except Exception:
        _discard(warehouse, name, change)
        raise
    staged = warehouse.iceberg_table(name).metadata.refs[change.branch].snapshot_id
    log.info("change.staged", table=name, change_id=change.change_id, rows=prepared.rows)
    return replace(change, staged_snapshot_id=staged)


def stage_restore(
    warehouse: Warehouse,
    name: str,
    snapshot_id: int,
    *,
    requested_by: str,
    reason: str,
    expire_after_s: float,
) -> StagedChange | None:
    """Record a restore of table `name` to `snapshot_id` for approval (a branch points at the
    target meanwhile); None when the snapshot is current already (nothing to approve).

    Raises:
        NotFound: no such table, or the snapshot is not one of this table's.
        InvalidArgument: a Lance dataset.
        LimitExceeded: other writers committed first on every attempt; nothing was staged.
    """

    asked = _asked(name, requested_by, reason, expire_after_s)
    now = datetime.fromisoformat(asked.requested_at)
    for _ in _attempts(name):
        table = restore_target(warehouse, name, snapshot_id)
        base = table.metadata.current_snapshot_id
        if base is None or base == snapshot_id:
            return None
        for key in table.properties:
            if key.startswith(CHANGE_PROPERTY_PREFIX):
                earlier = _read(table, name, key.removeprefix(CHANGE_PROPERTY_PREFIX))
                same = (earlier.kind, earlier.target_snapshot_id, earlier.base_snapshot_id, earlier.requested_by)
                if (
                    earlier.status == "pending"
                    and not earlier.expired(now)
                    and same == ("restore", snapshot_id, base, requested_by)
                ):
                    return earlier  # asked again: the same change (restore_table is idempotent)
        change = replace(asked, base_snapshot_id=base, kind="restore", target_snapshot_id=snapshot_id)
        if _record(table, change, branch_at=snapshot_id):
            log.info("change.staged", table=name, change_id=change.change_id, restore_to=snapshot_id)
            return replace(change, staged_snapshot_id=snapshot_id)
    raise AssertionError("unreachable: _attempts raises when every attempt lost")


def _asked(table: str, requested_by: str, reason: str, expire_after_s: float) -> StagedChange:
    """A new pending change to `table`, asked now; the caller sets what it holds and its base snapshot."""
    now = _now()
    return StagedChange(
        change_id=uuid.uuid4().hex[:16],
        table=table,
        status="pending",
        requested_by=requested_by,
        requested_at=now.isoformat(),
        expires_at=(now + timedelta(seconds=expire_after_s)).isoformat(),
        rows=0,
        base_snapshot_id=0,
        reason=reason,
    )


def _record(table: IcebergTable, change: StagedChange, *, branch_at: int) -> bool:
    """One commit: the change's record (a table property) and its branch at `branch_at`. False when
    the commit lost a race with another writer (nothing was written)."""
    from pyiceberg.table.update.snapshot import ManageSnapshots

    action = f"stage change {change.change_id} to {change.table}"
    with translate_errors(action, change.table), _lost_race() as lost, table.transaction() as tx:
        tx.set_properties({CHANGE_PROPERTY_PREFIX + change.change_id: change._stored()})
        ManageSnapshots(tx).create_branch(branch_at, change.branch).commit()
    return not lost


def _append_to_branch(warehouse: Warehouse, change: StagedChange, data: pa.Table) -> None:
    """Append the staged rows to the change's branch, retrying commits that lose a race with other
    writers; an attempt whose outcome was unknown is found on the branch, not written twice.

    Raises:
        LimitExceeded: every attempt lost; BackendError: pyiceberg failed otherwise.
    """
    name = change.table
    for _ in _attempts(name):
        table = warehouse.iceberg_table(name)
        head = table.metadata.snapshot_by_id(table.metadata.refs[change.branch].snapshot_id)
        if (
            head is not None
            and head.summary is not None
            and head.summary.get(STAGED_CHANGE_PROPERTY) == change.change_id
        ):
            return
        try:
            table.append(data, branch=change.branch, snapshot_properties={STAGED_CHANGE_PROPERTY: change.change_id})
        except Exception as exc:
            if retryable_commit_error(exc):
                continue
            with translate_errors(f"stage rows on a branch of {name}", name):
                raise
        return


def decide(
    warehouse: Warehouse, name: str, change_id: str, *, approve: bool, by: str, now: datetime | None = None
) -> StagedChange:
    """Approve (apply to main) or reject a pending change; an expired one is expired instead.

    Raises:
        NotFound: no such change on this table.
        InvalidArgument: the change was already decided, or has expired (it is expired now).
        LimitExceeded: other writers committed first on every attempt; nothing was decided.
        BackendError: pyiceberg failed otherwise.
    """
    now = now or _now()
    for _ in _attempts(name):
        table = warehouse.iceberg_table(name)
        change = _read(table, name, change_id)
        if _unfinished(change, now):
            # Claimed by an approval that stopped before applying its rows (a crash): finish it.
            return _apply_staged(warehouse, name, change)
        if change.status != "pending":
            raise InvalidArgument(
                f"Change {change_id} was already {change.status}"
                + (f" by {change.decided_by} at {change.decided_at}." if change.decided_by else "."),
                hint="`lakegate changes list` shows the changes still pending.",
            )
        expired = change.expired(now)
        status: ChangeStatus = "expired" if expired else ("approved" if approve else "rejected")
        fast_forward = status == "approved" and table.metadata.current_snapshot_id == change.base_snapshot_id
        if status == "approved" and change.kind == "restore" and not fast_forward:
            raise InvalidArgument(
                f"{name} changed since the restore in change {change_id} was requested (it was at snapshot "
                f"{change.base_snapshot_id}, now {table.metadata.current_snapshot_id}): approving it would undo "
                "those later changes unseen. Nothing was changed.",
                hint="Reject it; the requester may ask for the restore again.",
            )
        decided = replace(
            change,
            status=status,
            decided_by=None if expired else by,
            decided_at=now.isoformat(),
            fast_forward=fast_forward,
        )
        with translate_errors(f"decide change {change_id} to {name}", name), _lost_race() as lost:
            _commit_decision(table, decided)
        if lost:
            continue
        log.info("change.decided", table=name, change_id=change_id, status=status, by=by)
        if expired:
            raise InvalidArgument(
                f"Change {change_id} expired at {change.expires_at}; its rows were discarded.",
                hint="Ask the agent (or its owner) to send the rows again.",
            )
        if status == "approved" and not fast_forward:
            return _apply_staged(warehouse, name, decided)
        return _read(warehouse.iceberg_table(name), name, change_id)
    raise AssertionError("unreachable: _attempts raises when every attempt lost")


def _commit_decision(table: IcebergTable, decided: StagedChange) -> None:
    """The decision, in one commit of references and properties only: the property records it, the
    branch is removed (an approved change's becomes a tag), and main fast-forwards to the staged
    snapshot when it has not moved. The commit asserts the branch and main as they were read, so
    of two decisions at the same time exactly one commits. (No snapshot is made here: pyiceberg
    rebuilds a transaction that makes one when it retries, and drops those assertions.)"""
    from pyiceberg.table.update.snapshot import ManageSnapshots

    head = table.metadata.refs[decided.branch].snapshot_id
    with table.transaction() as tx:
        tx.set_properties({CHANGE_PROPERTY_PREFIX + decided.change_id: decided._stored()})
        refs = ManageSnapshots(tx)
        if decided.fast_forward:
            refs.set_current_snapshot(snapshot_id=head)
        refs.remove_branch(decided.branch)
        if decided.status == "approved":
            refs.create_tag(head, APPROVED_TAG_PREFIX + decided.change_id)
        refs.commit()


def _unfinished(change: StagedChange, now: datetime) -> bool:
    """An approval that committed its decision, not its rows, and has been still for a while."""
    if change.status != "approved" or change.fast_forward or change.applied_snapshot_id is not None:
        return False
    decided = datetime.fromisoformat(change.decided_at) if change.decided_at else now
    return now - decided > timedelta(seconds=STALLED_APPLY_S)


def _apply_staged(warehouse: Warehouse, name: str, change: StagedChange) -> StagedChange:
    """Commit the staged data files of an approved change on top of main (main moved since it was
    staged), exactly once: the snapshot carries the change id, looked for before every attempt."""
    head = change.staged_snapshot_id
    if head is None:
        raise BackendError(f"change {change.change_id} to {name} is approved but its staged snapshot is gone")
    props = {CHANGE_ID_PROPERTY: change.change_id, WRITE_ID_PROPERTY: change.change_id}
    for _ in _attempts(name):
        table = warehouse.iceberg_table(name)
        if _applied_snapshot(table, change.change_id) is not None:
            break
        with (
            translate_errors(f"apply change {change.change_id} to {name}", name),
            _lost_race() as lost,
            table.transaction() as tx,
            tx.update_snapshot(snapshot_properties=props).fast_append() as append,
        ):
            for data_file in _staged_files(table, head):
                append.append_data_file(data_file)
        if not lost:
            break
    return _read(warehouse.iceberg_table(name), name, change.change_id)


def _staged_files(table: IcebergTable, snapshot_id: int) -> list[Any]:
    """The data files the staged snapshot added."""
    snapshot = table.metadata.snapshot_by_id(snapshot_id)
    assert snapshot is not None
    return [
        entry.data_file
        for manifest in snapshot.manifests(table.io)
        for entry in manifest.fetch_manifest_entry(table.io, discard_deleted=True)
        if entry.snapshot_id == snapshot_id
    ]


def expire_due(
    warehouse: Warehouse, changes: Sequence[StagedChange], now: datetime | None = None
) -> list[StagedChange]:
    """`changes` as they stand once every pending one past its time is expired (its branch removed)."""
    now = now or _now()
    current = []
    for change in changes:
        if change.expired(now):
            # Expiring raises InvalidArgument by design (as it would to an approver); so does a
            # decision someone made meanwhile. Reading the change again says which happened.
            with contextlib.suppress(InvalidArgument):
                decide(warehouse, change.table, change.change_id, approve=False, by="lakegate", now=now)
            change = _read(warehouse.iceberg_table(change.table), change.table, change.change_id)
        current.append(change)
    return current


def list_changes(warehouse: Warehouse) -> list[StagedChange]:
    """Every change of every Iceberg table, oldest request first."""
    changes = []
    for name, table in _writable_tables(warehouse):
        for key in table.properties:
            if key.startswith(CHANGE_PROPERTY_PREFIX):
                changes.append(_read(table, name, key.removeprefix(CHANGE_PROPERTY_PREFIX)))
    return sorted(changes, key=lambda change: change.requested_at)


def _writable_tables(warehouse: Warehouse) -> Iterator[tuple[str, IcebergTable]]:
    """The Iceberg tables a change can be staged on: not those of catalogs attached read-only."""
    for name in warehouse.iceberg_table_names():
        attached = warehouse.attached_catalog(name)
        if attached is not None and not attached.spec.writable:
            continue
        try:
            yield name, warehouse.iceberg_table(name)
        except LakegateError:
            log.warning("change.table_unreadable", table=name)  # one broken table hides only its own changes


def find_change(warehouse: Warehouse, change_id: str) -> StagedChange:
    """The change with this id, on whichever table (read at the first table that holds it).

    Raises:
        NotFound: there is none.
    """
    for name, table in _writable_tables(warehouse):
        if CHANGE_PROPERTY_PREFIX + change_id in table.properties:
            return _read(table, name, change_id)
    raise NotFound(
        f"There is no change {change_id}.", hint="Use the change_id that append_rows returned when it staged the rows."
    )


def _read(table: IcebergTable, name: str, change_id: str) -> StagedChange:
    stored = table.properties.get(CHANGE_PROPERTY_PREFIX + change_id)
    if stored is None:
        raise NotFound(f"There is no change {change_id} to {name}.")
    change = StagedChange(**json.loads(stored))
    refs = table.metadata.refs
    ref = refs.get(change.branch) or refs.get(APPROVED_TAG_PREFIX + change_id)
    applied = None
    if change.status == "approved":
        applied = change.target_snapshot_id if change.kind == "restore" else _applied_snapshot(table, change_id)
    return replace(change, staged_snapshot_id=ref.snapshot_id if ref else None, applied_snapshot_id=applied)


def _applied_snapshot(table: IcebergTable, change_id: str) -> int | None:
    """main's snapshot that brought the change's rows in (walking main's history back)."""
    snapshot = table.metadata.current_snapshot()
    while snapshot is not None:
        summary = snapshot.summary
        if summary is not None and change_id in (summary.get(CHANGE_ID_PROPERTY), summary.get(STAGED_CHANGE_PROPERTY)):
            return snapshot.snapshot_id
        parent = snapshot.parent_snapshot_id
        snapshot = table.metadata.snapshot_by_id(parent) if parent is not None else None
    return None


def _discard(warehouse: Warehouse, name: str, change: StagedChange) -> None:
    """Best effort: take back a change whose rows could not be staged."""
    from pyiceberg.table.update.snapshot import ManageSnapshots

    try:
        table = warehouse.iceberg_table(name)
        with table.transaction() as tx:
            tx.remove_properties(CHANGE_PROPERTY_PREFIX + change.change_id)
            if change.branch in table.metadata.refs:
                ManageSnapshots(tx).remove_branch(change.branch).commit()
    except Exception:
        log.exception("change.discard_failed", table=name, change_id=change.change_id)


@contextmanager
def _lost_race() -> Iterator[list[bool]]:
    """Yields a list that is non-empty after the block when its commit lost to another writer
    (then nothing was written, and the caller tries again)."""
    from pyiceberg.exceptions import CommitFailedException

    lost: list[bool] = []
    try:
        yield lost
    except CommitFailedException:
        lost.append(True)


def _attempts(name: str) -> Iterator[int]:
    """Attempt numbers with a growing pause between them; raises LimitExceeded after the last."""
    for attempt in range(ATTEMPTS):
        if attempt:
            time.sleep(min(0.5, 0.02 * 2**attempt))
        yield attempt
    raise LimitExceeded(
        f"Nothing was changed on {name}: other writers committed first on all {ATTEMPTS} attempts.",
        hint="Try again in a moment.",
    )
