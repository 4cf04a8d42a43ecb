"""`lakegate table load|register`: an organisation's own files and tables, brought in through the
gate as a write of the person's principal, with the real DuckDB reader, pyiceberg catalog and policy.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import anyio
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner, Result
from pyiceberg.catalog.sql import SqlCatalog

from lakegate.catalog.warehouse import Warehouse
from lakegate.errors import InvalidArgument
from lakegate.evals.mcp_client import connect
from lakegate.server.cli.main import cli
from tests.conftest import REPO, copy_demo_project, gate_call
from tests.test_approvals import _open
from tests.test_writes import build_write_home

CSV = (
    "order_id,customer,amount,ordered_at\n"
    "1,ada,12.50,2025-01-03 10:00:00\n"
    "2,bob,oops,2025-01-04 11:00:00\n"
    "3,cy,7.25,2025-02-01 09:30:00\n"
    "4,dee\n"
    "5,eve,3,2025-02-11 00:00:00\n"
)


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "home"


def _load(home: Path, *args: str) -> Result:
    return CliRunner().invoke(cli, ["--project", str(REPO), "table", "load", *args], env={"LAKEGATE_HOME": str(home)})


def _table(home: Path, name: str) -> Any:
    warehouse = Warehouse(home)
    try:
        return warehouse.iceberg_table(name)
    finally:
        warehouse.close()


def _records(home: Path) -> list[dict[str, Any]]:
    path = home / "audit" / "audit.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_csv_is_loaded_with_its_bad_rows_set_aside_and_reported(home: Path, tmp_path: Path) -> None:
    source = tmp_path / "in" / "orders.csv"
    source.parent.mkdir()
    source.write_text(CSV)
    args = [str(source), "--table", "shop.orders", "--type", "amount=DECIMAL(10,2)", "--partition-by"]
    result = _load(home, *args, "ordered_at:month", "--as", "admin")
    assert result.exit_code == 0, result.output
    assert "Created shop.orders: 3 rows" in result.output
    # Each set-aside row is named by file and line, with the reason.
    assert "orders.csv" in result.output and "oops" in result.output and "Expected Number of Columns" in result.output
    table = _table(home, "shop.orders")
    rows = table.scan().to_arrow().sort_by("order_id").to_pylist()
    assert [(r["order_id"], str(r["amount"])) for r in rows] == [(1, "12.50"), (3, "7.25"), (5, "3.00")]
    assert len(table.metadata.snapshots) == 1
    assert [str(field.transform) for field in table.spec().fields] == ["month"]
    (record,) = [r for r in _records(home) if r["tool"] == "table/load"]
    details = record["details"]
    assert (record["principal"], record["outcome"], details["rows"], details["rejected_rows"]) == ("admin", "ok", 3, 3)
    assert details["files"] == ["orders.csv"] and details["snapshot_after"] == table.metadata.current_snapshot_id
    assert str(tmp_path) not in json.dumps(record)  # no path of this machine in the audit record


def test_the_loaded_table_is_served_governed_and_denied_by_default(home: Path, tmp_path: Path) -> None:
    source = tmp_path / "orders.csv"
    source.write_text(CSV)
    assert _load(home, str(source), "--table", "shop.orders", "--as", "admin").exit_code == 0
    runtime = _open(home, tmp_path / "audit.jsonl")
    try:
        ok = gate_call(runtime, "admin", "query", {"sql": "SELECT count(*) AS n FROM shop.orders"})
        assert ok.error is None and ok.result.model_dump()["rows"] == [[4]]  # type: ignore[union-attr]
        denied = gate_call(runtime, "analyst", "query", {"sql": "SELECT count(*) AS n FROM shop.orders"})
        assert denied.error is not None and "No dataset named 'shop.orders'" in str(denied.error)
    finally:
        runtime.close()


def test_parquet_and_json_lines_append_and_replace(home: Path, tmp_path: Path) -> None:
    first = tmp_path / "a.parquet"
    pq.write_table(pa.table({"id": [1, 2], "label": ["x", "y"]}), first)
    assert _load(home, str(first), "--table", "lab.items", "--as", "admin").exit_code == 0
    more = tmp_path / "more"
    more.mkdir()
    (more / "b.jsonl").write_text('{"id": 3, "label": "z"}\n{"id": "four", "label": "w"}\n')
    appended = _load(home, str(more), "--table", "lab.items", "--append", "--type", "id=BIGINT", "--as", "admin")
    assert appended.exit_code == 0 and "Appended to lab.items: 1 rows" in appended.output, appended.output
    assert "b.jsonl" in appended.output and "Could not convert the value of id" in appended.output
    assert sorted(r["id"] for r in _table(home, "lab.items").scan().to_arrow().to_pylist()) == [1, 2, 3]
    replaced = _load(home, str(first), "--table", "lab.items", "--replace", "--as", "admin")
    assert replaced.exit_code == 0, replaced.output
    table = _table(home, "lab.items")
    assert sorted(r["id"] for r in table.scan().to_arrow().to_pylist()) == [1, 2]
    # The history keeps every load: restore_table can go back.
    assert len(table.metadata.snapshots) >= 3


def test_mistakes_are_refused_with_what_to_do_instead(home: Path, tmp_path: Path) -> None:
    source = tmp_path / "orders.csv"
    source.write_text(CSV)
    assert _load(home, str(source), "--table", "shop.orders", "--as", "admin").exit_code == 0
    again = _load(home, str(source), "--table", "shop.orders", "--create", "--as", "admin")
    assert again.exit_code == 1 and "exists already" in again.output and "--append" in again.output
    (tmp_path / "x.parquet").write_bytes(pq_bytes())
    mixed = _load(home, str(source), str(tmp_path / "x.parquet"), "--table", "shop.more", "--as", "admin")
    assert mixed.exit_code == 1 and "mix formats" in mixed.output
    unknown = _load(home, str(source), "--table", "shop.more", "--type", "price=DOUBLE", "--as", "admin")
    assert unknown.exit_code == 1 and "--type names no column: price" in unknown.output
    partition = _load(home, str(source), "--table", "shop.more", "--partition-by", "nope:month", "--as", "admin")
    assert partition.exit_code == 1 and "--partition-by nope:month" in partition.output
    dry = _load(home, str(source), "--table", "shop.dry", "--dry-run", "--as", "admin")
    assert dry.exit_code == 0 and "nothing was written" in dry.output
    warehouse = Warehouse(home)
    try:
        assert "shop.dry" not in warehouse.iceberg_table_names() and "shop.more" not in warehouse.iceberg_table_names()
    finally:
        warehouse.close()


def pq_bytes() -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table({"a": [1]}), sink)
    return bytes(sink.getvalue().to_pybytes())


def test_a_principal_without_write_is_refused_and_audited(home: Path, tmp_path: Path) -> None:
    source = tmp_path / "orders.csv"
    source.write_text(CSV)
    refused = _load(home, str(source), "--table", "sales.extra", "--as", "analyst")
    assert refused.exit_code == 1 and "may not write dataset 'sales.extra'" in refused.output, refused.output
    warehouse = Warehouse(home)
    try:
        assert "sales.extra" not in warehouse.iceberg_table_names()
    finally:
        warehouse.close()
    (record,) = [r for r in _records(home) if r["tool"] == "table/load"]
    assert (record["principal"], record["decision"], record["outcome"]) == ("analyst", "deny", "denied")


def test_an_existing_table_is_registered_and_read_where_its_files_are(home: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    other = SqlCatalog("other", uri=f"sqlite:///{elsewhere}/catalog.db", warehouse=elsewhere.as_uri())
    other.create_namespace("ext")
    table = other.create_table("ext.events", schema=pa.schema([("id", pa.int64()), ("kind", pa.string())]))
    table.append(pa.table({"id": [1, 2, 3], "kind": ["a", "b", "a"]}))
    location = other.load_table("ext.events").metadata_location
    env = {"LAKEGATE_HOME": str(home)}
    registered = CliRunner().invoke(
        cli, ["--project", str(REPO), "table", "register", "ext.events", location, "--as", "admin"], env=env
    )
    assert registered.exit_code == 0 and "Registered ext.events" in registered.output, registered.output
    runtime = _open(home, tmp_path / "audit.jsonl")
    try:
        counted = gate_call(
            runtime, "admin", "query", {"sql": "SELECT kind, count(*) AS n FROM ext.events GROUP BY 1 ORDER BY 1"}
        )
        assert counted.error is None and counted.result.model_dump()["rows"] == [["a", 2], ["b", 1]]  # type: ignore[union-attr]
    finally:
        runtime.close()
    missing = CliRunner().invoke(
        cli,
        ["--project", str(REPO), "table", "register", "ext.gone", str(tmp_path / "no.metadata.json"), "--as", "admin"],
        env=env,
    )
    assert missing.exit_code == 1 and "metadata file cannot be read" in missing.output


def test_a_newcomer_goes_from_init_empty_to_an_agent_answering_over_their_csv(tmp_path: Path) -> None:
    """The README's "Your own data" steps, with the real MCP client over stdio."""
    project, home = tmp_path / "acme", tmp_path / "state"
    runner = CliRunner()
    assert runner.invoke(cli, ["init", str(project), "--empty"]).exit_code == 0
    source = tmp_path / "orders.csv"
    source.write_text(CSV)
    env = {"LAKEGATE_HOME": str(home)}
    loaded = runner.invoke(
        cli,
        ["--project", str(project), "table", "load", str(source), "--table", "sales.orders", "--as", "owner"],
        env=env,
    )
    assert loaded.exit_code == 0, loaded.output
    policy = project / "policies" / "policy.csv"
    audit = {"LAKEGATE_AUDIT__PATH": str(tmp_path / "a.jsonl")}

    async def ask() -> tuple[list[Any], Any]:
        async with connect("me", home, project=project, **audit) as client:
            listed = (await client.call_tool("list_datasets", {})).structured_content or {}
            counted = await client.call_tool("query", {"sql": "SELECT count(*) AS n FROM sales.orders"})
            return listed["datasets"], counted

    datasets, counted = anyio.run(ask)
    assert datasets == [] and counted.is_error  # deny by default
    policy.write_text(policy.read_text() + "\np, role:agent, sales.*, read, allow\n")
    datasets, counted = anyio.run(ask)
    assert [d["name"] for d in datasets] == ["sales.orders"]
    assert not counted.is_error and counted.structured_content["rows"] == [[4]]


