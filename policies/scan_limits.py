"""Scan limits: how many bytes one query of a role (or a principal) may plan to read, from
policies/scan_limits.yaml.

The file is part of the policy set like the row filters: versioned with the Casbin files, reloaded
with them, and an invalid file fails closed (the enforcer then denies everything). A caller's
limit is its own entry when it has one (the most specific), else the most generous entry of the
roles it holds (a role grants an allowance; holding another role never takes one away); with no
entry, its queries are not capped.

The gate compares the limit with the Iceberg plan's bytes after pruning by the query's own
filters (policies/sql_filters.py), before anything runs.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ByteSize, ConfigDict, Field

from lakegate.policies.policy_file import read_policy_file

__all__ = ["SCAN_LIMITS_FILE", "ScanLimit", "ScanLimitSet", "load_scan_limits"]

SCAN_LIMITS_FILE = "scan_limits.yaml"


class _Entry(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    subject: str = Field(min_length=1)
    max_scan_bytes: ByteSize = Field(gt=0)  # "64MB", "1.5GiB" or a number of bytes
    reason: str = ""


class _File(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    limits: tuple[_Entry, ...] = ()


@dataclass(frozen=True)
class ScanLimit:
    """The most one query of `subject`'s may plan to read, in bytes of the columns it reads."""

    subject: str
    max_scan_bytes: int
    reason: str


class ScanLimitSet:
    """Every scan limit, looked up by a caller's principal and roles."""

    def __init__(self, limits: tuple[ScanLimit, ...] = ()) -> None:
        self.limits = limits

    def for_caller(self, principal: str, roles: Collection[str]) -> ScanLimit | None:
        """The principal's own limit, else the largest of its roles' limits, else None (no cap)."""
        own = [limit for limit in self.limits if limit.subject == principal]
        if own:
            return own[-1]
        granted = [limit for limit in self.limits if limit.subject in roles]
        return max(granted, key=lambda limit: limit.max_scan_bytes, default=None)


def load_scan_limits(path: Path | None) -> ScanLimitSet:
    """Read a scan limits file; no file means no limits.

    Raises:
        ValueError: the file is not YAML or does not match the schema (the message says where).
    """
    parsed = read_policy_file(path, _File)
    if parsed is None:
        return ScanLimitSet()
    return ScanLimitSet(tuple(ScanLimit(e.subject, int(e.max_scan_bytes), e.reason) for e in parsed.limits))
