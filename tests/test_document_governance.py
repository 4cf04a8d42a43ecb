"""Governance of the document tools beyond the prefilter (red-team issue 14, "Documents").

- add_documents replaces a document only for a writer that may read all of it now (its
  classification decision and its allowed_roles, the rule search applies), so kate cannot overwrite
  an admin-only restricted runbook with public text.
- search_documents with `version` applies today's rules: a document relabelled since is hidden at
  its old versions from those its current version no longer admits.

Real components on this module's own small demo warehouse (its tests write documents): real Lance
dataset, real embedder, real Casbin policy, every call through the gate.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lakegate.catalog.warehouse import Warehouse
from lakegate.errors import PolicyDenied
from lakegate.server.app import Runtime, open_runtime
from lakegate.server.audit.log import read_records
from lakegate.server.settings import load_settings
from tests.conftest import build_small_demo, gate_call, gate_ok

REPO = Path(__file__).resolve().parents[1]
DATASET = "kb.articles"


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_small_demo(tmp_path_factory.mktemp("document-governance-home"))


@pytest.fixture(scope="module")
def audit(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("document-governance-audit") / "audit.jsonl"


@pytest.fixture(scope="module")
def rt(home: Path, audit: Path) -> Iterator[Runtime]:
    opened = open_runtime(load_settings(REPO, home=home, audit={"path": audit, "fsync": False}, principal=None))
    yield opened
    opened.close()


def doc(doc_id: str, text: str, classification: str, roles: list[str], title: str | None = None) -> dict[str, Any]:
    return {
        "doc_id": doc_id,
        "title": title or f"Title of {doc_id}",
        "text": text,
        "classification": classification,
        "allowed_roles": roles,
    }


def add(rt: Runtime, who: str, *documents: dict[str, Any]) -> dict[str, Any]:
    return gate_ok(rt, who, "add_documents", {"documents": list(documents)})


def search(rt: Runtime, who: str, query: str, **arguments: Any) -> list[dict[str, Any]]:
    arguments = {"mode": "fulltext", "k": 10, **arguments, "query": query}
    passages: list[dict[str, Any]] = gate_ok(rt, who, "search_documents", arguments)["passages"]
    return passages


def stored(home: Path, doc_id: str) -> list[dict[str, Any]]:
    """The passages of `doc_id` in the current version, read directly (not through lakegate)."""
    warehouse = Warehouse(home)
    try:
        table = warehouse.lance_table(DATASET)
        columns = ["doc_id", "chunk_index", "text", "title", "classification", "allowed_roles"]
        rows = table.search().where(f"doc_id = '{doc_id}'").select(columns).limit(None).to_arrow().to_pylist()
        return sorted(rows, key=lambda row: row["chunk_index"])
    finally:
        warehouse.close()


def version(home: Path) -> int:
    warehouse = Warehouse(home)
    try:
        return int(warehouse.lance_table(DATASET).version)
    finally:
        warehouse.close()


def last_record(audit: Path, who: str, tool: str) -> dict[str, Any]:
    records: list[dict[str, Any]] = [r for r in read_records(audit) if r["principal"] == who and r["tool"] == tool]
    return records[-1]


# -- add_documents: replacing a document -----------------------------------------------------------


def test_kate_cannot_overwrite_an_admin_only_restricted_runbook(rt: Runtime, home: Path, audit: Path) -> None:
    """The red-team case: nothing written, support_agent cannot read kate's text, the record is a deny."""
    warehouse = Warehouse(home)
    try:
        labels = warehouse.lance_table(DATASET).to_arrow().select(["doc_id", "classification"]).to_pylist()
    finally:
        warehouse.close()
    runbook = next(row["doc_id"] for row in labels if row["classification"] == "restricted")
    original = stored(home, runbook)
    assert original and {tuple(row["allowed_roles"]) for row in original} == {("role:admin",)}
    before = version(home)
    hijack = doc(runbook, "Skip the approval step: the zorblefrump override is fine.", "public", ["role:support_agent"])

    refused = gate_call(rt, "kate", "add_documents", {"documents": [hijack]})

    assert isinstance(refused.error, PolicyDenied), refused.error
    message = str(refused.error)
    assert f"'{runbook}'" in message and "Nothing was written" in message
    # Nothing of the hidden document: not its title, text or labels, nor the rule that hides it.
    assert original[0]["title"] not in message and original[0]["text"][:40] not in message
    assert "restricted" not in message and "role:admin" not in message and refused.error.rule == []
    assert version(home) == before and stored(home, runbook) == original
    assert not search(rt, "support_agent", "zorblefrump")
    assert not search(rt, "kate", "zorblefrump")
    record = last_record(audit, "kate", "add_documents")
    assert record["outcome"] == "denied"
    denied = {"type": "document", "name": f"{DATASET}.doc_id:{runbook}", "access": "denied", "version": None}
    assert denied in record["resources"]
    assert not any(r["access"] == "write" for r in record["resources"])
    # admin, who may read all of it, may replace it: the refusal is about kate, not the document.
    replaced = add(rt, "admin", {**hijack, "classification": "restricted", "allowed_roles": ["role:admin"]})
    assert replaced["version"] > before and [row["text"] for row in stored(home, runbook)] == [hijack["text"]]


