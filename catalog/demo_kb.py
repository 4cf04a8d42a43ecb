"""The demo knowledge base: articles cut into passages, embedded and written to the Lance dataset
kb.articles, with a full-text index (and, at large scale, a vector index).

The articles' text is package data (catalog/demo_kb.yaml, the planted one in
catalog/demo_injections.yaml); which roles may read each classification is policy data
(policies/document_readers.yaml), written into each passage's allowed_roles.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa

from lakegate.catalog.chunking import sentence_chunks
from lakegate.catalog.definitions import CatalogDefinitions
from lakegate.catalog.demo_data import injections, knowledge_base, vocabulary
from lakegate.catalog.demo_tables import CHANNELS, COUNTRIES, DAY_US, END_US, HOUR_US, timestamps
from lakegate.catalog.warehouse import LANCE_DOC_KEY, Warehouse, translate_errors
from lakegate.policies.document_readers import load_document_readers

if TYPE_CHECKING:
    from lakegate.catalog.embedder import Embedder

__all__ = [
    "KB_DATASET",
    "KbScale",
    "kb_access_columns",
    "kb_readers",
    "kb_steps",
    "sample_passages",
    "write_kb",
]

KB_DATASET = "kb.articles"

Rng = np.random.Generator


@dataclass(frozen=True)
class KbScale:
    rows: int  # 0: write each chunk of the generated articles once
    pool: int  # distinct passages embedded at large scale
    batch: int


@dataclass(frozen=True)
class _Passage:
    doc_id: str
    chunk_index: int
    text: str
    source: str
    title: str
    classification: str
    ingested_us: int


def _articles(rng: Rng) -> list[_Passage]:
    """Chunks of the generated articles: each topic written for each region (40 articles)."""
    kb = knowledge_base()
    passages: list[_Passage] = []
    for topic_no, topic in enumerate(kb.topics):
        for region in kb.regions:
            values = region.values()
            doc_id = f"{topic.slug}-{region.key}"
            # Articles were last ingested on a (seeded) day of late 2025.
            ingested = END_US - int(rng.integers(1, 60)) * DAY_US + topic_no * HOUR_US
            texts = sentence_chunks([p.format(**values) for p in topic.paragraphs])
            title = topic.title.format(**values)
            passages.extend(
                _Passage(doc_id, i, text, f"kb://{doc_id}", title, topic.classification, ingested)
                for i, text in enumerate(texts)
            )
    return passages


def _injected_articles() -> list[_Passage]:
    """The planted article (one passage), outside the seeded draws so that nothing else changes."""
    article = injections().article
    ingested = END_US - 3 * DAY_US
    source = f"kb://{article.doc_id}"
    return [_Passage(article.doc_id, 0, article.text, source, article.title, article.classification, ingested)]


def _passage_pool(rng: Rng, base: list[_Passage], size: int) -> list[_Passage]:
    """`size` distinct passages: base chunks given a country, channel and category context."""
    contexts = knowledge_base().pool_contexts
    countries = [c for options in COUNTRIES.values() for c, _, _ in options]
    categories = [category.name for category in vocabulary().categories]
    combos = len(base) * len(countries) * len(CHANNELS) * len(categories) * len(contexts)
    pool = []
    for index in rng.choice(combos, size=min(size, combos), replace=False):
        index, passage = divmod(int(index), len(base))
        index, country = divmod(index, len(countries))
        index, channel = divmod(index, len(CHANNELS))
        template, category = divmod(index, len(categories))
        b = base[passage]
        context = contexts[template].format(
            country=countries[country], channel=CHANNELS[channel], category=categories[category]
        )
        pool.append(
            _Passage(b.doc_id, b.chunk_index, context + b.text, b.source, b.title, b.classification, b.ingested_us)
        )
    return pool


def kb_readers() -> dict[str, tuple[str, ...]]:
    """The readers of each classification the knowledge base uses, from policies/document_readers.yaml.

    Raises:
        ConfigurationError: a data file is missing or malformed, or names no readers for a
            classification an article carries.
    """
    readers = load_document_readers()
    used = [topic.classification for topic in knowledge_base().topics] + [injections().article.classification]
    return {classification: readers.roles(classification) for classification in dict.fromkeys(used)}


def sample_passages(count: int, seed: int = 0) -> list[str]:
    """`count` distinct demo passages (~180 tokens each), as the large demo embeds them: for benchmarks."""
    rng = np.random.default_rng(seed)
    return [passage.text for passage in _passage_pool(rng, _articles(rng), count)]


def kb_access_columns(count: int, seed: int = 0) -> tuple[list[str], list[list[str]]]:
    """`count` classifications and reader lists drawn as kb.articles' passages carry them: for benchmarks."""
    rng = np.random.default_rng(seed)
    base = [passage.classification for passage in _articles(rng)]
    classifications = [base[int(i)] for i in rng.choice(len(base), size=count)]
    readers = kb_readers()
    return classifications, [list(readers[c]) for c in classifications]


def _kb_schema(definitions: CatalogDefinitions, embedder: Embedder) -> pa.Schema:
    doc = definitions.dataset(KB_DATASET)

    def column(name: str, type_: pa.DataType) -> pa.Field:
        column_doc = doc.column(name) if doc else None
        metadata = {LANCE_DOC_KEY: column_doc.description} if column_doc else None
        return pa.field(name, type_, nullable=False, metadata=metadata)

    metadata = {
        "lakegate.embedding_model": embedder.model_name,
        "lakegate.embedding_model_sha256": embedder.model_hash,
        "lakegate.embedding_dimension": str(embedder.dimension),
    }
    if doc is not None:
        metadata |= {"comment": doc.description, "owner": doc.owner, "tags": ",".join(doc.tags)}
    return pa.schema(
        [
            column("doc_id", pa.string()),
            column("chunk_index", pa.int32()),
            column("text", pa.string()),
            column("source", pa.string()),
            column("title", pa.string()),
            column("classification", pa.string()),
            column("allowed_roles", pa.list_(pa.string())),
            column("ingested_at", pa.timestamp("us", tz="UTC")),
            column("vector", pa.list_(pa.float32(), embedder.dimension)),
        ],
        metadata=metadata,
    )


