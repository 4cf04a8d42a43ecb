"""An attached REST catalog that vends credentials (catalog/vended_credentials.py).

A real SeaweedFS whose Iceberg REST catalog vends, for each table load, short-lived S3 credentials
that reach only that table's files (its STS, a role only the catalog may assume). Another team's
pipeline writes the tables with its own keys; lakegate attaches the catalog with nothing but the
keys that sign its REST calls: no s3.* property, and a `warehouse` that names the catalog's
warehouse rather than a place (as Polaris's does). Every data file an agent reads is read with the
credentials vended for its table.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
from structlog.testing import capture_logs

from lakegate.catalog.vended_credentials import CREDENTIAL_KEYS
from lakegate.errors import SourceUnavailable
from lakegate.evals.seaweed import VENDED_FOR_S
from lakegate.server.app import Runtime, open_runtime
from lakegate.server.settings import load_settings
from tests.conftest import gate_call, gate_ok
from tests.seaweed_support import TABLE_BUCKET, Seaweed, seaweed_or_skip
from tests.test_attached_catalogs import _rest_catalog, governed_project

KEY_VARIABLE, SECRET_VARIABLE = "LAKEGATE_TEST_VEND_KEY", "LAKEGATE_TEST_VEND_SECRET"
#: What would let pyarrow read S3 without the vended credentials: not set while these tests run.
AMBIENT = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE")


@dataclass
class Vending:
    seaweed: Seaweed
    first_snapshot: int
    project: Path


@pytest.fixture(scope="module")
def vending(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Vending]:
    """SeaweedFS vending credentials; the pipeline's tables; a project that attaches the catalog."""
    root = tmp_path_factory.mktemp("vending")
    saved = {name: os.environ.pop(name, None) for name in AMBIENT}
    for seaweed in seaweed_or_skip(root, vend_credentials=True):
        seaweed.wait_ready()
        pipeline = _rest_catalog(seaweed)
        pipeline.create_namespace("sales")
        orders = pipeline.create_table(("sales", "orders"), schema=ORDERS.schema)
        orders.append(ORDERS.slice(0, 3))
        first = orders.current_snapshot().snapshot_id
        orders.append(ORDERS.slice(3))
        pipeline.create_table(("sales", "customers"), schema=CUSTOMERS.schema).append(CUSTOMERS)
        project = governed_project(root / "project")
        lines = ["build_demo = false", "", "[catalogs.lake]", "refresh_s = 0.5", "table_refresh_s = 0", ""]
        lines += ["[catalogs.lake.properties]", *(f'"{key}" = "{value}"' for key, value in _signing(seaweed).items())]
        (project / "lakegate.toml").write_text("\n".join(lines) + "\n")
        yield Vending(seaweed, first, project)
    for name, value in saved.items():
        if value is not None:
            os.environ[name] = value


ORDERS = pa.table(
    {
        "order_id": pa.array([1, 2, 3, 4, 5], pa.int64()),
        "customer_id": pa.array([1, 2, 1, 2, 2], pa.int64()),
        "region": ["EMEA", "NA", "EMEA", "APAC", "EMEA"],
        "amount": [10.0, 20.0, 30.0, 40.0, 50.0],
    }
)
CUSTOMERS = pa.table({"customer_id": pa.array([1, 2], pa.int64()), "email": ["ada@example.com", "bo@example.com"]})


def _signing(seaweed: Seaweed, **more: str) -> dict[str, str]:
    """lakegate's properties for the catalog: the REST calls' signing keys (from the environment),
    no s3.* property, and the catalog's warehouse by name."""
    properties = {key: value for key, value in seaweed.rest_properties().items() if not key.startswith("s3.")}
    properties["client.access-key-id"] = "${" + KEY_VARIABLE + "}"
    properties["client.secret-access-key"] = "${" + SECRET_VARIABLE + "}"
    properties["warehouse"] = TABLE_BUCKET
    return properties | more


