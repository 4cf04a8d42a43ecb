"""Dataset definitions and the storage interface, against a real SQLite Iceberg catalog and a
real Lance directory in tmp_path."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pyarrow as pa
import pytest
from pyiceberg.exceptions import NoSuchTableError
from pyiceberg.partitioning import PartitionField, PartitionSpec
from pyiceberg.schema import Schema
from pyiceberg.transforms import BucketTransform, IdentityTransform
from pyiceberg.types import LongType, NestedField, StringType

import lakegate.catalog as catalog
from lakegate.catalog.definitions import DEFINITIONS_FILE, default_definitions_text, load_definitions
from lakegate.catalog.warehouse import LIST_DATASETS_HINT, Warehouse, translate_errors
from lakegate.errors import BackendError, ConfigurationError, NotFound

DEMO_DATASETS = {
    "sales.customers",
    "sales.products",
    "sales.orders",
    "sales.order_items",
    "finance.payments",
    "finance.refunds",
    "support.tickets",
    "kb.articles",
}


def test_public_names() -> None:
    assert sorted(catalog.__all__) == [
        "CatalogDefinitions",
        "ColumnDoc",
        "ColumnInfo",
        "DatasetDoc",
        "DatasetInfo",
        "DemoSummary",
        "Embedder",
        "VersionInfo",
        "Warehouse",
        "build_demo",
        "get_embedder",
        "load_definitions",
    ]


# -- definitions -------------------------------------------------------------------------------


def test_packaged_definitions_document_every_demo_dataset(tmp_path: Path) -> None:
    definitions = load_definitions(tmp_path)  # no project file: the packaged one
    # ...and the audit table `lakegate audit export` creates (not part of the demo build).
    assert {d.name for d in definitions.datasets} == DEMO_DATASETS | {"audit.records"}
    for dataset in definitions.datasets:
        assert dataset.description and dataset.owner and dataset.columns
        assert all(column.description for column in dataset.columns)
    orders = definitions.dataset("sales.orders")
    assert orders is not None and orders.kind == "iceberg"
    assert definitions.dataset("kb.articles") is not None
    assert definitions.dataset("kb.articles").kind == "lance"  # type: ignore[union-attr]
    assert orders.column("total_amount") is not None
    assert orders.column("nope") is None
    assert definitions.dataset("nope.nope") is None
    tags = definitions.column_tags()
    for column in ("name", "email", "phone"):
        assert tags[f"sales.customers.{column}"] == ("pii",)
    assert tags["finance.payments.card_last4"] == ("pii",)
    assert "sales.customers.region" not in tags


def test_project_file_overrides_the_packaged_one(tmp_path: Path) -> None:
    path = tmp_path / DEFINITIONS_FILE
    path.parent.mkdir(parents=True)
    path.write_text(
        "datasets:\n"
        "  - name: hr.people\n"
        "    kind: iceberg\n"
        "    description: Staff.\n"
        "    owner: hr@example.com\n"
        "    columns:\n"
        "      - {name: salary, description: Yearly salary., tags: [pii, finance]}\n",
        encoding="utf-8",
    )
    definitions = load_definitions(tmp_path)
    assert [d.name for d in definitions.datasets] == ["hr.people"]
    assert definitions.column_tags() == {"hr.people.salary": ("pii", "finance")}


def test_default_text_is_the_packaged_yaml(tmp_path: Path) -> None:
    path = tmp_path / DEFINITIONS_FILE
    path.parent.mkdir(parents=True)
    path.write_text(default_definitions_text(), encoding="utf-8")
    assert load_definitions(tmp_path) == load_definitions(tmp_path / "elsewhere")


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (
            "datasets:\n  - {name: a.b, kind: parquet, description: d, owner: o}\n",
            "datasets[a.b].kind",
        ),
        (
            "datasets:\n  - {name: a.b, kind: lance, description: d, owner: o, colour: red}\n",
            "datasets[a.b].colour",
        ),
        (
            "datasets:\n  - {name: a.b, kind: lance, description: d, owner: o,"
            " columns: [{name: c, description: x, tags: [Bad Tag]}]}\n",
            "datasets[a.b].columns[c].tags",
        ),
        ("datasets:\n  - {name: NoDot, kind: lance, description: d, owner: o}\n", "datasets[NoDot].name"),
        ("datasets: [\n", "not valid YAML"),
    ],
)
def test_invalid_definitions_name_the_file_and_field(tmp_path: Path, body: str, expected: str) -> None:
    path = tmp_path / DEFINITIONS_FILE
    path.parent.mkdir(parents=True)
    path.write_text(body, encoding="utf-8")
    with pytest.raises(ConfigurationError) as caught:
        load_definitions(tmp_path)
    assert str(path) in str(caught.value)
    assert expected in str(caught.value)


# -- the warehouse -----------------------------------------------------------------------------


def test_new_warehouse_is_empty_and_unknown_names_are_not_found(tmp_path: Path) -> None:
    warehouse = Warehouse(tmp_path / "state")
    assert not (tmp_path / "state").exists()  # nothing is created until used
    assert warehouse.is_empty()
    assert warehouse.dataset_names() == []
    for name in ("sales.orders", "no_namespace", "a.b.c", ""):
        with pytest.raises(NotFound) as caught:
            warehouse.describe(name)
        assert caught.value.hint == LIST_DATASETS_HINT
        assert "Call list_datasets" in str(caught.value)
    warehouse.close()


def _people_schema() -> Schema:
    return Schema(
        NestedField(1, "person_id", LongType(), required=True, doc="Who."),
        NestedField(2, "team", StringType(), required=False),
    )


def test_describe_iceberg_table_from_metadata(tmp_path: Path) -> None:
    warehouse = Warehouse(tmp_path)
    warehouse.iceberg.create_namespace("hr")
    schema = _people_schema()
    spec = PartitionSpec(
        PartitionField(source_id=2, field_id=1000, transform=IdentityTransform(), name="team"),
        PartitionField(source_id=1, field_id=1001, transform=BucketTransform(4), name="person_bucket"),
    )
    table = warehouse.iceberg.create_table("hr.people", schema, partition_spec=spec, properties={"owner": "hr"})
    arrow = schema.as_arrow()
    table.append(pa.Table.from_pylist([{"person_id": 1, "team": "a"}, {"person_id": 2, "team": "b"}], arrow))
    first = warehouse.describe("hr.people")
    table.append(pa.Table.from_pylist([{"person_id": 3, "team": None}], arrow))
    info = warehouse.describe("hr.people")

    assert first.row_count == 2 and len(first.versions) == 1
    assert info.kind == "iceberg"
    assert info.row_count == 3  # the cache is keyed by snapshot, so the new append shows
    assert [c.name for c in info.columns] == ["person_id", "team"]
    assert info.columns[0].type == "long" and info.columns[0].required and info.columns[0].doc == "Who."
    assert info.columns[1].doc is None and not info.columns[1].required
    assert info.partitioning == ("team", "bucket[4](person_id)")
    assert info.properties["owner"] == "hr"
    assert [v.operation for v in info.versions] == ["append", "append"]
    assert info.versions[0].timestamp >= info.versions[1].timestamp
    assert info.current_version == info.versions[0].id
    assert info.versions[0].summary["added-records"] == "1"
    assert info.last_updated is not None and info.last_updated.tzinfo is not None
    assert len(warehouse.describe("hr.people", max_versions=1).versions) == 1
    assert warehouse.dataset_names() == ["hr.people"]
    assert not warehouse.is_empty()
    warehouse.close()


def test_describe_lance_dataset(tmp_path: Path) -> None:
    warehouse = Warehouse(tmp_path)
    schema = pa.schema(
        [pa.field("id", pa.int64(), nullable=False, metadata={"doc": "Row id."}), pa.field("note", pa.string())],
        metadata={"lakegate.embedding_model": "m"},
    )
    table = warehouse.lance.create_table("notes.items", pa.Table.from_pylist([{"id": 1, "note": "x"}], schema))
    table.add(pa.Table.from_pylist([{"id": 2, "note": "y"}], schema))
    info = warehouse.describe("notes.items")
    assert info.kind == "lance"
    assert info.row_count == 2
    assert info.columns[0].type == "int64" and info.columns[0].required and info.columns[0].doc == "Row id."
    assert info.columns[1].doc is None
    assert info.partitioning == ()
    assert [v.id for v in info.versions] == [2, 1]
    assert info.current_version == 2
    assert info.properties["lakegate.embedding_model"] == "m"
    now = datetime.now(UTC)
    # lancedb hands back naive local times; they must come out as the right UTC instant.
    for version in info.versions:
        assert version.timestamp.tzinfo is not None
        assert abs(now - version.timestamp) < timedelta(minutes=5)
    assert warehouse.dataset_names() == ["notes.items"]
    assert warehouse.kind_of("notes.items") == "lance"
    warehouse.close()


def test_storage_errors_are_translated(tmp_path: Path) -> None:
    with pytest.raises(NotFound) as not_found, translate_errors("load x.y", "x.y"):
        raise NoSuchTableError("x.y")
    assert isinstance(not_found.value.__cause__, NoSuchTableError)
    with pytest.raises(BackendError) as failed, translate_errors("write x.y"):
        raise pa.ArrowInvalid("bad batch")
    assert "write x.y failed" in str(failed.value)
    assert isinstance(failed.value.__cause__, pa.ArrowInvalid)
    # Real failures from pyiceberg: a missing namespace, and a batch that does not fit the schema.
    warehouse = Warehouse(tmp_path)
    with pytest.raises(NotFound), translate_errors("create", "missing.t"):
        warehouse.iceberg.create_table("missing.t", _people_schema())
    warehouse.iceberg.create_namespace("ns")
    table = warehouse.iceberg.create_table("ns.t", _people_schema())
    with pytest.raises(BackendError), translate_errors("append to ns.t"):
        table.append(pa.table({"colour": ["red"]}))
    warehouse.close()


def test_close_releases_and_reopens(tmp_path: Path) -> None:
    warehouse = Warehouse(tmp_path)
    warehouse.iceberg.create_namespace("ns")
    warehouse.iceberg.create_table("ns.t", _people_schema())
    warehouse.close()
    assert warehouse.dataset_names() == ["ns.t"]
    assert Warehouse(tmp_path).dataset_names() == ["ns.t"]
