"""search_catalog by words and by meaning, over datasets, columns and metrics the caller may read."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from lakegate.catalog.catalog_search import CatalogEntry, rank_entries
from lakegate.server.app import Runtime, open_runtime
from lakegate.server.gate.identity import CallOrigin, stdio_principal
from lakegate.server.settings import load_settings

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def rt(demo_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runtime]:
    audit = tmp_path_factory.mktemp("catalog-search-audit") / "audit.jsonl"
    opened = open_runtime(load_settings(REPO, home=demo_home, audit={"path": audit, "fsync": False}, principal=None))
    yield opened
    opened.close()


def search(runtime: Runtime, who: str, query: str, limit: int = 10) -> list[dict[str, Any]]:
    principal = stdio_principal(who, runtime.enforcer)
    origin = CallOrigin(transport="in-process", session_id="catalog-search")
    outcome = anyio.run(runtime.gate.call, "search_catalog", {"query": query, "limit": limit}, principal, origin)
    assert outcome.error is None, str(outcome.error)
    assert outcome.result is not None
    matches: list[dict[str, Any]] = outcome.result.model_dump()["matches"]
    return matches


def where(match: dict[str, Any]) -> str:
    return match["metric"] or ".".join(p for p in (match["dataset"], match["column"]) if p)


def test_meaning_finds_what_shares_no_word_with_the_query(rt: Runtime) -> None:
    top = [where(m) for m in search(rt, "analyst", "how much money did we make from sales", limit=5)]
    assert any(name in top for name in ("revenue", "net_revenue", "gross_revenue")), top
    top = [where(m) for m in search(rt, "analyst", "shopper e-mail", limit=5)]
    assert "sales.customers.email" in top, top


def test_exact_names_still_rank_first(rt: Runtime) -> None:
    assert where(search(rt, "analyst", "card_last4", limit=3)[0]) == "finance.payments.card_last4"


@pytest.mark.parametrize(
    ("who", "unseen"),
    [
        ("analyst", ("support.", "kb.")),
        ("support_agent", ("finance.",)),
    ],
)
def test_only_readable_entries_are_ranked(rt: Runtime, who: str, unseen: tuple[str, ...]) -> None:
    assert rt.gate.semantic is not None
    readable_metrics = {
        name for name in rt.gate.semantic.metric_names() if rt.enforcer.decide(who, f"metric:{name}", "read").allowed
    }
    for query in ("refund reason and amount", "support ticket body", "card payment", "revenue by month"):
        for match in search(rt, who, query, limit=50):
            assert not (match["dataset"] or "").startswith(unseen), (who, match)
            if match["kind"] == "metric":
                assert match["metric"] in readable_metrics, (who, match)


def test_ranking_fuses_words_and_meaning_without_a_model() -> None:
    entries = [CatalogEntry("email", "Contact email address."), CatalogEntry("region", "Sales region.")]
    ranked = rank_entries("email", entries, model="", embed=None, embed_query=None)
    assert [index for index, _ in ranked] == [0]
    assert rank_entries("nothing matches", entries, model="", embed=None, embed_query=None) == []
