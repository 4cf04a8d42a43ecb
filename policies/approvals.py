"""Approvals: which writes a person must approve before they land, from policies/approvals.yaml.

A rule names whose appends (a principal or a role), on which datasets (patterns as in the Casbin
rules: `support.*`), and above how many rows (this append's, with the principal's appends to the
dataset in the rule's window before it), are staged instead of applied: the rows go to an
Iceberg branch of the table, and the agent gets a change id with status `pending`
(catalog/staged_changes.py). Who may decide is the Casbin policy's: action `approve` on the dataset
(`p, role:data_steward, support.*, approve, allow`); nobody may decide a change they requested.

The file is part of the policy set: versioned, reloaded, and an invalid file fails closed (the
enforcer then denies everything). With no file, no write needs approval.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from lakegate.policies.policy_file import read_policy_file

__all__ = ["APPROVALS_FILE", "ApprovalRule", "ApprovalRules", "load_approvals"]

APPROVALS_FILE = "approvals.yaml"


class _Rule(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    subject: str = Field(min_length=1)
    datasets: tuple[str, ...] = ("*",)
    operations: tuple[Literal["append", "restore"], ...] = ("append",)
    above_rows: int = Field(default=0, ge=0)  # appends of more rows than this need approval
    window_minutes: float = Field(default=60, ge=0, le=7 * 24 * 60)  # counting the principal's earlier appends
    reason: str = ""


class _File(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    expire_after_hours: float = Field(default=72, gt=0, le=24 * 365)
    rules: tuple[_Rule, ...] = ()


@dataclass(frozen=True)
class ApprovalRule:
    """The rule that sends a write for approval: whose, on which datasets, above how many rows, why."""

    subject: str
    datasets: tuple[str, ...]
    above_rows: int
    window_s: float
    reason: str
    operations: tuple[str, ...] = ("append",)

    def covers(self, subjects: Collection[str], dataset: str) -> bool:
        return self.subject in subjects and any(fnmatch.fnmatchcase(dataset, pattern) for pattern in self.datasets)


class ApprovalRules:
    """Every approval rule, and how long a staged change waits for a decision."""

    def __init__(self, rules: tuple[ApprovalRule, ...] = (), expire_after_hours: float = 72) -> None:
        self.rules = rules
        self.expire_after_s = expire_after_hours * 3600

    def for_append(
        self, principal: str, roles: Collection[str], dataset: str, rows: int, earlier: Callable[[float], int]
    ) -> ApprovalRule | None:
        """The first rule that sends this append for approval, or None (it is applied at once).

        A rule counts this append's rows with those the principal appended to the dataset, without
        approval, in the rule's window before now (`earlier(window_s)`): splitting a bulk change
        into small calls does not get it past a person.
        """
        subjects = {principal, *roles}
        for rule in self.rules:
            if "append" in rule.operations and rule.covers(subjects, dataset):
                before = earlier(rule.window_s) if rule.window_s and rows <= rule.above_rows else 0
                if rows + before > rule.above_rows:
                    return rule
        return None

    def for_restore(self, principal: str, roles: Collection[str], dataset: str) -> ApprovalRule | None:
        """The first rule that sends a restore of `dataset` by this caller for approval, or None."""
        subjects = {principal, *roles}
        return next((r for r in self.rules if "restore" in r.operations and r.covers(subjects, dataset)), None)


def load_approvals(path: Path | None) -> ApprovalRules:
    """Read an approvals file; no file means no approvals.

    Raises:
        ValueError: the file is not YAML or does not match the schema (the message says where).
    """
    parsed = read_policy_file(path, _File)
    if parsed is None:
        return ApprovalRules()
    rules = tuple(
        ApprovalRule(r.subject, r.datasets, r.above_rows, r.window_minutes * 60, r.reason, r.operations)
        for r in parsed.rules
    )
    return ApprovalRules(rules, parsed.expire_after_hours)
