"""Embedding what search needs (queries, catalog descriptions) without torch, when it can be done.

A serving process embeds one query per search and the catalog's descriptions once: both run on the
query encoder's ONNX graph kept on disk (catalog/query_graph.py), so the server never imports torch
for them. Without the onnx extra, or on a GPU machine, the torch Embedder answers instead: the same
vectors within 1e-6.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import numpy.typing as npt
import structlog

from lakegate.catalog.embedder import DIMENSION, MODEL_NAME, MODEL_SHA256, default_model_dir, get_embedder
from lakegate.catalog.query_encoder import OnnxQueryEncoder, onnx_available
from lakegate.catalog.query_graph import build_query_graph, load_query_graph

__all__ = [
    "QueryEmbedder",
    "TextEncoder",
    "get_query_embedder",
    "query_embedder_unless_building",
]

log = structlog.get_logger(__name__)


class TextEncoder(Protocol):
    """What search needs of an embedding model."""

    @property
    def model_name(self) -> str: ...

    @property
    def model_hash(self) -> str: ...

    def embed(self, texts: Sequence[str]) -> npt.NDArray[np.float32]: ...

    def embed_query(self, text: str) -> npt.NDArray[np.float32]: ...


class QueryEmbedder:
    """The pinned model's vectors through its verified ONNX graph: no torch."""

    model_name = MODEL_NAME
    model_hash = MODEL_SHA256
    dimension = DIMENSION
    query_backend = "onnx"

    def __init__(self, graph: bytes, model_dir: Path) -> None:
        self._encoder = OnnxQueryEncoder(graph, model_dir)

    def embed_query(self, text: str) -> npt.NDArray[np.float32]:
        return self._encoder.encode(text)

    def embed(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        if not texts:
            return np.zeros((0, DIMENSION), dtype=np.float32)
        return self._encoder.encode_many(texts)


_encoders: dict[Path, TextEncoder] = {}
_lock = threading.Lock()


def get_query_embedder(models_dir: Path) -> TextEncoder:
    """The process-wide encoder for search: the ONNX graph in `models_dir` when it verifies (built
    there first, with torch, when it is missing or does not verify), else the torch Embedder.

    Raises:
        ConfigurationError: the model cannot be loaded at all.
        ModelIntegrityError: the weights are not the pinned ones.
    """
    with _lock:
        found = _encoders.get(models_dir)
        if found is not None:
            return found
        encoder: TextEncoder | None = None
        if onnx_available():
            graph = load_query_graph(models_dir)
            if graph is None:
                embedder = get_embedder()
                if embedder.device == "cpu":
                    try:
                        build_query_graph(models_dir, embedder)
                    except (OSError, RuntimeError) as exc:  # torch still answers; the log says why
                        log.warning("query_graph.build_failed", error=str(exc))
                    graph = load_query_graph(models_dir)
            if graph is not None:
                encoder = QueryEmbedder(graph, default_model_dir())
        _encoders[models_dir] = encoder if encoder is not None else get_embedder()
        return _encoders[models_dir]


def query_embedder_unless_building(models_dir: Path) -> TextEncoder | None:
    """The encoder, without waiting for another thread that is building it (the start-up warm-up
    exporting the graph with torch, seconds on a fresh state directory): None then. When nobody is
    building it, it is built here, as `get_query_embedder` does.

    Raises:
        ConfigurationError: the model cannot be loaded at all.
        ModelIntegrityError: the weights are not the pinned ones.
    """
    found = _encoders.get(models_dir)
    if found is not None:
        return found
    if not _lock.acquire(blocking=False):
        return None
    _lock.release()
    return get_query_embedder(models_dir)
