"""Signed checkpoints of the audit chain, on real files: cutting the log back past a checkpoint,
forging or cutting the checkpoints, the time-based checkpoint, rotation, several writers."""

from __future__ import annotations

import base64
import json
import multiprocessing
import os
import stat
import time
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from structlog.testing import capture_logs

from lakegate.errors import AuditWriteError
from lakegate.server.audit.checkpoint_verify import CheckpointTrust
from lakegate.server.audit.checkpoints import Checkpoint, key_id, signing_public_key
from lakegate.server.audit.files import LogNames
from lakegate.server.audit.log import AuditLog, Checkpointing, Rotation, log_files, verify
from lakegate.server.settings import AuditSettings
from tests.test_audit import call  # a record shaped like the ones the gate writes


@pytest.fixture
def home(tmp_path: Path) -> Path:
    """The state directory: the log lives in home/audit/, the signing key in home/."""
    return tmp_path / "home"


def log_at(home: Path, *, every: int | None = 10, interval_s: float | None = None, **kw: Any) -> AuditLog:
    policy = Checkpointing(home / "audit-checkpoint.key", every=every, interval_s=interval_s)
    return AuditLog(home / "audit" / "audit.jsonl", fsync=False, checkpoints=policy, **kw)


def write(log: AuditLog, n: int, start: int = 1) -> list[dict[str, Any]]:
    return [log.append(call(i)) for i in range(start, start + n)]


def checkpoints_of(path: Path) -> list[dict[str, Any]]:
    file = LogNames(path).checkpoints
    return [json.loads(line) for line in file.read_text().splitlines()] if file.exists() else []


def keep_lines(path: Path, count: int) -> None:
    """Cut the file back to its first ``count`` lines, as someone deleting the last records would."""
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:count]))


def trusted(home: Path, **kw: Any) -> CheckpointTrust:
    """What `lakegate audit verify` trusts on the server: the signing key itself."""
    key = home / "audit-checkpoint.key"
    return CheckpointTrust((signing_public_key(key),), f"the signing key {key}", signed_before=True, **kw)


def problems(report: Any) -> list[tuple[str, str]]:
    return [(problem.kind, problem.message) for problem in report.problems]


# -- what is written ----------------------------------------------------------------------------


def test_checkpoints_every_n_records_signed_chained_with_the_key_kept_apart(home: Path) -> None:
    log = log_at(home)
    written = write(log, 25)
    path = log.path
    lines = checkpoints_of(path)
    assert [(c["number"], c["seq"], c["records"]) for c in lines] == [(1, 10, 10), (2, 20, 20)]
    assert [c["hash"] for c in lines] == [written[9]["hash"], written[19]["hash"]]
    first, second = (Checkpoint.model_validate(c) for c in lines)
    assert first.prev == "0" * 64 and second.prev == first.digest
    key_file = home / "audit-checkpoint.key"
    # The private key: 0600, in the state directory, not in the log's directory.
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600 and key_file.parent != path.parent
    public = signing_public_key(key_file)
    assert first.signed_by(public) and second.signed_by(public) and first.key_id == key_id(public)
    # The public key beside the checkpoints is the signing key's; the private key is nowhere near them.
    assert LogNames(path).public_key.read_text().startswith("-----BEGIN PUBLIC KEY-----")
    assert not any("PRIVATE" in f.read_text() for f in path.parent.iterdir())

    report = verify(path)
    assert report.ok, report.problems
    assert report.checkpoints is not None and report.checkpoints.last == second
    assert report.checkpoints.uncovered == 5  # the window: written after the last checkpoint

    log.close()  # a last checkpoint covers them
    assert [c["seq"] for c in checkpoints_of(path)] == [10, 20, 25]
    closed = verify(path, checkpoints=trusted(home))
    assert closed.ok and closed.checkpoints is not None and closed.checkpoints.uncovered == 0
    log.close()  # nothing new: no second checkpoint at 25
    assert len(checkpoints_of(path)) == 3


