"""``lakegate metrics validate|lock|diff`` through click's CliRunner, against the session's demo
warehouse: the shipped definitions validate (this is the CI check), broken copies are reported
precisely, the lock refuses edited versions, and diff's numbers match hand-written SQL."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import anyio
import pytest
import yaml
from click.testing import CliRunner, Result

from lakegate.catalog.metric_definitions import load_semantic_catalog
from lakegate.catalog.metric_validation import definition_hash, locate_metrics, parse_lock
from lakegate.server.app import Runtime
from lakegate.server.cli.main import cli
from lakegate.server.gate.identity import CallOrigin, stdio_principal

REPO = Path(__file__).resolve().parents[1]
METRICS = REPO / "catalog" / "metrics.yaml"
LOCK = REPO / "catalog" / "metrics.lock.json"


@pytest.fixture(autouse=True)
def _warehouse_env(demo_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every command reads the session's demo warehouse; diff's audit records go to this test's log."""
    monkeypatch.setenv("LAKEGATE_HOME", str(demo_home))
    monkeypatch.setenv("LAKEGATE_AUDIT__PATH", str(tmp_path / "audit" / "audit.jsonl"))
    monkeypatch.setenv("LAKEGATE_AUDIT__FSYNC", "false")


def metrics(project: Path, *args: str) -> Result:
    return CliRunner().invoke(cli, ["--project", str(project), "metrics", *args])


def project_with(tmp_path: Path, edit: Callable[[str], str] | None = None) -> Path:
    """A project holding a copy of the shipped metrics.yaml and lock, the YAML passed through `edit`."""
    project = tmp_path / "project"
    (project / "catalog").mkdir(parents=True)
    text = METRICS.read_text(encoding="utf-8")
    (project / "catalog" / "metrics.yaml").write_text(edit(text) if edit else text, encoding="utf-8")
    shutil.copyfile(LOCK, project / "catalog" / "metrics.lock.json")
    return project


def replace(old: str, new: str) -> Callable[[str], str]:
    def edit(text: str) -> str:
        assert text.count(old) == 1, f"{old!r} is not in metrics.yaml exactly once"
        return text.replace(old, new)

    return edit


def edit_yaml(change: Callable[[dict[str, Any]], None]) -> Callable[[str], str]:
    def edit(text: str) -> str:
        data = yaml.safe_load(text)
        change(data)
        return yaml.safe_dump(data, sort_keys=False)

    return edit


def without_revenue_v1(data: dict[str, Any]) -> None:
    data["metrics"] = [m for m in data["metrics"] if (m["name"], m["version"]) != ("revenue", 1)]


def with_revenue_v3(data: dict[str, Any]) -> None:
    v2 = next(m for m in data["metrics"] if (m["name"], m["version"]) == ("revenue", 2))
    data["metrics"].append({**v2, "version": 3, "filter": "status NOT IN ('cancelled', 'returned')"})


def with_input_on_retired_version(data: dict[str, Any]) -> None:
    for metric in data["metrics"]:
        if (metric["name"], metric["version"]) == ("revenue", 1):
            metric["retired"] = True
        if metric["name"] == "average_order_value":
            metric["numerator"] = {"name": "revenue", "version": 1}


# --- validate ---------------------------------------------------------------------------------------


def test_validate_passes_on_the_shipped_definitions() -> None:
    result = metrics(REPO, "validate")
    assert result.exit_code == 0, result.output
    assert result.output.startswith("metrics OK: 5 models, 16 metrics, 17 versions checked")


def test_the_shipped_lock_matches_the_shipped_definitions() -> None:
    catalog = load_semantic_catalog(REPO)
    lock = parse_lock(LOCK.read_text(encoding="utf-8"), source=str(LOCK))
    assert lock == {(m.name, m.version): definition_hash(m) for m in catalog.metrics}


def test_a_project_without_metrics_validates_the_packaged_ones(tmp_path: Path) -> None:
    files = locate_metrics(tmp_path)
    assert files.source.startswith("package") and files.lock is not None and files.lock_path is None
    result = metrics(tmp_path, "validate")
    assert result.exit_code == 0, result.output
    lock = metrics(tmp_path, "lock")
    assert lock.exit_code == 1 and "copy them to <project>/catalog/metrics.yaml" in lock.output


