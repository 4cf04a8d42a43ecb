"""lakegate's metrics against dbt MetricFlow's own answers (the reference sets, issue 17).

tests/fixtures/metricflow/ holds what evals/metricflow_reference.py recorded, for two projects:
- tutorial: MetricFlow's tutorial project (its seeds and semantic YAML, plus
  evals/metricflow/extra_metrics.yml) and MetricFlow's answer to every query of
  evals/metricflow/queries.yaml. Here the seeds are loaded into real Iceberg tables and
  `lakegate metrics import dbt` translates the project's semantic_manifest.json;
- demo: lakegate's own demo metrics (catalog/metrics.yaml) translated by hand to MetricFlow
  (evals/metricflow/demo/), answered by MetricFlow over the small demo's rows. Here the demo's own
  definitions are served over the small demo warehouse, as shipped.
Each query is asked with query_metrics through `lakegate serve` over stdio, with the MCP SDK's
client. The suite does not need MetricFlow.

KNOWN_DIFFERENCES lists the queries lakegate answers differently, each with the reason. The test
fails when another query differs, and also when a listed one starts to agree, so that each fix
shrinks the list in the same commit.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from datetime import date, datetime
from pathlib import Path
from typing import Any

import anyio
import pyarrow.csv as pa_csv
import pytest
import yaml
from click.testing import CliRunner

from lakegate.catalog.warehouse import Warehouse
from lakegate.evals.mcp_client import connect, text_of
from lakegate.server.app import Runtime, open_runtime
from lakegate.server.cli.main import cli
from lakegate.server.settings import load_settings
from tests.conftest import copy_demo_project

REFERENCES = Path(__file__).parent / "fixtures" / "metricflow"
FIXTURES = REFERENCES / "tutorial"
REPO = Path(__file__).resolve().parents[1]
TABLES = {"transactions": "mf.transactions", "customers": "mf.customers", "countries": "mf.countries",
          "transaction_facts": "mf.transactions"}  # fmt: skip
SEEDS = {
    "mf.transactions": "transactions_seed.csv",
    "mf.customers": "customers_seed.csv",
    "mf.countries": "countries_seed.csv",
}

#: Queries lakegate answers differently, and why (the README's "Metrics beside dbt MetricFlow").
KNOWN_DIFFERENCES: dict[str, dict[str, str]] = {
    "tutorial": {},
    "demo": {
        "cumulative_revenue": "the demo defines no time spine: an all-time running total stops at the answer's "
        "last period, where MetricFlow's goes on to the end of its spine",
    },
}


def _import_options() -> list[str]:
    """`lakegate metrics import dbt` options: the table of each semantic model, and the days of the
    tutorial's time spine (its all_days model: 2022)."""
    tables = [argument for model, table in TABLES.items() for argument in ("--table", f"{model}={table}")]
    return [*tables, "--time-spine", "2022-01-01:2022-12-31"]


def _reference(project: str = "tutorial") -> dict[str, Any]:
    answers: dict[str, Any] = json.loads((REFERENCES / project / "answers.json").read_text())["answers"]
    return answers


@pytest.fixture(scope="module")
def tutorial(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runtime]:
    """MetricFlow's tutorial data in Iceberg tables, its semantic layer imported, served by lakegate."""
    root = tmp_path_factory.mktemp("metricflow")
    home = root / "home"
    warehouse = Warehouse(home)
    try:
        warehouse.iceberg.create_namespace("mf")
        for table, seed in SEEDS.items():
            data = pa_csv.read_csv(FIXTURES / "inputs" / "seeds" / seed)
            warehouse.iceberg.create_table(table, schema=data.schema).append(data)
    finally:
        warehouse.close()
    project = copy_demo_project(root / "project")
    (project / "catalog" / "metrics.yaml").write_text("semantic_models: []\nmetrics: []\n")
    (project / "catalog" / "metrics.lock.json").unlink(missing_ok=True)
    (project / "lakegate.toml").write_text("build_demo = false\n")
    tables = _import_options()
    imported = CliRunner().invoke(
        cli,
        [
            "--project",
            str(project),
            "metrics",
            "import",
            "dbt",
            str(FIXTURES / "inputs" / "semantic_manifest.json"),
            *tables,
        ],
        env={"LAKEGATE_HOME": str(home)},
    )
    assert imported.exit_code == 0, imported.output
    locked = CliRunner().invoke(cli, ["--project", str(project), "metrics", "lock"], env={"LAKEGATE_HOME": str(home)})
    assert locked.exit_code == 0, locked.output
    audit = {"path": root / "audit.jsonl", "fsync": False}
    runtime = open_runtime(load_settings(project, home=home, audit=audit, principal=None))
    try:
        yield runtime
    finally:
        runtime.close()