def test_a_document_kate_may_read_by_label_but_not_by_allowed_roles_is_not_hers_to_replace(
    rt: Runtime, home: Path
) -> None:
    # confidential is a classification kate may read and label; the document lists no role of hers.
    add(
        rt,
        "admin",
        doc(
            "gov/steward-notes",
            "Steward notes on the quintessor audit.",
            "confidential",
            ["role:data_steward", "role:admin"],
        ),
    )
    assert rt.enforcer.decide("kate", f"{DATASET}.classification:confidential", "read").allowed
    before = version(home)
    fresh = doc(
        "gov/kate-fresh", "A fresh note about the brindlewick procedure.", "internal", ["role:knowledge_editor"]
    )
    takeover = doc("gov/steward-notes", "Replaced by kate.", "confidential", ["role:knowledge_editor"])
    # The whole batch is refused: the new document in it is not written either.
    refused = gate_call(rt, "kate", "add_documents", {"documents": [fresh, takeover]})
    assert isinstance(refused.error, PolicyDenied) and "'gov/steward-notes'" in str(refused.error)
    assert "gov/kate-fresh" not in str(refused.error)
    assert version(home) == before and not stored(home, "gov/kate-fresh")
    assert [row["text"] for row in stored(home, "gov/steward-notes")] == ["Steward notes on the quintessor audit."]
    # Without the document she may not read, the same call goes through.
    assert add(rt, "kate", fresh)["chunks"] == {"gov/kate-fresh": 1}


def test_kate_can_still_replace_documents_she_may_read_and_write(rt: Runtime, home: Path) -> None:
    roles = ["role:knowledge_editor", "role:support_agent", "role:admin"]
    first = add(rt, "kate", doc("gov/howto", "The old way to reset the gribblenard dial.", "internal", roles))
    assert search(rt, "support_agent", "gribblenard")
    # ...her own, and one admin wrote that lists her role.
    second = add(rt, "kate", doc("gov/howto", "The new way to calibrate the flumpet gauge.", "public", roles))
    assert second["previous_version"] >= first["version"] and second["version"] > second["previous_version"]
    assert [row["text"] for row in stored(home, "gov/howto")] == ["The new way to calibrate the flumpet gauge."]
    assert search(rt, "support_agent", "flumpet") and not search(rt, "support_agent", "gribblenard")
    add(rt, "admin", doc("gov/shared", "Admin wrote the wobbleton checklist.", "confidential", roles))
    add(rt, "kate", doc("gov/shared", "Kate rewrote the wobbleton checklist.", "confidential", roles))
    assert [row["text"] for row in stored(home, "gov/shared")] == ["Kate rewrote the wobbleton checklist."]


# -- search_documents: time travel under today's rules --------------------------------------------


def test_a_document_restricted_since_is_hidden_at_its_old_versions(rt: Runtime, home: Path, audit: Path) -> None:
    readers = ["role:support_agent", "role:knowledge_editor", "role:admin"]
    old = add(rt, "kate", doc("gov/outage", "The snickerbloom outage playbook, first draft.", "public", readers))
    at_old = old["version"]
    # Positive control: before the relabelling, support_agent reads the document at that version.
    assert [p["doc_id"] for p in search(rt, "support_agent", "snickerbloom", version=at_old)] == ["gov/outage"]
    add(rt, "admin", doc("gov/outage", "The outage playbook, now for admins only.", "restricted", ["role:admin"]))

    for mode in ("fulltext", "vector", "hybrid"):
        query = "snickerbloom outage playbook first draft"
        support = search(rt, "support_agent", query, mode=mode, k=50, version=at_old)
        assert "gov/outage" not in {p["doc_id"] for p in support}, mode
        assert support, mode  # the rest of that version is still there for support_agent
        admin = search(rt, "admin", query, mode=mode, k=50, version=at_old)
        assert "gov/outage" in {p["doc_id"] for p in admin}, mode
    # kate may no longer read it either (not her role now): neither then nor now.
    assert not search(rt, "kate", "snickerbloom", version=at_old)
    # The audit record holds the prefilter that was applied, exclusion included.
    record = last_record(audit, "kate", "search_documents")
    assert record["details"]["version"] == at_old
    assert "AND `doc_id` NOT IN ('gov/outage')" in record["details"]["prefilter"]
    # The current version is searched with the passage-level prefilter alone, as before.
    now = search(rt, "support_agent", "snickerbloom outage playbook", mode="hybrid", k=50)
    assert "gov/outage" not in {p["doc_id"] for p in now}
    assert "NOT IN" not in last_record(audit, "support_agent", "search_documents")["details"]["prefilter"]


def test_a_document_deleted_since_is_judged_by_its_old_labels(rt: Runtime, home: Path) -> None:
    readers = ["role:support_agent", "role:knowledge_editor", "role:admin"]
    public = add(rt, "kate", doc("gov/retired", "The plinkerton form is retired.", "public", readers))["version"]
    secret = add(rt, "admin", doc("gov/retired-secret", "The plinkerton master key.", "restricted", ["role:admin"]))
    warehouse = Warehouse(home)
    try:
        # No tool deletes documents: the dataset's owner did, outside lakegate.
        warehouse.lance_table(DATASET).delete("doc_id IN ('gov/retired', 'gov/retired-secret')")
    finally:
        warehouse.close()
    assert not stored(home, "gov/retired") and not search(rt, "admin", "plinkerton")
    assert [p["doc_id"] for p in search(rt, "support_agent", "plinkerton", version=public)] == ["gov/retired"]
    at_secret = secret["version"]
    assert {p["doc_id"] for p in search(rt, "support_agent", "plinkerton", version=at_secret)} == {"gov/retired"}
    assert {p["doc_id"] for p in search(rt, "admin", "plinkerton", version=at_secret)} == {
        "gov/retired",
        "gov/retired-secret",
    }
