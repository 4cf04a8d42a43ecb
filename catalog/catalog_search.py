"""Ranking catalog entries (datasets, columns, metrics) for search_catalog: by words and by meaning.

Words find what an agent names exactly ("card_last4"); meaning finds what it describes in its own
terms ("how much money did we make" -> the revenue metric, "shopper e-mail" -> customers.email).
Both rankings are fused by reciprocal rank (k=60, as search_documents does), so neither score scale
has to be tuned against the other. Entry vectors come from the same embedder as document search and
are cached per text for the life of the process (the catalog has a few hundred entries).

Only entries the caller may read are ever passed in: policy is applied before ranking.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import structlog

__all__ = ["MIN_SIMILARITY", "RRF_K", "STARTING_UP_NOTE", "CatalogEntry", "rank_entries", "warm_entries"]

RRF_K = 60
#: Cosine similarity below which a meaning-only match is noise for all-MiniLM-L6-v2.
MIN_SIMILARITY = 0.3
#: What a search says when it ranked by words alone because the encoder was still being built.
STARTING_UP_NOTE = "ranked by words only: matching by meaning is still starting up; ask again in a few seconds"

_WORD = re.compile(r"[a-z0-9]+")
_log = structlog.get_logger(__name__)
_vectors: dict[tuple[str, str], npt.NDArray[np.float32]] = {}
_vectors_lock = threading.Lock()

Embed = Callable[[Sequence[str]], npt.NDArray[np.float32]]
EmbedQuery = Callable[[str], npt.NDArray[np.float32]]


@dataclass(frozen=True)
class CatalogEntry:
    """A dataset, column or metric as search sees it: its name, description and tags."""

    name: str
    description: str
    tags: tuple[str, ...] = ()

    @property
    def text(self) -> str:
        """What is embedded: the name in words, then the description and tags."""
        tags = f" Tags: {', '.join(self.tags)}." if self.tags else ""
        return f"{self.name.replace('_', ' ').replace('.', ' ')}: {self.description}{tags}"


def word_score(words: set[str], entry: CatalogEntry) -> float:
    """Matched query words, names weighted twice descriptions and tags."""
    name_words = set(_WORD.findall(entry.name.lower()))
    text_words = set(_WORD.findall(entry.description.lower())) | {t.lower() for t in entry.tags}
    return 2.0 * len(words & name_words) + 1.0 * len(words & text_words)


def rank_entries(
    query: str,
    entries: Sequence[CatalogEntry],
    *,
    model: str,
    embed: Embed | None,
    embed_query: EmbedQuery | None,
) -> list[tuple[int, float]]:
    """Indexes of `entries` that match `query`, best first, with their fused score.

    `embed`/`embed_query` None (no model available) ranks by words alone. `model` keys the vector
    cache, so vectors of another model are never mixed in.
    """
    words = set(_WORD.findall(query.lower()))
    by_words = sorted(
        ((i, s) for i, e in enumerate(entries) if (s := word_score(words, e)) > 0), key=lambda item: -item[1]
    )
    by_meaning: list[tuple[int, float]] = []
    if embed is not None and embed_query is not None and entries:
        matrix = _entry_vectors(entries, model, embed)
        similarity = matrix @ embed_query(query)
        by_meaning = sorted(
            ((i, float(s)) for i, s in enumerate(similarity) if s >= MIN_SIMILARITY), key=lambda item: -item[1]
        )
    fused: dict[int, float] = {}
    for ranking in (by_words, by_meaning):
        for rank, (index, _) in enumerate(ranking, start=1):
            fused[index] = fused.get(index, 0.0) + 1.0 / (RRF_K + rank)
    return sorted(fused.items(), key=lambda item: (-item[1], item[0]))


def warm_entries(entries: Sequence[CatalogEntry], model: str, embed: Embed) -> int:
    """Embed the entries not embedded yet (the server's warm-up does it before the first search);
    returns how many the cache holds for `model`."""
    _entry_vectors(entries, model, embed)
    with _vectors_lock:
        return sum(1 for key in _vectors if key[0] == model)


def _entry_vectors(entries: Sequence[CatalogEntry], model: str, embed: Embed) -> npt.NDArray[np.float32]:
    texts = [entry.text for entry in entries]
    with _vectors_lock:
        missing = sorted({t for t in texts if (model, t) not in _vectors})
        if missing:
            _log.info("catalog_entries_embedded", count=len(missing))
            for text, vector in zip(missing, embed(missing), strict=True):
                _vectors[(model, text)] = vector
        return np.stack([_vectors[(model, t)] for t in texts])
