"""Benchmark: exact (flat) vector search versus an ANN index on kb.articles, with the policy prefilter.

    python -m evals.bench_vector_index --home DIR [--build] [--calls 200]
                                       [--out evals/results/bench_vector_index.json]

DIR holds the large demo warehouse (1M passages): LAKEGATE_HOME=DIR lakegate demo --scale large.
--build (re)builds the index with catalog/vector_index.py's parameters (or --index-type,
--partitions, --sub-vectors) and reports the build time; without it the existing index is used.

Every search carries the same prefilter as search_documents for `support_agent` (built by
access_predicate from the live policy decisions) and ranks by cosine distance, k=10. Query vectors:
the labelled queries of evals/retrieval_queries.yaml, embedded once, cycled over --calls searches.
In one run, interleaved: exact search (the index bypassed) and the index at each (nprobes,
refine_factor) setting; p50/p99 latency of each, and recall@10 of each against exact search.

The 1M rows repeat 6k distinct passages (~170 copies each, with identical vectors), so the exact
top 10 is usually ten copies of one or two passages, picked arbitrarily among exact ties. Recall is
therefore reported three ways:
- recall_distance (the headline): a returned row counts when its exact cosine distance is within the
  exact 10th-best distance (+1e-5): tie-robust, the usual definition of ANN recall;
- recall_text: share of the exact top 10's distinct passage texts that the index also returned;
- recall_rowid: share of the exact top 10's row ids returned (penalised by arbitrary tie-breaking;
  doc_id/chunk_index are synthetic per row at this scale, so they identify rows, not passages).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from evals.bench_gate import percentiles

REPO = Path(__file__).resolve().parents[1]
DATASET = "kb.articles"
K = 10
EPS = 1e-5
SETTINGS = ((10, 10), (20, 10), (20, 30), (40, 10), (40, 30))  # (nprobes, refine_factor)


def _predicate(home: Path, who: str) -> str:
    """search_documents' prefilter for `who`, from the live policy (as in CallScope.search_documents)."""
    from catalog.document_search import CLASSIFICATIONS, access_predicate
    from server.app import open_runtime
    from server.settings import load_settings

    runtime = open_runtime(load_settings(REPO, home=home, audit={"path": home / "bench-audit.jsonl"}, principal=None))
    try:
        enforcer = runtime.enforcer
        readable = [c for c in CLASSIFICATIONS if enforcer.decide(who, f"{DATASET}.classification:{c}", "read").allowed]
        predicate = access_predicate(readable, enforcer.roles_for(who))
    finally:
        runtime.close()
    assert predicate is not None, f"{who} may read no passage"
    return predicate


def _search(table: Any, vector: Any, predicate: str, *, exact: bool, nprobes: int = 0, refine: int = 0) -> Any:
    builder: Any = table.search(vector, vector_column_name="vector").distance_type("cosine")
    builder = builder.where(predicate, prefilter=True).select(["text", "_distance"]).with_row_id(True).limit(K)
    builder = builder.bypass_vector_index() if exact else builder.nprobes(nprobes).refine_factor(refine)
    return builder.to_arrow()


def _recall(found: Any, truth: Any, vector: Any, vectors_by_rowid: dict[int, Any]) -> dict[str, float]:
    threshold = float(truth["_distance"][-1].as_py()) + EPS
    ids = found["_rowid"].to_pylist()
    # The index's own _distance can be approximate (PQ without refinement): recompute it exactly.
    exact = [1.0 - float(np.dot(vectors_by_rowid[i], vector)) for i in ids]
    truth_texts = set(truth["text"].to_pylist())
    return {
        "distance": sum(1 for d in exact if d <= threshold) / K,
        "text": len(truth_texts & set(found["text"].to_pylist())) / len(truth_texts),
        "rowid": len(set(truth["_rowid"].to_pylist()) & set(ids)) / K,
    }


