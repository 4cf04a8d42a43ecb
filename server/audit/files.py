"""The audit log as a set of files: the active one, the rotated ones, and the manifest listing them.

    <dir>/audit.jsonl                          the active file, appended to
    <dir>/audit.0000000001-0000000512.jsonl    a rotated file, named by its first and last seq
    <dir>/audit.manifest.json                  every rotated file: first and last seq, last hash,
                                               and whether retention has deleted it (pruned)
    <dir>/audit.checkpoints.jsonl              signed checkpoints of the chain's head, and the
    <dir>/audit.checkpoints.pub                public key that checks them (lakegate.server.audit.checkpoints)

One hash chain runs through the whole set: the first record of a file continues from the last
record of the file before it (seq last+1, ``prev_hash`` its hash). The manifest is an index and an
anchor, not the data: a pruned file keeps its last hash there so the next file still verifies, and
a rotated file's recorded last hash shows when its tail was cut. Reading works without a manifest
(rotated files are also found by their names).
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lakegate.errors import ServerError
from lakegate.server.audit.records import GENESIS_HASH, AuditFormatError, chain_point, read_last_line, read_records

__all__ = [
    "LogNames",
    "Manifest",
    "ManifestEntry",
    "ManifestError",
    "Segment",
    "chain_tail",
    "create_private_file",
    "fsync_dir",
    "load_manifest",
    "log_files",
    "log_segments",
    "read_all_records",
    "save_manifest",
]

#: Digits of the seq numbers in a rotated file's name: names sort in seq order up to 10^10 records
#: (and readers sort by the numbers anyway).
SEQ_WIDTH = 10
MANIFEST_FORMAT: Literal[1] = 1


class ManifestError(ServerError):
    """The manifest of rotated audit files cannot be read or is not a manifest."""

    outcome = "audit_error"


@dataclass(frozen=True)
class LogNames:
    """The names of every file of the set that ``active`` heads."""

    active: Path

    @property
    def stem(self) -> str:
        name = self.active.name
        return name[: -len(self.active.suffix)] if self.active.suffix else name

    @property
    def directory(self) -> Path:
        return self.active.parent

    @property
    def manifest(self) -> Path:
        return self.directory / f"{self.stem}.manifest.json"

    @property
    def checkpoints(self) -> Path:
        return self.directory / f"{self.stem}.checkpoints.jsonl"

    @property
    def public_key(self) -> Path:
        return self.directory / f"{self.stem}.checkpoints.pub"

    def rotated(self, first_seq: int, last_seq: int) -> Path:
        return self.directory / f"{self.stem}.{first_seq:0{SEQ_WIDTH}d}-{last_seq:0{SEQ_WIDTH}d}{self.active.suffix}"

    def parse_rotated(self, name: str) -> tuple[int, int] | None:
        """(first seq, last seq) if ``name`` is one of this set's rotated files."""
        pattern = rf"{re.escape(self.stem)}\.(\d+)-(\d+){re.escape(self.active.suffix)}"
        match = re.fullmatch(pattern, name)
        if match is None:
            return None
        return int(match.group(1)), int(match.group(2))

    def temporary(self, name: str) -> Path:
        """A fresh hidden name beside the set, for a file that is renamed into place when complete."""
        return self.directory / f".{name}.{secrets.token_hex(4)}.tmp"


class ManifestEntry(BaseModel):
    """One rotated file."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(min_length=1)
    first_seq: int = Field(ge=1)
    last_seq: int = Field(ge=1)
    first_prev_hash: str = Field(pattern=r"^[0-9a-f]{64}$")
    last_hash: str = Field(pattern=r"^[0-9a-f]{64}$")
    records: int = Field(ge=0)
    bytes: int = Field(ge=0)
    rotated_at: str
    #: When retention deleted the file; its seq range and last hash stay as the chain's anchor.
    pruned_at: str | None = None

    @property
    def pruned(self) -> bool:
        return self.pruned_at is not None


class Manifest(BaseModel):
    """Every rotated file of one log, oldest first."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    format: Literal[1] = MANIFEST_FORMAT
    active: str
    files: tuple[ManifestEntry, ...] = ()

    def entry(self, name: str) -> ManifestEntry | None:
        return next((entry for entry in self.files if entry.name == name), None)


def load_manifest(names: LogNames) -> Manifest | None:
    """The manifest of the set, or None when there is none (nothing was ever rotated).

    Raises:
        ManifestError: it cannot be read or is not a valid manifest.
    """
    try:
        text = names.manifest.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ManifestError(f"cannot read audit manifest {names.manifest}: {exc}") from exc
    try:
        return Manifest.model_validate_json(text)
    except ValidationError as exc:
        raise ManifestError(f"audit manifest {names.manifest} is not valid: {exc}") from exc


