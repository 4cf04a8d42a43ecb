"""Quotas: how much a principal (or a role's principals together) may use, from policies/quotas.yaml.

Four kinds of limit, each checked by the gate before a tool call runs (server/gate/quotas.py):

- ``calls_per_minute``, per tool family (`TOOL_FAMILIES`): calls started in the current UTC minute;
- ``concurrent_calls``: calls running at once;
- ``daily_scan_bytes``: bytes of data (the columns read, in the planned files) planned by governed
  and metric queries since 00:00 UTC (a query whose estimate does not fit in what is left is
  refused before it runs);
- ``daily_rows``: rows returned by queries and searches since 00:00 UTC.

Which entry applies, limit by limit: the principal's own entry when it sets that limit (the most
specific), else the most generous of its roles' entries that set it (a role grants an allowance;
holding another role never takes one away), else the file's ``defaults``, else none. The entry that
decides a limit also says who it is counted for: the principal, or, for a role entry marked
``shared: true``, the role (all its principals draw on one budget).

The file is part of the policy set like the scan limits: versioned with it, reloaded with it, and an
invalid file fails closed (the enforcer then denies everything). With no file, nothing is limited.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

from pydantic import BaseModel, ByteSize, ConfigDict, Field, PositiveInt

from lakegate.policies.policy_file import read_policy_file

__all__ = [
    "QUOTAS_FILE",
    "QUOTA_NAMES",
    "TOOL_FAMILIES",
    "CallLimits",
    "Limit",
    "QuotaSet",
    "ToolFamily",
    "load_quotas",
]

QUOTAS_FILE = "quotas.yaml"

#: Tool families, counted apart per minute: catalog browsing, queries (SQL and metrics), document
#: search, and writes.
ToolFamily = Literal["catalog", "query", "search", "write"]
TOOL_FAMILIES: tuple[ToolFamily, ...] = get_args(ToolFamily)
#: Every quota's name, as refusals and the audit record give it.
QUOTA_NAMES = frozenset(
    [*(f"calls_per_minute.{family}" for family in TOOL_FAMILIES), "concurrent_calls", "daily_scan_bytes", "daily_rows"]
)


class _Limits(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    calls_per_minute: dict[ToolFamily, PositiveInt] = Field(default_factory=dict)
    concurrent_calls: int | None = Field(default=None, gt=0)
    daily_scan_bytes: ByteSize | None = Field(default=None, gt=0)  # "64MB", "1.5GiB" or a number of bytes
    daily_rows: int | None = Field(default=None, gt=0)

    def value(self, name: str) -> int | None:
        if name.startswith("calls_per_minute."):
            family = name.partition(".")[2]
            return next((calls for f, calls in self.calls_per_minute.items() if f == family), None)
        found = getattr(self, name)
        return None if found is None else int(found)


class _Entry(_Limits):
    subject: str = Field(min_length=1)
    shared: bool = False
    reason: str = ""


class _File(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    defaults: _Limits = Field(default_factory=_Limits)
    quotas: tuple[_Entry, ...] = ()


@dataclass(frozen=True)
class Limit:
    """One limit as it applies to a caller: its name, how much is allowed, and who it is counted for."""

    name: str  # "calls_per_minute.query", "concurrent_calls", "daily_scan_bytes" or "daily_rows"
    allowed: int
    counted_for: str  # the principal, or the role of a shared entry
    source: str  # the subject of the entry that set it, or "defaults"
    shared: bool = False  # counted for a role's principals together


@dataclass(frozen=True)
class CallLimits:
    """The limits of one call of a tool family by one caller (None: not limited)."""

    calls_per_minute: Limit | None
    concurrent_calls: Limit | None
    daily_scan_bytes: Limit | None
    daily_rows: Limit | None

    def all(self) -> list[Limit]:
        found = (self.calls_per_minute, self.concurrent_calls, self.daily_scan_bytes, self.daily_rows)
        return [limit for limit in found if limit is not None]


class QuotaSet:
    """Every quota, looked up by a caller's principal and roles."""

    def __init__(self, defaults: _Limits | None = None, entries: tuple[_Entry, ...] = ()) -> None:
        self._defaults = defaults or _Limits()
        self._entries = entries

    def for_call(self, principal: str, roles: Collection[str], family: ToolFamily) -> CallLimits:
        """The limits that apply to one call of `family` by `principal` holding `roles`."""
        return CallLimits(
            calls_per_minute=self._limit(f"calls_per_minute.{family}", principal, roles),
            concurrent_calls=self._limit("concurrent_calls", principal, roles),
            daily_scan_bytes=self._limit("daily_scan_bytes", principal, roles),
            daily_rows=self._limit("daily_rows", principal, roles),
        )

    def _limit(self, name: str, principal: str, roles: Collection[str]) -> Limit | None:
        own = [(e, v) for e in self._entries if e.subject == principal and (v := e.value(name)) is not None]
        if own:
            entry, value = own[-1]
            return Limit(name, value, principal, entry.subject)
        granted = [(e, v) for e in self._entries if e.subject in roles and (v := e.value(name)) is not None]
        if granted:
            entry, value = max(granted, key=lambda found: found[1])
            if entry.shared:
                return Limit(name, value, entry.subject, entry.subject, shared=True)
            return Limit(name, value, principal, entry.subject)
        default = self._defaults.value(name)
        return None if default is None else Limit(name, default, principal, "defaults")


def load_quotas(path: Path | None) -> QuotaSet:
    """Read a quotas file; no file means no quotas.

    Raises:
        ValueError: the file is not YAML or does not match the schema (the message says where).
    """
    parsed = read_policy_file(path, _File)
    if parsed is None:
        return QuotaSet()
    return QuotaSet(parsed.defaults, parsed.quotas)
