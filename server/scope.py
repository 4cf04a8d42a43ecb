"""The gate's face inside one tool call.

A tool handler receives a `CallScope` and nothing else: no engine, no transport, no audit log. Every
read goes through a scope method that takes the Casbin decision first and records what was touched,
so that the audit record built after the call lists each resource with its version and access.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from catalog.definitions import CatalogDefinitions, DatasetDoc
from catalog.warehouse import DatasetInfo, Warehouse
from policies.columns import ColumnAccess, column_access
from policies.enforcer import Decision, PolicyEnforcer
from server.errors import NotFound, PolicyDenied
from server.identity import Principal
from server.settings import Settings

__all__ = ["CallScope", "ProgressFn", "Touched"]

ProgressFn = Callable[[float, float | None, str | None], None]


@dataclass(frozen=True)
class Touched:
    """One resource a call touched, as the audit record lists it."""

    type: str
    name: str
    access: str
    version: int | None = None

    def as_record(self) -> dict[str, Any]:
        return {"type": self.type, "name": self.name, "access": self.access, "version": self.version}


class CallScope:
    """Authorised access to lakegate's data for one call by one principal."""

    def __init__(
        self,
        principal: Principal,
        enforcer: PolicyEnforcer,
        warehouse: Warehouse,
        definitions: CatalogDefinitions,
        settings: Settings,
        progress: ProgressFn | None = None,
    ) -> None:
        self.principal = principal
        self.settings = settings
        self.limits = settings.limits
        self.definitions = definitions
        self._enforcer = enforcer
        self._warehouse = warehouse
        self._progress = progress
        self.touched: list[Touched] = []
        self.rules: list[tuple[str, ...]] = []
        self.rows = 0
        #: Call-specific facts for the audit record (the rewritten SQL, snapshots written, ...).
        self.details: dict[str, Any] = {}
        self._on_cancel: list[Callable[[], None]] = []
        self.cancelled = False

    # --- decisions -----------------------------------------------------------------------------

    def decide(self, obj: str, action: str) -> Decision:
        """Ask the policy without failing; the deciding rule is kept for the audit record."""
        decision = self._enforcer.decide(self.principal.name, obj, action)
        if decision.rule and decision.rule not in self.rules:
            self.rules.append(decision.rule)
        return decision

    def require(self, obj: str, action: str, *, kind: str) -> Decision:
        """Take the decision and raise PolicyDenied when it is a denial.

        Raises:
            PolicyDenied: the policy does not allow it (the message names the resource and the rule).
        """
        decision = self.decide(obj, action)
        if not decision.allowed:
            self.touched.append(Touched(kind, obj, "denied"))
            raise PolicyDenied(
                f"Principal '{self.principal.name}' may not {action} {kind} '{obj}' ({decision.rule_text}).",
                hint="Call list_datasets to see what you can use, or ask a data steward for access.",
                rule=list(decision.rule),
            )
        return decision

    def columns(self, dataset: str, names: list[str]) -> list[ColumnAccess]:
        """Column-level access (clear, masked, hidden) for columns of a dataset."""
        accesses = []
        for name in names:
            access = column_access(self._enforcer, self.principal.name, f"{dataset}.{name}")
            if access.decision.rule and access.decision.rule not in self.rules:
                self.rules.append(access.decision.rule)
            accesses.append(access)
        return accesses

    # --- catalog reads -------------------------------------------------------------------------

    def readable_datasets(self) -> list[str]:
        """Names of the datasets this principal may read (and so may see)."""
        names = self._warehouse.dataset_names()
        return [name for name in names if self._enforcer.decide(self.principal.name, name, "read").allowed]

    def dataset(self, name: str) -> tuple[DatasetInfo, DatasetDoc | None]:
        """A dataset's live metadata and its documentation, after a read decision.

        An unknown dataset and a dataset the caller may not read give the same NotFound, so that
        names of hidden datasets do not leak.

        Raises:
            NotFound: no such dataset, or not one this principal may read.
        """
        if not self.decide(name, "read").allowed:
            self.touched.append(Touched("dataset", name, "denied"))
            raise NotFound(
                f"No dataset named '{name}' is available to you.",
                hint="Call list_datasets to see the datasets you can use.",
            )
        info = self._warehouse.describe(name)
        self.touched.append(Touched("dataset", name, "metadata", info.current_version))
        return info, self.definitions.dataset(name)

    def record(self, kind: str, name: str, access: str, version: int | None = None) -> None:
        """Note a resource the call touched (for the audit record)."""
        self.touched.append(Touched(kind, name, access, version))

    def on_cancel(self, callback: Callable[[], None]) -> None:
        """Run `callback` if the client cancels the call (it interrupts a running engine)."""
        self._on_cancel.append(callback)
        if self.cancelled:
            callback()

    def cancel(self) -> None:
        """The client cancelled the call: stop the work in flight."""
        self.cancelled = True
        for callback in self._on_cancel:
            callback()

    def report_progress(self, done: float, total: float | None = None, message: str | None = None) -> None:
        """Send an MCP progress notification when the client asked for them."""
        if self._progress is not None:
            self._progress(done, total, message)
