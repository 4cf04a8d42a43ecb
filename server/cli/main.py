"""The `lakegate` command line: init, demo, serve, audit, metrics, ingest."""

from __future__ import annotations

import importlib
import shutil
import sys
from importlib import resources
from pathlib import Path
from typing import Any

import anyio
import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from lakegate.errors import LakegateError
from lakegate.extras import require_extra
from lakegate.server.cli.context import command_settings as _settings
from lakegate.server.settings import CONFIG_FILE, Settings

__all__ = ["main"]

err = Console(stderr=True)
#: How long shutting down waits for a start-up warm-up still running.
WARM_UP_JOIN_S = 60.0


#: The command groups kept in their own modules, imported only when one is run (or `--help` lists
#: them), so that `serve` does not pay for the imports of the others before it answers a client.
LAZY_COMMANDS = {
    "audit": "lakegate.server.cli.audit_commands:audit",
    "catalog": "lakegate.server.cli.catalog_commands:catalog",
    "changes": "lakegate.server.cli.change_commands:changes",
    "eval": "lakegate.server.cli.eval_commands:eval_command",
    "ingest": "lakegate.server.cli.ingest_commands:ingest",
    "metrics": "lakegate.server.cli.metrics_commands:metrics",
    "models": "lakegate.server.cli.models_command:models",
    "policy": "lakegate.server.cli.policy_commands:policy",
    "profile": "lakegate.server.cli.profile_commands:profile",
    "spark": "lakegate.server.cli.spark_commands:spark",
    "table": "lakegate.server.cli.table_commands:table",
    "token": "lakegate.server.cli.token_command:token",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*super().list_commands(ctx), *LAZY_COMMANDS])

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in LAZY_COMMANDS:
            return super().get_command(ctx, cmd_name)
        module, name = LAZY_COMMANDS[cmd_name].split(":")
        command: click.Command = getattr(importlib.import_module(module), name)
        return command


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--project",
    type=click.Path(file_okay=False, path_type=Path),
    envvar="LAKEGATE_PROJECT",
    default=None,
    help="Project directory (lakegate.toml, policies/, catalog/). Default: $LAKEGATE_PROJECT or the current directory.",
)
@click.version_option(package_name="lakegate")
@click.pass_context
def cli(ctx: click.Context, project: Path | None) -> None:
    """lakegate: a governed MCP server over Iceberg tables and Lance datasets.

    \b
    Quick start (embedded, nothing to install beyond this package):
      lakegate demo                      build the demo warehouse in ./.lakegate
      lakegate serve --principal analyst serve MCP over stdio as 'analyst'
      lakegate audit verify              check the audit log's hash chain
    """
    ctx.ensure_object(dict)
    ctx.obj["project"] = project

    if ctx.invoked_subcommand == "audit":
        ctx.obj["audit_path"] = _settings(ctx).audit_path


