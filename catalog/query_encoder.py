"""Single-query embedding on the CPU with ONNX Runtime, the same vectors as the ingest path.

Search embeds one short query per call, where torch's per-call overhead dominates (~25 ms here
against ~6-9 ms for ONNX Runtime). The ONNX graph is exported from the torch model the Embedder
loaded from verified weights (`export_graph`, ~2 s), where torch is loaded anyway, and kept on disk
with a hash of its own (catalog/query_graph.py), so that a serving process opens it without torch.
Tokenisation uses the model's own `tokenizer.json` with the same truncation as
sentence-transformers, and pooling (attention-masked mean, then L2 norm) is the model's: vectors
match the torch path within ~2e-7 (tests/test_query_encoder.py checks 1e-6).
"""

from __future__ import annotations

import copy
import io
import json
import threading
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["OPSET", "OnnxQueryEncoder", "export_graph", "onnx_available"]

_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
OPSET = 17


def onnx_available() -> bool:
    """Whether ONNX Runtime and the ONNX exporter are importable (the onnx extra: an optional
    speed-up, never required; without it queries embed through torch)."""
    from lakegate.extras import MissingExtra, require_extra

    try:
        require_extra("onnx", "query embedding on ONNX Runtime")
    except MissingExtra:
        return False
    return True


class OnnxQueryEncoder:
    """Embeds one text at a time through the ONNX graph of the sentence-transformers model."""

    def __init__(self, graph: bytes, model_dir: Path, *, threads: int = 1) -> None:
        """Open an ONNX Runtime session on `graph` (from `export_graph`, or verified from disk) with the
        model's own tokenizer and truncation, read from `model_dir`. Imports no torch.

        `threads` is ONNX Runtime's intra-op pool: one query is small, and the queries of several
        agents run side by side with DuckDB, so one thread each is the better default.

        Raises:
            ImportError: onnxruntime or tokenizers is missing.
            RuntimeError: the session cannot be created on the graph.
            OSError, ValueError: the tokenizer or the model's configuration cannot be read.
        """
        import onnxruntime as ort
        from tokenizers import Tokenizer

        self._tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        # The shipped tokenizer.json pads every input to 128 tokens; one query needs no padding.
        self._tokenizer.no_padding()
        config = json.loads((model_dir / "sentence_bert_config.json").read_text(encoding="utf-8"))
        self._tokenizer.enable_truncation(int(config["max_seq_length"]))  # as sentence-transformers does
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        self._session = ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])
        self._lock = threading.Lock()

    def encode_many(self, texts: Sequence[str], batch: int = 64) -> npt.NDArray[np.float32]:
        """The unit-length vectors of `texts`, `batch` at a time (padded within a batch, which the
        attention mask and the masked mean make invisible)."""
        vectors = []
        for start in range(0, len(texts), batch):
            with self._lock:
                encodings = self._tokenizer.encode_batch(list(texts[start : start + batch]))
            width = max(len(encoding.ids) for encoding in encodings)
            feed = {
                "input_ids": _padded([e.ids for e in encodings], width),
                "attention_mask": _padded([e.attention_mask for e in encodings], width),
                "token_type_ids": _padded([e.type_ids for e in encodings], width),
            }
            vectors.append(_pool(self._session.run(None, feed)[0], feed["attention_mask"]))
        return np.concatenate(vectors) if vectors else np.zeros((0, 0), dtype=np.float32)

    def encode(self, text: str) -> npt.NDArray[np.float32]:
        """The unit-length float32 vector of `text`."""
        with self._lock:  # the tokenizer's truncation state is shared; encoding is microseconds
            encoding = self._tokenizer.encode(text)
        feed = {
            "input_ids": np.asarray([encoding.ids], dtype=np.int64),
            "attention_mask": np.asarray([encoding.attention_mask], dtype=np.int64),
            "token_type_ids": np.asarray([encoding.type_ids], dtype=np.int64),
        }
        vector: npt.NDArray[np.float32] = _pool(self._session.run(None, feed)[0], feed["attention_mask"])[0]
        return vector


def _padded(rows: list[list[int]], width: int) -> npt.NDArray[np.int64]:
    return np.asarray([row + [0] * (width - len(row)) for row in rows], dtype=np.int64)


def _pool(hidden: npt.NDArray[np.float32], attention: npt.NDArray[np.int64]) -> npt.NDArray[np.float32]:
    """The model's pooling: the attention-masked mean of the hidden states, then unit length."""
    mask = attention[..., None].astype(np.float32)
    pooled = (hidden * mask).sum(axis=1) / np.clip(mask.sum(axis=1), 1e-9, None)
    norms = np.clip(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12, None)
    return np.asarray(pooled / norms, dtype=np.float32)


def export_graph(model: Any) -> bytes:
    """The ONNX graph (opset `OPSET`) of a CPU SentenceTransformer's transformer: token ids in,
    hidden states out (pooling is done by `OnnxQueryEncoder`). Loads torch.

    Raises:
        RuntimeError: the export fails.
    """
    import torch

    # Export a copy: tracing the live module leaves state behind in transformers' attention code
    # that changes what later direct calls of it compute (by ~5e-2 here).
    transformer = copy.deepcopy(model[0].auto_model).eval()

    class _Hidden(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.transformer = transformer

        def forward(self, input_ids: Any, attention_mask: Any, token_type_ids: Any) -> Any:
            output = self.transformer(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
            return output.last_hidden_state

    sample = model.tokenizer(["lakegate"], return_tensors="pt")
    buffer = io.BytesIO()
    axes = {"batch": 0, "tokens": 1}
    # The exporter warns about tracing BERT's shape checks, which hold for every input we feed.
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            _Hidden(),
            tuple(sample[name] for name in _INPUTS),
            buffer,  # type: ignore[arg-type]  # file-like objects are accepted
            dynamo=False,  # the legacy exporter handles BERT's dynamic axes without onnxscript
            opset_version=OPSET,
            input_names=list(_INPUTS),
            output_names=["hidden"],
            dynamic_axes={name: {v: k for k, v in axes.items()} for name in (*_INPUTS, "hidden")},
        )
    return buffer.getvalue()