@pytest.fixture(scope="module")
def attached(vending: Vending, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runtime]:
    from tests.seaweed_support import ACCESS_KEY, SECRET_KEY

    home = tmp_path_factory.mktemp("vending-home")
    os.environ[KEY_VARIABLE], os.environ[SECRET_VARIABLE] = ACCESS_KEY, SECRET_KEY
    audit = {"path": home / "audit.jsonl", "fsync": False}
    runtime = open_runtime(load_settings(vending.project, home=home, audit=audit, principal=None))
    try:
        yield runtime
    finally:
        runtime.close()
        os.environ.pop(KEY_VARIABLE, None)
        os.environ.pop(SECRET_VARIABLE, None)


def _rows(runtime: Runtime, principal: str, sql: str, **more: Any) -> list[list[Any]]:
    rows: list[list[Any]] = gate_ok(runtime, principal, "query", {"sql": sql, **more})["rows"]
    return rows


def test_an_agent_reads_the_tables_with_the_credentials_vended_for_each(attached: Runtime, vending: Vending) -> None:
    names = {d["name"] for d in gate_ok(attached, "analyst", "list_datasets", {})["datasets"]}
    assert {"lake.sales.orders", "lake.sales.customers"} <= names
    assert _rows(attached, "analyst", "SELECT count(*), sum(amount) FROM lake.sales.orders") == [[5, 150.0]]
    # A join reads two tables, each through the credentials vended for it alone.
    joined = "SELECT count(*) FROM lake.sales.orders o JOIN lake.sales.customers c USING (customer_id)"
    assert _rows(attached, "analyst", joined) == [[5]]
    # Masks, row filters and time travel hold as on any catalog.
    emails = _rows(attached, "analyst", "SELECT email FROM lake.sales.customers ORDER BY customer_id")
    assert len(emails) == 2 and all("@" not in row[0] for row in emails)
    assert _rows(attached, "support_agent", "SELECT DISTINCT region FROM lake.sales.orders") == [["EMEA"]]
    as_of = {"lake.sales.orders": vending.first_snapshot}
    assert _rows(attached, "analyst", "SELECT count(*) FROM lake.sales.orders", as_of=as_of) == [[3]]

    # What made that possible: each plan carries its table's credentials, and they reach only it.
    scans = attached.warehouse.scans
    orders, customers = scans.plan("lake.sales.orders"), scans.plan("lake.sales.customers")
    assert orders.vended is not None and customers.vended is not None
    assert orders.vended.key != customers.vended.key
    assert orders.source().store_key == f"lake#{orders.vended.key}"
    filesystem = orders.vended.filesystem("lake")
    assert filesystem.get_file_info(orders.files[0][0]).size == orders.files[0][1]
    with pytest.raises(OSError, match="ACCESS_DENIED|Access Denied"):
        filesystem.open_input_file(customers.files[0][0]).read()


