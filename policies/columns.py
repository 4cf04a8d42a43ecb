"""Column policy: for each column, may this subject read it in clear, through a mask, or not at all?

The Casbin rules decide; this module only asks the questions in a fixed order. A column nobody has
reviewed, in a scope where that hides it (policies/column_review.py), is hidden first. A `read`
allow means clear. Otherwise the first allowed `mask:<method>` (most informative first) means masked.
Otherwise the column is hidden. The SQL guard (governed queries) applies the same decisions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from lakegate.policies.column_review import COLUMN_REVIEW_FILE, REVIEW_ACTION
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


def column_access(enforcer: PolicyEnforcer, subject: str, column: str, *, field_id: int | None = None) -> ColumnAccess:
    """How `subject` may read the fully qualified `column` ("sales.customers.email").

    A column in a scope of policies/column_review.yaml that nobody has reviewed is hidden, whatever
    the rules say, from all but the principals allowed to review its dataset. A review names the
    Iceberg field it looked at (`field_id`): a column renamed upstream into a reviewed name is
    another field, and is not reviewed.
    """
    review = enforcer.column_review
    if review.in_scope(column) and not review.is_reviewed(column, field_id) and column not in enforcer.tagged_columns:
        dataset = column.rsplit(".", 1)[0]
        if not enforcer.decide(subject, dataset, REVIEW_ACTION).allowed:
            unreviewed = Decision(
                False,
                subject,
                column,
                "read",
                rule=(f"{COLUMN_REVIEW_FILE}: hide_unreviewed",),
                reason="nobody has reviewed this column yet",
            )
            return ColumnAccess(column, "hidden", None, unreviewed)
    clear = enforcer.decide(subject, column, "read")
    if clear.allowed:
        return ColumnAccess(column, "clear", None, clear)
    for method in MASK_METHODS:
        masked = enforcer.decide(subject, column, f"mask:{method}")
        if masked.allowed:
            return ColumnAccess(column, "masked", method, masked)
    return ColumnAccess(column, "hidden", None, clear)
