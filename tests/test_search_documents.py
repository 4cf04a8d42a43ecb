"""search_documents: policy inside the search (prefilter), for every demo role and every mode.

Real Lance dataset (the session's small demo warehouse), real embedder, real Casbin policy; calls go
through the gate in process, and one through the MCP client over stdio.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from lakegate.catalog.document_search import CLASSIFICATIONS, RRF_K, rrf_fuse, sql_string
from lakegate.catalog.warehouse import Warehouse
from lakegate.errors import InvalidArgument, NotFound, PolicyDenied
from lakegate.evals.mcp_client import connect, text_of
from lakegate.server.app import Runtime, open_runtime
from lakegate.server.gate.gate import GateOutcome
from lakegate.server.gate.identity import CallOrigin, stdio_principal
from lakegate.server.settings import load_settings

REPO = Path(__file__).resolve().parents[1]
DATASET = "kb.articles"
MODES = ("vector", "fulltext", "hybrid")
READERS = ("support_agent", "data_steward", "admin")


@pytest.fixture(scope="module")
def rt(demo_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runtime]:
    audit = tmp_path_factory.mktemp("documents-audit") / "audit.jsonl"
    opened = open_runtime(load_settings(REPO, home=demo_home, audit={"path": audit, "fsync": False}, principal=None))
    yield opened
    opened.close()


@pytest.fixture(scope="module")
def rows(demo_home: Path) -> list[dict[str, Any]]:
    """Every passage of kb.articles, read directly (not through lakegate)."""
    warehouse = Warehouse(demo_home)
    try:
        columns = ["doc_id", "chunk_index", "text", "classification", "allowed_roles"]
        return list(warehouse.lance_table(DATASET).to_arrow().select(columns).to_pylist())
    finally:
        warehouse.close()


def call(runtime: Runtime, who: str, **arguments: Any) -> GateOutcome:
    principal = stdio_principal(who, runtime.enforcer)
    origin = CallOrigin(transport="in-process", session_id="documents")
    return anyio.run(runtime.gate.call, "search_documents", arguments, principal, origin)


def found(runtime: Runtime, who: str, **arguments: Any) -> dict[str, Any]:
    outcome = call(runtime, who, **arguments)
    assert outcome.error is None, str(outcome.error)
    assert outcome.result is not None
    return outcome.result.model_dump()


def readable(runtime: Runtime, who: str, row: dict[str, Any]) -> bool:
    """The policy, evaluated independently of the search: classification rule and allowed_roles."""
    by_class = runtime.enforcer.decide(who, f"{DATASET}.classification:{row['classification']}", "read").allowed
    return by_class and bool(set(row["allowed_roles"]) & set(runtime.enforcer.roles_for(who)))


def key(passage: dict[str, Any]) -> tuple[str, int]:
    return passage["doc_id"], passage["chunk_index"]


@pytest.mark.parametrize("who", READERS)
def test_every_role_and_mode_gets_only_readable_passages_and_k_is_filled(
    rt: Runtime, rows: list[dict[str, Any]], who: str
) -> None:
    by_key = {key(row): row for row in rows}
    allowed = [row for row in rows if readable(rt, who, row)]
    assert 0 < len(allowed) < len(rows) or who == "admin"
    word = re.compile(r"\bcustomers?\b", re.IGNORECASE)
    with_word = sum(1 for row in allowed if word.search(row["text"]))
    for mode in MODES:
        query = "customer" if mode == "fulltext" else "how do refunds work for a customer"
        for k in (10, 50):
            result = found(rt, who, query=query, mode=mode, k=k)
            passages = result["passages"]
            assert all(readable(rt, who, by_key[key(p)]) for p in passages), (who, mode)
            assert len({key(p) for p in passages}) == len(passages)
            expected = min(k, with_word if mode == "fulltext" else len(allowed))
            assert len(passages) >= expected if mode == "fulltext" else len(passages) == expected, (who, mode, k)
            assert result["version"] >= 2 and all(isinstance(p["score"], float) for p in passages)
            scores = [p["score"] for p in passages]
            assert scores == sorted(scores, reverse=True)


def test_analyst_may_not_search_and_an_unreadable_dataset_looks_missing(rt: Runtime) -> None:
    denied = call(rt, "analyst", query="refund")
    assert isinstance(denied.error, PolicyDenied)
    # Even with the tool: a dataset the caller may not read gives the same answer as a missing one.
    analyst = rt.gate.scope(stdio_principal("analyst", rt.enforcer))
    with pytest.raises(NotFound) as hidden:
        analyst.search_documents(DATASET, "refund", mode="vector", k=5)
    missing, unreadable = (
        call(rt, "support_agent", query="x", dataset=name) for name in ("kb.nope", "finance.payments")
    )
    assert isinstance(missing.error, NotFound) and isinstance(unreadable.error, NotFound)
    assert str(missing.error).replace("kb.nope", "X") == str(unreadable.error).replace("finance.payments", "X")
    assert "kb.articles" in str(hidden.value)


@pytest.mark.parametrize("who", ["support_agent", "data_steward"])
def test_a_hidden_passage_never_appears_even_for_its_own_text(
    rt: Runtime, rows: list[dict[str, Any]], who: str
) -> None:
    hidden = [row for row in rows if not readable(rt, who, row)]
    assert hidden
    target = next(row for row in hidden if row["classification"] == "restricted")
    for mode in MODES:
        result = found(rt, who, query=target["text"][:2000], mode=mode, k=50)
        keys = {key(p) for p in result["passages"]}
        assert not keys & {key(row) for row in hidden}, mode
        assert target["text"] not in {p["content"] for p in result["passages"]}
    # The same query as admin finds it first: the search itself is not what hid it.
    top = found(rt, "admin", query=target["text"], mode="vector", k=1)["passages"][0]
    assert key(top) == key(target)


def test_support_agent_classification_rules_and_allowed_roles_both_apply(rt: Runtime) -> None:
    decide = rt.enforcer.decide
    decisions = [decide("support_agent", f"{DATASET}.classification:{c}", "read").allowed for c in CLASSIFICATIONS]
    assert decisions == [True, True, True, False]
    # confidential is allowed by classification but no confidential passage lists role:support_agent.
    passages = found(rt, "support_agent", query="approval limits", mode="hybrid", k=50)["passages"]
    assert {p["classification"] for p in passages} <= {"public", "internal"}
    steward = found(rt, "data_steward", query="approval limits", mode="hybrid", k=50)["passages"]
    assert "confidential" in {p["classification"] for p in steward}


def test_fulltext_finds_an_exact_rare_word(rt: Runtime, rows: list[dict[str, Any]]) -> None:
    counts: dict[str, int] = {}
    for row in rows:
        for token in set(re.findall(r"[a-z]{7,}", row["text"].lower())):
            counts[token] = counts.get(token, 0) + 1
    rare = sorted(word for word, n in counts.items() if n == 1)
    target = next(
        (w, row) for w in rare for row in rows if w in row["text"].lower() and row["classification"] == "public"
    )
    word, row = target
    passages = found(rt, "support_agent", query=word, mode="fulltext", k=5)["passages"]
    assert passages and key(passages[0]) == key(row)
    assert passages[0]["ranks"] == {"fulltext": 1}


def test_hybrid_is_the_rrf_union_of_both_rankings(rt: Runtime) -> None:
    query = "password reset after a security incident"
    vector = found(rt, "admin", query=query, mode="vector", k=10)["passages"]
    fulltext = found(rt, "admin", query=query, mode="fulltext", k=10)["passages"]
    hybrid = found(rt, "admin", query=query, mode="hybrid", k=10)["passages"]
    expected = rrf_fuse({"vector": [key(p) for p in vector], "fulltext": [key(p) for p in fulltext]}, 10)
    assert [key(p) for p in hybrid] == [k for k, _, _ in expected]
    for passage, (_, _score, ranks) in zip(hybrid, expected, strict=True):
        assert passage["ranks"] == ranks
        assert passage["score"] == pytest.approx(sum(1 / (RRF_K + r) for r in ranks.values()), abs=1e-6)
    assert {key(p) for p in hybrid} <= {key(p) for p in vector} | {key(p) for p in fulltext}
    assert any(len(p["ranks"]) == 2 for p in hybrid)


def test_time_travel_and_a_missing_version(rt: Runtime) -> None:
    old = found(rt, "admin", query="returns policy", mode="vector", k=3, version=1)
    assert old["version"] == 1 and len(old["passages"]) == 3
    # Version 1 predates the full-text index: a clear refusal, not a backend failure.
    no_index = call(rt, "admin", query="returns policy", mode="fulltext", version=1)
    assert no_index.error is not None and "full-text index" in str(no_index.error)
    missing = call(rt, "admin", query="returns policy", version=999)
    assert isinstance(missing.error, NotFound) and "version 999" in str(missing.error)


def test_filters_narrow_the_prefilter_and_values_are_quoted(rt: Runtime) -> None:
    passages = found(rt, "admin", query="refund", mode="hybrid", k=50, filter={"classification": ["internal"]})[
        "passages"
    ]
    assert passages and {p["classification"] for p in passages} == {"internal"}
    titled = found(rt, "admin", query="refund", mode="vector", k=50, filter={"title_contains": "REFUND"})["passages"]
    assert titled and all("refund" in p["title"].lower() for p in titled)
    source = titled[0]["source"]
    same = found(rt, "admin", query="refund", mode="vector", k=50, filter={"source": source})["passages"]
    assert same and {p["source"] for p in same} == {source}
    tricky = found(rt, "admin", query="x", mode="vector", filter={"source": "x' OR '1'='1"})
    assert tricky["passages"] == []
    assert sql_string("it's") == "'it''s'"
    assert isinstance(call(rt, "admin", query="x", filter={"sql": "1=1"}).error, InvalidArgument)


def test_result_text_audit_and_content_field(rt: Runtime) -> None:
    outcome = call(rt, "support_agent", query="refund", mode="hybrid", k=3)
    assert outcome.error is None and outcome.result is not None and outcome.record is not None
    lines = outcome.text.splitlines()
    assert "retrieved content" in lines[0] and len(lines) == 4
    assert all(len(line) < 500 for line in lines)
    payload = outcome.result.model_dump()
    assert all(p["content"] for p in payload["passages"])
    record = outcome.record
    assert {"type": "dataset", "name": DATASET, "access": "read", "version": payload["version"]} in record["resources"]
    details = record["details"]
    assert details["mode"] == "hybrid" and details["k"] == 3 and details["results"] == 3 and record["rows"] == 3
    assert "array_has_any(`allowed_roles`, ['role:agent', 'role:support_agent'])" in details["prefilter"]
    assert "'restricted'" not in details["prefilter"]


def test_search_documents_over_stdio(demo_home: Path, tmp_path: Path) -> None:
    async def scenario() -> tuple[list[str], Any, str]:
        async with connect("support_agent", demo_home, LAKEGATE_AUDIT__PATH=str(tmp_path / "a.jsonl")) as client:
            tools = [tool.name for tool in (await client.list_tools()).tools]
            result = await client.call_tool("search_documents", {"query": "refund approval", "k": 4})
            assert not result.is_error, text_of(result)
            return tools, result.structured_content, text_of(result)

    tools, structured, text = anyio.run(scenario)
    assert "search_documents" in tools
    assert structured is not None and len(structured["passages"]) == 4
    assert {p["classification"] for p in structured["passages"]} <= {"public", "internal"}
    assert "retrieved content" in text
