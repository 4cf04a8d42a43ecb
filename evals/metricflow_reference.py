"""The reference set: dbt MetricFlow's own answers, recorded as test fixtures.

    python -m lakegate.evals.metricflow_reference --mf-bin /tmp/mfvenv/bin [--project tutorial|demo]

MetricFlow is the reference for what a metric means (issue 17). It is not a dependency of lakegate:
install it into a venv of its own (it pins its own dbt-core), e.g.

    python3 -m venv /tmp/mfvenv
    /tmp/mfvenv/bin/pip install "dbt-metricflow[dbt-duckdb]==0.15.0" "dbt-core==1.11.16"

Two reference projects, each with its queries:
- `tutorial`: MetricFlow's tutorial project (`mf tutorial`, offline) with
  evals/metricflow/extra_metrics.yml (one of each construct the tutorial lacks), and
  evals/metricflow/queries.yaml;
- `demo`: lakegate's demo metrics translated by hand to MetricFlow (evals/metricflow/demo/), over
  the rows of the small demo warehouse, which this script builds and writes as dbt seeds, with
  evals/metricflow/demo/queries.yaml.
It seeds and builds the project on DuckDB with dbt, runs every query with `mf query ... --csv`,
and writes to tests/fixtures/metricflow/<project>/ (or --out):
- answers.json: per query, the query and MetricFlow's columns and rows (or the error it gave);
- the inputs: the seed CSVs, the semantic YAML files and dbt's target/semantic_manifest.json.
The suite compares lakegate's answers with these (tests/test_metricflow_reference.py) and never
needs MetricFlow. Rerun after changing the queries, the metrics or the demo's rows, and commit the
result.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import yaml
from rich.progress import Progress

REPO = Path(__file__).resolve().parents[1]
HERE = REPO / "evals" / "metricflow"
FIXTURES = REPO / "tests" / "fixtures" / "metricflow"
#: The demo's time spine for MetricFlow: every day its rows may fall on, and the months a trailing
#: window or an offset reads after them.
DEMO_SPINE = ("2020-01-01", "2028-01-01")
#: The demo's tables as dbt seeds: the columns its semantic models read (no personal data).
DEMO_SEEDS = {
    "orders": ("sales.orders", ["order_id", "customer_id", "order_ts", "status", "channel", "region", "total_amount"]),
    "customers": ("sales.customers", ["customer_id", "region", "segment", "country", "signup_date"]),
    "refunds": ("finance.refunds", ["refund_id", "order_id", "refunded_ts", "amount", "reason"]),
}
#: MetricFlow and dbt, offline and without telemetry.
QUIET_ENV = {"DO_NOT_TRACK": "1", "DBT_SEND_ANONYMOUS_USAGE_STATS": "False", "MF_DISABLE_TELEMETRY": "1"}


def _run(command: list[str], cwd: Path, bin_dir: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **QUIET_ENV, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def _checked(command: list[str], cwd: Path, bin_dir: Path) -> None:
    done = _run(command, cwd, bin_dir)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")


def build_project(root: Path, bin_dir: Path) -> Path:
    """MetricFlow's tutorial project with the extra metrics, seeded and built; returns its directory."""
    _checked(["mf", "tutorial", "--yes"], root, bin_dir)
    project = root / "mf_tutorial_project"
    shutil.copy(HERE / "extra_metrics.yml", project / "models" / "sample_model" / "extra_metrics.yml")
    for step in (["dbt", "seed"], ["dbt", "build"], ["dbt", "parse"]):
        _checked([*step, "--profiles-dir", "."], project, bin_dir)
    return project


