"""The production profile's audit trail in PostgreSQL: one global hash chain for all replicas.

Design: **one global sequence.** Every replica appends to the same chain, and PostgreSQL orders
them. Tables (`create_audit_schema`, idempotent):

    lakegate_audit_head   one row (id = 1): seq and hash of the chain's last record
    lakegate_audit        one row per record: seq (primary key), replica, prev_hash, hash, and
                          the record as its canonical JSON text, exactly what was hashed (jsonb
                          would respell some numbers, 1e300 for one, and so change the hash)

Appending is one transaction: ``SELECT seq, hash FROM lakegate_audit_head ... FOR UPDATE``
(concurrent replicas queue on that row lock), then ``seq = head.seq + 1`` and
``prev_hash = head.hash`` are taken from what the database holds, the hash is computed with
`lakegate.server.audit.log.record_hash`, the row is inserted, the head moved on, and the transaction committed.
So records from any number of replicas form one chain in one total order, and the chain is
verified as a whole (`verify_chain`), whichever replica wrote each record (its ``replica`` field).

Beside the file: `MirroredAuditLog` is the JSON-lines `AuditLog` whose ``append`` also writes the
record here. The PostgreSQL row is inserted first and committed only after the local file record
was written; if either write fails, the call fails with `AuditWriteError` (the gate then returns
no data) and the transaction is rolled back. Both copies hold the same record body (same time, the
``replica`` name); the file's record also names its ``global_seq``. The one gap: a COMMIT that
fails after the file record was written leaves that record in the local file only (its
global_seq then belongs to no row, or to a later record of another replica).

Holding the head lock while the local file is written (and fsynced) serialises the appends of all
replicas: the chain's throughput is one round trip plus one fsync per record. Sessions time out
(``lock_timeout``, ``idle_in_transaction_session_timeout``), so a stuck replica blocks the others
for seconds, not forever; its own call then fails closed.

What the chain cannot show on its own: rows cut from the end *and* the head row rewritten to
match. Keep the last seq and hash elsewhere, as for the file log.

Each replica's local file signs checkpoints of its own chain (`lakegate.server.audit.checkpoints`); the
latest is also kept here, one row per local chain (`PostgresCheckpointStore`), so that cutting
both the local log and its checkpoint file still shows:

    lakegate_audit_checkpoint   chain (the replica and its file, primary key), the checkpoint's
                                number, seq, hash and signature, and the checkpoint as signed

A row only moves forward: a checkpoint with a lower number than the one kept is refused (and the
kept one returned), so the file's writer numbers its next checkpoints above it.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import psycopg
from pydantic import ValidationError

from lakegate.errors import AuditWriteError
from lakegate.server.audit.checkpoints import Checkpoint
from lakegate.server.audit.log import (
    GENESIS_HASH,
    AuditLog,
    Problem,
    VerifyReport,
    canonical_json,
    record_hash,
    utc_now,
)

__all__ = [
    "MirroredAuditLog",
    "PostgresAuditChain",
    "PostgresCheckpointStore",
    "create_audit_schema",
    "load_checkpoint",
    "verify_chain",
]

_SCHEMA_LOCK = 0x6C67_0002
_CHAIN_FIELDS = ("seq", "prev_hash", "hash")
_SESSION_OPTIONS = "-c lock_timeout=10s -c statement_timeout=15s -c idle_in_transaction_session_timeout=30s"

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS lakegate_audit_head (
    id smallint PRIMARY KEY CHECK (id = 1),
    seq bigint NOT NULL,
    hash text NOT NULL
);
INSERT INTO lakegate_audit_head (id, seq, hash) VALUES (1, 0, '{GENESIS_HASH}') ON CONFLICT (id) DO NOTHING;
CREATE TABLE IF NOT EXISTS lakegate_audit (
    seq bigint PRIMARY KEY,
    replica text NOT NULL,
    prev_hash text NOT NULL,
    hash text NOT NULL,
    record text NOT NULL
);
CREATE TABLE IF NOT EXISTS lakegate_audit_checkpoint (
    chain text PRIMARY KEY,
    number bigint NOT NULL,
    seq bigint NOT NULL,
    hash text NOT NULL,
    signature text NOT NULL,
    checkpoint text NOT NULL,
    stored_at timestamptz NOT NULL DEFAULT now()
);
"""


