"""Documents into a Lance dataset of passages: parse, chunk, embed, write, re-index.

A document is identified by its doc_id. Ingesting it again replaces it: one lancedb merge_insert on
(doc_id, chunk_index) updates the chunks that still exist, inserts new ones and deletes the surplus
chunks of the documents in the batch, in a single commit (one Lance version), so a reader never sees
a document twice or half replaced. The dataset's indexes (full text, vectors) are then brought up
to date with `optimize`, which keeps every earlier version for time travel; the ingest that first
takes a dataset past the index threshold builds its vector index.

Vectors are only ever written with the model the dataset records: mixing models in one dataset
would make vector search compare incomparable vectors.

Policy is not applied here: the caller (server/scope.py, `CallScope.add_documents`) takes the
decisions first, and may pass a `before_write` check that runs again just before the merge.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from html.parser import HTMLParser
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import structlog

from lakegate.catalog.chunking import DEFAULT_CHUNK_SIZE, DEFAULT_OVERLAP, chunk_text
from lakegate.catalog.document_search import CLASSIFICATIONS, VECTOR_COLUMN, recorded_model, sql_string
from lakegate.catalog.query_graph import ensure_query_graph, graph_path
from lakegate.catalog.vector_index import INDEX_MIN_ROWS, ensure_vector_index
from lakegate.catalog.warehouse import translate_errors
from lakegate.errors import InvalidArgument

if TYPE_CHECKING:
    from lakegate.catalog.embedder import Embedder
    from lakegate.catalog.warehouse import Warehouse

__all__ = [
    "MAX_DOCUMENTS",
    "MAX_DOCUMENT_CHARS",
    "SUPPORTED_SUFFIXES",
    "Document",
    "IngestOutcome",
    "ParsedFile",
    "ingest_documents",
    "parse_file",
]

_log = structlog.get_logger(__name__)

MAX_DOCUMENTS = 50
MAX_DOCUMENT_CHARS = 200_000
SUPPORTED_SUFFIXES = (".md", ".txt", ".html", ".htm", ".pdf")
EMBED_BATCH = 64  # passages embedded between two progress reports on the CPU
EMBED_BATCH_GPU = 8192  # ... and on a GPU, where smaller slices would starve its pipeline
#: optimize() prunes versions older than its cutoff (7 days by default); history is kept instead.
_KEEP_HISTORY = timedelta(days=365 * 1000)

#: (done, total) passages embedded so far.
EmbedProgress = Callable[[int, int], None]


@dataclass(frozen=True)
class Document:
    doc_id: str
    title: str
    text: str
    classification: str
    allowed_roles: tuple[str, ...]
    source: str | None = None


@dataclass(frozen=True)
class IngestOutcome:
    dataset: str
    version_before: int
    version: int  # the dataset's current version once the new passages are indexed
    chunks: dict[str, int]  # passages written per doc_id, in the order given
    replaced: int  # passages of earlier versions of these documents that were updated or deleted
    seconds: float
    vector_index_built: bool = False  # this ingest built or rebuilt the vector index (ensure_vector_index)
    vector_index_error: str | None = None  # building it failed; the passages are written all the same

    @property
    def doc_ids(self) -> list[str]:
        return list(self.chunks)

    @property
    def rows(self) -> int:
        return sum(self.chunks.values())


# -- parsing files -----------------------------------------------------------------------------


@dataclass(frozen=True)
class ParsedFile:
    title: str
    text: str


class _HtmlText(HTMLParser):
    """Visible text of an HTML page, a blank line at each block element, and its <title>."""

    _SKIP = frozenset({"script", "style", "noscript", "template", "head"})
    _HEADINGS = frozenset({"h1", "h2", "h3", "h4", "h5", "h6"})
    _BLOCKS = _HEADINGS | {"p", "div", "br", "hr", "li", "ul", "ol", "dd", "dt", "tr", "table", "pre", "blockquote"}
    _BLOCKS |= {"section", "article", "header", "footer", "main", "nav", "aside"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.title = ""
        self.heading = ""
        self._open: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in self._BLOCKS:
            self.parts.append("\n\n")
        if tag not in {"br", "hr", "meta", "link", "img", "input"}:
            self._open.append(tag)

    def handle_endtag(self, tag: str) -> None:
        if tag in self._open:
            while self._open and self._open.pop() != tag:
                pass
        if tag in self._BLOCKS:
            self.parts.append("\n\n")

    def handle_data(self, data: str) -> None:
        if "title" in self._open:
            self.title += data
        elif not self._SKIP & set(self._open):
            if "h1" in self._open:
                self.heading += data
            self.parts.append(data)


def _markdown_title(text: str) -> str | None:
    for line in text.splitlines():
        if line.startswith("# "):
            return line[2:].strip() or None
    return None


def parse_file(path: Path) -> ParsedFile:
    """Title and text of a .md, .txt, .html or .pdf file (text files are read as UTF-8).

    Raises:
        InvalidArgument: an unsupported file type, a file that cannot be read or decoded.
    """
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED_SUFFIXES:
        raise InvalidArgument(
            f"{path}: unsupported file type {suffix or '(none)'!r}.",
            hint=f"Ingest {', '.join(SUPPORTED_SUFFIXES)} files.",
        )
    try:
        if suffix == ".pdf":
            return _parse_pdf(path)
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidArgument(f"{path}: not UTF-8 text ({exc.reason}).", hint="Convert it to UTF-8.") from exc
    except OSError as exc:
        raise InvalidArgument(f"{path}: cannot be read ({exc.strerror or exc}).") from exc
    if suffix in {".html", ".htm"}:
        parser = _HtmlText()
        parser.feed(text)
        parser.close()
        title = " ".join(parser.title.split()) or " ".join(parser.heading.split()) or path.name
        return ParsedFile(title, "".join(parser.parts))
    title = (_markdown_title(text) if suffix == ".md" else None) or path.name
    return ParsedFile(title, text)


def _parse_pdf(path: Path) -> ParsedFile:
    try:
        from pypdf import PdfReader
    except ImportError as exc:
        raise InvalidArgument(
            f"{path}: unsupported file type '.pdf' (pypdf is not installed).", hint="Install pypdf to ingest PDFs."
        ) from exc
    try:
        reader = PdfReader(path)
        pages = [page.extract_text() or "" for page in reader.pages]
        meta_title = reader.metadata.title if reader.metadata is not None else None
    except Exception as exc:  # pypdf raises many types for damaged files
        raise InvalidArgument(f"{path}: cannot read the PDF ({type(exc).__name__}: {exc}).") from exc
    return ParsedFile(str(meta_title).strip() if meta_title else path.name, "\n\n".join(pages))


# -- writing -----------------------------------------------------------------------------------


def _check_model(metadata: dict[bytes, bytes] | None, embedder: Embedder, name: str) -> None:
    model, digest = recorded_model(metadata)
    if model != embedder.model_name or digest != embedder.model_hash:
        raise InvalidArgument(
            f"{name} was embedded with model {model or 'unknown'} (sha256 {(digest or 'unknown')[:12]}), but this "
            f"server embeds with {embedder.model_name} (sha256 {embedder.model_hash[:12]}); passages of both "
            "models in one dataset could not be searched by meaning. Nothing was written.",
            hint="Ingest into a dataset embedded with the server's model.",
        )


def _passages(documents: Sequence[Document], size: int, overlap: int) -> list[tuple[Document, int, str]]:
    seen: set[str] = set()
    out: list[tuple[Document, int, str]] = []
    for document in documents:
        if document.doc_id in seen:
            raise InvalidArgument(f"doc_id {document.doc_id!r} appears twice.", hint="Send each document once.")
        seen.add(document.doc_id)
        if document.classification not in CLASSIFICATIONS:
            raise InvalidArgument(
                f"{document.doc_id}: unknown classification {document.classification!r}.",
                hint=f"Use one of {', '.join(CLASSIFICATIONS)}.",
            )
        texts = chunk_text(document.text, size=size, overlap=overlap)
        if not texts:
            raise InvalidArgument(f"{document.doc_id}: the document has no text.", hint="Nothing was written.")
        out.extend((document, index, text) for index, text in enumerate(texts))
    return out


def _embed(embedder: Embedder, texts: list[str], progress: EmbedProgress | None) -> np.ndarray[Any, Any]:
    slices = []
    step = EMBED_BATCH if embedder.device == "cpu" else EMBED_BATCH_GPU
    for start in range(0, len(texts), step):
        slices.append(embedder.embed(texts[start : start + step]))
        if progress is not None:
            progress(min(start + step, len(texts)), len(texts))
    return np.concatenate(slices) if slices else np.zeros((0, embedder.dimension), dtype=np.float32)


def _batch(schema: pa.Schema, name: str, rows: list[tuple[Document, int, str]], vectors: Any) -> pa.Table:
    now = datetime.now(UTC)
    flat = pa.array(np.ascontiguousarray(vectors, dtype=np.float32).reshape(-1))
    known: dict[str, pa.Array] = {
        "doc_id": pa.array([d.doc_id for d, _, _ in rows], pa.string()),
        "chunk_index": pa.array([i for _, i, _ in rows], pa.int32()),
        "text": pa.array([t for _, _, t in rows], pa.string()),
        "source": pa.array([d.source or d.doc_id for d, _, _ in rows], pa.string()),
        "title": pa.array([d.title for d, _, _ in rows], pa.string()),
        "classification": pa.array([d.classification for d, _, _ in rows], pa.string()),
        "allowed_roles": pa.array([list(d.allowed_roles) for d, _, _ in rows], pa.list_(pa.string())),
        "ingested_at": pa.array([now] * len(rows), pa.timestamp("us", tz="UTC")),
        VECTOR_COLUMN: pa.FixedSizeListArray.from_arrays(flat, int(vectors.shape[1])),
    }
    missing = [f.name for f in schema if f.name not in known and not f.nullable]
    lacking = [
        c
        for c in ("doc_id", "chunk_index", "text", "classification", "allowed_roles", VECTOR_COLUMN)
        if c not in schema.names
    ]
    if missing or lacking:
        raise InvalidArgument(
            f"{name} is not a dataset of documents lakegate can write "
            f"({'no column ' + ', '.join(lacking) if lacking else 'it requires ' + ', '.join(missing)}).",
            hint="Ingest into a document dataset such as kb.articles.",
        )
    arrays = [known[f.name].cast(f.type) if f.name in known else pa.nulls(len(rows), f.type) for f in schema]
    return pa.Table.from_arrays(arrays, schema=schema)


def ingest_documents(
    warehouse: Warehouse,
    name: str,
    documents: Sequence[Document],
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    overlap: int = DEFAULT_OVERLAP,
    embedder: Embedder | None = None,
    progress: EmbedProgress | None = None,
    index_min_rows: int = INDEX_MIN_ROWS,
    before_write: Callable[[], None] | None = None,
) -> IngestOutcome:
    """Chunk, embed and write `documents` into Lance dataset `name`, replacing earlier versions of them.

    `progress(done, total)` is called after each batch of passages is embedded. An ingest that
    leaves the dataset past `index_min_rows` passages without a vector index builds one, and one
    that grows it ~4x past the index's size rebuilds it (catalog/vector_index.ensure_vector_index);
    others fold the new passages into it. A failed build is reported, not raised: the passages are
    written by then. `before_write()` runs after embedding, immediately before the merge; whatever
    it raises aborts the ingest with nothing written.

    Raises:
        NotFound: no such dataset.
        InvalidArgument: too many or too long documents, a duplicate doc_id, an unknown
            classification, a document without text, a dataset that is not a document dataset or
            records another embedding model. Nothing is written then.
        ConfigurationError: the embedding model cannot be loaded.
        BackendError: lancedb failed.
        (anything `before_write` raises.)
    """
    started = time.perf_counter()
    if not documents:
        raise InvalidArgument("No documents to ingest.", hint="Send at least one document.")
    if len(documents) > MAX_DOCUMENTS:
        raise InvalidArgument(
            f"At most {MAX_DOCUMENTS} documents per call; got {len(documents)}.", hint="Send them in batches."
        )
    long = [d.doc_id for d in documents if len(d.text) > MAX_DOCUMENT_CHARS]
    if long:
        raise InvalidArgument(
            f"Document(s) {', '.join(long[:5])} have more than {MAX_DOCUMENT_CHARS:,} characters.",
            hint="Split them into parts with their own doc_ids.",
        )
    table = warehouse.lance_table(name)
    if embedder is None:
        from lakegate.catalog.embedder import get_embedder

        embedder = get_embedder()
    with translate_errors(f"read the schema of {name}", name):
        schema = table.schema
        before = int(table.version)
        rows_before = table.count_rows()
    _check_model(schema.metadata, embedder, name)
    if not graph_path(warehouse.models_dir).exists():  # torch is loaded: make serving need it no more
        ensure_query_graph(warehouse.models_dir, embedder)
    rows = _passages(documents, chunk_size, overlap)
    vectors = _embed(embedder, [text for _, _, text in rows], progress)
    batch = _batch(schema, name, rows, vectors)
    ids = ", ".join(sql_string(d.doc_id) for d in documents)
    if before_write is not None:
        # Embedding can take minutes; a caller's check of what is about to be replaced is taken
        # again here, so that it judges the dataset as it is now rather than as it was then.
        before_write()
    with translate_errors(f"write {name}", name):
        merged = (
            table.merge_insert(["doc_id", "chunk_index"])
            .when_matched_update_all()
            .when_not_matched_insert_all()
            .when_not_matched_by_source_delete(f"doc_id IN ({ids})")
            .execute(batch)
        )
    with translate_errors(f"index {name}", name):
        # Folds the new passages into the full-text (and any vector) index; the merge above is
        # already searchable without it, only slower.
        table.optimize(cleanup_older_than=_KEEP_HISTORY)
    built, index_error = False, None
    try:
        built = ensure_vector_index(table, rows_before=rows_before, column=VECTOR_COLUMN, min_rows=index_min_rows)
    except Exception as exc:  # the passages are written and searchable (exactly): report, do not fail
        index_error = f"{type(exc).__name__}: {exc}"
        _log.warning("ingest.vector_index_failed", dataset=name, error=index_error)
    with translate_errors(f"read the version of {name}", name):
        version = int(table.version)
    chunks: dict[str, int] = {}
    for document, _, _ in rows:
        chunks[document.doc_id] = chunks.get(document.doc_id, 0) + 1
    return IngestOutcome(
        dataset=name,
        version_before=before,
        version=version,
        chunks=chunks,
        replaced=int(merged.num_updated_rows) + int(merged.num_deleted_rows),
        seconds=time.perf_counter() - started,
        vector_index_built=built,
        vector_index_error=index_error,
    )
