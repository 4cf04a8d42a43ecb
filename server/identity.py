"""Who is calling. Identity comes from the transport (stdio: settings; HTTP: a verified token),
never from tool arguments."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

from policies.enforcer import PolicyEnforcer

__all__ = ["ANONYMOUS", "CallOrigin", "Principal", "stdio_principal"]

ANONYMOUS = "anonymous"


@dataclass(frozen=True)
class Principal:
    """A caller as the gate sees it: a name Casbin knows, and the roles the policy gives it."""

    name: str
    roles: tuple[str, ...] = ()
    authenticated_by: str = "config"


@dataclass(frozen=True)
class CallOrigin:
    """Where a call came from, for the audit record."""

    transport: str
    session_id: str
    client_name: str | None = None
    client_version: str | None = None
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)


def stdio_principal(name: str | None, enforcer: PolicyEnforcer) -> Principal:
    """The principal of a stdio server: the configured name, or anonymous (who may do nothing)."""
    chosen = (name or "").strip() or ANONYMOUS
    return Principal(name=chosen, roles=enforcer.roles_for(chosen), authenticated_by="config")
