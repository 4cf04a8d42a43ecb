"""Catalogs lakegate did not create, attached in lakegate.toml (catalog/attached_catalogs.py).

Two catalogs made by plain pyiceberg code outside lakegate, as another team's pipeline would:
a real Iceberg REST catalog (SeaweedFS, signed with SigV4, data files on its S3) with a partitioned
table written in three snapshots across a schema change and a nested namespace, and a SQL catalog
(SQLite) whose files lie outside lakegate's state directory, with the same namespace and table
name. lakegate attaches both and serves them through the gate: listed and described from the
catalogs' own documentation, queried with masks and row filters, time travel, denied by default,
and never written to while attached read-only.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
import yaml

from lakegate.errors import ConfigurationError, InvalidArgument, LakegateError, NotFound
from lakegate.server.app import Runtime, open_runtime
from lakegate.server.settings import load_settings
from tests.conftest import copy_demo_project, gate_call, gate_ok
from tests.seaweed_support import ACCESS_KEY, SECRET_KEY, Seaweed

#: The secrets reach lakegate through these environment variables, never through lakegate.toml.
KEY_VARIABLE, SECRET_VARIABLE = "LAKEGATE_TEST_LAKE_KEY", "LAKEGATE_TEST_LAKE_SECRET"

ORDERS = pa.schema(
    [
        pa.field("order_id", pa.int64(), nullable=False),
        pa.field("order_ts", pa.timestamp("us", tz="UTC"), nullable=False),
        pa.field("region", pa.string(), nullable=False),
        pa.field("amount", pa.float64(), nullable=False),
    ]
)


def _orders(first: int, month: int, regions: list[str]) -> pa.Table:
    return pa.table(
        {
            "order_id": [first + index for index in range(len(regions))],
            "order_ts": [datetime(2025, month, 1 + index, tzinfo=UTC) for index in range(len(regions))],
            "region": regions,
            "amount": [10.0 * (index + 1) for index in range(len(regions))],
        },
        schema=ORDERS,
    )


@dataclass
class Lakehouse:
    seaweed: Seaweed
    rest: Any  # the pyiceberg catalog the outside pipeline writes through
    first_snapshot: int
    sql_warehouse: Path


def _rest_catalog(seaweed: Seaweed, limit_s: float = 60.0) -> Any:
    from pyiceberg.catalog import load_catalog

    started = time.monotonic()
    while True:  # the REST port answers a little after S3 does
        try:
            catalog = load_catalog("pipeline", **seaweed.rest_properties())
            catalog.list_namespaces()
            return catalog
        except Exception:
            if time.monotonic() - started > limit_s:
                raise
            time.sleep(0.5)


@pytest.fixture(scope="module")
def lakehouse(seaweed_started: Seaweed, tmp_path_factory: pytest.TempPathFactory) -> Lakehouse:
    """The two outside catalogs, written by plain pyiceberg."""
    from pyiceberg.catalog.sql import SqlCatalog
    from pyiceberg.transforms import MonthTransform
    from pyiceberg.types import StringType

    seaweed_started.wait_ready()
    rest = _rest_catalog(seaweed_started)
    rest.create_namespace("sales")
    rest.create_namespace(("sales", "emea"))
    orders = rest.create_table(("sales", "orders"), schema=ORDERS, properties={"comment": "Orders of the web shop."})
    with orders.update_spec() as spec:
        spec.add_field("order_ts", MonthTransform(), "order_month")
    orders.append(_orders(1, 1, ["EMEA", "NA", "EMEA"]))
    first = orders.current_snapshot().snapshot_id
    orders.append(_orders(4, 2, ["NA", "APAC", "EMEA"]))
    with orders.update_schema() as update:
        update.add_column("note", StringType(), doc="What the customer wrote at checkout.")
    orders = rest.load_table(("sales", "orders"))
    third = _orders(7, 3, ["EMEA", "EMEA", "NA"]).append_column("note", pa.array(["gift", None, "fast"]))
    orders.append(third)
    customers = pa.table({"customer_id": pa.array([1, 2], pa.int64()), "email": ["ada@example.com", "bo@example.com"]})
    rest.create_table(("sales", "customers"), schema=customers.schema).append(customers)
    targets = pa.table({"month": pa.array([1, 2], pa.int32()), "goal": [100.0, 120.0]})
    rest.create_table(("sales", "emea", "targets"), schema=targets.schema).append(targets)

    # Another team's SQL catalog, its files in a directory of its own.
    outside = tmp_path_factory.mktemp("outside-catalog")
    sql = SqlCatalog("theirs", uri=f"sqlite:///{outside / 'catalog.db'}", warehouse=(outside / "files").as_uri())
    sql.create_namespace("sales")
    sql.create_table(("sales", "orders"), schema=ORDERS).append(_orders(100, 5, ["NA", "NA"]))
    return Lakehouse(seaweed_started, rest, first, outside)


RULES = """
p, role:analyst, lake.sales.*, read, allow
p, role:analyst, local.sales.*, read, allow
p, role:support_agent, lake.sales.orders, read, allow
p, role:support_agent, lake.sales.orders.*, read, allow
"""
OVERLAY = """
  - name: lake.sales.customers
    description: Customers of the web shop, one row each.
    owner: shop-data@lakegate.example
    tags: [pii]
    columns:
      - {name: email, description: "Contact email.", tags: [pii]}
