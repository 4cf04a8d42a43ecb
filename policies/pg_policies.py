"""Casbin rules in PostgreSQL, shared by every replica, with change notification.

Tables (`create_policy_schema`, idempotent):

    casbin_rule               one row per p or g line, read and written through
                              casbin-sqlalchemy-adapter (its `CasbinRule` model)
    lakegate_policy_version   one row: a counter that a statement trigger on casbin_rule bumps

Every statement that changes casbin_rule, whoever runs it (the adapter, psql, a migration), bumps
the counter and sends ``NOTIFY lakegate_policy`` in its own transaction; PostgreSQL delivers the
notice only when that transaction commits, so a replica never sees a change that rolls back.

Each replica's `PostgresRules` runs one watcher thread on its own connection, LISTENing on that
channel. It reads the counter when a notice arrives and, as the fallback for a notice that never
arrives (a dropped connection, a reconnect), every ``poll_interval_s``. The enforcer
(policies/enforcer.py) compares the counter on every decision and reloads the rules when it moved.

**The bound**: a committed change is applied by every replica that can reach the database within
``poll_interval_s`` plus one reload (milliseconds: one query), so **within 2 s** at the default
1 s; with notifications working, within tens of milliseconds. A replica whose watcher has not read
the counter for ``stale_after_s`` denies every call until it has (fail closed): a replica cut off
from the database cannot go on deciding by rules it can no longer show to be current.

Only the Casbin rules live here. The model (model.conf), the row filters (row_filters.yaml) and
the other policy files stay on disk, hot-reloaded as in the embedded profile.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import casbin
import psycopg
import structlog
from casbin import persist
from casbin_sqlalchemy_adapter import Adapter, CasbinRule
from sqlalchemy import Engine, create_engine, select
from sqlalchemy.dialects.postgresql.base import PGDialect
from sqlalchemy.orm import Session
from sqlalchemy.schema import CreateTable

from lakegate.errors import ConfigurationError

__all__ = ["CHANNEL", "PostgresRules", "connect", "create_policy_schema", "open_rules"]

log = structlog.get_logger(__name__)

CHANNEL = "lakegate_policy"
# Schema changes by several replicas starting at once are serialised by this advisory lock.
_SCHEMA_LOCK = 0x6C67_0001
# The watcher wakes at least this often, so that close() returns promptly.
_TICK_S = 0.2

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS lakegate_policy_version (
    id smallint PRIMARY KEY CHECK (id = 1),
    version bigint NOT NULL,
    changed_at timestamptz NOT NULL DEFAULT now()
);
INSERT INTO lakegate_policy_version (id, version) VALUES (1, 0) ON CONFLICT (id) DO NOTHING;
CREATE OR REPLACE FUNCTION lakegate_policy_changed() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    current bigint;
BEGIN
    UPDATE lakegate_policy_version SET version = version + 1, changed_at = now() WHERE id = 1
        RETURNING version INTO current;
    PERFORM pg_notify('{CHANNEL}', current::text);
    RETURN NULL;
END
$$;
CREATE OR REPLACE TRIGGER lakegate_policy_changed
    AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON casbin_rule
    FOR EACH STATEMENT EXECUTE FUNCTION lakegate_policy_changed();
"""


def connect(url: str, *, autocommit: bool = True) -> psycopg.Connection[Any]:
    """A psycopg connection to `url` (a libpq URL) that gives up connecting after 5 s.

    Raises:
        psycopg.OperationalError: the server cannot be reached or refuses the connection.
    """
    return psycopg.connect(url, autocommit=autocommit, connect_timeout=5, application_name="lakegate")


def create_policy_schema(conn: psycopg.Connection[Any]) -> None:
    """Create the rules table, the version row and its trigger if they are missing (PostgreSQL 14+).

    Raises:
        psycopg.Error: the statements failed (permissions, an unreachable server).
    """
    # The adapter's own table definition, so that its model and the table cannot drift apart.
    dialect = PGDialect()  # type: ignore[no-untyped-call]
    rules_table = str(CreateTable(CasbinRule.__table__, if_not_exists=True).compile(dialect=dialect))
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
        installed = conn.execute("SELECT 1 FROM pg_trigger WHERE tgname = 'lakegate_policy_changed'").fetchone()
        if installed is None:
            conn.execute(rules_table)
            conn.execute(_SCHEMA)


class _Snapshot(persist.Adapter):  # type: ignore[misc]
    """One read of the rules, loaded into both enforcers of a policy load.

    Writes (the enforcer adds the catalog's g2 tag groups in memory) are no-ops: the database is
    changed only through `PostgresRules`, never as a side effect of loading.
    """

    def __init__(self, lines: list[str]) -> None:
        self.lines = lines

    def load_policy(self, model: Any) -> None:
        for line in self.lines:
            persist.load_policy_line(line, model)