def test_what_the_review_found_stays_fixed(home: Path, tmp_path: Path) -> None:
    files = tmp_path / "files"
    files.mkdir()
    # A column name with a quote, given a --type: no SQL of its own runs, bad values are set aside.
    (files / "q.jsonl").write_text('{"a\\"b": "1"}\n{"a\\"b": "x"}\n')
    quoted = _load(home, str(files / "q.jsonl"), "--table", "lab.quoted", "--type", 'a"b=BIGINT', "--as", "admin")
    assert quoted.exit_code == 0 and "1 rows" in quoted.output, quoted.output
    # A file whose name DuckDB would read as a pattern is refused; a file named twice is read once.
    (files / "x[1].csv").write_text("id\n1\n")
    assert "pattern character" in _load(home, str(files / "x[1].csv"), "--table", "lab.g", "--as", "admin").output
    (files / "one.csv").write_text("id\n1\n2\n")
    twice = _load(home, str(files / "one.csv"), str(files / "one.csv"), "--table", "lab.once", "--as", "admin")
    assert "2 rows" in twice.output, twice.output
    # A partition transform the column cannot take is refused before any table exists.
    bad = _load(home, str(files / "one.csv"), "--table", "lab.part", "--partition-by", "id:month", "--as", "admin")
    assert bad.exit_code == 1 and "does not take" in bad.output
    zero = _load(home, str(files / "one.csv"), "--table", "lab.part", "--partition-by", "id:bucket[0]", "--as", "admin")
    assert zero.exit_code == 1 and "does not take" in zero.output
    warehouse = Warehouse(home)
    try:
        assert "lab.part" not in warehouse.iceberg_table_names() and "lab.g" not in warehouse.iceberg_table_names()
    finally:
        warehouse.close()
    # A JSON array in a .json file is rows, not one row of one column.
    (files / "arr.json").write_text('[{"id": 1}, {"id": 2}, {"id": 3}]')
    array = _load(home, str(files / "arr.json"), "--table", "lab.arr", "--as", "admin")
    assert array.exit_code == 0 and "3 rows" in array.output, array.output