"""
ROW_FILTER = """
  - subject: role:support_agent
    dataset: lake.sales.orders
    where: "region = 'EMEA'"
    reason: The support desk handles EMEA.
"""


def governed_project(project: Path) -> Path:
    """`project` made a copy of the demo's policies and catalog, with RULES, OVERLAY and ROW_FILTER."""
    copy_demo_project(project)
    with (project / "policies" / "policy.csv").open("a") as rules:
        rules.write(RULES)
    with (project / "catalog" / "datasets.yaml").open("a") as overlay:
        overlay.write(OVERLAY)
    with (project / "policies" / "row_filters.yaml").open("a") as filters:
        filters.write(ROW_FILTER)
    return project


def _project(root: Path, lakehouse: Lakehouse, *, extra: str = "") -> Path:
    """A project that attaches the two catalogs, with the demo's policies plus RULES."""
    project = governed_project(root / "project")
    rest = lakehouse.seaweed.rest_properties()
    for key in ("client.secret-access-key", "s3.secret-access-key"):
        rest[key] = "${" + SECRET_VARIABLE + "}"
    for key in ("client.access-key-id", "s3.access-key-id"):
        rest[key] = "${" + KEY_VARIABLE + "}"
    lines = ["build_demo = false", "", "[catalogs.lake]", "refresh_s = 0.5", "table_refresh_s = 0", ""]
    lines += ["[catalogs.lake.properties]", *(f'"{key}" = "{value}"' for key, value in rest.items()), ""]
    lines += ["[catalogs.local]", 'catalog_name = "theirs"', "", "[catalogs.local.properties]", 'type = "sql"']
    lines += [f'uri = "sqlite:///{lakehouse.sql_warehouse / "catalog.db"}"']
    lines += [f'warehouse = "{(lakehouse.sql_warehouse / "files").as_uri()}"', extra]
    (project / "lakegate.toml").write_text("\n".join(lines) + "\n")
    return project


@pytest.fixture(scope="module")
def attached(lakehouse: Lakehouse, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runtime]:
    root = tmp_path_factory.mktemp("attached")
    project = _project(root, lakehouse)
    saved = {name: os.environ.get(name) for name in (KEY_VARIABLE, SECRET_VARIABLE)}
    os.environ[KEY_VARIABLE], os.environ[SECRET_VARIABLE] = ACCESS_KEY, SECRET_KEY
    audit = {"path": root / "audit.jsonl", "fsync": False}
    runtime = open_runtime(load_settings(project, home=root / "home", audit=audit, principal=None))
    try:
        yield runtime
    finally:
        runtime.close()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        # Nothing lakegate wrote names the secret: not the audit log, not the settings.
        assert SECRET_KEY not in (root / "audit.jsonl").read_text()
        assert SECRET_KEY not in (project / "lakegate.toml").read_text()


def _rows(runtime: Runtime, principal: str, sql: str, **more: Any) -> list[list[Any]]:
    rows: list[list[Any]] = gate_ok(runtime, principal, "query", {"sql": sql, **more})["rows"]
    return rows


def test_attached_tables_are_datasets_listed_and_denied_by_default(attached: Runtime) -> None:
    names = {d["name"] for d in gate_ok(attached, "analyst", "list_datasets", {})["datasets"]}
    assert {"lake.sales.orders", "lake.sales.customers", "lake.sales.emea.targets", "local.sales.orders"} <= names
    support = {d["name"] for d in gate_ok(attached, "support_agent", "list_datasets", {})["datasets"]}
    assert support == {"lake.sales.orders"}
    # A table support may not read looks exactly like one that does not exist.
    hidden = gate_call(attached, "support_agent", "describe_dataset", {"name": "lake.sales.customers"})
    missing = gate_call(attached, "support_agent", "describe_dataset", {"name": "lake.sales.nothing"})
    assert isinstance(hidden.error, NotFound) and isinstance(missing.error, NotFound)
    assert str(hidden.error).replace("customers", "nothing") == str(missing.error)


def test_documentation_comes_from_the_catalog_and_the_overlay(attached: Runtime) -> None:
    orders = gate_ok(attached, "analyst", "describe_dataset", {"name": "lake.sales.orders"})
    assert orders["description"] == "Orders of the web shop."  # the table's `comment` property
    columns = {c["name"]: c for c in orders["columns"]}
    assert list(columns) == ["order_id", "order_ts", "region", "amount", "note"]
    assert columns["note"]["description"] == "What the customer wrote at checkout."  # the field's doc
    assert orders["partitioning"] == ["month(order_ts)"]
    assert len(orders["versions"]) == 3
    customers = gate_ok(attached, "analyst", "describe_dataset", {"name": "lake.sales.customers"})
    assert customers["description"] == "Customers of the web shop, one row each."  # datasets.yaml adds it
    assert {c["name"]: c["access"] for c in customers["columns"]}["email"] == "masked"


