"""Lance datasets of documents lakegate did not create, attached in lakegate.toml (catalog/attached_documents.py).

Another team's datasets, written by plain lancedb outside lakegate's state directory, with their
own column names: a handbook with vectors made by the same model, classifications and per-passage
readers; a wiki with no vectors, no classification column and no readers (one classification for
every passage); old pages embedded by another model. lakegate serves them to search_documents and
describe_dataset through the gate, governed by the same rules as its own datasets, and never
writes to them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import pyarrow as pa
import pytest
from pydantic import ValidationError

from lakegate.catalog.document_search import access_predicate
from lakegate.catalog.embedder import DIMENSION, MODEL_NAME
from lakegate.catalog.query_embedder import get_query_embedder
from lakegate.catalog.settings import DocumentSettings
from lakegate.errors import InvalidArgument, NotFound, PolicyDenied, SourceUnavailable
from lakegate.evals.mcp_client import connect, text_of
from lakegate.server.app import Runtime, open_runtime
from lakegate.server.settings import load_settings
from tests.conftest import copy_demo_project, gate_call, gate_ok
from tests.seaweed_support import ACCESS_KEY, SECRET_KEY, Seaweed

HANDBOOK = [
    # page_id, heading, body, sensitivity, readers
    ("hb-1", "Expenses", "Travel expenses are refunded within thirty days of the receipt.", "public", ["role:agent"]),
    ("hb-2", "Parental leave", "Parents take sixteen weeks of paid leave.", "internal", ["role:support_agent"]),
    ("hb-3", "Salaries", "Salary bands are reviewed every spring by the board.", "confidential", ["role:agent"]),
    ("hb-4", "Security keys", "Hardware keys are issued by the security team.", "internal", ["role:admin"]),
    ("hb-5", "Holidays", "Public holidays follow the calendar of the office.", "public", ["role:agent"]),
]
WIKI = [
    ("w-1", "The deploy train leaves every Tuesday at noon."),
    ("w-2", "Incident reviews are blameless and written within a week."),
]
#: A column of the handbook that no layout names: it must never reach an agent.
SECRET_NOTE = "note-never-shown"

RULES = """
p, role:support_agent, handbook.*, read, allow
p, role:support_agent, handbook.pages.classification:confidential, read, deny
p, role:knowledge_editor, handbook.wiki, read, allow
p, role:knowledge_editor, handbook.wiki.id, read, allow
p, role:knowledge_editor, handbook.wiki.content, read, allow
p, role:data_steward, handbook.pages, read, allow
p, role:data_steward, handbook.pages.*, read, allow
p, role:data_steward, handbook.pages.body, read, deny
p, role:data_steward, handbook.pages.section, read, deny
"""


@dataclass
class Outside:
    root: Path
    handbook: Path
    wiki: Path
    old: Path


def _vectors(models_dir: Path, texts: list[str]) -> pa.Array:
    vectors = get_query_embedder(models_dir).embed(texts)
    return pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1), pa.float32()), DIMENSION)


@pytest.fixture(scope="module")
def outside(demo_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Outside:
    """The other team's datasets, written by plain lancedb in a directory of their own."""
    import lancedb
    from lancedb.index import FTS

    root = tmp_path_factory.mktemp("outside-lance")
    db = lancedb.connect(root)
    bodies = [row[2] for row in HANDBOOK]
    handbook = pa.table(
        {
            "page_id": [row[0] for row in HANDBOOK],
            "heading": [row[1] for row in HANDBOOK],
            "body": bodies,
            "sensitivity": [row[3] for row in HANDBOOK],
            "readers": pa.array([row[4] for row in HANDBOOK], pa.list_(pa.string())),
            "embedding": _vectors(demo_home / "models", bodies),
            "secret_note": [SECRET_NOTE] * len(HANDBOOK),
            "section": pa.array(range(1, len(HANDBOOK) + 1), pa.int32()),
        }
    )
    db.create_table("handbook", handbook).create_index("body", config=FTS())
    wiki = pa.table({"id": [row[0] for row in WIKI], "content": [row[1] for row in WIKI]})
    db.create_table("wiki", wiki).create_index("content", config=FTS())
    (root / "wiki.lance").rename(root / "wiki")  # a dataset directory need not end in .lance
    old = pa.table({"id": ["o-1"], "content": ["An old page."], "vec": _vectors(demo_home / "models", ["x"])})
    # Text the other team wrote into the schema: never shown to agents as a description or owner.
    old = old.replace_schema_metadata({"comment": "UPSTREAM COMMENT", "owner": "upstream-owner"})
    db.create_table("old", old)
    return Outside(root, root / "handbook.lance", root / "wiki", root / "old.lance")


