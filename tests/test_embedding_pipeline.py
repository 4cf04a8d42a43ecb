"""The batch embedding pipeline returns sentence-transformers' own vectors, in the caller's order."""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import pytest

from lakegate.catalog.demo import sample_passages
from lakegate.catalog.embedder import Embedder, get_embedder


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    return get_embedder("cpu")


def _reference(embedder: Embedder, texts: list[str]) -> Any:
    return embedder._model.encode(texts, batch_size=16, normalize_embeddings=True, convert_to_numpy=True)


def test_pipeline_matches_plain_encode_in_the_callers_order(embedder: Embedder) -> None:
    texts = sample_passages(40) + ["", "short", "a much longer text about refunds " * 60]  # past 256 tokens
    texts = texts[::-1]  # lengths out of order, so the length sort must be undone
    vectors = embedder.embed(texts)
    assert vectors.shape == (len(texts), 384) and vectors.dtype == np.float32
    assert float(np.abs(vectors - _reference(embedder, texts)).max()) < 1e-6


@pytest.mark.parametrize("batch_size", [1, 7, 500])
def test_batch_size_does_not_change_the_vectors(embedder: Embedder, batch_size: int) -> None:
    texts = sample_passages(20)
    assert float(np.abs(embedder.embed(texts, batch_size=batch_size) - embedder.embed(texts)).max()) < 1e-6


def test_a_tokenizer_failure_reaches_the_caller_and_leaves_no_thread(embedder: Embedder) -> None:
    texts: list[Any] = sample_passages(300) + [None]  # the last batch cannot be tokenised
    with pytest.raises(TypeError):
        embedder.pipeline.embed(texts, batch_size=8)
    assert not any(t.name == "lakegate-tokenize" and t.is_alive() for t in threading.enumerate())
    assert embedder.embed(["still works"]).shape == (1, 384)