def test_attached_tables_are_queried_governed(attached: Runtime) -> None:
    assert _rows(attached, "analyst", "SELECT count(*) FROM lake.sales.orders") == [[9]]
    # The same namespace and table name in two catalogs, and in none of the embedded one.
    both = "SELECT (SELECT count(*) FROM lake.sales.orders), (SELECT count(*) FROM local.sales.orders)"
    assert _rows(attached, "analyst", both) == [[9, 2]]
    assert isinstance(gate_call(attached, "analyst", "query", {"sql": "SELECT * FROM sales.orders"}).error, NotFound)
    # A nested namespace is one quoted part in SQL.
    assert _rows(attached, "analyst", 'SELECT sum(goal) FROM lake."sales.emea".targets') == [[220.0]]
    # Masks and row filters hold: email hashed for the analyst, EMEA rows only for support.
    emails = _rows(attached, "analyst", "SELECT email FROM lake.sales.customers ORDER BY customer_id")
    assert emails and all("@" not in row[0] for row in emails)
    regions = _rows(attached, "support_agent", "SELECT DISTINCT region FROM lake.sales.orders")
    assert regions == [["EMEA"]]
    notes = _rows(attached, "analyst", "SELECT order_id, note FROM lake.sales.orders WHERE note IS NOT NULL ORDER BY 1")
    assert notes == [[7, "gift"], [9, "fast"]]


def test_time_travel_reads_the_snapshot_before_the_column_was_added(attached: Runtime, lakehouse: Lakehouse) -> None:
    sql = "SELECT count(*), count(DISTINCT region) FROM lake.sales.orders"
    rows = _rows(attached, "analyst", sql, as_of={"lake.sales.orders": lakehouse.first_snapshot})
    assert rows == [[3, 2]]


def test_a_read_only_catalog_is_never_written(attached: Runtime) -> None:
    row = {"order_id": 99, "order_ts": "2025-04-01T00:00:00Z", "region": "NA", "amount": 1.0, "note": None}
    refused = gate_call(attached, "admin", "append_rows", {"table": "lake.sales.orders", "rows": [row]})
    assert isinstance(refused.error, InvalidArgument) and "read-only" in str(refused.error)
    assert _rows(attached, "analyst", "SELECT count(*) FROM lake.sales.orders") == [[9]]


def test_tables_and_columns_added_upstream_are_picked_up_without_a_restart(
    attached: Runtime, lakehouse: Lakehouse
) -> None:
    from pyiceberg.types import StringType

    lakehouse.rest.create_table(("sales", "returns"), schema=ORDERS).append(_orders(50, 4, ["NA"]))
    with lakehouse.rest.load_table(("sales", "customers")).update_schema() as update:
        update.add_column("phone", StringType())
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        names = {d["name"] for d in gate_ok(attached, "analyst", "list_datasets", {})["datasets"]}
        if "lake.sales.returns" in names:
            break
        time.sleep(0.3)
    assert "lake.sales.returns" in names
    assert _rows(attached, "analyst", "SELECT count(*) FROM lake.sales.returns") == [[1]]
    columns = [
        c["name"] for c in gate_ok(attached, "analyst", "describe_dataset", {"name": "lake.sales.customers"})["columns"]
    ]
    assert columns == ["customer_id", "email", "phone"]


def test_secrets_come_from_the_environment_only(lakehouse: Lakehouse, tmp_path: Path) -> None:
    project = _project(tmp_path, lakehouse)
    toml = (project / "lakegate.toml").read_text()
    literal = project.parent / "literal"
    shutil.copytree(project, literal)
    (literal / "lakegate.toml").write_text(toml.replace("${" + SECRET_VARIABLE + "}", "plain-text", 1))
    with pytest.raises(ValueError, match="holds a credential"):
        load_settings(literal, home=tmp_path / "home", principal=None)
    saved = os.environ.pop(SECRET_VARIABLE, None)
    try:
        runtime = open_runtime(
            load_settings(
                project,
                home=tmp_path / "home",
                principal=None,
                audit={"path": tmp_path / "audit.jsonl", "fsync": False},
            )
        )
        try:
            outcome = gate_call(runtime, "analyst", "list_datasets", {})
            names = (
                {d["name"] for d in json.loads(outcome.result.model_dump_json())["datasets"]}
                if outcome.result
                else set()
            )
            assert "local.sales.orders" in names and not any(name.startswith("lake.") for name in names)
        finally:
            runtime.close()
    finally:
        if saved is not None:
            os.environ[SECRET_VARIABLE] = saved
    from lakegate.catalog.attached_catalogs import expand_secrets

    with pytest.raises(ConfigurationError, match=SECRET_VARIABLE):
        expand_secrets("lake", {"s3.secret-access-key": "${" + SECRET_VARIABLE + "_MISSING}"})


