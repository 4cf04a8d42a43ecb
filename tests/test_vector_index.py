"""The vector index (catalog/vector_index.py) on a real Lance dataset: sizing, and k filled under a
narrow prefilter.

Vectors are random here (no model needed): what is tested is how the index is built and searched,
not what the vectors mean.
"""

from __future__ import annotations

from pathlib import Path

import lancedb
import numpy as np
import pyarrow as pa

from lakegate.catalog.vector_index import (
    SearchParams,
    build_vector_index,
    has_vector_index,
    index_params,
    with_search_params,
)

ROWS = 20_000
DIM = 384


def test_partitions_follow_the_square_root_of_the_rows() -> None:
    assert index_params(1_000_000).num_partitions == 1024
    assert index_params(20_000).num_partitions == 128
    assert index_params(300).num_partitions == 16
    assert index_params(1_000_000, "IVF_HNSW_SQ").num_partitions == 256
    assert index_params(1_000_000).index_type == "IVF_RQ"


def test_a_narrow_prefilter_still_gets_k_passages(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    vectors = rng.normal(size=(ROWS, DIM)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    rare = set(rng.choice(ROWS, size=12, replace=False).tolist())  # spread over the partitions
    table = lancedb.connect(tmp_path).create_table(
        "docs",
        pa.table(
            {
                "id": np.arange(ROWS),
                "classification": ["restricted" if i in rare else "public" for i in range(ROWS)],
                "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), DIM),
            }
        ),
    )
    assert build_vector_index(table, min_rows=1000) and has_vector_index(table)
    query = vectors[0]
    builder = table.search(query, vector_column_name="vector").distance_type("cosine")
    builder = builder.where("classification = 'restricted'", prefilter=True).select(["id", "_distance"]).limit(10)
    # 2 of 128 partitions hold about one of the 12 rows: only probing on makes the 10.
    found = with_search_params(builder, SearchParams(nprobes=2, refine_factor=10)).to_arrow()["id"].to_pylist()
    assert len(found) == 10 and set(found) <= rare
