"""The demo warehouse and the embedder, with the real engines and the real model.

The small demo is built once for the module; tests only read it.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pytest
from lancedb.query import LanceVectorQueryBuilder
from pydantic import BaseModel

from lakegate.catalog.definitions import CatalogDefinitions, load_definitions
from lakegate.catalog.demo import (
    DEMO_NAMESPACES,
    INJECTED_ARTICLE_ID,
    INJECTED_PRODUCT_NAME,
    INJECTED_TICKET_BODY,
    DemoSummary,
    build_demo,
)
from lakegate.catalog.demo_data import KnowledgeBase, TicketTemplates, Vocabulary, parse_demo_file, vocabulary
from lakegate.catalog.demo_iceberg import LAYOUTS
from lakegate.catalog.demo_kb import kb_readers
from lakegate.catalog.document_search import CLASSIFICATIONS
from lakegate.catalog.embedder import (
    DIMENSION,
    MODEL_NAME,
    MODEL_SHA256,
    Embedder,
    ModelIntegrityError,
    default_model_dir,
    get_embedder,
    verify_model,
)
from lakegate.catalog.warehouse import Warehouse
from lakegate.errors import ConfigurationError, InvalidArgument, NotFound
from lakegate.policies.document_readers import load_document_readers, parse_document_readers

REPO = Path(__file__).resolve().parents[1]
ICEBERG_TABLES = tuple(LAYOUTS)  # the demo's Iceberg tables


@dataclass(frozen=True)
class Demo:
    warehouse: Warehouse
    summary: DemoSummary
    definitions: CatalogDefinitions
    progress: list[tuple[str, int, int]]


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Demo]:
    definitions = load_definitions(REPO)
    warehouse = Warehouse(tmp_path_factory.mktemp("demo"))
    calls: list[tuple[str, int, int]] = []
    summary = build_demo(warehouse, definitions, "small", progress=lambda *call: calls.append(call))
    yield Demo(warehouse, summary, definitions, calls)
    warehouse.close()


@pytest.fixture(scope="module")
def db(demo: Demo) -> Iterator[duckdb.DuckDBPyConnection]:
    """DuckDB with every demo Iceberg table registered as an Arrow table under its table name."""
    connection = duckdb.connect()
    for name in ICEBERG_TABLES:
        connection.register(name.split(".")[1], demo.warehouse.iceberg_table(name).scan().to_arrow())
    yield connection
    connection.close()


def _scalar(db: duckdb.DuckDBPyConnection, sql: str) -> object:
    row = db.execute(sql).fetchone()
    assert row is not None
    return row[0]


def test_every_dataset_is_written_and_described(demo: Demo) -> None:
    names = demo.warehouse.dataset_names()
    assert set(ICEBERG_TABLES) | {"kb.articles"} == set(names)
    assert {name.split(".")[0] for name in names} == set(DEMO_NAMESPACES)
    assert set(demo.summary.tables) == set(names)
    for name in names:
        info = demo.warehouse.describe(name)
        assert demo.summary.tables[name] > 0
        assert info.row_count == demo.summary.tables[name], name
        doc = demo.definitions.dataset(name)
        assert doc is not None
        assert [c.name for c in info.columns] == [c.name for c in doc.columns]
        assert all(c.doc for c in info.columns), name
        assert info.properties["comment"] == doc.description
        assert info.properties["owner"] == doc.owner
        assert info.properties["tags"] == ",".join(doc.tags)
    assert demo.summary.tables["sales.customers"] == 500
    assert demo.summary.tables["sales.orders"] == 5000
    assert demo.summary.seconds < 60


def test_progress_is_reported_to_the_end(demo: Demo) -> None:
    assert demo.progress
    done = [call[1] for call in demo.progress]
    assert done == sorted(done)
    assert demo.progress[-1][1] == demo.progress[-1][2]


def test_orders_table_layout(demo: Demo) -> None:
    info = demo.warehouse.describe("sales.orders")
    assert info.partitioning == ("month(order_ts)",)
    types = {c.name: c.type for c in info.columns}
    assert types["order_ts"] == "timestamptz"
    assert types["total_amount"] == "decimal(12, 2)"
    assert info.columns[0].name == "order_id" and info.columns[0].required
    # Written in two batches: two snapshots, newest first, the newest being the current one.
    assert len(info.versions) == 2
    assert info.versions[0].timestamp >= info.versions[1].timestamp
    assert info.current_version == info.versions[0].id
    assert all(v.operation == "append" for v in info.versions)
    assert demo.warehouse.describe("sales.customers").partitioning == ()


def test_unknown_dataset_is_not_found(demo: Demo) -> None:
    with pytest.raises(NotFound, match="Call list_datasets"):
        demo.warehouse.describe("sales.nope")


def test_order_totals_equal_the_sum_of_their_items(db: duckdb.DuckDBPyConnection) -> None:
    mismatches = _scalar(
        db,
        """
        select count(*) from orders o
        left join (select order_id, sum(quantity * unit_price - discount) as amount
                   from order_items group by order_id) i using (order_id)
        where i.amount is null or i.amount <> o.total_amount
        """,
    )
    assert mismatches == 0
    assert _scalar(db, "select count(*) from order_items where discount < 0 or quantity < 1") == 0


def test_references_are_consistent(db: duckdb.DuckDBPyConnection) -> None:
    checks = {
        "orders without customer": "select count(*) from orders where customer_id not in "
        "(select customer_id from customers)",
        "orders before signup": "select count(*) from orders o join customers c using (customer_id) "
        "where o.order_ts < c.signup_date",
        "orders out of range": "select count(*) from orders where order_ts < timestamptz '2024-01-01 00:00:00+00' "
        "or order_ts >= timestamptz '2026-01-01 00:00:00+00'",
        "items without product": "select count(*) from order_items where product_id not in "
        "(select product_id from products)",
        "payments not matching": "select count(*) from payments p join orders o using (order_id) "
        "where p.amount <> o.total_amount or o.status = 'cancelled' or p.paid_ts < o.order_ts",
        "unpaid orders": "select count(*) from orders where status <> 'cancelled' and order_id not in "
        "(select order_id from payments)",
        "card digits": "select count(*) from payments where (method = 'card') <> (card_last4 is not null)",
        "refunds not for returns": "select count(*) from refunds r join orders o using (order_id) "
        "where o.status <> 'returned' or r.amount > o.total_amount or r.amount <= 0",
        "orphan refunds": "select count(*) from refunds where order_id not in (select order_id from orders)",
        "tickets without customer": "select count(*) from tickets where customer_id not in "
        "(select customer_id from customers)",
        "tickets closed early": "select count(*) from tickets where closed_ts < opened_ts "
        "or (status in ('solved', 'closed')) <> (closed_ts is not null)",
    }
    failures = {name: _scalar(db, sql) for name, sql in checks.items()}
    assert failures == dict.fromkeys(checks, 0)
    assert _scalar(db, "select count(*) from orders where status = 'returned'") == _scalar(
        db, "select count(*) from refunds"
    )


def test_values_are_realistic(db: duckdb.DuckDBPyConnection) -> None:
    def values(sql: str) -> set[object]:
        return {row[0] for row in db.execute(sql).fetchall()}

    assert values("select distinct region from customers") == {"EMEA", "NA", "APAC", "LATAM"}
    assert values("select distinct segment from customers") == {"consumer", "smb", "enterprise"}
    assert values("select distinct status from orders") == {"placed", "shipped", "delivered", "cancelled", "returned"}
    assert values("select distinct channel from orders") == {"web", "store", "app"}
    assert values("select distinct method from payments") == {"card", "paypal", "bank_transfer", "gift_card"}
    assert _scalar(db, "select count(*) from customers where email not like '%@%.%'") == 0
    # Seasonality: December sells more per day than February.
    december = _scalar(db, "select count(*) from orders where month(order_ts) = 12")
    february = _scalar(db, "select count(*) from orders where month(order_ts) = 2")
    assert isinstance(december, int) and isinstance(february, int)
    assert december > 1.5 * february
    # Orders reference the customer's own region.
    assert (
        _scalar(db, "select count(*) from orders o join customers c using (customer_id) where o.region <> c.region")
        == 0
    )


def test_same_seed_same_data_and_rebuilding_replaces(demo: Demo, tmp_path: Path) -> None:
    other = Warehouse(tmp_path)
    first = build_demo(other, demo.definitions, "small", seed=7)
    again = build_demo(other, demo.definitions, "small", seed=7)  # rerun: replaces, never appends
    assert first.tables == again.tables == demo.summary.tables
    for name, key in (("sales.customers", "customer_id"), ("sales.orders", "order_id")):
        ours = demo.warehouse.iceberg_table(name).scan().to_arrow().sort_by(key)
        theirs = other.iceberg_table(name).scan().to_arrow().sort_by(key)
        assert ours.equals(theirs), name
    assert len(other.describe("sales.orders").versions) == 2  # the old table's history is gone
    other.close()


def test_unknown_scale_is_refused(demo: Demo, tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument):
        build_demo(Warehouse(tmp_path), demo.definitions, "huge")  # type: ignore[arg-type]


#: Each table's sort key, for a digest of its rows that does not depend on file or batch order.
SORT_KEYS = {
    "sales.customers": ("customer_id",),
    "sales.products": ("product_id",),
    "sales.orders": ("order_id",),
    "sales.order_items": ("order_id", "line_number"),
    "finance.payments": ("payment_id",),
    "finance.refunds": ("refund_id",),
    "support.tickets": ("ticket_id",),
    "kb.articles": ("doc_id", "chunk_index"),
}
#: The small demo's rows (seed 7), pinned when its prose moved from catalog/demo.py into package
#: data: the move changed no row. kb.articles without its vectors (the embedder's floats may differ
#: in the last bits between CPUs). A change here is a change of the demo's data: make it on purpose.
SMALL_DEMO_DIGESTS = {
    "sales.customers": "65fe2db093a73c3a",
    "sales.products": "93771798cdda2fae",
    "sales.orders": "0293a6824e20fa4f",
    "sales.order_items": "5e91c6e9e9d170e2",
    "finance.payments": "c036f4c3e6bf35b1",
    "finance.refunds": "71ea17f56b391ee1",
    "support.tickets": "e85fedc6f17fd162",
    "kb.articles": "c89c284c89fba811",
}


def _rows_digest(table: pa.Table, keys: Sequence[str]) -> str:
    """sha256 of the column names and types and the rows in key order (decimals, times as text)."""
    ordered = table.sort_by([(key, "ascending") for key in keys])
    columns = [(f.name, str(f.type)) for f in ordered.schema]
    payload = json.dumps([columns, ordered.to_pylist()], default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def test_small_demo_rows_are_pinned(demo: Demo) -> None:
    found = {}
    for name, keys in SORT_KEYS.items():
        if name == "kb.articles":
            table = demo.warehouse.lance_table(name).to_arrow().drop_columns(["vector"])
        else:
            table = demo.warehouse.iceberg_table(name).scan().to_arrow()
        found[name] = _rows_digest(table, keys)
    assert found == SMALL_DEMO_DIGESTS


def test_the_planted_injection_is_where_the_evals_look(demo: Demo, db: duckdb.DuckDBPyConnection) -> None:
    assert _scalar(db, "select name from products where product_id = 1") == INJECTED_PRODUCT_NAME
    assert _scalar(db, "select body from tickets where ticket_id = 1") == INJECTED_TICKET_BODY
    articles = demo.warehouse.lance_table("kb.articles").to_arrow()
    assert INJECTED_ARTICLE_ID in articles["doc_id"].to_pylist()
    assert not any("|" in text for text in (INJECTED_PRODUCT_NAME, INJECTED_TICKET_BODY))


def test_document_readers_cover_every_classification() -> None:
    readers = load_document_readers()
    assert readers.classifications == CLASSIFICATIONS
    assert set(kb_readers()) <= set(CLASSIFICATIONS)
    assert readers.roles("restricted") == ("role:admin",)
    with pytest.raises(ConfigurationError, match="no readers for classification 'secret'"):
        readers.roles("secret")


@pytest.mark.parametrize(
    ("model", "text", "message"),
    [
        (TicketTemplates, "returned: [{subject: 'Order {order_id}', body: b}]\ncancelled: []\nother: []", "order_id"),
        (Vocabulary, "first_names: [Ann]\nlast_names: [Lee]\nbrands: [Acme]\ncategories: nope", "categories"),
        (KnowledgeBase, "regions: [{region: NA, key: na}]\ntopics: []\npool_contexts: []", "area"),
        (KnowledgeBase, "regions: [", "expected"),
    ],
)
def test_a_malformed_demo_data_file_is_refused(model: type[BaseModel], text: str, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message) as refused:
        parse_demo_file(text, "catalog/demo_x.yaml", model)
    assert str(refused.value).startswith("catalog/demo_x.yaml (demo package data) is malformed")


def test_demo_data_is_frozen_and_readers_are_checked() -> None:
    words = vocabulary()
    with pytest.raises(ValueError, match="frozen"):
        words.brands = ("Other",)
    with pytest.raises(ConfigurationError, match="role:<name>"):
        parse_document_readers("readers: [{classification: public, roles: [support_agent]}]")
    with pytest.raises(ConfigurationError, match="listed twice"):
        parse_document_readers(
            "readers: [{classification: public, roles: [role:a]}, {classification: public, roles: [role:b]}]"
        )


# -- knowledge base and embedder ---------------------------------------------------------------


def test_kb_articles_rows(demo: Demo) -> None:
    table = demo.warehouse.lance_table("kb.articles").to_arrow()
    assert table.schema.field("vector").type == pa.list_(pa.float32(), DIMENSION)
    assert table.schema.field("allowed_roles").type == pa.list_(pa.string())
    rows = table.drop_columns(["vector"]).to_pylist()
    assert len({row["doc_id"] for row in rows}) == 41  # 40 articles and the planted one (red-team evals)
    expected_roles = {
        "public": {"role:support_agent", "role:analyst", "role:data_steward", "role:admin"},
        "internal": {"role:support_agent", "role:data_steward", "role:admin"},
        "confidential": {"role:data_steward", "role:admin"},
        "restricted": {"role:admin"},
    }
    for row in rows:
        assert set(row["allowed_roles"]) == expected_roles[row["classification"]]
        assert row["source"] == f"kb://{row['doc_id']}"
        # Whole sentences of a few hundred characters.
        assert 300 <= len(row["text"]) <= 1000
        assert row["text"].endswith((".", "!", "?"))
        assert row["ingested_at"].tzinfo is not None
    assert {row["classification"] for row in rows} == set(expected_roles)
    vectors = np.stack(table["vector"].to_numpy(zero_copy_only=False))
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)


def test_kb_records_the_embedding_model(demo: Demo) -> None:
    info = demo.warehouse.describe("kb.articles")
    assert info.kind == "lance"
    assert info.properties["lakegate.embedding_model"] == MODEL_NAME
    assert info.properties["lakegate.embedding_model_sha256"] == MODEL_SHA256
    assert info.row_count == demo.summary.tables["kb.articles"]
    assert info.current_version == info.versions[0].id


def test_semantic_search_finds_the_returns_policy(demo: Demo) -> None:
    embedder = get_embedder()
    query = embedder.embed(["How do I return a damaged item?"])[0]
    table = demo.warehouse.lance_table("kb.articles")
    arrow = table.to_arrow()
    vectors = np.stack(arrow["vector"].to_numpy(zero_copy_only=False))
    top = np.argsort(-(vectors @ query))[:3]
    assert any(arrow["doc_id"][int(i)].as_py().startswith("returns-policy") for i in top)
    # The same through Lance's own vector search.
    search = table.search(query)
    assert isinstance(search, LanceVectorQueryBuilder)
    hits = search.distance_type("cosine").limit(3).to_arrow()
    assert any(doc.startswith("returns-policy") for doc in hits["doc_id"].to_pylist())


def test_embeddings_are_normalised_float32() -> None:
    embedder = get_embedder()
    assert get_embedder() is embedder  # loaded once per process
    assert embedder.model_name == MODEL_NAME and embedder.model_hash == MODEL_SHA256
    assert embedder.dimension == DIMENSION and embedder.device in {"cpu", "cuda"}
    vectors = embedder.embed(["refund policy", "shipping times to Germany", "x" * 3000])
    assert vectors.dtype == np.float32 and vectors.shape == (3, DIMENSION)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)
    assert embedder.embed([]).shape == (0, DIMENSION)


def test_tampered_weights_are_refused(tmp_path: Path) -> None:
    copy = tmp_path / "model"
    shutil.copytree(default_model_dir(), copy)
    assert verify_model(copy) == MODEL_SHA256
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(ModelIntegrityError, match="SHA-256"):
        verify_model(copy)
    with pytest.raises(ModelIntegrityError):
        Embedder("cpu", model_dir=copy)
