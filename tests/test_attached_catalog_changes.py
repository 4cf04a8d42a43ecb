"""Attached catalogs that change: a refresh on demand (`lakegate catalog refresh`) in both profiles,
and a catalog attached writable, written through the gate."""

from __future__ import annotations

import json
import time
from pathlib import Path

from lakegate.errors import NotFound, PolicyDenied
from tests.conftest import gate_call, gate_ok
from tests.test_attached_catalogs import CONTACTS, _attach_local, _cli, _sql_catalog


def test_a_refresh_on_demand_serves_tables_created_upstream_at_the_next_call(tmp_path: Path) -> None:
    catalog, toml = _sql_catalog(tmp_path)
    catalog.create_namespace("ops")
    catalog.create_table(("ops", "first"), schema=CONTACTS.schema).append(CONTACTS)
    toml = toml.replace("[catalogs.theirs]\n", "[catalogs.theirs]\nrefresh_s = 3600\n")  # never on its own here
    home = tmp_path / "home"
    runtime = _attach_local(tmp_path, home, toml, "p, role:analyst, theirs.*, read, allow\n")
    try:

        def names() -> set[str]:
            return {d["name"] for d in gate_ok(runtime, "analyst", "list_datasets", {})["datasets"]}

        assert names() == {"theirs.ops.first"}
        catalog.create_table(("ops", "second"), schema=CONTACTS.schema).append(CONTACTS)
        catalog.drop_table(("ops", "first"))
        time.sleep(1.1)  # past the once-a-second check: still the listing of an hour
        assert names() == {"theirs.ops.first"}
        refreshed = _cli(tmp_path / "project", home, "catalog", "refresh")
        assert refreshed.exit_code == 0, refreshed.output
        assert "theirs: 1 tables served" in refreshed.output
        deadline = time.monotonic() + 5
        while names() != {"theirs.ops.second"} and time.monotonic() < deadline:
            time.sleep(0.2)
        assert names() == {"theirs.ops.second"}
        assert isinstance(
            gate_call(runtime, "analyst", "describe_dataset", {"name": "theirs.ops.first"}).error, NotFound
        )
    finally:
        runtime.close()


def test_a_refresh_asked_for_in_postgresql_reaches_every_replica(fresh_pg_url: str, tmp_path: Path) -> None:
    from lakegate.catalog.attached_catalogs import AttachedCatalog, CatalogSpec
    from lakegate.catalog.warehouse import Warehouse
    from lakegate.server.catalog_refresh import PostgresRefreshRequests

    catalog, _ = _sql_catalog(tmp_path)
    catalog.create_namespace("ops")
    catalog.create_table(("ops", "first"), schema=CONTACTS.schema)
    properties = {"type": "sql", "uri": f"sqlite:///{tmp_path / 'theirs.db'}", "warehouse": (tmp_path / "x").as_uri()}
    replicas = []
    for name in ("one", "two"):
        spec = CatalogSpec("theirs", properties, refresh_s=3600)
        requests = PostgresRefreshRequests(fresh_pg_url)
        assert requests.latest() == 0.0  # nobody has asked yet (the table does not even exist)
        replicas.append(
            Warehouse(tmp_path / name, attached={"theirs": AttachedCatalog(spec)}, refresh_requested=requests.latest)
        )
    try:
        for replica in replicas:
            assert "theirs.ops.first" in replica.dataset_names()
        catalog.create_table(("ops", "second"), schema=CONTACTS.schema)
        time.sleep(1.1)
        assert all("theirs.ops.second" not in replica.dataset_names() for replica in replicas)
        asked = PostgresRefreshRequests(fresh_pg_url).request()
        assert PostgresRefreshRequests(fresh_pg_url).latest() == asked
        time.sleep(1.1)
        assert all("theirs.ops.second" in replica.dataset_names() for replica in replicas)
    finally:
        for replica in replicas:
            replica.close()


def test_a_writable_catalog_is_written_through_the_gate(tmp_path: Path) -> None:
    catalog, toml = _sql_catalog(tmp_path)
    catalog.create_namespace("crm")
    catalog.create_table(("crm", "contacts"), schema=CONTACTS.schema).append(CONTACTS)
    before = catalog.load_table(("crm", "contacts")).current_snapshot().snapshot_id
    toml = toml.replace("[catalogs.theirs]\n", "[catalogs.theirs]\nwritable = true\n")
    runtime = _attach_local(tmp_path, tmp_path / "home", toml, "p, role:analyst, theirs.*, read, allow\n")
    try:
        row = {name: CONTACTS.column(name)[0].as_py() for name in CONTACTS.column_names} | {"contact_id": 99}
        # Reading is not writing: the analyst may read the catalog, not change it.
        denied = gate_call(runtime, "analyst", "append_rows", {"table": "theirs.crm.contacts", "rows": [row]})
        assert isinstance(denied.error, PolicyDenied)
        appended = gate_ok(runtime, "admin", "append_rows", {"table": "theirs.crm.contacts", "rows": [row]})
        assert appended["previous_snapshot_id"] == before and appended["snapshot_id"] != before
        # The other team's own pyiceberg sees the row, in the snapshot the audit record names.
        table = catalog.load_table(("crm", "contacts"))
        assert table.current_snapshot().snapshot_id == appended["snapshot_id"]
        assert 99 in table.scan().to_arrow().column("contact_id").to_pylist()
        records = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
        append = [r for r in records if r["tool"] == "append_rows" and r["outcome"] == "ok"][-1]
        assert str(appended["snapshot_id"]) in json.dumps(append)
        # A restore is a write too, and lands upstream.
        gate_ok(runtime, "admin", "restore_table", {"table": "theirs.crm.contacts", "snapshot_id": before})
        assert 99 not in catalog.load_table(("crm", "contacts")).scan().to_arrow().column("contact_id").to_pylist()
    finally:
        runtime.close()
