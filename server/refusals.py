"""The audit record of a request refused before it reached the gate (a bad token, a line that is
not JSON-RPC): the gate's record shape with no tool, decision `deny`, nothing read."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["refused_request_record"]


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
) -> dict[str, Any]:
    """A record `lakegate audit` counts as a denial, with what the transport knew in `details`."""
    return {
        "request_id": request_id,
        "session_id": session_id,
        "principal": principal,
        "roles": list(roles),
        "authenticated_by": authenticated_by,
        "transport": transport,
        "client": {"name": None, "version": None},
        "tool": None,
        "arguments": {},
        "decision": "deny",
        "rules": [],
        "policy_version": policy_version,
        "resources": [],
        "rows": 0,
        "bytes": 0,
        "duration_ms": round(duration_s * 1000, 3),
        "outcome": outcome,
        "error": error,
        "details": dict(details),
    }