def create_audit_schema(conn: psycopg.Connection[Any]) -> None:
    """Create the chain's tables and its head row if they are missing.

    Raises:
        psycopg.Error: the statements failed.
    """
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
        conn.execute(_SCHEMA)


def _plain(record: Mapping[str, Any]) -> dict[str, Any]:
    """The record as a reader will read it back, without chain fields.

    Raises:
        AuditWriteError: a value is not JSON (objects, NaN, cycles).
    """
    try:
        plain: dict[str, Any] = json.loads(canonical_json(dict(record)))
    except (TypeError, ValueError) as exc:
        raise AuditWriteError(f"cannot write audit record: {exc}") from exc
    for name in _CHAIN_FIELDS:
        plain.pop(name, None)
    return plain


class PostgresAuditChain:
    """The global chain in one PostgreSQL database, appended to by the replica named `replica`.

    One connection per chain object, used by one append at a time; it is opened on first use and
    again after a failure.
    """

    def __init__(self, url: str, replica: str) -> None:
        self.url = url
        self.replica = replica
        self._lock = threading.Lock()
        self._conn: psycopg.Connection[Any] | None = None
        self._pid = os.getpid()

    def _connection(self) -> psycopg.Connection[Any]:
        if self._pid != os.getpid():
            # A forked child must not talk over its parent's socket; psycopg does not close a
            # connection inherited across fork, so dropping the reference is safe.
            self._conn, self._pid = None, os.getpid()
        if self._conn is None or self._conn.closed:
            self._conn = psycopg.connect(
                self.url, autocommit=True, connect_timeout=5, application_name="lakegate", options=_SESSION_OPTIONS
            )
        return self._conn

    def _drop(self) -> None:
        if self._conn is not None:
            self._conn.close()
        self._conn = None

    @contextmanager
    def appending(self, record: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
        """Insert `record` as the chain's next record and yield it as stored (seq, prev_hash,
        hash, replica added); the insert commits when the block ends, and rolls back if it raises.

        Raises:
            AuditWriteError: the record was not stored (the database is unreachable, a timeout,
                the schema is missing, a value is not JSON), or the block raised it.
        """
        body = _plain(record)
        body.setdefault("time", utc_now())
        body["replica"] = self.replica
        with self._lock:
            try:
                conn = self._connection()
                with conn.transaction():
                    entry = self._insert(conn, body)
                    yield entry
            except AuditWriteError:
                raise
            except psycopg.Error as exc:
                self._drop()
                raise AuditWriteError(f"cannot write the audit record to PostgreSQL: {exc}") from exc

    def append(self, record: Mapping[str, Any]) -> dict[str, Any]:
        """Store one record; returns it as stored.

        Raises:
            AuditWriteError: as `appending`.
        """
        with self.appending(record) as entry:
            return entry

    def _insert(self, conn: psycopg.Connection[Any], body: dict[str, Any]) -> dict[str, Any]:
        head = conn.execute("SELECT seq, hash FROM lakegate_audit_head WHERE id = 1 FOR UPDATE").fetchone()
        if head is None:
            raise AuditWriteError("the lakegate_audit_head row is missing: the audit schema was not created")
        entry = {**body, "seq": int(head[0]) + 1, "prev_hash": str(head[1])}
        entry["hash"] = record_hash(entry)
        conn.execute(
            "INSERT INTO lakegate_audit (seq, replica, prev_hash, hash, record) VALUES (%s, %s, %s, %s, %s)",
            (entry["seq"], self.replica, entry["prev_hash"], entry["hash"], canonical_json(entry)),
        )
        conn.execute("UPDATE lakegate_audit_head SET seq = %s, hash = %s WHERE id = 1", (entry["seq"], entry["hash"]))
        return entry

    def close(self) -> None:
        """Close the connection; a later append opens a new one."""
        with self._lock:
            self._drop()


class MirroredAuditLog(AuditLog):
    """The local JSON-lines audit log, each of whose records is also in the global chain.

    Build it exactly as the file log (``MirroredAuditLog.from_settings(path, settings.audit)``:
    fsync, rotation and all), then `mirror_to` the chain; until then every append fails. The gate
    uses it as an `AuditLog`: `append` returns the local record as written, and raises
    `AuditWriteError` when either copy could not be written.
    """

    _chain: PostgresAuditChain | None = None

    def mirror_to(self, chain: PostgresAuditChain) -> MirroredAuditLog:
        """Mirror every later record into `chain`; returns this log."""
        self._chain = chain
        return self

    @property
    def chain(self) -> PostgresAuditChain | None:
        return self._chain

    def append(self, record: Mapping[str, Any]) -> dict[str, Any]:
        """Write one record to the global chain and the local file, both or neither (see module).

        Raises:
            AuditWriteError: either write failed; the call must return no data.
        """
        chain = self._chain
        if chain is None:
            raise AuditWriteError("the audit log has no PostgreSQL chain to mirror into")
        body = _plain(record)
        body.setdefault("time", utc_now())
        body["replica"] = chain.replica
        with chain.appending(body) as stored:
            return super().append({**body, "global_seq": stored["seq"]})

    def close(self) -> None:
        super().close()
        if self._chain is not None:
            self._chain.close()


class PostgresCheckpointStore:
    """The latest checkpoint of one local log's chain (`lakegate.server.audit.checkpoints.CheckpointStore`).

    ``chain`` names the local chain: the replica and its file, stable across restarts. One
    connection of its own (not the chain's, whose transaction may be open while a checkpoint is
    handed over), opened on first use and again after a failure.
    """

    def __init__(self, url: str, chain: str) -> None:
        self.url = url
        self.chain = chain
        self._lock = threading.Lock()
        self._conn: psycopg.Connection[Any] | None = None
        self._pid = os.getpid()

    def _connection(self) -> psycopg.Connection[Any]:
        if self._pid != os.getpid():
            self._conn, self._pid = None, os.getpid()  # never the parent's socket (see PostgresAuditChain)
        if self._conn is None or self._conn.closed:
            self._conn = psycopg.connect(
                self.url, autocommit=True, connect_timeout=5, application_name="lakegate", options=_SESSION_OPTIONS
            )
        return self._conn

    def publish(self, checkpoint: Checkpoint) -> Checkpoint | None:
        """Keep ``checkpoint`` as the chain's latest unless one with a higher number is kept; returns
        that one (the checkpoint file was cut back), or None when ``checkpoint`` is kept.

        Raises:
            AuditWriteError: the database cannot be reached or written, or the row kept is not a
                checkpoint.
        """
        with self._lock:
            try:
                conn = self._connection()
                stored = conn.execute(
                    "INSERT INTO lakegate_audit_checkpoint (chain, number, seq, hash, signature, checkpoint)"
                    " VALUES (%s, %s, %s, %s, %s, %s)"
                    " ON CONFLICT (chain) DO UPDATE SET number = EXCLUDED.number, seq = EXCLUDED.seq,"
                    " hash = EXCLUDED.hash, signature = EXCLUDED.signature, checkpoint = EXCLUDED.checkpoint,"
                    " stored_at = now()"
                    " WHERE lakegate_audit_checkpoint.number < EXCLUDED.number RETURNING number",
                    (
                        self.chain,
                        checkpoint.number,
                        checkpoint.seq,
                        checkpoint.hash,
                        checkpoint.signature,
                        checkpoint.line(),
                    ),
                ).fetchone()
                if stored is not None:
                    return None
                kept = _load(conn, self.chain)
            except psycopg.Error as exc:
                if self._conn is not None:
                    self._conn.close()
                self._conn = None
                raise AuditWriteError(f"cannot store the audit checkpoint in PostgreSQL: {exc}") from exc
        if kept is None or kept.digest == checkpoint.digest:
            return None  # deleted meanwhile, or this very checkpoint handed over twice
        return kept

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
            self._conn = None


def _load(conn: psycopg.Connection[Any], chain: str) -> Checkpoint | None:
    row = conn.execute("SELECT checkpoint FROM lakegate_audit_checkpoint WHERE chain = %s", (chain,)).fetchone()
    if row is None:
        return None
    try:
        return Checkpoint.model_validate_json(str(row[0]))
    except ValidationError as exc:
        raise AuditWriteError(f"the checkpoint kept in PostgreSQL for {chain} is not a checkpoint: {exc}") from exc


def load_checkpoint(url: str, chain: str) -> Checkpoint | None:
    """The latest checkpoint kept for the local chain ``chain``, or None.

    Raises:
        psycopg.Error: the database cannot be read (an unreachable server, a missing table).
        AuditWriteError: the row kept is not a checkpoint.
    """
    with psycopg.connect(url, connect_timeout=5, application_name="lakegate", autocommit=True) as conn:
        try:
            return _load(conn, chain)
        except psycopg.errors.UndefinedTable:
            return None  # no replica has run with checkpoints against this database yet


# --------------------------------------------------------------------------------------------
# Verifying
# --------------------------------------------------------------------------------------------

_Row = tuple[int, str, str, str, str]


def verify_chain(url: str) -> VerifyReport:
    """Check the whole global chain: every record's hash, the links, gaps in seq, and the head.

    Problems name the record's seq; their ``line`` is the row's position in seq order (1-based).

    Raises:
        psycopg.Error: the database cannot be read (an unreachable server, a missing table).
    """
    with psycopg.connect(url, connect_timeout=5, application_name="lakegate") as conn:
        # One snapshot for the head and the rows, however many replicas append meanwhile.
        conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        with conn.transaction():
            head = conn.execute("SELECT seq, hash FROM lakegate_audit_head WHERE id = 1").fetchone()
            with conn.cursor(name="lakegate_audit_verify") as rows:
                rows.execute("SELECT seq, replica, prev_hash, hash, record FROM lakegate_audit ORDER BY seq")
                return _check(rows, (int(head[0]), str(head[1])) if head else None)


def _check(rows: Iterable[_Row], head: tuple[int, str] | None) -> VerifyReport:
    problems: list[Problem] = []
    expected, prev = 1, GENESIS_HASH
    count, first = 0, None
    for count, (seq, replica, prev_hash, stored, text) in enumerate(rows, start=1):
        first = seq if first is None else first
        where = f"record seq {seq} (replica {replica})"
        if seq > expected:
            missing = f"seq {expected}" if seq == expected + 1 else f"seq {expected}..{seq - 1}"
            problems.append(Problem(expected, count, "deleted", f"record {missing} was deleted (before {where})"))
        try:
            record = json.loads(text)
        except ValueError:
            record = None
        if not isinstance(record, dict):
            problems.append(Problem(seq, count, "malformed", f"{where} is not a JSON object"))
        elif record_hash(record) != stored or any(
            record.get(name) != value
            for name, value in (("seq", seq), ("replica", replica), ("prev_hash", prev_hash), ("hash", stored))
        ):
            problems.append(Problem(seq, count, "edited", f"{where} was edited: its content does not match its hash"))
        elif seq == expected and prev_hash != prev:
            problems.append(
                Problem(
                    seq,
                    count,
                    "broken_chain",
                    f"{where} does not follow seq {seq - 1}: its prev_hash is not that record's hash "
                    f"(seq {seq - 1} was rewritten, or records were reordered)",
                )
            )
        expected, prev = seq + 1, stored
    last_seq = expected - 1 if count else None
    last_hash = prev if count else None
    problems.extend(_check_head(head, last_seq or 0, last_hash or GENESIS_HASH, count))
    return VerifyReport(
        ok=not problems,
        records=count,
        problems=tuple(problems),
        first_seq=first,
        last_seq=last_seq,
        last_hash=last_hash,
    )


def _check_head(head: tuple[int, str] | None, last_seq: int, last_hash: str, count: int) -> list[Problem]:
    if head is None:
        return [Problem(None, count + 1, "deleted", "the chain's head row is missing")]
    head_seq, head_hash = head
    if head_seq > last_seq:
        missing = f"seq {head_seq}" if head_seq == last_seq + 1 else f"seq {last_seq + 1}..{head_seq}"
        return [
            Problem(
                last_seq + 1,
                count + 1,
                "deleted",
                f"record {missing} was deleted: the chain ends at seq {last_seq} but its head is at {head_seq}",
            )
        ]
    if (head_seq, head_hash) != (last_seq, last_hash):
        return [
            Problem(
                head_seq,
                count + 1,
                "broken_chain",
                f"the head (seq {head_seq}) does not match the last record (seq {last_seq}): it was rewritten",
            )
        ]
    return []