# -- columns nobody has reviewed (policies/column_review.yaml) --------------------------------------

CONTACTS = pa.table(
    {
        "contact_id": pa.array(range(1, 7), pa.int64()),
        "full_name": [
            "Ada Lovelace",
            "Grace Hopper",
            "Alan Turing",
            "Edsger Dijkstra",
            "Barbara Liskov",
            "Ken Thompson",
        ],
        "phone": [
            "+44 20 7946 0018",
            "+1 (202) 555-0143",
            "+49 30 901820",
            "+31 20 555 0192",
            "+1 617 555 0100",
            "+1-908-555-0155",
        ],
        "last_ip": ["10.0.0.1", "192.168.1.20", "2001:db8::1", "172.16.5.4", "10.1.2.3", "8.8.8.8"],
        "card": [
            "4111 1111 1111 1111",
            "5500-0000-0000-0004",
            "340000000000009",
            "4012888888881881",
            "6011000000000004",
            "3530111333300000",
        ],
        "segment": ["smb", "enterprise", "smb", "smb", "consumer", "enterprise"],
    }
)
REVIEW_RULES = """
p, role:analyst, lake.crm.*, read, allow
p, role:data_steward, lake.*, review, allow
"""


def _cli(project: Path, home: Path, *args: str) -> Any:
    from click.testing import CliRunner

    from lakegate.server.cli.main import cli

    return CliRunner().invoke(cli, ["--project", str(project), *args], env={"LAKEGATE_HOME": str(home)})


