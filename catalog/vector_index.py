"""An approximate-nearest-neighbour index on a Lance dataset's vectors, and how to search with it.

Up to `INDEX_MIN_ROWS` rows an exact (flat) scan is fast enough and always exact, so no index is
built. Past it, an IVF_RQ index (IVF partitions of RaBitQ 1-bit codes) with ~sqrt(rows) partitions
is trained. evals/bench_vector_index.py chose it at 1M distinct passages with the support_agent
prefilter, against numpy's exact top 10 (see the README, "Retrieval quality and search speed"):
with `VECTOR_SEARCH` it is the only index type measured that reaches recall@10 >= 0.95 at p99 under
20 ms on 2 CPU cores for queries unlike any passage; IVF_PQ and IVF_HNSW_SQ need more probes, and
with them more time, for the same recall. The codes rank candidates approximately;
`refine_factor` re-ranks k * refine_factor of them by their full vectors.

Policy prefilters are unaffected: lancedb applies the predicate before the index search, so an
index changes how fast the top k is found, never which passages may take part in it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
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
    "ensure_vector_index",
    "has_vector_index",
    "index_params",
    "with_search_params",
]

#: Up to this many rows: no index. lancedb's exact search under the prefilter took 606 ms (p50) at
#: 1M rows here, ~0.6 ms per 1,000 rows, so past ~20k rows an index is what keeps p99 under 20 ms.
INDEX_MIN_ROWS = 20_000

IndexType = Literal["IVF_RQ", "IVF_PQ", "IVF_HNSW_SQ"]


@dataclass(frozen=True)
class IndexParams:
    index_type: IndexType = "IVF_RQ"
    num_partitions: int = 1024  # ~sqrt(N) at 1M rows; index_params scales it to the table
    num_sub_vectors: int = 48  # IVF_PQ only: 8 dimensions per sub-vector of MiniLM's 384
    distance_type: Literal["cosine", "l2", "dot"] = "cosine"  # what search_passages ranks by


@dataclass(frozen=True)
class SearchParams:
    nprobes: int = 80  # IVF partitions searched (of 1,024 at 1M rows)
    refine_factor: int = 10  # k * refine_factor candidates re-ranked by their full vectors
    ef: int | None = None  # HNSW candidate list size (IVF_HNSW_* only; lancedb's default when None)


VECTOR_INDEX = IndexParams()
VECTOR_SEARCH = SearchParams()


def index_params(rows: int, index_type: IndexType = VECTOR_INDEX.index_type) -> IndexParams:
    """`VECTOR_INDEX` for a table of `rows` vectors: a power of two near sqrt(rows) IVF partitions
    (1,024 at 1M), a quarter of that for IVF_HNSW_SQ, whose graph searches within each partition."""
    partitions = 2 ** round(math.log2(math.sqrt(max(rows, 256))))
    if index_type == "IVF_HNSW_SQ":
        partitions = max(4, partitions // 4)
    return replace(VECTOR_INDEX, index_type=index_type, num_partitions=partitions)


def with_search_params(builder: Any, params: SearchParams = VECTOR_SEARCH) -> Any:
    """`builder` (a lancedb vector query) set to search an index with `params`.

    `nprobes` is a minimum: when a narrow prefilter leaves fewer than k matches in those partitions,
    lancedb probes more (no maximum), so the caller still gets k passages whenever k may be read.
    """
    builder = builder.minimum_nprobes(params.nprobes).maximum_nprobes(0).refine_factor(params.refine_factor)
    return builder if params.ef is None else builder.ef(params.ef)


def has_vector_index(table: LanceTable, column: str = "vector") -> bool:
    """Whether `table` has a vector index on `column` (any IVF/HNSW type)."""
    return any(
        "IVF" in str(index.index_type).upper() or "HNSW" in str(index.index_type).upper()
        for index in table.list_indices()
        if column in index.columns
    )


def ensure_vector_index(table: LanceTable, *, rows_before: int, column: str = "vector", min_rows: int) -> bool:
    """After a write that took `table` from `rows_before` rows to its current size: build its ANN
    index when it has none and is past `min_rows`, or rebuild it when index_params would now give
    another partition count (about every 4x growth; lancedb's optimize only adds rows to the
    existing partitions, which then grow and slow every probe). Returns whether it (re)built.
    """
    if not has_vector_index(table, column):
        return build_vector_index(table, column=column, min_rows=min_rows)
    if index_params(table.count_rows()).num_partitions == index_params(rows_before).num_partitions:
        return False
    return build_vector_index(table, column=column, min_rows=min_rows)


def build_vector_index(
    table: LanceTable,
    *,
    column: str = "vector",
    params: IndexParams | None = None,
    min_rows: int = INDEX_MIN_ROWS,
) -> bool:
    """Build (replacing any) the ANN index on `column` when `table` has more than `min_rows` rows.

    `params` default to index_params for the table's size. Also indexes the prefilter's columns
    (classification: Bitmap, allowed_roles: LabelList).
    Returns whether an index was built. New Lance versions are written.

    Raises:
        lancedb/lance errors as they come; callers translate them (catalog.warehouse.translate_errors).
    """
    rows = table.count_rows()
    if rows <= min_rows:
        return False
    params = params or index_params(rows)
    from lancedb.index import HnswSq, IvfPq, IvfRq

    config: IvfRq | IvfPq | HnswSq
    if params.index_type == "IVF_RQ":
        config = IvfRq(distance_type=params.distance_type, num_partitions=params.num_partitions)
    elif params.index_type == "IVF_PQ":
        config = IvfPq(
            distance_type=params.distance_type,
            num_partitions=params.num_partitions,
            num_sub_vectors=params.num_sub_vectors,
        )
    else:
        config = HnswSq(distance_type=params.distance_type, num_partitions=params.num_partitions)
    table.create_index(column, config=config, replace=True)
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
