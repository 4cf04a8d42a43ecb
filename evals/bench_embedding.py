"""Embedding speed on this machine: ingest throughput and single-query latency, torch vs ONNX Runtime.

    python -m lakegate.evals.bench_embedding [--passages 2000] [--queries 200] [--device cpu]
                                    [--out evals/results/bench_embedding.json]

- Ingest: the demo's passages (catalog.demo builds them deterministically, ~180 tokens each), three
  ways in interleaved rounds: the model's forward pass alone over pre-tokenised batches already on
  the device (the ceiling), `Embedder.embed` (lakegate's pipeline, catalog/embedding_pipeline.py)
  end to end, and a plain `SentenceTransformer.encode`; passages/s and the ratios to the ceiling.
  On a GPU: `python -m lakegate.evals.bench_embedding --device cuda --passages 100000`.
- Query: `--queries` short questions from the labelled retrieval set, each embedded alone, through
  the torch path (`embed([q])`) and the ONNX path (`embed_query(q)`), interleaved so that machine
  noise hits both alike; p50/p99 per path, their ratio, and the largest difference between the two
  vectors of a query (the ONNX path must stay within 1e-6 of the ingest path).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from lakegate.evals.bench_gate import percentiles
from lakegate.evals.bench_retrieval import load_queries

REPO = Path(__file__).resolve().parents[1]


def _ingest_throughput(embedder: Any, texts: list[str], rounds: int) -> dict[str, Any]:
    """Passages/s of three ways to embed `texts`, interleaved over `rounds` (median of each):
    the model's forward pass alone over pre-tokenised batches already on the device (the
    ceiling), lakegate's pipeline end to end, and a plain `SentenceTransformer.encode`."""
    pipeline = embedder.pipeline
    on_device = [pipeline.on_device(batch) for batch in pipeline.batches(texts)]
    tokens = sum(int(batch.inputs["attention_mask"].sum()) for batch in on_device)
    pipeline.forward_only(on_device[:2])  # warm-up: kernels, allocator
    embedder.embed(texts[: pipeline.batch_size])
    timings: dict[str, list[float]] = {"forward_only": [], "pipeline": [], "encode": []}
    runs: dict[str, Any] = {
        "forward_only": lambda: pipeline.forward_only(on_device),
        "pipeline": lambda: embedder.embed(texts),
        "encode": lambda: embedder._model.encode(texts, batch_size=pipeline.batch_size, normalize_embeddings=True),
    }
    names = list(runs)
    for round_no in range(rounds):
        # Each round starts with a different way, so that warming and noise do not favour one.
        for name in names[round_no % len(names) :] + names[: round_no % len(names)]:
            started = time.perf_counter()
            runs[name]()
            timings[name].append(time.perf_counter() - started)
    rate = {name: round(len(texts) / statistics.median(seconds), 1) for name, seconds in timings.items()}
    return {
        "passages": len(texts),
        "mean_tokens": round(tokens / len(texts), 1),
        "batch_size": pipeline.batch_size,
        "rounds": rounds,
        "passages_per_s": rate,
        "pipeline_vs_forward_only": round(rate["pipeline"] / rate["forward_only"], 3),
        "encode_vs_forward_only": round(rate["encode"] / rate["forward_only"], 3),
    }


def run(passages: int, queries: int, device: str | None, rounds: int = 3) -> dict[str, Any]:
    from lakegate.catalog.demo import sample_passages
    from lakegate.catalog.embedder import get_embedder

    embedder = get_embedder(device)
    texts = sample_passages(passages)
    ingest = _ingest_throughput(embedder, texts, rounds)

    questions = [q.query for q in load_queries()]
    sample = [questions[i % len(questions)] for i in range(queries)]
    embedder.embed_query(sample[0])  # builds the ONNX encoder (~2 s, once per process)
    torch_ms: list[float] = []
    onnx_ms: list[float] = []
    worst = 0.0
    for query in sample:
        started = time.perf_counter()
        reference = embedder.embed([query])[0]
        torch_ms.append((time.perf_counter() - started) * 1000)
        started = time.perf_counter()
        fast = embedder.embed_query(query)
        onnx_ms.append((time.perf_counter() - started) * 1000)
        worst = max(worst, float(np.abs(fast - reference).max()))
    torch_p, onnx_p = percentiles(torch_ms), percentiles(onnx_ms)
    return {
        "device": embedder.device,
        "query_backend": embedder.query_backend,
        "ingest": ingest,
        "query": {
            "queries": len(sample),
            "torch_ms": torch_p,
            "onnx_ms": onnx_p,
            "p50_ratio_onnx_vs_torch": round(onnx_p["p50_ms"] / torch_p["p50_ms"], 3),
            "max_abs_difference": worst,
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--passages", type=int, default=2000)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--device", default=None, help="cpu or cuda; default: cuda when present")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the ingest comparison")
    parser.add_argument("--out", type=Path, default=REPO / "evals" / "results" / "bench_embedding.json")
    args = parser.parse_args(argv)
    result = run(args.passages, args.queries, args.device, args.rounds)
    result["machine"] = {"python": sys.version.split()[0], "platform": platform.platform()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
