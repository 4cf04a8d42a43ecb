"""Column policy: for each column, may this subject read it in clear, through a mask, or not at all?

The Casbin rules decide; this module only asks the questions in a fixed order. A `read` allow
means clear. Otherwise the first allowed `mask:<method>` (most informative first) means masked.
Otherwise the column is hidden. The SQL guard (governed queries) applies the same decisions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from lakegate.policies.enforcer import Decision, PolicyEnforcer

__all__ = ["MASK_METHODS", "ColumnAccess", "column_access"]

#: Masks in order of preference when several are allowed: the most useful view first.
MASK_METHODS: tuple[str, ...] = ("partial", "hash", "redact", "null")

AccessLevel = Literal["clear", "masked", "hidden"]


@dataclass(frozen=True)
class ColumnAccess:
    column: str
    access: AccessLevel
    mask: str | None
    decision: Decision

    @property
    def visible(self) -> bool:
        return self.access != "hidden"


def column_access(enforcer: PolicyEnforcer, subject: str, column: str) -> ColumnAccess:
    """How `subject` may read the fully qualified `column` ("sales.customers.email")."""
    clear = enforcer.decide(subject, column, "read")
    if clear.allowed:
        return ColumnAccess(column, "clear", None, clear)
    for method in MASK_METHODS:
        masked = enforcer.decide(subject, column, f"mask:{method}")
        if masked.allowed:
            return ColumnAccess(column, "masked", method, masked)
    return ColumnAccess(column, "hidden", None, clear)
