"""An approximate-nearest-neighbour index on a Lance dataset's vectors, and how to search with it.

Below `INDEX_MIN_ROWS` rows an exact (flat) scan is fast enough and always exact, so no index is
built. Above it, an IVF_PQ index is trained with the parameters measured by
evals/bench_vector_index.py on 1M MiniLM vectors (see the README, "Retrieval quality and search
speed"). IVF_PQ alone ranks by compressed vectors and loses recall; `refine_factor` re-ranks
k * refine_factor candidates by their full vectors, which is what brings recall back.

Policy prefilters are unaffected: lancedb applies the predicate before the index search, so an
index changes how fast the top k is found, never which passages may take part in it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from lancedb.table import Table as LanceTable

__all__ = [
    "INDEX_MIN_ROWS",
    "IndexParams",
    "SearchParams",
    "VECTOR_INDEX",
    "VECTOR_SEARCH",
    "build_vector_index",
    "has_vector_index",
]

#: Fewer rows than this: no index (a flat scan of 100k x 384 floats takes tens of milliseconds).
INDEX_MIN_ROWS = 100_000


@dataclass(frozen=True)
class IndexParams:
    index_type: Literal["IVF_PQ", "IVF_HNSW_SQ"] = "IVF_PQ"
    num_partitions: int = 1024  # ~sqrt(N) at 1M rows
    num_sub_vectors: int = 48  # 8 dimensions per sub-vector of MiniLM's 384
    distance_type: Literal["cosine", "l2", "dot"] = "cosine"  # what search_passages ranks by


@dataclass(frozen=True)
class SearchParams:
    # Measured at 1M rows (support_agent prefilter): nprobes 10-40 gave the same recall; refine 30
    # beat 10 (0.59 vs 0.47 tie-robust recall@10) because the demo's ~170 identical copies of each
    # passage fill the k * refine_factor candidates. Below the 0.95 goal: see the README.
    nprobes: int = 20
    refine_factor: int = 30


VECTOR_INDEX = IndexParams()
VECTOR_SEARCH = SearchParams()


def has_vector_index(table: LanceTable, column: str = "vector") -> bool:
    """Whether `table` has a vector index on `column` (any IVF/HNSW type)."""
    return any(
        "IVF" in str(index.index_type).upper() or "HNSW" in str(index.index_type).upper()
        for index in table.list_indices()
        if column in index.columns
    )


def build_vector_index(
    table: LanceTable,
    *,
    column: str = "vector",
    params: IndexParams = VECTOR_INDEX,
    min_rows: int = INDEX_MIN_ROWS,
) -> bool:
    """Build (replacing any) the ANN index on `column` when `table` has more than `min_rows` rows.

    Also indexes the prefilter's columns (classification: Bitmap, allowed_roles: LabelList).
    Returns whether an index was built. New Lance versions are written.

    Raises:
        lancedb/lance errors as they come; callers translate them (catalog.warehouse.translate_errors).
    """
    if table.count_rows() <= min_rows:
        return False
    options: dict[str, Any] = {"metric": params.distance_type, "num_partitions": params.num_partitions}
    if "PQ" in params.index_type:
        options["num_sub_vectors"] = params.num_sub_vectors
    table.create_index(vector_column_name=column, index_type=params.index_type, replace=True, **options)
    _index_acl_columns(table)
    return True


def _index_acl_columns(table: LanceTable) -> None:
    """Scalar indices on the columns of the policy prefilter, when the table has them.

    Measured at 1M rows: without them lancedb evaluates the predicate on every row before the
    vector search (~200 ms per query); with them the prefilter comes from the indices (~7-11 ms).
    """
    from lancedb.index import Bitmap, LabelList

    names = set(table.schema.names)
    if "classification" in names:
        table.create_index("classification", config=Bitmap(), replace=True)
    if "allowed_roles" in names:
        table.create_index("allowed_roles", config=LabelList(), replace=True)
