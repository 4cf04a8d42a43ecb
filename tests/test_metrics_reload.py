"""The server answers only with metric definitions that pass the offline checks (parse, lock,
compile): it refuses to start with invalid ones, and a hot reload of an invalid file keeps the last
valid definitions, says so in the log and in the audit record of the metric calls meanwhile."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from lakegate.catalog.live_metrics import CHECK_INTERVAL_S, CHECKED_FILE
from lakegate.errors import ConfigurationError
from lakegate.server.app import Runtime, open_runtime
from lakegate.server.settings import load_settings
from tests.conftest import REPO, gate_ok

REVENUE_V2_FILTER = "    filter: \"status <> 'cancelled'\"\n"


def _project(tmp_path: Path) -> Path:
    project = tmp_path / "project"
    shutil.copytree(REPO / "catalog", project / "catalog", ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    return project


def _open(project: Path, home: Path, tmp_path: Path) -> Runtime:
    audit = {"path": tmp_path / "audit.jsonl", "fsync": False}
    return open_runtime(load_settings(project, home=home, audit=audit, principal=None))


def _home(demo_home: Path, tmp_path: Path) -> Path:
    home = tmp_path / "home"
    shutil.copytree(demo_home, home)
    (home / CHECKED_FILE).unlink(missing_ok=True)  # start unchecked: the checks must run
    return home


def test_a_changed_definition_under_a_locked_version_refuses_to_start(demo_home: Path, tmp_path: Path) -> None:
    project = _project(tmp_path)
    metrics = project / "catalog" / "metrics.yaml"
    text = metrics.read_text()
    assert REVENUE_V2_FILTER in text
    metrics.write_text(text.replace(REVENUE_V2_FILTER, "    filter: \"status = 'delivered'\"\n"))
    with pytest.raises(ConfigurationError) as refused:
        _open(project, _home(demo_home, tmp_path), tmp_path)
    message = str(refused.value)
    assert "revenue v2" in message and "lakegate metrics lock" in message, message


def test_a_version_never_locked_refuses_to_start(demo_home: Path, tmp_path: Path) -> None:
    project = _project(tmp_path)
    metrics = project / "catalog" / "metrics.yaml"
    new_version = (
        "\n  - name: revenue\n    version: 3\n    type: simple\n    measure: order_total\n"
        "    description: Revenue of delivered orders.\n    owner: finance-data@lakegate.example\n"
        "    filter: \"status = 'delivered'\"\n"
    )
    text = metrics.read_text()
    at = text.index("  - name: orders\n    version: 1\n")
    metrics.write_text(text[:at] + new_version.lstrip("\n") + "\n" + text[at:])
    with pytest.raises(ConfigurationError, match=r"revenue v3"):
        _open(project, _home(demo_home, tmp_path), tmp_path)


def test_an_invalid_reload_keeps_the_last_valid_definitions(demo_home: Path, tmp_path: Path) -> None:
    project = _project(tmp_path)
    home = _home(demo_home, tmp_path)
    runtime = _open(project, home, tmp_path)
    assert (home / CHECKED_FILE).is_file()  # checked once: the next start with these files only compares
    metrics = project / "catalog" / "metrics.yaml"
    valid = metrics.read_text()
    arguments = {"metrics": ["revenue"], "group_by": ["order__status"]}
    try:
        before = gate_ok(runtime, "analyst", "query_metrics", arguments)["rows"]
        # Same version, another definition: not what the lock says.
        metrics.write_text(valid.replace(REVENUE_V2_FILTER, "    filter: \"status = 'delivered'\"\n"))
        time.sleep(CHECK_INTERVAL_S + 0.1)
        assert gate_ok(runtime, "analyst", "query_metrics", arguments)["rows"] == before
        # A valid change (a description is not part of a version) is taken.
        metrics.write_text(valid.replace("Revenue in USD, the sum", "Revenue in US dollars, the sum"))
        time.sleep(CHECK_INTERVAL_S + 0.1)
        described = gate_ok(runtime, "analyst", "describe_metric", {"name": "revenue"})
        assert "US dollars" in json.dumps(described)
    finally:
        runtime.close()
    records = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    metric_calls = [r for r in records if r["tool"] in ("query_metrics", "describe_metric")]
    assert [bool((r.get("details") or {}).get("metrics_reload_rejected")) for r in metric_calls] == [False, True, False]
    assert "revenue v2" in metric_calls[1]["details"]["metrics_reload_rejected"]
    assert str(project) not in metric_calls[1]["details"]["metrics_reload_rejected"]  # no server path
