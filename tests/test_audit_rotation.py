"""Audit log rotation: the chain continues across files, across writers and processes, and verify
checks the whole set (missing, pruned, tampered and cut files)."""

from __future__ import annotations

import json
import multiprocessing
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError
from structlog.testing import capture_logs

from lakegate.errors import AuditWriteError
from lakegate.server.audit.files import LogNames, load_manifest
from lakegate.server.audit.log import (
    GENESIS_HASH,
    AuditLog,
    Rotation,
    log_files,
    read_all_records,
    read_records,
    record_hash,
    verify,
)
from lakegate.server.settings import AuditSettings, load_settings
from tests.test_audit import call  # a record shaped like the ones the gate writes

SMALL = Rotation(max_bytes=2048)  # a record of `call` is ~600 bytes: a file every 4 records


def write(log: AuditLog, n: int, start: int = 1) -> list[dict[str, Any]]:
    return [log.append(call(i)) for i in range(start, start + n)]


def rotated_log(path: Path, n: int, rotation: Rotation = SMALL) -> list[dict[str, Any]]:
    with AuditLog(path, fsync=False, rotation=rotation) as log:
        return write(log, n)


def manifest_of(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(LogNames(path).manifest.read_text())
    return data


# -- rotation -----------------------------------------------------------------------------------


def test_size_rotation_continues_the_chain(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    written = rotated_log(path, 30)
    files = log_files(path)
    assert len(files) >= 5 and files[-1] == path
    # Names sort in seq order and say what each file holds.
    assert [f.name for f in files[:-1]] == sorted(f.name for f in files[:-1])
    previous_last = GENESIS_HASH
    expected_seq = 1
    for file in files:
        records = list(read_records(file))
        assert records, file.name
        assert records[0]["seq"] == expected_seq and records[0]["prev_hash"] == previous_last
        if file != path:
            assert file.name == f"audit.{records[0]['seq']:010d}-{records[-1]['seq']:010d}.jsonl"
            assert file.stat().st_size >= 2048
        previous_last, expected_seq = records[-1]["hash"], records[-1]["seq"] + 1
    assert list(read_all_records(path)) == written
    assert [r["seq"] for r in read_all_records(path)] == list(range(1, 31))

    manifest = manifest_of(path)
    assert [e["name"] for e in manifest["files"]] == [f.name for f in files[:-1]]
    for entry, file in zip(manifest["files"], files, strict=False):
        records = list(read_records(file))
        assert (entry["first_seq"], entry["last_seq"], entry["last_hash"]) == (
            records[0]["seq"],
            records[-1]["seq"],
            records[-1]["hash"],
        )
        assert entry["pruned_at"] is None

    report = verify(path)
    assert report.ok, report.problems
    assert (report.records, report.first_seq, report.last_seq) == (30, 1, 30)
    assert report.last_hash == written[-1]["hash"]
    assert [f.name for f in report.files] == [f.name for f in files]
    assert all(f.status == "ok" for f in report.files)


def test_an_empty_active_file_continues_from_the_manifest(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    with AuditLog(path, fsync=False, rotation=Rotation(max_bytes=1024)) as log:
        written = write(log, 2)
        # Rotation is due: it happens, then this record is refused, so the new active file stays empty.
        with pytest.raises(AuditWriteError):
            log.append(call(3, arguments={"x": object()}))
    assert path.stat().st_size == 0 and len(log_files(path)) == 2
    with AuditLog(path, fsync=False) as fresh:  # another writer, knowing nothing of the rotation
        record = fresh.append(call(3))
    assert (record["seq"], record["prev_hash"]) == (3, written[-1]["hash"])
    assert verify(path).ok


def test_age_rotation(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    old = (datetime.now(UTC) - timedelta(days=2)).isoformat()
    with AuditLog(path, fsync=False, rotation=Rotation(max_age_s=86400)) as log:
        log.append(call(1, time=old))
        log.append(call(2))  # the file's first record is two days old: rotate first
        log.append(call(3))  # the new file started now: no rotation
    files = log_files(path)
    assert [f.name for f in files] == ["audit.0000000001-0000000001.jsonl", "audit.jsonl"]
    assert [r["seq"] for r in read_records(path)] == [2, 3]
    assert verify(path).ok


def test_settings_build_the_rotation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = AuditSettings.model_validate({"rotate_bytes": 4096, "rotate_age": "12h", "keep_files": 3})
    assert settings.rotate_age == 12 * 3600
    assert AuditSettings(rotate_age=90).rotate_age == 90
    assert AuditSettings().rotate_bytes == 64 * 1024 * 1024 and AuditSettings().keep_files is None
    with pytest.raises(ValidationError, match="not a duration"):
        AuditSettings.model_validate({"rotate_age": "soon"})
    monkeypatch.setenv("LAKEGATE_AUDIT__ROTATE_AGE", "1d")
    assert load_settings(tmp_path).audit.rotate_age == 86400
    log = AuditLog.from_settings(tmp_path / "audit.jsonl", settings)
    assert log.rotation == Rotation(4096, 43200, 3) and log.fsync is True


def test_two_writers_rotate_once_and_share_one_chain(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    first = AuditLog(path, fsync=False, rotation=SMALL)
    second = AuditLog(path, fsync=False, rotation=SMALL)
    seqs = [(first if i % 3 else second).append(call(i))["seq"] for i in range(1, 41)]
    assert seqs == list(range(1, 41))
    report = verify(path)
    assert report.ok, report.problems
    assert report.records == 40
    ranges = [(f.first_seq, f.last_seq) for f in report.files]
    assert all(a is not None and b is not None for a, b in ranges)
    # No file rotated twice, no overlap: each range starts right after the previous one.
    assert all(ranges[k + 1][0] == (ranges[k][1] or 0) + 1 for k in range(len(ranges) - 1))


def test_a_writer_holding_the_old_file_reopens_instead_of_appending_to_it(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    holder = AuditLog(path, fsync=False)  # never rotates itself, keeps its descriptor
    rotator = AuditLog(path, fsync=False, rotation=Rotation(max_bytes=1024))
    holder.append(call(1))
    rotator.append(call(2))
    rotator.append(call(3))  # the file is over 1 KiB: rotated before this record
    (rotated,) = log_files(path)[:-1]
    frozen = rotated.read_bytes()
    record = holder.append(call(4))
    assert rotated.read_bytes() == frozen  # nothing was appended to the rotated file
    assert record["seq"] == 4
    assert [r["seq"] for r in read_records(path)] == [3, 4]
    assert verify(path).ok


def _append_many(path: str, worker: int, count: int) -> None:
    log = AuditLog(Path(path), fsync=False, rotation=Rotation(max_bytes=3000))
    for i in range(count):
        log.append(call(i, worker=worker))


def test_processes_rotate_and_share_one_chain(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_append_many, args=(str(path), w, 60)) for w in range(4)]
    for p in workers:
        p.start()
    for p in workers:
        p.join(timeout=120)
        assert p.exitcode == 0
    report = verify(path)
    assert report.ok, report.problems
    assert report.records == 240 and report.last_seq == 240
    by_worker = [r["worker"] for r in read_all_records(path)]
    assert sorted(by_worker.count(w) for w in range(4)) == [60, 60, 60, 60]
    manifest = manifest_of(path)
    assert len(manifest["files"]) == len(log_files(path)) - 1 >= 20
    assert len({e["name"] for e in manifest["files"]}) == len(manifest["files"])


def test_retention_prunes_and_the_chain_still_verifies(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    written = rotated_log(path, 40, Rotation(max_bytes=2048, keep_files=2))
    files = log_files(path)
    assert len(files) == 3  # two rotated files and the active one
    manifest = manifest_of(path)
    pruned = [e for e in manifest["files"] if e["pruned_at"] is not None]
    assert pruned and all(not (tmp_path / e["name"]).exists() for e in pruned)
    assert pruned[0]["first_seq"] == 1 and pruned[0]["last_hash"] == written[pruned[0]["last_seq"] - 1]["hash"]

    report = verify(path)
    assert report.ok, report.problems
    assert [f.name for f in report.pruned] == [e["name"] for e in pruned]
    assert report.last_seq == 40 and report.first_seq == pruned[-1]["last_seq"] + 1
    # An anchor that was pruned away cannot be checked and is not a failure; one that was cut is.
    assert verify(path, expect_last_hash=written[0]["hash"], expect_records=1).ok
    assert verify(path, expect_last_hash=written[-1]["hash"], expect_records=40).ok
    assert not verify(path, expect_records=41).ok


# -- verify over the set ------------------------------------------------------------------------


def test_missing_file_is_named_with_its_range(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    rotated_log(path, 30)
    victim = log_files(path)[2]
    victim_records = list(read_records(victim))
    victim.unlink()
    report = verify(path)
    assert not report.ok
    (problem,) = report.problems
    first, last = victim_records[0]["seq"], victim_records[-1]["seq"]
    assert problem.kind == "missing" and problem.file == victim.name and problem.seq == first
    assert victim.name in problem.message and f"seq {first}..{last}" in problem.message
    assert [f.status for f in report.files].count("missing") == 1
    # The files after it still verify: the manifest's last hash carries the chain over the gap.
    assert all(f.status == "ok" for f in report.files if f.name != victim.name)


def test_gap_without_a_manifest_is_named(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    rotated_log(path, 30)
    LogNames(path).manifest.unlink()
    files = log_files(path)
    victim, after = files[1], files[2]
    gone = list(read_records(victim))
    victim.unlink()
    report = verify(path)
    (problem,) = report.problems
    assert problem.kind == "missing" and problem.file == after.name and problem.line == 0
    assert f"records seq {gone[0]['seq']}..{gone[-1]['seq']} are missing before {after.name}" in problem.message


def test_tampered_record_in_a_rotated_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    rotated_log(path, 30)
    target = log_files(path)[1]
    lines = target.read_text().splitlines(keepends=True)
    record = json.loads(lines[1])
    record["principal"] = "mallory"
    lines[1] = json.dumps(record) + "\n"
    target.write_text("".join(lines))
    report = verify(path)
    (problem,) = report.problems
    assert (problem.kind, problem.seq, problem.line, problem.file) == ("edited", record["seq"], 2, target.name)
    assert problem.message.startswith(f"{target.name}: record seq {record['seq']} (line 2) was edited")
    assert [f.status for f in report.files].count("failed") == 1


def test_cut_tail_of_a_rotated_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    rotated_log(path, 30)
    target = log_files(path)[0]
    lines = target.read_text().splitlines(keepends=True)
    last = json.loads(lines[-1])
    target.write_text("".join(lines[:-1]))
    report = verify(path)
    (problem,) = report.problems
    assert (problem.kind, problem.seq, problem.file) == ("deleted", last["seq"], target.name)
    assert f"deleted from the end of {target.name}" in problem.message


def test_rewritten_last_record_of_a_rotated_file_shows_against_the_manifest(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    rotated_log(path, 30)
    target = log_files(path)[0]
    lines = target.read_text().splitlines(keepends=True)
    last = json.loads(lines[-1])
    last["rows"] = 10**6
    last["hash"] = record_hash(last)  # a careful forger recomputes the hash
    lines[-1] = json.dumps(last) + "\n"
    target.write_text("".join(lines))
    report = verify(path)
    assert not report.ok
    assert report.problems[0].kind == "edited" and report.problems[0].file == target.name


def test_torn_active_tail_is_reported_and_refused(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    rotated_log(path, 10)
    with path.open("a") as f:
        f.write('{"seq": 11, "tru')
    report = verify(path)
    assert [p.kind for p in report.problems] == ["malformed"] and report.problems[0].file == "audit.jsonl"
    with pytest.raises(AuditWriteError):
        AuditLog(path, fsync=False, rotation=SMALL).append(call(11))


def test_interrupted_rotation_is_undone_by_the_next_writer(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    written = rotated_log(path, 3, Rotation())
    # A crash after the rotated name was linked and listed, before the new active file was put in place.
    stale = LogNames(path).rotated(1, 3)
    os.link(path, stale)
    with AuditLog(path, fsync=False, rotation=Rotation(max_bytes=10**6)) as log:
        log.append(call(4))  # no rotation due: the half-done one must just go away
    assert not stale.exists() and log_files(path) == [path]
    assert [r["seq"] for r in read_records(path)] == [1, 2, 3, 4]
    assert written[-1]["seq"] == 3 and verify(path).ok


def test_failed_rotation_keeps_the_record(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    rotated_log(path, 1, Rotation())
    LogNames(path).manifest.mkdir()  # the manifest cannot be read or replaced
    with capture_logs() as logs, AuditLog(path, fsync=False, rotation=Rotation(max_bytes=1024)) as log:
        write(log, 4, start=2)
    assert [r["seq"] for r in read_records(path)] == [1, 2, 3, 4, 5]
    assert any(entry["event"] == "audit.rotate_failed" for entry in logs)
    report = verify(path)
    assert [p.kind for p in report.problems] == ["malformed"]  # the manifest, by name
    assert report.problems[0].file == "audit.manifest.json"


def test_manifest_is_replaced_atomically(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    rotated_log(path, 20)
    names = LogNames(path)
    manifest = load_manifest(names)
    assert manifest is not None and manifest.active == "audit.jsonl"
    # No temporary file is left behind beside the set.
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_an_empty_active_file_with_an_unreadable_manifest_refuses_to_guess(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    LogNames(path).manifest.mkdir(parents=True)
    # Where the chain goes on is unknown (records may have been rotated): fail closed.
    with pytest.raises(AuditWriteError, match="manifest"):
        AuditLog(path, fsync=False).append(call(1))