def test_the_time_based_checkpoint_fires_without_n_records(home: Path) -> None:
    log = log_at(home, every=1000, interval_s=0.3)
    write(log, 2)
    started = time.monotonic()
    assert checkpoints_of(log.path) == []  # not at once: fewer than `every` records
    while not checkpoints_of(log.path):
        assert time.monotonic() - started < 5, "no checkpoint within 5 s of an interval of 0.3 s"
        time.sleep(0.02)
    took = time.monotonic() - started
    (only,) = checkpoints_of(log.path)
    assert only["seq"] == 2 and 0.2 < took < 3
    # Cutting a record it covers now fails verify, though the log is still open and no count was reached.
    keep_lines(log.path, 1)
    report = verify(log.path)
    assert not report.ok and problems(report)[0][0] == "truncated"
    log.close()


def test_no_checkpoint_when_nothing_was_written(home: Path) -> None:
    log = log_at(home, interval_s=0.05)
    log.close()
    time.sleep(0.1)
    assert not log.path.exists() and not LogNames(log.path).checkpoints.exists()
    assert not (home / "audit-checkpoint.key").exists()


def test_from_settings_signs_only_with_a_key(tmp_path: Path) -> None:
    settings = AuditSettings.model_validate({"fsync": False, "checkpoint_every": 2, "checkpoint_interval": "1m"})
    assert settings.checkpoint_interval == 60.0
    with AuditLog.from_settings(tmp_path / "a" / "audit.jsonl", settings) as plain:
        write(plain, 3)
    assert not LogNames(plain.path).checkpoints.exists()
    with AuditLog.from_settings(tmp_path / "b" / "audit.jsonl", settings, signing_key=tmp_path / "k.key") as log:
        write(log, 3)
    assert [c["seq"] for c in checkpoints_of(log.path)] == [2, 3]
    off = AuditSettings(checkpoint_every=None, checkpoint_interval=None)
    assert AuditLog.from_settings(tmp_path / "c.jsonl", off, signing_key=tmp_path / "k.key").checkpointing is None


# -- cutting the log ----------------------------------------------------------------------------


def test_cutting_the_tail_past_a_checkpoint_fails_and_names_it(home: Path) -> None:
    log = log_at(home)
    write(log, 25)
    path = log.path
    # Within the window: the last 3 records (after the checkpoint at seq 20) can go unnoticed.
    keep_lines(path, 22)
    within = verify(path, checkpoints=trusted(home))
    assert within.ok and within.checkpoints is not None and within.checkpoints.uncovered == 2
    # Past it: records 18..20 were signed.
    keep_lines(path, 17)
    report = verify(path, checkpoints=trusted(home))
    assert not report.ok
    ((kind, message),) = problems(report)
    assert kind == "truncated"
    assert "ends at seq 17" in message and "checkpoint #2 (seq 20, signed " in message
    assert "records seq 18..20 were cut from its end" in message


def test_cutting_all_but_the_first_record_fails(home: Path) -> None:
    with log_at(home) as log:
        write(log, 7)  # fewer than `every`: the checkpoint written at close covers them
    keep_lines(log.path, 1)
    report = verify(log.path)
    assert not report.ok
    ((kind, message),) = problems(report)
    assert kind == "truncated" and "checkpoint #1 (seq 7" in message and "seq 2..7 were cut" in message


def test_deleting_the_whole_log_fails(home: Path) -> None:
    with log_at(home) as log:
        write(log, 3)
    log.path.unlink()
    report = verify(log.path)
    assert not report.ok and "holds no records, but checkpoint #1 (seq 3" in problems(report)[0][1]


def test_a_log_cut_back_and_written_anew_is_caught_by_the_checkpoint_it_passes(home: Path) -> None:
    log = log_at(home)
    write(log, 25)
    keep_lines(log.path, 15)
    with capture_logs() as logs:
        write(log, 10, start=100)  # the writer goes on from seq 15: seq 16..25 are new records
    assert any(entry["event"] == "audit.log_behind_checkpoint" for entry in logs)
    report = verify(log.path, checkpoints=trusted(home))
    kinds = {kind: message for kind, message in problems(report)}
    assert "record seq 20 is not the record checkpoint #2 signed" in kinds["rewritten"]
    # The writer signed the step back at once: it stays in the checkpoint file.
    assert "covers seq 16, behind checkpoint #2 (seq 20)" in kinds["truncated"]
    log.close()


# -- the checkpoints themselves ----------------------------------------------------------------