def save_manifest(names: LogNames, manifest: Manifest, *, fsync: bool) -> None:
    """Replace the manifest atomically: a reader sees the old one or the new one, never a mix.

    Raises:
        OSError: it cannot be written.
    """
    tmp = names.temporary(names.manifest.name)
    data = (manifest.model_dump_json(indent=1) + "\n").encode("utf-8")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o640)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            if fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, names.manifest)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    if fsync:
        fsync_dir(names.directory)


def create_private_file(path: Path, data: bytes) -> None:
    """Create ``path`` holding ``data``, readable by its owner only (0600), unless it exists.

    The file appears complete or not at all (written under a temporary name, then linked), and the
    first of several processes to create it wins: the others keep its content, so every writer of
    one state directory reads the same secret.

    Raises:
        OSError: the directory or the file cannot be created.
    """
    if path.is_file():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    candidate = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    # 0600 from the start: a secret is never readable by others, not even for a moment.
    fd = os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(candidate, path)  # first writer wins; the others read its content
    except FileExistsError:
        pass
    finally:
        candidate.unlink()
    fsync_dir(path.parent)


def fsync_dir(directory: Path) -> None:
    """Make renames and new names in ``directory`` survive a crash (best effort where unsupported)."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


SegmentKind = Literal["rotated", "pruned", "missing", "active"]


@dataclass(frozen=True)
class Segment:
    """One file of the set, as the manifest and the directory describe it.

    ``first_seq``/``last_seq`` are what the file's name or manifest entry says it holds (None for
    the active file); ``kind`` "missing" is listed in the manifest but absent, "pruned" was deleted
    by retention.
    """

    path: Path
    kind: SegmentKind
    first_seq: int | None = None
    last_seq: int | None = None
    entry: ManifestEntry | None = None

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def readable(self) -> bool:
        return self.kind in ("rotated", "active")


def log_segments(path: Path) -> tuple[list[Segment], ManifestError | None]:
    """Every file of the set headed by the active file ``path``, in chain order, and the manifest's
    error if it could not be read (the files on disk are listed regardless).

    Raises:
        OSError: the directory exists but cannot be listed.
    """
    names = LogNames(Path(path))
    error: ManifestError | None = None
    try:
        manifest = load_manifest(names)
    except ManifestError as exc:
        manifest, error = None, exc
    try:
        on_disk = set(os.listdir(names.directory))
    except (FileNotFoundError, NotADirectoryError):
        on_disk = set()
    segments: list[Segment] = []
    listed: set[str] = set()
    for entry in manifest.files if manifest else ():
        listed.add(entry.name)
        if entry.pruned:
            kind: SegmentKind = "pruned"
        else:
            kind = "rotated" if entry.name in on_disk else "missing"
        segments.append(Segment(names.directory / entry.name, kind, entry.first_seq, entry.last_seq, entry))
    for name in on_disk - listed:
        seqs = names.parse_rotated(name)
        if seqs is not None:
            segments.append(Segment(names.directory / name, "rotated", seqs[0], seqs[1]))
    segments.sort(key=lambda s: (s.first_seq or 0, s.last_seq or 0, s.name))
    if names.active.name in on_disk:
        segments.append(Segment(names.active, "active"))
    return segments, error


def log_files(path: Path) -> list[Path]:
    """The files of the audit log whose active file is ``path``: rotated files oldest first, the
    active file last. Only files that exist now; pruned and missing ones are left out (`verify`
    reports them).

    Raises:
        OSError: the directory cannot be listed.
    """
    segments, _ = log_segments(path)
    return [segment.path for segment in segments if segment.readable]


def read_all_records(path: Path) -> Iterator[dict[str, Any]]:
    """Yield every record of the log headed by ``path``, across its rotated files, in chain order.

    A file rotated away while this reads is still read when it was listed before; for a checked,
    complete view run `verify` first.

    Raises:
        OSError: a file cannot be read.
        AuditFormatError: a line is not a JSON object (``.file`` names the file, ``.line`` the line).
    """
    for file in log_files(path):
        try:
            yield from read_records(file)
        except FileNotFoundError:
            continue  # rotated away or pruned since it was listed; a rotated name reappears later
        except AuditFormatError as exc:
            raise AuditFormatError(exc.line, exc.reason, file=file.name) from exc


def chain_tail(path: Path) -> tuple[int, str]:
    """(seq, hash) that an empty active file continues from: the last rotated record, or (0, genesis).

    Raises:
        ManifestError: the manifest cannot be read.
        AuditFormatError: the last rotated file (found without a manifest) ends in a torn line.
        OSError: the directory or that file cannot be read.
    """
    segments, error = log_segments(path)
    if error is not None:
        raise error
    earlier = [segment for segment in segments if segment.kind != "active"]
    if not earlier:
        return 0, GENESIS_HASH
    last = earlier[-1]
    if last.entry is not None:
        return last.entry.last_seq, last.entry.last_hash
    fd = os.open(last.path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        line = read_last_line(fd, os.fstat(fd).st_size)
    finally:
        os.close(fd)
    if line is None:
        return 0, GENESIS_HASH
    seq, _, digest = chain_point(line)
    return seq, digest
