"""Holding the signed checkpoints (`lakegate.server.audit.checkpoints`) against the audit log's records.

`lakegate.server.audit.verify.verify` reads the checkpoint file first (`read_checkpoints`), then the log,
then asks `check_checkpoints` what the checkpoints show:

- the log ends before a checkpoint's seq: records were cut from its end ("truncated");
- the record at a checkpoint's seq has another hash: the log was cut back and written anew
  ("rewritten");
- a signature does not verify with the trusted key, or the checkpoint file's own chain is broken,
  shorter than the checkpoint kept elsewhere (PostgreSQL), missing while its key exists, or leaves
  more records uncovered than the writer ever does ("checkpoint").

Records after the last checkpoint are the window (`CheckpointReport.uncovered`): reported, not a
failure.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from pydantic import ValidationError

from lakegate.server.audit.checkpoints import Checkpoint, key_id, parse_public_keys
from lakegate.server.audit.files import LogNames
from lakegate.server.audit.records import GENESIS_HASH

__all__ = [
    "CheckpointFile",
    "CheckpointFinding",
    "CheckpointReport",
    "CheckpointTrust",
    "check_checkpoints",
    "read_checkpoints",
]


@dataclass(frozen=True)
class CheckpointTrust:
    """What the verifier of one log trusts beyond the log's own directory.

    ``public_keys`` empty: the keys beside the checkpoints (enough to see a cut log, not a forger
    who also replaced that file); else only these sign. ``signed_before``: this log's signing key
    exists, so checkpoints were signed and a missing checkpoint file is a failure. ``every``: the
    writer's checkpoint_every; more records than that after the last checkpoint mean the checkpoint
    file lost its end. ``anchor``: the latest checkpoint as kept elsewhere (PostgreSQL).
    """

    public_keys: tuple[Ed25519PublicKey, ...] = ()
    source: str = "the public keys beside the checkpoints"
    signed_before: bool = False
    every: int | None = None
    anchor: Checkpoint | None = None
    anchor_source: str = "PostgreSQL"


FindingKind = Literal["truncated", "rewritten", "checkpoint"]


@dataclass(frozen=True)
class CheckpointFinding:
    """One problem found by the checkpoints; ``file`` names the checkpoint file for problems of that
    file, None for what the checkpoints show about the log."""

    kind: FindingKind
    seq: int | None
    line: int
    message: str
    file: str | None = None


@dataclass(frozen=True)
class CheckpointReport:
    """What the checkpoints cover. ``last``: the newest checkpoint (from the file or the anchor);
    ``uncovered``: records after it, which could be cut undetected (the documented window)."""

    file: str
    count: int
    last: Checkpoint | None
    uncovered: int
    key_ids: tuple[str, ...]  # the keys the signatures were checked with
    key_source: str
    anchor: Checkpoint | None = None
    findings: tuple[CheckpointFinding, ...] = field(default=())


@dataclass(frozen=True)
class CheckpointFile:
    """The checkpoint file and the public keys beside it, as read (before the log is read)."""

    name: str
    exists: bool
    entries: tuple[tuple[int, Checkpoint | str], ...]  # (line, checkpoint or why it is not one)
    public_pem: bytes | None


def read_checkpoints(active: Path) -> CheckpointFile:
    """Read the checkpoint file and the public keys of the log headed by ``active``.

    Read before the log: a writer signs a checkpoint only after its records are written, so every
    checkpoint read here covers records that are on disk by the time the log is read.

    Raises:
        OSError: a file exists but cannot be read.
    """
    names = LogNames(Path(active))
    try:
        public_pem: bytes | None = names.public_key.read_bytes()
    except FileNotFoundError:
        public_pem = None
    entries: list[tuple[int, Checkpoint | str]] = []
    try:
        with open(names.checkpoints, "rb") as file:
            for number, raw in enumerate(file, start=1):
                if not raw.endswith(b"\n"):
                    entries.append((number, "no newline at the end (an interrupted write?)"))
                    continue
                try:
                    entries.append((number, Checkpoint.model_validate_json(raw)))
                except ValidationError as exc:
                    entries.append((number, f"not a checkpoint ({exc.error_count()} errors)"))
    except FileNotFoundError:
        return CheckpointFile(names.checkpoints.name, False, (), public_pem)
    return CheckpointFile(names.checkpoints.name, True, tuple(entries), public_pem)


def _span(first: int, last: int) -> str:
    return f"seq {first}" if first == last else f"seq {first}..{last}"


def _gone(first: int, last: int) -> str:
    """Checkpoints first..last as the subject of a sentence, with its verb."""
    return f"checkpoint #{first} was" if first == last else f"checkpoints #{first}..#{last} were"


class _Check:
    """Collects findings about one checkpoint file; repeated findings of one sort are counted."""

    def __init__(self, file: CheckpointFile, trust: CheckpointTrust) -> None:
        self.file = file
        self.trust = trust
        self.findings: list[CheckpointFinding] = []
        self.keys: dict[str, Ed25519PublicKey] = {}  # by key_id

    def add(self, kind: FindingKind, seq: int | None, line: int, message: str, *, of_file: bool = True) -> None:
        self.findings.append(CheckpointFinding(kind, seq, line, message, self.file.name if of_file else None))

    def add_first(
        self, kind: FindingKind, items: Sequence[tuple[int, Checkpoint]], message: Callable[[Checkpoint, int], str]
    ) -> None:
        """One finding for the first of ``items``, saying how many more there are."""
        if not items:
            return
        line, checkpoint = items[0]
        more = f" (and {len(items) - 1} later checkpoints)" if len(items) > 1 else ""
        self.add(kind, checkpoint.seq, line, message(checkpoint, line) + more, of_file=kind == "checkpoint")

    def resolve_keys(self) -> None:
        """The keys signatures are checked with: the trusted ones, else those beside the checkpoints."""
        trust, file = self.trust, self.file
        beside: tuple[Ed25519PublicKey, ...] = ()
        if file.public_pem is not None:
            try:
                beside = parse_public_keys(file.public_pem)
            except ValueError:
                self.add("checkpoint", None, 0, "the public key file beside the checkpoints holds a non-Ed25519 key")
        if trust.public_keys:
            self.keys = {key_id(key): key for key in trust.public_keys}
            there = {key_id(key) for key in beside}
            if file.public_pem is not None and not there & set(self.keys):
                self.add(
                    "checkpoint",
                    None,
                    0,
                    f"the public key beside the checkpoints (key {', '.join(sorted(there)) or 'none'}) is not "
                    f"{trust.source} (key {', '.join(self.keys)}): it was replaced",
                )
        else:
            self.keys = {key_id(key): key for key in beside}

    def signature_ok(self, checkpoint: Checkpoint) -> bool:
        if not self.keys:
            return True  # nothing to check with: reported once, not per checkpoint
        key = self.keys.get(checkpoint.key_id)
        return key is not None and checkpoint.signed_by(key)


def check_checkpoints(
    file: CheckpointFile,
    trust: CheckpointTrust,
    *,
    log_name: str,
    points: Mapping[int, str],
    last_seq: int,
) -> CheckpointReport:
    """Hold the checkpoints (and the trusted ``anchor``) against the log's records.

    ``points`` maps the seq of every record read (and of every pruned or missing file's last
    record, from the manifest) to its hash; ``last_seq`` is the highest seq the log reaches. A
    checkpoint whose seq falls in a pruned file's range cannot be compared and is accepted.
    """
    check = _Check(file, trust)
    check.resolve_keys()
    checkpoints: list[tuple[int, Checkpoint]] = []
    for line, entry in file.entries:
        if isinstance(entry, str):
            check.add("checkpoint", None, line, f"line {line} of {file.name} is malformed: {entry}")
        else:
            checkpoints.append((line, entry))
    signed_before = trust.signed_before or file.public_pem is not None or trust.anchor is not None
    if not checkpoints and signed_before:
        state = "empty" if file.exists else "missing"
        check.add(
            "checkpoint",
            None,
            0,
            f"the checkpoint file {file.name} is {state}, but checkpoints were signed for this log (its "
            "signing key or public key exists): the file was deleted or emptied",
        )
    if checkpoints and not check.keys:
        check.add(
            "checkpoint",
            None,
            0,
            "no public key beside the checkpoints: their signatures cannot be checked (pass --public-key)",
        )
    _check_chain(check, checkpoints, log_name)
    rewritten = [(line, c) for line, c in checkpoints if c.seq in points and points[c.seq] != c.hash]
    check.add_first(
        "rewritten",
        rewritten,
        lambda c, _: (
            f"record seq {c.seq} is not the record checkpoint #{c.number} signed: its hash differs, so "
            f"the log was cut back before seq {c.seq} and written anew"
        ),
    )
    newest = checkpoints[-1][1] if checkpoints else None
    newest = _check_anchor(check, checkpoints, newest, points)
    covered = max((c for _, c in checkpoints), key=lambda c: c.seq, default=None)
    if trust.anchor is not None and (covered is None or trust.anchor.seq > covered.seq):
        covered = trust.anchor
    if covered is not None and covered.seq > last_seq:
        held = f"ends at seq {last_seq}" if last_seq else "holds no records"
        check.add(
            "truncated",
            last_seq + 1,
            0,
            f"the log {held}, but {covered.describe()} covers seq {covered.seq}: "
            f"records {_span(last_seq + 1, covered.seq)} were cut from its end",
            of_file=False,
        )
    uncovered = max(0, last_seq - newest.seq) if newest is not None else last_seq
    if trust.every is not None and uncovered > trust.every and (newest is not None or signed_before):
        after = f"after the last checkpoint, {newest.describe()}," if newest else "and no checkpoint"
        check.add(
            "checkpoint",
            last_seq,
            0,
            f"{uncovered} records {after} more than the writer's checkpoint_every ({trust.every}): the "
            "checkpoint file lost its end, or checkpoints could not be written (see the server log)",
        )
    return CheckpointReport(
        file=file.name,
        count=len(checkpoints),
        last=newest,
        uncovered=uncovered,
        key_ids=tuple(check.keys),
        key_source=trust.source if trust.public_keys else "the public keys beside the checkpoints",
        anchor=trust.anchor,
        findings=tuple(check.findings),
    )


def _check_chain(check: _Check, checkpoints: list[tuple[int, Checkpoint]], log_name: str) -> None:
    """Signatures, the log each names, and the checkpoint file's own chain."""
    forged = [(line, c) for line, c in checkpoints if not check.signature_ok(c)]
    check.add_first(
        "checkpoint",
        [(line, c) for line, c in forged if c.key_id not in check.keys],
        lambda c, line: (
            f"checkpoint #{c.number} (line {line}) is signed by key {c.key_id}, not by "
            f"{check.trust.source} (key {', '.join(check.keys)}): the signing key was replaced, or the "
            "checkpoint forged"
        ),
    )
    check.add_first(
        "checkpoint",
        [(line, c) for line, c in forged if c.key_id in check.keys],
        lambda c, line: f"checkpoint #{c.number} (line {line}) has an invalid signature: it was forged or edited",
    )
    check.add_first(
        "checkpoint",
        [(line, c) for line, c in checkpoints if c.log != log_name],
        lambda c, line: f"checkpoint #{c.number} (line {line}) is a checkpoint of {c.log}, not of {log_name}",
    )
    previous: Checkpoint | None = None
    previous_line = 0
    for line, checkpoint in checkpoints:
        number = checkpoint.number
        if previous is None:
            if number > 1:
                check.add(
                    "checkpoint",
                    checkpoint.seq,
                    line,
                    f"{check.file.name} starts with checkpoint #{number}: {_gone(1, number - 1)} cut from its start",
                )
            elif checkpoint.prev != GENESIS_HASH:
                check.add(
                    "checkpoint", checkpoint.seq, line, f"checkpoint #1 (line {line}) was edited: it chains to another"
                )
        elif checkpoint.prev != previous.digest:
            gap = f": {_gone(previous.number + 1, number - 1)} deleted" if number > previous.number + 1 else ""
            check.add(
                "checkpoint",
                checkpoint.seq,
                line,
                f"checkpoint #{number} (line {line}) does not chain to checkpoint #{previous.number} (line "
                f"{previous_line}){gap or ': the checkpoint file was edited, or checkpoints were inserted'}",
            )
        elif number != previous.number + 1:
            check.add(
                "checkpoint",
                checkpoint.seq,
                line,
                f"checkpoint #{number} (line {line}) follows checkpoint #{previous.number}: "
                f"{_gone(previous.number + 1, number - 1)} gone, for the writer found the checkpoint file cut back "
                "(a later checkpoint was kept elsewhere)",
            )
        if previous is not None and checkpoint.seq < previous.seq:
            check.add(
                "truncated",
                checkpoint.seq,
                line,
                f"checkpoint #{number} covers seq {checkpoint.seq}, behind checkpoint #{previous.number} "
                f"(seq {previous.seq}): the log had been cut back when it was signed",
                of_file=False,
            )
        previous, previous_line = checkpoint, line


