"""The command line: init writes an editable project; flags fail with clear messages."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from lakegate.catalog.definitions import load_definitions
from lakegate.server.cli.main import cli


def test_init_writes_a_project_that_loads(tmp_path: Path) -> None:
    project = tmp_path / "acme"
    result = CliRunner().invoke(cli, ["init", str(project)])
    assert result.exit_code == 0, result.output
    written = ("lakegate.toml", "policies/model.conf", "policies/policy.csv", "policies/row_filters.yaml")
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