def _arguments(query: dict[str, Any]) -> dict[str, Any]:
    """query_metrics' arguments for a reference query: its where filters as MetricFlow writes them."""
    if "saved_query" in query:
        return {"saved_query": query["saved_query"], "limit": 1000}
    where: list[dict[str, Any] | str] = []
    # start_time and end_time bound metric_time, both included, as a filter on its days does.
    for key, op in (("start_time", ">="), ("end_time", "<=")):
        if key in query:
            where.append({"dimension": "metric_time__day", "op": op, "value": query[key]})
    where += query.get("where", [])
    arguments: dict[str, Any] = {"metrics": query["metrics"], "group_by": query.get("group_by", []), "where": where}
    arguments["order_by"] = query.get("order_by", [])
    arguments["limit"] = query.get("limit", 1000)
    return arguments


def _cell(value: Any) -> Any:
    """A value as both sides can be compared: dates as ISO days, numbers as floats."""
    if isinstance(value, datetime | date):
        value = value.isoformat()
    if isinstance(value, str) and re.match(r"^\d{4}-\d{2}-\d{2}([ T]00:00:00)?$", value):
        return value[:10]
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int | float):
        return float(value)
    try:
        return float(value)
    except (TypeError, ValueError):
        return value


def _same(left: Any, right: Any) -> bool:
    if isinstance(left, float) and isinstance(right, float):
        return math.isclose(left, right, rel_tol=1e-9, abs_tol=1e-12)
    return bool(left == right)


def _rows(columns: list[str], rows: list[list[Any]], order: list[str]) -> list[list[Any]]:
    picked = [[_cell(row[columns.index(name)]) for name in order] for row in rows]
    return sorted(picked, key=lambda row: [(value is None, str(value)) for value in row])


def _answers(home: Path, project: Path, audit: Path, references: dict[str, Any]) -> dict[str, dict[str, Any] | str]:
    """lakegate's answer to every reference query (its result, or its error text), through
    `lakegate serve` over stdio with the MCP SDK's client, as an agent asks."""

    async def ask() -> dict[str, dict[str, Any] | str]:
        found: dict[str, dict[str, Any] | str] = {}
        async with connect("admin", home, project=project, LAKEGATE_AUDIT__PATH=str(audit)) as client:
            for name, reference in references.items():
                arguments = _arguments(reference["query"])
                if "error" in reference:
                    continue
                result = await client.call_tool("query_metrics", arguments)
                if result.is_error:
                    found[name] = text_of(result)
                    continue
                page = dict(result.structured_content or {})
                answer = {**page, "rows": list(page["rows"])}
                while "limit" not in reference["query"] and page.get("truncated") and page.get("next_cursor"):
                    result = await client.call_tool("query_metrics", {**arguments, "cursor": page["next_cursor"]})
                    page = dict(result.structured_content or {})
                    answer["rows"] += page["rows"]
                found[name] = answer
        return found

    return anyio.run(ask)


def _difference(answer: dict[str, Any] | str | None, reference: dict[str, Any]) -> str | None:
    """Why lakegate's answer to a reference query differs from MetricFlow's; None when it agrees."""
    if "error" in reference:
        return "MetricFlow refused it"
    if answer is None:
        return "lakegate cannot ask it"
    if isinstance(answer, str):
        return f"lakegate refused it: {answer}"
    result = answer
    columns = [column["name"] for column in result["columns"]]
    if sorted(columns) != sorted(reference["columns"]):
        return f"columns {columns} against {reference['columns']}"
    ours = _rows(columns, result["rows"], reference["columns"])
    theirs = _rows(reference["columns"], reference["rows"], reference["columns"])
    if reference["query"].get("order_by"):  # ordered: compare in order
        ours = [[_cell(v) for v in row] for row in result["rows"]]
        ours = [[row[columns.index(c)] for c in reference["columns"]] for row in ours]
        theirs = [[_cell(v) for v in row] for row in reference["rows"]]
    if len(ours) != len(theirs) or not all(
        _same(a, b) for mine, other in zip(ours, theirs, strict=True) for a, b in zip(mine, other, strict=True)
    ):
        return f"rows differ: lakegate {ours[:4]}... ({len(ours)}) against MetricFlow {theirs[:4]}... ({len(theirs)})"
    return None


def test_the_reference_sets_cover_every_construct() -> None:
    for project in ("tutorial", "demo"):
        answers = _reference(project)
        assert len(answers) >= {"tutorial": 40, "demo": 25}[project]
        assert set(KNOWN_DIFFERENCES[project]) <= set(answers), set(KNOWN_DIFFERENCES[project]) - set(answers)
        assert not [name for name, answer in answers.items() if "error" in answer]  # MetricFlow answered each


def _compare(project: str, answers: dict[str, dict[str, Any] | str]) -> None:
    known = KNOWN_DIFFERENCES[project]
    differing = {name: _difference(answers.get(name), reference) for name, reference in _reference(project).items()}
    differing = {name: why for name, why in differing.items() if why is not None}
    unexpected = {name: why for name, why in differing.items() if name not in known}
    fixed = sorted(set(known) - set(differing))
    assert not unexpected, f"answers that differ from MetricFlow's: {json.dumps(unexpected, indent=1)}"
    assert not fixed, f"these now agree with MetricFlow: remove them from KNOWN_DIFFERENCES: {fixed}"


