"""Signed checkpoints of the audit chain: what shows that records were cut from the log's end.

The hash chain shows an edited, deleted, inserted or reordered record, but not records cut from
the end: what is left is still a valid chain. So, in the manner of CloudTrail's digest files, the
writer (`lakegate.server.audit.log.AuditLog`) signs the chain's head now and then, with a key kept apart:

    <dir>/audit.checkpoints.jsonl   one checkpoint per line, each chained to the one before
    <dir>/audit.checkpoints.pub     the Ed25519 public keys that check them (PEM), for reviewers
                                    (one per state directory whose server wrote to this log)
    <home>/audit-checkpoint.key     the private key (PKCS#8 PEM, 0600, created on first use),
                                    outside the log's directory; never printed

A `Checkpoint` names the log, its own ``number`` (1, 2, 3, ...), the head's ``seq`` and ``hash``,
the ``records`` the chain then held (seq counts from 1 without gaps, so this is ``seq``), the
``time``, ``prev`` (the previous checkpoint's `Checkpoint.digest`, `GENESIS_HASH` for the first),
the signing ``key_id`` and the ``signature`` over all of that. A checkpoint is signed after every
``every`` records, at most ``interval_s`` after a record was written, and when the log is closed:
records can be cut from the end undetected only back to the last checkpoint. The checkpoint
file's own end is no safer than the log's, though: cut both back to one checkpoint and the files
agree. So in the production profile the latest checkpoint is also kept in PostgreSQL
(`CheckpointStore`), where cutting the checkpoint file shows.

`lakegate.server.audit.checkpoint_verify` holds the checkpoints against the records.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

import structlog
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lakegate.errors import AuditWriteError, ConfigurationError
from lakegate.server.audit.files import LogNames, create_private_file, fsync_dir
from lakegate.server.audit.records import GENESIS_HASH, AuditFormatError, canonical_json, read_last_line

__all__ = [
    "CHECKPOINT_KEY_FILE",
    "Checkpoint",
    "CheckpointStore",
    "CheckpointWriter",
    "Checkpointing",
    "SigningKey",
    "key_id",
    "load_public_keys",
    "parse_public_keys",
    "signing_public_key",
]

log = structlog.get_logger(__name__)

#: The private key's file name in the state directory (`Checkpointing.key`'s default).
CHECKPOINT_KEY_FILE = "audit-checkpoint.key"
_HEX64 = r"^[0-9a-f]{64}$"
_PEM_BLOCK = re.compile(rb"-----BEGIN PUBLIC KEY-----.+?-----END PUBLIC KEY-----\n?", re.DOTALL)


class Checkpoint(BaseModel):
    """One signed statement of the chain's head: "record ``seq`` of ``log`` has hash ``hash``"."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    format: Literal[1] = 1
    log: str = Field(min_length=1)  # the active file's name: a checkpoint of another log does not fit
    number: int = Field(ge=1)
    seq: int = Field(ge=1)
    hash: str = Field(pattern=_HEX64)
    records: int = Field(ge=1)
    time: str
    prev: str = Field(pattern=_HEX64)
    key_id: str
    signature: str = ""

    def signed_bytes(self) -> bytes:
        """What the signature covers: the canonical JSON of every field but the signature."""
        return canonical_json(self.model_dump(mode="json", exclude={"signature"})).encode("utf-8")

    def line(self) -> str:
        """The checkpoint as one line of the checkpoint file (without the newline)."""
        return canonical_json(self.model_dump(mode="json"))

    @property
    def digest(self) -> str:
        """sha256 of the whole line, signature included: what the next checkpoint's ``prev`` holds."""
        return hashlib.sha256(self.line().encode("utf-8")).hexdigest()

    def signed_by(self, key: Ed25519PublicKey) -> bool:
        """Whether ``key`` made the signature over exactly these fields."""
        try:
            key.verify(base64.b64decode(self.signature, validate=True), self.signed_bytes())
        except (InvalidSignature, ValueError):
            return False
        return True

    def describe(self) -> str:
        return f"checkpoint #{self.number} (seq {self.seq}, signed {self.time})"


