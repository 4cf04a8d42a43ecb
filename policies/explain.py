"""The policy set as it applies to one subject, with the rules that decide: what explanations stand on.

explain_access (the tool) and `lakegate policy explain` (the CLI) build their answers on a
`SubjectPolicy`, which asks the enforcer exactly the questions the gate asks during a call (the
decision, the column access in the SQL guard's order, the row filters), so that an explanation is
the gate's own answer and never a second reading of the rules.

Anyone's access may be explained from the CLI (the governance team owns the files). Through the
gate, explaining another principal's access takes the caller's own decision on `EXPLAIN_OTHERS`
(action `call`): the policy of others is itself something a caller may not be entitled to see.
"""

from __future__ import annotations

from dataclasses import dataclass

from lakegate.policies.columns import AccessLevel, column_access
from lakegate.policies.enforcer import Decision, PolicyEnforcer
from lakegate.policies.row_filters import RowFilter

__all__ = ["EXPLAIN_OTHERS", "MASK_USES", "ColumnRuling", "SubjectPolicy"]

#: The object whose `call` decision lets a caller explain another principal's access.
EXPLAIN_OTHERS = "explain:others"

#: What a reader can still do with a column read through each mask (policies/masks.py).
MASK_USES: dict[str, str] = {
    "partial": "readable with all but the last 4 characters starred: enough to confirm a value given to you",
    "hash": "readable as a keyed hash: grouping, counting distinct values and joins work (the hash is stable), "
    "the real values are never shown",
    "redact": "readable only as '[redacted]': counting values and testing for NULL work, nothing more",
    "null": "readable only as NULL (still listed by SELECT *, without values)",
}


@dataclass(frozen=True)
class ColumnRuling:
    """How a subject reads one column, and the decisions that made it so.

    `decisions` holds the clear `read` decision, then, for a masked column, the mask's allow.
    """

    column: str
    access: AccessLevel
    mask: str | None
    decisions: tuple[Decision, ...]

    @property
    def label(self) -> str:
        """The access as policies/intent.yaml spells it: clear, masked:<method> or hidden."""
        return f"masked:{self.mask}" if self.access == "masked" else self.access

    @property
    def rule_text(self) -> str:
        """The deciding rules, in the order they were applied."""
        return "; ".join(decision.rule_text for decision in self.decisions)


class SubjectPolicy:
    """Decisions of one policy set for one subject (a principal, or a role such as "role:analyst")."""

    def __init__(self, enforcer: PolicyEnforcer, subject: str) -> None:
        self._enforcer = enforcer
        self.subject = subject

    @property
    def roles(self) -> tuple[str, ...]:
        """Every role the subject holds, directly or through inheritance."""
        return self._enforcer.roles_for(self.subject)

    @property
    def version(self) -> str:
        """The content hash of the policy set the decisions come from."""
        return self._enforcer.version

    def decide(self, obj: str, action: str) -> Decision:
        """The decision on one request (never raises: a failure is a denial saying why)."""
        return self._enforcer.decide(self.subject, obj, action)

    def column(self, column: str) -> ColumnRuling:
        """How the subject reads the fully qualified `column`, as the SQL guard would apply it."""
        access = column_access(self._enforcer, self.subject, column)
        clear = self.decide(column, "read")
        decisions = (clear,) if access.access != "masked" else (clear, access.decision)
        return ColumnRuling(column, access.access, access.mask, decisions)

    def row_filters(self, dataset: str) -> list[RowFilter]:
        """The row filters on `dataset` for the subject: its own and those of every role it holds."""
        return self._enforcer.row_filters(self.subject, dataset)
