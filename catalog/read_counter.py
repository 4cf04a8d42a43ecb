"""How many bytes this process has read from files: Linux's `rchar` counter, where it exists.

A query worker runs one query at a time, so the difference of the counter over a query is what the
query read (with the few bytes of a cancel message that may arrive meanwhile). The count covers
reads through the operating system (local files), not an object store's network reads.
"""

from __future__ import annotations

__all__ = ["Mark", "bytes_read", "read_since"]

#: The counter, and the size of the read that fetched it (the counter holds that read only after it).
Mark = tuple[int, int]


def bytes_read() -> Mark | None:
    """A mark of the bytes read so far, or None where the counter does not exist."""
    try:
        with open("/proc/self/io", "rb", buffering=0) as counters:
            text = counters.readall()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(b"rchar:"):
            return int(line.split()[1]), len(text)
    return None


def read_since(before: Mark | None) -> int | None:
    """The bytes read since `bytes_read()` gave `before` (None where there is no counter)."""
    after = bytes_read()
    if before is None or after is None:
        return None
    return after[0] - before[0] - before[1]
