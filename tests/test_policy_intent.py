"""The governance team's intents (policies/intent.yaml) hold for the policy set in force."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import casbin
import pytest

from lakegate.catalog.definitions import load_definitions
from lakegate.policies.enforcer import PolicyEnforcer, policy_files
from lakegate.policies.intent import check_intents, load_intents
from lakegate.server.app import resource_groups

REPO = Path(__file__).resolve().parents[1]


def _enforcer(project: Path = REPO) -> PolicyEnforcer:
    return PolicyEnforcer(policy_files(project), resource_groups(load_definitions(project)), reload_interval_s=0)


CHECKS = check_intents(_enforcer(), load_intents(REPO))


@pytest.mark.parametrize("check", CHECKS, ids=[f"{c.principal}:{c.kind}:{c.resource}" for c in CHECKS])
def test_intent(check: object) -> None:
    assert check.ok, f"expected {check.expected}, got {check.actual} ({check.rule})"  # type: ignore[attr-defined]


def test_intents_cover_every_demo_role() -> None:
    assert {c.principal for c in CHECKS} >= {"analyst", "support_agent", "data_steward", "admin", "mallory"}


def test_a_broken_policy_file_denies_everything(tmp_path: Path) -> None:
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "model.conf").write_text("[request_definition]\nr = sub, obj\n[matchers]\nm = oops(\n")
    (tmp_path / "policies" / "policy.csv").write_text("p, role:admin, *, *, allow\ng, admin, role:admin\n")
    enforcer = _enforcer(tmp_path)
    decision = enforcer.decide("admin", "sales.orders", "read")
    assert not decision.allowed and "failed to load" in decision.reason
    assert enforcer.roles_for("admin") == ()


def test_policy_changes_are_hot_reloaded(tmp_path: Path) -> None:
    (tmp_path / "policies").mkdir()
    policy = tmp_path / "policies" / "policy.csv"
    (tmp_path / "policies" / "model.conf").write_text((REPO / "policies" / "model.conf").read_text())
    policy.write_text("g, alice, role:analyst\n")
    enforcer = _enforcer(tmp_path)
    before = enforcer.version
    assert not enforcer.decide("alice", "sales.orders", "read").allowed
    policy.write_text("g, alice, role:analyst\np, role:analyst, sales.*, read, allow\n")
    import os

    os.utime(policy, (1, 1))  # a different mtime even within the filesystem's time resolution
    decision = enforcer.decide("alice", "sales.orders", "read")
    assert decision.allowed and decision.rule == ("role:analyst", "sales.*", "read", "allow")
    assert enforcer.version != before


def test_a_disabled_casbin_enforcer_allows_nothing() -> None:
    enforcer = _enforcer()
    loaded = enforcer._current()  # the wrapped pycasbin enforcer, as another component might misuse it
    assert loaded.decider is not None
    loaded.decider.enable_enforce(False)
    loaded.cache.clear()
    assert not enforcer.decide("admin", "sales.orders", "read").allowed


class _FlakyRules:
    """A rule source (the production profile's PostgreSQL, in effect) that cannot be read at first:
    the real policy.csv through Casbin's file adapter once `up` is set. Its stamp never moves."""

    def __init__(self) -> None:
        self.up = False

    def snapshot(self) -> Any:
        if not self.up:
            raise ConnectionError("the database is restarting")
        return casbin.FileAdapter(str(policy_files(REPO).policy))

    def stamp(self) -> int:
        return 1

    def stale_reason(self) -> str | None:
        return None

    def close(self) -> None:
        pass


def test_a_rule_source_that_comes_back_is_read_again_without_a_policy_change() -> None:
    rules = _FlakyRules()
    enforcer = PolicyEnforcer(policy_files(REPO), reload_interval_s=0, rules=rules)
    assert not enforcer.decide("analyst", "sales.orders", "read").allowed, "an unreadable source denies"
    assert enforcer.load_error is not None
    rules.up = True
    assert enforcer.decide("analyst", "sales.orders", "read").allowed
    assert enforcer.load_error is None
