"""The retrieval eval's own code: the labelled set's shape, the metrics, and one run through the gate.

Model quality is not asserted here (evals/bench_retrieval.py reports it); what is tested is that
the eval computes recall@10 and MRR correctly, including on a real search with a known answer.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from lakegate.catalog.warehouse import Warehouse
from lakegate.evals.bench_retrieval import LabelledQuery, evaluate, load_queries, mrr, recall_at_k

DATASET = "kb.articles"


def test_labelled_set_is_well_formed_and_points_at_real_documents(demo_home: Path) -> None:
    queries = load_queries()
    assert len(queries) >= 40
    assert {"question", "keyword", "title"} <= {q.style for q in queries}
    warehouse = Warehouse(demo_home)
    try:
        doc_ids = set(warehouse.lance_table(DATASET).to_arrow().column("doc_id").to_pylist())
    finally:
        warehouse.close()
    unknown = {doc for q in queries for doc in q.relevant} - doc_ids
    assert not unknown, f"labels name documents that do not exist: {unknown}"


def test_metrics_count_documents_not_passages() -> None:
    ranked = ["a", "a", "b", "c", "a", "d"]  # doc_ids of the passages, best first
    assert mrr(ranked, ["b"]) == pytest.approx(1 / 2)  # a's second passage does not push b down
    assert mrr(ranked, ["d"]) == pytest.approx(1 / 4)
    assert mrr(ranked, ["z"]) == 0.0
    assert mrr(ranked, ["d"], k=3) == 0.0  # d is the 6th passage: outside the top 3
    assert recall_at_k(ranked, ["a", "c", "z"]) == pytest.approx(2 / 3)
    assert recall_at_k(ranked, ["b", "b"]) == 1.0  # a repeated label counts once
    assert recall_at_k(ranked, ["d"], k=5) == 0.0


def test_eval_through_the_gate_finds_an_exact_passage_at_rank_one(demo_home: Path, tmp_path: Path) -> None:
    warehouse = Warehouse(demo_home)
    try:
        rows = warehouse.lance_table(DATASET).to_arrow().select(["doc_id", "text"]).to_pylist()
    finally:
        warehouse.close()
    # A passage that mentions its region, so its words single out one document.
    target = next(r for r in rows if r["doc_id"] == "payment-methods-latam")
    known = LabelledQuery("exact-text", target["text"], "title", ("payment-methods-latam",))
    never = LabelledQuery("no-such-doc", "warranty for a broken phone", "question", ("no-such-document",))
    report = evaluate(demo_home, [known, never], audit=tmp_path / "audit.jsonl", modes=("fulltext", "vector"))

    by_query = {(r["id"], r["mode"]): r for r in report["queries"]}
    for mode in ("fulltext", "vector"):
        assert by_query[("exact-text", mode)]["top_docs"][0] == "payment-methods-latam"
        assert by_query[("exact-text", mode)]["mrr"] == 1.0
        assert by_query[("exact-text", mode)]["recall"] == 1.0
        assert by_query[("no-such-doc", mode)]["mrr"] == 0.0
        assert by_query[("no-such-doc", mode)]["recall"] == 0.0
        summary = report["modes"][mode]
        assert summary["recall@10"] == 0.5 and summary["mrr"] == 0.5 and summary["queries"] == 2
        assert summary["latency"]["n"] == 2
