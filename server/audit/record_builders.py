"""Where audit records are built: one function per kind of record, each returning an `AuditRecord`.

- `call_record`: a tool call, as the gate decided and ran it (`lakegate.server.gate.gate.Gate`).
- `listing_record`: a listing (`tools/list`, `resources/list`, `resources/templates/list`): `tool`
  is the MCP method, `details.listing` names it too (the agent can call a tool named "tools/list",
  but cannot set `details`, so `AuditRecord.is_listing` is what tells the two apart), decision
  `allow`, `rows` the number of items listed.
- `refused_request_record`: a request refused before it reached the gate (a bad token, a line that
  is not JSON-RPC, a foreign Host or Origin, a body over the limit, a session that is not the
  caller's): no tool, decision `deny`, the refusal as `outcome`, nothing read, what the transport
  knew in `details`. `lakegate.server.audit.refusals.RefusalLog` may group several into one record
  with a `count`.

The log writes `record.model_dump()` and adds the chain (`lakegate.server.audit.log`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Protocol

from pydantic import ValidationError

from lakegate.errors import AuditWriteError
from lakegate.server.audit.record_model import AuditClient, AuditRecord, AuditResource, Decision

__all__ = ["NO_CLIENT", "TouchedResource", "call_record", "listing_record", "refused_request_record"]

#: The client of a request refused before MCP said who it was.
NO_CLIENT = AuditClient(name=None, version=None)


class TouchedResource(Protocol):
    """A resource a call touched, as the gate's call scope (or an `AuditResource`) describes it."""

    @property
    def type(self) -> str: ...
    @property
    def name(self) -> str: ...
    @property
    def access(self) -> str: ...
    @property
    def version(self) -> int | None: ...


@contextmanager
def _building(kind: str) -> Iterator[None]:
    try:
        yield
    except ValidationError as exc:
        raise AuditWriteError(f"cannot build the audit record of {kind}: {exc}") from exc


def _milliseconds(duration_s: float) -> float:
    return round(duration_s * 1000, 3)


def call_record(
    *,
    request_id: str,
    session_id: str | None,
    principal: str,
    roles: Sequence[str],
    authenticated_by: str | None,
    transport: str,
    client_name: str | None,
    client_version: str | None,
    tool: str,
    arguments: Mapping[str, Any],
    decision: Decision,
    rules: Iterable[Sequence[str]],
    policy_version: str,
    resources: Iterable[TouchedResource],
    rows: int,
    payload_bytes: int,
    duration_s: float,
    outcome: str,
    error: str | None,
    details: Mapping[str, Any] | None,
) -> AuditRecord:
    """The record of one tool call; ``details`` is left out of it when empty.

    Raises:
        AuditWriteError: a value does not fit the record (the call must fail closed).
    """
    with _building(f"a call of {tool}"):
        return AuditRecord(
            request_id=request_id,
            session_id=session_id,
            principal=principal,
            roles=tuple(roles),
            authenticated_by=authenticated_by,
            transport=transport,
            client=AuditClient(name=client_name, version=client_version),
            tool=tool,
            arguments=dict(arguments),
            decision=decision,
            rules=tuple(tuple(rule) for rule in rules),
            policy_version=policy_version,
            resources=tuple(AuditResource.model_validate(touched, from_attributes=True) for touched in resources),
            rows=rows,
            bytes=payload_bytes,
            duration_ms=_milliseconds(duration_s),
            outcome=outcome,
            error=error,
            details=dict(details) if details else None,
        )


def listing_record(
    *,
    method: str,
    request_id: str,
    session_id: str | None,
    principal: str,
    roles: Sequence[str],
    authenticated_by: str | None,
    transport: str,
    client_name: str | None,
    client_version: str | None,
    policy_version: str,
    listed: int,
    payload_bytes: int,
    duration_s: float,
) -> AuditRecord:
    """The record of one listing: `tool` and `details.listing` are the method, `rows` the items listed.

    Raises:
        AuditWriteError: a value does not fit the record (the listing must not be answered).
    """
    with _building(f"a {method} listing"):
        return AuditRecord(
            request_id=request_id,
            session_id=session_id,
            principal=principal,
            roles=tuple(roles),
            authenticated_by=authenticated_by,
            transport=transport,
            client=AuditClient(name=client_name, version=client_version),
            tool=method,
            arguments={},
            decision="allow",
            rules=(),
            policy_version=policy_version,
            resources=(),
            rows=listed,
            bytes=payload_bytes,
            duration_ms=_milliseconds(duration_s),
            outcome="ok",
            error=None,
            details={"listing": method},
        )


def refused_request_record(
    *,
    request_id: str,
    session_id: str | None,
    principal: str,
    roles: Sequence[str],
    authenticated_by: str | None,
    transport: str,
    policy_version: str,
    duration_s: float,
    outcome: str,
    error: str,
    details: Mapping[str, Any],
) -> AuditRecord:
    """A record `lakegate audit` counts as a denial, with what the transport knew in `details`.

    Raises:
        AuditWriteError: a value does not fit the record.
    """
    with _building(f"a refused {transport} request"):
        return AuditRecord(
            request_id=request_id,
            session_id=session_id,
            principal=principal,
            roles=tuple(roles),
            authenticated_by=authenticated_by,
            transport=transport,
            client=NO_CLIENT,
            tool=None,
            arguments={},
            decision="deny",
            rules=(),
            policy_version=policy_version,
            resources=(),
            rows=0,
            bytes=0,
            duration_ms=_milliseconds(duration_s),
            outcome=outcome,
            error=error,
            details=dict(details),
        )
