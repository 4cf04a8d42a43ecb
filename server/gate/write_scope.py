"""The call scope's writes: appends (applied, or staged for a person's approval), loads and
registrations of tables, restores, and the decisions on staged changes.

`CallScope` (server/gate/scope.py) is a `WriteScope`: these methods use its decisions and its audit
notes like every read does. The order is the reads': the dataset decision, then one per column a
row sets, and only then does the storage layer touch the table; the audit record gets the
snapshots before and after.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from lakegate.catalog.file_loader import (
    LoadMode,
    LoadOutcome,
    ReadFiles,
    fit_to_table,
    table_columns,
    write_loaded,
)
from lakegate.catalog.iceberg_writes import (
    AppendOutcome,
    PreparedAppend,
    RestoreOutcome,
    commit_append,
    prepare_append,
    register_table,
    restore_snapshot,
    rows_appended_since,
)
from lakegate.catalog.staged_changes import (
    StagedChange,
    decide,
    expire_due,
    find_change,
    list_changes,
    stage_append,
    stage_restore,
)
from lakegate.catalog.warehouse import Warehouse
from lakegate.errors import InvalidArgument, LimitExceeded, NotFound, PolicyDenied
from lakegate.policies.enforcer import Decision, PolicyEnforcer
from lakegate.policies.resources import column_resource
from lakegate.server.gate.identity import Principal
from lakegate.server.gate.touched import Touched
from lakegate.server.settings import Settings

if TYPE_CHECKING:
    from lakegate.policies.approvals import ApprovalRule

__all__ = ["WriteScope"]


class WriteScope:
    """The write methods of a call scope (a mixin of `CallScope`, which provides what is declared here)."""

    principal: Principal
    settings: Settings
    touched: list[Touched]
    rows: int
    details: dict[str, Any]
    _warehouse: Warehouse
    _enforcer: PolicyEnforcer

    if TYPE_CHECKING:

        def decide(self, obj: str, action: str) -> Decision: ...

        def record(self, kind: str, name: str, access: str, version: int | None = None) -> None: ...

        def roles(self) -> tuple[str, ...]: ...

    def _require_on_dataset(self, name: str, action: str) -> None:
        """Raises: NotFound when the caller may neither do `action` on nor read `name`; else PolicyDenied."""
        decision = self.decide(name, action)
        if decision.allowed:
            attached = self._warehouse.attached_catalog(name)
            if attached is not None and not attached.spec.writable:
                raise InvalidArgument(
                    f"{name} is in catalog {attached.name}, which lakegate attaches read-only: nothing was changed.",
                    hint="Change it with the tools of the system that owns that catalog, or ask the platform team "
                    "to set writable = true for it in lakegate.toml.",
                )
            if self._warehouse.attached_documents(name) is not None:
                raise InvalidArgument(
                    f"{name} is attached read-only: lakegate searches it but does not write to it.",
                    hint="Add documents to a dataset of lakegate's own, or ask the dataset's owner to add them.",
                )
            return
        self.touched.append(Touched("dataset", name, "denied"))
        if not self.decide(name, "read").allowed:
            # Same answer as for a missing dataset, so that names of hidden datasets do not leak.
            raise NotFound(
                f"No dataset named '{name}' is available to you.",
                hint="Call list_datasets to see the datasets you can use.",
            )
        raise PolicyDenied(
            f"Principal '{self.principal.name}' may not {action} dataset '{name}' ({decision.rule_text}).",
            hint="Ask a data steward for access; nothing was changed.",
            rule=list(decision.rule),
        )

    def append_rows(self, name: str, rows: Sequence[Mapping[str, Any]]) -> AppendOutcome | StagedChange:
        """Append `rows` to Iceberg table `name` as one snapshot, all or nothing; or, when an
        approval rule applies (policies/approvals.py), stage them on a branch for a person to decide.

        Raises:
            NotFound: no such dataset, or not one this principal may write or read.
            PolicyDenied: the principal may not write the dataset, or a column some row sets (named).
            LimitExceeded: more rows than `writes.max_rows`, or every commit attempt lost a race.
            InvalidArgument: some values do not fit the schema (each named by row and column).
            BackendError: pyiceberg failed.
        """
        self._require_on_dataset(name, "write")
        limit = self.settings.writes.max_rows
        if len(rows) > limit:
            raise LimitExceeded(
                f"append_rows takes at most {limit} rows per call; this call sent {len(rows)}. Nothing was written.",
                hint=f"Split the rows into batches of at most {limit} and send each batch in its own call.",
            )
        prepared = prepare_append(self._warehouse, name, rows)
        self._require_column_writes(name, prepared.columns_set)
        prepared.raise_if_invalid()

        earlier = self._appended_earlier(name)
        rule = self._enforcer.approvals.for_append(self.principal.name, self.roles(), name, prepared.rows, earlier)
        if rule is not None:
            return self._stage_append(prepared, rule)
        attempts = self.settings.writes.commit_attempts
        outcome = commit_append(self._warehouse, prepared, attempts=attempts, written_by=self.principal.name)
        self.record("dataset", name, "write", version=outcome.snapshot_id)
        self.rows = outcome.rows
        self.details.update(
            operation="append",
            table=name,
            snapshot_before=outcome.previous_snapshot_id,
            snapshot_after=outcome.snapshot_id,
            rows=outcome.rows,
            columns=list(prepared.columns_set),
            commit_attempts=outcome.attempts,
        )
        return outcome

    def _require_column_writes(self, name: str, columns: Sequence[str]) -> None:
        """Raises: PolicyDenied naming every column of `name` the caller may not set."""
        denied = []
        for column in columns:
            decision = self.decide(column_resource(name, column), "write")
            if not decision.allowed:
                denied.append((column, decision))
                self.touched.append(Touched("column", column_resource(name, column), "denied"))
        if denied:
            listed = ", ".join(column for column, _ in denied)
            raise PolicyDenied(
                f"Principal '{self.principal.name}' may not set column(s) {listed} of {name} "
                f"({denied[0][1].rule_text}). Nothing was written.",
                hint=f"Send the rows again without {listed} (omit them or send null), or ask a data steward.",
                rule=list(denied[0][1].rule),
            )

    def _appended_earlier(self, name: str) -> Callable[[float], int]:
        """Rows the caller appended to `name` in a window before now (for approval rules)."""

        def earlier(window_s: float) -> int:
            since = datetime.now(UTC) - timedelta(seconds=window_s)
            return rows_appended_since(self._warehouse, name, self.principal.name, since)

        return earlier

    def load_table(
        self, loaded: ReadFiles, name: str, *, mode: LoadMode, partition_by: Sequence[str]
    ) -> LoadOutcome | StagedChange:
        """Write rows read from files to Iceberg table `name` (create, append or replace), as a write
        of the caller's: `write` on the table and on every column the files set (replacing: on every
        column of the table, whose values it removes). An append that an approval rule matches is
        staged like append_rows'; a create or replace under such a rule is refused.

        Raises:
            NotFound / PolicyDenied: as for append_rows; a create or replace that needs approval.
            InvalidArgument: a name without a namespace, the table exists (create) or not (append,
                replace), or the rows do not fit it.
        """
        if name.count(".") < 1 or "" in name.split("."):
            raise InvalidArgument(f"{name!r} is not a table name.", hint="Name it namespace.table, e.g. sales.orders.")
        self._require_on_dataset(name, "write")
        self._require_column_writes(name, loaded.data.column_names)
        exists = name in self._warehouse.iceberg_table_names()
        if mode == "replace" and exists:
            self._require_column_writes(name, table_columns(self._warehouse, name))
        rows = loaded.data.num_rows
        # A table that does not exist yet has had nothing appended to it.
        earlier = self._appended_earlier(name) if exists else (lambda _window_s: 0)
        rule = self._enforcer.approvals.for_append(self.principal.name, self.roles(), name, rows, earlier)
        if rule is not None:
            if mode != "append" or not exists:
                raise PolicyDenied(
                    f"Writes by '{self.principal.name}' to {name} need a person's approval (policies/approvals.yaml, "
                    f"rule for {rule.subject}), and only an append to an existing table can wait for one.",
                    hint="Load with --append into an existing table (it is then staged for approval), or ask a "
                    "person allowed to write without approval.",
                )
            fitted = fit_to_table(self._warehouse, name, loaded.data)
            return self._stage_append(PreparedAppend(name, tuple(loaded.data.column_names), (), fitted, rows), rule)
        outcome = write_loaded(
            self._warehouse, name, loaded.data, mode=mode, partition_by=partition_by, written_by=self.principal.name
        )
        self.record("dataset", name, "write", version=outcome.snapshot_id)
        self.rows = outcome.rows
        self.details.update(
            operation=f"load_{mode}",
            table=name,
            files=list(loaded.files),
            rejected_rows=len(loaded.rejected),
            snapshot_before=outcome.previous_snapshot_id,
            snapshot_after=outcome.snapshot_id,
            rows=outcome.rows,
            partition_by=list(partition_by),
        )
        return outcome

    def register_table(self, name: str, metadata_location: str) -> int | None:
        """Add an existing Iceberg table to the catalog as `name` (action `write` on it).

        Raises:
            NotFound / PolicyDenied: the caller may not write `name`.
            InvalidArgument: `name` exists, or the metadata file cannot be read.
        """
        self._require_on_dataset(name, "write")
        snapshot = register_table(self._warehouse, name, metadata_location)
        self.record("dataset", name, "registered", version=snapshot)
        self.details.update(operation="register", table=name, snapshot_after=snapshot)
        return snapshot

    def _stage_append(self, prepared: PreparedAppend, rule: ApprovalRule) -> StagedChange:
        change = stage_append(
            self._warehouse,
            prepared,
            requested_by=self.principal.name,
            reason=rule.reason,
            expire_after_s=self._enforcer.approvals.expire_after_s,
        )
        self.record("dataset", change.table, "staged", version=change.staged_snapshot_id)
        self.rows = change.rows
        self.details.update(
            operation="append_staged",
            table=change.table,
            change_id=change.change_id,
            branch=change.branch,
            snapshot_before=change.base_snapshot_id,
            staged_snapshot=change.staged_snapshot_id,
            rows=change.rows,
            columns=list(prepared.columns_set),
            approval_rule=rule.subject,
        )
        return change

    # --- staged changes ---------------------------------------------------------------------------

    def change(self, change_id: str) -> StagedChange:
        """A staged change, for the principal that requested it or one that may decide it.

        Raises:
            NotFound: no such change, or one the caller may not see (the same answer).
        """
        try:
            change = find_change(self._warehouse, change_id)
        except NotFound:
            change = None
        if change is None or (
            change.requested_by != self.principal.name and not self.decide(change.table, "approve").allowed
        ):
            self.touched.append(Touched("change", change_id, "denied" if change else "missing"))
            raise NotFound(
                f"There is no change {change_id} that you can see.",
                hint="Use the change_id that append_rows returned when it staged your rows.",
            )
        if change.expired(datetime.now(UTC)):
            change = replace(change, status="expired")  # past its time; removed at the next listing
        self.record("change", change_id, "metadata")
        self.details.update(change_id=change_id, table=change.table, status=change.status)
        return change

    def changes_to_decide(self, include_decided: bool = False) -> list[StagedChange]:
        """The changes on datasets the caller may approve: pending ones (and decided ones when
        asked). Pending changes past their time are expired first (their branches removed)."""
        listed = list_changes(self._warehouse)
        current = expire_due(self._warehouse, listed)
        for before, now in zip(listed, current, strict=True):
            if now.status != before.status:
                self.record("change", now.change_id, now.status)
        found = [c for c in current if include_decided or c.status == "pending"]
        visible = [c for c in found if self.decide(c.table, "approve").allowed]
        self.rows = len(visible)
        return visible

    def decide_change(self, change_id: str, *, approve: bool) -> StagedChange:
        """Approve (apply to main) or reject a staged change, as a person with `approve` on its dataset.

        Raises:
            NotFound: no such change, or one on a dataset the caller may not read.
            PolicyDenied: the caller may not approve changes to the dataset, or requested this one.
            InvalidArgument: the change was already decided, or has expired.
        """
        hidden = NotFound(
            f"There is no change {change_id} that you can see.",
            hint="`lakegate changes list` shows the changes you may decide.",
        )
        try:
            change = find_change(self._warehouse, change_id)
        except NotFound:
            raise hidden from None
        if not self.decide(change.table, "read").allowed:
            # The same answer as for a missing change: the table's name is not the caller's to learn.
            self.touched.append(Touched("change", change_id, "denied"))
            raise hidden
        self._require_on_dataset(change.table, "approve")
        if change.requested_by == self.principal.name:
            self.touched.append(Touched("change", change_id, "denied"))
            raise PolicyDenied(
                f"Principal '{self.principal.name}' requested change {change_id}, and nobody may decide "
                "their own change.",
                hint="Ask another person with approve on the dataset to decide it.",
            )
        decided = decide(self._warehouse, change.table, change_id, approve=approve, by=self.principal.name)
        version = decided.applied_snapshot_id if approve else decided.staged_snapshot_id
        self.record("dataset", change.table, "approved" if approve else "rejected", version=version)
        self.details.update(
            operation="change_decided",
            change_id=change_id,
            table=change.table,
            decision=decided.status,
            requested_by=change.requested_by,
            requested_at=change.requested_at,
            rows=change.rows,
            snapshot_before=change.base_snapshot_id,
            snapshot_after=decided.applied_snapshot_id,
        )
        return decided

    def restore_table(self, name: str, snapshot_id: int) -> RestoreOutcome | StagedChange:
        """Make one of the table's earlier snapshots its current one (action `restore`); or, when an
        approval rule applies to the caller's restores of it, record the restore for a person to decide.

        Raises:
            NotFound: no such dataset or snapshot, or a dataset this principal may neither restore nor read.
            PolicyDenied: the principal may read but not restore the dataset.
            InvalidArgument: a Lance dataset, or the table changed meanwhile (nothing was changed).
            BackendError: pyiceberg failed.
        """
        self._require_on_dataset(name, "restore")
        rule = self._enforcer.approvals.for_restore(self.principal.name, self.roles(), name)
        if rule is not None:
            staged = stage_restore(
                self._warehouse,
                name,
                snapshot_id,
                requested_by=self.principal.name,
                reason=rule.reason,
                expire_after_s=self._enforcer.approvals.expire_after_s,
            )
            if staged is None:
                # Already the current snapshot: nothing to change (and no restore runs unapproved).
                outcome = RestoreOutcome(snapshot_id, snapshot_id, changed=False)
                self.record("dataset", name, "restore", version=snapshot_id)
                self.details.update(operation="restore", table=name, snapshot_after=snapshot_id, changed=False)
                return outcome
            self.record("dataset", name, "staged", version=snapshot_id)
            self.details.update(
                operation="restore_staged",
                table=name,
                change_id=staged.change_id,
                branch=staged.branch,
                snapshot_before=staged.base_snapshot_id,
                restore_to=snapshot_id,
                approval_rule=rule.subject,
            )
            return staged
        outcome = restore_snapshot(self._warehouse, name, snapshot_id)
        self.record("dataset", name, "restore", version=outcome.snapshot_id)
        self.details.update(
            operation="restore",
            table=name,
            snapshot_before=outcome.previous_snapshot_id,
            snapshot_after=outcome.snapshot_id,
            changed=outcome.changed,
        )
        return outcome
