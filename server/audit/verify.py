"""Verifying the audit log: every file of the set, each continuing the chain of the one before.

Within a file, a line that does not continue the chain is explained (edited, deleted, inserted,
reordered, malformed) and placed by seq and line. Between files, the manifest and the rotated
files' names say which seq range each file holds, so a file that is gone is reported by name and
range ("missing"), a file retention deleted is reported as pruned (not a failure: its last hash in
the manifest anchors the next file), and a rotated file whose tail was cut shows against the range
and last hash recorded when it was rotated.

What the chain cannot show, records cut from the end, the signed checkpoints beside the log show
(`lakegate.server.audit.checkpoints`, held against the records by `lakegate.server.audit.checkpoint_verify`): the
checkpoint file is read first, then the log. Records after the last checkpoint are the window
(`CheckpointReport.uncovered`), reported and not a failure.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from lakegate.server.audit.checkpoint_verify import (
    CheckpointFile,
    CheckpointReport,
    CheckpointTrust,
    check_checkpoints,
    read_checkpoints,
)
from lakegate.server.audit.files import LogNames, Segment, log_segments
from lakegate.server.audit.records import GENESIS_HASH, AuditFormatError, is_hex64, parse_line, record_hash

__all__ = ["FileReport", "FileStatus", "Problem", "ProblemKind", "VerifyReport", "verify"]

#: "truncated": the log ends before a signed checkpoint's seq; "rewritten": the record at a
#: checkpoint's seq is not the one it signed; "checkpoint": the checkpoint file itself is wrong (a
#: signature, its own chain, cut or missing).
ProblemKind = Literal[
    "edited",
    "deleted",
    "inserted",
    "reordered",
    "malformed",
    "broken_chain",
    "missing",
    "truncated",
    "rewritten",
    "checkpoint",
]
FileStatus = Literal["ok", "failed", "pruned", "missing"]


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the log, placed as precisely as the chain allows.

    ``line`` is 1-based within ``file``; 0 when the problem is about a whole file (a missing one)
    or the manifest. ``file`` is the file's name (None for a log that was never rotated).
    """

    seq: int | None
    line: int
    kind: ProblemKind
    message: str
    file: str | None = None


@dataclass(frozen=True)
class FileReport:
    """One file of the set: what it holds (as found, or as the manifest says for pruned and missing
    files) and how it fared."""

    name: str
    status: FileStatus
    records: int
    first_seq: int | None
    last_seq: int | None
    pruned_at: str | None = None


@dataclass(frozen=True)
class VerifyReport:
    """What `verify` found. ``exists`` is False when there was no file (then ok, 0 records).

    ``records`` counts the lines of the files present; ``files`` lists every file of the set in
    chain order (the active file last), pruned and missing ones included; ``checkpoints`` says
    what the signed checkpoints cover (None where there are none to look at: the PostgreSQL chain).
    """

    ok: bool
    records: int
    problems: tuple[Problem, ...]
    first_seq: int | None
    last_seq: int | None
    last_hash: str | None
    exists: bool = True
    files: tuple[FileReport, ...] = field(default=())
    checkpoints: CheckpointReport | None = None

    @property
    def pruned(self) -> tuple[FileReport, ...]:
        """The files retention deleted (not a failure)."""
        return tuple(report for report in self.files if report.status == "pruned")


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
        if not (is_hex64(prev) and is_hex64(stored)):
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
                record = parse_line(number, raw)
            except AuditFormatError as exc:
                entries.append(Problem(None, number, "malformed", f"line {number} is malformed: {exc.reason}"))
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

    def __init__(
        self,
        entries: list[_Entry | Problem],
        start: tuple[frozenset[str] | None, int | None] = (frozenset((GENESIS_HASH,)), 1),
        start_label: str = "the start of the log",
    ) -> None:
        self.entries = entries
        self.start_label = start_label
        self.problems: list[Problem] = []
        self.all_names: dict[str, int] = {}
        for item in entries:
            if isinstance(item, _Entry):
                for name in item.names:
                    self.all_names.setdefault(name, item.line)
        # The accepted tail: None means "anything goes" (after a malformed line).
        self.tail_names: frozenset[str] | None = start[0]
        self.expected: int | None = start[1]
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
            self._report(entry.seq, entry.line, "inserted", f"{where} was inserted: it duplicates line {first}")
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
            self._report(entry.seq, entry.line, "inserted", f"{where} was inserted: the chain continues past it")
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
                    f"{where} was inserted: its hash does not match its content and it does not continue the chain",
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
                    f"{_where(tail.seq, tail.line)} was inserted: the chain continues from line {entry.line} instead",
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

        before = _where(self.tail.seq, self.tail.line) if self.tail else self.start_label
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
                f"record {missing} was deleted: it is missing before line {entry.line} (which holds seq {entry.seq})",
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