def _toml(outside: Outside, demo_home: Path) -> str:
    return f"""build_demo = false

[documents."handbook.pages"]
uri = "{outside.handbook}"
time_travel = true
embedding_model = "{MODEL_NAME}"
description = "The staff handbook, one passage per section."
[documents."handbook.pages".columns]
text = "body"
doc_id = "page_id"
title = "heading"
chunk_index = "section"
vector = "embedding"
classification = "sensitivity"
allowed_roles = "readers"

[documents."handbook.wiki"]
uri = "{outside.wiki}"
classification = "internal"
columns = {{ text = "content", doc_id = "id" }}

[documents."handbook.old"]
uri = "{outside.old}"
classification = "public"
embedding_model = "BAAI/bge-small-en-v1.5"
columns = {{ text = "content", doc_id = "id", vector = "vec" }}

[documents."handbook.broken"]
uri = "{outside.wiki}"
classification = "public"
columns = {{ text = "body", doc_id = "id" }}

[documents."kb.articles"]
uri = "{outside.wiki}"
classification = "public"
columns = {{ text = "content", doc_id = "id" }}

[documents."handbook.inside"]
uri = "{demo_home / "lance" / "kb.articles.lance"}"
columns = {{ text = "text", doc_id = "doc_id" }}
classification = "public"
"""


