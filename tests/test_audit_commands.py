"""``lakegate audit verify|show|summary`` through click's CliRunner, on real log files."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from lakegate.server.audit.checkpoints import key_id, signing_public_key
from lakegate.server.audit.log import AuditLog, Checkpointing, Rotation, log_files, read_records
from lakegate.server.audit.record_builders import listing_record, refused_request_record
from lakegate.server.audit.record_model import AuditRecord
from lakegate.server.audit.review import Filters, parse_dimensions, parse_when, select, summarise
from lakegate.server.cli.audit_commands import audit
from lakegate.server.cli.main import cli
from lakegate.server.profile import checkpoint_key_path
from lakegate.server.settings import load_settings

NOW = datetime.now(UTC)


def at(hours_ago: float) -> str:
    return (NOW - timedelta(hours=hours_ago)).isoformat(timespec="microseconds")


#: What a call's record holds besides the fields these tests look at.
GATE_FIELDS: dict[str, Any] = {
    "request_id": "1",
    "session_id": "s-1",
    "roles": [],
    "authenticated_by": "config",
    "transport": "stdio",
    "client": {"name": "agent", "version": "1"},
    "arguments": {},
    "rules": [],
    "policy_version": "v1",
    "bytes": 0,
    "error": None,
}

CALLS: list[dict[str, Any]] = [
    GATE_FIELDS
    | {
        "time": at(72),
        "principal": "alice",
        "tool": "query",
        "decision": "allow",
        "outcome": "ok",
        "rows": 10,
        "duration_ms": 12.0,
        "resources": [{"type": "dataset", "name": "sales.orders", "version": 3, "access": "read"}],
    },
    GATE_FIELDS
    | {
        "time": at(30),
        "principal": "bob",
        "tool": "query",
        "decision": "deny",
        "outcome": "denied",
        "rows": 0,
        "duration_ms": 1.0,
        "resources": [{"type": "dataset", "name": "hr.salaries", "version": 1, "access": "denied"}],
    },
    GATE_FIELDS
    | {
        "time": at(5),
        "principal": "alice",
        "tool": "describe",
        "decision": "allow",
        "outcome": "not_found",
        "rows": 0,
        "duration_ms": 2.0,
        "error": "no such dataset",
        "resources": [],
    },
    GATE_FIELDS
    | {
        "time": at(1),
        "principal": "alice",
        "tool": "query",
        "decision": "partial",
        "outcome": "ok",
        "rows": 7,
        "duration_ms": 40.5,
        "resources": [
            {"type": "dataset", "name": "sales.orders", "version": 3, "access": "read"},
            {"type": "column", "name": "sales.orders.email", "version": 3, "access": "masked"},
        ],
    },
]


#: Records that are not one tool call each: alice's client listing the tools, and refused HTTP
#: requests from bob's address, the first written at once, the next three grouped into one record.
LISTING = listing_record(
    method="tools/list",
    request_id="7",
    session_id="s-1",
    principal="alice",
    roles=["role:analyst"],
    authenticated_by="token",
    transport="http",
    client_name="agent",
    client_version="1",
    policy_version="v1",
    listed=8,
    payload_bytes=900,
    duration_s=0.001,
)
REFUSED = refused_request_record(
    request_id="r-1",
    session_id=None,
    principal="bob",
    roles=[],
    authenticated_by="none",
    transport="http",
    policy_version="v1",
    duration_s=0.0005,
    outcome="unauthenticated",
    error="invalid_token",
    details={"reason": "expired"},
)
NOT_CALLS: list[dict[str, Any]] = [
    LISTING.model_dump() | {"time": at(2)},
    REFUSED.model_dump() | {"time": at(2), "count": 1},
    REFUSED.model_dump()
    | {"time": at(2), "count": 3, "details": {"reason": "expired", "aggregated": {"window_s": 10.0}}},
]


@pytest.fixture
def log_path(tmp_path: Path) -> Path:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, fsync=False)
    for record in CALLS:
        log.append(record)
    log.close()
    return path


def run(path: Path | None, *args: str, via_obj: bool = True) -> Result:
    obj = {"audit_path": path} if via_obj else {}
    return CliRunner().invoke(audit, list(args), obj=obj)


# -- verify -------------------------------------------------------------------------------------


def test_verify_ok(log_path: Path) -> None:
    result = run(log_path, "verify")
    assert result.exit_code == 0, result.output
    assert result.output.startswith("audit log OK: 4 records, seq 1..4, last hash ")


def test_verify_log_option_overrides_obj(log_path: Path, tmp_path: Path) -> None:
    result = run(tmp_path / "elsewhere.jsonl", "verify", "--log", str(log_path))
    assert result.exit_code == 0 and "4 records" in result.output


def test_verify_missing_file(tmp_path: Path) -> None:
    result = run(tmp_path / "none.jsonl", "verify")
    assert result.exit_code == 0
    assert "0 records (no file at" in result.output


def test_verify_names_the_edited_record(log_path: Path) -> None:
    lines = log_path.read_text().splitlines(keepends=True)
    record = json.loads(lines[1])
    record["decision"] = "allow"
    lines[1] = json.dumps(record) + "\n"
    log_path.write_text("".join(lines))
    result = run(log_path, "verify")
    assert result.exit_code == 1
    assert "audit log FAILED: 1 problem in 4 records" in result.output
    assert "record seq 2 (line 2) was edited" in result.output


def test_verify_json_and_anchor(log_path: Path) -> None:
    ok = json.loads(run(log_path, "verify", "--json").output)
    assert ok["ok"] and ok["records"] == 4
    lines = log_path.read_text().splitlines(keepends=True)
    log_path.write_text("".join(lines[:-1]))
    result = run(log_path, "verify", "--expect-last-hash", ok["last_hash"], "--expect-records", "4")
    assert result.exit_code == 1 and "deleted" in result.output


def test_verify_unreadable(tmp_path: Path) -> None:
    result = run(tmp_path, "verify")  # a directory
    assert result.exit_code == 2
    assert "cannot read audit log" in result.output


def test_no_configured_path() -> None:
    result = run(None, "verify", via_obj=False)
    assert result.exit_code == 2 and "--log" in result.output


@pytest.fixture
def rotated_path(tmp_path: Path) -> Path:
    """A log of 40 records rotated about every 3 records, the 2 newest rotated files kept."""
    path = tmp_path / "audit.jsonl"
    with AuditLog(path, fsync=False, rotation=Rotation(max_bytes=1024, keep_files=2)) as log:
        for i in range(40):
            log.append({**CALLS[i % len(CALLS)], "time": at(40 - i)})
    return path


def test_verify_rotated_set_reports_pruned_files(rotated_path: Path) -> None:
    result = run(rotated_path, "verify")
    assert result.exit_code == 0, result.output
    first = result.output.splitlines()[0]
    assert first.startswith("audit log OK: ") and " in 3 files, " in first and "..40, last hash" in first
    pruned = [line for line in result.output.splitlines() if line.startswith("  pruned: ")]
    assert pruned and "audit.0000000001-" in pruned[0] and "deleted by retention at" in pruned[0]

    report = json.loads(run(rotated_path, "verify", "--json").output)
    assert report["ok"] and report["last_seq"] == 40
    statuses = [f["status"] for f in report["files"]]
    assert statuses[-3:] == ["ok", "ok", "ok"] and set(statuses[:-3]) == {"pruned"}
    assert report["files"][-1]["name"] == "audit.jsonl"


def test_verify_rotated_set_names_a_missing_file(rotated_path: Path) -> None:
    victim = log_files(rotated_path)[0]
    victim.unlink()
    result = run(rotated_path, "verify", "--json")
    assert result.exit_code == 1
    report = json.loads(result.output)
    (problem,) = report["problems"]
    assert problem["kind"] == "missing" and problem["file"] == victim.name
    assert victim.name in problem["message"]
    text = run(rotated_path, "verify").output
    assert text.startswith("audit log FAILED: 1 problem in ") and f"missing: {victim.name}: " in text


def test_show_and_summary_read_every_rotated_file(rotated_path: Path) -> None:
    shown = [json.loads(line) for line in run(rotated_path, "show", "--json").output.splitlines()]
    # The pruned files are gone; every record of the files kept is shown, in order.
    kept = [r["seq"] for f in log_files(rotated_path) for r in read_records(f)]
    assert [r["seq"] for r in shown] == kept and kept[-1] == 40 and len(log_files(rotated_path)) == 3
    rows = json.loads(run(rotated_path, "summary", "--json").output)
    assert sum(row["calls"] for row in rows) == len(kept)


# -- checkpoints --------------------------------------------------------------------------------


@pytest.fixture
def signed_path(tmp_path: Path) -> Path:
    """A log of 23 records whose writer signed a checkpoint every 10 (and is still running)."""
    path = tmp_path / "audit" / "audit.jsonl"
    log = AuditLog(path, fsync=False, checkpoints=Checkpointing(tmp_path / "checkpoint.key", every=10, interval_s=None))
    for i in range(23):
        log.append(CALLS[i % len(CALLS)])
    return path


def test_verify_prints_the_checkpoints_and_the_window(signed_path: Path, log_path: Path) -> None:
    result = run(signed_path, "verify")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith("audit log OK: 23 records, seq 1..23")
    assert lines[1].startswith("  checkpoints: 2 in audit.checkpoints.jsonl, the last checkpoint #2 (seq 20, signed ")
    assert "(the public keys beside the checkpoints)" in lines[1]
    assert lines[2] == "  3 records after the last checkpoint are not yet covered"
    report = json.loads(run(signed_path, "verify", "--json").output)["checkpoints"]
    assert (report["count"], report["last"]["seq"], report["uncovered"]) == (2, 20, 3)
    # A log written without checkpoints says what that means.
    assert (
        "checkpoints: none (records cut from the end of the log cannot be detected)" in run(log_path, "verify").output
    )


def test_verify_fails_on_a_tail_cut_back_past_a_checkpoint(signed_path: Path) -> None:
    lines = signed_path.read_text().splitlines(keepends=True)
    signed_path.write_text("".join(lines[:1]))  # all but the first record
    result = run(signed_path, "verify")
    assert result.exit_code == 1
    assert result.output.startswith("audit log FAILED: 1 problem in 1 records")
    assert "  truncated: the log ends at seq 1, but checkpoint #2 (seq 20, signed " in result.output
    assert "records seq 2..20 were cut from its end" in result.output
    problem = json.loads(run(signed_path, "verify", "--json").output)["problems"][0]
    assert problem["kind"] == "truncated" and problem["seq"] == 2


def test_verify_checks_the_signatures_with_a_pinned_public_key(signed_path: Path, tmp_path: Path) -> None:
    beside = signed_path.parent / "audit.checkpoints.pub"
    pinned = tmp_path / "pinned.pub"
    pinned.write_bytes(beside.read_bytes())
    result = run(signed_path, "verify", "--public-key", str(pinned))
    assert result.exit_code == 0 and f"(the public key {pinned})" in result.output

    other = Ed25519PrivateKey.generate().public_key()
    pinned.write_bytes(other.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    result = run(signed_path, "verify", "--public-key", str(pinned))
    assert result.exit_code == 1
    assert "checkpoint: the public key beside the checkpoints" in result.output and "it was replaced" in result.output
    assert f"checkpoint #1 (line 1) is signed by key {key_id(signing_public_key(tmp_path / 'checkpoint.key'))}, " in (
        result.output
    )
    assert f"not by the public key {pinned} (key {key_id(other)})" in result.output

    pinned.write_text("not a key")
    result = run(signed_path, "verify", "--public-key", str(pinned))
    assert result.exit_code == 2 and "--public-key" in result.output


def test_verify_of_the_configured_log_trusts_its_signing_key(tmp_path: Path) -> None:
    env = {"LAKEGATE_HOME": str(tmp_path / "home"), "LAKEGATE_AUDIT__CHECKPOINT_EVERY": "5"}
    settings = load_settings(tmp_path, home=tmp_path / "home", audit={"checkpoint_every": 5, "fsync": False})
    key = checkpoint_key_path(settings)
    with AuditLog.from_settings(settings.audit_path, settings.audit, signing_key=key) as log:
        for record in CALLS * 3:
            log.append(record)
    assert key == tmp_path / "home" / "audit-checkpoint.key" and key.is_file()

    def verify_configured() -> Result:
        return CliRunner().invoke(cli, ["--project", str(tmp_path), "audit", "verify"], env=env)

    result = verify_configured()
    assert result.exit_code == 0, result.output
    assert f"(the signing key {key})" in result.output and "the last checkpoint #3 (seq 12" in result.output
    # The checkpoints and the public key deleted with the log's tail: the signing key, kept apart, remains.
    lines = settings.audit_path.read_text().splitlines(keepends=True)
    settings.audit_path.write_text("".join(lines[:2]))
    for name in ("audit.checkpoints.jsonl", "audit.checkpoints.pub"):
        (settings.audit_path.parent / name).unlink()
    assert run(settings.audit_path, "verify").exit_code == 0  # what a copy of the directory alone shows
    result = verify_configured()
    assert result.exit_code == 1
    assert "audit.checkpoints.jsonl is missing, but checkpoints were signed for this log" in result.output


# -- show ---------------------------------------------------------------------------------------


def test_show_table(log_path: Path) -> None:
    result = run(log_path, "show")
    assert result.exit_code == 0, result.output
    assert "principal" in result.output and "4 records" in result.output
    assert all(len(line) <= 80 for line in result.output.splitlines())
    body = result.output.splitlines()
    # newest last
    assert [line for line in body if "describe" in line]
    assert body.index(next(line for line in body if "bob" in line)) < body.index(
        next(line for line in body if "describe" in line)
    )


def test_show_filters_json(log_path: Path) -> None:
    result = run(log_path, "show", "--json", "--principal", "alice", "--tool", "query")
    records = [json.loads(line) for line in result.output.splitlines()]
    assert [r["seq"] for r in records] == [1, 4]
    result = run(log_path, "show", "--json", "--resource", "EMAIL")
    assert [json.loads(line)["seq"] for line in result.output.splitlines()] == [4]
    result = run(log_path, "show", "--json", "--since", "24h")
    assert [json.loads(line)["seq"] for line in result.output.splitlines()] == [3, 4]
    result = run(log_path, "show", "--json", "--until", "2d", "--decision", "allow")
    assert [json.loads(line)["seq"] for line in result.output.splitlines()] == [1]
    result = run(log_path, "show", "--json", "--limit", "1")
    assert [json.loads(line)["seq"] for line in result.output.splitlines()] == [4]


def test_show_bad_since(log_path: Path) -> None:
    result = run(log_path, "show", "--since", "yesterday-ish")
    assert result.exit_code == 2 and "relative time" in result.output


def test_show_nothing(log_path: Path, tmp_path: Path) -> None:
    assert run(log_path, "show", "--principal", "nobody").output.strip() == "no matching records"
    assert run(tmp_path / "none.jsonl", "show").output.strip() == "no matching records"


def test_show_malformed_log(log_path: Path) -> None:
    with log_path.open("a") as f:
        f.write("not json\n")
    result = run(log_path, "show")
    assert result.exit_code == 2 and "line 5" in result.output


# -- summary ------------------------------------------------------------------------------------


def test_summary_by_principal(log_path: Path) -> None:
    result = run(log_path, "summary", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == [
        {"principal": "alice", "calls": 3, "denials": 0, "errors": 1, "rows": 17, "listings": 0},
        {"principal": "bob", "calls": 1, "denials": 1, "errors": 0, "rows": 0, "listings": 0},
    ]


def test_summary_counts_listings_apart_and_a_grouped_refusal_by_its_count(log_path: Path) -> None:
    with AuditLog(log_path, fsync=False) as log:
        for record in NOT_CALLS:
            log.append(record)
    result = run(log_path, "summary", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == [
        # the listing's 8 tools listed are not rows returned
        {"principal": "alice", "calls": 3, "denials": 0, "errors": 1, "rows": 17, "listings": 1},
        {"principal": "bob", "calls": 5, "denials": 5, "errors": 0, "rows": 0, "listings": 0},
    ]
    by_tool = {
        r["tool"]: (r["calls"], r["listings"])
        for r in json.loads(run(log_path, "summary", "--by", "tool", "--json").output)
    }
    assert by_tool == {"(none)": (4, 0), "describe": (1, 0), "query": (3, 0), "tools/list": (0, 1)}
    table = run(log_path, "summary", "--by", "decision").output
    assert "listings" in table and all(len(line) <= 80 for line in table.splitlines())
    shown = run(log_path, "show", "--principal", "bob").output
    assert "\u00d73" in shown and "3 records" in shown  # records, each saying how many requests it stands for


def test_summary_by_several(log_path: Path) -> None:
    result = run(log_path, "summary", "--by", "principal,tool", "--by", "decision", "--json")
    rows = json.loads(result.output)
    assert {(r["principal"], r["tool"], r["decision"]) for r in rows} == {
        ("alice", "query", "allow"),
        ("alice", "query", "partial"),
        ("alice", "describe", "allow"),
        ("bob", "query", "deny"),
    }
    by_resource = json.loads(run(log_path, "summary", "--by", "resource", "--json").output)
    assert {r["resource"]: r["calls"] for r in by_resource} == {
        "(none)": 1,
        "hr.salaries": 1,
        "sales.orders": 2,
        "sales.orders.email": 1,
    }


def test_summary_table(log_path: Path) -> None:
    result = run(log_path, "summary", "--by", "day", "--by", "tool")
    assert result.exit_code == 0, result.output
    assert "denials" in result.output and "total" in result.output
    assert all(len(line) <= 80 for line in result.output.splitlines())


def test_summary_bad_dimension(log_path: Path) -> None:
    result = run(log_path, "summary", "--by", "colour")
    assert result.exit_code == 2 and "cannot group by 'colour'" in result.output


# -- the pure functions, directly ---------------------------------------------------------------


def test_parse_when() -> None:
    now = datetime(2024, 5, 10, 12, tzinfo=UTC)
    assert parse_when("7d", now=now) == datetime(2024, 5, 3, 12, tzinfo=UTC)
    assert parse_when("24h", now=now) == datetime(2024, 5, 9, 12, tzinfo=UTC)
    assert parse_when("2024-05-01") == datetime(2024, 5, 1, tzinfo=UTC)
    assert parse_when("2024-05-01T10:00:00+02:00") == datetime(2024, 5, 1, 8, tzinfo=UTC)
    with pytest.raises(ValueError):
        parse_when("soon")


def test_select_and_summarise_without_dimensions() -> None:
    calls = [AuditRecord.model_validate(record) for record in CALLS]
    assert select(calls, Filters(limit=0)) == []
    (row,) = summarise(calls, ())
    assert (row.calls, row.denials, row.errors, row.rows) == (4, 1, 1, 17)
    assert parse_dimensions(["tool, day", "tool"]) == ("tool", "day")
