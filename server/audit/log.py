"""lakegate's tamper-evident audit log: one hash-chained JSON line per tool call.

Every record carries ``seq`` (1, 2, 3, ...), ``prev_hash`` (the previous record's ``hash``,
`GENESIS_HASH` for the first) and ``hash``: the sha256 of the record's canonical JSON without
``hash`` (`canonical_json`). Editing, deleting, inserting or reordering lines therefore breaks
either a record's own hash or the links between records, and `verify` says which record.

What the chain cannot show on its own: removing records from the *end* of the log (the rest is
still a valid chain), or rewriting the last record and recomputing its hash. Signed checkpoints
(`Checkpointing`, `lakegate.server.audit.checkpoints`) cover that: after every ``every`` records (in the
same locked append as the record that reaches the count), at most ``interval_s`` after a record
was written (a daemon thread of the log's own) and when the log is closed, the head's seq and hash
are signed with a key kept outside the log's directory; `verify` then reports records cut back
past the last checkpoint. What is newer than the last checkpoint is the window: fewer than
``every`` records, written within the last ``interval_s`` seconds. A checkpoint that cannot be
written is logged (``audit.checkpoint_failed``) and never fails the call: the record is written.
In production the latest checkpoint is also handed to a `CheckpointStore` (PostgreSQL), from the
thread, off the request path. An anchor kept by hand works as well: pass the last ``hash`` and
``seq`` to ``verify(path, expect_last_hash=..., expect_records=...)``.

Writing goes through a structlog logger of its own (not the global configuration, which other
code may point at a console): small processors normalise the record and add ``seq``, ``time``
and the chain, a JSON renderer turns it into one line, and a file sink writes it. Several threads
and several processes may append to the same file: a lock and ``fcntl.flock`` serialise them.

Rotation (`Rotation`): once the active file is big or old enough, the writer that notices, under
the same flock as its append, gives it a name from its first and last seq and lists it in the
manifest (`lakegate.server.audit.files`); a new active file takes its place and the chain goes on in it
(seq last+1, ``prev_hash`` the rotated file's last hash). The old file first gets its rotated name
as a hard link, then a new empty file, already locked by the rotating writer, is renamed over the
active name: the active name always exists, and a writer that opened (or was waiting to lock) the
old file sees after locking that the name now points at another file and opens that one, so
nothing is ever appended to a rotated file. A crash half-way leaves the active file with a second,
rotated name; the next writer removes that name (and its manifest entry) and rotates again later.
Retention (``keep_files``) deletes the oldest rotated files and marks them pruned in the manifest.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import threading
import time
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog
from structlog.typing import EventDict, WrappedLogger

from lakegate.errors import AuditWriteError
from lakegate.server.audit.checkpoints import Checkpoint, Checkpointing, CheckpointStore, CheckpointWriter, SigningKey
from lakegate.server.audit.files import (
    LogNames,
    Manifest,
    ManifestEntry,
    ManifestError,
    chain_tail,
    fsync_dir,
    load_manifest,
    log_files,
    read_all_records,
    save_manifest,
)
from lakegate.server.audit.records import (
    GENESIS_HASH,
    AuditFormatError,
    canonical_json,
    chain_point,
    read_first_line,
    read_last_line,
    read_records,
    record_hash,
)
from lakegate.server.audit.verify import FileReport, Problem, ProblemKind, VerifyReport, verify

if TYPE_CHECKING:
    from lakegate.server.settings import AuditSettings

__all__ = [
    "GENESIS_HASH",
    "AuditFormatError",
    "AuditLog",
    "Checkpointing",
    "FileReport",
    "Problem",
    "ProblemKind",
    "Rotation",
    "VerifyReport",
    "canonical_json",
    "log_files",
    "read_all_records",
    "read_records",
    "record_hash",
    "utc_now",
    "verify",
]

log = structlog.get_logger(__name__)

# Fields the log owns; a caller's values for them are replaced (except "time", which is kept).
_CHAIN_FIELDS = ("seq", "prev_hash", "hash")
#: How often a writer reopens the active file because another process rotated it meanwhile.
_REOPEN_ATTEMPTS = 50
#: After a failed rotation, appends go on into the active file and rotation is retried this much later.
_ROTATE_RETRY_S = 60.0
#: A checkpoint the store refused to take (unreachable) is offered again this much later.
_PUBLISH_RETRY_S = 5.0
#: How long `close` waits for the checkpoint thread to finish what it is doing.
_WORKER_JOIN_S = 10.0


@dataclass(frozen=True)
class Rotation:
    """When the active file is rotated, and how many rotated files are kept (None: no limit)."""

    max_bytes: int | None = None  # rotate before an append once the file holds this many bytes
    max_age_s: float | None = None  # ... or once its first record is this many seconds old
    keep_files: int | None = None  # rotated files kept; older ones are deleted and marked pruned


def utc_now() -> str:
    """Now, as the log writes times: ISO 8601 in UTC, to the microsecond."""
    return datetime.now(UTC).isoformat(timespec="microseconds")


class _ChainState:
    """The tail of the chain as this process last saw it, plus the record being written."""

    def __init__(self) -> None:
        self.last_seq = 0
        self.last_hash = GENESIS_HASH
        self.size: int | None = None  # file size after our last write; None: never looked
        self.written: dict[str, Any] | None = None
        self.started: tuple[int, float | None] | None = None  # (inode, time of its first record)
        self.links_checked: int | None = None  # inode whose extra names were already looked at


class _FileSink:
    """The structlog "logger" at the end of the chain: writes the rendered line to the file.

    Unbuffered ``os.write`` on an ``O_APPEND`` descriptor: the bytes reach the kernel while the
    flock is held, and there is no Python buffer that a forked child could flush a second time.
    """

    def __init__(self) -> None:
        self.fd: int | None = None

    def msg(self, message: str) -> None:
        assert self.fd is not None, "the sink is only called from inside AuditLog.append"
        view = memoryview(message.encode("utf-8") + b"\n")
        while view:
            view = view[os.write(self.fd, view) :]


class _AuditLogger(structlog.BoundLoggerBase):
    """A wrapper with one method that takes the record as a dict.

    Not ``_proxy_to_logger``: its keyword arguments would clash with record keys such as
    "event", and it swallows ``DropEvent``, while an audit record must be written or fail.
    """

    def write(self, record: dict[str, Any]) -> None:
        args, kwargs = self._process_event("msg", None, record)
        self._logger.msg(*args, **kwargs)


class AuditLog:
    """An append-only, hash-chained JSON-lines file, rotated into a set of files by ``rotation``.

    ``fsync=True`` makes every record survive a machine crash, at the cost of one disk flush per
    call; with ``False`` a record survives a process crash (it is always flushed to the OS).
    """

    def __init__(
        self,
        path: Path,
        *,
        fsync: bool = True,
        rotation: Rotation | None = None,
        checkpoints: Checkpointing | None = None,
    ) -> None:
        self.path = Path(path)
        self.fsync = fsync
        self.rotation = rotation or Rotation()
        self.checkpointing = checkpoints if checkpoints is not None and checkpoints.enabled else None
        self._checkpoints: CheckpointWriter | None = None
        if self.checkpointing is not None:
            self._checkpoints = CheckpointWriter(self.path, SigningKey(self.checkpointing.key), fsync=fsync)
        self._store: CheckpointStore | None = None
        self._worker: _CheckpointWorker | None = None
        self._wrote = False  # whether this object appended a record (close then signs a checkpoint)
        self._names = LogNames(self.path)
        self._lock = threading.Lock()
        self._state = _ChainState()
        self._sink = _FileSink()
        self._fd: int | None = None
        self._rotate_failed_at: float | None = None
        self._logger: _AuditLogger = structlog.wrap_logger(
            self._sink,
            processors=[self._normalise, self._add_sequence, _add_time, self._add_chain, self._render],
            wrapper_class=_AuditLogger,
            context_class=dict,
            cache_logger_on_first_use=False,
        )
        # A forked child must not reuse the parent's open file: flock locks belong to the open
        # file description, which parent and child would share, so they would not exclude each
        # other. A weak reference so that the fork hook does not keep every log alive.
        ref = weakref.ref(self)
        os.register_at_fork(after_in_child=lambda: _forget_after_fork(ref))

    @classmethod
    def from_settings(cls, path: Path, settings: AuditSettings, *, signing_key: Path | None = None) -> AuditLog:
        """The log at ``path`` with the fsync, rotation and checkpoints of ``settings``; checkpoints
        only with ``signing_key``, the private key file (kept outside the log's directory)."""
        rotation = Rotation(settings.rotate_bytes, settings.rotate_age, settings.keep_files)
        checkpoints = None
        if signing_key is not None:
            checkpoints = Checkpointing(signing_key, settings.checkpoint_every, settings.checkpoint_interval)
        return cls(path, fsync=settings.fsync, rotation=rotation, checkpoints=checkpoints)

    def publish_checkpoints_to(self, store: CheckpointStore) -> None:
        """Hand every later checkpoint to ``store`` too (from the checkpoint thread); `close` closes it."""
        self._store = store

    # -- processors: each takes and returns the event dict -------------------------------------

    def _normalise(self, _: WrappedLogger, __: str, event: EventDict) -> EventDict:
        # Round-trip through strict JSON: refuses what cannot be logged faithfully (objects, NaN,
        # cycles) instead of stringifying it, and returns exactly what a reader will read back.
        plain: dict[str, Any] = json.loads(canonical_json(event))
        for name in _CHAIN_FIELDS:
            plain.pop(name, None)
        return plain

    def _add_sequence(self, _: WrappedLogger, __: str, event: EventDict) -> EventDict:
        event["seq"] = self._state.last_seq + 1
        return event

    def _add_chain(self, _: WrappedLogger, __: str, event: EventDict) -> EventDict:
        event["prev_hash"] = self._state.last_hash
        event["hash"] = record_hash(event)
        self._state.written = dict(event)
        return event

    def _render(self, _: WrappedLogger, __: str, event: EventDict) -> str:
        return canonical_json(event)

    # -- the file ------------------------------------------------------------------------------

    def _open(self) -> int:
        if self._fd is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # O_APPEND: every write lands at the end, whoever else wrote; O_RDWR to read the tail.
            self._fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
            self._state.size = None
        return self._fd

    def _drop_fd(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None
        self._state.size = None

    def _is_active(self, fd: int) -> bool:
        """Whether ``fd`` is still the file the active name points at (not rotated away)."""
        try:
            named = os.stat(self.path)
        except FileNotFoundError:
            return False
        mine = os.fstat(fd)
        return (named.st_ino, named.st_dev) == (mine.st_ino, mine.st_dev)

    def _lock_active(self) -> int:
        """Open and lock the active file; reopen when another process rotated it meanwhile.

        Raises:
            AuditWriteError: it cannot be opened or locked.
        """
        for _ in range(_REOPEN_ATTEMPTS):
            try:
                fd = self._open()
            except OSError as exc:
                raise AuditWriteError(f"cannot open audit log {self.path}: {exc}") from exc
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
            except OSError as exc:
                raise AuditWriteError(f"cannot lock audit log {self.path}: {exc}") from exc
            try:
                if self._is_active(fd):
                    return fd
            except OSError as exc:
                fcntl.flock(fd, fcntl.LOCK_UN)
                raise AuditWriteError(f"cannot check audit log {self.path}: {exc}") from exc
            # Rotated while we waited: the lock we hold is on a file that is no longer appended to.
            fcntl.flock(fd, fcntl.LOCK_UN)
            self._drop_fd()
        raise AuditWriteError(f"audit log {self.path} was replaced {_REOPEN_ATTEMPTS} times while locking it")

    def _sync_tail(self, fd: int) -> None:
        """Continue the chain from the file's last record if someone else wrote since we did."""
        size = os.fstat(fd).st_size
        if size == self._state.size:
            return
        last = read_last_line(fd, size)
        if last is None:
            # A new active file continues the chain of the file rotated before it.
            self._state.last_seq, self._state.last_hash = chain_tail(self.path)
        else:
            seq, _, digest = chain_point(last)
            self._state.last_seq, self._state.last_hash = seq, digest
        self._state.size = size

    def append(self, record: Mapping[str, Any]) -> dict[str, Any]:
        """Write one record and return it as written (with seq, time, prev_hash and hash).

        ``seq``, ``prev_hash`` and ``hash`` in ``record`` are replaced; ``time`` is kept if given.
        The active file is rotated first when `Rotation` says so; a failed rotation is logged and
        the record goes into the active file.

        Raises:
            AuditWriteError: the record was not written: the file or its directory cannot be
                created or written, the disk is full, a value is not JSON-serialisable (objects,
                NaN, non-string keys that clash), or the log's last line is not a valid record (a
                torn write: the log needs repair before anything is appended). The cause is
                chained. A partly written line is cut off again, so the file stays a valid chain.
        """
        with self._lock:
            fd = self._lock_active()
            try:
                return self._append_locked(fd, record)
            finally:
                # The active file may have changed (rotation): unlock the one we hold now.
                if self._fd is not None:
                    fcntl.flock(self._fd, fcntl.LOCK_UN)

    def _append_locked(self, fd: int, record: Mapping[str, Any]) -> dict[str, Any]:
        try:
            self._undo_interrupted_rotation(fd)
            self._sync_tail(fd)
        except (OSError, AuditFormatError, ManifestError) as exc:
            self._state.size = None
            raise AuditWriteError(f"cannot continue the chain of {self.path}: {exc}") from exc
        if self._rotation_due(fd):
            fd = self._rotate_or_stay(fd)
        before = self._state.size
        assert before is not None
        self._state.written = None
        self._sink.fd = fd
        try:
            self._logger.write(dict(record))
            if self.fsync:
                os.fsync(fd)
        except Exception as exc:
            self._roll_back(fd, before)
            raise AuditWriteError(f"cannot write audit record to {self.path}: {exc}") from exc
        finally:
            self._sink.fd = None
        written = self._state.written
        assert written is not None
        self._state.last_seq, self._state.last_hash = written["seq"], written["hash"]
        self._state.size = os.fstat(fd).st_size
        self._after_append()
        return dict(written)

    def _roll_back(self, fd: int, size: int) -> None:
        # The caller treats a failed append as "no record": cut off whatever part of the line
        # reached the file (or a line whose fsync failed), so the chain does not hold a record
        # for a call that was refused. Best effort: if even that fails, verify will report it.
        self._state.size = None
        with contextlib.suppress(OSError):
            os.ftruncate(fd, size)

    # -- rotation (always with the active file locked) -------------------------------------------

    def _rotation_due(self, fd: int) -> bool:
        size = self._state.size
        if not size:
            return False
        if self._rotate_failed_at is not None and time.monotonic() - self._rotate_failed_at < _ROTATE_RETRY_S:
            return False
        rotation = self.rotation
        if rotation.max_bytes is not None and size >= rotation.max_bytes:
            return True
        if rotation.max_age_s is not None:
            started = self._started(fd)
            return started is not None and time.time() - started >= rotation.max_age_s
        return False

    def _started(self, fd: int) -> float | None:
        """When the active file's first record was written (its ``time``), cached per file."""
        inode = os.fstat(fd).st_ino
        if self._state.started is not None and self._state.started[0] == inode:
            return self._state.started[1]
        started: float | None = None
        with contextlib.suppress(OSError, ValueError, TypeError, KeyError, AttributeError):
            first = read_first_line(fd)
            if first is not None:
                started = datetime.fromisoformat(json.loads(first)["time"]).timestamp()
        self._state.started = (inode, started)
        return started

    def _rotate_or_stay(self, fd: int) -> int:
        try:
            fd = self._rotate(fd)
        except (OSError, AuditFormatError, ManifestError, ValueError) as exc:
            # Not a reason to lose the record: it goes into the active file, which stays a valid chain.
            self._rotate_failed_at = time.monotonic()
            log.warning("audit.rotate_failed", path=str(self.path), error=f"{type(exc).__name__}: {exc}")
            return fd
        self._rotate_failed_at = None
        try:
            self._prune()
        except (OSError, ManifestError) as exc:
            log.warning("audit.prune_failed", path=str(self.path), error=f"{type(exc).__name__}: {exc}")
        return fd

    def _rotate(self, fd: int) -> int:
        """Give the active file its rotated name and put a new, locked, empty active file in its place.

        Returns the new file's descriptor, locked; on failure the old one is still the active
        file, still locked.
        """
        state = self._state
        first = read_first_line(fd)
        if first is None or state.size is None:
            return fd
        first_seq, first_prev, _ = chain_point(first)
        target = self._names.rotated(first_seq, state.last_seq)
        manifest = load_manifest(self._names) or Manifest(active=self.path.name)
        entry = ManifestEntry(
            name=target.name,
            first_seq=first_seq,
            last_seq=state.last_seq,
            first_prev_hash=first_prev,
            last_hash=state.last_hash,
            records=state.last_seq - first_seq + 1,
            bytes=state.size,
            rotated_at=utc_now(),
        )
        fresh = self._names.temporary(self.path.name)
        new_fd = os.open(fresh, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o640)
        try:
            fcntl.flock(new_fd, fcntl.LOCK_EX)
            os.link(self.path, target)
            try:
                save_manifest(
                    self._names, manifest.model_copy(update={"files": (*manifest.files, entry)}), fsync=self.fsync
                )
                os.replace(fresh, self.path)
            except BaseException:
                state.links_checked = None
                with contextlib.suppress(OSError, ManifestError):
                    self._undo_interrupted_rotation(fd)
                raise
        except BaseException:
            os.close(new_fd)
            with contextlib.suppress(OSError):
                fresh.unlink()
            raise
        if self.fsync:
            fsync_dir(self._names.directory)
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
        self._fd = new_fd
        # The chain (last seq and hash) goes on unchanged in the new file.
        state.size, state.started, state.links_checked = 0, None, None
        log.info("audit.rotated", path=str(self.path), rotated=target.name, last_seq=state.last_seq)
        return new_fd

    def _undo_interrupted_rotation(self, fd: int) -> None:
        """Remove rotated names that still point at the active file (a rotation that did not finish)."""
        mine = os.fstat(fd)
        if mine.st_nlink <= 1 or self._state.links_checked == mine.st_ino:
            return
        for name in os.listdir(self._names.directory):
            if self._names.parse_rotated(name) is None:
                continue
            other = self._names.directory / name
            try:
                theirs = os.stat(other)
            except FileNotFoundError:
                continue
            if (theirs.st_ino, theirs.st_dev) != (mine.st_ino, mine.st_dev):
                continue
            # The manifest first: a crash between the two leaves a name the next writer removes.
            manifest = load_manifest(self._names)
            if manifest is not None and manifest.entry(name) is not None:
                kept = tuple(entry for entry in manifest.files if entry.name != name)
                save_manifest(self._names, manifest.model_copy(update={"files": kept}), fsync=self.fsync)
            other.unlink()
            log.warning("audit.rotation_undone", path=str(self.path), name=name)
        self._state.links_checked = mine.st_ino

    def _prune(self) -> None:
        """Delete rotated files beyond ``keep_files``, oldest first, marking them pruned in the manifest."""
        keep = self.rotation.keep_files
        if keep is None:
            return
        manifest = load_manifest(self._names)
        if manifest is None:
            return
        live = [entry for entry in manifest.files if not entry.pruned]
        doomed = {entry.name for entry in live[: max(0, len(live) - keep)]}
        if doomed:
            now = utc_now()
            files = tuple(
                entry.model_copy(update={"pruned_at": now}) if entry.name in doomed else entry
                for entry in manifest.files
            )
            # Marked before deleted: a crash in between leaves a pruned file that the next prune deletes.
            manifest = manifest.model_copy(update={"files": files})
            save_manifest(self._names, manifest, fsync=self.fsync)
        for entry in manifest.files:
            if entry.pruned:
                with contextlib.suppress(FileNotFoundError):
                    (self._names.directory / entry.name).unlink()

    # -- checkpoints (lakegate.server.audit.checkpoints) ------------------------------------------------

    def _after_append(self) -> None:
        """Sign a checkpoint when ``every`` records are uncovered, else make sure the thread will.

        Never raises: the record is written, and a checkpoint's failure must not fail the call
        (it widens the window until the next checkpoint, which the server log says).
        """
        writer, policy = self._checkpoints, self.checkpointing
        if writer is None or policy is None:
            return
        state = self._state
        self._wrote = True
        try:
            last = writer.last()
            covered = last.seq if last is not None else 0
            behind = state.last_seq < covered
            if behind:
                # Only a log cut back past its own checkpoint gets here: sign at once, so that the
                # step back stays in the checkpoint file whatever happens to the log later.
                log.error("audit.log_behind_checkpoint", path=str(self.path), seq=state.last_seq, checkpoint=covered)
            if behind or (policy.every is not None and state.last_seq - covered >= policy.every):
                self._hand_over(self._write_checkpoint())
                return
        except (AuditWriteError, RuntimeError) as exc:  # RuntimeError: no thread could be started
            log.error("audit.checkpoint_failed", path=str(self.path), error=str(exc))
        if policy.interval_s is not None:
            try:
                self._running_worker().record_written()
            except RuntimeError as exc:
                log.error("audit.checkpoint_failed", path=str(self.path), error=str(exc))

    def _write_checkpoint(self) -> Checkpoint:
        """Sign the head as this process sees it; the caller holds the lock and the flock.

        Raises:
            AuditWriteError: as `CheckpointWriter.write`.
        """
        assert self._checkpoints is not None
        return self._checkpoints.write(self._state.last_seq, self._state.last_hash, utc_now())

    def _hand_over(self, checkpoint: Checkpoint) -> None:
        if self._store is not None:
            self._running_worker().publish(checkpoint)

    def _running_worker(self) -> _CheckpointWorker:
        if self._worker is None:
            assert self.checkpointing is not None
            self._worker = _CheckpointWorker(self, self.checkpointing.interval_s)
        return self._worker

    def checkpoint(self) -> Checkpoint | None:
        """Sign a checkpoint of the chain's head now, unless the last checkpoint already covers it,
        and hand it to the store. Returns the new checkpoint, or None (nothing new, no records, or
        checkpoints are off).

        Raises:
            AuditWriteError: the head cannot be read, the checkpoint cannot be written, or the store
                cannot take it (the checkpoint is in the file then).
        """
        writer = self._checkpoints
        if writer is None or (self._fd is None and not self.path.exists()):
            return None  # nothing to sign, and no reason to create an empty log
        with self._lock:
            fd = self._lock_active()
            try:
                try:
                    self._sync_tail(fd)
                except (OSError, AuditFormatError, ManifestError) as exc:
                    self._state.size = None
                    raise AuditWriteError(f"cannot read the head of {self.path}: {exc}") from exc
                last = writer.last()
                head = (self._state.last_seq, self._state.last_hash)
                if head[0] == 0 or (last is not None and (last.seq, last.hash) == head):
                    return None
                checkpoint = self._write_checkpoint()
            finally:
                if self._fd is not None:
                    fcntl.flock(self._fd, fcntl.LOCK_UN)
        # The store is another system (PostgreSQL): not while every writer of the log waits.
        self._publish(checkpoint)
        return checkpoint

    def _publish(self, checkpoint: Checkpoint) -> None:
        """Hand ``checkpoint`` to the store; a later one kept there raises the writer's floor.

        Raises:
            AuditWriteError: the store cannot take it.
        """
        store = self._store
        if store is None:
            return
        ahead = store.publish(checkpoint)
        if ahead is not None and ahead.digest != checkpoint.digest:
            # The store keeps a later checkpoint than the file has: the file was cut back. Number
            # the next checkpoints above it and leave one number out, so that a gap stays in the
            # file as evidence after the store moves on (a next number equal to the kept one
            # would look like an unbroken file).
            log.error(
                "audit.checkpoint_file_cut",
                path=str(self.path),
                written=checkpoint.number,
                kept=ahead.number,
                kept_seq=ahead.seq,
            )
            with self._lock:
                assert self._checkpoints is not None
                self._checkpoints.floor = max(self._checkpoints.floor, ahead.number + 1)

    def _checkpoint_quietly(self) -> None:
        try:
            self.checkpoint()
        except AuditWriteError as exc:
            log.error("audit.checkpoint_failed", path=str(self.path), error=str(exc))

    def _publish_quietly(self, checkpoint: Checkpoint) -> bool:
        try:
            self._publish(checkpoint)
        except AuditWriteError as exc:
            log.warning("audit.checkpoint_publish_failed", path=str(self.path), error=str(exc))
            return False
        return True

    def close(self) -> None:
        """Sign a last checkpoint if records are uncovered, then close the file (and the store);
        a later append opens it again. A checkpoint that cannot be written is logged."""
        worker, self._worker = self._worker, None
        pending = worker.stop() if worker is not None else None
        if pending is not None:
            self._publish_quietly(pending)
        if self._wrote:
            self._checkpoint_quietly()
        if self._store is not None:
            self._store.close()
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def _add_time(_: WrappedLogger, __: str, event: EventDict) -> EventDict:
    event.setdefault("time", utc_now())
    return event


class _CheckpointWorker:
    """A daemon thread per log: signs the checkpoint that ``interval_s`` after a record asks for,
    and hands checkpoints to the store, so that neither waits on a tool call's path.

    It holds the log only weakly, and stops when the log is closed or collected.
    """

    def __init__(self, audit_log: AuditLog, interval_s: float | None) -> None:
        self._log = weakref.ref(audit_log)
        self._interval = interval_s
        self._cond = threading.Condition()
        self._due: float | None = None  # when the oldest uncovered record reaches interval_s
        self._pending: Checkpoint | None = None  # the newest checkpoint the store has not taken
        self._retry_at = 0.0
        self._stopped = False
        self._pid = os.getpid()
        self._thread = threading.Thread(target=self._run, name="lakegate-audit-checkpoints", daemon=True)
        # Stop the thread when the log is collected without being closed; at exit daemon threads end anyway.
        weakref.finalize(audit_log, self._halt).atexit = False
        self._thread.start()

    def record_written(self) -> None:
        if self._interval is None:
            return
        with self._cond:
            if self._due is None:
                self._due = time.monotonic() + self._interval
                self._cond.notify()

    def publish(self, checkpoint: Checkpoint) -> None:
        with self._cond:
            # The store keeps only the latest, so a newer checkpoint replaces one still waiting.
            if self._pending is None or checkpoint.number > self._pending.number:
                self._pending = checkpoint
            self._cond.notify()

    def _halt(self) -> None:
        if os.getpid() != self._pid:
            return  # a forked child's copy: its thread never ran here, and its lock may be held for good
        with self._cond:
            self._stopped = True
            self._cond.notify()

    def stop(self) -> Checkpoint | None:
        """Stop the thread (waiting for what it is doing); returns what it had not handed over."""
        self._halt()
        if self._thread is not threading.current_thread():
            self._thread.join(_WORKER_JOIN_S)
        with self._cond:
            pending, self._pending = self._pending, None
        return pending

    def _next(self) -> tuple[bool, Checkpoint | None] | None:
        """Wait for work: (sign a checkpoint?, checkpoint to hand over), or None to stop."""
        with self._cond:
            while not self._stopped:
                now = time.monotonic()
                sign = self._due is not None and now >= self._due
                pending = self._pending if self._pending is not None and now >= self._retry_at else None
                if sign or pending is not None:
                    if sign:
                        self._due = None
                    if pending is not None:
                        self._pending = None
                    return sign, pending
                waits = [self._due - now] if self._due is not None else []
                if self._pending is not None:
                    waits.append(self._retry_at - now)
                self._cond.wait(min(waits) if waits else None)
            return None

    def _run(self) -> None:
        while (job := self._next()) is not None:
            sign, pending = job
            audit_log = self._log()
            if audit_log is None:
                return
            if sign:
                audit_log._checkpoint_quietly()
            if pending is not None and not audit_log._publish_quietly(pending):
                with self._cond:
                    if self._pending is None:
                        self._pending = pending
                    self._retry_at = time.monotonic() + _PUBLISH_RETRY_S
            del audit_log  # hold the log only while working for it


def _forget_after_fork(ref: weakref.ref[AuditLog]) -> None:
    audit_log = ref()
    if audit_log is None:
        return
    audit_log._lock = threading.Lock()  # another thread may have held it at fork time
    audit_log._worker = None  # its thread did not survive the fork; the next append starts one
    if audit_log._fd is not None:
        # Closing our copy of the descriptor leaves the parent's lock alone (never LOCK_UN).
        with contextlib.suppress(OSError):
            os.close(audit_log._fd)
        audit_log._fd = None
    audit_log._state.size = None
