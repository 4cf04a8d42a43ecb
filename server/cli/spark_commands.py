"""`lakegate spark start|stop|status`: a local Spark cluster for development and tests.

The cluster (catalog/spark_cluster.py) keeps its state, token and logs in `<home>/spark`. `start`
prints the lakegate.toml lines that route queries to it; a production deployment points
`query.spark.remote` at the organisation's own Spark Connect endpoint instead.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import click
from rich.console import Console

from lakegate.errors import LakegateError
from lakegate.extras import require_extra
from lakegate.server.cli.context import command_settings

if TYPE_CHECKING:
    from lakegate.catalog.spark_cluster import LocalSparkCluster

__all__ = ["spark"]

out = Console()


def _cluster(ctx: click.Context) -> LocalSparkCluster:
    from lakegate.catalog.spark_cluster import LocalSparkCluster

    return LocalSparkCluster(command_settings(ctx).state_dir / "spark")


@click.group("spark")
def spark() -> None:
    """Run a local Apache Spark cluster that governed queries can be routed to."""


@spark.command("start")
@click.option("--workers", default=1, show_default=True, help="Spark workers to start.")
@click.option("--worker-cores", default=1, show_default=True, help="Cores each worker offers.")
@click.option("--worker-memory", default="1g", show_default=True, help="Memory each worker offers (Spark's spelling).")
@click.option("--port", default=15002, show_default=True, help="Port of the Spark Connect server (on 127.0.0.1).")
@click.pass_context
def start(ctx: click.Context, workers: int, worker_cores: int, worker_memory: str, port: int) -> None:
    """Start a master, workers and a Spark Connect server on 127.0.0.1 (about a minute; ~1 GB each).

    The server takes a token drawn now and kept in <home>/spark/token; the lines printed at the end
    route queries to the cluster.
    """
    try:
        require_extra("spark", "lakegate spark start")
        cluster = _cluster(ctx)
        with out.status(f"starting Spark: a master, {workers} worker(s) and a Spark Connect server"):
            info = cluster.start(workers=workers, worker_cores=worker_cores, worker_memory=worker_memory, port=port)
    except LakegateError as exc:
        raise click.ClickException(str(exc)) from exc
    out.print(f"Spark Connect serves at {info.remote} (token in {info.token_file}).", soft_wrap=True)
    out.print("Route queries to it in lakegate.toml:\n")
    out.print(
        f'[query.spark]\nremote = "{info.remote}"\ntoken_file = "{info.token_file}"\n'
        'min_scan_bytes = "1GB"  # or datasets = ["sales.*"]',
        markup=False,
    )


@spark.command("stop")
@click.pass_context
def stop(ctx: click.Context) -> None:
    """Stop the cluster that `lakegate spark start` started here (and nothing else)."""
    cluster = _cluster(ctx)
    stopped = cluster.stop()
    out.print(f"stopped: {', '.join(stopped)}" if stopped else "no Spark cluster started here is running")


@spark.command("status")
@click.pass_context
def status(ctx: click.Context) -> None:
    """Say whether the local cluster's processes run, and where its Spark Connect server listens."""
    cluster = _cluster(ctx)
    info, running = cluster.info(), cluster.status()
    if info is None:
        out.print("no Spark cluster was started here (lakegate spark start starts one)")
        return
    for role, alive in running.items():
        out.print(f"{role}: {'running' if alive else 'stopped'} (pid {info.pids[role]})")
    out.print(f"Spark Connect: {info.remote}")
    if not all(running.values()):
        ctx.exit(1)