def _seq_range(first: int, last: int) -> str:
    return f"seq {first}" if first == last else f"seq {first}..{last}"


@dataclass(frozen=True)
class _Point:
    """A record the anchor may name: one read from a file, or a pruned or missing file's last."""

    seq: int
    hash: str
    line: int
    file: str


class _SetWalk:
    """Verifies the files of the set in chain order, carrying the chain's tail from file to file."""

    def __init__(self, several: bool) -> None:
        self.several = several
        self.problems: list[Problem] = []
        self.files: list[FileReport] = []
        self.points: list[_Point] = []
        self.valid: list[_Entry] = []
        self.records = 0
        self.last_lines = 0  # lines of the last file read: where a cut-off tail would continue
        self.last_file: str | None = None
        self.gone_upto = 0  # last seq of the pruned and missing files
        self.start: tuple[frozenset[str] | None, int | None] = (frozenset((GENESIS_HASH,)), 1)
        self.label = "the start of the log"
        self.previous = False

    def _problem(self, segment: Segment, seq: int | None, line: int, kind: ProblemKind, message: str) -> None:
        text = f"{segment.name}: {message}" if self.several else message
        self.problems.append(Problem(seq, line, kind, text, segment.name if self.several else None))

    def add(self, segment: Segment) -> None:
        if segment.kind in ("pruned", "missing"):
            self._gone(segment)
        else:
            self._read(segment)
        self.previous = True

    def _gone(self, segment: Segment) -> None:
        entry = segment.entry
        assert entry is not None, "pruned and missing files come from the manifest"
        held = _seq_range(entry.first_seq, entry.last_seq)
        if segment.kind == "missing":
            self._problem(
                segment,
                entry.first_seq,
                0,
                "missing",
                f"{segment.name} ({held}) is listed in the manifest but missing: records {held} are gone",
            )
        pruned_at = entry.pruned_at if segment.kind == "pruned" else None
        status: FileStatus = "pruned" if segment.kind == "pruned" else "missing"
        self.files.append(FileReport(segment.name, status, entry.records, entry.first_seq, entry.last_seq, pruned_at))
        self.points.append(_Point(entry.last_seq, entry.last_hash, 0, segment.name))
        self.gone_upto = max(self.gone_upto, entry.last_seq)
        self.start = (frozenset((entry.last_hash,)), entry.last_seq + 1)
        self.label = f"the end of {segment.name} ({segment.kind})"

    def _read(self, segment: Segment) -> None:
        try:
            entries = _load_entries(segment.path)
        except FileNotFoundError:
            # Gone between listing and reading (rotated or pruned by a writer): list it again.
            self._problem(segment, segment.first_seq, 0, "missing", f"{segment.name} disappeared while verifying")
            return
        before = len(self.problems)
        valid = [item for item in entries if isinstance(item, _Entry)]
        self._check_boundary(segment, entries)
        verifier = _Verifier(entries, self.start, self.label)
        for problem in verifier.run():
            self._problem(segment, problem.seq, problem.line, problem.kind, problem.message)
        self.start = (verifier.tail_names, verifier.expected)
        if len(self.problems) == before and segment.last_seq is not None:
            self._check_rotated_tail(segment, valid, len(entries))
        if segment.last_seq is not None:
            # The next file continues from where this one was rotated, whatever happened inside it.
            names = self.start[0] if valid and valid[-1].seq == segment.last_seq else None
            if segment.entry is not None:
                names = (names or frozenset()) | {segment.entry.last_hash}
            self.start = (names, segment.last_seq + 1)
        status: FileStatus = "ok" if len(self.problems) == before else "failed"
        first = valid[0].seq if valid else None
        last = valid[-1].seq if valid else None
        self.files.append(FileReport(segment.name, status, len(entries), first, last))
        self.points.extend(_Point(e.seq, e.stored, e.line, segment.name) for e in valid)
        self.valid.extend(valid)
        self.records += len(entries)
        self.last_lines, self.last_file = len(entries), segment.name
        self.label = f"the end of {segment.name}"

    def _check_boundary(self, segment: Segment, entries: list[_Entry | Problem]) -> None:
        """A jump in seq from the previous file to this one that no deleted line explains: a file is gone."""
        first = entries[0] if entries else None
        names, expected = self.start
        if not isinstance(first, _Entry) or names is None or expected is None:
            return
        if first.seq <= expected or first.prev in names:
            return
        declared = segment.first_seq
        if declared is not None and declared <= expected:
            return  # this file's own first records were deleted: the walk inside it says so
        if declared is None and not self.previous:
            return  # a log that was never rotated, missing its first records: the walk says so
        gap = _seq_range(expected, first.seq - 1)
        also = f", or the first records of {segment.name} were deleted" if segment.kind == "active" else ""
        self._problem(
            segment,
            expected,
            0,
            "missing",
            f"records {gap} are missing before {segment.name}: no file holds them (a rotated file was removed{also})",
        )
        self.start = (frozenset((first.prev,)), first.seq)

    def _check_rotated_tail(self, segment: Segment, valid: list[_Entry], lines: int) -> None:
        """A rotated file against the range its name (and manifest entry) says it holds."""
        assert segment.last_seq is not None
        declared_last = segment.last_seq
        last = valid[-1] if valid else None
        if last is None or last.seq < declared_last:
            start = last.seq + 1 if last else (segment.first_seq or 1)
            gone = _seq_range(start, declared_last)
            self._problem(
                segment,
                start,
                lines + 1,
                "deleted",
                f"record {gone} was deleted from the end of {segment.name}: it was rotated at seq {declared_last}",
            )
        elif last.seq > declared_last:
            extra = next(e for e in valid if e.seq > declared_last)
            self._problem(
                segment,
                extra.seq,
                extra.line,
                "inserted",
                f"{_where(extra.seq, extra.line)} was inserted: {segment.name} was rotated at seq {declared_last}",
            )
        elif segment.entry is not None and last.stored != segment.entry.last_hash:
            self._problem(
                segment,
                last.seq,
                last.line,
                "edited",
                f"{_where(last.seq, last.line)} was edited: its hash is not the one recorded when "
                f"{segment.name} was rotated",
            )


