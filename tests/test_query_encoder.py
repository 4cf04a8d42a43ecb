"""The ONNX query path returns the ingest path's vectors, so a query meets its corpus in one space."""

from __future__ import annotations

import numpy as np
import pytest

from lakegate.catalog.embedder import get_embedder

QUERIES = [
    "How do I reset my password?",
    "refund",
    "Wie lange dauert die Lieferung nach Deutschland?",
    "warranty claim for a laptop bought in a store, with the receipt lost " * 30,  # past 256 tokens
    "   ",
    "emoji 🚚 and accents: café, naïve, Zürich",
]


@pytest.fixture(scope="module")
def embedder():  # type: ignore[no-untyped-def]
    embedder = get_embedder("cpu")
    if embedder.query_backend != "onnx":
        pytest.skip("onnxruntime is not installed: queries use the torch path")
    return embedder


@pytest.mark.parametrize("query", QUERIES)
def test_onnx_query_vector_matches_the_ingest_path(embedder, query: str) -> None:  # type: ignore[no-untyped-def]
    fast = embedder.embed_query(query)
    reference = embedder.embed([query])[0]
    assert embedder.query_backend == "onnx", "the ONNX encoder failed to build and fell back to torch"
    assert fast.dtype == np.float32 and fast.shape == reference.shape
    assert float(np.abs(fast - reference).max()) < 1e-6
    assert abs(float(np.linalg.norm(fast)) - 1.0) < 1e-5


def test_onnx_distinguishes_queries(embedder) -> None:  # type: ignore[no-untyped-def]
    a, b = embedder.embed_query("reset my password"), embedder.embed_query("shipping costs to Canada")
    assert float(a @ b) < 0.5
