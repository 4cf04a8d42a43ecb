"""The query encoder's ONNX graph on disk: built once where torch is loaded anyway, verified before
every load, so that serving never imports torch.

The graph is exported from the pinned model (catalog/embedder.py checks the weights' SHA-256 before
torch reads them) and kept in the state directory's `models/` folder, named by the model's pinned
hash, beside a manifest that holds the graph's own SHA-256:

    <home>/models/all-MiniLM-L6-v2-<model sha256[:16]>.onnx
    <home>/models/all-MiniLM-L6-v2-<model sha256[:16]>.onnx.json   {"model_sha256", "graph_sha256", "opset", ...}

Loading reads the manifest, checks that it names the pinned model, hashes the graph and compares:
a graph that does not verify is never loaded (the caller rebuilds it, or falls back to torch).
`lakegate demo`, ingest and `lakegate models build` build it; the server builds it in its start-up
warm-up when it is missing.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

from lakegate.catalog.embedder import MODEL_SHA256
from lakegate.catalog.query_encoder import OPSET, export_graph

if TYPE_CHECKING:
    from lakegate.catalog.embedder import Embedder

__all__ = ["GRAPH_DIR", "build_query_graph", "ensure_query_graph", "graph_path", "load_query_graph"]

log = structlog.get_logger(__name__)

#: Under the state directory.
GRAPH_DIR = "models"


def graph_path(directory: Path) -> Path:
    """Where the graph of the pinned model lives in `directory` (its manifest: + ".json")."""
    return directory / f"all-MiniLM-L6-v2-{MODEL_SHA256[:16]}.onnx"


def _manifest_path(graph: Path) -> Path:
    return graph.with_name(graph.name + ".json")


def _write_atomically(path: Path, data: bytes) -> None:
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    temporary.write_bytes(data)
    os.replace(temporary, path)


def build_query_graph(directory: Path, embedder: Embedder) -> Path:
    """Export the query encoder of `embedder` (a CPU one) to `directory`, with its manifest; the graph
    is written before the manifest that vouches for it, each atomically.

    Raises:
        RuntimeError: the export fails.
        OSError: the directory cannot be written.
    """
    graph = export_graph(embedder.model)
    directory.mkdir(parents=True, exist_ok=True)
    path = graph_path(directory)
    _write_atomically(path, graph)
    manifest = {
        "model": embedder.model_name,
        "model_sha256": embedder.model_hash,
        "graph_sha256": hashlib.sha256(graph).hexdigest(),
        "opset": OPSET,
        "built_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    _write_atomically(_manifest_path(path), json.dumps(manifest, indent=1).encode())
    log.info("query_graph.built", path=str(path), bytes=len(graph))
    return path


def load_query_graph(directory: Path) -> bytes | None:
    """The graph's bytes, if it is there and verifies (the pinned model's, and hashing to what its
    manifest says); None otherwise, with a warning saying why when it is there but does not verify."""
    path = graph_path(directory)
    try:
        manifest = json.loads(_manifest_path(path).read_bytes())
        graph = path.read_bytes()
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("query_graph.unreadable", path=str(path), error=str(exc))
        return None
    if not isinstance(manifest, dict) or manifest.get("model_sha256") != MODEL_SHA256:
        log.warning("query_graph.rejected", path=str(path), reason="not made from the pinned model")
        return None
    if hashlib.sha256(graph).hexdigest() != manifest.get("graph_sha256"):
        log.warning("query_graph.rejected", path=str(path), reason="the graph does not hash to its manifest's hash")
        return None
    return graph


def ensure_query_graph(directory: Path, embedder: Embedder) -> bool:
    """Build the graph in `directory` unless one there verifies; for callers that load torch anyway
    (the demo build, ingest). Returns whether a verified graph is there now. Nothing is built without
    the onnx extra, or from a model on a GPU (the graph is exported from the CPU model).
    """
    from lakegate.catalog.query_encoder import onnx_available

    if not onnx_available() or embedder.device != "cpu":
        return False
    if load_query_graph(directory) is None:
        try:
            build_query_graph(directory, embedder)
        except (OSError, RuntimeError) as exc:  # search falls back to torch; the log says why
            log.warning("query_graph.build_failed", error=str(exc))
            return False
    return True