def key_id(key: Ed25519PublicKey) -> str:
    """A short name of a public key: the first 16 hex digits of the sha256 of its raw 32 bytes."""
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def _public_pem(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def parse_public_keys(data: bytes) -> tuple[Ed25519PublicKey, ...]:
    """The Ed25519 public keys of a PEM bundle (one or more ``PUBLIC KEY`` blocks).

    Raises:
        ValueError: a block is not a public key, or not an Ed25519 one.
    """
    keys = []
    for block in _PEM_BLOCK.findall(data):
        key = serialization.load_pem_public_key(block)
        if not isinstance(key, Ed25519PublicKey):
            raise ValueError("not an Ed25519 public key")
        keys.append(key)
    return tuple(keys)


def load_public_keys(path: Path) -> tuple[Ed25519PublicKey, ...]:
    """The Ed25519 public keys in the PEM file ``path`` (the file beside the checkpoints, or one a
    reviewer kept apart).

    Raises:
        OSError: the file cannot be read (FileNotFoundError when there is none).
        ConfigurationError: it holds no key, or a block that is not an Ed25519 public key.
    """
    data = Path(path).read_bytes()
    try:
        keys = parse_public_keys(data)
    except ValueError as exc:
        raise ConfigurationError(f"{path} does not hold Ed25519 public keys (PEM): {exc}") from exc
    if not keys:
        raise ConfigurationError(f"{path} holds no PEM public key")
    return keys


def _load_private_key(path: Path) -> Ed25519PrivateKey:
    """Raises: OSError, ConfigurationError (as `load_public_key`)."""
    data = Path(path).read_bytes()
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise ConfigurationError(f"{path} does not hold an unencrypted PEM private key: {exc}") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigurationError(f"{path} does not hold an Ed25519 private key")
    return key


def signing_public_key(path: Path) -> Ed25519PublicKey:
    """The public half of the private key file ``path``: the key a verifier with access to the
    state directory trusts, rather than the copy beside the checkpoints that anyone who can write
    the log's directory could replace.

    Raises:
        OSError: the file cannot be read (FileNotFoundError when there is none).
        ConfigurationError: it does not hold an Ed25519 private key.
    """
    return _load_private_key(path).public_key()


class SigningKey:
    """The private key that signs checkpoints, read (or created, 0600) on first use."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._key: Ed25519PrivateKey | None = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"SigningKey({str(self.path)!r})"  # never the key

    def private(self) -> Ed25519PrivateKey:
        """The key, created on first use (the first of several processes to create it wins).

        Raises:
            AuditWriteError: the file cannot be read or created, or holds no Ed25519 private key.
        """
        with self._lock:
            if self._key is None:
                try:
                    if not self.path.is_file():
                        pem = Ed25519PrivateKey.generate().private_bytes(
                            serialization.Encoding.PEM,
                            serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption(),
                        )
                        create_private_file(self.path, pem)
                    self._key = _load_private_key(self.path)
                except (OSError, ConfigurationError) as exc:
                    raise AuditWriteError(f"cannot read or create the checkpoint key {self.path}: {exc}") from exc
            return self._key


@dataclass(frozen=True)
class Checkpointing:
    """When the writer signs a checkpoint; ``every`` and ``interval_s`` both None: never."""

    key: Path  # the private key file, kept outside the log's directory
    every: int | None = 100  # after this many records since the last checkpoint
    interval_s: float | None = 60.0  # at most this long after a record was written

    @property
    def enabled(self) -> bool:
        return self.every is not None or self.interval_s is not None


class CheckpointStore(Protocol):
    """Somewhere apart from the log that keeps its latest checkpoint (PostgreSQL in production)."""

    def publish(self, checkpoint: Checkpoint) -> Checkpoint | None:
        """Keep ``checkpoint`` as the latest unless one with a higher number is kept; returns that
        one (a sign that the checkpoint file was cut), or None.

        Raises:
            AuditWriteError: it could not be stored.
        """
        ...

    def close(self) -> None: ...


class CheckpointWriter:
    """Signs and appends checkpoints to the checkpoint file of one log.

    The caller holds the log's lock (thread and flock), which orders the checkpoints of every
    writer of the file.
    """

    def __init__(self, active: Path, key: SigningKey, *, fsync: bool) -> None:
        self.names = LogNames(Path(active))
        self.key = key
        self.fsync = fsync
        #: Set above a checkpoint number kept elsewhere that the file does not reach (it was cut):
        #: numbers go on above it, so that a gap stays in the file as evidence.
        self.floor = 0
        self._seen: tuple[int, int, Checkpoint | None] | None = None  # (inode, size, last) of the file
        self._public_written = False

    def last(self) -> Checkpoint | None:
        """The last checkpoint in the file (None when there is none), re-read when the file changed.

        Raises:
            AuditWriteError: the file cannot be read, or its last line is not a checkpoint.
        """
        path = self.names.checkpoints
        try:
            # One stat per append while nothing changed; the file is read only when it did.
            named = os.stat(path)
            if self._seen is not None and self._seen[:2] == (named.st_ino, named.st_size):
                return self._seen[2]
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            self._seen = None
            return None
        except OSError as exc:
            raise AuditWriteError(f"cannot read the checkpoint file {path}: {exc}") from exc
        try:
            stat = os.fstat(fd)
            line = read_last_line(fd, stat.st_size)
            last = None if line is None else Checkpoint.model_validate_json(line)
        except (OSError, AuditFormatError, ValidationError) as exc:
            raise AuditWriteError(f"the last line of the checkpoint file {path} is not a checkpoint: {exc}") from exc
        finally:
            os.close(fd)
        self._seen = (stat.st_ino, stat.st_size, last)
        return last

    def write(self, seq: int, head_hash: str, time: str) -> Checkpoint:
        """Sign the head (``seq``, ``head_hash``) at ``time`` and append it; returns the checkpoint.

        Raises:
            AuditWriteError: the key, the public key file or the checkpoint file cannot be written.
                A partly written line is cut off again.
        """
        last = self.last()
        private = self.key.private()
        public = private.public_key()
        self._write_public_key(public)
        unsigned = Checkpoint(
            log=self.names.active.name,
            number=max(last.number if last else 0, self.floor) + 1,
            seq=seq,
            hash=head_hash,
            records=seq,
            time=time,
            prev=last.digest if last else GENESIS_HASH,
            key_id=key_id(public),
        )
        signature = base64.b64encode(private.sign(unsigned.signed_bytes())).decode("ascii")
        checkpoint = unsigned.model_copy(update={"signature": signature})
        path = self.names.checkpoints
        data = memoryview((checkpoint.line() + "\n").encode("utf-8"))
        try:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        except OSError as exc:
            raise AuditWriteError(f"cannot open the checkpoint file {path}: {exc}") from exc
        try:
            stat = os.fstat(fd)
            try:
                while data:
                    data = data[os.write(fd, data) :]
                if self.fsync:
                    os.fsync(fd)
            except OSError as exc:
                # Half a line would make the file unreadable for every later checkpoint.
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, stat.st_size)
                self._seen = None
                raise AuditWriteError(f"cannot write the checkpoint file {path}: {exc}") from exc
            self._seen = (stat.st_ino, os.fstat(fd).st_size, checkpoint)
        finally:
            os.close(fd)
        return checkpoint

    def _write_public_key(self, key: Ed25519PublicKey) -> None:
        """Put the public key beside the checkpoints (before the first one it checks), next to those
        of other state directories whose servers wrote to this log."""
        if self._public_written:
            return
        path = self.names.public_key
        try:
            existing = path.read_bytes() if path.is_file() else b""
            try:
                known = {key_id(other) for other in parse_public_keys(existing)}
            except ValueError:
                known = set()  # not a key file: verify says so; ours is added all the same
            if key_id(key) not in known:
                if existing:
                    # Another key signed here before: a second state directory writes this log, or
                    # the private key was lost and made anew. Say so where it happened.
                    log.warning("audit.checkpoint_key_added", path=str(path), key_id=key_id(key))
                tmp = self.names.temporary(path.name)
                tmp.write_bytes(existing + _public_pem(key))
                os.replace(tmp, path)
                if self.fsync:
                    fsync_dir(path.parent)
        except OSError as exc:
            raise AuditWriteError(f"cannot write the checkpoint public key {path}: {exc}") from exc
        self._public_written = True
