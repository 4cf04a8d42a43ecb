"""A corpus of 1M distinct passage vectors for evals/bench_vector_index.py, built on a CPU (~20 min once).

The demo's support articles give only ~75k distinct passages (6k chunks, each in a dozen phrasings):
too few and too alike to measure an index at 1M rows (the large demo repeats each ~170 times, which
makes the exact top 10 a set of ties). Embedding 1M real ~180-token passages would take ~10 hours on
a 2-core CPU (~27 passages/s), so the benchmark uses a proxy whose vectors all come from the model:

- documents: the docstrings of the Python packages installed in this virtual environment (technical
  English on thousands of topics; the same text for anyone who installs the repo's dependencies);
- sentences: each docstring split into sentences; whole documents are taken in a seeded order until
  `max_sentences` distinct sentences, which lakegate's embedder (the ingest path) embeds once and
  `sentence_vectors` caches;
- passages: 1 to 6 sentences of one document, distinct as sets; a passage's vector is the normalised
  mean of its sentences' vectors (pooling over sentences where the model pools over tokens).

`proxy_fidelity` embeds some passages' real text with the model and reports the cosine between the
model's vector and the proxy's, so the approximation is measured, not assumed.
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import json
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import numpy.typing as npt

__all__ = [
    "Corpus",
    "build_corpus",
    "load_corpus",
    "passage_vectors",
    "proxy_fidelity",
    "sample_passages",
    "sentence_vectors",
]

MAX_PASSAGE_SENTENCES = 6
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
# Docstring paragraphs that are code, tables or section headers rather than prose.
_NOT_PROSE = re.compile(r"\s*(>>>|\.\.|[-=~]{3}|:param|Args:|Arguments:|Parameters|Returns|Raises|Examples?:?\s*$)")


@dataclasses.dataclass(frozen=True)
class Corpus:
    sentences: list[str]  # distinct
    documents: list[list[int]]  # each document's sentences, as indices into `sentences`
    held_out: list[str]  # one sentence from each of the next documents, not in `sentences`: queries

    def passage_text(self, passage: tuple[int, ...]) -> str:
        return " ".join(self.sentences[i] for i in passage)


def build_corpus(max_sentences: int, seed: int = 0, site_packages: Path | None = None, held_out: int = 1000) -> Corpus:
    """Documents and their distinct sentences, from the docstrings under `site_packages`.

    Documents are taken in a seeded order until `max_sentences`; the first new sentence of each of
    the following documents, up to `held_out`, becomes a query that no passage contains.
    """
    texts = list(_docstrings(site_packages or _site_packages()))
    split = [
        [s for s in _SENTENCE_END.split(texts[int(n)]) if _is_sentence(s)]
        for n in np.random.default_rng(seed).permutation(len(texts))
    ]
    index: dict[str, int] = {}
    documents: list[list[int]] = []
    taken = 0
    for sentences in split:
        if len(index) + len(sentences) > max_sentences:
            break
        taken += 1
        if sentences:
            documents.append(list(dict.fromkeys(index.setdefault(s, len(index)) for s in sentences)))
    queries: dict[str, None] = {}
    for sentences in split[taken:]:
        fresh = [s for s in sentences if s not in index]
        if fresh:
            queries.setdefault(fresh[0])
        if len(queries) == held_out:
            break
    return Corpus(sentences=list(index), documents=documents, held_out=list(queries))


def load_corpus(cache_dir: Path, max_sentences: int, seed: int = 0, site_packages: Path | None = None) -> Corpus:
    """build_corpus, cached in `cache_dir` (parsing every installed package takes a couple of minutes)."""
    cached = cache_dir / f"corpus-v2-{max_sentences}-{seed}.json"
    if cached.exists():
        return Corpus(**json.loads(cached.read_text(encoding="utf-8")))
    corpus = build_corpus(max_sentences, seed, site_packages)
    cache_dir.mkdir(parents=True, exist_ok=True)
    cached.write_text(json.dumps(dataclasses.asdict(corpus)), encoding="utf-8")
    return corpus


def sentence_vectors(corpus: Corpus, cache_dir: Path) -> npt.NDArray[np.float32]:
    """The embedder's vector for every sentence of `corpus`, cached in `cache_dir` by content hash."""
    from rich.progress import Progress

    from lakegate.catalog.embedder import get_embedder

    digest = hashlib.sha256("\n".join(corpus.sentences).encode()).hexdigest()[:16]
    cached = cache_dir / f"sentences-{digest}.npy"
    if cached.exists():
        return np.asarray(np.load(cached), dtype=np.float32)
    embedder = get_embedder()
    parts: list[npt.NDArray[np.float32]] = []
    with Progress() as progress:
        task = progress.add_task("embedding sentences", total=len(corpus.sentences))
        for start in range(0, len(corpus.sentences), 2048):
            parts.append(embedder.embed(corpus.sentences[start : start + 2048]))
            progress.advance(task, len(parts[-1]))
    vectors = np.concatenate(parts).astype(np.float32)
    cache_dir.mkdir(parents=True, exist_ok=True)
    np.save(cached, vectors)
    return vectors