class PostgresRules:
    """The Casbin rules of one PostgreSQL database, watched for changes (a `RuleSource`).

    `url` is a libpq URL (postgresql://user@host:5432/db). Constructing it reads the version once
    and starts the watcher thread; `close` stops it.
    """

    def __init__(self, url: str, *, poll_interval_s: float = 1.0, stale_after_s: float = 5.0) -> None:
        self._url = url
        self._poll_interval_s = poll_interval_s
        self._stale_after_s = stale_after_s
        self._engine: Engine = create_engine(
            # Not autocommit: a seed (delete all, insert all) must be one transaction.
            "postgresql+psycopg://",
            creator=lambda: connect(url, autocommit=False),
            pool_pre_ping=True,
        )
        # The maintained adapter does the writes (seeding, single rules); its tables are created by
        # create_policy_schema, under the lock, not by the adapter on import.
        self._adapter: Any = Adapter(self._engine, create_all_models=False)
        self._version = -1
        self._confirmed_at: float | None = None
        self._error = "not read yet"
        self._stop = threading.Event()
        try:
            with connect(url) as conn:
                self._read_version(conn)
        except psycopg.Error as exc:
            self._failed(exc)
        self._thread = threading.Thread(target=self._watch, name="lakegate-policy-watcher", daemon=True)
        self._thread.start()

    # -- RuleSource ----------------------------------------------------------------------------

    def snapshot(self) -> _Snapshot:
        """The rules as one consistent read, in insertion order (the order policy.csv had).

        Raises:
            ConfigurationError: the table holds no rules (seed it with `lakegate profile sync-policies`).
            sqlalchemy.exc.SQLAlchemyError: the rules cannot be read.
        """
        with Session(self._engine) as session:
            rows = session.scalars(select(CasbinRule).order_by(CasbinRule.id)).all()
        lines = [str(row) for row in rows]
        if not lines:
            raise ConfigurationError(
                "there are no Casbin rules in PostgreSQL: seed them from policy.csv with "
                "`lakegate profile sync-policies`"
            )
        return _Snapshot(lines)

    def stamp(self) -> int:
        """The policy version counter as the watcher last read it (-1 before the first read)."""
        return self._version

    def stale_reason(self) -> str | None:
        """Why the rules cannot be trusted to be current, or None while the counter is fresh."""
        confirmed = self._confirmed_at
        if confirmed is None:
            return f"the policy store in PostgreSQL has not been reached ({self._error}); every call is denied"
        age = time.monotonic() - confirmed
        if age > self._stale_after_s:
            return (
                f"the policy version in PostgreSQL could not be read for {age:.1f}s ({self._error}); "
                "every call is denied until it can"
            )
        return None

    def close(self) -> None:
        """Stop the watcher and release the connections."""
        self._stop.set()
        self._thread.join(timeout=5)
        self._engine.dispose()

    # -- writing -------------------------------------------------------------------------------

    def replace_all(self, model_path: Path, policy_path: Path) -> int:
        """Replace every rule with those of a policy.csv, in one transaction; returns how many.

        Raises:
            Exception: the file is not a valid policy for the model (casbin's errors), or the
                database write failed (sqlalchemy.exc.SQLAlchemyError); nothing is changed then.
        """
        source = casbin.Enforcer(str(model_path), casbin.FileAdapter(str(policy_path)))
        model = source.get_model()
        self._adapter.save_policy(model)
        return sum(len(ast.policy) for section in ("p", "g") for ast in model.model.get(section, {}).values())

    def add_rule(self, ptype: str, *values: str) -> None:
        """Add one rule ("p", "role:analyst", "tool:query", "call", "deny").

        Raises:
            sqlalchemy.exc.SQLAlchemyError: the write failed.
        """
        self._adapter.add_policy(ptype[0], ptype, list(values))

    def remove_rule(self, ptype: str, *values: str) -> bool:
        """Remove one rule; returns whether it was there.

        Raises:
            sqlalchemy.exc.SQLAlchemyError: the write failed.
        """
        return bool(self._adapter.remove_policy(ptype[0], ptype, list(values)))

    def rules(self) -> list[str]:
        """Every rule as a policy.csv line, in order.

        Raises:
            sqlalchemy.exc.SQLAlchemyError: the rules cannot be read.
        """
        with Session(self._engine) as session:
            return [str(row) for row in session.scalars(select(CasbinRule).order_by(CasbinRule.id))]

    # -- watching ------------------------------------------------------------------------------

    def _read_version(self, conn: psycopg.Connection[Any]) -> None:
        row = conn.execute("SELECT version FROM lakegate_policy_version WHERE id = 1").fetchone()
        if row is None:
            raise psycopg.DataError("the lakegate_policy_version row is missing")
        if row[0] != self._version:
            log.debug("policy.version_seen", version=row[0])
        self._version = int(row[0])
        self._confirmed_at = time.monotonic()

    def _failed(self, exc: BaseException) -> None:
        self._error = f"{type(exc).__name__}: {str(exc).strip()}"
        log.warning("policy.watch_failed", error=self._error)

    def _watch(self) -> None:
        while not self._stop.is_set():
            try:
                with connect(self._url) as conn:
                    conn.execute(f"LISTEN {CHANNEL}")
                    self._read_version(conn)  # whatever changed while we were not listening
                    self._listen(conn)
            except (psycopg.Error, OSError) as exc:
                self._failed(exc)
                self._stop.wait(min(1.0, self._poll_interval_s))

    def _listen(self, conn: psycopg.Connection[Any]) -> None:
        last_read = time.monotonic()
        while not self._stop.is_set():
            wait = min(_TICK_S, max(0.0, self._poll_interval_s - (time.monotonic() - last_read)))
            notified = any(True for _ in conn.notifies(timeout=wait, stop_after=1))
            if notified or time.monotonic() - last_read >= self._poll_interval_s:
                self._read_version(conn)
                last_read = time.monotonic()


@contextmanager
def open_rules(url: str, **options: float) -> Iterator[PostgresRules]:
    """`PostgresRules` for the length of a block (for commands that seed or inspect the rules)."""
    rules = PostgresRules(url, **options)
    try:
        yield rules
    finally:
        rules.close()
