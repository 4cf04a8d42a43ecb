"""The production profile's quota ledger: counts in PostgreSQL, so that replicas share one budget.

Exact where one statement can decide: a call per minute is counted by one conditional upsert
(`... DO UPDATE SET calls = calls + 1 WHERE calls < allowed`), and a running-call slot is taken
under a transaction-level advisory lock per key, so neither ever passes its limit, whatever the
number of replicas. The daily budgets are checked before a call and added after it (nobody knows a
call's rows before it runs), so calls that start together may pass a daily budget: by at most
what the calls running at once for that key add, which `concurrent_calls` bounds (README, "Quotas").

Slots of a replica that died free themselves after `lease_s`. Old minute counts are deleted as
the ledger goes; day rows are kept for 35 days (what `lakegate audit report` may show).

Any PostgreSQL failure is a BackendError: the gate then refuses the call (fails closed).
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import date, timedelta
from typing import Any, TypeVar

import psycopg

from lakegate.errors import BackendError
from lakegate.server.gate.quota_ledger import (
    Clock,
    DayUse,
    Refused,
    day_of,
    minute_of,
    seconds_to_next_minute,
)

__all__ = ["PostgresLedger", "create_quota_schema"]

_SCHEMA_LOCK = 0x6C67_0004
_SESSION_OPTIONS = "-c lock_timeout=5s -c statement_timeout=10s -c idle_in_transaction_session_timeout=30s"
_KEEP_DAYS = 35

_SCHEMA = """
CREATE TABLE IF NOT EXISTS lakegate_quota_calls (
    counted_for text NOT NULL,
    quota text NOT NULL,
    minute bigint NOT NULL,
    calls integer NOT NULL,
    PRIMARY KEY (counted_for, quota, minute)
);
CREATE TABLE IF NOT EXISTS lakegate_quota_running (
    slot text PRIMARY KEY,
    counted_for text NOT NULL,
    expires double precision NOT NULL
);
CREATE INDEX IF NOT EXISTS lakegate_quota_running_key ON lakegate_quota_running (counted_for);
CREATE TABLE IF NOT EXISTS lakegate_quota_days (
    counted_for text NOT NULL,
    day date NOT NULL,
    scan_bytes bigint NOT NULL DEFAULT 0,
    rows bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (counted_for, day)
);
"""

T = TypeVar("T")


def create_quota_schema(conn: psycopg.Connection[Any]) -> None:
    """Create the ledger's tables if they are missing.

    Raises:
        psycopg.Error: the statements failed.
    """
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
        conn.execute(_SCHEMA)


class PostgresLedger:
    """Quota counts in the database at `url` (a libpq URL); one connection, opened on first use and
    again after a failure, used by one statement at a time."""

    in_process = False

    def __init__(self, url: str, *, lease_s: float, clock: Clock = time.time) -> None:
        self.url = url
        self.lease_s = lease_s
        self.clock = clock
        self._lock = threading.Lock()
        self._conn: psycopg.Connection[Any] | None = None
        self._pid = os.getpid()
        self._swept_minute = -1
        self._swept_day: date | None = None

    @contextmanager
    def _connection(self) -> Iterator[psycopg.Connection[Any]]:
        with self._lock:
            if self._pid != os.getpid():  # a forked child must not share its parent's socket
                self._conn, self._pid = None, os.getpid()
            try:
                if self._conn is None or self._conn.closed:
                    self._conn = psycopg.connect(
                        self.url,
                        autocommit=True,
                        connect_timeout=5,
                        application_name="lakegate",
                        options=_SESSION_OPTIONS,
                    )
                yield self._conn
            except psycopg.Error as exc:
                if self._conn is not None:
                    self._conn.close()
                self._conn = None
                raise BackendError(f"cannot count quota use in PostgreSQL: {exc}") from exc

    def _run(self, work: Callable[[psycopg.Connection[Any]], T]) -> T:
        with self._connection() as conn:
            return work(conn)

    def count_call(self, key: str, quota: str, allowed: int) -> Refused | None:
        now = self.clock()
        minute = minute_of(now)

        def count(conn: psycopg.Connection[Any]) -> Refused | None:
            if minute != self._swept_minute:
                conn.execute("DELETE FROM lakegate_quota_calls WHERE minute < %s", (minute - 1,))
                self._swept_minute = minute
            counted = conn.execute(
                "INSERT INTO lakegate_quota_calls AS c (counted_for, quota, minute, calls) VALUES (%s, %s, %s, 1) "
                "ON CONFLICT (counted_for, quota, minute) DO UPDATE SET calls = c.calls + 1 WHERE c.calls < %s "
                "RETURNING calls",
                (key, quota, minute, allowed),
            ).fetchone()
            if counted is not None:
                return None
            row = conn.execute(
                "SELECT calls FROM lakegate_quota_calls WHERE counted_for = %s AND quota = %s AND minute = %s",
                (key, quota, minute),
            ).fetchone()
            return Refused(int(row[0]) if row else allowed, seconds_to_next_minute(now))

        return self._run(count)

    def enter(self, key: str, allowed: int) -> Refused | str:
        now = self.clock()

        def take(conn: psycopg.Connection[Any]) -> Refused | str:
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", ("lakegate-quota:" + key,))
                conn.execute("DELETE FROM lakegate_quota_running WHERE counted_for = %s AND expires < %s", (key, now))
                row = conn.execute(
                    "SELECT count(*) FROM lakegate_quota_running WHERE counted_for = %s", (key,)
                ).fetchone()
                running = int(row[0]) if row else 0
                if running >= allowed:
                    return Refused(running, 1)
                slot = uuid.uuid4().hex
                conn.execute(
                    "INSERT INTO lakegate_quota_running (slot, counted_for, expires) VALUES (%s, %s, %s)",
                    (slot, key, now + self.lease_s),
                )
                return slot

        return self._run(take)

    def leave(self, slot: str) -> None:
        self._run(lambda conn: conn.execute("DELETE FROM lakegate_quota_running WHERE slot = %s", (slot,)))

    def day_use(self, key: str) -> DayUse:
        today = day_of(self.clock())

        def read(conn: psycopg.Connection[Any]) -> DayUse:
            row = conn.execute(
                "SELECT scan_bytes, rows FROM lakegate_quota_days WHERE counted_for = %s AND day = %s", (key, today)
            ).fetchone()
            return DayUse(int(row[0]), int(row[1])) if row else DayUse(0, 0)

        return self._run(read)

    def add_day_use(self, key: str, scan_bytes: int, rows: int) -> None:
        if not scan_bytes and not rows:
            return
        today = day_of(self.clock())

        def add(conn: psycopg.Connection[Any]) -> None:
            conn.execute(
                "INSERT INTO lakegate_quota_days AS d (counted_for, day, scan_bytes, rows) VALUES (%s, %s, %s, %s) "
                "ON CONFLICT (counted_for, day) DO UPDATE "
                "SET scan_bytes = d.scan_bytes + EXCLUDED.scan_bytes, rows = d.rows + EXCLUDED.rows",
                (key, today, scan_bytes, rows),
            )
            if today != self._swept_day:
                conn.execute("DELETE FROM lakegate_quota_days WHERE day < %s", (today - timedelta(days=_KEEP_DAYS),))
                self._swept_day = today

        self._run(add)

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
            self._conn = None