def _check_anchor(
    check: _Check, checkpoints: list[tuple[int, Checkpoint]], newest: Checkpoint | None, points: Mapping[int, str]
) -> Checkpoint | None:
    """The checkpoint kept elsewhere must be in the file, unchanged; returns the newest of the two."""
    anchor = check.trust.anchor
    if anchor is None:
        return newest
    where = check.trust.anchor_source
    if not check.signature_ok(anchor):
        check.add(
            "checkpoint", anchor.seq, 0, f"the checkpoint kept in {where} (#{anchor.number}) has an invalid signature"
        )
    in_file = next((c for _, c in checkpoints if c.number == anchor.number), None)
    if in_file is None and (newest is None or newest.number < anchor.number):
        ends = f"ends at checkpoint #{newest.number} (seq {newest.seq})" if newest else "holds no checkpoint"
        check.add(
            "checkpoint",
            anchor.seq,
            0,
            f"the checkpoint file was cut: it {ends}, but {where} keeps {anchor.describe()}",
        )
    elif in_file is not None and in_file.digest != anchor.digest:
        check.add(
            "checkpoint",
            anchor.seq,
            0,
            f"checkpoint #{anchor.number} in the checkpoint file is not the one {where} keeps: the file was rewritten",
        )
    if newest is not None and newest.number >= anchor.number:
        return newest
    if anchor.seq in points and points[anchor.seq] != anchor.hash:
        check.add(
            "rewritten",
            anchor.seq,
            0,
            f"record seq {anchor.seq} is not the record the checkpoint kept in {where} (#{anchor.number}) "
            f"signed: the log was cut back before seq {anchor.seq} and written anew",
            of_file=False,
        )
    return anchor