def verify(
    path: Path,
    *,
    expect_last_hash: str | None = None,
    expect_records: int | None = None,
    checkpoints: CheckpointTrust | None = None,
) -> VerifyReport:
    """Check the whole chain, across every rotated file and the active file ``path``, and explain each
    break; then hold the signed checkpoints against it.

    ``expect_last_hash`` and ``expect_records`` are an anchor kept outside the log (the ``hash``
    and ``seq`` of the last record at some earlier time). The log may have grown since, but it
    must still hold that record at that seq. An anchor inside a pruned file cannot be checked and
    is accepted. ``checkpoints`` says what to trust for the checkpoints (default: the public key
    beside them, nothing kept elsewhere). A missing file is ok with 0 records (``exists`` False)
    unless an anchor or a checkpoint says records are expected.

    Raises:
        OSError: a file exists but cannot be read (permissions, a directory, I/O error).
    """
    names = LogNames(Path(path))
    # The checkpoints before the log: each covers records already on disk when it was read.
    signed = read_checkpoints(names.active)
    segments, manifest_error = log_segments(path)
    walk = _SetWalk(several=len(segments) > 1)
    if manifest_error is not None:
        walk.problems.append(Problem(None, 0, "malformed", str(manifest_error), names.manifest.name))
    for segment in segments:
        walk.add(segment)
    problems = walk.problems
    problems.extend(_check_anchor(walk, expect_last_hash, expect_records))
    covered = _check_checkpoints(walk, signed, checkpoints or CheckpointTrust(), names)
    if covered is not None:
        problems.extend(
            Problem(f.seq, f.line, f.kind, f.message, f.file or (walk.last_file if walk.several else None))
            for f in covered.findings
        )
    valid = walk.valid
    last = valid[-1] if valid else None
    exists = any(segment.kind != "missing" for segment in segments) or names.manifest.exists()
    return VerifyReport(
        ok=not problems,
        records=walk.records,
        problems=tuple(problems),
        first_seq=valid[0].seq if valid else None,
        last_seq=last.seq if last else None,
        last_hash=last.stored if last else None,
        exists=exists,
        files=tuple(walk.files),
        checkpoints=covered,
    )