@cli.command()
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option("--force", is_flag=True, help="Overwrite files that already exist.")
@click.option(
    "--empty",
    is_flag=True,
    help="A project for your own data: no demo documentation, rules or metrics, never the demo "
    "warehouse; each file explains itself in comments.",
)
def init(directory: Path, force: bool, empty: bool) -> None:
    """Write lakegate.toml, the policies and the catalog definitions into DIRECTORY to edit
    (the demo's, or with --empty a starting point for your own data)."""
    policies = resources.files("lakegate.policies")
    if empty:
        starter = resources.files("lakegate.server").joinpath("empty_project")
        files = {
            Path(CONFIG_FILE): starter.joinpath("lakegate.toml"),
            Path("policies/model.conf"): policies.joinpath("model.conf"),
            Path("policies/policy.csv"): starter.joinpath("policy.csv"),
            Path("policies/row_filters.yaml"): starter.joinpath("row_filters.yaml"),
            Path("policies/scan_limits.yaml"): starter.joinpath("scan_limits.yaml"),
            Path("policies/quotas.yaml"): starter.joinpath("quotas.yaml"),
            Path("policies/approvals.yaml"): starter.joinpath("approvals.yaml"),
            Path("policies/column_review.yaml"): starter.joinpath("column_review.yaml"),
            Path("catalog/datasets.yaml"): starter.joinpath("datasets.yaml"),
            Path("catalog/metrics.yaml"): starter.joinpath("metrics.yaml"),
        }
    else:
        files = {
            Path(CONFIG_FILE): resources.files("lakegate.server").joinpath("default_lakegate.toml"),
            Path("policies/model.conf"): policies.joinpath("model.conf"),
            Path("policies/policy.csv"): policies.joinpath("policy.csv"),
            Path("policies/row_filters.yaml"): policies.joinpath("row_filters.yaml"),
            Path("policies/scan_limits.yaml"): policies.joinpath("scan_limits.yaml"),
            Path("policies/quotas.yaml"): policies.joinpath("quotas.yaml"),
            Path("policies/approvals.yaml"): policies.joinpath("approvals.yaml"),
            Path("policies/column_review.yaml"): policies.joinpath("column_review.yaml"),
            Path("catalog/datasets.yaml"): resources.files("lakegate.catalog").joinpath("datasets.yaml"),
        }
    for relative, source in files.items():
        target = directory / relative
        if target.exists() and not force:
            err.print(f"kept   {target} (exists; --force overwrites)")
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        with resources.as_file(source) as path:
            shutil.copyfile(path, target)
        err.print(f"wrote  {target}")
    gitignore = directory / ".gitignore"
    if not gitignore.exists():
        gitignore.write_text(".lakegate/\n")
    if empty:
        err.print(f"Next: cd {directory}, give roles read rules in policies/policy.csv, then `lakegate serve`.")
    else:
        err.print(f"Next: cd {directory} && lakegate serve --principal analyst")


def _build_demo(settings: Settings, scale: str) -> None:
    from lakegate.catalog.definitions import load_definitions
    from lakegate.catalog.demo import build_demo
    from lakegate.server.profile import open_warehouse

    warehouse = open_warehouse(settings)  # in the production profile, the catalog is in PostgreSQL
    try:
        with Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=err,
            transient=False,
        ) as progress:
            tasks: dict[str, Any] = {}

            def report(step: str, done: int, total: int) -> None:
                if step not in tasks:
                    tasks[step] = progress.add_task(step, total=total)
                progress.update(tasks[step], completed=done, total=total)

            summary = build_demo(warehouse, load_definitions(settings.project), scale, progress=report)  # type: ignore[arg-type]
    finally:
        warehouse.close()
    total = sum(summary.tables.values())
    datasets = len(summary.tables)
    err.print(f"demo warehouse ({scale}) built in {summary.seconds:.1f}s: {total:,} rows in {datasets} datasets")
    err.print(f"state directory: {settings.state_dir}")
    from lakegate.catalog.live_metrics import LiveMetrics
    from lakegate.errors import ConfigurationError

    try:
        LiveMetrics.open(settings.project, settings.state_dir)  # checked now, so that serve starts fast
    except ConfigurationError as exc:
        err.print(f"warning: {exc}", markup=False)


@cli.command()
@click.option(
    "--scale",
    type=click.Choice(["small", "large"]),
    default=None,
    help="small (default, seconds to build) or large (>= 10M orders, for benchmarks).",
)
@click.pass_context
def demo(ctx: click.Context, scale: str | None) -> None:
    """Build (or rebuild) the demo warehouse in the state directory."""
    settings = _settings(ctx)
    _build_demo(settings, scale or settings.demo_scale)


