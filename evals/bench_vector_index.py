"""Benchmark: recall@10 and latency of Lance vector indexes at 1M distinct passages, policy prefilter on.

    python -m lakegate.evals.bench_vector_index [--rows 1000000] [--index-types IVF_RQ IVF_PQ IVF_HNSW_SQ]
                                       [--queries 200] [--work .tmp/vector-corpus]
                                       [--out evals/results/bench_vector_index.json]

The passages and their vectors come from evals/vector_corpus.py (real model vectors of real
sentences, pooled into distinct passages; its docstring says why and how). The first run embeds the
corpus's sentences on this machine (~17 min on 2 CPU cores) and caches them under --work; the Lance
dataset is written there too and reused while its row count matches.

Rows carry `classification` and `allowed_roles` drawn as in the demo's kb.articles, and every search
carries search_documents' prefilter for --who (support_agent), built by access_predicate from the live
policy decisions, with the ACL columns indexed as catalog/vector_index.py does.

Two sets of --queries query vectors, each the model's embedding of real text that no row holds:
- other_documents (the harder, headline set): a sentence of a docstring outside the corpus, so no
  passage shares its text;
- held_out_passages: a passage's text left out of the dataset; its document's other passages share
  sentences with it, so its neighbours are close (the easier case of a query about a known topic).
The exact top 10 of each is computed with numpy over the rows the prefilter admits (the ground
truth); recall@10 is the share of it that a search returns. For each index type in turn: build
it with catalog/vector_index.py (timed), then each search setting in turn on the same query,
interleaved, p50/p99 latency over --calls searches. Reference points in the same run: lancedb's own
exact search (the index bypassed), numpy exact search on this CPU, and, when CUDA is available,
exact search over the same vectors in fp16 on the GPU (per query and batched).
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
import numpy.typing as npt

from lakegate.evals.bench_gate import percentiles
from lakegate.policies.resources import classification_resource

REPO = Path(__file__).resolve().parents[1]
K = 10
GOAL_RECALL = 0.95
GOAL_P99_MS = 20.0
SETTINGS: dict[str, list[dict[str, int]]] = {
    "IVF_RQ": [
        {"nprobes": 40, "refine_factor": 10},
        {"nprobes": 80, "refine_factor": 10},
        {"nprobes": 80, "refine_factor": 20},
        {"nprobes": 120, "refine_factor": 20},
        {"nprobes": 160, "refine_factor": 20},
    ],
    "IVF_PQ": [
        {"nprobes": 20, "refine_factor": 10},
        {"nprobes": 20, "refine_factor": 30},
        {"nprobes": 40, "refine_factor": 30},
        {"nprobes": 40, "refine_factor": 60},
        {"nprobes": 80, "refine_factor": 60},
    ],
    "IVF_HNSW_SQ": [
        {"nprobes": 10, "ef": 100, "refine_factor": 1},
        {"nprobes": 20, "ef": 100, "refine_factor": 1},
        {"nprobes": 20, "ef": 200, "refine_factor": 5},
        {"nprobes": 40, "ef": 200, "refine_factor": 5},
        {"nprobes": 40, "ef": 400, "refine_factor": 10},
    ],
}
Vectors = npt.NDArray[np.float32]


def _predicate(who: str) -> str:
    """search_documents' prefilter for `who`, from the live policy (as in CallScope.search_documents)."""
    import tempfile

    from lakegate.catalog.document_search import CLASSIFICATIONS, access_predicate
    from lakegate.server.app import open_runtime
    from lakegate.server.settings import load_settings

    with tempfile.TemporaryDirectory() as home:
        settings = load_settings(REPO, home=Path(home), audit={"path": Path(home) / "audit.jsonl"}, principal=None)
        runtime = open_runtime(settings)
        try:
            enforcer = runtime.enforcer
            readable = [
                c
                for c in CLASSIFICATIONS
                if enforcer.decide(who, classification_resource("kb.articles", c), "read").allowed
            ]
            predicate = access_predicate(readable, enforcer.roles_for(who))
        finally:
            runtime.close()
    assert predicate is not None, f"{who} may read no passage"
    return predicate


