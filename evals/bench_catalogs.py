"""Benchmark: a lakehouse lakegate did not create, attached: discovery, catalog calls and a query.

    python -m lakegate.evals.bench_catalogs [--tables 1000] [--rows 200000] [--runs 30] [--vended]
        [--out evals/results/bench_catalogs.json]

A real Iceberg REST catalog (SeaweedFS on loopback, lakegate.evals.seaweed: SigV4, data files on its
S3) gets `--tables` empty tables in 20 namespaces and one table of `--rows` orders, all created by
plain pyiceberg as another team's pipeline would. A project attaches it (`[catalogs.lake]`,
`refresh_s = 5`, `table_refresh_s = 60`), and `lakegate serve` runs over stdio as `analyst` (who may
read `lake.*` and nothing else), driven by the MCP SDK client. Measured, p50/p99 of `--runs` calls each:
- the first `list_datasets` (discovery: the catalog's namespaces and tables listed), then
  `list_datasets` once discovery is kept (goal: p50 under 50 ms), and `describe_dataset` of tables
  already loaded;
- `search_catalog`, first and then 5 calls (it describes every table the caller may read);
- the time from a table's creation upstream to its first appearance in `list_datasets`;
- a governed aggregate over the orders on S3 through `query`, and the same SQL in plain DuckDB over
  the same planned files as an Arrow dataset on the same S3 (raw over Arrow), interleaved: the ratio.

With `--vended` the catalog vends table-scoped credentials and lakegate attaches it with no s3.*
property (catalog/vended_credentials.py), so every file the governed query reads is read with them
(default output evals/results/bench_catalogs_vended.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio

from lakegate.evals.bench_gate import percentiles
from lakegate.evals.mcp_client import connect
from lakegate.evals.seaweed import Seaweed, start_seaweed

REPO = Path(__file__).resolve().parents[1]
NAMESPACES = 20
QUERY = (
    "SELECT region, count(*) AS orders, sum(amount) AS revenue FROM lake.shop.orders GROUP BY region ORDER BY region"
)
POLICY = """\
p, role:agent, tool:list_datasets, call, allow
p, role:agent, tool:describe_dataset, call, allow
p, role:agent, tool:query, call, allow
p, role:agent, tool:search_catalog, call, allow
p, role:agent, lake.*, read, allow
g, analyst, role:agent
"""


def _catalog(seaweed: Seaweed) -> Any:
    from pyiceberg.catalog import load_catalog

    started = time.monotonic()
    while True:
        try:
            catalog = load_catalog("pipeline", **seaweed.rest_properties())
            catalog.list_namespaces()
            return catalog
        except Exception:
            if time.monotonic() - started > 60:
                raise
            time.sleep(0.5)


def _fill(catalog: Any, tables: int, rows: int) -> None:
    import pyarrow as pa

    schema = pa.schema([("id", pa.int64()), ("label", pa.string()), ("value", pa.float64())])
    for index in range(NAMESPACES):
        catalog.create_namespace(f"team{index:02d}")
    for index in range(tables):
        catalog.create_table((f"team{index % NAMESPACES:02d}", f"table{index:04d}"), schema=schema)
    rng = random.Random(7)
    start = datetime(2025, 1, 1, tzinfo=UTC)
    orders = pa.table(
        {
            "order_id": pa.array(range(rows), pa.int64()),
            "order_ts": pa.array([start + timedelta(minutes=i) for i in range(rows)], pa.timestamp("us", tz="UTC")),
            "region": [rng.choice(["EMEA", "NA", "APAC", "LATAM"]) for _ in range(rows)],
            "amount": [round(rng.uniform(5, 500), 2) for _ in range(rows)],
        }
    )
    catalog.create_namespace("shop")
    catalog.create_table(("shop", "orders"), schema=orders.schema).append(orders)


def _project(root: Path, seaweed: Seaweed, *, vended: bool) -> Path:
    project = root / "project"
    (project / "policies").mkdir(parents=True)
    (project / "policies" / "model.conf").write_text((REPO / "policies" / "model.conf").read_text())
    (project / "policies" / "row_filters.yaml").write_text("filters: []\n")
    (project / "policies" / "policy.csv").write_text(POLICY)
    properties = seaweed.rest_properties()
    for key in ("client.secret-access-key", "s3.secret-access-key"):
        properties[key] = "${BENCH_LAKE_SECRET}"
    for key in ("client.access-key-id", "s3.access-key-id"):
        properties[key] = "${BENCH_LAKE_KEY}"
    if vended:  # only the keys that sign the catalog's calls: the files are read with vended ones
        properties = {key: value for key, value in properties.items() if not key.startswith("s3.")}
    lines = ["build_demo = false", "", "[catalogs.lake]", "refresh_s = 5", "table_refresh_s = 60", ""]
    lines += ["[catalogs.lake.properties]", *(f'"{key}" = "{value}"' for key, value in properties.items())]
    (project / "lakegate.toml").write_text("\n".join(lines) + "\n")
    return project


def _raw_over_arrow(seaweed: Seaweed) -> Any:
    """A plain DuckDB connection with the orders' planned files as an Arrow dataset on S3."""
    import duckdb
    import pyarrow.dataset as ds
    from pyiceberg.catalog import load_catalog

    table = load_catalog("raw", **seaweed.rest_properties()).load_table(("shop", "orders"))
    files = [task.file.file_path.partition("://")[2] for task in table.scan().plan_files()]
    connection = duckdb.connect()
    connection.register("orders", ds.dataset(files, format="parquet", filesystem=seaweed.store("raw").filesystem))
    return connection


