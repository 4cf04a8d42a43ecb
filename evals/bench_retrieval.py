"""Retrieval quality: recall@10 and MRR of search_documents per mode, on labelled queries.

    python -m lakegate.evals.bench_retrieval [--home DIR] [--queries evals/retrieval_queries.yaml]
                                    [--out evals/results/bench_retrieval.json]

Builds the small demo warehouse in a temporary directory unless --home points at one. Every query
of the labelled set goes through the real tool path, `Gate.call("search_documents", ...)` as
`admin` (who may read every passage, so the labels never point at a hidden article), for the modes
vector, fulltext and hybrid, with k=10. Queries are interleaved across modes.

Metrics, per query then averaged over queries (documents, not passages, are what is labelled):
- recall@10: the share of the query's relevant doc_ids found among the doc_ids of the top-10 passages;
- MRR: 1 / rank of the first relevant document, ranking documents by their best passage (a document's
  second passage does not push the next document down); 0 when none is in the top 10;
- latency of each call through the gate (p50/p99 per mode).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import yaml

from lakegate.evals.bench_gate import percentiles

REPO = Path(__file__).resolve().parents[1]
QUERIES = REPO / "evals" / "retrieval_queries.yaml"
MODES = ("vector", "fulltext", "hybrid")
K = 10

__all__ = ["LabelledQuery", "doc_ranking", "evaluate", "load_queries", "mrr", "recall_at_k", "summarise"]


@dataclass(frozen=True)
class LabelledQuery:
    id: str
    query: str
    style: str
    relevant: tuple[str, ...]


def load_queries(path: Path = QUERIES) -> list[LabelledQuery]:
    """The labelled queries of `path`.

    Raises:
        ValueError: a query has no text, no relevant doc_id or more than three, or an id repeats.
    """
    entries = yaml.safe_load(path.read_text(encoding="utf-8"))["queries"]
    queries = [
        LabelledQuery(str(e["id"]), str(e["query"]), str(e.get("style", "question")), tuple(e["relevant"]))
        for e in entries
    ]
    for q in queries:
        if not q.query.strip() or not 1 <= len(q.relevant) <= 3:
            raise ValueError(f"query {q.id}: needs a text and 1-3 relevant doc_ids")
    if len({q.id for q in queries}) != len(queries):
        raise ValueError("query ids repeat")
    return queries


def doc_ranking(passage_doc_ids: Sequence[str]) -> list[str]:
    """Documents in the order of their best passage: duplicates after the first are dropped."""
    return list(dict.fromkeys(passage_doc_ids))


def recall_at_k(passage_doc_ids: Sequence[str], relevant: Sequence[str], k: int = K) -> float:
    """Share of `relevant` doc_ids among the doc_ids of the first `k` passages."""
    found = set(passage_doc_ids[:k])
    return sum(1 for doc in set(relevant) if doc in found) / len(set(relevant))


def mrr(passage_doc_ids: Sequence[str], relevant: Sequence[str], k: int = K) -> float:
    """1 / rank (by document) of the first relevant document in the first `k` passages; 0 if none."""
    for rank, doc in enumerate(doc_ranking(passage_doc_ids[:k]), start=1):
        if doc in set(relevant):
            return 1.0 / rank
    return 0.0


def summarise(per_query: list[dict[str, Any]], mode: str) -> dict[str, Any]:
    """Mean recall@k and MRR, and latency percentiles, of one mode's per-query results."""
    rows = [r for r in per_query if r["mode"] == mode]
    n = len(rows)
    return {
        f"recall@{K}": round(sum(r["recall"] for r in rows) / n, 4),
        "mrr": round(sum(r["mrr"] for r in rows) / n, 4),
        "hit_rate": round(sum(1 for r in rows if r["mrr"] > 0) / n, 4),
        "queries": n,
        "latency": percentiles([r["ms"] for r in rows]),
    }


