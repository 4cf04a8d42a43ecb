"""Passage search over a Lance dataset of documents: vector, full-text (BM25) and hybrid (RRF).

Policy is applied inside the search, never after it: the caller's decisions (which classifications
it may read, which roles it holds) become one SQL predicate that lancedb evaluates as a prefilter,
before ranking. The top k are therefore drawn only from passages the caller may read: a hidden
passage never takes a place in the top k, is never counted and never returned. (A post-filter
would cut the top k first and then drop rows, losing recall and leaking how many were hidden.)

Time travel (`version`) applies today's policy, not the policy of the day: an earlier version's
passage is ranked only when today's rules admit it with its own labels and, if its document still
exists, every passage of the document's current version (so that relabelling a document hides its
history too). A document deleted since falls back to its old passage's own labels.

Where each part of a passage lives is a `PassageLayout`: lakegate's own datasets use its column
names; a Lance dataset attached in lakegate.toml (catalog/attached_documents.py) names its own, may
label every passage with one classification instead of a column, and may have no per-passage
roles (then the dataset and classification rules alone govern it).

Hybrid search fuses the vector and the full-text rankings with reciprocal rank fusion computed
here, score(d) = sum over rankings of 1 / (RRF_K + rank(d)), rank starting at 1. Doing it here
rather than with lancedb's RRFReranker keeps each passage's rank in each list, which the result
reports, and uses the same prefiltered queries as the single modes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from lakegate.catalog.vector_index import has_vector_index, with_search_params
from lakegate.catalog.warehouse import translate_errors
from lakegate.errors import InvalidArgument, NotFound

if TYPE_CHECKING:
    from pathlib import Path

    from lancedb.table import Table as LanceTable

    from lakegate.catalog.embedder import Embedder
    from lakegate.catalog.query_embedder import TextEncoder
    from lakegate.catalog.warehouse import Warehouse

__all__ = [
    "CLASSIFICATIONS",
    "RRF_K",
    "OWN_LAYOUT",
    "DocumentSearch",
    "PassageHit",
    "PassageLayout",
    "SearchMode",
    "access_predicate",
    "check_embedding_model",
    "hidden_documents",
    "recorded_model",
    "rrf_fuse",
    "search_passages",
    "sql_string",
]

SearchMode = Literal["vector", "fulltext", "hybrid"]

#: The classifications a passage may carry. A passage with any other value is readable by nobody:
#: the predicate lists the allowed values, so an unknown one fails closed.
CLASSIFICATIONS = ("public", "internal", "confidential", "restricted")
RRF_K = 60
TEXT_COLUMN = "text"
VECTOR_COLUMN = "vector"
MODEL_KEY = "lakegate.embedding_model"
MODEL_HASH_KEY = "lakegate.embedding_model_sha256"


@dataclass(frozen=True)
class PassageLayout:
    """Which column holds each part of a passage; None where a dataset has no such column.

    Column names are plain identifiers (catalog/settings.py checks those of attached datasets), so
    quoting them with backticks in a lancedb filter is exact.
    """

    text: str = TEXT_COLUMN
    doc_id: str = "doc_id"
    vector: str | None = VECTOR_COLUMN
    title: str | None = "title"
    source: str | None = "source"
    chunk_index: str | None = "chunk_index"
    classification: str | None = "classification"
    allowed_roles: str | None = "allowed_roles"
    #: Every passage's classification, where there is no classification column.
    fixed_classification: str | None = None
    #: The model the vectors were made with, where the configuration says so; None: the dataset's
    #: own schema metadata says (lakegate writes it with every dataset it embeds).
    embedding_model: str | None = None
    embedding_model_sha256: str | None = None

    @property
    def columns(self) -> list[str]:
        """The columns a hit is read from."""
        wanted = (self.doc_id, self.chunk_index, self.title, self.source, self.classification, self.text)
        return list(dict.fromkeys(column for column in wanted if column is not None))

    @property
    def shown(self) -> list[str]:
        """The columns whose values a hit shows the caller (each must be readable in clear)."""
        return self.columns


#: lakegate's own datasets of documents (catalog/ingest.py writes them).
OWN_LAYOUT = PassageLayout()


def _quoted(column: str) -> str:
    return f"`{column}`"


@dataclass(frozen=True)
class PassageHit:
    doc_id: str
    chunk_index: int
    title: str
    source: str
    classification: str
    text: str
    score: float
    vector_rank: int | None = None
    fulltext_rank: int | None = None


@dataclass(frozen=True)
class DocumentSearch:
    """The passages found, best first, and the dataset version they were read from."""

    version: int
    hits: list[PassageHit]
    predicate: str | None  # None: the caller may read no passage, nothing was searched
    note: str | None = None  # how the search differs from the mode asked for, if it does


def sql_string(value: str) -> str:
    """`value` as a SQL string literal (lancedb's DataFusion dialect: quotes are doubled)."""
    return "'" + value.replace("'", "''") + "'"


def access_predicate(
    classifications: Sequence[str],
    roles: Sequence[str],
    *,
    wanted_classifications: Sequence[str] | None = None,
    source: str | None = None,
    title_contains: str | None = None,
    layout: PassageLayout = OWN_LAYOUT,
) -> str | None:
    """The prefilter: readable classifications, a shared role, and the caller's own narrowing.

    Returns None when no passage can match (no readable classification, or no role where passages
    carry roles), so that the caller can skip the search. A layout without a classification column
    labels every passage with its fixed classification; one without roles leaves them out.

    Raises:
        InvalidArgument: narrowing by source or title on a dataset that has no such column.
    """
    allowed = [c for c in CLASSIFICATIONS if c in set(classifications)]
    if wanted_classifications is not None:
        allowed = [c for c in allowed if c in set(wanted_classifications)]
    if layout.classification is None:
        allowed = [c for c in allowed if c == layout.fixed_classification]
    if not allowed or (layout.allowed_roles is not None and not roles):
        return None
    parts = []
    if layout.classification is not None:
        parts.append(f"{_quoted(layout.classification)} IN ({', '.join(sql_string(c) for c in allowed)})")
    if layout.allowed_roles is not None:
        granted = ", ".join(sql_string(r) for r in sorted(set(roles)))
        parts.append(f"array_has_any({_quoted(layout.allowed_roles)}, [{granted}])")
    if source is not None:
        parts.append(f"{_quoted(_narrowed(layout.source, 'source'))} = {sql_string(source)}")
    if title_contains:
        title = _quoted(_narrowed(layout.title, "title"))
        parts.append(f"strpos(lower({title}), lower({sql_string(title_contains)})) > 0")
    return " AND ".join(parts) if parts else "TRUE"


def _narrowed(column: str | None, what: str) -> str:
    if column is None:
        raise InvalidArgument(
            f"This dataset of documents has no {what}, so it cannot be filtered by {what}.",
            hint=f"Leave out filter.{'title_contains' if what == 'title' else what}.",
        )
    return column


def _doc_ids(table: LanceTable, where: str | None, layout: PassageLayout) -> set[str]:
    """The distinct doc_ids of the passages matching `where` (None: every passage)."""
    builder = table.search()
    if where is not None:
        builder = builder.where(where)
    column = builder.select([layout.doc_id]).limit(None).to_arrow().column(layout.doc_id)
    return {str(doc_id) for doc_id in column.to_pylist() if doc_id is not None}


def _not_admitted(access: str | None) -> str | None:
    """The passages `access` does not admit; None (every passage) when it admits nothing.

    `IS NOT TRUE`, not `NOT`: a null classification or allowed_roles makes the access predicate
    null, and such a passage is hidden from everyone, so it must count as not admitted.
    """
    return None if access is None else f"({access}) IS NOT TRUE"


def hidden_documents(
    warehouse: Warehouse, name: str, access: str | None, *, doc_ids: Sequence[str] | None = None
) -> set[str]:
    """The doc_ids (of `doc_ids`, default all) with a passage in the current version that `access` hides.

    `access` is an `access_predicate` without the caller's own narrowing; None admits nothing, so
    every existing document is hidden. A doc_id with no passage is not in the result.

    Raises:
        NotFound: no such dataset.
        BackendError: lancedb failed.
    """
    table = warehouse.lance_table(name)
    where = _not_admitted(access)
    if doc_ids is not None:
        if not doc_ids:
            return set()
        wanted = f"doc_id IN ({', '.join(sql_string(doc_id) for doc_id in sorted(set(doc_ids)))})"
        where = wanted if where is None else f"{wanted} AND {where}"
    with translate_errors(f"read the labels of {name}", name):
        return _doc_ids(table, where, OWN_LAYOUT)


def recorded_model(metadata: dict[bytes, bytes] | None) -> tuple[str | None, str | None]:
    """The embedding model name and weights hash a Lance dataset's schema metadata records."""
    recorded = {k.decode("utf-8", "replace"): v.decode("utf-8", "replace") for k, v in (metadata or {}).items()}
    return recorded.get(MODEL_KEY), recorded.get(MODEL_HASH_KEY)


def check_embedding_model(
    metadata: dict[bytes, bytes] | None,
    embedder: TextEncoder | Embedder,
    name: str,
    layout: PassageLayout = OWN_LAYOUT,
) -> None:
    """Refuse a vector search when the dataset's vectors come from another model than the query's:
    the model the layout names (an attached dataset's configuration), else the one its schema
    metadata records.

    Raises:
        InvalidArgument: the dataset records another model (or none); full-text search still works.
    """
    model: str | None
    if layout.embedding_model is not None:
        model, digest = layout.embedding_model, layout.embedding_model_sha256
        same = model == embedder.model_name and digest in (None, embedder.model_hash)
    else:
        model, digest = recorded_model(metadata)
        same = model == embedder.model_name and digest == embedder.model_hash
    if not same:
        raise InvalidArgument(
            f"{name} was embedded with model {model or 'unknown'} (sha256 {(digest or 'unknown')[:12]}), but "
            f"queries are embedded with {embedder.model_name} (sha256 {embedder.model_hash[:12]}); comparing "
            "their vectors would give meaningless results.",
            hint="Use mode='fulltext', or ask the dataset's owner to re-embed it with the server's model.",
        )


def rrf_fuse(rankings: dict[str, Sequence[Any]], k: int) -> list[tuple[Any, float, dict[str, int]]]:
    """Reciprocal rank fusion of ranked key lists: (key, score, {ranking: rank}) best first, at most k.

    Ties are broken by the best single rank, then by the ranking order given, so the result is stable.
    """
    scores: dict[Any, float] = {}
    ranks: dict[Any, dict[str, int]] = {}
    for label, keys in rankings.items():
        for rank, key in enumerate(keys, start=1):
            scores[key] = scores.get(key, 0.0) + 1.0 / (RRF_K + rank)
            ranks.setdefault(key, {})[label] = rank
    order = sorted(scores, key=lambda key: (-scores[key], min(ranks[key].values())))
    return [(key, scores[key], ranks[key]) for key in order[:k]]


def _open(warehouse: Warehouse, name: str, version: int | None) -> LanceTable:
    table = warehouse.lance_table(name)  # a fresh handle: checkout never affects another call
    if version is None:
        return table
    with translate_errors(f"list versions of {name}", name):
        known = {int(entry["version"]) for entry in table.list_versions()}
    if version not in known:
        raise NotFound(f"{name} has no version {version}.", hint="Call describe_dataset to see the dataset's versions.")
    with translate_errors(f"check out {name} version {version}", name):
        table.checkout(version)
    return table


def _has_fulltext_index(table: LanceTable, layout: PassageLayout) -> bool:
    return any(
        str(index.index_type).upper() in {"FTS", "INVERTED"} and layout.text in index.columns
        for index in table.list_indices()
    )


def _query_vector(
    table: LanceTable, name: str, query: str, models_dir: Path, layout: PassageLayout, *, wait: bool
) -> Any:
    """The query's vector; None without `wait` while the start-up warm-up still builds the encoder."""
    from lakegate.catalog.query_embedder import get_query_embedder, query_embedder_unless_building

    encoder = get_query_embedder(models_dir) if wait else query_embedder_unless_building(models_dir)
    if encoder is None:
        return None
    check_embedding_model(table.schema.metadata, encoder, name, layout)
    return encoder.embed_query(query)


def _rows(
    table: LanceTable,
    label: Literal["vector", "fulltext"],
    query: Any,
    predicate: str,
    k: int,
    layout: PassageLayout,
) -> list[Any]:
    if label == "vector":
        assert layout.vector is not None  # search_passages refuses vector modes without one
        # search() is typed as the generic builder; a vector query gives the vector builder.
        vector_builder: Any = table.search(query, vector_column_name=layout.vector)
        builder: Any = vector_builder.distance_type("cosine")
        if has_vector_index(table, layout.vector):
            builder = with_search_params(builder)
        columns = layout.columns
    else:
        builder = table.search(query, query_type="fts", fts_columns=layout.text)
        columns = [*layout.columns, "_score"]  # asked for explicitly: lancedb warns when it adds it itself
    result = builder.where(predicate, prefilter=True).with_row_id(True).select(columns).limit(k).to_arrow()
    return list(result.to_pylist())


def _hit(row: dict[str, Any], score: float, ranks: dict[str, int], layout: PassageLayout) -> PassageHit:
    def text(column: str | None) -> str:
        return "" if column is None or row[column] is None else str(row[column])

    return PassageHit(
        doc_id=str(row[layout.doc_id]),
        chunk_index=0 if layout.chunk_index is None else int(row[layout.chunk_index] or 0),
        title=text(layout.title),
        source=text(layout.source),
        classification=text(layout.classification) or str(layout.fixed_classification),
        text=text(layout.text),
        score=score,
        vector_rank=ranks.get("vector"),
        fulltext_rank=ranks.get("fulltext"),
    )


def _without_hidden_now(
    warehouse: Warehouse, name: str, table: LanceTable, predicate: str, access: str | None, layout: PassageLayout
) -> str:
    """`predicate` for an earlier version, less the documents whose current version `access` hides."""
    current = warehouse.lance_table(name)
    if int(current.version) == int(table.version):
        return predicate
    hidden = _doc_ids(current, _not_admitted(access), layout)
    # Only the hidden documents this version would otherwise show: usually the few relabelled since,
    # which keeps the predicate (and the audit record that holds it) short.
    if hidden:
        hidden &= _doc_ids(table, predicate, layout)
    if not hidden:
        return predicate
    listed = ", ".join(sql_string(doc_id) for doc_id in sorted(hidden))
    return f"{predicate} AND {_quoted(layout.doc_id)} NOT IN ({listed})"


def search_passages(
    warehouse: Warehouse,
    name: str,
    query: str,
    *,
    mode: SearchMode,
    k: int,
    predicate: str | None,
    access: str | None,
    version: int | None = None,
) -> DocumentSearch:
    """Search Lance dataset `name` (at `version`, default the current one) for `query`.

    Only passages matching `predicate` are ranked (prefilter); None searches nothing. `access` is
    the caller's `access_predicate` without its own narrowing: at an earlier version a passage is
    ranked only if it matches `predicate` and its doc_id has no passage in the current version that
    `access` hides (a doc_id deleted since is judged by the old passage's labels alone). The
    returned predicate is the one applied.

    Raises:
        NotFound: no such dataset or version.
        InvalidArgument: fulltext/hybrid on a version without a full-text index on text, or
            vector/hybrid on a dataset embedded with another model.
        BackendError: lancedb failed.
    """
    attached = warehouse.attached_documents(name)
    layout = OWN_LAYOUT if attached is None else attached.layout
    if version is not None and attached is not None and not attached.spec.time_travel:
        raise InvalidArgument(
            f"{name} is attached without time travel: only its current version can be searched.",
            hint="Leave out version, or ask the platform team to set time_travel = true for it in lakegate.toml.",
        )
    if mode != "fulltext" and layout.vector is None:
        raise InvalidArgument(f"{name} has no vectors to search by meaning.", hint="Use mode='fulltext'.")
    table = _open(warehouse, name, version)
    with translate_errors(f"search {name}", name):
        read_version = int(table.version)
        if mode != "vector" and not _has_fulltext_index(table, layout):
            hint = "Use mode='vector', or a later version of the dataset."
            if layout is not OWN_LAYOUT:
                hint = "Use mode='vector'; the dataset's owner can add one (lancedb: create_fts_index on its text)."
            raise InvalidArgument(f"{name} at version {read_version} has no full-text index on its text.", hint=hint)
        if predicate is None:
            return DocumentSearch(read_version, [], None)
        if version is not None:
            predicate = _without_hidden_now(warehouse, name, table, predicate, access, layout)
        ranked: dict[str, list[Any]] = {}
        note = None
        if mode != "fulltext":
            # A hybrid search does not wait for an encoder the start-up warm-up is still building
            # (seconds on a fresh state directory): it ranks by words alone meanwhile, and says so.
            vector = _query_vector(table, name, query, warehouse.models_dir, layout, wait=mode == "vector")
            if vector is None:
                from lakegate.catalog.catalog_search import STARTING_UP_NOTE

                note = STARTING_UP_NOTE
            else:
                ranked["vector"] = _rows(table, "vector", vector, predicate, k, layout)
        if mode != "vector":
            ranked["fulltext"] = _rows(table, "fulltext", query, predicate, k, layout)
    if mode == "vector":
        hits = [
            _hit(row, 1.0 - float(row["_distance"]), {"vector": i}, layout) for i, row in enumerate(ranked["vector"], 1)
        ]
    elif mode == "fulltext":
        hits = [_hit(row, float(row["_score"]), {"fulltext": i}, layout) for i, row in enumerate(ranked["fulltext"], 1)]
    else:
        by_id = {row["_rowid"]: row for rows in ranked.values() for row in rows}
        fused = rrf_fuse({label: [row["_rowid"] for row in rows] for label, rows in ranked.items()}, k)
        hits = [_hit(by_id[row_id], score, ranks, layout) for row_id, score, ranks in fused]
    return DocumentSearch(read_version, hits, predicate, note)
