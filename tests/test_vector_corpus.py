"""The vector-index benchmark's corpus (evals/vector_corpus.py): documents, distinct passages, pooled vectors.

The benchmark's figures are only as good as its corpus: passages must be distinct (ties made the old
1M-row figures meaningless), drawn within one document, and pooled exactly as documented.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lakegate.evals.vector_corpus import Corpus, build_corpus, load_corpus, passage_vectors, sample_passages

MODULE = '''"""Tools for shipping parcels. Parcels are weighed before labels are printed."""


def label(parcel):
    """Print the label of a parcel. The carrier is chosen by weight. Heavy parcels go by freight.

    >>> label(p)

    Returns the label's id.
    """


class Route:
    """A delivery route. Routes are planned every night."""
'''


def _site(tmp_path: Path) -> Path:
    root = tmp_path / "site"
    (root / "pkg").mkdir(parents=True)
    (root / "pkg" / "shipping.py").write_text(MODULE, encoding="utf-8")
    (root / "pkg" / "broken.py").write_text("def (:\n", encoding="utf-8")  # skipped, not fatal
    return root


def test_documents_are_prose_docstrings_split_into_sentences(tmp_path: Path) -> None:
    corpus = build_corpus(max_sentences=100, site_packages=_site(tmp_path))
    sentences = sorted(corpus.sentences)
    assert "Heavy parcels go by freight." in sentences
    assert not any(">>>" in s or "Returns" in s for s in sentences), "doctests and sections are not prose"
    assert all(s.endswith((".", "!", "?")) and len(s.split()) >= 4 for s in sentences)
    texts = sorted(" ".join(corpus.sentences[i] for i in d) for d in corpus.documents)
    assert "Routes are planned every night." in texts, "a sentence under four words is not kept"
    assert len(corpus.documents) == 3


def test_max_sentences_takes_whole_documents_and_holds_out_queries_from_the_rest(tmp_path: Path) -> None:
    corpus = build_corpus(max_sentences=3, site_packages=_site(tmp_path))
    assert 0 < len(corpus.sentences) <= 3
    assert sum(len(d) for d in corpus.documents) == len(corpus.sentences)
    assert corpus.held_out, "the documents past the cap give queries"
    assert not set(corpus.held_out) & set(corpus.sentences), "a query sentence is also a passage's"


def test_load_corpus_caches_what_build_corpus_returns(tmp_path: Path) -> None:
    site = _site(tmp_path)
    built = load_corpus(tmp_path / "cache", 100, 0, site_packages=site)
    assert built == build_corpus(100, 0, site_packages=site)
    (site / "pkg" / "shipping.py").unlink()  # a second load must come from the cache, not the packages
    assert load_corpus(tmp_path / "cache", 100, 0, site_packages=site) == built


def test_passages_are_distinct_and_within_one_document() -> None:
    documents = [list(range(start, start + 8)) for start in range(0, 80, 8)]
    corpus = Corpus(sentences=[f"Sentence number {i} is here." for i in range(80)], documents=documents, held_out=[])
    passages = sample_passages(corpus, 1000, seed=3)
    assert len(set(passages)) == 1000
    assert all(p == tuple(sorted(p)) and 1 <= len(p) <= 6 for p in passages)
    assert all(len({i // 8 for i in p}) == 1 for p in passages), "a passage mixes documents"
    assert sample_passages(corpus, 1000, seed=3) == passages, "not reproducible from the seed"


def test_asking_for_more_passages_than_the_corpus_gives_is_refused() -> None:
    corpus = Corpus(sentences=["A b c d.", "E f g h."], documents=[[0, 1]], held_out=[])
    with pytest.raises(ValueError, match="raise max_sentences"):
        sample_passages(corpus, 3)


def test_passage_vector_is_the_normalised_mean_of_its_sentences() -> None:
    rng = np.random.default_rng(0)
    sentence_vecs = rng.normal(size=(10, 4)).astype(np.float32)
    passages = [(0,), (1, 2), (3, 4, 5, 9)]
    out = passage_vectors(sentence_vecs, passages)
    for row, passage in zip(out, passages, strict=True):
        mean = sentence_vecs[list(passage)].mean(axis=0)
        np.testing.assert_allclose(row, mean / np.linalg.norm(mean), rtol=1e-5)