def test_metric_answers_agree_with_metricflow_except_the_known_differences(tutorial: Runtime) -> None:
    home, project = tutorial.settings.state_dir, tutorial.settings.project
    _compare("tutorial", _answers(home, project, project.parent / "stdio-audit.jsonl", _reference("tutorial")))


def test_the_demo_metrics_agree_with_their_metricflow_translation(demo_home: Path, tmp_path: Path) -> None:
    """The demo's own definitions, as shipped, answer as MetricFlow answers their translation."""
    _compare("demo", _answers(demo_home, REPO, tmp_path / "audit.jsonl", _reference("demo")))


def test_the_translated_demo_imports_with_nothing_left_out(tmp_path: Path) -> None:
    project = copy_demo_project(tmp_path / "project")
    manifest = REFERENCES / "demo" / "inputs" / "semantic_manifest.json"
    tables = [
        "--table",
        "orders=sales.orders",
        "--table",
        "customers=sales.customers",
        "--table",
        "refunds=finance.refunds",
    ]
    arguments = ["--project", str(project), "metrics", "import", "dbt", str(manifest), *tables, "--dry-run", "--json"]
    done = CliRunner().invoke(cli, arguments)
    assert done.exit_code == 0, done.output
    report = json.loads(done.output)
    assert report["notes"] == [], report["notes"]


def test_a_second_import_of_the_same_manifest_changes_nothing(tutorial: Runtime) -> None:
    metrics_file = tutorial.settings.project / "catalog" / "metrics.yaml"
    before = metrics_file.read_text()
    tables = _import_options()
    again = CliRunner().invoke(
        cli,
        ["--project", str(tutorial.settings.project), "metrics", "import", "dbt", str(FIXTURES / "inputs"), *tables],
    )
    assert again.exit_code != 0 and "semantic_manifest" in again.output  # a directory needs target/
    again = CliRunner().invoke(
        cli,
        [
            "--project",
            str(tutorial.settings.project),
            "metrics",
            "import",
            "dbt",
            str(FIXTURES / "inputs" / "semantic_manifest.json"),
            *tables,
            "--json",
        ],
    )
    assert again.exit_code == 0, again.output
    report = json.loads(again.output)
    assert report["changed"] is False and metrics_file.read_text() == before
    # Nothing of MetricFlow's tutorial (and the extras) is left untranslated: saved queries included.
    assert report["notes"] == [], report["notes"]
    saved = {query["name"] for query in yaml.safe_load(metrics_file.read_text())["saved_queries"]}
    assert saved == {"core_transaction_metrics", "cumulative_transaction_metrics"}


def test_without_the_time_spines_days_a_metric_that_joins_to_it_is_not_imported(tmp_path: Path) -> None:
    project = copy_demo_project(tmp_path / "project")
    (project / "catalog" / "metrics.yaml").write_text("semantic_models: []\nmetrics: []\n")
    tables = [argument for model, table in TABLES.items() for argument in ("--table", f"{model}={table}")]
    manifest = str(FIXTURES / "inputs" / "semantic_manifest.json")
    arguments = ["--project", str(project), "metrics", "import", "dbt", manifest, *tables, "--dry-run", "--json"]
    report = json.loads(CliRunner().invoke(cli, arguments).output)
    dropped = {note["where"]: note for note in report["notes"] if note["kind"] == "dropped"}
    assert "--time-spine" in dropped["metric transactions_filled"]["what"] and report["written"] is False
    # What is not translated is named with the file and line it is defined at.
    extras = FIXTURES / "inputs" / "models" / "extra_metrics.yml"
    line = _line(extras, "transactions_filled")
    assert dropped["metric transactions_filled"]["location"] == f"models/extra_metrics.yml:{line}"


def _line(path: Path, name: str) -> int:
    return next(n for n, line in enumerate(path.read_text().splitlines(), 1) if line.strip() == f"- name: {name}")


def test_the_recorded_answers_are_of_the_definitions_and_queries_in_evals() -> None:
    """The fixtures are what evals/metricflow_reference.py made of evals/metricflow: an edited
    translation or query list needs the script run again (and MetricFlow's answers recorded)."""
    evals = REPO / "evals" / "metricflow"
    for project, queries, files in (
        ("tutorial", evals / "queries.yaml", [evals / "extra_metrics.yml"]),
        ("demo", evals / "demo" / "queries.yaml", sorted((evals / "demo").glob("*.yml"))),
    ):
        for file in files:
            recorded = REFERENCES / project / "inputs" / "models" / file.name
            assert recorded.read_text() == file.read_text(), f"rerun the reference script: {file} changed"
        asked = yaml.safe_load(queries.read_text())["queries"]
        answered = [answer["query"] for answer in _reference(project).values()]
        assert asked == answered, f"rerun the reference script: {queries} changed"