@cli.command()
@click.option(
    "--principal", default=None, help="Who is calling (stdio). Default: $LAKEGATE_PRINCIPAL or lakegate.toml."
)
@click.option("--http", is_flag=True, help="Serve MCP Streamable HTTP at /mcp (bearer tokens) instead of stdio.")
@click.option("--host", default=None, help="HTTP listen address. Default: $LAKEGATE_HTTP__HOST or 127.0.0.1.")
@click.option(
    "--port", type=click.IntRange(1, 65535), default=None, help="HTTP port. Default: $LAKEGATE_HTTP__PORT or 8765."
)
@click.pass_context
def serve(ctx: click.Context, principal: str | None, http: bool, host: str | None, port: int | None) -> None:
    """Serve MCP over stdio (or HTTP with --http), building the demo warehouse first if the state
    directory is empty."""
    from lakegate.server.app import open_runtime
    from lakegate.server.logs import configure_logging
    from lakegate.server.transports.serve import serve_stdio
    from lakegate.server.warm_up import start_warm_up

    if http:
        if principal is not None:
            raise click.UsageError("--principal is for stdio; over HTTP each request's bearer token names it.")
        listen = {key: value for key, value in (("host", host), ("port", port)) if value is not None}
        _serve_http(_settings(ctx, http=listen or None))
        return
    if host is not None or port is not None:
        raise click.UsageError("--host and --port go with --http.")
    settings = _settings(ctx, principal=principal)
    configure_logging(settings.log_level)
    _ensure_warehouse(settings)
    runtime = open_runtime(settings)
    warming = start_warm_up(runtime)  # in the background: initialize is answered at once
    who = settings.principal or "anonymous (no --principal: every call will be denied)"
    err.print(f"lakegate serving MCP over stdio as {who}; project {settings.project}.")
    err.print("Connect an MCP client to this process's stdin/stdout; Ctrl-D or closing the client stops it.")
    try:
        anyio.run(serve_stdio, runtime, settings.principal)
    finally:
        # Native libraries must not be torn down under a warm-up still loading them.
        warming.join(timeout=WARM_UP_JOIN_S)
        runtime.close()


def _ensure_warehouse(settings: Settings) -> None:
    from lakegate.server.profile import open_warehouse

    embedded_catalog = settings.state_dir / "iceberg" / "catalog.db"
    if settings.profile == "embedded" and settings.storage.backend == "local" and embedded_catalog.is_file():
        # Not a new state directory: no probe (opening the catalog imports pyiceberg, ~0.5 s, which
        # the start-up warm-up does in the background instead).
        return
    if not settings.build_demo or settings.catalogs:
        return  # a project that serves its own data, or attaches catalogs, never gets the demo
    probe = open_warehouse(settings)
    empty = probe.is_empty()
    probe.close()
    if empty:
        err.print("The state directory is empty: building the demo warehouse first.")
        _build_demo(settings, settings.demo_scale)


def _serve_http(settings: Settings) -> None:
    require_extra("http", "lakegate serve --http")  # before anything else: say what to install
    from lakegate.server.app import open_runtime
    from lakegate.server.logs import configure_logging
    from lakegate.server.transports.http_auth import JwtVerifier, resource_url
    from lakegate.server.transports.serve import serve_http
    from lakegate.server.warm_up import start_warm_up

    configure_logging(settings.log_level)
    verifier = JwtVerifier(settings)  # refuse to start without keys, before building anything
    _ensure_warehouse(settings)
    runtime = open_runtime(settings)
    warming = start_warm_up(runtime)
    err.print(f"lakegate serving MCP Streamable HTTP at {resource_url(settings)}; project {settings.project}.")
    err.print(
        f"Bearer tokens: {', '.join(verifier.algorithms)}, issuer {verifier.issuer}, audience {verifier.audience}. "
        "Ctrl-C stops it."
    )
    try:
        serve_http(runtime)
    finally:
        warming.join(timeout=WARM_UP_JOIN_S)
        runtime.close()


def main() -> None:
    try:
        cli(standalone_mode=True)
    except LakegateError as exc:
        err.print(f"error: {exc}")
        sys.exit(1)