def test_credentials_are_held_until_they_are_due_then_replaced(
    attached: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lakegate.catalog import vended_credentials

    catalog = attached.warehouse.attached["lake"]
    scans = attached.warehouse.scans
    first = scans.plan("lake.sales.orders").vended
    # table_refresh_s = 0: every plan loads the table again, and SeaweedFS mints new credentials
    # on each load, but the held ones are used until they are due.
    loaded = [catalog.load_table("lake.sales.orders").io.properties["s3.session-token"] for _ in range(2)]
    assert loaded[0] != loaded[1]
    second = scans.plan("lake.sales.orders").vended
    assert first is not None and second is not None and second.key == first.key
    assert first.expires_at is not None and abs(first.expires_at - time.time() - VENDED_FOR_S) < 60

    # Due once fewer than RENEW_BEFORE_S are left: the next plan takes the fresh ones, and a table
    # kept longer than that is loaded again for them, however long table_refresh_s is.
    monkeypatch.setattr(vended_credentials, "RENEW_BEFORE_S", VENDED_FOR_S + 60)
    third = scans.plan("lake.sales.orders").vended
    assert third is not None and third.key != first.key
    assert _rows(attached, "analyst", "SELECT count(*) FROM lake.sales.orders") == [[5]]
    from lakegate.catalog.attached_catalogs import AttachedCatalog, CatalogSpec

    patient = AttachedCatalog(CatalogSpec("lake", catalog.spec.properties, table_refresh_s=3600))
    assert patient.load_table("lake.sales.orders") is not patient.load_table("lake.sales.orders")
    monkeypatch.setattr(vended_credentials, "RENEW_BEFORE_S", 300.0)
    table = patient.load_table("lake.sales.orders")
    assert patient.load_table("lake.sales.orders") is table


def test_vended_credentials_reach_no_answer_log_or_audit_record(attached: Runtime) -> None:
    with capture_logs() as logs:
        outcomes = [
            gate_call(attached, "analyst", "query", {"sql": "SELECT * FROM lake.sales.orders ORDER BY order_id"}),
            gate_call(attached, "analyst", "query", {"sql": "SELECT * FROM lake.sales.orders", "explain": True}),
            gate_call(attached, "analyst", "query", {"sql": "SELECT nothing FROM lake.sales.orders"}),
            gate_call(attached, "analyst", "describe_dataset", {"name": "lake.sales.orders"}),
        ]
    plan = attached.warehouse.scans.plan("lake.sales.orders")
    assert plan.vended is not None
    secrets = [value for key, value in plan.vended.properties if key in CREDENTIAL_KEYS]
    assert len(secrets) == 3
    answers = json.dumps([o.result.model_dump() if o.result else str(o.error) for o in outcomes], default=str)
    assert attached.settings.audit.path is not None
    audit = attached.settings.audit.path.read_text()
    assert "lake.sales.orders" in audit
    shown = [answers, audit, json.dumps(logs, default=str), repr(plan), repr(plan.source())]
    for text in shown:
        assert not any(secret in text for secret in secrets)
        assert "ASIA" not in text  # SeaweedFS's key ids of vended sessions, whichever load minted them


def _runtime(vending: Vending, root: Path, monkeypatch: pytest.MonkeyPatch, *, toml: list[str]) -> Runtime:
    """A runtime of a copy of the project whose lakegate.toml is `toml`."""
    from tests.seaweed_support import ACCESS_KEY, SECRET_KEY

    monkeypatch.setenv(KEY_VARIABLE, ACCESS_KEY)
    monkeypatch.setenv(SECRET_VARIABLE, SECRET_KEY)
    project = root / "project"
    shutil.copytree(vending.project, project)
    (project / "lakegate.toml").write_text("\n".join(["build_demo = false", *toml]) + "\n")
    home = root / "home"
    return open_runtime(load_settings(project, home=home, principal=None, audit={"path": home / "audit.jsonl"}))


def test_a_catalog_asked_for_no_credentials_says_which_table_and_what_to_check(
    vending: Vending, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Asked for another delegation mode, the catalog vends nothing, and lakegate has no s3.*
    property of its own (its warehouse is a name, not a place): the agent is told which table and
    what to check, never "internal error"."""
    from lakegate.server.gate.gate import to_call_result

    properties = _signing(vending.seaweed, **{"header.X-Iceberg-Access-Delegation": "remote-signing"})
    toml = ["[catalogs.lake.properties]", *(f'"{k}" = "{v}"' for k, v in properties.items())]
    runtime = _runtime(vending, tmp_path, monkeypatch, toml=toml)
    try:
        outcome = gate_call(runtime, "analyst", "query", {"sql": "SELECT count(*) FROM lake.sales.orders"})
        assert isinstance(outcome.error, SourceUnavailable), outcome.error
        message = to_call_result(outcome).content[0].text  # type: ignore[union-attr]
        assert "lake.sales.orders" in message and "[catalogs.lake]" in message
        assert "internal error" not in message and str(tmp_path) not in message
    finally:
        runtime.close()


def test_a_writable_vending_catalog_is_written_with_the_credentials_it_vends(
    vending: Vending, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """lakegate has no s3.* property: the data file of an allowed append is written with the
    credentials vended for the table, and the other team's pipeline reads the new snapshot."""
    pipeline = _rest_catalog(vending.seaweed)
    events = pa.table({"event_id": pa.array([1, 2], pa.int64()), "kind": ["view", "buy"]})
    pipeline.create_table(("sales", "events"), schema=events.schema).append(events)
    toml = ["[catalogs.lake]", "writable = true", "[catalogs.lake.properties]"]
    toml += [f'"{key}" = "{value}"' for key, value in _signing(vending.seaweed).items()]
    runtime = _runtime(vending, tmp_path, monkeypatch, toml=toml)
    try:
        row = {"event_id": 3, "kind": "refund"}
        appended = gate_ok(runtime, "admin", "append_rows", {"table": "lake.sales.events", "rows": [row]})
        table = pipeline.load_table(("sales", "events"))
        assert table.current_snapshot().snapshot_id == appended["snapshot_id"]
        assert sorted(table.scan().to_arrow().column("event_id").to_pylist()) == [1, 2, 3]
        assert _rows(runtime, "analyst", "SELECT kind FROM lake.sales.events WHERE event_id = 3") == [["refund"]]
    finally:
        runtime.close()
        pipeline.drop_table(("sales", "events"))


def test_an_agent_over_stdio_reads_a_vending_catalog(vending: Vending, tmp_path: Path) -> None:
    import anyio

    from lakegate.evals.mcp_client import connect
    from tests.seaweed_support import ACCESS_KEY, SECRET_KEY

    env = {KEY_VARIABLE: ACCESS_KEY, SECRET_VARIABLE: SECRET_KEY, "LAKEGATE_AUDIT__PATH": str(tmp_path / "a.jsonl")}

    async def ask() -> Any:
        async with connect("support_agent", tmp_path / "home", project=vending.project, **env) as client:
            sql = "SELECT region, sum(amount) AS total FROM lake.sales.orders GROUP BY region"
            return await client.call_tool("query", {"sql": sql})

    answer = anyio.run(ask)
    assert not answer.is_error and answer.structured_content["rows"] == [["EMEA", 90.0]]


def _answered(loaded: Any, own: dict[str, str], config: dict[str, str], properties: dict[str, str]) -> Any:
    """`loaded` as pyiceberg builds a table from a load answer with `config` (credentials and all),
    the table having `properties` and the catalog `own` properties."""
    from pyiceberg.io import load_file_io
    from pyiceberg.table import Table

    metadata = loaded.metadata.model_copy(update={"properties": properties})
    io = load_file_io({**own, **properties, **config})  # pyiceberg's own order of precedence
    return Table(loaded.name(), metadata, loaded.metadata_location, io, loaded.catalog, config=config)


def test_a_tables_own_properties_never_choose_where_or_with_what_its_files_are_read(attached: Runtime) -> None:
    """Whoever may commit to a table sets its properties, and pyiceberg merges them into its FileIO
    properties under the catalog's answer: where the answer is silent, lakegate.toml decides."""
    from lakegate.catalog.vended_credentials import vended_credentials

    own = {"s3.endpoint": "http://storage.internal:9000", "client.region": "eu-west-1"}
    loaded = attached.warehouse.attached["lake"].load_table("lake.sales.orders")
    answer = {key: loaded.io.properties[key] for key in CREDENTIAL_KEYS}  # the endpoint left out
    planted = {"s3.endpoint": "http://attacker.example", "s3.access-key-id": "planted", "s3.region": "nowhere-1"}

    vended = vended_credentials(_answered(loaded, own, answer, planted), own, received_at=time.time())
    assert vended is not None
    properties = dict(vended.properties)
    assert properties["s3.endpoint"] == own["s3.endpoint"] and "s3.region" not in properties
    assert properties["s3.access-key-id"] == answer["s3.access-key-id"]
    # Credentials planted in the table's properties alone are not vended ones.
    planted |= {"s3.secret-access-key": "x", "s3.session-token": "y"}
    assert vended_credentials(_answered(loaded, own, {}, planted), own, received_at=time.time()) is None


def test_credentials_are_due_by_their_expiry_or_undated_hold_s_after_the_load_that_brought_them(
    attached: Runtime,
) -> None:
    """A table kept for table_refresh_s keeps the credentials of the load that brought it: without
    an expiry they are due UNDATED_HOLD_S after that load, however often they are looked at."""
    from lakegate.catalog.vended_credentials import EXPIRES_KEY, RENEW_BEFORE_S, UNDATED_HOLD_S, expiring

    loaded = attached.warehouse.attached["lake"].load_table("lake.sales.orders")
    undated = {key: loaded.io.properties[key] for key in CREDENTIAL_KEYS}
    now = time.time()
    assert not expiring(_answered(loaded, {}, undated, {}), {}, received_at=now - UNDATED_HOLD_S + 30)
    assert expiring(_answered(loaded, {}, undated, {}), {}, received_at=now - UNDATED_HOLD_S - 1)
    later = undated | {EXPIRES_KEY: str(int((now + RENEW_BEFORE_S + 60) * 1000))}
    assert not expiring(_answered(loaded, {}, later, {}), {}, received_at=now - 10 * UNDATED_HOLD_S)
    soon = undated | {EXPIRES_KEY: str(int((now + RENEW_BEFORE_S - 60) * 1000))}
    assert expiring(_answered(loaded, {}, soon, {}), {}, received_at=now)


# -- what whoever commits to the catalog must not make lakegate do (found by a red-team review) ----


def test_a_tables_own_properties_never_make_the_file_io_lakegate_reads_it_with(
    attached: Runtime, vending: Vending
) -> None:
    """pyiceberg builds a table's FileIO with the table's own properties merged in: `py-io-impl`
    would import a module the committer chose and hand it every property (lakegate.toml's secrets,
    the vended credentials); a proxy or endpoint would send lakegate's signed reads elsewhere."""
    from tests import planted_file_io

    pipeline = _rest_catalog(vending.seaweed)
    planted = pipeline.create_table(("sales", "planted"), schema=CUSTOMERS.schema)
    planted.append(CUSTOMERS)
    dead = "http://127.0.0.1:9"  # nothing listens there: a read through it fails
    steer = {"py-io-impl": "tests.planted_file_io.PlantedFileIO", "s3.proxy-uri": dead, "s3.endpoint": dead}
    with planted.transaction() as transaction:
        transaction.set_properties(steer)
    try:
        planted_file_io.MADE.clear()
        pipeline.load_table(("sales", "planted"))  # plain pyiceberg obeys the table: the test can fail
        assert planted_file_io.MADE and planted_file_io.MADE[-1]["s3.proxy-uri"] == dead
        planted_file_io.MADE.clear()
        attached.warehouse.attached["lake"].refresh()  # listed now, not after refresh_s
        assert _rows(attached, "analyst", "SELECT count(*) FROM lake.sales.planted") == [[2]]
        described = gate_ok(attached, "analyst", "describe_dataset", {"name": "lake.sales.planted"})
        assert described["name"] == "lake.sales.planted"
        assert planted_file_io.MADE == []
        loaded = attached.warehouse.attached["lake"].load_table("lake.sales.planted")
        assert "py-io-impl" not in loaded.io.properties and loaded.io.properties["s3.endpoint"] != dead
    finally:
        pipeline.drop_table(("sales", "planted"))


def test_a_table_moved_to_a_local_directory_is_not_read(
    attached: Runtime, vending: Vending, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The catalog's warehouse is a name, not a place: a table's files are read only on S3 under the
    table's location, with the credentials vended for it; a committer who moves the table to a
    directory of lakegate's host gets nothing read there."""
    import pyarrow.parquet as pq
    from pyiceberg.table.update import SetLocationUpdate

    from lakegate.server.gate.gate import to_call_result

    secret = tmp_path / "export"
    secret.mkdir()
    pq.write_table(pa.table({"customer_id": pa.array([7], pa.int64()), "email": ["host-secret"]}), secret / "a.parquet")
    pipeline = _rest_catalog(vending.seaweed)
    moved = pipeline.create_table(("sales", "moved"), schema=CUSTOMERS.schema)
    moved._do_commit((SetLocationUpdate(location=secret.as_uri()),), ())
    pipeline.load_table(("sales", "moved")).add_files([(secret / "a.parquet").as_uri()])
    attached.warehouse.attached["lake"].refresh()  # listed now, not after refresh_s
    # Also where the catalog is asked for no credentials: lakegate's own rights read nothing there.
    properties = _signing(vending.seaweed, **{"header.X-Iceberg-Access-Delegation": "remote-signing"})
    toml = ["[catalogs.lake.properties]", *(f'"{k}" = "{v}"' for k, v in properties.items())]
    unvended = _runtime(vending, tmp_path / "unvended", monkeypatch, toml=toml)
    try:
        for runtime in (attached, unvended):
            outcome = gate_call(runtime, "analyst", "query", {"sql": "SELECT * FROM lake.sales.moved"})
            assert isinstance(outcome.error, SourceUnavailable), outcome.error
            message = to_call_result(outcome).content[0].text  # type: ignore[union-attr]
            assert "lake.sales.moved" in message and "host-secret" not in message and str(tmp_path) not in message
    finally:
        unvended.close()
        pipeline.drop_table(("sales", "moved"))


def test_a_manifest_list_named_outside_the_table_is_never_opened(
    attached: Runtime, vending: Vending, tmp_path: Path
) -> None:
    """A committer writes the paths of a snapshot's manifest list and manifests; pyiceberg would open
    any of them (here a file of lakegate's host) with lakegate's rights while planning."""
    from pyiceberg.table.snapshots import Operation, Snapshot, Summary
    from pyiceberg.table.update import AddSnapshotUpdate, SetSnapshotRefUpdate

    local = tmp_path / "not-a-manifest-list.avro"
    local.write_bytes(b"host data")
    pipeline = _rest_catalog(vending.seaweed)
    table = pipeline.create_table(("sales", "steered"), schema=CUSTOMERS.schema)
    table.append(CUSTOMERS)
    current = pipeline.load_table(("sales", "steered")).current_snapshot()
    steered = Snapshot(
        snapshot_id=current.snapshot_id + 1,
        parent_snapshot_id=current.snapshot_id,
        sequence_number=current.sequence_number + 1,
        timestamp_ms=current.timestamp_ms + 1,
        manifest_list=local.as_uri(),
        summary=Summary(Operation.APPEND),
        schema_id=current.schema_id,
    )
    head = SetSnapshotRefUpdate(ref_name="main", type="branch", snapshot_id=steered.snapshot_id)
    table._do_commit((AddSnapshotUpdate(snapshot=steered), head), ())
    attached.warehouse.attached["lake"].refresh()  # listed now, not after refresh_s
    try:
        outcome = gate_call(attached, "analyst", "query", {"sql": "SELECT count(*) FROM lake.sales.steered"})
        assert isinstance(outcome.error, SourceUnavailable), outcome.error
        assert "lies outside" in str(outcome.error)  # refused before pyiceberg opened it
    finally:
        pipeline.drop_table(("sales", "steered"))