async def _bench(seaweed: Seaweed, project: Path, home: Path, runs: int, catalog: Any) -> dict[str, Any]:
    results: dict[str, Any] = {}
    async with connect("analyst", home, project=project, LAKEGATE_PROFILE="embedded") as client:
        started = time.perf_counter()
        first = await client.call_tool("list_datasets", {"limit": 50})
        results["first_list_datasets_ms"] = round((time.perf_counter() - started) * 1000, 1)
        assert not first.is_error, first
        listed: list[float] = []
        for _ in range(runs):
            started = time.perf_counter()
            await client.call_tool("list_datasets", {"limit": 50})
            listed.append((time.perf_counter() - started) * 1000)
        results["list_datasets"] = percentiles(listed)
        names = [d["name"] for d in (first.structured_content or {}).get("datasets", [])]
        described: list[float] = []
        for index in range(runs):
            started = time.perf_counter()
            answer = await client.call_tool("describe_dataset", {"name": names[index % len(names)]})
            described.append((time.perf_counter() - started) * 1000)
            assert not answer.is_error, answer
        results["describe_dataset"] = percentiles(described)
        # search_catalog describes every table the caller may read (each loaded from the catalog).
        started = time.perf_counter()
        answer = await client.call_tool("search_catalog", {"query": "orders by region"})
        results["first_search_catalog_ms"] = round((time.perf_counter() - started) * 1000, 1)
        assert not answer.is_error, answer
        searched: list[float] = []
        for _ in range(5):
            started = time.perf_counter()
            await client.call_tool("search_catalog", {"query": "orders by region"})
            searched.append((time.perf_counter() - started) * 1000)
        results["search_catalog"] = percentiles(searched)
        # A table created upstream: how long until an agent sees it.
        catalog.create_table(("team00", "arrived"), schema=catalog.load_table(("team00", "table0000")).schema())
        created = time.perf_counter()
        while True:
            found = await client.call_tool("list_datasets", {"namespace": "lake", "limit": 200})
            text = json.dumps(found.structured_content)
            if "lake.team00.arrived" in text:
                break
            page = found.structured_content or {}
            cursor = page.get("next_cursor")
            while cursor and "lake.team00.arrived" not in text:
                more = await client.call_tool("list_datasets", {"namespace": "lake", "limit": 200, "cursor": cursor})
                text = json.dumps(more.structured_content)
                cursor = (more.structured_content or {}).get("next_cursor")
            if "lake.team00.arrived" in text:
                break
            await anyio.sleep(0.25)
        results["new_table_seen_after_s"] = round(time.perf_counter() - created, 2)
        # The governed query beside plain DuckDB over the same files, interleaved.
        raw = _raw_over_arrow(seaweed)
        governed: list[float] = []
        plain: list[float] = []
        for _ in range(3):  # warm both
            await client.call_tool("query", {"sql": QUERY})
            raw.execute(QUERY.replace("lake.shop.orders", "orders")).fetchall()
        for _ in range(runs):
            started = time.perf_counter()
            answer = await client.call_tool("query", {"sql": QUERY})
            governed.append((time.perf_counter() - started) * 1000)
            assert not answer.is_error, answer
            started = time.perf_counter()
            raw.execute(QUERY.replace("lake.shop.orders", "orders")).fetchall()
            plain.append((time.perf_counter() - started) * 1000)
        results["query_governed"] = percentiles(governed)
        results["query_raw_over_arrow"] = percentiles(plain)
        results["query_ratio_p50"] = round(statistics.median(governed) / statistics.median(plain), 2)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tables", type=int, default=1000)
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--vended", action="store_true", help="the catalog vends credentials; lakegate has no s3.*")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    name = "bench_catalogs_vended.json" if args.vended else "bench_catalogs.json"
    args.out = args.out or REPO / "evals" / "results" / name
    with tempfile.TemporaryDirectory(prefix="lakegate-bench-catalogs-") as scratch:
        root = Path(scratch)
        (root / "weed").mkdir()
        server = start_seaweed(root / "weed", vend_credentials=args.vended)
        seaweed = next(server)
        try:
            seaweed.wait_ready()
            catalog = _catalog(seaweed)
            started = time.perf_counter()
            _fill(catalog, args.tables, args.rows)
            print(f"created {args.tables} tables and {args.rows:,} orders in {time.perf_counter() - started:.0f} s")
            project = _project(root, seaweed, vended=args.vended)
            os.environ["BENCH_LAKE_SECRET"] = seaweed.rest_properties()["s3.secret-access-key"]
            os.environ["BENCH_LAKE_KEY"] = seaweed.rest_properties()["s3.access-key-id"]
            results = anyio.run(_bench, seaweed, project, root / "home", args.runs, catalog)
        finally:
            server.close()
    report = {
        "benchmark": "attached_catalogs",
        "generated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count()},
        "catalog": "SeaweedFS Iceberg REST catalog on loopback (SigV4), data files on its S3",
        "credentials": "vended per table by the catalog" if args.vended else "the catalog's s3.* properties",
        "tables": args.tables + 1,
        "order_rows": args.rows,
        "runs": args.runs,
        "principal": "analyst",
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    json.dump(report, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
