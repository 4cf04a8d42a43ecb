"""The command line: init writes an editable project; flags fail with clear messages."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from catalog.definitions import load_definitions
from server.cli import cli


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


def test_serve_http_is_refused_with_a_clear_message(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["--project", str(tmp_path), "serve", "--http"])
    assert result.exit_code == 2 and "--http is not available" in result.output
