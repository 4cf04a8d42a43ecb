"""The audit record model: what the gate, a listing and a refusal write parses into it, the JSON on
disk is the one earlier versions wrote (the hash chain covers it), and what is not a record is
refused by every reader."""

from __future__ import annotations

import json
import time
from functools import partial
from pathlib import Path
from typing import Any, cast

import anyio
import pytest
from click.testing import CliRunner
from pydantic import ValidationError

from lakegate.errors import AuditWriteError
from lakegate.server.app import Runtime
from lakegate.server.audit.log import AuditFormatError, AuditLog, canonical_json, read_records, verify
from lakegate.server.audit.record_builders import NO_CLIENT, call_record, listing_record, refused_request_record
from lakegate.server.audit.record_model import (
    AuditClient,
    AuditRecord,
    AuditResource,
    audit_record,
    read_audit_records,
)
from lakegate.server.audit.refusals import RefusalLog
from lakegate.server.cli.audit_commands import audit
from lakegate.server.gate.identity import CallOrigin, stdio_principal
from tests.conftest import gate_call

#: Two records as lakegate wrote them before the model existed (a listing, and a grouped refusal):
#: they must still parse, verify, and come out of the model as the same JSON.
EARLIER_LOG = (
    '{"arguments":{},"authenticated_by":"token","bytes":900,"client":{"name":"agent","version":"1"},'
    '"decision":"allow","details":{"listing":"tools/list"},"duration_ms":1.234,"error":null,'
    '"hash":"ab3a521950d97f21814f31c10224253e93eb310ba9f47cd0bf8c3da70e5009fa","outcome":"ok",'
    '"policy_version":"v1","prev_hash":"0000000000000000000000000000000000000000000000000000000000000000",'
    '"principal":"alice","request_id":"7","resources":[],"roles":["role:analyst"],"rows":8,"rules":[],"seq":1,'
    '"session_id":"s-1","time":"2026-11-24T09:00:00.000001+00:00","tool":"tools/list","transport":"http"}\n'
    '{"arguments":{},"authenticated_by":null,"bytes":0,"client":{"name":null,"version":null},"count":3,'
    '"decision":"deny","details":{"reason":"expired"},"duration_ms":0.5,"error":"invalid_token",'
    '"hash":"64c2d871730d23701170290b022806ba63d9af08da879300af09adee78e13c2e","outcome":"unauthenticated",'
    '"policy_version":"v1","prev_hash":"ab3a521950d97f21814f31c10224253e93eb310ba9f47cd0bf8c3da70e5009fa",'
    '"principal":"anonymous","request_id":"r-1","resources":[],"roles":[],"rows":0,"rules":[],"seq":2,'
    '"session_id":null,"time":"2026-11-24T09:00:01.000001+00:00","tool":null,"transport":"http"}\n'
)


def _listing() -> AuditRecord:
    return listing_record(
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
        duration_s=0.0012345,
    )


def _refused() -> AuditRecord:
    return refused_request_record(
        request_id="r-1",
        session_id=None,
        principal="anonymous",
        roles=[],
        authenticated_by=None,
        transport="http",
        policy_version="v1",
        duration_s=0.0005,
        outcome="unauthenticated",
        error="invalid_token",
        details={"reason": "expired"},
    )


#: A call as the gate describes it to `call_record`.
CALL: dict[str, Any] = {
    "request_id": "r-2",
    "session_id": "s-1",
    "principal": "analyst",
    "roles": ("role:analyst",),
    "authenticated_by": "config",
    "transport": "stdio",
    "client_name": "agent",
    "client_version": "1",
    "tool": "query",
    "arguments": {"sql": "SELECT 1"},
    "decision": "partial",
    "rules": [("role:analyst", "dataset:sales.orders", "read", "allow")],
    "policy_version": "v1",
    "resources": [
        AuditResource(type="tool", name="query", access="call", version=None),
        AuditResource(type="dataset", name="sales.orders", access="filtered", version=42),
    ],
    "rows": 3,
    "payload_bytes": 120,
    "duration_s": 0.25,
    "outcome": "ok",
    "error": None,
    "details": {"row_filters": {"sales.orders": ["region = 'EMEA'"]}},
}


def _call(**changes: Any) -> dict[str, Any]:
    """The call's record as the log is handed it, with `changes` made to the dump."""
    return call_record(**CALL).model_dump() | changes


