"""The gate's quota check: before a call runs, its caller's quotas (policies/quotas.py) are looked
up and counted in the ledger (server/gate/quota_ledger.py); after it, its use is added.

Before: a running-call slot, then the daily budgets, then the call is counted in its minute (a
refusal gives the slot back and counts nothing). A refusal is a `QuotaExceeded` naming the quota, the use and when
to retry; the call does not run. After (whatever the outcome, cancelled included): the rows the
call returned and the bytes its queries planned are added to the day, and the slot is given back.

A query learns the scan budget it has left from its scope (`ScanBudget`), and is refused before it
runs when its estimate does not fit. Messages never give the bytes used: they count whole snapshots
of tables read through a row filter, and differences between them would tell a table's size.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

from lakegate.errors import QuotaExceeded
from lakegate.policies.quotas import CallLimits, Limit, QuotaSet, ToolFamily
from lakegate.server.gate.quota_ledger import DayUse, QuotaLedger, Refused, seconds_to_midnight

__all__ = ["Admission", "Quotas", "ScanBudget", "human_size"]


@dataclass(frozen=True)
class ScanBudget:
    """What is left of a caller's daily scan budget for one call."""

    limit: Limit
    left: int
    retry_after_s: int

    def refusal(self, planned: int) -> QuotaExceeded:
        return QuotaExceeded(
            f"This query would take {_whose(self.limit)} queries past the daily scan quota of "
            f"{human_size(self.limit.allowed)} (bytes of columns planned to be read since 00:00 UTC): it was not run.",
            hint="Narrow it to read less (fewer columns, a time range on the table's partition column; query "
            "with explain: true shows the estimate), ask for a metric, or retry after the quota resets in "
            f"{_wait(self.retry_after_s)}.",
            limit=self.limit.name,
            used=self.limit.allowed - self.left + planned,
            allowed=self.limit.allowed,
            retry_after_s=self.retry_after_s,
        )


@dataclass
class Admission:
    """A call let in: its limits, the running-call slot it holds, the scan budget it may use."""

    limits: CallLimits
    slot: str | None
    scan_budget: ScanBudget | None


class Quotas:
    """Quota checks over one ledger (in process, or PostgreSQL in the production profile)."""

    def __init__(self, ledger: QuotaLedger) -> None:
        self.ledger = ledger

    def admit(self, quotas: QuotaSet, principal: str, roles: Collection[str], family: ToolFamily) -> Admission:
        """Let one call in, or refuse it.

        Raises:
            QuotaExceeded: a quota of the caller is used up (nothing was counted).
            BackendError: the production ledger cannot be reached (the call is refused: fail closed).
        """
        limits = quotas.for_call(principal, roles, family)
        if not limits.all():
            return Admission(limits, None, None)
        # The slot first: a call reads the day's use only while it holds one, so calls that passed
        # a daily budget's check together are at most `concurrent_calls` (the overshoot bound).
        slot: str | None = None
        if limits.concurrent_calls is not None:
            taken = self.ledger.enter(limits.concurrent_calls.counted_for, limits.concurrent_calls.allowed)
            if isinstance(taken, Refused):
                raise _used_up(limits.concurrent_calls, taken.used, taken.retry_after_s)
            slot = taken
        try:
            budget = self._daily_checks(limits, family)
            if limits.calls_per_minute is not None:
                per_minute = limits.calls_per_minute
                refused = self.ledger.count_call(per_minute.counted_for, per_minute.name, per_minute.allowed)
                if refused is not None:
                    raise _used_up(per_minute, refused.used, refused.retry_after_s)
        except BaseException:
            if slot is not None:
                self.ledger.leave(slot)
            raise
        return Admission(limits, slot, budget)

    def _daily_checks(self, limits: CallLimits, family: ToolFamily) -> ScanBudget | None:
        """Refuse a call whose daily budgets are used up; the scan budget left for a query.

        Raises:
            QuotaExceeded: daily_rows, or (for a query) daily_scan_bytes, is used up.
        """
        now = self.ledger.clock()
        read: dict[str, DayUse] = {}  # one read per key: rows and bytes are usually counted for the same

        def day_use(key: str) -> DayUse:
            if key not in read:
                read[key] = self.ledger.day_use(key)
            return read[key]

        if limits.daily_rows is not None:
            used_rows = day_use(limits.daily_rows.counted_for).rows
            if used_rows >= limits.daily_rows.allowed:
                raise _used_up(limits.daily_rows, used_rows, seconds_to_midnight(now))
        if limits.daily_scan_bytes is None or family != "query":
            return None
        used_bytes = day_use(limits.daily_scan_bytes.counted_for).scan_bytes
        budget = ScanBudget(
            limits.daily_scan_bytes, limits.daily_scan_bytes.allowed - used_bytes, seconds_to_midnight(now)
        )
        if budget.left <= 0:
            raise budget.refusal(0)
        return budget

    def settle(self, admission: Admission, *, scan_bytes: int, rows: int) -> None:
        """Add a finished call's use to its day and give its slot back.

        Raises:
            BackendError: the production ledger cannot be reached (the slot frees itself after its lease).
        """
        try:
            by_key: dict[str, tuple[int, int]] = {}
            if admission.limits.daily_scan_bytes is not None and scan_bytes:
                key = admission.limits.daily_scan_bytes.counted_for
                by_key[key] = (scan_bytes, 0)
            if admission.limits.daily_rows is not None and rows:
                key = admission.limits.daily_rows.counted_for
                counted_bytes, _ = by_key.get(key, (0, 0))
                by_key[key] = (counted_bytes, rows)
            for key, (counted_bytes, counted_rows) in by_key.items():
                self.ledger.add_day_use(key, counted_bytes, counted_rows)
        finally:
            if admission.slot is not None:
                self.ledger.leave(admission.slot)


def _whose(limit: Limit) -> str:
    return f"{limit.counted_for}'s" if limit.shared else "your"


def _used_up(limit: Limit, used: int, retry_after_s: int) -> QuotaExceeded:
    """The refusal of a call over `limit` (calls per minute, running calls or daily rows)."""
    who = f"The agents of {limit.counted_for} together" if limit.shared else "You"
    if limit.name.startswith("calls_per_minute."):
        family = limit.name.partition(".")[2]
        message = f"{who} have made {used} {family} calls this minute; the quota is {limit.allowed} a minute."
        hint = (
            f"Retry in {_wait(retry_after_s)}. Fewer, larger calls go further (one query with GROUP BY "
            "instead of one per value)."
        )
    elif limit.name == "concurrent_calls":
        message = f"{who} are running {used} calls at once; the quota is {limit.allowed}."
        hint = "Wait for a call to finish, then retry (in about 1 s)."
    else:
        message = f"{who} have received {used:,} rows today (UTC); the daily quota is {limit.allowed:,}."
        hint = f"It resets at 00:00 UTC, in {_wait(retry_after_s)}. Aggregate in SQL or a metric to return fewer rows."
    return QuotaExceeded(
        message, hint=hint, limit=limit.name, used=used, allowed=limit.allowed, retry_after_s=retry_after_s
    )


def _wait(seconds: int) -> str:
    if seconds < 120:
        return f"{seconds} s"
    hours, rest = divmod(seconds, 3600)
    return f"{hours} h {rest // 60} min" if hours else f"{rest // 60} min"


def human_size(count: int) -> str:
    """A byte count for messages: "1.5 GB", "640 bytes"."""
    for unit, scale in (("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if count >= scale:
            return f"{count / scale:.1f} {unit}"
    return f"{count} bytes"