def _open_table(work: Path, vectors: Vectors, seed: int) -> Any:
    """The Lance dataset of `vectors` with demo-like ACL columns, written unless it is there already
    (named by a digest of the vectors and the seed: other --rows, --queries or --seed give other rows)."""
    import hashlib

    import lancedb
    import pyarrow as pa

    from lakegate.catalog.demo import kb_access_columns

    digest = hashlib.sha256(vectors.tobytes()).hexdigest()[:12]
    name = f"passages_{digest}_{seed}"
    db = lancedb.connect(work / "lance")
    if name in db.list_tables().tables:
        existing = db.open_table(name)
        if existing.count_rows() == len(vectors):
            return existing
    classifications, readers = kb_access_columns(len(vectors), seed)
    schema = pa.schema(
        [
            pa.field("id", pa.int64()),
            pa.field("classification", pa.string()),
            pa.field("allowed_roles", pa.list_(pa.string())),
            pa.field("vector", pa.list_(pa.float32(), vectors.shape[1])),
        ]
    )
    table: Any = None
    for start in range(0, len(vectors), 100_000):
        stop = min(start + 100_000, len(vectors))
        batch = pa.Table.from_arrays(
            [
                pa.array(np.arange(start, stop, dtype=np.int64)),
                pa.array(classifications[start:stop], pa.string()),
                pa.array(readers[start:stop], pa.list_(pa.string())),
                pa.FixedSizeListArray.from_arrays(pa.array(vectors[start:stop].reshape(-1)), vectors.shape[1]),
            ],
            schema=schema,
        )
        if table is None:
            table = db.create_table(name, batch, mode="overwrite")
        else:
            table.add(batch)
    return table


def _search(table: Any, vector: Vectors, predicate: str, setting: dict[str, int] | None) -> list[int]:
    """search_documents' vector search: the index searched with `setting`, or exact when None."""
    from lakegate.catalog.vector_index import SearchParams, with_search_params

    builder: Any = table.search(vector, vector_column_name="vector").distance_type("cosine")
    builder = builder.where(predicate, prefilter=True).select(["id", "_distance"]).limit(K)
    exact = setting is None
    builder = builder.bypass_vector_index() if exact else with_search_params(builder, SearchParams(**setting or {}))
    return [int(i) for i in builder.to_arrow()["id"].to_pylist()]


def _exact_cpu(readable: Vectors, queries: Vectors) -> tuple[list[list[int]], list[float]]:
    """Exact top-K row positions in `readable` per query (numpy, one query at a time), with latencies."""
    tops: list[list[int]] = []
    ms: list[float] = []
    for q in queries:
        t0 = time.perf_counter()
        scores = readable @ q
        top = np.argpartition(-scores, K)[:K]
        tops.append([int(i) for i in top[np.argsort(-scores[top])]])
        ms.append((time.perf_counter() - t0) * 1000)
    return tops, ms


