"""The audit log: writing, reading, the chain across threads and processes, and tamper detection."""

from __future__ import annotations

import json
import multiprocessing
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lakegate.errors import AuditWriteError
from lakegate.server.audit.log import (
    GENESIS_HASH,
    AuditFormatError,
    AuditLog,
    read_records,
    record_hash,
    verify,
)


def call(i: int, **extra: Any) -> dict[str, Any]:
    """A record shaped like the ones the gate writes."""
    return {
        "request_id": f"req-{i}",
        "session_id": "s-1",
        "principal": "alice" if i % 2 else "bob",
        "roles": ["analyst"],
        "transport": "stdio",
        "client": {"name": "test", "version": "1"},
        "tool": "query",
        "arguments": {"sql": f"select {i}"},
        "decision": "allow",
        "rules": [["analyst", "sales", "read"]],
        "policy_version": "v1",
        "resources": [{"type": "dataset", "name": "sales", "version": 3, "access": "read"}],
        "rows": i,
        "bytes": 10 * i,
        "duration_ms": 1.5,
        "outcome": "ok",
        "error": None,
        **extra,
    }


def write_log(path: Path, n: int) -> list[dict[str, Any]]:
    log = AuditLog(path, fsync=False)
    written = [log.append(call(i)) for i in range(1, n + 1)]
    log.close()
    return written


