"""Table data kept decoded in a query worker's memory (catalog/column_cache.py): a table read again
comes from memory, answers the same, and a call still sees only what the gate handed it.

Real demo warehouse, real workers: the worker's own count of the bytes it read from files
(`details.bytes_read` in the audit record) says whether a query read its files or memory.
"""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.dataset as ds
import pytest
from pyarrow.fs import LocalFileSystem

from lakegate.catalog.arrow_relations import FragmentCache
from lakegate.catalog.column_cache import ColumnCache
from lakegate.catalog.iceberg_scan import ScanPlanner
from lakegate.catalog.warehouse import Warehouse
from lakegate.server.app import Runtime
from tests.conftest import gate_call

COUNTED = pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="the bytes read are counted only on Linux")


def _query(runtime: Runtime, principal: str, sql: str) -> tuple[list[Any], dict[str, Any]]:
    outcome = gate_call(runtime, principal, "query", {"sql": sql, "limit": 1000})
    assert outcome.error is None and outcome.result is not None and outcome.record is not None, outcome.error
    return outcome.result.model_dump()["rows"], outcome.record["details"]


@COUNTED
def test_a_table_read_again_comes_from_memory_with_the_same_answer(runtime: Runtime) -> None:
    sql = "SELECT product_id, count(*) AS n, sum(quantity) AS units FROM sales.order_items GROUP BY 1 ORDER BY 1"
    first, first_details = _query(runtime, "analyst", sql)
    again, details = _query(runtime, "analyst", sql)
    assert again == first and len(first) > 10
    assert details["bytes_read"] == 0 < first_details["bytes_read"]
    # The engine's own account of what it scanned holds for data from memory too.
    assert details["scanned"] == first_details["scanned"] == {"sales.order_items": ["product_id", "quantity"]}


def test_kept_data_never_widens_what_a_call_reads(runtime: Runtime) -> None:
    # admin reads every customer, order and payment with every column in clear; the worker keeps them.
    clear, _ = _query(runtime, "admin", "SELECT customer_id, email, phone FROM sales.customers ORDER BY 1")
    _query(runtime, "admin", "SELECT * FROM sales.orders ORDER BY order_id")
    _query(runtime, "admin", "SELECT * FROM finance.payments ORDER BY payment_id")
    emails, phones = {row[1] for row in clear}, {row[2] for row in clear if row[2]}
    # After that, analyst reads email hashed, support_agent phone masked and EMEA rows only, and
    # payments not at all.
    hashed, _ = _query(runtime, "analyst", "SELECT customer_id, email FROM sales.customers ORDER BY 1")
    assert len(hashed) == len(clear) and not emails & {row[1] for row in hashed}
    masked, _ = _query(runtime, "support_agent", "SELECT customer_id, phone FROM sales.customers ORDER BY 1")
    assert masked and not phones & {row[1] for row in masked}
    regions, _ = _query(runtime, "support_agent", "SELECT DISTINCT region FROM sales.orders ORDER BY 1")
    assert regions == [["EMEA"]]
    denied = gate_call(runtime, "support_agent", "query", {"sql": "SELECT count(*) FROM finance.payments"})
    assert denied.error is not None and denied.result is None


def _fragments(home: Path, table: str) -> tuple[list[ds.ParquetFileFragment], int]:
    warehouse = Warehouse(home)
    try:
        plan = ScanPlanner(warehouse).plan(table)
    finally:
        warehouse.close()
    return [fragment for fragment, _ in FragmentCache(LocalFileSystem()).fragments(plan.files)], plan.bytes


def test_the_cache_holds_what_the_files_hold_within_its_budget(demo_home: Path) -> None:
    fragments, size = _fragments(demo_home, "sales.orders")
    schema = pa.schema([fragments[0].physical_schema.field(name) for name in ("order_id", "status", "total_amount")])
    from_files = ds.FileSystemDataset(fragments, schema, fragments[0].format, LocalFileSystem()).to_table()
    cache = ColumnCache(max_bytes=4 * size)
    kept = cache.table(fragments, size, schema)
    assert kept is not None and kept.to_pylist() == from_files.to_pylist() and kept.column(0).num_chunks == 1
    assert 0 < cache.held_bytes <= 4 * size
    # Files of more than a quarter of the budget are not kept; the least recently used columns go
    # first when the budget is full.
    assert ColumnCache(max_bytes=4 * size - 4).table(fragments, size, schema) is None
    small = ColumnCache(max_bytes=from_files.nbytes // 2 + 4 * size)
    assert small.table(fragments, size, schema) is not None
    assert small.held_bytes <= small.max_bytes


def test_a_table_whose_data_decodes_past_its_share_is_scanned_from_its_files(tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    # One long random text repeated: some 100 kB of Parquet, 80 MB once decoded (its dictionary is
    # too big to be read as one).
    text = secrets.token_hex(100_000)
    pq.write_table(pa.table({"id": range(400), "body": [text] * 400}), tmp_path / "blob.parquet")
    size = (tmp_path / "blob.parquet").stat().st_size
    fragments = [f for f, _ in FragmentCache(LocalFileSystem()).fragments([(str(tmp_path / "blob.parquet"), size)])]
    schema = fragments[0].physical_schema
    cache = ColumnCache(max_bytes=4 * 1_000_000)
    assert size < 1_000_000 and cache.table(fragments, size, schema) is None and cache.held_bytes == 0
    assert ColumnCache(max_bytes=4 * 100_000_000).table(fragments, size, schema) is not None