BROKEN = {
    "unknown column": (
        replace("{name: order_total, agg: sum, expr: total_amount,", "{name: order_total, agg: sum, expr: amount_usd,"),
        "column: {file}: semantic model orders: measures.order_total.expr: 'amount_usd' names amount_usd, "
        "which is not a column of sales.orders",
    ),
    "unknown column in an input filter": (
        replace(
            "numerator: {name: orders, filter: \"status = 'returned'\"}",
            "numerator: {name: orders, filter: \"state = 'returned'\"}",
        ),
        "column: {file}: metric refund_rate v1: numerator.filter: \"state = 'returned'\" names state",
    ),
    "sum over a string column": (
        replace("{name: order_total, agg: sum, expr: total_amount,", "{name: order_total, agg: sum, expr: channel,"),
        "type: {file}: semantic model orders: measures.order_total.expr: sum over 'channel', which is string, "
        "not a number: aggregate a numeric column, or use count, count_distinct, min or max.",
    ),
    "time dimension over a string": (
        replace(
            '{name: signup_date, type: time, description: "When the account was created"}',
            '{name: signup_date, type: time, expr: country, description: "When the account was created"}',
        ),
        "type: {file}: semantic model customers: dimensions.signup_date: time dimension signup_date is string, "
        "not a date or timestamp",
    ),
    "derived expression naming a non-input": (
        replace("expr: revenue / active_customers", "expr: revenue / buyers"),
        "expression: {file}: metric revenue_per_customer v1: expr: 'revenue / buyers' names buyers, "
        "which is not one of its inputs (active_customers, revenue)",
    ),
    "changed definition without a new version": (
        replace(
            "filter: \"status <> 'cancelled'\"\n    description: Revenue in USD",
            "filter: \"status NOT IN ('cancelled', 'returned')\"\n    description: Revenue in USD",
        ),
        "lock: {file}: metric revenue v2: metric revenue v2 changed; a changed definition is a new version: "
        "add it as version 3 and keep v2 (retire it if it must not be used)",
    ),
    "locked version deleted": (
        edit_yaml(without_revenue_v1),
        "lock: {file}: metric revenue v1: metric revenue v1 is in",
    ),
    "new version not locked": (
        edit_yaml(with_revenue_v3),
        "lock: {file}: metric revenue v3: not in",
    ),
    "input on a retired version (does not compile)": (
        edit_yaml(with_input_on_retired_version),
        "compile: {file}: metric average_order_value v1: does not compile: NotFound: Metric 'revenue' has no live "
        "version 1. Versions you can query: 2.",
    ),
    "missing table": (
        replace("table: finance.refunds", "table: finance.refund_ledger"),
        "table: {file}: semantic model refunds: table: table finance.refund_ledger does not exist in the warehouse",
    ),
    "ambiguous primary entity": (
        replace(
            "- {name: customer, type: primary, expr: customer_id}",
            "- {name: product, type: primary, expr: customer_id}",
        ),
        "entity: {file}: semantic model customers: entities.product: product is already the primary entity of "
        "products, so joins on product are ambiguous",
    ),
    "foreign entity nobody owns": (
        replace("- {name: product, type: foreign, expr: product_id}", "- {name: sku, type: foreign, expr: product_id}"),
        "entity: {file}: semantic model order_items: entities.sku: foreign entity sku is no model's primary entity",
    ),
    "cycle": (
        replace(
            "inputs: [{name: revenue}, {name: active_customers}]",
            "inputs: [{name: revenue}, {name: revenue_per_customer, alias: active_customers}]",
        ),
        "metrics refer to each other in a cycle",
    ),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_validate_reports_each_problem_precisely(case: str, tmp_path: Path) -> None:
    edit, expected = BROKEN[case]
    project = project_with(tmp_path, edit)
    result = metrics(project, "validate")
    assert result.exit_code == 1, result.output
    assert result.output.startswith("metrics FAILED:")
    assert expected.format(file=project / "catalog" / "metrics.yaml") in result.output, result.output


def test_validate_json_lists_problems_with_their_fields(tmp_path: Path) -> None:
    project = project_with(tmp_path, replace("table: finance.refunds", "table: finance.refund_ledger"))
    result = metrics(project, "validate", "--json")
    assert result.exit_code == 1
    report = json.loads(result.stdout)
    assert report["ok"] is False
    assert report["problems"] == [
        {
            "kind": "table",
            "file": str(project / "catalog" / "metrics.yaml"),
            "where": "semantic model refunds",
            "field": "table",
            "message": "table finance.refund_ledger does not exist in the warehouse: fix the name, or create the "
            "table before defining metrics on it.",
        }
    ]


def test_an_empty_warehouse_is_refused_with_what_to_do(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LAKEGATE_HOME", str(tmp_path / "empty"))
    result = metrics(REPO, "validate")
    assert result.exit_code == 1 and "lakegate demo" in result.output


# --- lock -------------------------------------------------------------------------------------------


def test_lock_adds_new_versions_and_refuses_changed_ones_without_force(tmp_path: Path) -> None:
    project = project_with(tmp_path, edit_yaml(with_revenue_v3))
    lock_file = project / "catalog" / "metrics.lock.json"
    added = metrics(project, "lock")
    assert added.exit_code == 0, added.output
    assert "18 versions locked" in added.output and "new: revenue v3" in added.output
    assert metrics(project, "validate").exit_code == 0
    assert "lock up to date" in metrics(project, "lock").output

    # Editing the now-locked v3 is refused, and nothing is written.
    yaml_file = project / "catalog" / "metrics.yaml"
    yaml_file.write_text(
        yaml_file.read_text().replace("status NOT IN ('cancelled', 'returned')", "status <> 'returned'"),
        encoding="utf-8",
    )
    before = lock_file.read_text()
    refused = metrics(project, "lock")
    assert refused.exit_code == 1
    assert "nothing written" in refused.output
    assert "metric revenue v3 changed since it was locked" in refused.output and "add it as version 4" in refused.output
    assert lock_file.read_text() == before
    assert metrics(project, "validate").exit_code == 1

    forced = metrics(project, "lock", "--force")
    assert forced.exit_code == 0 and "re-locked: revenue v3" in forced.output
    assert metrics(project, "validate").exit_code == 0


def test_retiring_or_redocumenting_a_version_is_not_a_change(tmp_path: Path) -> None:
    def retire_v1(data: dict[str, Any]) -> None:
        v1 = next(m for m in data["metrics"] if (m["name"], m["version"]) == ("revenue", 1))
        v1.update(retired=True, description="Superseded by v2.", synonyms=[])

    project = project_with(tmp_path, edit_yaml(retire_v1))
    result = metrics(project, "validate")
    assert result.exit_code == 0, result.output


# --- diff -------------------------------------------------------------------------------------------


def months_by_hand(runtime: Runtime) -> dict[str, tuple[Decimal, Decimal]]:
    """Per month: the sum of all order totals (v1) and of those not cancelled (v2), as admin."""
    sql = (
        "SELECT CAST(date_trunc('month', order_ts) AS DATE) AS month, sum(total_amount) AS all_orders, "
        "sum(CASE WHEN status <> 'cancelled' THEN total_amount ELSE 0 END) AS not_cancelled "
        "FROM sales.orders GROUP BY 1 ORDER BY 1"
    )
    who = stdio_principal("admin", runtime.enforcer)
    origin = CallOrigin(transport="in-process", session_id="metrics-diff-test")
    outcome = anyio.run(runtime.gate.call, "query", {"sql": sql, "limit": 1000}, who, origin)
    assert outcome.error is None, str(outcome.error)
    assert outcome.result is not None
    rows = outcome.result.rows  # type: ignore[attr-defined]
    return {str(month): (Decimal(str(old)), Decimal(str(new))) for month, old, new in rows}


def test_diff_revenue_reports_every_period_with_the_right_numbers(runtime: Runtime) -> None:
    result = metrics(REPO, "diff", "revenue", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert (report["metric"], report["from"], report["to"]) == ("revenue", 1, 2)
    assert report["group_by"] == ["metric_time__month"]
    assert report["snapshots"] == {"sales.orders": runtime.warehouse.describe("sales.orders").current_version}

    expected = months_by_hand(runtime)
    got = {row["key"]["metric_time__month"]: row for row in report["differing"]}
    assert report["rows"] == len(expected) == len(got) == 24
    for month, (old, new) in expected.items():
        row = got[month]
        assert (Decimal(row["old"]), Decimal(row["new"])) == (old, new), month
        assert Decimal(row["difference"]) == new - old < 0
        assert row["relative"] == pytest.approx(float((new - old) / old))
    total_old = sum(old for old, _ in expected.values())
    total_new = sum(new for _, new in expected.values())
    assert (Decimal(report["total"]["old"]), Decimal(report["total"]["new"])) == (total_old, total_new)
    largest = max((float((n - o) / o) for o, n in expected.values()), key=abs)
    assert report["summary"] == f"revenue v1 -> v2: 24 of 24 periods differ, largest {largest:+.2%}"

    table = metrics(REPO, "diff", "revenue")
    assert table.exit_code == 0, table.output
    first = min(expected)
    old, new = expected[first]
    assert f"{old:,}" in table.output and f"{new:,}" in table.output and f"{new - old:,}" in table.output
    assert table.output.rstrip().endswith(report["summary"])


def test_diff_of_identical_versions_reports_no_difference(tmp_path: Path) -> None:
    def same_as_v2(data: dict[str, Any]) -> None:
        v2 = next(m for m in data["metrics"] if (m["name"], m["version"]) == ("revenue", 2))
        data["metrics"].append({**v2, "version": 3, "description": "The same number, documented again."})

    project = project_with(tmp_path, edit_yaml(same_as_v2))
    result = metrics(project, "diff", "revenue", "--group-by", "customer__region")
    assert result.exit_code == 0, result.output
    assert "revenue v2 -> v3: 0 of 4 rows differ" in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["nope"], "there is no metric named 'nope'"),
        (["average_order_value"], "no version before v1"),
        (["revenue", "--to", "7"], "metric revenue has no version 7 (versions: 1, 2)"),
        (["revenue", "--from", "2", "--to", "2"], "give two different versions"),
        (["revenue", "--group-by", "customer__colour"], "customer has no dimension colour"),
        (["revenue", "--principal", "nobody"], "principal 'nobody' may not read metric revenue"),
    ],
)
def test_diff_refuses_clearly(args: list[str], message: str) -> None:
    result = metrics(REPO, "diff", *args)
    assert result.exit_code in (1, 2)
    assert message in result.output, result.output


def test_help_explains_each_command() -> None:
    group = CliRunner().invoke(cli, ["metrics", "--help"])
    assert group.exit_code == 0
    for command in ("validate", "lock", "diff"):
        assert command in group.output
        assert CliRunner().invoke(cli, ["metrics", command, "--help"]).exit_code == 0
    assert "metrics" in CliRunner().invoke(cli, ["--help"]).output
