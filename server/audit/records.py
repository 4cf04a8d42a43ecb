"""What one audit record is on disk: a canonical JSON line whose ``hash`` chains it to the one before.

Shared by the writer (`audit.log`), the file set (`audit.files`) and `audit.verify`; everything
public here is re-exported by `audit.log`.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, TypeGuard

from lakegate.errors import ServerError

__all__ = [
    "GENESIS_HASH",
    "AuditFormatError",
    "canonical_json",
    "chain_point",
    "is_hex64",
    "parse_line",
    "read_first_line",
    "read_last_line",
    "read_records",
    "record_hash",
]

GENESIS_HASH = "0" * 64


class AuditFormatError(ServerError):
    """A line of the audit log is not a JSON object (torn write, manual edit, wrong file)."""

    outcome = "audit_error"

    def __init__(self, line: int | None, reason: str, *, file: str | None = None) -> None:
        # line is None for the tail read while appending, where lines are not counted.
        where = f"line {line}" if line is not None else "the last line"
        if file is not None:
            where += f" of {file}"
        super().__init__(f"audit log {where} is not a valid record: {reason}")
        self.line = line
        self.reason = reason
        self.file = file


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


def is_hex64(value: Any) -> TypeGuard[str]:
    """Whether ``value`` looks like a sha256 hex digest (lower case)."""
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)


def read_records(path: Path) -> Iterator[dict[str, Any]]:
    """Yield each record of one log file in file order (`read_all_records` reads a rotated set).

    Raises:
        FileNotFoundError: there is no such file.
        OSError: the file cannot be read.
        AuditFormatError: a line (its number is ``.line``, 1-based) is not a JSON object,
            including a blank line or a torn last line.
    """
    with open(path, "rb") as file:
        for number, raw in enumerate(file, start=1):
            yield parse_line(number, raw)


def parse_line(number: int, raw: bytes) -> dict[str, Any]:
    """One raw line (with its newline) as a record dict.

    Raises:
        AuditFormatError: no newline at the end, not JSON, or not a JSON object.
    """
    if not raw.endswith(b"\n"):
        raise AuditFormatError(number, "no newline at the end (an interrupted write?)")
    try:
        value = json.loads(raw)
    except ValueError as exc:
        raise AuditFormatError(number, f"not JSON ({exc})") from exc
    if not isinstance(value, dict):
        raise AuditFormatError(number, "not a JSON object")
    return value


def read_last_line(fd: int, size: int) -> bytes | None:
    """The last line of the file open as ``fd`` (without its newline), or None for an empty file.

    Raises:
        AuditFormatError: the file does not end with a newline (a torn or foreign write).
        OSError: the file cannot be read.
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


def read_first_line(fd: int) -> bytes | None:
    """The first complete line of the file open as ``fd`` (without its newline), or None if there is none.

    Raises:
        OSError: the file cannot be read.
    """
    chunk = 8192
    buf = b""
    while True:
        part = os.pread(fd, chunk, len(buf))
        if not part:
            return None
        buf += part
        cut = buf.find(b"\n")
        if cut >= 0:
            return buf[:cut]


def chain_point(line: bytes) -> tuple[int, str, str]:
    """(seq, prev_hash, hash) of a raw record line, as the record states them.

    Raises:
        AuditFormatError: the line is not a record with an integer seq and hex hashes.
    """
    try:
        record = json.loads(line)
    except ValueError as exc:
        raise AuditFormatError(None, f"not JSON ({exc})") from exc
    if not isinstance(record, dict):
        raise AuditFormatError(None, "not a JSON object")
    seq, prev, stored = record.get("seq"), record.get("prev_hash"), record.get("hash")
    if isinstance(seq, bool) or not isinstance(seq, int) or seq < 1 or not (is_hex64(prev) and is_hex64(stored)):
        raise AuditFormatError(None, "no valid seq, prev_hash and hash")
    return seq, prev, stored