def _check_checkpoints(
    walk: _SetWalk, signed: CheckpointFile, trust: CheckpointTrust, names: LogNames
) -> CheckpointReport | None:
    """The checkpoints against the records the walk read; None when there is nothing to say (no
    checkpoint file, no key, no anchor: a log written without checkpoints)."""
    if not signed.exists and signed.public_pem is None and not trust.signed_before and trust.anchor is None:
        return None
    points: dict[int, str] = {}
    for point in walk.points:
        points.setdefault(point.seq, point.hash)
    last_seq = max(points, default=0)
    return check_checkpoints(signed, trust, log_name=names.active.name, points=points, last_seq=last_seq)


def _check_anchor(walk: _SetWalk, expect_last_hash: str | None, expect_records: int | None) -> list[Problem]:
    problems: list[Problem] = []
    points = walk.points
    lines = walk.last_lines
    file = walk.last_file if walk.several else None
    last_seq = max((p.seq for p in points), default=0)
    if expect_records is not None and last_seq < expect_records:
        missing = f"seq {expect_records}" if last_seq + 1 == expect_records else f"seq {last_seq + 1}..{expect_records}"
        problems.append(
            Problem(
                last_seq + 1,
                lines + 1,
                "deleted",
                f"record {missing} was deleted: the log ends at seq {last_seq} but {expect_records} "
                "records were expected (the tail was cut off)",
                file,
            )
        )
    elif expect_last_hash is not None:
        holder = next((p for p in points if p.hash == expect_last_hash), None)
        if holder is None:
            if expect_records is not None and expect_records <= walk.gone_upto:
                return problems  # that record was in a file retention deleted: nothing to compare
            problems.append(
                Problem(
                    expect_records,
                    lines + 1 if expect_records is None else expect_records,
                    "deleted",
                    f"no record has the expected hash {expect_last_hash[:16]}...: the tail was cut off "
                    "or that record was rewritten",
                    file,
                )
            )
        elif expect_records is not None and holder.seq != expect_records:
            problems.append(
                Problem(
                    holder.seq,
                    holder.line,
                    "broken_chain",
                    f"{_where(holder.seq, holder.line)} has the expected hash but seq {expect_records} was expected",
                    holder.file if walk.several else None,
                )
            )
    return problems