def test_the_builders_write_the_json_earlier_versions_wrote(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    with AuditLog(path, fsync=False) as log:
        log.append(_listing().model_dump() | {"time": "2026-11-24T09:00:00.000001+00:00"})
        log.append(
            _refused().model_copy(update={"count": 3}).model_dump() | {"time": "2026-11-24T09:00:01.000001+00:00"}
        )
    assert path.read_text() == EARLIER_LOG
    # A call: every field written, null or not; `details` only when the call has some.
    assert canonical_json(_call()) == canonical_json(
        {
            "request_id": "r-2",
            "session_id": "s-1",
            "principal": "analyst",
            "roles": ["role:analyst"],
            "authenticated_by": "config",
            "transport": "stdio",
            "client": {"name": "agent", "version": "1"},
            "tool": "query",
            "arguments": {"sql": "SELECT 1"},
            "decision": "partial",
            "rules": [["role:analyst", "dataset:sales.orders", "read", "allow"]],
            "policy_version": "v1",
            "resources": [
                {"type": "tool", "name": "query", "access": "call", "version": None},
                {"type": "dataset", "name": "sales.orders", "access": "filtered", "version": 42},
            ],
            "rows": 3,
            "bytes": 120,
            "duration_ms": 250.0,
            "outcome": "ok",
            "error": None,
            "details": {"row_filters": {"sales.orders": ["region = 'EMEA'"]}},
        }
    )
    bare = call_record(**{**CALL, "details": {}}).model_dump()
    assert "details" not in bare and "count" not in bare


def test_an_earlier_log_verifies_and_reads_back_as_written(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    path.write_text(EARLIER_LOG)
    assert verify(path).ok
    listing, refused = read_audit_records(path)
    assert listing.is_listing and listing.rows == 8 and listing.requests == 1 and not listing.is_denial
    assert refused.tool is None and refused.is_denial and refused.requests == 3 and refused.client == NO_CLIENT
    lines = EARLIER_LOG.splitlines()
    assert [canonical_json(record.model_dump()) for record in (listing, refused)] == lines


def test_what_the_gate_writes_parses_into_the_model(runtime: Runtime, audit_path: Path) -> None:
    """A call, a denied call, a listing and a refusal (written once, then grouped with a count)."""
    assert gate_call(runtime, "analyst", "list_datasets", {}).error is None
    assert gate_call(runtime, "mallory", "query", {"sql": "SELECT 1"}).error is not None
    who = stdio_principal("analyst", runtime.enforcer)
    origin = CallOrigin(transport="in-process", session_id="t", client_name="agent", client_version="1")
    listing = partial(runtime.gate.audit_listing, listed=3, payload_bytes=10, started=time.perf_counter())
    anyio.run(listing, "tools/list", who, origin)

    async def refuse_three() -> None:
        refusals = RefusalLog(runtime.audit)
        for _ in range(3):
            await refusals.refuse(_refused(), kind="unauthenticated:expired", source="10.0.0.1")
        await refusals.flush()

    anyio.run(refuse_three)
    lines = audit_path.read_bytes().splitlines()
    records = list(read_audit_records(audit_path))
    assert [(r.tool, r.decision, r.requests) for r in records] == [
        ("list_datasets", "allow", 1),
        ("query", "deny", 1),
        ("tools/list", "allow", 1),
        (None, "deny", 1),
        (None, "deny", 2),
    ]
    assert records[2].is_listing and records[2].client == AuditClient(name="agent", version="1")
    assert records[4].details is not None and records[4].details["aggregated"]["window_s"] > 0
    assert all(r.seq is not None and r.hash is not None for r in records)
    # Read and dumped again, each record is its line: nothing is lost or respelled on the way.
    assert [canonical_json(r.model_dump()).encode() for r in records] == lines
    assert verify(audit_path).ok


def test_unknown_fields_are_kept_and_never_fail_verification_or_review(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    later = _call(
        replica="r-1",
        global_seq=7,
        resources=[{"type": "dataset", "name": "a.b", "access": "read", "version": 1, "pinned": True}],
    )
    with AuditLog(path, fsync=False) as log:
        log.append(later)
    assert verify(path).ok
    (record,) = read_audit_records(path)
    assert record.model_extra == {"replica": "r-1", "global_seq": 7}
    assert record.resources[0].model_extra == {"pinned": True}
    assert json.loads(path.read_text()) == record.model_dump()
    shown = CliRunner().invoke(audit, ["show", "--json"], obj={"audit_path": path})
    assert shown.exit_code == 0 and json.loads(shown.output)["replica"] == "r-1"


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"decision": "maybe"}, "decision: Input should be 'allow', 'partial' or 'deny'"),
        ({"rows": "5"}, "rows: Input should be a valid integer"),
        ({"rows": True}, "rows: Input should be a valid integer"),
        ({"rows": -1}, "rows: Input should be greater than or equal to 0"),
        ({"count": 0}, "count: Input should be greater than or equal to 1"),
        ({"roles": "role:analyst"}, "roles: Input should be a valid tuple"),
        ({"resources": [{"type": "dataset", "name": "a.b"}]}, "resources.0.access: Field required"),
        ({"principal": None}, "principal: Input should be a valid string"),
    ],
)
def test_a_malformed_record_is_rejected(change: dict[str, Any], problem: str) -> None:
    with pytest.raises(ValidationError):
        AuditRecord.model_validate(_call(**change))
    with pytest.raises(AuditFormatError, match="not an audit record") as caught:
        audit_record(_call(**change), line=3, file="audit.jsonl")
    assert problem in caught.value.reason and caught.value.line == 3


def test_a_record_missing_a_field_is_rejected_and_the_readers_say_where(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    with AuditLog(path, fsync=False) as log:
        log.append(_call())
        log.append({key: value for key, value in _call().items() if key != "decision"})
    assert verify(path).ok  # the chain is intact: what it holds is not a record
    with pytest.raises(AuditFormatError, match=r"line 2 of audit.jsonl is not a valid record: not an audit record"):
        list(read_audit_records(path))
    shown = CliRunner().invoke(audit, ["show"], obj={"audit_path": path})
    assert shown.exit_code == 2 and "decision: Field required" in shown.output
    assert [r["seq"] for r in read_records(path)] == [1, 2]


def test_a_builder_refuses_a_value_that_does_not_fit_and_a_record_is_frozen() -> None:
    with pytest.raises(AuditWriteError, match="cannot build the audit record of a call of query"):
        call_record(**{**CALL, "rows": cast(Any, "3")})
    record = call_record(**CALL)
    with pytest.raises(ValidationError):
        record.rows = 4  # type: ignore[misc]
