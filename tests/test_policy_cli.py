"""``lakegate policy explain|test`` through click's CliRunner, on the real demo policies with the
real Casbin enforcer, and on modified copies of them (a proposed change, evaluated before it ships)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from click.testing import CliRunner, Result

from lakegate.catalog.definitions import load_definitions
from lakegate.policies.enforcer import PolicyEnforcer, policy_files
from lakegate.policies.intent import check_intents, load_intents
from lakegate.server.app import resource_groups
from lakegate.server.cli.main import cli

REPO = Path(__file__).resolve().parents[1]
MASK_HASH = "p, role:analyst, tag:pii, mask:hash, allow"


def lakegate(*args: str) -> Result:
    return CliRunner().invoke(cli, ["--project", str(REPO), "policy", *args])


def proposed(tmp_path: Path, old: str, new: str) -> Path:
    """A copy of the demo policies/ with one line of policy.csv changed."""
    directory = tmp_path / "proposed"
    shutil.copytree(REPO / "policies", directory, ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    policy = directory / "policy.csv"
    text = policy.read_text()
    assert text.count(old) == 1, f"{old!r} is not in policy.csv exactly once"
    policy.write_text(text.replace(old, new))
    return directory


def test_explain_analyst_email_is_hashed_with_its_rules() -> None:
    result = lakegate("explain", "analyst", "sales.customers.email", "read", "--json")
    assert result.exit_code == 0, result.output
    answer = json.loads(result.stdout)
    assert (answer["principal"], answer["allowed"], answer["access"]) == ("analyst", True, "masked:hash")
    assert answer["rule"] == "role:analyst, tag:pii, read, deny; role:analyst, tag:pii, mask:hash, allow"
    assert "keyed hash" in answer["advice"][0]
    assert answer["roles"] == ["role:agent", "role:analyst"] and answer["policy"].endswith("policy.csv")

    text = lakegate("explain", "analyst", "sales.customers.email")
    assert text.exit_code == 0, text.output
    assert "masked:hash" in text.output and "role:agent, role:analyst" in text.output
    assert "mask:hash, allow" in text.output


def test_explain_support_agent_orders_names_the_row_filter() -> None:
    result = lakegate("explain", "support_agent", "sales.orders", "read")
    assert result.exit_code == 0, result.output
    assert "row filter: sales.orders: region = 'EMEA' (role:support_agent)" in result.output
    assert "EMEA customers only" in result.output
    answer = json.loads(lakegate("explain", "support_agent", "sales.orders", "--json").stdout)
    assert answer["row_filters"] == ["sales.orders: region = 'EMEA' (role:support_agent)"]
    assert {c["name"] for c in answer["columns"]} >= {"order_id", "region", "total_amount"}


def test_explain_analyst_tickets_is_denied_with_the_rule() -> None:
    result = lakegate("explain", "analyst", "support.tickets", "read", "--json")
    assert result.exit_code == 0, result.output
    answer = json.loads(result.stdout)
    assert (answer["allowed"], answer["access"]) == (False, "deny")
    assert answer["rule"] == "no matching allow rule (deny by default)"
    steward = json.loads(lakegate("explain", "data_steward", "support.tickets.body", "--json").stdout)
    assert (steward["access"], steward["rule"]) == ("hidden", "role:data_steward, support.tickets.body, read, deny")


def test_explain_a_proposed_policy_set(tmp_path: Path) -> None:
    directory = proposed(tmp_path, "p, role:analyst, tag:pii, read, deny\n", "")
    result = lakegate("explain", "analyst", "sales.customers.email", "--policy-dir", str(directory), "--json")
    assert result.exit_code == 0, result.output
    answer = json.loads(result.stdout)
    assert (answer["access"], answer["rule"]) == ("clear", "role:analyst, sales.*, read, allow")
    in_force = json.loads(lakegate("explain", "analyst", "sales.customers.email", "--json").stdout)
    assert in_force["access"] == "masked:hash" and in_force["policy_version"] != answer["policy_version"]


def test_explain_refuses_unknown_resources_and_broken_policy_sets(tmp_path: Path) -> None:
    unknown = lakegate("explain", "analyst", "sales.no_such_table")
    assert unknown.exit_code == 1 and "no dataset 'sales.no_such_table'" in unknown.output
    malformed = lakegate("explain", "analyst", "orders")
    assert malformed.exit_code == 1 and "is not a resource" in malformed.output
    wrong = lakegate("explain", "analyst", "metric:revenue", "restore")
    assert wrong.exit_code == 1 and "does not apply to a metric" in wrong.output
    broken = proposed(tmp_path, MASK_HASH, MASK_HASH)
    filters = broken / "row_filters.yaml"
    filters.write_text(filters.read_text().replace("where: \"region = 'EMEA'\"", 'where: "region = ("', 1))
    result = lakegate("explain", "analyst", "sales.orders", "--policy-dir", str(broken))
    assert result.exit_code == 1 and "does not load" in result.output and "row filter" in result.output
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "holds no policy.csv" in lakegate("test", "--policy-dir", str(empty)).output


def test_policy_test_passes_on_the_demo_policies() -> None:
    result = lakegate("test")
    assert result.exit_code == 0, result.output
    assert "policy intents OK" in result.output and "0 failed" in result.output
    document = json.loads(lakegate("test", "--json").stdout)
    enforcer = PolicyEnforcer(policy_files(REPO), resource_groups(load_definitions(REPO)), reload_interval_s=0)
    expected = check_intents(enforcer, load_intents(REPO))
    assert document["ok"] and document["failed"] == 0 and document["passed"] == len(expected) > 100
    assert document["policy_version"] == enforcer.version


def test_policy_test_fails_naming_the_broken_intent(tmp_path: Path) -> None:
    # A proposed change: analysts see PII redacted instead of hashed (no longer joinable).
    directory = proposed(tmp_path, MASK_HASH, "p, role:analyst, tag:pii, mask:redact, allow")
    result = lakegate("test", "--policy-dir", str(directory))
    assert result.exit_code == 1, result.output
    assert "policy intents FAILED" in result.output
    assert "FAIL analyst column sales.customers.email: expected masked:hash, got masked:redact" in result.output
    assert "role:analyst, tag:pii, mask:redact, allow" in result.output  # the rule that now decides

    document = json.loads(lakegate("test", "--policy-dir", str(directory), "--json").stdout)
    failed = {(c["principal"], c["resource"]) for c in document["checks"] if not c["ok"]}
    assert ("analyst", "sales.customers.email") in failed and not document["ok"]
    assert all(principal == "analyst" for principal, _ in failed)  # nothing else changed


def test_policy_test_uses_the_proposed_intents_when_given(tmp_path: Path) -> None:
    directory = proposed(tmp_path, MASK_HASH, MASK_HASH)
    (directory / "intent.yaml").write_text("- principal: analyst\n  datasets: {support.tickets: allow}\n")
    result = lakegate("test", "--policy-dir", str(directory), "--json")
    assert result.exit_code == 1
    (check,) = json.loads(result.stdout)["checks"]
    assert (check["resource"], check["expected"], check["actual"]) == ("support.tickets", "allow", "deny")
    (directory / "intent.yaml").write_text("- datasets: {}\n")
    invalid = lakegate("test", "--policy-dir", str(directory))
    assert invalid.exit_code == 1 and "intent file is not valid" in invalid.output
