"""`lakegate eval`: run the agent-eval scenarios against real servers and print a pass table.

By default the scenarios run against a fresh small demo warehouse built in a temporary directory:
they write (append, restore, add documents) and expect the demo's own values, so they are never
pointed at a real state directory unless `--home` says so.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from lakegate.server.cli.context import command_settings

if TYPE_CHECKING:
    from lakegate.evals.agent_eval import EvalReport, ScenarioResult

__all__ = ["eval_command"]


def _build_small_demo(home: Path, project: Path, err: Console) -> None:
    from lakegate.catalog.definitions import load_definitions
    from lakegate.catalog.demo import build_demo
    from lakegate.catalog.warehouse import Warehouse

    with err.status(f"building the small demo warehouse in {home}"):
        warehouse = Warehouse(home)
        try:
            summary = build_demo(warehouse, load_definitions(project), "small")
        finally:
            warehouse.close()
    err.print(f"built the small demo warehouse in {summary.seconds:.1f}s")


def _table(report: EvalReport) -> Table:
    table = Table(title=f"agent eval: {report.passed} passed, {report.failed} failed in {report.seconds:.0f}s")
    table.add_column("scenario", overflow="fold", ratio=3)
    table.add_column("principal", no_wrap=True, min_width=7)
    table.add_column("steps", no_wrap=True, min_width=5)
    table.add_column("result", no_wrap=True, min_width=6)
    table.add_column("reason", overflow="fold", ratio=4)
    for result in report.scenarios:
        outcome = "[green]pass[/green]" if result.passed else "[red]FAIL[/red]"
        table.add_row(
            result.name, result.principal, f"{result.steps_run}/{result.steps}", outcome, escape(result.reason or "")
        )
    return table


@click.command("eval")
@click.option(
    "--scenarios",
    "scenarios_dir",
    type=click.Path(file_okay=False, exists=True, path_type=Path),
    default=None,
    help="Directory of scenario files (*.yaml). Default: evals/scenarios.",
)
@click.option(
    "--json-out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Where to write the JSON report. Default: evals/results/agent_eval.json.",
)
@click.option("-k", "keyword", default=None, help="Only scenarios whose name, principal, file or tag contains this.")
@click.option(
    "--home",
    type=click.Path(file_okay=False, exists=True, path_type=Path),
    default=None,
    help="Run against this state directory instead of a fresh small demo. The scenarios write to it.",
)
@click.option(
    "--work",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Where the servers' logs and audit logs go. Default: a temporary directory, removed when all pass.",
)
@click.pass_context
def eval_command(
    ctx: click.Context,
    scenarios_dir: Path | None,
    json_out: Path | None,
    keyword: str | None,
    home: Path | None,
    work: Path | None,
) -> None:
    """Run the agent-eval scenarios over stdio, one server per principal; exit 1 on any failure."""
    from lakegate.evals.agent_eval import RESULTS_PATH, SCENARIOS_DIR, load_scenarios, run_eval, select

    out, err = Console(), Console(stderr=True)
    project = command_settings(ctx).project
    directory = scenarios_dir or SCENARIOS_DIR
    scenarios = select(load_scenarios(directory), keyword)
    if not scenarios:
        raise click.UsageError(f"No scenario in {directory} matches -k {keyword!r}.")
    temporary = work is None
    work = Path(tempfile.mkdtemp(prefix="lakegate-eval-")) if work is None else work
    if home is None:
        home = work / "home"
        _build_small_demo(home, project, err)
    with err.status(f"running {len(scenarios)} scenario(s)") as status:
        finished: list[ScenarioResult] = []

        def progress(result: ScenarioResult) -> None:
            finished.append(result)
            failed = sum(1 for r in finished if not r.passed)
            status.update(f"ran {len(finished)} of {len(scenarios)} scenario(s), {failed} failed")

        async def main() -> EvalReport:
            return await run_eval(
                scenarios, home, work / "run", project=project, scenarios_dir=directory, on_result=progress
            )

        report = anyio.run(main)
    out.print(_table(report))
    if not report.audit_verified:
        out.print(f"[red]audit log does not verify:[/red] {escape(report.audit_problem or '')}")
    target = json_out or RESULTS_PATH
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(report.model_dump_json(indent=1) + "\n", encoding="utf-8")
    err.print(f"wrote {target}")
    if report.ok:
        if temporary:
            shutil.rmtree(work, ignore_errors=True)
        return
    err.print(f"server logs and audit logs are in {work / 'run'}")
    ctx.exit(1)
