"""lakegate as a user installs it: one top-level package, not shadowed by folders of the same names
as its sub-packages, and a core that serves without its optional extras."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import anyio
import pytest
from mcp import Client
from mcp.client.stdio import StdioServerParameters
from mcp.types import Implementation

from lakegate.evals.mcp_client import text_of
from lakegate.extras import EXTRAS, MissingExtra, require_extra

REPO = Path(__file__).resolve().parents[1]
LAKEGATE = Path(sys.executable).parent / "lakegate"


def _checkout(target: Path) -> Path:
    """The project's files as git sees them (tracked, and new ones it does not ignore)."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout.decode()
    for name in filter(None, listed.split("\0")):
        source = REPO / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            (target / name).write_bytes(source.read_bytes())
    return target


def test_the_wheel_installs_one_top_level_package_with_its_data(tmp_path: Path) -> None:
    source = _checkout(tmp_path / "src")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(source),
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("lakegate-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {name.split("/")[0] for name in names if ".dist-info/" not in name} == {"lakegate"}
    for expected in (
        "lakegate/__init__.py",
        "lakegate/__main__.py",
        "lakegate/errors.py",
        "lakegate/py.typed",
        "lakegate/server/cli/main.py",
        "lakegate/server/default_lakegate.toml",
        "lakegate/server/audit/report.html.j2",
        "lakegate/server/audit/report.js",
        "lakegate/tools/descriptions/query.md",
        "lakegate/policies/model.conf",
        "lakegate/policies/policy.csv",
        "lakegate/catalog/datasets.yaml",
        "lakegate/catalog/metrics.yaml",
    ):
        assert expected in names, expected
    entry_points = next(name for name in names if name.endswith(".dist-info/entry_points.txt"))
    assert "lakegate = lakegate.server.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


@pytest.mark.parametrize("how", ["console_script", "python_-m"])
def test_folders_named_like_its_sub_packages_do_not_shadow_lakegate(tmp_path: Path, demo_home: Path, how: str) -> None:
    """With packages named tools, server and catalog in the working directory and on PYTHONPATH,
    the installed lakegate still starts, lists its tools and runs a query (in its worker)."""
    for name in ("tools", "server", "catalog", "policies", "evals"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text(f"raise ImportError('this is not lakegate: {name}')\n")
    command = [str(LAKEGATE)] if how == "console_script" else [sys.executable, "-m", "lakegate"]
    env = {
        **os.environ,
        "PYTHONPATH": str(tmp_path),
        "LAKEGATE_HOME": str(demo_home),
        "LAKEGATE_AUDIT__PATH": str(tmp_path / "audit.jsonl"),
        "LAKEGATE_PRINCIPAL": "",
        "HF_HUB_OFFLINE": "1",
    }
    params = StdioServerParameters(
        command=command[0],
        args=[*command[1:], "--project", str(REPO), "serve", "--principal", "analyst"],
        env=env,
        cwd=str(tmp_path),
    )

    async def scenario() -> tuple[set[str], str]:
        client = Client(params, client_info=Implementation(name="shadow-test", version="1"), read_timeout_seconds=120)
        async with client:
            tools = {tool.name for tool in (await client.list_tools()).tools}
            answer = await client.call_tool("query", {"sql": "SELECT count(*) FROM sales.orders"})
            return tools, text_of(answer)

    tools, answer = anyio.run(scenario)
    assert {"query", "list_datasets"} <= tools
    assert "5000" in answer


def test_a_missing_extra_names_the_command_that_installs_it(monkeypatch: pytest.MonkeyPatch) -> None:
    for extra, modules in EXTRAS.items():
        require_extra(extra, "a test")  # the dev install has every extra
        monkeypatch.setitem(sys.modules, modules[0], None)  # what an absent module looks like to import
        with pytest.raises(MissingExtra, match=rf"pip install 'lakegate\[{extra}\]'") as raised:
            require_extra(extra, "A feature")
        assert str(raised.value).startswith("A feature needs lakegate's optional")
        monkeypatch.delitem(sys.modules, modules[0])


#: Run in a fresh interpreter with every extra's modules made unimportable, as on a core install.
CORE_ONLY = textwrap.dedent(
    """
    import sys
    from lakegate.extras import EXTRAS
    for modules in EXTRAS.values():
        for module in modules:
            if module not in ("starlette", "uvicorn", "jwt"):  # the MCP SDK itself needs these
                sys.modules[module] = None
    from click.testing import CliRunner
    from lakegate.server.cli import main
    from lakegate.server.cli.main import cli

    runner = CliRunner()
    for args in (["serve", "--http"], ["audit", "report", "-o", sys.argv[2]], ["--help"]):
        result = runner.invoke(cli, ["--project", sys.argv[1], *args])
        shown = result.output + str(result.exception or "")  # main() prints a LakegateError's message
        print("EXIT", args[0], args[1] if len(args) > 1 else args[0], result.exit_code, shown.replace("\\n", " "))

    import anyio
    from lakegate.server.app import open_runtime
    from lakegate.server.gate.identity import CallOrigin, stdio_principal
    from lakegate.server.settings import load_settings

    runtime = open_runtime(load_settings(sys.argv[1]))
    origin = CallOrigin(transport="in-process", session_id="core")
    for who, tool, arguments in (
        ("analyst", "query", {"sql": "SELECT count(*) FROM sales.orders"}),
        ("support_agent", "search_documents", {"query": "refund for a damaged parcel", "k": 2}),
    ):
        outcome = anyio.run(runtime.gate.call, tool, arguments, stdio_principal(who, runtime.enforcer), origin)
        print("CALL", tool, outcome.error is None, outcome.text.replace("\\n", " ")[:200])
    runtime.close()
    try:
        open_runtime(load_settings(sys.argv[1], profile="production", postgres={"url": "postgresql://u@127.0.0.1:1/x"}))
    except Exception as exc:
        print("PRODUCTION", type(exc).__name__, exc)
    """
)


def test_the_core_runs_without_the_extras_and_says_which_one_a_feature_needs(tmp_path: Path, demo_home: Path) -> None:
    env = {**os.environ, "LAKEGATE_HOME": str(demo_home), "LAKEGATE_AUDIT__PATH": str(tmp_path / "a.jsonl")}
    command = [sys.executable, "-c", CORE_ONLY, str(REPO), str(tmp_path / "report.html")]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    lines = {
        line.split()[1] + " " + line.split()[2]: line for line in done.stdout.splitlines() if line.startswith("EXIT")
    }
    assert "pip install 'lakegate[http]'" in lines["serve --http"], done.stdout
    assert "pip install 'lakegate[report]'" in lines["audit report"] and lines["audit report"].split()[3] == "1"
    assert lines["--help --help"].split()[3] == "0", done.stdout
    calls = [line for line in done.stdout.splitlines() if line.startswith("CALL")]
    assert [line.split()[1:3] for line in calls] == [["query", "True"], ["search_documents", "True"]], done.stdout
    assert "5000" in calls[0]  # governed SQL in its worker; the search embedded through torch
    assert "MissingExtra" in done.stdout and "pip install 'lakegate[postgres]'" in done.stdout, done.stdout
