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
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import threading
import weakref
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, TypeGuard

import structlog
from structlog.typing import EventDict, WrappedLogger

from server.errors import AuditWriteError, ServerError

__all__ = [
    "GENESIS_HASH",
    "AuditFormatError",
    "AuditLog",
    "Problem",
    "ProblemKind",
    "VerifyReport",
    "canonical_json",
    "read_records",
    "record_hash",
    "verify",
]

GENESIS_HASH = "0" * 64

# Fields the log owns; a caller's values for them are replaced (except "time", which is kept).
_CHAIN_FIELDS = ("seq", "prev_hash", "hash")


class AuditFormatError(ServerError):
    """A line of the audit log is not a JSON object (torn write, manual edit, wrong file)."""

    outcome = "audit_error"

    def __init__(self, line: int | None, reason: str) -> None:
        # line is None for the tail read while appending, where lines are not counted.
        where = f"line {line}" if line is not None else "the last line"
        super().__init__(f"audit log {where} is not a valid record: {reason}")
        self.line = line
        self.reason = reason


def canonical_json(value: Any) -> str:
    """The one JSON spelling a record's hash is computed over.

    Raises:
        TypeError: a value is not JSON-serialisable (or a dict mixes key types).
        ValueError: a float is NaN or infinite (not JSON), or a container refers to itself.
    """
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def record_hash(record: Mapping[str, Any]) -> str:
    """sha256 hex of the canonical JSON of ``record`` without its ``hash`` field.

    Raises:
        TypeError, ValueError: as `canonical_json`.
    """
    body = {k: v for k, v in record.items() if k != "hash"}
    return hashlib.sha256(canonical_json(body).encode("utf-8")).hexdigest()


def _utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


class _ChainState:
    """The tail of the chain as this process last saw it, plus the record being written."""

    def __init__(self) -> None:
        self.last_seq = 0
        self.last_hash = GENESIS_HASH
        self.size: int | None = None  # file size after our last write; None: never looked
        self.written: dict[str, Any] | None = None


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
    """An append-only, hash-chained JSON-lines file.

    ``fsync=True`` makes every record survive a machine crash, at the cost of one disk flush per
    call; with ``False`` a record survives a process crash (it is always flushed to the OS).
    """

    def __init__(self, path: Path, *, fsync: bool = True) -> None:
        self.path = Path(path)
        self.fsync = fsync
        self._lock = threading.Lock()
        self._state = _ChainState()
        self._sink = _FileSink()
        self._fd: int | None = None
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

    def _sync_tail(self, fd: int) -> None:
        """Continue the chain from the file's last record if someone else wrote since we did."""
        size = os.fstat(fd).st_size
        if size == self._state.size:
            return
        last = _read_last_line(fd, size)
        if last is None:
            self._state.last_seq, self._state.last_hash = 0, GENESIS_HASH
        else:
            seq, digest = _chain_point(last)
            self._state.last_seq, self._state.last_hash = seq, digest
        self._state.size = size

    def append(self, record: Mapping[str, Any]) -> dict[str, Any]:
        """Write one record and return it as written (with seq, time, prev_hash and hash).

        ``seq``, ``prev_hash`` and ``hash`` in ``record`` are replaced; ``time`` is kept if given.

        Raises:
            AuditWriteError: the record was not written: the file or its directory cannot be
                created or written, the disk is full, a value is not JSON-serialisable (objects,
                NaN, non-string keys that clash), or the log's last line is not a valid record (a
                torn write: the log needs repair before anything is appended). The cause is
                chained. A partly written line is cut off again, so the file stays a valid chain.
        """
        with self._lock:
            try:
                fd = self._open()
            except OSError as exc:
                raise AuditWriteError(f"cannot open audit log {self.path}: {exc}") from exc
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
            except OSError as exc:
                raise AuditWriteError(f"cannot lock audit log {self.path}: {exc}") from exc
            try:
                return self._append_locked(fd, record)
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)

    def _append_locked(self, fd: int, record: Mapping[str, Any]) -> dict[str, Any]:
        try:
            self._sync_tail(fd)
        except (OSError, AuditFormatError) as exc:
            self._state.size = None
            raise AuditWriteError(f"cannot continue the chain of {self.path}: {exc}") from exc
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
    event.setdefault("time", _utc_now())
    return event


def _forget_after_fork(ref: weakref.ref[AuditLog]) -> None:
    log = ref()
    if log is None:
        return
    log._lock = threading.Lock()  # another thread may have held it at fork time
    if log._fd is not None:
        # Closing our copy of the descriptor leaves the parent's lock alone (never LOCK_UN).
        with contextlib.suppress(OSError):
            os.close(log._fd)
        log._fd = None
    log._state.size = None