def test_a_forged_checkpoint_fails(home: Path) -> None:
    log = log_at(home)
    written = write(log, 20)
    log.close()
    checkpoints = LogNames(log.path).checkpoints
    original = checkpoints.read_text()
    # Edited to claim the chain was shorter (so that cutting the log would pass): not re-signed.
    lines = original.splitlines()
    second = json.loads(lines[1]) | {"seq": 15, "records": 15, "hash": written[14]["hash"]}
    checkpoints.write_text("\n".join([lines[0], json.dumps(second)]) + "\n")
    report = verify(log.path)
    assert not report.ok
    assert ("checkpoint", "checkpoint #2 (line 2) has an invalid signature: it was forged or edited") in problems(
        report
    )

    # Re-signed with another key, the copy of the public key beside them replaced too: only the key
    # kept apart (the signing key, or one a reviewer pinned) shows it.
    forger = Ed25519PrivateKey.generate()
    forged = []
    prev = "0" * 64
    for raw in original.splitlines():
        entry = Checkpoint.model_validate_json(raw)
        unsigned = entry.model_copy(update={"key_id": key_id(forger.public_key()), "prev": prev, "signature": ""})
        signature = base64.b64encode(forger.sign(unsigned.signed_bytes())).decode()
        signed = unsigned.model_copy(update={"signature": signature})
        forged.append(signed.line())
        prev = signed.digest
    checkpoints.write_text("\n".join(forged) + "\n")
    pem = forger.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    LogNames(log.path).public_key.write_bytes(pem)
    assert verify(log.path).ok  # the key beside them is the forger's now
    report = verify(log.path, checkpoints=trusted(home))
    messages = [message for _, message in problems(report)]
    assert any("is not the signing key" in m and "it was replaced" in m for m in messages)
    assert any(f"checkpoint #1 (line 1) is signed by key {key_id(forger.public_key())}" in m for m in messages)


def test_a_cut_or_edited_checkpoint_file_fails(home: Path) -> None:
    log = log_at(home, every=5)
    write(log, 20)
    log.close()
    checkpoints = LogNames(log.path).checkpoints
    original = checkpoints.read_text()
    lines = original.splitlines(keepends=True)
    assert len(lines) == 4

    checkpoints.write_text("".join(lines[1:]))  # the first checkpoint deleted
    assert "starts with checkpoint #2: checkpoint #1 was cut from its start" in problems(verify(log.path))[0][1]

    checkpoints.write_text("".join(lines[:1] + lines[2:]))  # one from the middle
    message = problems(verify(log.path))[0][1]
    assert (
        "checkpoint #3 (line 2) does not chain to checkpoint #1" in message and "checkpoint #2 was deleted" in message
    )

    checkpoints.write_text("".join(lines[:3]) + lines[3][:40])  # a torn last line
    assert "line 4 of audit.checkpoints.jsonl is malformed" in problems(verify(log.path))[0][1]

    # The end of both files cut: the log then ends at the checkpoint that is left, so only how many
    # records the writer leaves uncovered (checkpoint_every) can tell.
    checkpoints.write_text("".join(lines[:2]))
    assert verify(log.path).ok  # without what the writer was configured with
    report = verify(log.path, checkpoints=trusted(home, every=5))
    assert "10 records after the last checkpoint, checkpoint #2 (seq 10" in problems(report)[0][1]
    assert "more than the writer's checkpoint_every (5)" in problems(report)[0][1]

    checkpoints.unlink()  # deleted, the public key left
    ((kind, message),) = problems(verify(log.path))
    assert kind == "checkpoint" and "audit.checkpoints.jsonl is missing" in message
    LogNames(log.path).public_key.unlink()  # the public key too: the signing key still exists
    assert verify(log.path).ok
    assert "is missing" in problems(verify(log.path, checkpoints=trusted(home)))[0][1]

    checkpoints.write_text(original)
    assert verify(log.path, checkpoints=trusted(home)).ok


def test_a_failing_checkpoint_never_fails_the_call(home: Path) -> None:
    log = log_at(home, every=2)
    (home / "audit-checkpoint.key").parent.mkdir(parents=True)
    (home / "audit-checkpoint.key").mkdir()  # the key cannot be read or created
    with capture_logs() as logs:
        written = write(log, 3)
    assert [r["seq"] for r in written] == [1, 2, 3]
    assert any(entry["event"] == "audit.checkpoint_failed" for entry in logs)
    with pytest.raises(AuditWriteError, match="checkpoint key"):
        log.checkpoint()
    log.close()  # logged, not raised


