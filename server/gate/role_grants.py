"""Decisions for principals whose token grants roles the policy does not give them.

The gate and its scopes ask the enforcer about a subject by name (`decide(principal.name, ...)`),
and Casbin resolves the name's roles from the policy's `g` rules. A token's granted roles are not
in those rules, so over HTTP the runtime's enforcer is wrapped: while a request's handler runs,
`acting_as(principal)` says which principal it serves, and decisions about that principal's name
are taken over the name and each granted role together, as Casbin would if the policy held
`g, <name>, <role>` lines: allowed when one of them has a matching allow rule and none a matching
deny rule (deny overrides across all of them).

The binding is a context variable: it follows the request's task and the worker threads it starts
(anyio copies the context), never another request. A decision about any other name is the wrapped
enforcer's, unchanged.
"""

from __future__ import annotations

import threading
from contextvars import ContextVar
from typing import Any, cast

import casbin
import structlog

from lakegate.policies.enforcer import Decision, PolicyEnforcer
from lakegate.policies.row_filters import RowFilter
from lakegate.server.gate.identity import ROLE_PREFIX, Principal

__all__ = ["GrantingEnforcer", "acting_as", "granting"]

log = structlog.get_logger(__name__)

_acting: ContextVar[Principal | None] = ContextVar("lakegate_acting_principal", default=None)


def acting_as(principal: Principal) -> Principal:
    """Bind the principal the current request serves (for the rest of its task); returns it."""
    _acting.set(principal)
    return principal


class GrantingEnforcer:
    """A view of a `PolicyEnforcer` that also counts the roles the acting principal's token grants.

    `decide`, `roles_for` and `row_filters` are its own; everything else (version, reloads,
    redaction, ...) is the wrapped enforcer's, looked up on each access, so that what the enforcer
    gains later passes through. A method added later that decides internally would not see the
    grants: the safe direction, fewer permissions.
    """

    def __init__(self, inner: PolicyEnforcer) -> None:
        self._inner = inner
        self._lock = threading.Lock()
        self._known: tuple[str, frozenset[str]] = ("", frozenset())

    def __getattr__(self, name: str) -> Any:
        # Only reached for names this class does not define.
        return getattr(self._inner, name)

    @property
    def inner(self) -> PolicyEnforcer:
        return self._inner

    def known_roles(self) -> frozenset[str]:
        """The roles the policy set in force names: subjects of `p` rules and both sides of `g`
        rules. Read again when the policy version changes; nothing while the set fails to load."""
        version = self._inner.version
        with self._lock:
            if self._known[0] != version:
                self._known = (version, self._read_known_roles())
            return self._known[1]

    def _read_known_roles(self) -> frozenset[str]:
        if self._inner.load_error is not None:
            return frozenset()
        files = self._inner.files
        # Rules may come from a rule source (a database) rather than the policy file.
        source = getattr(self._inner, "rule_source", None)
        try:
            adapter = source.snapshot() if source is not None else casbin.FileAdapter(str(files.policy))
            rules = casbin.Enforcer(str(files.model), adapter)
            names = set(rules.get_all_subjects()) | set(rules.get_all_roles())
            names.update(line[0] for line in rules.get_grouping_policy() if line)
        except Exception:  # unreadable rules grant no role (and the enforcer denies anyway)
            log.exception("auth.known_roles_failed")
            return frozenset()
        return frozenset(name for name in names if name.startswith(ROLE_PREFIX))

    def _grants(self, subject: str) -> tuple[str, ...]:
        acting = _acting.get()
        if acting is None or acting.name != subject:
            return ()
        return acting.granted

    def decide(self, subject: str, obj: str, action: str) -> Decision:
        """Decide for `subject`, counting the roles its token grants when it is the acting principal."""
        grants = self._grants(subject)
        own = self._inner.decide(subject, obj, action)
        if not grants:
            return own
        decisions = [own, *(self._inner.decide(role, obj, action) for role in grants)]
        # A refusal that names a rule is a deny rule matching: it overrides every allow. A refusal
        # without a rule (no allow matched, or the policy is unusable) decides nothing by itself.
        for decision in decisions:
            if not decision.allowed and decision.rule:
                return Decision(False, subject, obj, action, decision.rule, decision.reason)
        for decision in decisions:
            if decision.allowed:
                return Decision(True, subject, obj, action, decision.rule, decision.reason)
        return Decision(False, subject, obj, action, (), own.reason)

    def roles_for(self, subject: str) -> tuple[str, ...]:
        """The subject's roles from the policy, plus (when acting) those its token grants and theirs."""
        roles = set(self._inner.roles_for(subject))
        for role in self._grants(subject):
            roles.add(role)
            roles.update(self._inner.roles_for(role))
        return tuple(sorted(roles))

    def row_filters(self, subject: str, dataset: str) -> list[RowFilter]:
        """Row filters of the subject and of every role it holds, granted ones included."""
        filters = list(self._inner.row_filters(subject, dataset))
        for role in self._grants(subject):
            for extra in self._inner.row_filters(role, dataset):
                if extra not in filters:
                    filters.append(extra)
        return filters


def granting(enforcer: PolicyEnforcer) -> tuple[PolicyEnforcer, GrantingEnforcer]:
    """Wrap an enforcer (once); returns the wrapper typed as the enforcer the gate takes, and as itself."""
    view = cast(Any, enforcer)
    wrapper = view if isinstance(view, GrantingEnforcer) else GrantingEnforcer(enforcer)
    return cast(PolicyEnforcer, wrapper), wrapper
