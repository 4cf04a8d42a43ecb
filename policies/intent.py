"""Checking the policy-intent file (policies/intent.yaml) against a policy set."""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from lakegate.policies.columns import column_access
from lakegate.policies.enforcer import PolicyEnforcer
from lakegate.policies.explain import EXPLAIN_OTHERS
from lakegate.policies.resources import tool_resource

__all__ = ["INTENT_FILE", "IntentCheck", "check_intents", "load_intents"]

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

    def describe(self) -> str:
        """The expectation spelled out, with what the policy set answers and the rule that decided."""
        return (
            f"{self.principal} {self.kind} {self.resource}: expected {self.expected}, got {self.actual} ({self.rule})"
        )


def load_intents(project: Path, policy_dir: Path | None = None) -> list[dict[str, Any]]:
    """`<policy_dir>/intent.yaml` when there is one, else the project's policies/intent.yaml, else the
    packaged one: a proposed policy set without intents of its own must meet the ones in force.

    Raises:
        ValueError: the file is not YAML, or not a list of principals with expectations.
    """
    candidates = [*([policy_dir / INTENT_FILE] if policy_dir else []), project / "policies" / INTENT_FILE]
    local = next((path for path in candidates if path.is_file()), None)
    text = local.read_text() if local else resources.files("lakegate.policies").joinpath(INTENT_FILE).read_text()
    try:
        loaded = yaml.safe_load(text) or []
    except yaml.YAMLError as exc:
        raise ValueError(f"{local or INTENT_FILE}: not valid YAML: {exc}") from exc
    if not isinstance(loaded, list) or not all(isinstance(i, dict) and "principal" in i for i in loaded):
        raise ValueError(f"{local or INTENT_FILE} must be a list of principals with expectations")
    return loaded


def check_intents(enforcer: PolicyEnforcer, intents: list[dict[str, Any]]) -> list[IntentCheck]:
    """Every expectation of `intents`, in file order, with the policy set's answer."""
    checks = []
    for intent in intents:
        who = str(intent["principal"])
        for dataset, expected in (intent.get("datasets") or {}).items():
            decision = enforcer.decide(who, dataset, "read")
            actual = "allow" if decision.allowed else "deny"
            checks.append(IntentCheck(who, "dataset", dataset, str(expected), actual, decision.rule_text))
        for tool, expected in (intent.get("tools") or {}).items():
            decision = enforcer.decide(who, tool_resource(tool), "call")
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
        if "explain_others" in intent:
            decision = enforcer.decide(who, EXPLAIN_OTHERS, "call")
            actual = "allow" if decision.allowed else "deny"
            checks.append(
                IntentCheck(who, "explain", "others", str(intent["explain_others"]), actual, decision.rule_text)
            )
    return checks