def _exact_gpu(readable: Vectors, queries: Vectors, truth: list[set[int]], ids: Any) -> dict[str, Any] | None:
    """Exact top-K on the GPU in fp16: per-query latency, batched throughput, and recall@10 against
    the fp32 truth (fp16 scores can reorder near ties); None without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return None
    base = torch.from_numpy(readable).to("cuda", dtype=torch.float16)
    q = torch.from_numpy(queries).to("cuda", dtype=torch.float16)
    batch = q.repeat(max(1, 10_000 // len(q)), 1)
    for _ in range(3):  # warm both shapes
        torch.topk(base @ q[0], K)
        torch.topk(batch[:1000] @ base.T, K, dim=1)
    torch.cuda.synchronize()
    ms: list[float] = []
    found: list[set[int]] = []
    for row in q:
        t0 = time.perf_counter()
        top = torch.topk(base @ row, K).indices.cpu()
        ms.append((time.perf_counter() - t0) * 1000)
        found.append(set(ids[top.numpy()].tolist()))
    t0 = time.perf_counter()
    for start in range(0, len(batch), 1000):
        torch.topk(batch[start : start + 1000] @ base.T, K, dim=1).indices.cpu()
    seconds = time.perf_counter() - t0
    return {
        "device": torch.cuda.get_device_name(0),
        "per_query": percentiles(ms),
        "batched_queries_per_s": round(len(batch) / seconds),
        "recall@10_vs_fp32": round(float(np.mean([len(f & t) / K for f, t in zip(found, truth, strict=True)])), 4),
    }


def run(
    *, rows: int, sentences: int, index_types: Sequence[str], queries: int, calls: int, who: str, work: Path, seed: int
) -> dict[str, Any]:
    from lakegate.catalog.embedder import get_embedder
    from lakegate.catalog.vector_index import build_vector_index, index_params
    from lakegate.evals.vector_corpus import (
        load_corpus,
        passage_vectors,
        proxy_fidelity,
        sample_passages,
        sentence_vectors,
    )

    corpus = load_corpus(work, sentences, seed)
    sentence_vecs = sentence_vectors(corpus, work)
    passages = sample_passages(corpus, rows + queries, seed)
    vectors = passage_vectors(sentence_vecs, passages[:rows])
    fidelity = proxy_fidelity(corpus, passages[:rows], vectors, sample=300, seed=seed)
    print(f"{rows} passages from {len(corpus.sentences)} sentences; proxy fidelity {fidelity}", flush=True)
    embedder = get_embedder()
    query_texts = {
        # A sentence of a document outside the corpus: no passage shares its text (the headline).
        "other_documents": corpus.held_out[:queries],
        # The text of a passage left out of the table: its document's other passages share sentences.
        "held_out_passages": [corpus.passage_text(p) for p in passages[rows:]],
    }
    query_vecs = {name: embedder.embed(texts) for name, texts in query_texts.items()}

    table = _open_table(work, vectors, seed)
    predicate = _predicate(who)
    admitted = table.search().where(predicate).select(["id"]).limit(len(vectors)).to_arrow()
    readable_ids = np.sort(admitted["id"].to_numpy())
    readable = np.ascontiguousarray(vectors[readable_ids])
    truth: dict[str, list[set[int]]] = {}
    exact_ms: list[float] = []
    for name, vecs in query_vecs.items():
        positions, ms = _exact_cpu(readable, vecs)
        truth[name] = [set(readable_ids[p].tolist()) for p in positions]
        exact_ms += ms
    gpu = _exact_gpu(readable, query_vecs["other_documents"], truth["other_documents"], readable_ids)

    lance_exact_ms = []
    for n in range(min(20, queries)):  # lancedb's flat search takes seconds at 1M rows: a sample
        t0 = time.perf_counter()
        found = _search(table, query_vecs["other_documents"][n], predicate, None)
        lance_exact_ms.append((time.perf_counter() - t0) * 1000)
        assert set(found) == truth["other_documents"][n], "lancedb's exact search disagrees with numpy's"

    indexes: list[dict[str, Any]] = []
    for index_type in index_types:
        params = index_params(rows, index_type)  # type: ignore[arg-type]
        t0 = time.perf_counter()
        build_vector_index(table, params=params)
        build_s = round(time.perf_counter() - t0, 1)
        print(f"built {params} in {build_s} s", flush=True)
        settings = _sweep(table, predicate, query_vecs, truth, index_type, calls)
        indexes.append({"params": params.__dict__, "build_s": build_s, "settings": settings})

    chosen = [
        {"index_type": i["params"]["index_type"], **s}
        for i in indexes
        for s in i["settings"]
        if all(r >= GOAL_RECALL for r in s["recall@10"].values())
        and all(lat["p99_ms"] < GOAL_P99_MS for lat in s["latency"].values())
    ]
    return {
        "rows": rows,
        "corpus": {"sentences": len(corpus.sentences), "documents": len(corpus.documents), "proxy_fidelity": fidelity},
        "principal": who,
        "prefilter": predicate,
        "readable_rows": len(readable_ids),
        "k": K,
        "query_vectors": {name: len(v) for name, v in query_vecs.items()},
        "calls_per_setting": calls,
        "goal": {"recall@10": GOAL_RECALL, "p99_ms": GOAL_P99_MS},
        "exact": {
            "lancedb_flat": percentiles(lance_exact_ms),
            "numpy_cpu": percentiles(exact_ms),
            "gpu_fp16": gpu,
        },
        "indexes": indexes,
        "meets_goal": sorted(chosen, key=lambda s: max(lat["p99_ms"] for lat in s["latency"].values())),
    }


def _sweep(
    table: Any,
    predicate: str,
    queries: dict[str, Vectors],
    truth: dict[str, list[set[int]]],
    index_type: str,
    calls: int,
) -> list[dict[str, Any]]:
    """Each setting of `index_type` in turn on the same query, per query set: recall@10 and latency."""
    settings = SETTINGS[index_type]
    for setting in settings:  # warm the index and file pages
        _search(table, queries["other_documents"][0], predicate, setting)
    keys = [(s, name) for s in range(len(settings)) for name in queries]
    recall: dict[tuple[int, str], list[float]] = {key: [] for key in keys}
    ms: dict[tuple[int, str], list[float]] = {key: [] for key in keys}
    for call in range(calls):
        for name, vecs in queries.items():
            n = call % len(vecs)
            for s, setting in enumerate(settings):
                t0 = time.perf_counter()
                found = _search(table, vecs[n], predicate, setting)
                ms[s, name].append((time.perf_counter() - t0) * 1000)
                if call < len(vecs):
                    recall[s, name].append(len(truth[name][n] & set(found)) / K)
    out: list[dict[str, Any]] = []
    for s, setting in enumerate(settings):
        out.append(
            {
                **setting,
                "recall@10": {name: round(float(np.mean(recall[s, name])), 4) for name in queries},
                "recall@10_p5": {name: round(float(np.percentile(recall[s, name], 5)), 4) for name in queries},
                "latency": {name: percentiles(ms[s, name]) for name in queries},
            }
        )
        summary = ", ".join(
            f"{name}: recall {out[-1]['recall@10'][name]} p50 {out[-1]['latency'][name]['p50_ms']} ms "
            f"p99 {out[-1]['latency'][name]['p99_ms']} ms"
            for name in queries
        )
        print(f"{index_type} {setting}: {summary}", flush=True)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0] if __doc__ else None, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--sentences", type=int, default=80_000, help="distinct sentences embedded for the corpus")
    parser.add_argument(
        "--index-types",
        nargs="*",
        choices=sorted(SETTINGS),
        default=list(SETTINGS),
        help="given with no value: exact search only",
    )
    parser.add_argument("--queries", type=int, default=200, help="queries of each set (see above)")
    parser.add_argument("--calls", type=int, default=400, help="timed searches per setting")
    parser.add_argument("--who", default="support_agent")
    parser.add_argument("--work", type=Path, default=REPO / ".tmp" / "vector-corpus", help="cache directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="default: evals/results/bench_vector_index[_exact].json")
    args = parser.parse_args(argv)
    name = "bench_vector_index" if args.index_types else "bench_vector_index_exact"  # never overwrite the sweep
    args.out = args.out or REPO / "evals" / "results" / f"{name}.json"
    report = run(
        rows=args.rows,
        sentences=args.sentences,
        index_types=args.index_types,
        queries=args.queries,
        calls=args.calls,
        who=args.who,
        work=args.work,
        seed=args.seed,
    )
    result = {
        "benchmark": "bench_vector_index",
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
