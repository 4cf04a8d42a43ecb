"""lakegate's tamper-evident audit log: one hash-chained JSON line per tool call.

Every record carries ``seq`` (1, 2, 3, ...), ``prev_hash`` (the previous record's ``hash``,
`GENESIS_HASH` for the first) and ``hash``: the sha256 of the record's canonical JSON without
``hash`` (`canonical_json`). Editing, deleting, inserting or reordering lines therefore breaks
either a record's own hash or the links between records, and `verify` says which record.

What the chain cannot show on its own: removing records from the *end* of the log (the rest is
still a valid chain), or rewriting the last record and recomputing its hash. Keep the last
``hash`` and ``seq`` somewhere else (another system, a ticket, a signed note) and pass them to
``verify(path, expect_last_hash=..., expect_records=...)`` to detect that too.

Writing goes through a structlog logger of its own (not the global configuration, which other
code may point at a console): small processors normalise the record and add ``seq``, ``time``
and the chain, a JSON renderer turns it into one line, and a file sink writes it. Several threads
and several processes may append to the same file: a lock and ``fcntl.flock`` serialise them.

Rotation (`Rotation`): once the active file is big or old enough, the writer that notices, under
the same flock as its append, gives it a name from its first and last seq and lists it in the
manifest (`server.audit_files`); a new active file takes its place and the chain goes on in it
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

from server.audit_files import (
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
from server.audit_records import (
    GENESIS_HASH,
    AuditFormatError,
    canonical_json,
    chain_point,
    read_first_line,
    read_last_line,
    read_records,
    record_hash,
)
from server.audit_verify import FileReport, Problem, ProblemKind, VerifyReport, verify
from server.errors import AuditWriteError

if TYPE_CHECKING:
    from server.settings import AuditSettings

__all__ = [
    "GENESIS_HASH",
    "AuditFormatError",
    "AuditLog",
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

    def __init__(self, path: Path, *, fsync: bool = True, rotation: Rotation | None = None) -> None:
        self.path = Path(path)
        self.fsync = fsync
        self.rotation = rotation or Rotation()
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
    def from_settings(cls, path: Path, settings: AuditSettings) -> AuditLog:
        """The log at ``path`` with the fsync and rotation of ``settings``."""
        rotation = Rotation(settings.rotate_bytes, settings.rotate_age, settings.keep_files)
        return cls(path, fsync=settings.fsync, rotation=rotation)

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

    def close(self) -> None:
        """Close the file; a later append opens it again."""
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


def _forget_after_fork(ref: weakref.ref[AuditLog]) -> None:
    audit_log = ref()
    if audit_log is None:
        return
    audit_log._lock = threading.Lock()  # another thread may have held it at fork time
    if audit_log._fd is not None:
        # Closing our copy of the descriptor leaves the parent's lock alone (never LOCK_UN).
        with contextlib.suppress(OSError):
            os.close(audit_log._fd)
        audit_log._fd = None
    audit_log._state.size = None
