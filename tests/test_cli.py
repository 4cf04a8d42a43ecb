"""The command line: init writes an editable project; flags fail with clear messages."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
from click.testing import CliRunner

from lakegate.catalog.definitions import load_definitions
from lakegate.evals.mcp_client import connect
from lakegate.server.cli.main import cli


def test_init_writes_a_project_that_loads(tmp_path: Path) -> None:
    project = tmp_path / "acme"
    result = CliRunner().invoke(cli, ["init", str(project)])
    assert result.exit_code == 0, result.output
    written = ("lakegate.toml", "policies/model.conf", "policies/policy.csv", "policies/row_filters.yaml")
    written += ("policies/scan_limits.yaml", "policies/quotas.yaml", "policies/approvals.yaml")
    for relative in (*written, "catalog/datasets.yaml"):
        assert (project / relative).is_file(), relative
    assert load_definitions(project).dataset("sales.orders") is not None
    again = CliRunner().invoke(cli, ["init", str(project)])
    assert again.exit_code == 0 and "kept" in again.output


def test_help_lists_the_commands() -> None:
    result = CliRunner().invoke(cli, ["--help"])
    assert result.exit_code == 0
    for command in ("init", "demo", "serve", "audit"):
        assert command in result.output


def test_serve_flags_that_do_not_go_together_are_refused(tmp_path: Path) -> None:
    http_with_principal = CliRunner().invoke(cli, ["--project", str(tmp_path), "serve", "--http", "--principal", "x"])
    assert http_with_principal.exit_code == 2 and "bearer token" in http_with_principal.output
    port_without_http = CliRunner().invoke(cli, ["--project", str(tmp_path), "serve", "--port", "9000"])
    assert port_without_http.exit_code == 2 and "go with --http" in port_without_http.output


def test_init_empty_writes_a_project_for_your_own_data_that_never_builds_the_demo(tmp_path: Path) -> None:
    project, home = tmp_path / "mine", tmp_path / "state"
    result = CliRunner().invoke(cli, ["init", str(project), "--empty"])
    assert result.exit_code == 0, result.output
    for relative in ("lakegate.toml", "policies/model.conf", "policies/policy.csv", "catalog/metrics.yaml"):
        assert (project / relative).is_file() and (project / relative).read_text().startswith("#"), relative
    assert load_definitions(project).datasets == ()  # no demo documentation
    assert "sales." not in (project / "policies" / "policy.csv").read_text()  # no demo rules
    validated = CliRunner().invoke(cli, ["--project", str(project), "metrics", "validate"])
    assert validated.exit_code == 0, validated.output

    async def scenario() -> tuple[list[str], dict[str, Any]]:
        # `me`, lakegate.toml's principal: an agent that may call the catalog tools and reads nothing yet.
        async with connect("me", home, project=project, LAKEGATE_AUDIT__PATH=str(tmp_path / "a.jsonl")) as client:
            tools = [tool.name for tool in (await client.list_tools()).tools]
            listed = await client.call_tool("list_datasets", {})
            return tools, listed.structured_content or {}

    tools, listed = anyio.run(scenario)
    assert "list_datasets" in tools and "append_rows" not in tools
    assert listed["datasets"] == []
    assert not list(home.rglob("*.parquet")) and not list(home.rglob("*.lance"))  # no demo built