async def _run(runtime: Any, queries: Sequence[LabelledQuery], modes: Sequence[str], k: int) -> list[dict[str, Any]]:
    from lakegate.server.gate.identity import CallOrigin, stdio_principal

    principal = stdio_principal("admin", runtime.enforcer)
    origin = CallOrigin(transport="bench", session_id="bench-retrieval")

    async def search(q: LabelledQuery, mode: str) -> tuple[list[str], float]:
        arguments = {"query": q.query, "mode": mode, "k": k}
        start = time.perf_counter()
        outcome = await runtime.gate.call("search_documents", arguments, principal, origin)
        ms = (time.perf_counter() - start) * 1000
        if outcome.error is not None:
            raise RuntimeError(f"{q.id} ({mode}): {outcome.error}")
        return [p.doc_id for p in outcome.result.passages], ms

    for mode in modes:  # warm the embedder, the index caches and the worker thread
        await search(queries[0], mode)
    results = []
    for q in queries:
        for mode in modes:  # interleaved: machine noise hits every mode alike
            docs, ms = await search(q, mode)
            results.append(
                {
                    "id": q.id,
                    "style": q.style,
                    "mode": mode,
                    "recall": recall_at_k(docs, q.relevant, k),
                    "mrr": mrr(docs, q.relevant, k),
                    "ms": ms,
                    "top_docs": doc_ranking(docs)[:3],
                }
            )
    return results


def evaluate(
    home: Path, queries: Sequence[LabelledQuery], *, audit: Path, modes: Sequence[str] = MODES, k: int = K
) -> dict[str, Any]:
    """Run `queries` through search_documents on the warehouse in `home`; metrics per mode and per query."""
    from lakegate.server.app import open_runtime
    from lakegate.server.settings import load_settings

    runtime = open_runtime(load_settings(REPO, home=home, audit={"path": audit, "fsync": False}, principal=None))
    try:
        per_query = anyio.run(_run, runtime, queries, modes, k)
    finally:
        runtime.close()
    by_style = {
        mode: {
            style: summarise([r for r in per_query if r["style"] == style], mode)[f"recall@{K}"]
            for style in sorted({q.style for q in queries})
        }
        for mode in modes
    }
    return {
        "modes": {mode: summarise(per_query, mode) for mode in modes},
        f"recall@{K}_by_style": by_style,
        "queries": per_query,
    }


def _build_small(home: Path) -> None:
    from lakegate.catalog.definitions import load_definitions
    from lakegate.catalog.demo import build_demo
    from lakegate.catalog.warehouse import Warehouse

    warehouse = Warehouse(home)
    try:
        build_demo(warehouse, load_definitions(REPO), "small")
    finally:
        warehouse.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--home", type=Path, help="a state directory holding the small demo warehouse")
    parser.add_argument("--queries", type=Path, default=QUERIES)
    parser.add_argument("--out", type=Path, default=REPO / "evals" / "results" / "bench_retrieval.json")
    args = parser.parse_args(argv)
    queries = load_queries(args.queries)
    with tempfile.TemporaryDirectory() as tmp:
        home = args.home or Path(tmp) / "home"
        if args.home is None:
            _build_small(home)
        report = evaluate(home, queries, audit=Path(tmp) / "audit.jsonl")
    result = {
        "benchmark": "bench_retrieval",
        "dataset": "kb.articles (small demo: 40 articles, 48 passages)",
        "principal": "admin",
        "k": K,
        "query_set": str(args.queries.relative_to(REPO) if args.queries.is_relative_to(REPO) else args.queries),
        "query_count": len(queries),
        "machine": {"python": sys.version.split()[0], "platform": platform.platform()},
        **report,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    for mode, m in result["modes"].items():
        print(
            f"{mode}: recall@{K} {m[f'recall@{K}']}, MRR {m['mrr']}, "
            f"p50 {m['latency']['p50_ms']} ms, p99 {m['latency']['p99_ms']} ms"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