def build_demo_project(root: Path, bin_dir: Path) -> Path:
    """lakegate's demo metrics as a MetricFlow project over the small demo's rows; returns its directory."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.csv as pa_csv

    from lakegate.catalog.definitions import load_definitions
    from lakegate.catalog.demo import build_demo
    from lakegate.catalog.warehouse import Warehouse

    project = root / "lakegate_demo"
    (project / "seeds").mkdir(parents=True)
    (project / "models").mkdir()
    warehouse = Warehouse(root / "home")
    try:
        build_demo(warehouse, load_definitions(REPO), "small")
        for name, (table, columns) in DEMO_SEEDS.items():
            rows = warehouse.iceberg.load_table(table).scan(selected_fields=tuple(columns)).to_arrow()
            rows = rows.select(columns).sort_by([(columns[0], "ascending")])
            typed = []  # the seed's times as times again in the model (a seed may read them as text)
            for i, field in enumerate(rows.schema):  # UTC wall-clock times, as lakegate's sandboxes read them
                if pa.types.is_timestamp(field.type) and field.type.tz is not None:
                    rows = rows.set_column(i, field.name, pc.cast(rows[field.name], pa.timestamp("us")))
                if pa.types.is_timestamp(field.type) or pa.types.is_date(field.type):
                    kind = "timestamp" if pa.types.is_timestamp(field.type) else "date"
                    typed.append(f"cast({field.name} as {kind}) as {field.name}")
            pa_csv.write_csv(rows, project / "seeds" / f"{name}_seed.csv")
            replace = f" replace ({', '.join(typed)})" if typed else ""
            (project / "models" / f"{name}.sql").write_text(f"select *{replace} from {{{{ ref('{name}_seed') }}}}\n")
    finally:
        warehouse.close()
    (project / "dbt_project.yml").write_text(
        "name: lakegate_demo\nversion: 1.0.0\nconfig-version: 2\nprofile: lakegate_demo\n"
        'model-paths: ["models"]\nseed-paths: ["seeds"]\n'
    )
    (project / "profiles.yml").write_text(
        "lakegate_demo:\n  target: dev\n  outputs:\n    dev:\n      type: duckdb\n"
        f"      path: '{project / 'demo.duckdb'}'\n"
    )
    start, end = DEMO_SPINE
    (project / "models" / "all_days.sql").write_text(
        f"select cast(range as date) as date_day from range(DATE '{start}', DATE '{end}', INTERVAL 1 DAY)\n"
    )
    (project / "models" / "_models.yml").write_text(
        "models:\n  - name: all_days\n    time_spine:\n      standard_granularity_column: date_day\n"
        "    columns:\n      - name: date_day\n        granularity: day\n"
    )
    for file in ("semantic_models.yml", "metrics.yml", "saved_queries.yml"):
        shutil.copy(HERE / "demo" / file, project / "models" / file)
    for step in (["dbt", "seed"], ["dbt", "build"], ["dbt", "parse"]):
        _checked([*step, "--profiles-dir", "."], project, bin_dir)
    return project


def mf_arguments(query: dict[str, Any]) -> list[str]:
    """`mf query` options for one query of queries.yaml."""
    if "saved_query" in query:
        return ["--saved-query", query["saved_query"]]
    arguments = ["--metrics", ",".join(query["metrics"])]
    if query.get("group_by"):
        arguments += ["--group-by", ",".join(query["group_by"])]
    for condition in query.get("where", []):
        arguments += ["--where", condition]
    if query.get("order_by"):
        arguments += ["--order", ",".join(query["order_by"])]
    if "limit" in query:
        arguments += ["--limit", str(query["limit"])]
    for key in ("start_time", "end_time"):
        if key in query:
            arguments += [f"--{key.replace('_', '-')}", query[key]]
    return arguments


def _value(text: str) -> Any:
    """A CSV cell as JSON: empty is null, numbers are numbers, anything else stays text."""
    if text == "":
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            continue
    if text in ("True", "False"):
        return text == "True"
    return text


def answer(project: Path, bin_dir: Path, query: dict[str, Any], scratch: Path) -> dict[str, Any]:
    """MetricFlow's answer to one query: columns and rows, or the error it gave."""
    output = scratch / f"{query['id']}.csv"
    done = _run(["mf", "query", *mf_arguments(query), "--csv", str(output)], project, bin_dir)
    if done.returncode != 0 or not output.exists():
        message = (done.stdout + done.stderr).strip().splitlines()
        return {"error": "\n".join(line for line in message if line.strip())[-2000:]}
    with output.open(newline="") as handle:
        table = list(csv.reader(handle))
    return {"columns": table[0], "rows": [[_value(cell) for cell in row] for row in table[1:]]}


def copy_inputs(project: Path, out: Path) -> None:
    inputs = out / "inputs"
    shutil.rmtree(inputs, ignore_errors=True)
    (inputs / "seeds").mkdir(parents=True)
    (inputs / "models").mkdir()
    for seed in sorted((project / "seeds").rglob("*.csv")):
        shutil.copy(seed, inputs / "seeds" / seed.name)
    for model in sorted((project / "models").rglob("*.yml")):
        shutil.copy(model, inputs / "models" / model.name)
    shutil.copy(project / "target" / "semantic_manifest.json", inputs / "semantic_manifest.json")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mf-bin", type=Path, required=True, help="bin directory of a venv with dbt-metricflow")
    parser.add_argument("--project", choices=("tutorial", "demo"), default="tutorial", help="which reference project")
    parser.add_argument("--out", type=Path, help="where answers.json and inputs/ go (default: the test fixtures)")
    args = parser.parse_args(argv)
    args.out = args.out or FIXTURES / args.project
    demo = args.project == "demo"
    queries = yaml.safe_load((HERE / ("demo" if demo else ".") / "queries.yaml").read_text())["queries"]
    with tempfile.TemporaryDirectory(prefix="lakegate-mf-") as temporary:
        root = Path(temporary)
        project = (build_demo_project if demo else build_project)(root, args.mf_bin.resolve())
        answers = {}
        with Progress() as progress:
            task = progress.add_task("mf query", total=len(queries))
            for query in queries:
                answers[query["id"]] = {"query": query, **answer(project, args.mf_bin.resolve(), query, root)}
                progress.advance(task)
        args.out.mkdir(parents=True, exist_ok=True)
        copy_inputs(project, args.out)
    versions = _run(["pip", "freeze"], Path("."), args.mf_bin.resolve()).stdout.splitlines()
    reference = {
        "reference": "lakegate's demo metrics in evals/metricflow/demo/, over the small demo's rows"
        if demo
        else "dbt MetricFlow tutorial project + evals/metricflow/extra_metrics.yml",
        "versions": sorted(
            line for line in versions if line.split("==")[0] in ("dbt-metricflow", "dbt-core", "dbt-duckdb")
        ),
        "answers": answers,
    }
    (args.out / "answers.json").write_text(json.dumps(reference, indent=1, sort_keys=False) + "\n")
    failed = [name for name, found in answers.items() if "error" in found]
    print(f"{len(answers)} queries, {len(failed)} refused by MetricFlow: {', '.join(failed) or 'none'}")


if __name__ == "__main__":
    main()