def test_loads_keep_to_the_approval_and_column_rules(tmp_path: Path) -> None:
    home = build_write_home(tmp_path / "home")
    rows = "ticket_id,customer_id,opened_ts,priority,status,subject,body\n" + "".join(
        f"{100 + n},7,2025-03-01 09:30:00+00,normal,open,s,b\n" for n in range(25)
    )
    (tmp_path / "t.csv").write_text(rows)
    # 25 rows from support_agent: over the demo's approval rule, so the append is staged.
    staged = _load(home, str(tmp_path / "t.csv"), "--table", "support.tickets", "--append", "--as", "support_agent")
    assert staged.exit_code == 0 and "Staged 25 rows" in staged.output, staged.output
    assert _table(home, "support.tickets").scan().to_arrow().num_rows == 1
    # Replacing needs approval here too, and it would remove closed_ts values support_agent may not set.
    replaced = _load(home, str(tmp_path / "t.csv"), "--table", "support.tickets", "--replace", "--as", "support_agent")
    assert replaced.exit_code == 1 and "closed_ts" in replaced.output, replaced.output
    assert _table(home, "support.tickets").scan().to_arrow().num_rows == 1


def test_register_refuses_bad_metadata_and_a_second_name_for_a_known_table(home: Path, tmp_path: Path) -> None:
    source = tmp_path / "orders.csv"
    source.write_text(CSV)
    assert _load(home, str(source), "--table", "shop.orders", "--as", "admin").exit_code == 0
    env = {"LAKEGATE_HOME": str(home)}
    not_metadata = tmp_path / "x.metadata.json"
    not_metadata.write_text('{"format-version": 2}')

    def register(name: str, location: str) -> Result:
        args = ["--project", str(REPO), "table", "register", name, location, "--as", "admin"]
        return CliRunner().invoke(cli, args, env=env)

    bad = register("shop.bad", str(not_metadata))
    assert bad.exit_code == 1 and "cannot be read as Iceberg table metadata" in bad.output, bad.output
    again = register("shop.copy", _table(home, "shop.orders").metadata_location)
    assert again.exit_code == 1 and "shop.orders's" in again.output, again.output
    # A table whose own properties would configure the FileIO it is read with (found by a red team:
    # pyiceberg imported the module a table named, handing it lakegate's storage properties).
    from pyiceberg.catalog.sql import SqlCatalog

    from tests import planted_file_io

    theirs = SqlCatalog("theirs", uri=f"sqlite:///{tmp_path / 'theirs.db'}", warehouse=(tmp_path / "w").as_uri())
    theirs.create_namespace("x")
    steering = {"py-io-impl": "tests.planted_file_io.PlantedFileIO", "s3.endpoint": "http://127.0.0.1:9"}
    planted = theirs.create_table(("x", "t"), schema=_table(home, "shop.orders").schema(), properties=steering)
    planted_file_io.MADE.clear()
    refused = register("shop.planted", planted.metadata_location)
    assert refused.exit_code == 1 and "py-io-impl, s3.endpoint" in refused.output, refused.output
    assert planted_file_io.MADE == []
    warehouse = Warehouse(home)
    try:
        assert warehouse.dataset_names() == ["shop.orders"]  # nothing half-registered; listing works
    finally:
        warehouse.close()


def test_a_small_new_table_under_an_approval_rule_is_created(home: Path, tmp_path: Path) -> None:
    # The rule counts what was appended in its window: a table that does not exist yet has none.
    project = copy_demo_project(tmp_path / "project")
    (project / "policies" / "approvals.yaml").write_text(
        'rules:\n  - subject: admin\n    datasets: ["lab.*"]\n    above_rows: 100\n    window_minutes: 60\n'
    )
    (tmp_path / "one.csv").write_text("id\n1\n2\n")
    created = CliRunner().invoke(
        cli,
        [
            "--project",
            str(project),
            "table",
            "load",
            str(tmp_path / "one.csv"),
            "--table",
            "lab.small",
            "--as",
            "admin",
        ],
        env={"LAKEGATE_HOME": str(home)},
    )
    assert created.exit_code == 0 and "2 rows" in created.output, created.output


def test_a_type_for_a_column_a_json_file_lacks_is_refused_by_name(tmp_path: Path) -> None:
    from lakegate.catalog.file_loader import read_files

    (tmp_path / "a.jsonl").write_text('{"id": 1}\n')
    with pytest.raises(InvalidArgument, match="--type names no column: price"):
        read_files([tmp_path / "a.jsonl"], {"price": "DOUBLE"})