def _kb_table(
    schema: pa.Schema,
    passages: Sequence[_Passage],
    vectors: npt.NDArray[np.float32],
    readers: dict[str, tuple[str, ...]],
) -> pa.Table:
    flat = pa.array(np.ascontiguousarray(vectors, dtype=np.float32).reshape(-1))
    columns = [
        pa.array([p.doc_id for p in passages], pa.string()),
        pa.array([p.chunk_index for p in passages], pa.int32()),
        pa.array([p.text for p in passages], pa.string()),
        pa.array([p.source for p in passages], pa.string()),
        pa.array([p.title for p in passages], pa.string()),
        pa.array([p.classification for p in passages], pa.string()),
        pa.array([list(readers[p.classification]) for p in passages], pa.list_(pa.string())),
        timestamps(np.array([p.ingested_us for p in passages], dtype=np.int64)),
        pa.FixedSizeListArray.from_arrays(flat, int(vectors.shape[1])),
    ]
    return pa.Table.from_arrays(columns, schema=schema)


_EMBED_SLICE = 500  # passages embedded between two progress reports at large scale


def kb_steps(scale: KbScale) -> int:
    """How many progress steps write_kb reports."""
    if scale.rows == 0:
        return 1
    return -(-scale.pool // _EMBED_SLICE) + -(-scale.rows // scale.batch) + 1  # + the vector index


def write_kb(
    warehouse: Warehouse,
    definitions: CatalogDefinitions,
    embedder: Embedder,
    scale: KbScale,
    seed: int,
    step: Callable[[str], None],
) -> int:
    """Write kb.articles, replacing it; returns the number of rows.

    At small scale every chunk of the 40 generated articles, and the planted one, is embedded. At
    large scale (1M rows) embedding each row is out of reach on a CPU (~55 passages/s), so rows are
    drawn from a pool of `scale.pool` distinct passages (article chunks given a country, channel and
    category context); each distinct passage is embedded once and its vector is reused by every row
    that draws it. Large-scale rows therefore repeat texts and vectors, and get synthetic doc_ids;
    the first rows are the planted article's passages, as at small scale.

    Raises:
        BackendError: lancedb failed.
        ConfigurationError: a data file is missing or malformed.
    """
    schema = _kb_schema(definitions, embedder)
    readers = kb_readers()
    rng = np.random.default_rng([seed, 4])
    articles = _articles(rng)
    injected = _injected_articles()
    connection = warehouse.lance
    if scale.rows == 0:
        articles = [*articles, *injected]
        vectors = embedder.embed([p.text for p in articles])
        with translate_errors(f"write {KB_DATASET}", KB_DATASET):
            table = connection.create_table(KB_DATASET, _kb_table(schema, articles, vectors, readers), mode="overwrite")
            _index_kb_text(table)
        step(f"wrote {len(articles):,} knowledge-base passages")
        return len(articles)

    pool = _passage_pool(rng, articles, scale.pool)
    # Embedding the pool takes minutes on a CPU: embed it in slices so progress keeps moving.
    slices = []
    for start in range(0, len(pool), _EMBED_SLICE):
        slices.append(embedder.embed([p.text for p in pool[start : start + _EMBED_SLICE]], batch_size=128))
        step(f"embedded {min(start + _EMBED_SLICE, len(pool)):,} of {len(pool):,} distinct passages")
    pool_vectors = np.concatenate(slices)
    injected_vectors = embedder.embed([p.text for p in injected])
    written = 0
    while written < scale.rows:
        count = min(scale.batch, scale.rows - written)
        picks = rng.integers(0, len(pool), size=count)
        rows = [
            _Passage(
                f"{pool[j].doc_id}-{(written + k) // 4:07d}",
                (written + k) % 4,
                pool[j].text,
                pool[j].source,
                pool[j].title,
                pool[j].classification,
                pool[j].ingested_us,
            )
            for k, j in enumerate(picks)
        ]
        vectors = pool_vectors[picks]
        if written == 0:
            # The planted article takes the first rows' places: the large demo holds it too.
            rows[: len(injected)] = injected
            vectors = np.concatenate([injected_vectors, vectors[len(injected) :]])
        batch = _kb_table(schema, rows, vectors, readers)
        with translate_errors(f"write {KB_DATASET}", KB_DATASET):
            if written == 0:
                connection.create_table(KB_DATASET, batch, mode="overwrite")
            else:
                connection.open_table(KB_DATASET).add(batch)
        written += count
        step(f"wrote {written:,} of {scale.rows:,} knowledge-base passages")
    with translate_errors(f"index {KB_DATASET}", KB_DATASET):
        _index_kb_text(connection.open_table(KB_DATASET))
    # Large scale only (this branch): an ANN index plus ACL scalar indices, ~2-3 minutes on 2 cores.
    from lakegate.catalog.vector_index import build_vector_index

    with translate_errors(f"index {KB_DATASET} vectors", KB_DATASET):
        build_vector_index(connection.open_table(KB_DATASET))
    step(f"indexed the vectors of {written:,} knowledge-base passages")
    return written


def _index_kb_text(table: Any) -> None:
    """A BM25 full-text index on the passage text, for search_documents (a new Lance version)."""
    from lancedb.index import FTS

    table.create_index("text", config=FTS())
