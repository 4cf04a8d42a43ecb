"""Where quota use is counted: in this process (embedded profile), or in PostgreSQL (production,
server/gate/quota_ledger_pg.py) so that every replica draws on one budget.

A ledger counts under a key, the principal or role a limit is counted for (policies/quotas.py):
calls per UTC minute, calls running now, and scan bytes and rows per UTC day. Windows follow the
ledger's clock (`time.time` unless a test passes another); replicas of the production profile must
keep their clocks in sync (NTP), since a skew of s seconds moves one replica's window edges by s.
"""

from __future__ import annotations

import math
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Protocol

__all__ = [
    "Clock",
    "DayUse",
    "InProcessLedger",
    "QuotaLedger",
    "Refused",
    "day_of",
    "minute_of",
    "seconds_to_midnight",
    "seconds_to_next_minute",
]

Clock = Callable[[], float]


@dataclass(frozen=True)
class Refused:
    """A count that would pass its limit, and was not made: the use so far and when it frees up."""

    used: int
    retry_after_s: int


@dataclass(frozen=True)
class DayUse:
    """What a key has used since 00:00 UTC."""

    scan_bytes: int
    rows: int


class QuotaLedger(Protocol):
    """Counts of quota use; every method is safe to call from any thread."""

    #: Whether calls stay in this process (cheap enough for the event loop) or make a round trip.
    in_process: bool
    clock: Clock

    def count_call(self, key: str, quota: str, allowed: int) -> Refused | None:
        """Count one call of `quota` (a "calls_per_minute.<family>" name) for `key` in the current
        minute, unless `allowed` are counted there already (then nothing is counted)."""
        ...

    def enter(self, key: str, allowed: int) -> Refused | str:
        """Take one of `allowed` running-call slots of `key`: the slot's id, or the refusal when
        all are taken. A slot not left within the ledger's lease (a replica that died) frees itself."""
        ...

    def leave(self, slot: str) -> None:
        """Give a slot back (unknown slots are ignored)."""
        ...

    def day_use(self, key: str) -> DayUse:
        """What `key` has used today (UTC)."""
        ...

    def add_day_use(self, key: str, scan_bytes: int, rows: int) -> None:
        """Add a call's scanned bytes and returned rows to today's use of `key`."""
        ...

    def close(self) -> None: ...


def minute_of(now: float) -> int:
    return int(now // 60)


def day_of(now: float) -> date:
    return datetime.fromtimestamp(now, UTC).date()


def seconds_to_next_minute(now: float) -> int:
    return max(1, math.ceil(60 - now % 60))


def seconds_to_midnight(now: float) -> int:
    return max(1, math.ceil(86_400 - now % 86_400))


class InProcessLedger:
    """The embedded profile's ledger: counts in memory, lost at restart (a restart frees budgets)."""

    in_process = True

    def __init__(self, clock: Clock = time.time) -> None:
        self.clock = clock
        self._lock = threading.Lock()
        self._calls: dict[tuple[str, str], tuple[int, int]] = {}  # (key, quota) -> (minute, calls)
        self._running: dict[str, str] = {}  # slot -> key
        self._days: dict[str, tuple[date, int, int]] = {}  # key -> (day, scan bytes, rows)

    def count_call(self, key: str, quota: str, allowed: int) -> Refused | None:
        now = self.clock()
        minute = minute_of(now)
        with self._lock:
            at, calls = self._calls.get((key, quota), (minute, 0))
            calls = calls if at == minute else 0
            if calls >= allowed:
                return Refused(calls, seconds_to_next_minute(now))
            self._calls[(key, quota)] = (minute, calls + 1)
        return None

    def enter(self, key: str, allowed: int) -> Refused | str:
        with self._lock:
            running = sum(1 for holder in self._running.values() if holder == key)
            if running >= allowed:
                return Refused(running, 1)
            slot = uuid.uuid4().hex
            self._running[slot] = key
        return slot

    def leave(self, slot: str) -> None:
        with self._lock:
            self._running.pop(slot, None)

    def day_use(self, key: str) -> DayUse:
        today = day_of(self.clock())
        with self._lock:
            day, scan_bytes, rows = self._days.get(key, (today, 0, 0))
        return DayUse(scan_bytes, rows) if day == today else DayUse(0, 0)

    def add_day_use(self, key: str, scan_bytes: int, rows: int) -> None:
        if not scan_bytes and not rows:
            return
        today = day_of(self.clock())
        with self._lock:
            day, used_bytes, used_rows = self._days.get(key, (today, 0, 0))
            if day != today:
                used_bytes = used_rows = 0
            self._days[key] = (today, used_bytes + scan_bytes, used_rows + rows)

    def close(self) -> None:
        return None