def _read_last_line(fd: int, size: int) -> bytes | None:
    """The last line of the file, or None for an empty file.

    Raises:
        AuditFormatError: the file does not end with a newline (a torn or foreign write).
    """
    if size == 0:
        return None
    chunk = 8192
    end = size
    buf = b""
    while True:
        start = max(0, end - chunk)
        buf = os.pread(fd, end - start, start) + buf
        if not buf.endswith(b"\n"):
            raise AuditFormatError(None, "no newline at the end (an interrupted write?)")
        cut = buf.rfind(b"\n", 0, len(buf) - 1)
        if cut >= 0:
            return buf[cut + 1 : -1]
        if start == 0:
            return buf[:-1]
        end = start


def _chain_point(line: bytes) -> tuple[int, str]:
    """(seq, hash) of a raw record line.

    Raises:
        AuditFormatError: the line is not a record with an integer seq and a hex hash.
    """
    try:
        record = json.loads(line)
    except ValueError as exc:
        raise AuditFormatError(None, f"not JSON ({exc})") from exc
    entry = _Entry.from_record(-1, record)
    if entry is None:
        raise AuditFormatError(None, "no valid seq, prev_hash and hash")
    return entry.seq, entry.stored


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


def read_records(path: Path) -> Iterator[dict[str, Any]]:
    """Yield each record of the log in file order.

    Raises:
        FileNotFoundError: there is no such file.
        OSError: the file cannot be read.
        AuditFormatError: a line (its number is ``.line``, 1-based) is not a JSON object,
            including a blank line or a torn last line.
    """
    with open(path, "rb") as file:
        for number, raw in enumerate(file, start=1):
            yield _parse_line(number, raw)


def _parse_line(number: int, raw: bytes) -> dict[str, Any]:
    if not raw.endswith(b"\n"):
        raise AuditFormatError(number, "no newline at the end (an interrupted write?)")
    try:
        value = json.loads(raw)
    except ValueError as exc:
        raise AuditFormatError(number, f"not JSON ({exc})") from exc
    if not isinstance(value, dict):
        raise AuditFormatError(number, "not a JSON object")
    return value


# --------------------------------------------------------------------------------------------
# Verifying
# --------------------------------------------------------------------------------------------