def sample_passages(corpus: Corpus, count: int, seed: int = 0) -> list[tuple[int, ...]]:
    """`count` distinct passages (sorted sentence-index tuples), documents drawn by sentence count.

    Raises:
        ValueError: the corpus cannot give `count` distinct passages.
    """
    possible = sum(_subsets(len(d)) for d in corpus.documents)
    if count > possible // 2:  # past half, rejection sampling slows down; ask for more sentences instead
        raise ValueError(f"{len(corpus.sentences)} sentences give {possible} passages: raise max_sentences")
    rng = np.random.default_rng(seed)
    sizes = np.array([len(d) for d in corpus.documents])
    weights = sizes / sizes.sum()
    seen: set[tuple[int, ...]] = set()
    passages: list[tuple[int, ...]] = []
    while len(passages) < count:
        for doc in rng.choice(len(sizes), size=count - len(passages), p=weights):
            sentences = corpus.documents[int(doc)]
            length = int(rng.integers(1, min(MAX_PASSAGE_SENTENCES, len(sentences)) + 1))
            passage = tuple(sorted(int(i) for i in rng.choice(sentences, size=length, replace=False)))
            if passage not in seen:
                seen.add(passage)
                passages.append(passage)
    return passages


def passage_vectors(sentence_vecs: npt.NDArray[np.float32], passages: list[tuple[int, ...]]) -> npt.NDArray[np.float32]:
    """Each passage's vector: the L2-normalised mean of its sentences' vectors."""
    out = np.zeros((len(passages), sentence_vecs.shape[1]), dtype=np.float32)
    for length in range(1, MAX_PASSAGE_SENTENCES + 1):
        rows = [n for n, p in enumerate(passages) if len(p) == length]
        if rows:
            members = np.array([passages[n] for n in rows], dtype=np.int64)
            out[rows] = sentence_vecs[members].sum(axis=1)
    out /= np.linalg.norm(out, axis=1, keepdims=True)
    return out


def proxy_fidelity(
    corpus: Corpus, passages: list[tuple[int, ...]], vectors: npt.NDArray[np.float32], sample: int, seed: int = 0
) -> dict[str, float]:
    """Cosine between the model's embedding of a passage's text and its proxy vector, over `sample` passages."""
    from lakegate.catalog.embedder import get_embedder

    picks = np.random.default_rng(seed).choice(len(passages), size=min(sample, len(passages)), replace=False)
    real = get_embedder().embed([corpus.passage_text(passages[int(i)]) for i in picks])
    cosines = np.sum(real * vectors[picks], axis=1)
    multi = [c for c, i in zip(cosines, picks, strict=True) if len(passages[int(i)]) > 1]
    return {
        "passages": len(picks),
        "cosine_mean": round(float(cosines.mean()), 4),
        "cosine_p5": round(float(np.percentile(cosines, 5)), 4),
        "cosine_mean_multi_sentence": round(float(np.mean(multi)), 4) if multi else 1.0,
    }


def _site_packages() -> Path:
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    return Path(sys.prefix) / "lib" / version / "site-packages"


def _docstrings(root: Path) -> Iterator[str]:
    """Distinct prose docstrings (module, class, function) of the .py files under `root`, in path order."""
    seen: set[str] = set()
    for path in sorted(root.rglob("*.py")):
        try:
            tree = ast.parse(path.read_bytes())
        except (SyntaxError, ValueError):
            continue
        for node in ast.walk(tree):
            if not isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            doc = ast.get_docstring(node)
            if not doc:
                continue
            prose = " ".join(p for p in doc.split("\n\n") if not _NOT_PROSE.match(p))
            text = re.sub(r"\s+", " ", prose).strip()
            if text and text not in seen:
                seen.add(text)
                yield text


def _is_sentence(text: str) -> bool:
    return 4 <= len(text.split()) <= 60 and text[-1:] in ".!?"


def _subsets(n: int) -> int:
    from math import comb

    return sum(comb(n, k) for k in range(1, min(MAX_PASSAGE_SENTENCES, n) + 1))