def lines_of(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines(keepends=True)


# -- writing and reading ------------------------------------------------------------------------


def test_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "dir" / "audit.jsonl"
    written = write_log(path, 3)
    read = list(read_records(path))
    assert read == written
    assert [r["seq"] for r in read] == [1, 2, 3]
    assert read[0]["prev_hash"] == GENESIS_HASH
    assert read[1]["prev_hash"] == read[0]["hash"]
    assert all(r["hash"] == record_hash(r) for r in read)
    assert read[0]["time"].endswith("+00:00") and "." in read[0]["time"]
    assert len(lines_of(path)) == 3


def test_time_is_kept_and_chain_fields_are_replaced(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "a.jsonl", fsync=False)
    record = log.append({"time": "2024-01-02T03:04:05.000006+00:00", "seq": 99, "hash": "x", "prev_hash": "y"})
    assert record["time"] == "2024-01-02T03:04:05.000006+00:00"
    assert record["seq"] == 1 and record["prev_hash"] == GENESIS_HASH
    assert record["hash"] == record_hash(record)


def test_record_keys_that_look_like_logger_arguments(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "a.jsonl", fsync=False)
    record = log.append({"event": "e", "method_name": "m", "self": 1})
    assert (record["event"], record["method_name"], record["self"]) == ("e", "m", 1)


def test_seq_continues_after_reopening(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    write_log(path, 2)
    with AuditLog(path) as log:
        assert log.append(call(3))["seq"] == 3
    assert verify(path).ok


def test_two_instances_on_one_file_share_one_chain(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    first, second = AuditLog(path, fsync=False), AuditLog(path, fsync=False)
    seqs = [(first if i % 3 else second).append(call(i))["seq"] for i in range(1, 31)]
    assert seqs == list(range(1, 31))
    report = verify(path)
    assert report.ok and report.records == 30 and report.last_seq == 30


def test_threads_share_one_chain(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, fsync=False)
    threads = [threading.Thread(target=lambda: [log.append(call(i)) for i in range(25)]) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    report = verify(path)
    assert report.ok and report.records == 100


def _append_many(path: str, worker: int, count: int) -> None:
    log = AuditLog(Path(path), fsync=False)
    for i in range(count):
        log.append(call(i, worker=worker))


def test_processes_share_one_chain(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    AuditLog(path, fsync=False)  # an instance in the parent too, as a server would have
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_append_many, args=(str(path), w, 50)) for w in range(4)]
    for p in workers:
        p.start()
    for p in workers:
        p.join(timeout=60)
        assert p.exitcode == 0
    report = verify(path)
    assert report.ok, report.problems
    assert report.records == 200 and report.last_seq == 200
    by_worker = [r["worker"] for r in read_records(path)]
    assert sorted(by_worker.count(w) for w in range(4)) == [50, 50, 50, 50]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_forked_child_continues_the_chain(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, fsync=False)
    log.append(call(0))
    context = multiprocessing.get_context("fork")
    child = context.Process(target=lambda: [log.append(call(i)) for i in range(20)])
    child.start()
    for i in range(20):
        log.append(call(i))
    child.join(timeout=60)
    assert child.exitcode == 0
    report = verify(path)
    assert report.ok and report.records == 41


def test_read_records_names_the_malformed_line(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    write_log(path, 3)
    lines = lines_of(path)
    lines[1] = "{not json\n"
    path.write_text("".join(lines), encoding="utf-8")
    with pytest.raises(AuditFormatError) as info:
        list(read_records(path))
    assert info.value.line == 2


# -- failing closed -----------------------------------------------------------------------------


def test_path_that_is_a_directory(tmp_path: Path) -> None:
    with pytest.raises(AuditWriteError) as info:
        AuditLog(tmp_path).append(call(1))
    assert isinstance(info.value.__cause__, OSError)


def test_parent_that_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(AuditWriteError):
        AuditLog(tmp_path / "file" / "audit.jsonl").append(call(1))


def _append_refused(path: Path) -> bool:
    try:
        AuditLog(path).append(call(1))
    except AuditWriteError as exc:
        return isinstance(exc.__cause__, PermissionError)
    return False


def _append_refused_as_nobody(path: str) -> None:
    os.setgid(65534)
    os.setuid(65534)
    raise SystemExit(0 if _append_refused(Path(path)) else 1)


def test_read_only_directory(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        if os.geteuid() != 0:
            assert _append_refused(locked / "audit.jsonl")
        else:
            # root ignores directory permissions: check as an unprivileged user instead.
            child = multiprocessing.get_context("fork").Process(
                target=_append_refused_as_nobody, args=(str(locked / "audit.jsonl"),)
            )
            child.start()
            child.join(timeout=60)
            assert child.exitcode == 0
        assert not (locked / "audit.jsonl").exists()
    finally:
        locked.chmod(0o700)


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_disk_full() -> None:
    with pytest.raises(AuditWriteError) as info:
        AuditLog(Path("/dev/full"), fsync=False).append(call(1))
    assert isinstance(info.value.__cause__, OSError)


@pytest.mark.parametrize(
    "value",
    [object(), {1, 2}, float("nan"), float("inf"), b"bytes"],
    ids=["object", "set", "nan", "inf", "bytes"],
)
def test_unserialisable_values_are_refused(tmp_path: Path, value: Any) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, fsync=False)
    log.append(call(1))
    with pytest.raises(AuditWriteError) as info:
        log.append(call(2, arguments={"x": value}))
    assert info.value.__cause__ is not None
    # Nothing half-written, and the chain goes on.
    assert log.append(call(3))["seq"] == 2
    assert verify(path).ok


def test_torn_last_line_refuses_to_append(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    write_log(path, 2)
    with path.open("a", encoding="utf-8") as f:
        f.write('{"seq": 3, "trunc')
    with pytest.raises(AuditWriteError):
        AuditLog(path).append(call(3))


# -- verification -------------------------------------------------------------------------------


def test_verify_real_log(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    written = write_log(path, 5)
    report = verify(path)
    assert report.ok and report.records == 5 and not report.problems
    assert (report.first_seq, report.last_seq, report.last_hash) == (1, 5, written[-1]["hash"])


def test_verify_missing_and_empty(tmp_path: Path) -> None:
    missing = verify(tmp_path / "none.jsonl")
    assert missing.ok and missing.records == 0 and not missing.exists
    (tmp_path / "empty.jsonl").write_text("")
    empty = verify(tmp_path / "empty.jsonl")
    assert empty.ok and empty.records == 0 and empty.exists


Tamper = Callable[[list[str], int], list[str]]


def edit_field(lines: list[str], k: int) -> list[str]:
    record = json.loads(lines[k])
    record["rows"] = record["rows"] + 1000
    return [*lines[:k], json.dumps(record) + "\n", *lines[k + 1 :]]


def edit_hash(lines: list[str], k: int) -> list[str]:
    record = json.loads(lines[k])
    record["hash"] = "f" * 64 if record["hash"] != "f" * 64 else "e" * 64
    return [*lines[:k], json.dumps(record) + "\n", *lines[k + 1 :]]


def edit_seq(lines: list[str], k: int) -> list[str]:
    record = json.loads(lines[k])
    record["seq"] += 7
    return [*lines[:k], json.dumps(record) + "\n", *lines[k + 1 :]]


def delete(lines: list[str], k: int) -> list[str]:
    return [*lines[:k], *lines[k + 1 :]]


def insert_forged(lines: list[str], k: int) -> list[str]:
    """A made-up record after line k, copying its neighbour's shape with a wrong hash."""
    record = json.loads(lines[k])
    record["principal"] = "mallory"
    return [*lines[: k + 1], json.dumps(record) + "\n", *lines[k + 1 :]]


def insert_rehashed(lines: list[str], k: int) -> list[str]:
    """A well-forged record after line k: right seq, linked to line k, its own hash correct."""
    before = json.loads(lines[k])
    record = call(0, principal="mallory", seq=before["seq"] + 1, prev_hash=before["hash"], time=before["time"])
    record["hash"] = record_hash(record)
    return [*lines[: k + 1], json.dumps(record) + "\n", *lines[k + 1 :]]


def duplicate(lines: list[str], k: int) -> list[str]:
    return [*lines[: k + 1], lines[k], *lines[k + 1 :]]


def swap(lines: list[str], k: int) -> list[str]:
    out = list(lines)
    out[k], out[k + 1] = out[k + 1], out[k]
    return out


# (tamper, kind reported, seq named given the 0-based index k of the record tampered with,
#  line named, and the indices k it applies to on a log of n records)
CASES: dict[str, tuple[Tamper, str, Callable[[int], int], Callable[[int], int]]] = {
    "edit_field": (edit_field, "edited", lambda k: k + 1, lambda k: k + 1),
    "edit_hash": (edit_hash, "edited", lambda k: k + 1, lambda k: k + 1),
    "edit_seq": (edit_seq, "edited", lambda k: k + 1, lambda k: k + 1),
    "delete": (delete, "deleted", lambda k: k + 1, lambda k: k + 1),
    "insert_forged": (insert_forged, "inserted", lambda k: k + 1, lambda k: k + 2),
    "insert_rehashed": (insert_rehashed, "inserted", lambda k: k + 2, lambda k: k + 2),
    "duplicate": (duplicate, "inserted", lambda k: k + 1, lambda k: k + 2),
    "swap": (swap, "reordered", lambda k: k + 2, lambda k: k + 1),
}


def applicable(name: str, k: int, n: int) -> bool:
    if name == "delete":
        return k < n - 1  # deleting the last record needs an external anchor (tested below)
    if name == "swap":
        return k < n - 1
    if name == "insert_rehashed":
        return k < n - 2  # right before the last record it is indistinguishable from the original
    return True


@pytest.fixture(scope="module")
def clean_log(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    path = tmp_path_factory.mktemp("clean") / "audit.jsonl"
    write_log(path, 8)
    return lines_of(path)


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("k", [0, 3, 6, 7])
def test_each_tamper_is_named(tmp_path: Path, clean_log: list[str], name: str, k: int) -> None:
    if not applicable(name, k, len(clean_log)):
        pytest.skip("not detectable at this position without an anchor")
    tamper, kind, seq, line = CASES[name]
    path = tmp_path / "audit.jsonl"
    path.write_text("".join(tamper(clean_log, k)), encoding="utf-8")
    report = verify(path)
    assert not report.ok
    first = report.problems[0]
    assert (first.kind, first.seq, first.line) == (kind, seq(k), line(k)), report.problems
    assert len(report.problems) == 1, report.problems
    assert f"seq {seq(k)}" in first.message


def test_edit_message_reads_well(tmp_path: Path, clean_log: list[str]) -> None:
    path = tmp_path / "audit.jsonl"
    path.write_text("".join(edit_field(clean_log, 4)), encoding="utf-8")
    expected = "record seq 5 (line 5) was edited: its hash does not match its content"
    assert verify(path).problems[0].message == expected


@settings(max_examples=150, suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None)
@given(data=st.data())
def test_random_tamper_is_named(tmp_path: Path, clean_log: list[str], data: st.DataObject) -> None:
    n = len(clean_log)
    name = data.draw(st.sampled_from(sorted(CASES)))
    k = data.draw(st.integers(0, n - 1).filter(lambda k: applicable(name, k, n)))
    tamper, kind, seq, line = CASES[name]
    path = tmp_path / f"{name}-{k}.jsonl"
    path.write_text("".join(tamper(clean_log, k)), encoding="utf-8")
    report = verify(path)
    assert not report.ok
    first = report.problems[0]
    assert (first.kind, first.seq, first.line) == (kind, seq(k), line(k)), report.problems


def test_delete_last_needs_an_anchor(tmp_path: Path, clean_log: list[str]) -> None:
    path = tmp_path / "audit.jsonl"
    last = json.loads(clean_log[-1])
    path.write_text("".join(clean_log[:-1]), encoding="utf-8")
    assert verify(path).ok  # the rest is a valid chain: a cut tail is invisible on its own
    by_count = verify(path, expect_records=len(clean_log))
    assert not by_count.ok
    assert (by_count.problems[0].kind, by_count.problems[0].seq) == ("deleted", len(clean_log))
    by_hash = verify(path, expect_last_hash=last["hash"])
    assert not by_hash.ok and by_hash.problems[0].kind == "deleted"


def test_anchor_allows_growth(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    written = write_log(path, 3)
    AuditLog(path, fsync=False).append(call(4))
    assert verify(path, expect_last_hash=written[-1]["hash"], expect_records=3).ok


def test_malformed_line_is_reported_once(tmp_path: Path, clean_log: list[str]) -> None:
    path = tmp_path / "audit.jsonl"
    lines = list(clean_log)
    lines[2] = "garbage\n"
    path.write_text("".join(lines), encoding="utf-8")
    report = verify(path)
    assert [(p.kind, p.line) for p in report.problems] == [("malformed", 3)]


def test_verify_unreadable_raises(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        verify(tmp_path)
