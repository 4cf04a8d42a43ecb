"""Writing the records of requests refused before the gate, without letting a flood grow the log.

The records themselves are built by `lakegate.server.audit.record_builders.refused_request_record`.
`RefusalLog` writes them so that a client that floods the server cannot grow the log without
bound: per (kind of refusal, client address), the first refusal is written at once and the others
within `REFUSAL_WINDOW_S` are counted, then written as one record whose `count` says how many
requests it stands for (a record without `count` stands for one).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import anyio
import anyio.to_thread
import structlog

from lakegate.errors import AuditWriteError
from lakegate.server.audit.log import AuditLog, utc_now
from lakegate.server.audit.record_model import AuditRecord

__all__ = ["MAX_REFUSAL_SOURCES", "REFUSAL_WINDOW_S", "RefusalLog"]

log = structlog.get_logger(__name__)

#: How long refusals of one kind from one client address are counted into one record.
REFUSAL_WINDOW_S = 10.0
#: Client addresses tracked at once; refusals from further addresses share one record per kind, so
#: that a client with many addresses cannot get one write per request either.
MAX_REFUSAL_SOURCES = 256
#: The `source` of the shared record of the addresses beyond `MAX_REFUSAL_SOURCES`.
MANY_SOURCES = "(many)"


@dataclass
class _Window:
    """Refusals of one kind from one source since the last record written for them."""

    ends: float
    counted: int = 0
    last: AuditRecord | None = None
    first_at: str = ""
    last_at: str = ""


class RefusalLog:
    """Writes refusal records through an audit log, one per (kind, source) and window.

    The first refusal of a (kind, source) is written before `refuse` returns, so it is in the log
    before the client has its answer. Later ones within the window only count (no I/O, so a flood
    costs the server a dictionary update each); when the window ends, `run` writes one record for
    them with `count` and the last one's details, and keeps counting for one more window if there
    were any. `run` writes whatever is still counted when it is cancelled (shutdown).

    `kind` must come from a small set (an outcome, a reason): it keys a dictionary that lives as
    long as refusals keep coming. Sources beyond `max_sources` share the key (kind, "(many)").
    A record that cannot be written is logged, not raised: the request is refused either way.
    """

    def __init__(
        self, audit: AuditLog, *, window_s: float = REFUSAL_WINDOW_S, max_sources: int = MAX_REFUSAL_SOURCES
    ) -> None:
        self.audit = audit
        self.window_s = window_s
        self.max_sources = max_sources
        self._windows: dict[tuple[str, str], _Window] = {}
        # Made by `run` (an event needs the running event loop); set when a window opens.
        self._opened: anyio.Event | None = None
        # Once `run` has written what was left, nothing would write what is counted after.
        self._stopped = False

    async def refuse(self, record: AuditRecord, *, kind: str, source: str | None) -> None:
        """Count one refused request, writing its record when it is the first of its window.

        Never raises for a record it cannot write (see the class).
        """
        if self._stopped:
            await self._write(record.model_copy(update={"count": 1}))
            return
        now = time.monotonic()
        key = (kind, source or "")
        if key not in self._windows and len(self._windows) >= self.max_sources:
            key = (kind, MANY_SOURCES)
        window = self._windows.get(key)
        if window is not None:
            window.counted += 1
            window.last = record
            window.first_at = window.first_at or utc_now()
            window.last_at = utc_now()
            return
        # Registered before the write is awaited: refusals arriving meanwhile are counted.
        self._windows[key] = _Window(ends=now + self.window_s)
        if self._opened is not None:
            self._opened.set()
        await self._write(record.model_copy(update={"count": 1}))

    async def run(self) -> None:
        """Write the counted refusals as their windows end, until cancelled; then write the rest."""
        try:
            while True:
                if not self._windows:
                    self._opened = anyio.Event()
                    await self._opened.wait()
                    continue
                due = min(window.ends for window in self._windows.values())
                await anyio.sleep(max(0.0, due - time.monotonic()))
                await self.flush(time.monotonic())
        finally:
            self._stopped = True
            with anyio.CancelScope(shield=True):
                await self.flush(math.inf)

    async def flush(self, now: float = math.inf) -> None:
        """Write one record per window that has ended by `now` (monotonic time; default: all)."""
        for key, window in list(self._windows.items()):
            if window.ends > now:
                continue
            if not window.counted:
                del self._windows[key]
                continue
            record = _aggregate(window, self.window_s)
            if now == math.inf:
                del self._windows[key]
            else:
                # The flood may go on: count it for one more window rather than write per request.
                self._windows[key] = _Window(ends=now + self.window_s)
            await self._write(record)

    async def _write(self, record: AuditRecord) -> None:
        try:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(self.audit.append, record.model_dump())
        except AuditWriteError as exc:
            log.error("audit.write_failed", tool=None, outcome=record.outcome, error=repr(exc.__cause__))


def _aggregate(window: _Window, window_s: float) -> AuditRecord:
    """The last refusal counted in `window`, standing for all of them."""
    assert window.last is not None, "a window that counted refusals holds the last one"
    aggregated = {"first_at": window.first_at, "last_at": window.last_at, "window_s": window_s}
    return window.last.model_copy(
        update={"count": window.counted, "details": {**(window.last.details or {}), "aggregated": aggregated}}
    )