def run(home: Path, *, calls: int, who: str, build: bool, index_args: dict[str, Any]) -> dict[str, Any]:
    import lancedb

    from catalog.embedder import get_embedder
    from catalog.vector_index import VECTOR_INDEX, IndexParams, build_vector_index, has_vector_index
    from evals.bench_retrieval import load_queries

    predicate = _predicate(home, who)
    table = lancedb.connect(home / "lance").open_table(DATASET)
    rows = table.count_rows()
    params = IndexParams(**{**VECTOR_INDEX.__dict__, **{k: v for k, v in index_args.items() if v is not None}})
    build_s = None
    if build:
        start = time.perf_counter()
        build_vector_index(table, params=params)
        build_s = round(time.perf_counter() - start, 1)
        print(f"built {params} in {build_s}s", flush=True)
    if not has_vector_index(table):
        raise SystemExit(f"{DATASET} has no vector index: run with --build")
    index = next(i for i in table.list_indices() if "vector" in i.columns)

    texts = list(dict.fromkeys(q.query for q in load_queries()))[:50]
    vectors = get_embedder().embed(texts)
    start = time.perf_counter()
    get_embedder().embed([texts[0]])
    embed_ms = (time.perf_counter() - start) * 1000

    for v in vectors[:2]:  # warm caches (index, file pages) for both paths
        _search(table, v, predicate, exact=True)
        for nprobes, refine in SETTINGS:
            _search(table, v, predicate, exact=False, nprobes=nprobes, refine=refine)

    truth: list[Any] = []
    exact_ms: list[float] = []
    for v in vectors:  # the exact answer per distinct query vector: one flat search each
        t0 = time.perf_counter()
        truth.append(_search(table, v, predicate, exact=True))
        exact_ms.append((time.perf_counter() - t0) * 1000)
    needed = {int(i) for t in truth for i in t["_rowid"].to_pylist()}

    ann_ms: dict[tuple[int, int], list[float]] = {s: [] for s in SETTINGS}
    found: dict[tuple[int, int], list[Any]] = {s: [] for s in SETTINGS}
    for call in range(calls):  # interleaved: each setting in turn on the same query
        n = call % len(vectors)
        extra_exact = call >= len(vectors) and call < 2 * len(vectors)
        for setting in SETTINGS:
            t0 = time.perf_counter()
            result = _search(table, vectors[n], predicate, exact=False, nprobes=setting[0], refine=setting[1])
            ann_ms[setting].append((time.perf_counter() - t0) * 1000)
            if call < len(vectors):
                found[setting].append(result)
                needed |= {int(i) for i in result["_rowid"].to_pylist()}
        if extra_exact:  # a second exact sample per query vector, interleaved with the index
            t0 = time.perf_counter()
            _search(table, vectors[n], predicate, exact=True)
            exact_ms.append((time.perf_counter() - t0) * 1000)

    fetched = table.take_row_ids(sorted(needed)).with_row_id().select(["vector"]).to_arrow()
    by_rowid = {
        int(r): np.asarray(v, dtype=np.float32)
        for r, v in zip(fetched["_rowid"].to_pylist(), fetched["vector"].to_pylist(), strict=True)
    }

    settings_out: list[dict[str, Any]] = []
    for setting in SETTINGS:
        scores = [_recall(f, t, v, by_rowid) for f, t, v in zip(found[setting], truth, vectors, strict=True)]
        settings_out.append(
            {
                "nprobes": setting[0],
                "refine_factor": setting[1],
                "recall_distance@10": round(float(np.mean([s["distance"] for s in scores])), 4),
                "recall_distance@10_min": round(float(np.min([s["distance"] for s in scores])), 4),
                "recall_text@10": round(float(np.mean([s["text"] for s in scores])), 4),
                "recall_rowid@10": round(float(np.mean([s["rowid"] for s in scores])), 4),
                "latency": percentiles(ann_ms[setting]),
            }
        )
        s = settings_out[-1]
        print(
            f"nprobes {setting[0]} refine {setting[1]}: recall {s['recall_distance@10']} "
            f"(text {s['recall_text@10']}, rowid {s['recall_rowid@10']}), "
            f"p50 {s['latency']['p50_ms']} ms, p99 {s['latency']['p99_ms']} ms",
            flush=True,
        )
    exact_p = percentiles(exact_ms)
    print(f"exact: p50 {exact_p['p50_ms']} ms, p99 {exact_p['p99_ms']} ms", flush=True)
    distinct = [len(set(t["text"].to_pylist())) for t in truth]
    return {
        "rows": rows,
        "principal": who,
        "prefilter": predicate,
        "readable_rows": table.count_rows(predicate),
        "k": K,
        "query_vectors": len(vectors),
        "calls_per_setting": calls,
        "index": {"type": str(index.index_type), "params": params.__dict__, "build_s": build_s},
        "exact": {"latency": exact_p},
        "settings": settings_out,
        "exact_top10_distinct_texts_mean": round(float(np.mean(distinct)), 2),
        "query_embedding_ms": round(embed_ms, 2),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--home", type=Path, required=True, help="state directory with the large demo warehouse")
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--who", default="support_agent")
    parser.add_argument("--build", action="store_true", help="(re)build the index first, timing it")
    parser.add_argument("--index-type", choices=["IVF_PQ", "IVF_HNSW_SQ"])
    parser.add_argument("--partitions", type=int, dest="num_partitions")
    parser.add_argument("--sub-vectors", type=int, dest="num_sub_vectors")
    parser.add_argument("--out", type=Path, default=REPO / "evals" / "results" / "bench_vector_index.json")
    args = parser.parse_args(argv)
    index_args = {
        "index_type": args.index_type,
        "num_partitions": args.num_partitions,
        "num_sub_vectors": args.num_sub_vectors,
    }
    report = run(args.home, calls=args.calls, who=args.who, build=args.build, index_args=index_args)
    result = {
        "benchmark": "bench_vector_index",
        "dataset": DATASET,
        "machine": {"python": sys.version.split()[0], "platform": platform.platform(), "cpus": _cpus()},
        **report,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0))


if __name__ == "__main__":
    raise SystemExit(main())
