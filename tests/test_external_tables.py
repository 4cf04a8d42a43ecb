"""A table whose files live outside lakegate's state directory (registered in its catalog by other
code, as a platform team's tables are) is read through the same governed path: the worker reads
the planned files as Arrow datasets, and the sandbox still cannot read that directory by name."""

from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow as pa
from pyiceberg.catalog.sql import SqlCatalog

from lakegate.catalog.warehouse import CATALOG_NAME
from lakegate.errors import InvalidArgument, NotFound, PolicyDenied
from lakegate.server.app import open_runtime
from lakegate.server.settings import load_settings
from tests.conftest import REPO, gate_call, gate_ok


def test_a_table_with_files_outside_the_state_directory_is_queried_governed(demo_home: Path, tmp_path: Path) -> None:
    home = tmp_path / "home"
    shutil.copytree(demo_home, home)
    elsewhere = tmp_path / "elsewhere"
    # Plain pyiceberg, outside lakegate, as another tool would register a table.
    catalog = SqlCatalog(CATALOG_NAME, uri=f"sqlite:///{home / 'iceberg' / 'catalog.db'}")
    catalog.create_namespace_if_not_exists("lab")
    data = pa.table({"id": pa.array([1, 2, 3], pa.int64()), "label": ["a", "b", "c"]})
    table = catalog.create_table("lab.outside", schema=data.schema, location=elsewhere.resolve().as_uri())
    table.append(data)
    files = sorted(elsewhere.rglob("*.parquet"))
    assert files and not str(files[0]).startswith(str(home))

    settings = load_settings(REPO, home=home, audit={"path": tmp_path / "audit.jsonl", "fsync": False})
    runtime = open_runtime(settings)
    try:
        answer = gate_ok(runtime, "admin", "query", {"sql": "SELECT id, label FROM lab.outside ORDER BY id"})
        assert answer["rows"] == [[1, "a"], [2, "b"], [3, "c"]]
        # Deny by default: the analyst's policy grants nothing in lab.
        denied = gate_call(runtime, "analyst", "query", {"sql": "SELECT * FROM lab.outside"})
        assert isinstance(denied.error, NotFound | PolicyDenied), denied.error
        # The files are reachable only as this call's relations, never by name.
        by_name = gate_call(runtime, "admin", "query", {"sql": f"SELECT * FROM read_parquet('{files[0]}')"})
        assert isinstance(by_name.error, InvalidArgument) and str(files[0]) not in str(by_name.error)
    finally:
        runtime.close()