# -- rotation, pruning and several writers --------------------------------------------------------


def test_rotation_and_pruning_keep_working_with_checkpoints(home: Path) -> None:
    log = log_at(home, every=5, rotation=Rotation(max_bytes=2048, keep_files=2))
    write(log, 40)
    log.close()
    path = log.path
    assert len(log_files(path)) == 3  # two rotated files kept, the older ones pruned
    report = verify(path, checkpoints=trusted(home, every=5))
    assert report.ok, report.problems
    assert report.pruned and report.checkpoints is not None and report.checkpoints.count == 8
    # Checkpoints inside pruned files cannot be compared and are accepted; the active file's tail
    # cut back past the last checkpoint is not.
    active_lines = path.read_text().splitlines()
    keep_lines(path, len(active_lines) - 2)
    cut = verify(path, checkpoints=trusted(home, every=5))
    assert [kind for kind, _ in problems(cut)] == ["truncated"]
    assert "checkpoint #8 (seq 40" in problems(cut)[0][1]


def _append_with_checkpoints(home: str, count: int) -> None:
    with log_at(Path(home), every=5) as log:
        for i in range(count):
            log.append(call(i))


def test_several_processes_share_one_chain_of_checkpoints(home: Path) -> None:
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_append_with_checkpoints, args=(str(home), 23)) for _ in range(3)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
        assert worker.exitcode == 0
    path = home / "audit" / "audit.jsonl"
    report = verify(path, checkpoints=trusted(home, every=5))
    assert report.ok, report.problems
    numbers = [c["number"] for c in checkpoints_of(path)]
    assert numbers == list(range(1, len(numbers) + 1)) and len(numbers) >= 69 // 5
    assert report.checkpoints is not None and report.checkpoints.uncovered == 0  # each close signed


def _child_appends_with_a_thread_of_its_own(log: AuditLog) -> None:
    log.append(call(2))
    worker = log._worker  # the parent's thread did not survive the fork: the child needs its own
    alive = worker is not None and worker._thread.is_alive()
    log.close()
    raise SystemExit(0 if alive else 3)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_checkpoints_with_a_thread_of_its_own(home: Path) -> None:
    log = log_at(home, every=1000, interval_s=30)
    log.append(call(1))  # the parent's checkpoint thread is running
    child = multiprocessing.get_context("fork").Process(target=_child_appends_with_a_thread_of_its_own, args=(log,))
    child.start()
    child.join(30)
    assert child.exitcode == 0
    assert [c["seq"] for c in checkpoints_of(log.path)] == [2]  # the child's close signed both records
    log.append(call(3))
    log.close()
    assert [c["seq"] for c in checkpoints_of(log.path)] == [2, 3]
    assert verify(log.path, checkpoints=trusted(home)).ok


def test_two_state_directories_writing_one_log_each_add_their_key(tmp_path: Path) -> None:
    path = tmp_path / "shared" / "audit.jsonl"
    keys = [tmp_path / "one" / "audit-checkpoint.key", tmp_path / "two" / "audit-checkpoint.key"]
    for number, key in enumerate(keys):
        with AuditLog(path, fsync=False, checkpoints=Checkpointing(key, every=3, interval_s=None)) as log:
            write(log, 4, start=10 * number)
    public = [signing_public_key(key) for key in keys]
    by_key = [c["key_id"] for c in checkpoints_of(path)]
    assert by_key == [key_id(public[0])] * 2 + [key_id(public[1])] * 2
    assert LogNames(path).public_key.read_text().count("BEGIN PUBLIC KEY") == 2
    assert verify(path).ok  # each checkpoint checked with the key it names, both beside the log
    # Trusting one of the two: the other's checkpoints are not accepted.
    only_one = verify(path, checkpoints=CheckpointTrust((public[0],), "the signing key one"))
    ((kind, message),) = problems(only_one)
    assert kind == "checkpoint"
    assert f"checkpoint #3 (line 3) is signed by key {key_id(public[1])}, not by the signing key one" in message
    assert "(and 1 later checkpoints)" in message
    assert verify(path, checkpoints=CheckpointTrust(tuple(public), "both keys")).ok
