"""`lakegate models`: the files made from the embedding model (the query encoder's ONNX graph)."""

from __future__ import annotations

import click
from rich.console import Console

from lakegate.server.cli.context import command_settings

__all__ = ["models"]


@click.group("models")
def models() -> None:
    """Build or check the query encoder's ONNX graph (<home>/models/), which lets the server embed
    search queries without torch."""


@models.command("build")
@click.pass_context
def build(ctx: click.Context) -> None:
    """Export the graph from the pinned model (loads torch, ~5 s) and write it with its hash."""
    from lakegate.catalog.embedder import get_embedder
    from lakegate.catalog.query_encoder import onnx_available
    from lakegate.catalog.query_graph import GRAPH_DIR, build_query_graph

    if not onnx_available():
        raise click.ClickException("the onnx extra is not installed: pip install 'lakegate[onnx]'")
    settings = command_settings(ctx)
    path = build_query_graph(settings.state_dir / GRAPH_DIR, get_embedder("cpu"))
    Console(highlight=False).print(f"wrote {path}")


@models.command("verify")
@click.pass_context
def verify(ctx: click.Context) -> None:
    """Check that the graph is there and hashes to its manifest (exit 1 if not)."""
    from lakegate.catalog.query_graph import GRAPH_DIR, graph_path, load_query_graph

    settings = command_settings(ctx)
    directory = settings.state_dir / GRAPH_DIR
    if load_query_graph(directory) is None:
        raise click.ClickException(
            f"{graph_path(directory)} is missing or does not verify: run `lakegate models build`"
        )
    Console(highlight=False).print(f"{graph_path(directory)}: verified")