def test_columns_nobody_reviewed_stay_hidden_until_a_person_reviews_them(
    lakehouse: Lakehouse, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pyiceberg.types import StringType

    monkeypatch.setenv(KEY_VARIABLE, ACCESS_KEY)
    monkeypatch.setenv(SECRET_VARIABLE, SECRET_KEY)
    lakehouse.rest.create_namespace_if_not_exists("crm")
    contacts = lakehouse.rest.create_table(("crm", "contacts"), schema=CONTACTS.schema)
    contacts.append(CONTACTS)
    project = _project(tmp_path, lakehouse)
    with (project / "policies" / "policy.csv").open("a") as rules:
        rules.write(REVIEW_RULES)
    review_file = project / "policies" / "column_review.yaml"
    review_file.write_text(review_file.read_text().replace("hide_unreviewed: []", "hide_unreviewed: [lake.crm]"))
    home = tmp_path / "home"
    settings = load_settings(project, home=home, principal=None, audit={"path": home / "audit" / "audit.jsonl"})
    runtime = open_runtime(settings)
    try:
        columns = gate_ok(runtime, "analyst", "describe_dataset", {"name": "lake.crm.contacts"})["columns"]
        assert {c["name"]: c["access"] for c in columns}["segment"] == "hidden"
        denied = gate_call(runtime, "analyst", "query", {"sql": "SELECT segment FROM lake.crm.contacts"})
        assert denied.error is not None and "hidden" in str(denied.error)

        # The reviewer sees what was found, and nothing is written without --accept.
        before = review_file.read_text()
        listed = _cli(project, home, "catalog", "review", "--as", "data_steward")
        assert listed.exit_code == 0, listed.output
        for column, kind in [
            ("full_name", "person names"),
            ("phone", "phone numbers"),
            ("last_ip", "IP addresses"),
            ("card", "payment card numbers"),
        ]:
            assert f"lake.crm.contacts.{column}" in listed.output and kind in listed.output
        assert "nothing recognised" in listed.output and review_file.read_text() == before

        wrong = _cli(project, home, "catalog", "review", "--as", "data_steward", "--accept", "--set", "x.y.z=Bad Tag")
        assert wrong.exit_code != 0 and review_file.read_text() == before
        accepted = _cli(
            project,
            home,
            *("catalog", "review", "lake.crm", "--as", "data_steward", "--accept"),
            *("--set", "lake.crm.contacts.full_name=pii,person"),
        )
        assert accepted.exit_code == 0, accepted.output
        reviewed = yaml.safe_load(review_file.read_text())["reviewed"]
        assert (
            reviewed["lake.crm.contacts.phone"]["tags"] == ["pii"]
            and reviewed["lake.crm.contacts.segment"]["tags"] == []
        )
        assert reviewed["lake.crm.contacts.phone"]["by"] == "data_steward"
        assert reviewed["lake.crm.contacts.full_name"]["tags"] == ["pii", "person"]
        assert review_file.read_text().startswith("# Columns nobody has reviewed")  # the comments are kept

        runtime.enforcer.reload_if_changed()
        access = {
            c["name"]: c["access"]
            for c in gate_ok(runtime, "analyst", "describe_dataset", {"name": "lake.crm.contacts"})["columns"]
        }
        assert access["segment"] == "clear" and access["phone"] == "masked"  # tagged pii: the analyst's hash

        # A column added upstream afterwards is hidden again until someone reviews it.
        with lakehouse.rest.load_table(("crm", "contacts")).update_schema() as update:
            update.add_column("notes", StringType())
        access = {
            c["name"]: c["access"]
            for c in gate_ok(runtime, "analyst", "describe_dataset", {"name": "lake.crm.contacts"})["columns"]
        }
        assert access["notes"] == "hidden" and access["segment"] == "clear"
    finally:
        runtime.close()


_OUTSIDE_PIPELINE = """
import sys
from datetime import datetime, timezone
import pyarrow as pa
from pyiceberg.catalog.sql import SqlCatalog

catalog = SqlCatalog("theirs_pg", uri=sys.argv[1], warehouse=sys.argv[2])
catalog.create_namespace("sales")
orders = pa.table({"order_id": pa.array([1, 2, 3, 4], pa.int64()), "region": ["NA", "EMEA", "NA", "APAC"]})
catalog.create_table(("sales", "orders"), schema=orders.schema).append(orders)
"""


def test_a_sql_catalog_in_postgresql_made_by_another_process(
    lakehouse: Lakehouse, fresh_pg_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import subprocess
    import sys

    uri = fresh_pg_url.replace("postgresql://", "postgresql+psycopg://", 1)
    files = (tmp_path / "their-files").as_uri()
    subprocess.run([sys.executable, "-c", _OUTSIDE_PIPELINE, uri, files], check=True, timeout=120)
    monkeypatch.setenv(KEY_VARIABLE, ACCESS_KEY)
    monkeypatch.setenv(SECRET_VARIABLE, SECRET_KEY)
    # The warehouse says where its files lie: lakegate reads with its own rights nowhere else.
    extra = f'\n[catalogs.pg]\ncatalog_name = "theirs_pg"\n[catalogs.pg.properties]\ntype = "sql"\nuri = "{uri}"\n'
    extra += f'warehouse = "{files}"\n'
    project = _project(tmp_path, lakehouse, extra=extra)
    with (project / "policies" / "policy.csv").open("a") as rules:
        rules.write("p, role:analyst, pg.sales.*, read, allow\n")
    home = tmp_path / "home"
    runtime = open_runtime(load_settings(project, home=home, principal=None, audit={"path": home / "audit.jsonl"}))
    try:
        assert "pg.sales.orders" in {d["name"] for d in gate_ok(runtime, "analyst", "list_datasets", {})["datasets"]}
        # One namespace and table name in three catalogs at once, each its own.
        three = (
            "SELECT (SELECT count(*) FROM pg.sales.orders), (SELECT count(*) FROM local.sales.orders), "
            "(SELECT count(*) FROM lake.sales.orders WHERE order_id < 100)"
        )
        assert _rows(runtime, "analyst", three) == [[4, 2, 9]]
        by_region = "SELECT region, count(*) FROM pg.sales.orders GROUP BY region ORDER BY region"
        assert _rows(runtime, "analyst", by_region) == [["APAC", 1], ["EMEA", 1], ["NA", 2]]
        assert isinstance(
            gate_call(runtime, "support_agent", "describe_dataset", {"name": "pg.sales.orders"}).error, NotFound
        )
    finally:
        runtime.close()


def test_discovery_is_kept_and_made_up_names_do_not_walk_the_catalog(tmp_path: Path) -> None:
    from pyiceberg.catalog.sql import SqlCatalog

    from lakegate.catalog.attached_catalogs import MIN_RELIST_S, AttachedCatalog, CatalogSpec

    uri, files = f"sqlite:///{tmp_path / 'catalog.db'}", (tmp_path / "files").as_uri()
    theirs = SqlCatalog("theirs", uri=uri, warehouse=files)
    theirs.create_namespace("sales")
    theirs.create_table(("sales", "orders"), schema=ORDERS)
    now = [1000.0]
    spec = CatalogSpec("lake", {"type": "sql", "uri": uri, "warehouse": files}, catalog_name="theirs", refresh_s=60)
    attached = AttachedCatalog(spec, clock=lambda: now[0])
    assert attached.table_names() == ["lake.sales.orders"]
    theirs.create_table(("sales", "returns"), schema=ORDERS)
    # Within the listing's life a new table is not listed, and asking for names does not list again
    # more than once every MIN_RELIST_S.
    now[0] += MIN_RELIST_S / 2
    assert attached.table_names() == ["lake.sales.orders"]
    with pytest.raises(NotFound):
        attached.identifier("lake.sales.returns")
    now[0] += MIN_RELIST_S
    assert attached.identifier("lake.sales.returns") == ("sales", "returns")
    # A dropped table disappears at the next listing.
    theirs.drop_table(("sales", "orders"))
    now[0] += 61
    assert attached.table_names() == ["lake.sales.returns"]
    with pytest.raises(NotFound):
        attached.load_table("lake.sales.orders")


def test_a_newcomer_attaches_their_catalog_and_an_agent_answers_over_stdio(tmp_path: Path) -> None:
    """The README's "Your own data" steps for a catalog that exists, with the real MCP client."""
    import anyio
    from click.testing import CliRunner
    from pyiceberg.catalog.sql import SqlCatalog

    from lakegate.evals.mcp_client import connect
    from lakegate.server.cli.main import cli

    uri, files = f"sqlite:///{tmp_path / 'theirs.db'}", (tmp_path / "their-files").as_uri()
    theirs = SqlCatalog("prod", uri=uri, warehouse=files)
    theirs.create_namespace("crm")
    theirs.create_table(("crm", "contacts"), schema=CONTACTS.schema, properties={"comment": "CRM contacts."}).append(
        CONTACTS
    )
    project, home = tmp_path / "acme", tmp_path / "state"
    assert CliRunner().invoke(cli, ["init", str(project), "--empty"]).exit_code == 0
    with (project / "lakegate.toml").open("a") as toml:
        toml.write('\n[catalogs.crm_lake]\ncatalog_name = "prod"\n[catalogs.crm_lake.properties]\n')
        toml.write(f'type = "sql"\nuri = "{uri}"\nwarehouse = "{files}"\n')
    policy = project / "policies" / "policy.csv"

    async def ask() -> tuple[list[Any], Any]:
        async with connect("me", home, project=project, LAKEGATE_AUDIT__PATH=str(tmp_path / "a.jsonl")) as client:
            listed = (await client.call_tool("list_datasets", {})).structured_content or {}
            sql = "SELECT segment, count(*) AS n FROM crm_lake.crm.contacts GROUP BY segment ORDER BY segment"
            return listed["datasets"], await client.call_tool("query", {"sql": sql})

    datasets, counted = anyio.run(ask)
    assert datasets == [] and counted.is_error  # deny by default
    policy.write_text(policy.read_text() + "\np, role:agent, crm_lake.crm.*, read, allow\n")
    datasets, counted = anyio.run(ask)
    assert [(d["name"], d["description"]) for d in datasets] == [("crm_lake.crm.contacts", "CRM contacts.")]
    assert not counted.is_error and counted.structured_content["rows"] == [
        ["consumer", 1],
        ["enterprise", 2],
        ["smb", 3],
    ]
    assert not (home / "iceberg" / "catalog.db").exists() or not list((home / "iceberg").rglob("*.parquet"))  # no demo


def test_a_table_whose_files_cannot_be_reached_says_which_and_what_to_check(tmp_path: Path) -> None:

    from pyiceberg.catalog.sql import SqlCatalog

    from lakegate.errors import SourceUnavailable
    from lakegate.server.gate.gate import to_call_result

    uri, files = f"sqlite:///{tmp_path / 'theirs.db'}", tmp_path / "their-files"
    theirs = SqlCatalog("prod", uri=uri, warehouse=files.as_uri())
    theirs.create_namespace("crm")
    theirs.create_table(("crm", "contacts"), schema=CONTACTS.schema).append(CONTACTS)
    theirs.create_table(("crm", "leads"), schema=CONTACTS.schema).append(CONTACTS)
    project = tmp_path / "project"
    copy_demo_project(project)
    (project / "lakegate.toml").write_text(
        f'build_demo = false\n[catalogs.crm_lake]\ncatalog_name = "prod"\n[catalogs.crm_lake.properties]\n'
        f'type = "sql"\nuri = "{uri}"\nwarehouse = "{files.as_uri()}"\n'
    )
    home = tmp_path / "home"
    audit = {"path": home / "audit.jsonl"}
    # No table data kept in the workers' memory: the second query reads the files again.
    runtime = open_runtime(load_settings(project, home=home, principal=None, audit=audit, query={"cache_bytes": "0"}))
    try:
        sql = "SELECT count(*) FROM crm_lake.crm.contacts"
        assert _rows(runtime, "admin", sql) == [[6]]
        for data in files.rglob("*.parquet"):
            data.rename(tmp_path / data.name)  # the data files moved away, the metadata left
        for manifest_list in (files / "crm" / "leads").rglob("snap-*.avro"):
            manifest_list.unlink()  # and a table no plan can be made of
        summed = {"sql": sql.replace("count(*)", "sum(contact_id)")}
        leads = {"sql": "SELECT count(*) FROM crm_lake.crm.leads"}
        for arguments in (summed, leads, leads | {"explain": True}):
            outcome = gate_call(runtime, "admin", "query", arguments)
            assert isinstance(outcome.error, SourceUnavailable), outcome.error
            message = to_call_result(outcome).content[0].text  # type: ignore[union-attr]
            assert "crm_lake.crm." in message and "[catalogs.crm_lake]" in message
            assert str(tmp_path) not in message and "internal error" not in message
    finally:
        runtime.close()


# -- what whoever commits upstream must not be able to do (found by a red-team review) ------------


def _attach_local(tmp_path: Path, home: Path, toml: str, rules: str = "") -> Runtime:
    """A runtime over `home` with the demo's policies plus `rules`, attaching what `toml` says."""
    project = tmp_path / "project"
    copy_demo_project(project)
    with (project / "policies" / "policy.csv").open("a") as policy:
        policy.write("\n" + rules)
    (project / "lakegate.toml").write_text("build_demo = false\n" + toml)
    audit = {"path": tmp_path / "audit.jsonl", "fsync": False}
    return open_runtime(load_settings(project, home=home, principal=None, audit=audit))


def _sql_catalog(tmp_path: Path, name: str = "theirs") -> tuple[Any, str]:
    from pyiceberg.catalog.sql import SqlCatalog

    files = (tmp_path / f"{name}-files").as_uri()
    catalog = SqlCatalog(name, uri=f"sqlite:///{tmp_path / (name + '.db')}", warehouse=files)
    toml = (
        f'[catalogs.{name}]\n[catalogs.{name}.properties]\ntype = "sql"\n'
        f'uri = "sqlite:///{tmp_path / (name + ".db")}"\nwarehouse = "{files}"\n'
    )
    return catalog, toml


def test_a_table_upstream_cannot_name_lakegates_own_files(demo_home: Path, tmp_path: Path) -> None:
    from pyiceberg.io.pyarrow import parquet_file_to_data_file

    from lakegate.catalog.warehouse import Warehouse
    from lakegate.errors import SourceUnavailable

    own = Warehouse(demo_home)
    try:
        customers = own.iceberg_table("sales.customers")
        schema = customers.schema()
        own_files = [task.file.file_path for task in customers.scan().plan_files()]
    finally:
        own.close()
    catalog, toml = _sql_catalog(tmp_path)
    catalog.create_namespace("sales")
    leak = catalog.create_table(("sales", "leak"), schema=schema)
    with leak.transaction() as transaction, transaction.update_snapshot().fast_append() as append:
        for location in own_files:
            append.append_data_file(parquet_file_to_data_file(leak.io, leak.metadata, location))
    runtime = _attach_local(tmp_path, demo_home, toml, "p, role:analyst, theirs.*, read, allow\n")
    try:
        # lakegate's own sales.customers, unmasked and unfiltered, under another name: refused.
        outcome = gate_call(runtime, "analyst", "query", {"sql": "SELECT email FROM theirs.sales.leak"})
        assert isinstance(outcome.error, SourceUnavailable), outcome.error
        assert "@" not in str(outcome.result)
    finally:
        runtime.close()


def test_names_that_read_as_another_resource_are_not_served(demo_home: Path, tmp_path: Path) -> None:
    catalog, toml = _sql_catalog(tmp_path, "sales")  # named like the embedded namespace `sales`
    catalog.create_namespace("secure")
    catalog.create_table(("secure", "vault"), schema=CONTACTS.schema).append(CONTACTS)
    nested, nested_toml = _sql_catalog(tmp_path, "lake")
    nested.create_namespace("crm")
    nested.create_table(("crm", "contacts"), schema=CONTACTS.schema).append(CONTACTS)
    nested.create_namespace(("crm", "contacts"))  # lake.crm.contacts.x is also a column of lake.crm.contacts
    nested.create_table(("crm", "contacts", "x"), schema=CONTACTS.schema).append(CONTACTS)
    rules = (
        "p, role:support_agent, lake.crm.contacts, read, allow\n"
        "p, role:support_agent, lake.crm.contacts.*, read, allow\n"
    )
    runtime = _attach_local(tmp_path, demo_home, toml + nested_toml, rules)
    # The operator sees what is served and what is not, and why.
    listed = _cli(tmp_path / "project", demo_home, "catalog", "list", "--tables")
    assert listed.exit_code == 1, listed.output  # a catalog serves nothing
    assert "sales: nothing served: the embedded catalog has a namespace of that name" in listed.output
    assert "lake: 1 tables served\n  lake.crm.contacts\n  not served: lake.crm.contacts.x" in listed.output
    try:
        names = {d["name"] for d in gate_ok(runtime, "admin", "list_datasets", {"limit": 200})["datasets"]}
        assert "lake.crm.contacts" in names and "sales.secure.vault" not in names and "lake.crm.contacts.x" not in names
        for sql in ("SELECT * FROM sales.secure.vault", 'SELECT * FROM lake."crm.contacts".x'):
            for who in ("analyst", "support_agent", "admin"):
                assert isinstance(gate_call(runtime, who, "query", {"sql": sql}).error, NotFound), (who, sql)
    finally:
        runtime.close()


def test_column_rules_and_reviews_hold_whatever_the_case_or_a_rename(demo_home: Path, tmp_path: Path) -> None:

    catalog, toml = _sql_catalog(tmp_path, "lake")
    catalog.create_namespace("crm")
    people = pa.table(
        {"id": pa.array([1, 2], pa.int64()), "SSN": ["123-45-6789", "987-65-4321"], "card": ["4111", "5500"]}
    )
    table = catalog.create_table(("crm", "people"), schema=people.schema)
    table.append(people)
    rules = "p, role:analyst, lake.crm.*, read, allow\np, role:analyst, lake.crm.people.ssn, read, deny\n"
    runtime = _attach_local(tmp_path, demo_home, toml, rules)
    review = tmp_path / "project" / "policies" / "column_review.yaml"
    field_ids = {field.name: field.field_id for field in table.schema().fields}
    review.write_text(
        "hide_unreviewed: [lake]\nreviewed:\n"
        f"  lake.crm.people.id: {{tags: [], field_id: {field_ids['id']}}}\n"
        f"  lake.crm.people.ssn: {{tags: [], field_id: {field_ids['SSN']}}}\n"
        f"  lake.crm.people.segment: {{tags: [], field_id: 999}}\n"  # reviewed as another field
    )
    try:
        runtime.enforcer.reload_if_changed()
        # The rule on `ssn` holds for the column `SSN`, by any spelling and through *.
        for sql in (
            "SELECT ssn FROM lake.crm.people",
            'SELECT "SSN" FROM lake.crm.people',
            "SELECT * FROM lake.crm.people",
        ):
            outcome = gate_call(runtime, "analyst", "query", {"sql": sql})
            assert outcome.error is not None or "123-45-6789" not in str(outcome.result), sql
        assert _rows(runtime, "analyst", "SELECT * FROM lake.crm.people ORDER BY id") == [[1], [2]]  # card: unreviewed
        # Upstream renames `card` to `segment`, a name reviewed for another field: still hidden.
        with catalog.load_table(("crm", "people")).update_schema() as update:
            update.rename_column("card", "segment")
        assert _rows(runtime, "analyst", "SELECT * FROM lake.crm.people ORDER BY id") == [[1], [2]]
    finally:
        runtime.close()


def test_one_broken_table_upstream_does_not_break_the_listing(demo_home: Path, tmp_path: Path) -> None:
    catalog, toml = _sql_catalog(tmp_path, "lake")
    catalog.create_namespace("crm")
    for name in ("a", "b"):
        catalog.create_table(("crm", name), schema=CONTACTS.schema).append(CONTACTS)
    nested = pa.table({"id": pa.array([1], pa.int64()), "address": [{"city": "Oslo"}]})
    catalog.create_table(("crm", "nested"), schema=nested.schema).append(nested)
    broken = catalog.load_table(("crm", "b")).metadata_location
    runtime = _attach_local(tmp_path, demo_home, toml, "p, role:analyst, lake.crm.*, read, allow\n")
    try:
        Path(broken.removeprefix("file://")).unlink()  # its metadata is gone
        listed = {d["name"]: d for d in gate_ok(runtime, "analyst", "list_datasets", {"limit": 200})["datasets"]}
        assert {"lake.crm.a", "lake.crm.b", "lake.crm.nested"} <= set(listed) and "cannot be read" in listed[
            "lake.crm.b"
        ]["description"]
        assert gate_ok(runtime, "analyst", "search_catalog", {"query": "contacts segment"}) is not None
        # A struct column leaves the table's other columns queryable.
        assert _rows(runtime, "analyst", "SELECT id FROM lake.crm.nested") == [[1]]
    finally:
        runtime.close()


def test_explain_access_knows_attached_datasets_and_their_columns(attached: Runtime) -> None:
    table = gate_ok(attached, "analyst", "explain_access", {"resource": "lake.sales.orders"})
    assert table["allowed"] and {c["name"] for c in table["columns"]} >= {"order_id", "region"}
    nested = gate_ok(attached, "analyst", "explain_access", {"resource": "lake.sales.emea.targets"})
    assert nested["allowed"]
    email = gate_ok(attached, "analyst", "explain_access", {"resource": "lake.sales.customers.email"})
    assert email["access"].startswith("masked")
    hidden = gate_call(attached, "support_agent", "explain_access", {"resource": "lake.sales.customers"})
    assert isinstance(hidden.error, NotFound)


def test_a_catalog_that_is_down_is_tried_again_after_refresh_s_not_on_every_call(tmp_path: Path) -> None:
    from lakegate.catalog.attached_catalogs import AttachedCatalog, CatalogSpec
    from lakegate.errors import BackendError

    now = [0.0]
    missing = tmp_path / "nowhere" / "catalog.db"  # SQLite cannot create a file in a missing directory
    spec = CatalogSpec("down", {"type": "sql", "uri": f"sqlite:///{missing}"}, refresh_s=30)
    attached = AttachedCatalog(spec, clock=lambda: now[0])
    with pytest.raises(LakegateError):
        attached.table_names()
    assert attached.table_names() == []  # within refresh_s: not tried again
    now[0] += 31
    with pytest.raises((BackendError, ConfigurationError)):
        attached.table_names()
