"""Ingest: chunking, add_documents through the gate, replacement of re-ingested documents, policy,
audit, MCP progress over stdio, and `lakegate ingest` on a folder of files.

Real components on this module's own small demo warehouse (writes never touch the session's one):
real Lance dataset, real embedder, real Casbin policy.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from click.testing import CliRunner

from lakegate.catalog.chunking import chunk_text, paragraphs
from lakegate.catalog.ingest import Document, parse_file
from lakegate.catalog.warehouse import Warehouse
from lakegate.errors import InvalidArgument, NotFound, PolicyDenied
from lakegate.evals.mcp_client import connect
from lakegate.server.app import Runtime, open_runtime
from lakegate.server.audit.log import read_records
from lakegate.server.cli.main import cli
from lakegate.server.gate.gate import GateOutcome
from lakegate.server.gate.identity import stdio_principal
from lakegate.server.settings import load_settings
from tests.conftest import build_small_demo, gate_call, gate_ok

REPO = Path(__file__).resolve().parents[1]
DATASET = "kb.articles"
EDITOR_ROLES = ["role:knowledge_editor", "role:admin"]


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """This module's own warehouse: its tests write documents."""
    return build_small_demo(tmp_path_factory.mktemp("ingest-home"))


@pytest.fixture(scope="module")
def audit(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("ingest-audit") / "audit.jsonl"


@pytest.fixture(scope="module")
def rt(home: Path, audit: Path) -> Iterator[Runtime]:
    opened = open_runtime(load_settings(REPO, home=home, audit={"path": audit, "fsync": False}, principal=None))
    yield opened
    opened.close()


def call(runtime: Runtime, who: str, tool: str, **arguments: Any) -> GateOutcome:
    return gate_call(runtime, who, tool, arguments, session_id="t")


def ok(runtime: Runtime, who: str, tool: str, **arguments: Any) -> dict[str, Any]:
    return gate_ok(runtime, who, tool, arguments, session_id="t")


def doc(doc_id: str, text: str, classification: str = "internal", **extra: Any) -> dict[str, Any]:
    return {
        "doc_id": doc_id,
        "title": f"Title of {doc_id}",
        "text": text,
        "classification": classification,
        "allowed_roles": EDITOR_ROLES,
        **extra,
    }


def rows_of(home: Path, doc_id: str) -> list[dict[str, Any]]:
    warehouse = Warehouse(home)
    try:
        table = warehouse.lance_table(DATASET)
        found = table.search().where(f"doc_id = '{doc_id}'").select(["doc_id", "chunk_index", "text"]).to_arrow()
        return sorted(found.to_pylist(), key=lambda r: r["chunk_index"])
    finally:
        warehouse.close()


def indexed(home: Path) -> bool:
    """Whether kb.articles has a vector index now."""
    from lakegate.catalog.vector_index import has_vector_index

    warehouse = Warehouse(home)
    try:
        return has_vector_index(warehouse.lance_table(DATASET))
    finally:
        warehouse.close()


def sentences(count: int, word: str) -> str:
    return " ".join(f"Sentence {i} about the {word} procedure is written here for testing." for i in range(count))


# -- chunking ------------------------------------------------------------------------------------


def test_chunks_end_between_sentences_prefer_paragraphs_and_overlap_whole_sentences() -> None:
    text = sentences(12, "alpha") + "\n\n" + sentences(12, "beta") + "\n\n  \n" + sentences(3, "gamma")
    assert paragraphs(text)[2].startswith("Sentence 0 about the gamma")
    plain = chunk_text(text, size=400)
    assert plain == chunk_text(text, size=400)  # deterministic
    assert all(c.endswith(".") and c.startswith("Sentence") for c in plain)
    assert all(len(c) <= 400 * 1.25 for c in plain) and len(plain) >= 4
    # Whole text preserved, in order, when there is no overlap.
    assert " ".join(plain) == " ".join(paragraphs(text))
    # A paragraph end is a cut: no chunk mixes alpha and beta.
    assert not any("alpha" in c and "beta" in c for c in plain)
    overlapped = chunk_text(text, size=400, overlap=120)
    assert len(overlapped) == len(plain) and overlapped[0] == plain[0]
    for before, (chunk, original) in zip(plain, zip(overlapped[1:], plain[1:], strict=True), strict=False):
        tail = chunk[: len(chunk) - len(original)].strip()
        assert chunk.endswith(original) and 0 < len(tail) <= 120 and before.endswith(tail)
    # A "sentence" longer than a chunk is cut between words; blank text gives nothing.
    long = chunk_text("word " * 500, size=200)
    assert all(len(c) <= 250 for c in long) and all(c.split()[0] == "word" for c in long)
    assert chunk_text(" \n\n ") == []
    with pytest.raises(InvalidArgument):
        chunk_text("x", size=10)
    with pytest.raises(InvalidArgument):
        chunk_text("x", size=400, overlap=300)


def test_parse_files(tmp_path: Path) -> None:
    (tmp_path / "a.md").write_text("intro\n\n# Heading One\n\nBody.")
    (tmp_path / "b.md").write_text("No heading.")
    (tmp_path / "c.html").write_text(
        "<html><head><title>Page &amp; title</title><style>p{}</style></head>"
        "<body><h1>H</h1><p>First para.</p><script>var x;</script><p>Second</p></body></html>"
    )
    (tmp_path / "d.csv").write_text("a,b")
    assert parse_file(tmp_path / "a.md").title == "Heading One"
    assert parse_file(tmp_path / "b.md").title == "b.md"
    html = parse_file(tmp_path / "c.html")
    assert html.title == "Page & title"
    assert paragraphs(html.text) == ["H", "First para.", "Second"]
    with pytest.raises(InvalidArgument, match="unsupported file type"):
        parse_file(tmp_path / "d.csv")


# -- add_documents through the gate --------------------------------------------------------------


def test_ingested_text_is_found_by_vector_and_fulltext_and_audited(rt: Runtime, home: Path, audit: Path) -> None:
    text = (
        "The quokkaflux valve must be purged with nitrogen before a warehouse forklift is serviced. "
        "Technicians log each purge in the maintenance register."
    )
    result = ok(rt, "kate", "add_documents", documents=[doc("ingest/forklift", text)])
    assert result["chunks"] == {"ingest/forklift": 1} and result["version"] > result["previous_version"]
    by_word = ok(rt, "kate", "search_documents", query="quokkaflux", mode="fulltext", k=3)["passages"]
    assert by_word and by_word[0]["doc_id"] == "ingest/forklift" and by_word[0]["content"] == text
    by_meaning = ok(rt, "kate", "search_documents", query="how to service a forklift safely", mode="vector", k=3)
    assert by_meaning["passages"][0]["doc_id"] == "ingest/forklift"
    assert by_meaning["version"] == result["version"]
    # Readable only by the roles it was labelled for: support_agent does not see it.
    support = ok(rt, "support_agent", "search_documents", query="quokkaflux", mode="fulltext", k=3)["passages"]
    assert "ingest/forklift" not in {p["doc_id"] for p in support}
    record = [r for r in read_records(audit) if r["tool"] == "add_documents"][-1]
    assert record["principal"] == "kate" and record["outcome"] == "ok" and record["rows"] == 1
    assert {"type": "dataset", "name": DATASET, "access": "write", "version": result["version"]} in record["resources"]
    details = record["details"]
    assert details["doc_ids"] == ["ingest/forklift"] and details["chunks"] == {"ingest/forklift": 1}
    assert (details["version_before"], details["version_after"]) == (result["previous_version"], result["version"])


def test_reingesting_a_changed_document_replaces_its_chunks(rt: Runtime, home: Path) -> None:
    # A neighbour of its own: under xdist the other tests of this module may run in another process.
    ok(rt, "kate", "add_documents", documents=[doc("ingest/neighbour", "A neighbouring note stays as it is.")])
    first = ok(
        rt, "kate", "add_documents", documents=[doc("ingest/long", sentences(30, "zanzibarish"))], chunk_size=300
    )
    before = rows_of(home, "ingest/long")
    assert len(before) == first["chunks"]["ingest/long"] >= 4
    assert [r["chunk_index"] for r in before] == list(range(len(before)))
    changed = "The replacement text mentions only the marmaladeon procedure. It is short."
    second = ok(rt, "kate", "add_documents", documents=[doc("ingest/long", changed)], chunk_size=300)
    after = rows_of(home, "ingest/long")
    assert second["chunks"] == {"ingest/long": 1} and [r["text"] for r in after] == [changed]
    assert not ok(rt, "kate", "search_documents", query="zanzibarish", mode="fulltext", k=5)["passages"]
    assert ok(rt, "kate", "search_documents", query="marmaladeon", mode="fulltext", k=5)["passages"]
    # The same document again: still one copy (idempotent), other documents untouched.
    ok(rt, "kate", "add_documents", documents=[doc("ingest/long", changed)], chunk_size=300)
    assert len(rows_of(home, "ingest/long")) == 1 and len(rows_of(home, "ingest/neighbour")) == 1
    # Time travel still reaches the first version.
    old = ok(rt, "admin", "search_documents", query="zanzibarish", mode="vector", k=1, version=first["version"])
    assert old["passages"][0]["doc_id"] == "ingest/long"


def test_a_classification_the_writer_may_not_read_is_refused(rt: Runtime, home: Path) -> None:
    version = Warehouse(home).lance_table(DATASET).version
    refused = call(rt, "kate", "add_documents", documents=[doc("ingest/secret", "Top secret text.", "restricted")])
    assert isinstance(refused.error, PolicyDenied) and "'restricted'" in str(refused.error)
    assert Warehouse(home).lance_table(DATASET).version == version and not rows_of(home, "ingest/secret")
    # A mixed batch is refused as a whole.
    mixed = [doc("ingest/ok", "Fine text."), doc("ingest/secret", "Top secret text.", "restricted")]
    assert isinstance(call(rt, "kate", "add_documents", documents=mixed).error, PolicyDenied)
    assert not rows_of(home, "ingest/ok")


def test_non_writers_are_denied(rt: Runtime) -> None:
    denied = call(rt, "support_agent", "add_documents", documents=[doc("ingest/x", "Text.")])
    assert isinstance(denied.error, PolicyDenied) and "may not call add_documents" in str(denied.error)
    documents = [Document("ingest/x", "T", "Text.", "internal", ("role:admin",))]
    # Past the tool decision: readable but not writable is a denial; unreadable looks missing.
    support = rt.gate.scope(stdio_principal("support_agent", rt.enforcer))
    with pytest.raises(PolicyDenied, match="may not write dataset 'kb.articles'"):
        support.add_documents(DATASET, documents, chunk_size=800, overlap=0)
    analyst = rt.gate.scope(stdio_principal("analyst", rt.enforcer))
    with pytest.raises(NotFound):
        analyst.add_documents(DATASET, documents, chunk_size=800, overlap=0)
    missing = call(rt, "kate", "add_documents", dataset="kb.nope", documents=[doc("ingest/x", "Text.")])
    assert isinstance(missing.error, NotFound)
    table = call(rt, "admin", "add_documents", dataset="sales.orders", documents=[doc("ingest/x", "Text.")])
    assert isinstance(table.error, InvalidArgument) and "not a dataset of documents" in str(table.error)
    too_many = call(rt, "kate", "add_documents", documents=[doc(f"d{i}", "Text.") for i in range(51)])
    assert isinstance(too_many.error, InvalidArgument)


def test_the_ingest_that_crosses_the_threshold_builds_the_vector_index(tmp_path: Path) -> None:
    """Past writes.vector_index_min_rows passages the dataset gets its ANN index, rebuilt as it grows."""
    home = build_small_demo(tmp_path / "home")
    audit = tmp_path / "audit.jsonl"
    settings = load_settings(
        REPO, home=home, audit={"path": audit, "fsync": False}, writes={"vector_index_min_rows": 256}, principal=None
    )
    runtime = open_runtime(settings)
    try:
        words = ["amberline", "basaltic", "cobaltish", "dovetailed", "emberous", "fjordic", "granitoid", "harbourly"]
        batch = [doc(f"bulk/{w}", sentences(120, w)) for w in words]  # ~30 passages each at 300 characters
        first = ok(runtime, "kate", "add_documents", documents=batch[:2], chunk_size=300)
        assert sum(first["chunks"].values()) + 49 <= 256, "the first batch should stay under the threshold"
        assert not indexed(home)
        crossing = ok(runtime, "kate", "add_documents", documents=batch[2:], chunk_size=300)
        assert indexed(home)
        late = doc("bulk/late", "The zephyrine valve is oiled daily.")
        later = ok(runtime, "kate", "add_documents", documents=[late])
        # Growing ~4x past the index (289 -> 530 passages: 16 -> 32 partitions) rebuilds it.
        more = [doc(f"bulk/more-{w}", sentences(120, f"{w}ish")) for w in words]
        ok(runtime, "kate", "add_documents", documents=more, chunk_size=300)
        records = [r for r in read_records(audit) if r["tool"] == "add_documents"]
        assert [r["details"].get("vector_index_built", False) for r in records] == [False, True, False, True]
        assert not any("vector_index_error" in r["details"] for r in records)
        # The indexed passages and the one added after the index are all found by meaning.
        expected = {"the harbourly procedure": "bulk/harbourly", "oiling the zephyrine valve": "bulk/late"}
        for query, doc_id in expected.items():
            found = ok(runtime, "kate", "search_documents", query=query, mode="vector", k=3)
            assert found["passages"][0]["doc_id"] == doc_id
        assert later["version"] > crossing["version"]
    finally:
        runtime.close()


def test_progress_notifications_over_stdio(home: Path, tmp_path: Path) -> None:
    text = "\n\n".join(sentences(6, f"topic{i}") for i in range(30))  # > one embedding batch of passages
    seen: list[tuple[float, float | None, str | None]] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        seen.append((progress, total, message))

    async def scenario() -> Any:
        async with connect("kate", home, LAKEGATE_AUDIT__PATH=str(tmp_path / "a.jsonl")) as client:
            return await client.call_tool(
                "add_documents",
                {"documents": [doc("ingest/progress", text)], "chunk_size": 200},
                progress_callback=on_progress,
            )

    result = anyio.run(scenario)
    assert not result.is_error
    chunks = result.structured_content["chunks"]["ingest/progress"]
    assert chunks > 64 and len(seen) >= 2
    assert seen[-1][0] == seen[-1][1] == chunks and seen[-1][2] == f"embedded {chunks} of {chunks} passages"
    assert [s[0] for s in seen] == sorted(s[0] for s in seen)


# -- lakegate ingest -----------------------------------------------------------------------------


def _tiny_pdf(path: Path, text: str) -> None:
    from pypdf import PdfWriter
    from pypdf.generic import DecodedStreamObject, DictionaryObject, NameObject

    writer = PdfWriter()
    page = writer.add_blank_page(612, 792)
    font = DictionaryObject(
        {
            NameObject("/Type"): NameObject("/Font"),
            NameObject("/Subtype"): NameObject("/Type1"),
            NameObject("/BaseFont"): NameObject("/Helvetica"),
        }
    )
    fonts = DictionaryObject({NameObject("/F1"): writer._add_object(font)})
    page[NameObject("/Resources")] = DictionaryObject({NameObject("/Font"): fonts})
    stream = DecodedStreamObject()
    stream.set_data(f"BT /F1 12 Tf 72 720 Td ({text}) Tj ET".encode())
    page[NameObject("/Contents")] = writer._add_object(stream)
    writer.add_metadata({"/Title": "Pier guide"})
    writer.write(path)


def test_cli_ingests_a_folder_through_the_gate(home: Path, tmp_path: Path) -> None:
    folder = tmp_path / "docs"
    (folder / "sub").mkdir(parents=True)
    (folder / "guide.md").write_text("# Returns guide\n\nReturn the blorptastic widget within 30 days.")
    (folder / "notes.txt").write_text("Plain notes about the snorkelwise gasket.")
    (folder / "sub" / "page.html").write_text("<title>Web page</title><p>The frimbulous hinge squeaks.</p>")
    (folder / "ignored.csv").write_text("a,b")
    (folder / ".hidden").mkdir()
    (folder / ".hidden" / "x.md").write_text("hidden")
    expected = {"guide.md": "Returns guide", "notes.txt": "notes.txt", "sub/page.html": "Web page"}
    pdf = pytest.importorskip("pypdf") is not None
    if pdf:
        _tiny_pdf(folder / "pier.pdf", "Pelicans nest on the quaysidewalk pier.")
        expected["pier.pdf"] = "Pier guide"
    audit = tmp_path / "cli-audit.jsonl"
    env = {"LAKEGATE_HOME": str(home), "LAKEGATE_AUDIT__PATH": str(audit), "LAKEGATE_AUDIT__FSYNC": "false"}
    args = ["--project", str(REPO), "ingest", str(folder), "--roles", "role:knowledge_editor", "--overlap", "50"]
    result = CliRunner().invoke(cli, [*args, "--principal", "kate"], env=env)
    assert result.exit_code == 0, result.output
    assert re.search(
        rf"ingested {len(expected)} document\(s\), {len(expected)} passage\(s\) into kb.articles", result.output
    )
    warehouse = Warehouse(home)
    try:
        table = warehouse.lance_table(DATASET).to_arrow().select(["doc_id", "title", "allowed_roles"]).to_pylist()
    finally:
        warehouse.close()
    titles = {r["doc_id"]: r["title"] for r in table if r["doc_id"] in expected}
    assert titles == expected
    assert all(r["allowed_roles"] == ["role:knowledge_editor"] for r in table if r["doc_id"] in expected)
    record = list(read_records(audit))[-1]
    assert (record["tool"], record["principal"], record["transport"]) == ("add_documents", "kate", "cli")
    # As a principal without write access: a clear error, exit 1.
    denied = CliRunner().invoke(cli, [*args, "--principal", "support_agent"], env=env)
    assert denied.exit_code == 1 and "may not call add_documents" in denied.output
    unsupported = CliRunner().invoke(cli, [*args[:3], str(folder / "ignored.csv"), "--principal", "kate"], env=env)
    assert unsupported.exit_code == 1 and "unsupported file type" in unsupported.output