@pytest.fixture(scope="module")
def project(outside: Outside, demo_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    project = copy_demo_project(tmp_path_factory.mktemp("documents") / "project")
    with (project / "policies" / "policy.csv").open("a") as rules:
        rules.write(RULES)
    (project / "lakegate.toml").write_text(_toml(outside, demo_home))
    return project


@pytest.fixture(scope="module")
def rt(project: Path, demo_home: Path) -> Iterator[Runtime]:
    audit = {"path": project.parent / "audit.jsonl", "fsync": False}
    runtime = open_runtime(load_settings(project, home=demo_home, audit=audit, principal=None))
    try:
        yield runtime
    finally:
        runtime.close()


def _search(rt: Runtime, who: str, **arguments: Any) -> list[dict[str, Any]]:
    passages: list[dict[str, Any]] = gate_ok(rt, who, "search_documents", arguments)["passages"]
    return passages


def test_attached_documents_are_listed_and_described_from_their_settings(rt: Runtime) -> None:
    names = {d["name"] for d in gate_ok(rt, "support_agent", "list_datasets", {})["datasets"]}
    assert {"handbook.pages", "handbook.wiki", "handbook.old", "kb.articles"} <= names
    # Denied by default: the analyst has no rule for them, and they look like nothing at all.
    analyst = {d["name"] for d in gate_ok(rt, "analyst", "list_datasets", {})["datasets"]}
    assert not {name for name in analyst if name.startswith("handbook.")}
    denied = gate_call(rt, "analyst", "describe_dataset", {"name": "handbook.pages"})
    assert isinstance(denied.error, NotFound)
    pages = gate_ok(rt, "support_agent", "describe_dataset", {"name": "handbook.pages"})
    assert pages["kind"] == "lance" and pages["row_count"] == len(HANDBOOK)
    assert pages["description"] == "The staff handbook, one passage per section."
    assert {c["name"] for c in pages["columns"]} >= {"page_id", "heading", "body", "sensitivity", "readers"}


def test_search_maps_the_columns_and_applies_classification_and_readers(rt: Runtime) -> None:
    for mode in ("vector", "fulltext", "hybrid"):
        passages = _search(rt, "support_agent", query="refund of travel expenses", mode=mode, dataset="handbook.pages")
        ids = {p["doc_id"] for p in passages}
        # hb-3 is confidential (denied), hb-4 is for admins only (readers): never ranked, never counted.
        assert ids and ids <= {"hb-1", "hb-2", "hb-5"}, (mode, ids)
        best = passages[0]
        assert best["doc_id"] == "hb-1" and best["title"] == "Expenses" and best["content"].startswith("Travel")
        assert best["classification"] == "public" and best["source"] == "" and best["chunk_index"] == 1
        assert SECRET_NOTE not in json.dumps(passages)
    everything = {p["doc_id"] for p in _search(rt, "admin", query="keys", mode="fulltext", dataset="handbook.pages")}
    assert "hb-4" in everything


def test_the_prefilter_names_the_datasets_own_columns(rt: Runtime, project: Path) -> None:
    _search(rt, "support_agent", query="leave", mode="fulltext", dataset="handbook.pages")
    records = [json.loads(line) for line in (project.parent / "audit.jsonl").read_text().splitlines()]
    prefilter = [r for r in records if r.get("details", {}).get("dataset") == "handbook.pages"][-1]["details"][
        "prefilter"
    ]
    assert prefilter == (
        "`sensitivity` IN ('public', 'internal', 'restricted') AND "
        "array_has_any(`readers`, ['role:agent', 'role:support_agent'])"
    )


def test_a_dataset_without_roles_is_governed_by_its_dataset_and_classification_rules(rt: Runtime) -> None:
    found = _search(rt, "support_agent", query="deploy train", mode="fulltext", dataset="handbook.wiki")
    assert [p["doc_id"] for p in found] == ["w-1"] and found[0]["classification"] == "internal"
    # kate may read the dataset but no classification of it: nothing is searched, nothing counted.
    assert _search(rt, "kate", query="deploy train", mode="fulltext", dataset="handbook.wiki") == []
    # A dataset kate may not read looks like none at all, whatever the search would have found.
    hidden = gate_call(rt, "kate", "search_documents", {"query": "x", "mode": "fulltext", "dataset": "handbook.pages"})
    assert isinstance(hidden.error, NotFound)


def test_what_a_dataset_lacks_is_refused_with_what_to_do_instead(rt: Runtime) -> None:
    no_vectors = gate_call(rt, "support_agent", "search_documents", {"query": "deploy", "dataset": "handbook.wiki"})
    assert isinstance(no_vectors.error, InvalidArgument) and "mode='fulltext'" in (no_vectors.error.hint or "")
    by_source = {"query": "deploy", "mode": "fulltext", "dataset": "handbook.wiki", "filter": {"source": "x"}}
    refused = gate_call(rt, "support_agent", "search_documents", by_source)
    assert isinstance(refused.error, InvalidArgument) and "no source" in str(refused.error)
    other_model = gate_call(
        rt, "admin", "search_documents", {"query": "old", "mode": "vector", "dataset": "handbook.old"}
    )
    assert isinstance(other_model.error, InvalidArgument) and "BAAI/bge-small-en-v1.5" in str(other_model.error)
    no_index = gate_call(
        rt, "admin", "search_documents", {"query": "old", "mode": "fulltext", "dataset": "handbook.old"}
    )
    assert isinstance(no_index.error, InvalidArgument) and "create_fts_index" in (no_index.error.hint or "")


def test_column_rules_apply_to_the_datasets_own_column_names(rt: Runtime) -> None:
    denied = gate_call(rt, "data_steward", "search_documents", {"query": "leave", "dataset": "handbook.pages"})
    # Every column a hit carries is decided, the position in the document (section) included.
    assert isinstance(denied.error, PolicyDenied) and "body" in str(denied.error) and "section" in str(denied.error)


def test_attached_documents_are_never_written(rt: Runtime, outside: Outside) -> None:
    import lancedb

    before = lancedb.connect(outside.root).open_table("handbook").version
    document = {
        "doc_id": "hb-9",
        "title": "New",
        "text": "Text.",
        "classification": "public",
        "allowed_roles": ["role:agent"],
    }
    refused = gate_call(rt, "admin", "add_documents", {"dataset": "handbook.pages", "documents": [document]})
    assert isinstance(refused.error, InvalidArgument) and "read-only" in str(refused.error)
    assert lancedb.connect(outside.root).open_table("handbook").version == before


def test_a_name_lakegate_already_serves_stays_its_own(rt: Runtime) -> None:
    own = gate_ok(rt, "support_agent", "describe_dataset", {"name": "kb.articles"})
    assert own["row_count"] > len(WIKI)
    assert _search(rt, "support_agent", query="refund", mode="fulltext", dataset="kb.articles", k=1)


def test_a_dataset_that_cannot_be_read_as_configured_names_what_to_check_and_no_path(
    rt: Runtime, demo_home: Path, outside: Outside
) -> None:
    for name in ("handbook.inside", "handbook.broken"):
        outcome = gate_call(rt, "admin", "search_documents", {"query": "x", "mode": "fulltext", "dataset": name})
        assert isinstance(outcome.error, SourceUnavailable), outcome.error
        public = outcome.error.public_message
        assert f'[documents."{name}"]' in public
        assert str(demo_home) not in public and str(outside.root) not in public
    # To a principal who may not read it, it is a dataset like any other it may not read: none.
    unseen = gate_call(rt, "kate", "search_documents", {"query": "x", "mode": "fulltext", "dataset": "handbook.broken"})
    assert isinstance(unseen.error, NotFound)
    # One broken dataset does not break the listing.
    listed = {d["name"]: d for d in gate_ok(rt, "admin", "list_datasets", {})["datasets"]}
    assert "cannot be read" in listed["handbook.broken"]["description"] and listed["handbook.pages"]["row_count"] == 5
    assert listed["handbook.broken"]["kind"] == "lance"


def test_upstream_changes_are_seen_at_once_and_time_travel_applies_todays_labels(rt: Runtime, outside: Outside) -> None:
    import lancedb

    table = lancedb.connect(outside.root).open_table("handbook")
    first = int(table.version)
    # The owner relabels the holidays page: support may no longer read it, at any version.
    table.update(where="page_id = 'hb-5'", values={"sensitivity": "confidential"})
    now = {
        p["doc_id"] for p in _search(rt, "support_agent", query="holidays", mode="fulltext", dataset="handbook.pages")
    }
    then = _search(rt, "support_agent", query="holidays", mode="fulltext", dataset="handbook.pages", version=first)
    assert "hb-5" not in now and "hb-5" not in {p["doc_id"] for p in then}
    assert {
        p["doc_id"]
        for p in _search(rt, "admin", query="holidays", mode="fulltext", dataset="handbook.pages", version=first)
    } >= {"hb-5"}


def test_settings_refuse_what_cannot_be_served() -> None:
    columns = {"text": "body", "doc_id": "id"}
    with pytest.raises(ValidationError, match="not both"):
        DocumentSettings(uri="/x", columns={**columns, "classification": "c"}, classification="public")
    with pytest.raises(ValidationError, match="not both"):
        DocumentSettings(uri="/x", columns=columns)
    with pytest.raises(ValidationError, match="embedding_model"):
        DocumentSettings(uri="/x", columns={**columns, "vector": "v"}, classification="public")
    with pytest.raises(ValidationError, match="plain name"):
        DocumentSettings(uri="/x", columns={"text": "body) OR (1=1", "doc_id": "id"}, classification="public")
    with pytest.raises(ValidationError, match="credential") as refused:
        DocumentSettings(
            uri="s3://b/x",
            columns=columns,
            classification="public",
            storage_options={"aws_secret_access_key": "s3cr3t"},
        )
    assert "s3cr3t" not in str(refused.value)


@pytest.mark.parametrize(
    ("name", "message"), [("handbook", "NAMESPACE.NAME"), ("Hand.book", "NAMESPACE.NAME"), ("lake.pages", "catalog")]
)
def test_names_of_attached_documents_are_checked(tmp_path: Path, name: str, message: str) -> None:
    (tmp_path / "lakegate.toml").write_text(
        f'[catalogs.lake.properties]\ntype = "sql"\n\n[documents."{name}"]\nuri = "/x"\nclassification = "public"\n'
        'columns = { text = "t", doc_id = "d" }\n'
    )
    with pytest.raises(ValidationError, match=message):
        load_settings(tmp_path, home=tmp_path / "home")


def test_the_predicate_of_a_layout_without_labels_admits_the_dataset_rule_alone() -> None:
    from lakegate.catalog.document_search import PassageLayout

    layout = PassageLayout(classification=None, allowed_roles=None, fixed_classification="internal")
    assert access_predicate(["public", "internal"], [], layout=layout) == "TRUE"
    assert access_predicate(["public"], ["role:agent"], layout=layout) is None
    assert access_predicate(["internal"], [], layout=layout, wanted_classifications=["public"]) is None


def test_an_agent_searches_attached_documents_over_stdio(project: Path, demo_home: Path) -> None:
    async def scenario() -> tuple[Any, str]:
        audit = str(project.parent / "stdio-audit.jsonl")
        async with connect("support_agent", demo_home, project=project, LAKEGATE_AUDIT__PATH=audit) as client:
            arguments = {"query": "paid leave for parents", "dataset": "handbook.pages", "k": 2}
            result = await client.call_tool("search_documents", arguments)
            assert not result.is_error, text_of(result)
            return result.structured_content, text_of(result)

    structured, text = anyio.run(scenario)
    assert structured is not None and structured["passages"][0]["doc_id"] == "hb-2"
    assert "Parental leave" in text and os.fspath(project) not in text


def test_the_operator_sees_which_attached_documents_are_served(project: Path, demo_home: Path) -> None:
    from click.testing import CliRunner

    from lakegate.server.cli.main import cli

    listed = CliRunner().invoke(
        cli, ["--project", str(project), "catalog", "list"], env={"LAKEGATE_HOME": str(demo_home)}
    )
    assert listed.exit_code == 1, listed.output  # some are not served
    assert "documents handbook.pages: served" in listed.output
    assert "documents kb.articles: not served: lakegate has a dataset of that name" in listed.output
    assert "documents handbook.broken: not served: " in listed.output and "'body'" in listed.output
    assert "documents handbook.inside: not served: " in listed.output


def test_a_dataset_on_s3_is_attached_with_credentials_from_the_environment(
    seaweed_started: Seaweed, demo_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import lancedb
    from lancedb.index import FTS

    seaweed_started.wait_ready()
    options = {"aws_endpoint": seaweed_started.endpoint, "allow_http": "true", "aws_region": "us-east-1"}
    options |= {"aws_virtual_hosted_style_request": "false"}
    secrets = {"aws_access_key_id": ACCESS_KEY, "aws_secret_access_key": SECRET_KEY}
    db = lancedb.connect("s3://lance/another-team", storage_options=options | secrets)
    notes = pa.table({"id": ["n-1", "n-2"], "content": ["Backups run nightly at two.", "Laptops are encrypted."]})
    db.create_table("notes", notes).create_index("content", config=FTS())

    project = copy_demo_project(tmp_path / "project")
    with (project / "policies" / "policy.csv").open("a") as rules:
        rules.write("p, role:support_agent, ops.*, read, allow\n")
    lines = ["build_demo = false", '[documents."ops.notes"]', 'uri = "s3://lance/another-team/notes.lance"']
    lines += ['classification = "internal"', 'columns = { text = "content", doc_id = "id" }']
    lines += ['[documents."ops.notes".storage_options]', *(f'{key} = "{value}"' for key, value in options.items())]
    lines += [
        'aws_access_key_id = "${LAKEGATE_TEST_NOTES_KEY}"',
        'aws_secret_access_key = "${LAKEGATE_TEST_NOTES_SECRET}"',
    ]
    (project / "lakegate.toml").write_text("\n".join(lines) + "\n")
    audit = {"path": tmp_path / "audit.jsonl", "fsync": False}
    runtime = open_runtime(load_settings(project, home=demo_home, audit=audit, principal=None))
    try:
        arguments = {"query": "nightly backups", "mode": "fulltext", "dataset": "ops.notes"}
        monkeypatch.setenv("LAKEGATE_TEST_NOTES_KEY", ACCESS_KEY)
        monkeypatch.setenv("LAKEGATE_TEST_NOTES_SECRET", SECRET_KEY)
        assert [p["doc_id"] for p in _search(runtime, "support_agent", **arguments)] == ["n-1"]
    finally:
        runtime.close()
    assert SECRET_KEY not in (tmp_path / "audit.jsonl").read_text()


def test_earlier_versions_only_where_time_travel_is_on_and_no_upstream_text(rt: Runtime) -> None:
    refused = gate_call(
        rt,
        "support_agent",
        "search_documents",
        {"query": "deploy", "mode": "fulltext", "dataset": "handbook.wiki", "version": 1},
    )
    assert isinstance(refused.error, InvalidArgument) and "time_travel" in (refused.error.hint or "")
    old = gate_ok(rt, "admin", "describe_dataset", {"name": "handbook.old"})
    assert old["description"] == "" and old["owner"] == ""
    assert "UPSTREAM" not in json.dumps(old, default=str) and "upstream-owner" not in json.dumps(old, default=str)


@pytest.mark.parametrize(
    "uri",
    [
        "file:/srv/x.lance",
        "~/x.lance",
        "x.lance",
        "./x.lance",
        "gs://b/x.lance",
        "s3://b/o%77n/x",
        "s3://b/x/../y",
        "s3://b",
    ],
)
def test_only_plain_locations_are_accepted(uri: str) -> None:
    with pytest.raises(ValidationError, match="uri|absolute|s3"):
        DocumentSettings(uri=uri, columns={"text": "t", "doc_id": "d"}, classification="public")


def _spec(uri: Path, text: str = "content", doc_id: str = "id") -> Any:
    from lakegate.catalog.attached_documents import DocumentSpec
    from lakegate.catalog.document_search import PassageLayout

    layout = PassageLayout(text=text, doc_id=doc_id, vector=None, title=None, source=None, chunk_index=None,
                           classification=None, allowed_roles=None, fixed_classification="public")  # fmt: skip
    return DocumentSpec("ops.notes", str(uri), layout, {})


def test_a_dataset_that_reads_files_outside_its_directory_is_refused(tmp_path: Path, demo_home: Path) -> None:
    import lancedb

    from lakegate.catalog.attached_documents import AttachedDocuments

    db = lancedb.connect(tmp_path / "theirs")
    db.create_table("notes", pa.table({"id": ["n-1"], "content": ["x"]}))
    # A link inside the dataset's directory, to lakegate's own files.
    linked = tmp_path / "theirs" / "notes.lance"
    (linked / "data" / "extra").symlink_to(demo_home / "lance")
    with pytest.raises(SourceUnavailable, match="link"):
        AttachedDocuments(_spec(linked), dimension=DIMENSION).open(forbidden=[str(demo_home)])
    # A shallow clone of lakegate's own dataset: its manifest names files it does not hold.
    clone = lancedb.connect(tmp_path / "clones").clone_table("kb", str(demo_home / "lance" / "kb.articles.lance"))
    assert clone.count_rows() > 0  # lancedb itself reads lakegate's files through it
    with pytest.raises(SourceUnavailable, match="shallow clone"):
        spec = _spec(tmp_path / "clones" / "kb.lance", "text", "doc_id")
        AttachedDocuments(spec, dimension=DIMENSION).open(forbidden=[str(demo_home)])


def test_a_dataset_that_cannot_be_opened_is_tried_again_after_a_while_not_on_every_call(tmp_path: Path) -> None:
    import lancedb

    from lakegate.catalog.attached_documents import RETRY_S, AttachedDocuments

    now = [0.0]
    attached = AttachedDocuments(_spec(tmp_path / "notes.lance"), dimension=DIMENSION, clock=lambda: now[0])
    with pytest.raises(SourceUnavailable):
        attached.open(forbidden=[])
    lancedb.connect(tmp_path).create_table("notes", pa.table({"id": ["n-1"], "content": ["x"]}))
    now[0] = RETRY_S / 2
    with pytest.raises(SourceUnavailable):  # not tried again yet: the last failure is answered at once
        attached.open(forbidden=[])
    now[0] = RETRY_S + 1
    assert attached.open(forbidden=[]).count_rows() == 1


def test_a_doc_id_that_is_not_text_does_not_fit() -> None:
    from lakegate.catalog.attached_documents import layout_problems

    schema = pa.schema([("id", pa.int64()), ("content", pa.string())])
    layout = _spec(Path("/x")).layout
    assert layout_problems(schema, layout, DIMENSION) == ["columns.doc_id: 'id' is int64, not a string column"]
