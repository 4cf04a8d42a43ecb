"""Checking the policy-intent file (policies/intent.yaml) against a policy set."""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from policies.columns import column_access
from policies.enforcer import PolicyEnforcer

__all__ = ["IntentCheck", "check_intents", "load_intents"]

INTENT_FILE = "intent.yaml"


@dataclass(frozen=True)
class IntentCheck:
    principal: str
    kind: str
    resource: str
    expected: str
    actual: str
    rule: str

    @property
    def ok(self) -> bool:
        return self.expected == self.actual


def load_intents(project: Path) -> list[dict[str, Any]]:
    """The project's policies/intent.yaml, else the packaged one."""
    local = project / "policies" / INTENT_FILE
    text = local.read_text() if local.is_file() else resources.files("policies").joinpath(INTENT_FILE).read_text()
    loaded = yaml.safe_load(text) or []
    if not isinstance(loaded, list):
        raise ValueError(f"{INTENT_FILE} must be a list of principals with expectations")
    return loaded


def check_intents(enforcer: PolicyEnforcer, intents: list[dict[str, Any]]) -> list[IntentCheck]:
    checks = []
    for intent in intents:
        who = str(intent["principal"])
        for dataset, expected in (intent.get("datasets") or {}).items():
            decision = enforcer.decide(who, dataset, "read")
            actual = "allow" if decision.allowed else "deny"
            checks.append(IntentCheck(who, "dataset", dataset, str(expected), actual, decision.rule_text))
        for tool, expected in (intent.get("tools") or {}).items():
            decision = enforcer.decide(who, f"tool:{tool}", "call")
            actual = "allow" if decision.allowed else "deny"
            checks.append(IntentCheck(who, "tool", tool, str(expected), actual, decision.rule_text))
        # writes: action write on datasets and columns; restores: action restore on datasets.
        for key, action in (("writes", "write"), ("restores", "restore")):
            for resource, expected in (intent.get(key) or {}).items():
                decision = enforcer.decide(who, resource, action)
                actual = "allow" if decision.allowed else "deny"
                checks.append(IntentCheck(who, action, resource, str(expected), actual, decision.rule_text))
        for column, expected in (intent.get("columns") or {}).items():
            access = column_access(enforcer, who, column)
            actual = f"masked:{access.mask}" if access.access == "masked" else access.access
            checks.append(IntentCheck(who, "column", column, str(expected), actual, access.decision.rule_text))
    return checks
