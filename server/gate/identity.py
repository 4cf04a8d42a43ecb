"""Who is calling. Identity comes from the transport (stdio: settings; HTTP: a verified token),
never from tool arguments.

Roles: Casbin `g` rules give a principal its roles. A bearer token may grant more through its roles
claim: such roles *add* to the ones the policy gives the token's subject (deny still overrides
allow across all of them), and only roles the policy set knows (`role:<name>` in some rule) count;
any other claimed role is ignored. A token cannot remove a role the policy gives.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field

from lakegate.policies.enforcer import PolicyEnforcer

__all__ = [
    "ANONYMOUS",
    "ROLE_PREFIX",
    "CallOrigin",
    "Principal",
    "granted_roles",
    "stdio_principal",
    "token_principal",
]

ANONYMOUS = "anonymous"
ROLE_PREFIX = "role:"
#: A token claiming more roles than this is not granted the rest: IdP group lists can be long, and
#: each granted role costs one Casbin decision per resource.
MAX_TOKEN_ROLES = 32


@dataclass(frozen=True)
class Principal:
    """A caller as the gate sees it: a name Casbin knows, and the roles it holds.

    `granted` are the roles a verified token added to the policy's (empty for stdio); `roles` is
    every role held, through the policy or the token, with the roles those inherit.
    """

    name: str
    roles: tuple[str, ...] = ()
    authenticated_by: str = "config"
    granted: tuple[str, ...] = ()


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


def granted_roles(claimed: Iterable[str], known: frozenset[str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The roles a token's claim grants, and the claimed ones ignored (unknown to the policy).

    A claim may name a role with or without its prefix: `analyst` and `role:analyst` are the same.
    """
    granted: list[str] = []
    ignored: list[str] = []
    for value in claimed:
        role = value if value.startswith(ROLE_PREFIX) else ROLE_PREFIX + value
        if role in known and len(granted) < MAX_TOKEN_ROLES:
            if role not in granted:
                granted.append(role)
        else:
            ignored.append(value)
    return tuple(sorted(granted)), tuple(ignored)


def token_principal(subject: str, granted: tuple[str, ...], enforcer: PolicyEnforcer) -> Principal:
    """The principal of a verified bearer token: its subject, with the policy's roles for it plus
    the roles the token grants (and what those inherit). Resolved per request, so a policy reload
    applies at once."""
    roles = set(enforcer.roles_for(subject)) | set(granted)
    for role in granted:
        roles.update(enforcer.roles_for(role))
    return Principal(name=subject, roles=tuple(sorted(roles)), authenticated_by="bearer", granted=granted)