ProblemKind = Literal["edited", "deleted", "inserted", "reordered", "malformed", "broken_chain"]


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the log, placed as precisely as the chain allows."""

    seq: int | None
    line: int
    kind: ProblemKind
    message: str


@dataclass(frozen=True)
class VerifyReport:
    """What `verify` found. ``exists`` is False when there was no file (then ok, 0 records)."""

    ok: bool
    records: int
    problems: tuple[Problem, ...]
    first_seq: int | None
    last_seq: int | None
    last_hash: str | None
    exists: bool = True


def _is_hex64(value: Any) -> TypeGuard[str]:
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)


@dataclass(frozen=True)
class _Entry:
    """What verification needs from one well-formed line."""

    line: int
    seq: int
    prev: str
    stored: str  # the hash written in the record
    computed: str  # the hash of its content

    @property
    def intact(self) -> bool:
        return self.stored == self.computed

    @property
    def names(self) -> frozenset[str]:
        # A successor may legitimately point at either: the stored hash when only the content
        # was edited, the computed one when only the hash field was.
        return frozenset((self.stored, self.computed))

    @classmethod
    def from_record(cls, line: int, record: Any) -> _Entry | None:
        if not isinstance(record, dict):
            return None
        seq, prev, stored = record.get("seq"), record.get("prev_hash"), record.get("hash")
        if isinstance(seq, bool) or not isinstance(seq, int) or seq < 1:
            return None
        if not (_is_hex64(prev) and _is_hex64(stored)):
            return None
        try:
            computed = record_hash(record)
        except (TypeError, ValueError):
            return None
        return cls(line, seq, prev, stored, computed)


def _load_entries(path: Path) -> list[_Entry | Problem]:
    entries: list[_Entry | Problem] = []
    with open(path, "rb") as file:
        for number, raw in enumerate(file, start=1):
            try:
                record = _parse_line(number, raw)
            except AuditFormatError as exc:
                entries.append(
                    Problem(None, number, "malformed", f"line {number} is malformed: {exc.reason}")
                )
                continue
            entry = _Entry.from_record(number, record)
            if entry is None:
                entries.append(
                    Problem(None, number, "malformed", f"line {number} has no valid seq, prev_hash and hash")
                )
            else:
                entries.append(entry)
    return entries


def _where(seq: int | None, line: int) -> str:
    return f"record seq {seq} (line {line})" if seq is not None else f"line {line}"


class _Verifier:
    """Walks the lines in order, keeping the tail of the chain it has accepted so far.

    A line that does not continue the chain is explained by looking at most two lines ahead:
    if the next line continues the chain instead, this line was inserted (or swapped with the
    next); if a line links to a record that is not there, records were deleted; a record whose
    own hash does not match was edited. Only the first explanation per anomaly is reported, and
    the walk resynchronises on the explained record so one tamper yields one problem.
    """

    def __init__(self, entries: list[_Entry | Problem]) -> None:
        self.entries = entries
        self.problems: list[Problem] = []
        self.all_names: dict[str, int] = {}
        for item in entries:
            if isinstance(item, _Entry):
                for name in item.names:
                    self.all_names.setdefault(name, item.line)
        # The accepted tail: None means "anything goes" (after a malformed line).
        self.tail_names: frozenset[str] | None = frozenset((GENESIS_HASH,))
        self.expected: int | None = 1
        self.tail: _Entry | None = None
        self.tail_state: tuple[frozenset[str] | None, int | None, _Entry | None] | None = None
        self.seen: dict[str, int] = {}

    def _links(self, entry: _Entry) -> bool:
        return self.tail_names is None or entry.prev in self.tail_names

    def _seq_ok(self, entry: _Entry) -> bool:
        return self.expected is None or entry.seq == self.expected

    def _continues(self, entry: _Entry) -> bool:
        return self._links(entry) and self._seq_ok(entry)

    def _accept(self, entry: _Entry, *, seq: int | None = None) -> None:
        self.tail_state = (self.tail_names, self.expected, self.tail)
        self.tail_names = entry.names
        self.expected = (seq if seq is not None else entry.seq) + 1
        self.tail = entry
        self.seen.setdefault(entry.stored, entry.line)

    def _report(self, seq: int | None, line: int, kind: ProblemKind, message: str) -> None:
        self.problems.append(Problem(seq, line, kind, message))

    def _entry_at(self, index: int) -> _Entry | None:
        if index < len(self.entries):
            item = self.entries[index]
            return item if isinstance(item, _Entry) else None
        return None

    def run(self) -> list[Problem]:
        index = 0
        while index < len(self.entries):
            item = self.entries[index]
            if isinstance(item, Problem):
                self.problems.append(item)
                self.tail_names, self.expected = None, None
                index += 1
                continue
            index += self._check(item, index)
        return self.problems

    def _check(self, entry: _Entry, index: int) -> int:
        """Classify one line; returns how many lines it consumed."""
        if entry.intact and self._continues(entry) and entry.stored not in self.seen:
            self._accept(entry)
            return 1
        expected = self.expected if self.expected is not None else entry.seq
        where = _where(entry.seq, entry.line)

        if entry.intact and entry.stored in self.seen:
            first = self.seen[entry.stored]
            self._report(
                entry.seq, entry.line, "inserted", f"{where} was inserted: it duplicates line {first}"
            )
            return 1

        after = self._entry_at(index + 1)
        if after is not None and self.tail_names is not None and self._continues(after):
            # The next line carries on from where we are, so this line does not belong here.
            later = self._entry_at(index + 2)
            if entry.intact and entry.prev in after.names and (later is None or later.stored != entry.stored):
                self._report(
                    entry.seq,
                    entry.line,
                    "reordered",
                    f"{where} and {_where(after.seq, after.line)} are out of order (swapped)",
                )
                self._accept(after)
                self._accept(entry)
                return 2
            self._report(
                entry.seq, entry.line, "inserted", f"{where} was inserted: the chain continues past it"
            )
            return 1

        if not entry.intact:
            linked_from_next = after is not None and after.prev in entry.names
            if linked_from_next or self._links(entry) or self._seq_ok(entry):
                self._report(
                    expected,
                    entry.line,
                    "edited",
                    f"{_where(expected, entry.line)} was edited: its hash does not match its content",
                )
                self._accept(entry, seq=expected)
            else:
                self._report(
                    entry.seq,
                    entry.line,
                    "inserted",
                    f"{where} was inserted: its hash does not match its content and it does not "
                    "continue the chain",
                )
            return 1

        # An intact record (its hash matches) that does not continue the chain.
        if self._links(entry):
            self._report(
                expected,
                entry.line,
                "edited",
                f"{_where(expected, entry.line)} was edited: its seq was changed to {entry.seq} "
                "and its hash recomputed",
            )
            self._accept(entry, seq=expected)
            return 1

        if entry.seq > expected:
            return self._gap(entry, expected)

        if entry.seq < expected and self.tail is not None and self.tail_state is not None:
            # Two records claim the same predecessor: a fork. The one the chain goes on from is
            # genuine; the other was inserted.
            tail = self.tail
            previous_names = self.tail_state[0]
            if (
                (previous_names is None or entry.prev in previous_names)
                and after is not None
                and (after.prev in entry.names)
            ):
                self._report(
                    tail.seq,
                    tail.line,
                    "inserted",
                    f"{_where(tail.seq, tail.line)} was inserted: the chain continues from line "
                    f"{entry.line} instead",
                )
                self.tail_names, self.expected, self.tail = self.tail_state
                self._accept(entry)
                return 1
            self._report(
                entry.seq,
                entry.line,
                "inserted",
                f"{where} was inserted: it repeats or goes back to seq {entry.seq} after seq {expected - 1}",
            )
            return 1

        before = _where(self.tail.seq, self.tail.line) if self.tail else "the start of the log"
        self._report(
            entry.seq,
            entry.line,
            "broken_chain",
            f"{where} does not chain to {before}: its prev_hash does not match; one of the two was "
            "rewritten with a recomputed hash",
        )
        self._accept(entry)
        return 1

    def _gap(self, entry: _Entry, expected: int) -> int:
        """``entry`` jumps ahead in seq and does not link to the tail."""
        where = _where(entry.seq, entry.line)
        target = self.all_names.get(entry.prev)
        if target is not None and target > entry.line:
            self._report(
                entry.seq,
                entry.line,
                "reordered",
                f"{where} comes before its predecessor (line {target}): records were moved",
            )
        elif target is None:
            missing = f"seq {expected}" if entry.seq - 1 == expected else f"seq {expected}..{entry.seq - 1}"
            self._report(
                expected,
                entry.line,
                "deleted",
                f"record {missing} was deleted: it is missing before line {entry.line} "
                f"(which holds seq {entry.seq})",
            )
        else:
            self._report(
                entry.seq,
                entry.line,
                "broken_chain",
                f"{where} links to line {target}, not to the record before it",
            )
        self._accept(entry)
        return 1


def verify(
    path: Path, *, expect_last_hash: str | None = None, expect_records: int | None = None
) -> VerifyReport:
    """Check the whole chain and explain each break.

    ``expect_last_hash`` and ``expect_records`` are an anchor kept outside the log (the ``hash``
    and ``seq`` of the last record at some earlier time). The log may have grown since, but it
    must still hold that record at that seq; without an anchor, records cut from the end of the
    log cannot be detected. A missing file is ok with 0 records (``exists`` False) unless an
    anchor says records are expected.

    Raises:
        OSError: the file exists but cannot be read (permissions, a directory, I/O error).
    """
    try:
        entries = _load_entries(path)
        exists = True
    except FileNotFoundError:
        entries, exists = [], False
    problems = _Verifier(entries).run()
    valid = [e for e in entries if isinstance(e, _Entry)]
    last = valid[-1] if valid else None
    problems.extend(_check_anchor(valid, len(entries), expect_last_hash, expect_records))
    return VerifyReport(
        ok=not problems,
        records=len(entries),
        problems=tuple(problems),
        first_seq=valid[0].seq if valid else None,
        last_seq=last.seq if last else None,
        last_hash=last.stored if last else None,
        exists=exists,
    )


def _check_anchor(
    valid: list[_Entry], lines: int, expect_last_hash: str | None, expect_records: int | None
) -> list[Problem]:
    problems: list[Problem] = []
    last_seq = max((e.seq for e in valid), default=0)
    if expect_records is not None and last_seq < expect_records:
        missing = (
            f"seq {expect_records}"
            if last_seq + 1 == expect_records
            else f"seq {last_seq + 1}..{expect_records}"
        )
        problems.append(
            Problem(
                last_seq + 1,
                lines + 1,
                "deleted",
                f"record {missing} was deleted: the log ends at seq {last_seq} but {expect_records} "
                "records were expected (the tail was cut off)",
            )
        )
    elif expect_last_hash is not None:
        holder = next((e for e in valid if e.stored == expect_last_hash), None)
        if holder is None:
            problems.append(
                Problem(
                    expect_records,
                    lines + 1 if expect_records is None else expect_records,
                    "deleted",
                    f"no record has the expected hash {expect_last_hash[:16]}...: the tail was cut off "
                    "or that record was rewritten",
                )
            )
        elif expect_records is not None and holder.seq != expect_records:
            problems.append(
                Problem(
                    holder.seq,
                    holder.line,
                    "broken_chain",
                    f"{_where(holder.seq, holder.line)} has the expected hash but seq {expect_records} "
                    "was expected",
                )
            )
    return problems
