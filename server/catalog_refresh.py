"""Refreshing attached catalogs on demand: `lakegate catalog refresh`.

A serving process lists an attached catalog again after the catalog's `refresh_s`. When a platform
team has just created tables upstream and wants them served now, `lakegate catalog refresh` records
a request, and every serving process lists its attached catalogs again at its next call that needs
them (it reads the request at most once a second: catalog/warehouse.py).

The request is the time it was made, kept where the profile keeps shared state, so that every
replica sees it: the modification time of `<state_dir>/catalog-refresh` (embedded), or one row in
PostgreSQL (production). Reading it never fails a call: a request that cannot be read is logged and
the catalogs' own schedule still applies.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import structlog

from lakegate.errors import BackendError

if TYPE_CHECKING:
    import psycopg

__all__ = ["FileRefreshRequests", "PostgresRefreshRequests", "RefreshRequests"]

log = structlog.get_logger(__name__)

#: The file whose modification time is the latest request, in the state directory (embedded).
REQUEST_FILE = "catalog-refresh"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS lakegate_catalog_refresh (
    id smallint PRIMARY KEY CHECK (id = 1),
    requested_at double precision NOT NULL
)
"""


class RefreshRequests(Protocol):
    def request(self) -> float:
        """Record a request now; returns its time (seconds since the epoch)."""
        ...

    def latest(self) -> float:
        """The time of the latest request; 0.0 when there was none or it cannot be read."""
        ...


class FileRefreshRequests:
    """Requests as the modification time of a file in the state directory (embedded profile)."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / REQUEST_FILE

    def request(self) -> float:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.touch()
        return self.path.stat().st_mtime

    def latest(self) -> float:
        try:
            return self.path.stat().st_mtime
        except OSError:
            return 0.0


class PostgresRefreshRequests:
    """Requests as one row in PostgreSQL (production profile), read through one kept connection."""

    def __init__(self, url: str) -> None:
        self._url = url
        self._conn: psycopg.Connection[Any] | None = None
        self._lock = threading.Lock()

    def request(self) -> float:
        """Record a request now; returns its time.

        Raises:
            BackendError: PostgreSQL cannot be reached.
        """
        import psycopg

        from lakegate.policies.pg_policies import connect

        now = time.time()
        try:
            with connect(self._url) as conn:
                conn.execute(_SCHEMA)
                conn.execute(
                    "INSERT INTO lakegate_catalog_refresh VALUES (1, %s) "
                    "ON CONFLICT (id) DO UPDATE SET requested_at = excluded.requested_at",
                    (now,),
                )
        except psycopg.Error as exc:
            raise BackendError(f"cannot record the refresh request in PostgreSQL: {type(exc).__name__}") from exc
        return now

    def latest(self) -> float:
        import psycopg

        from lakegate.policies.pg_policies import connect

        with self._lock:
            try:
                if self._conn is None or self._conn.closed:
                    self._conn = connect(self._url)
                row = self._conn.execute("SELECT requested_at FROM lakegate_catalog_refresh WHERE id = 1").fetchone()
            except psycopg.errors.UndefinedTable:
                return 0.0  # nobody has asked yet
            except psycopg.Error as exc:
                log.warning("catalog.refresh_request_unreadable", error=type(exc).__name__)
                if self._conn is not None:
                    self._conn.close()
                self._conn = None
                return 0.0
            return float(row[0]) if row else 0.0
