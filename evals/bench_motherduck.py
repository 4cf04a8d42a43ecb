"""Benchmark: lakegate's governed `query` beside an ungoverned DuckDB MCP server, over stdio.

    python -m lakegate.evals.bench_motherduck --motherduck PATH [--runs 40] [--home DIR]
        [--out evals/results/bench_motherduck.json]

PATH is the `mcp-server-motherduck` executable (PyPI `mcp-server-motherduck`, what an agent builder
would connect instead), installed in a virtual environment of its own: it pins its own DuckDB and
MCP framework, which must not enter lakegate's. For example:

    python3 -m venv /tmp/mdvenv && /tmp/mdvenv/bin/pip install mcp-server-motherduck==1.1.0

The small demo warehouse (built in a temporary directory unless --home names one) is copied, table
by table, into a DuckDB file with the same schema and table names, so that the same SQL runs on
both. Both servers are started once and warmed; then each query goes to lakegate (as `analyst`:
masks, row filters and the audit record all apply) and to MotherDuck (read-only), interleaved in
one run, so that the shared machine's noise falls on both alike. Reported: p50/p99 round trip per
query and server, the ratio of the p50s, and the median of those ratios (the issue's goal: 1.15).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio
from mcp import Client
from mcp.client.stdio import StdioServerParameters
from mcp.types import Implementation

from lakegate.evals.bench_gate import percentiles, small_demo
from lakegate.evals.mcp_client import connect

REPO = Path(__file__).resolve().parents[1]
#: The query shapes an agent sends most: a count, a group-by, a join and a window, on columns the
#: analyst reads in clear.
QUERIES: dict[str, str] = {
    "count": "SELECT count(*) AS n FROM sales.orders",
    "group_by": (
        "SELECT status, count(*) AS n, sum(total_amount) AS revenue FROM sales.orders GROUP BY status ORDER BY status"
    ),
    "join": (
        "SELECT c.region, count(*) AS orders FROM sales.orders o JOIN sales.customers c "
        "ON o.customer_id = c.customer_id GROUP BY c.region ORDER BY c.region"
    ),
    "window": (
        "SELECT order_id, total_amount, rank() OVER (PARTITION BY status ORDER BY total_amount DESC) AS r "
        "FROM sales.orders ORDER BY total_amount DESC, order_id LIMIT 20"
    ),
}
TABLES = ("sales.orders", "sales.customers")


def export_to_duckdb(home: Path, target: Path) -> None:
    """The demo tables, as they are in the warehouse, in a DuckDB file with the same names."""
    import duckdb

    from lakegate.catalog.warehouse import Warehouse

    warehouse = Warehouse(home)
    connection = duckdb.connect()
    try:
        # In a storage format the older DuckDB that mcp-server-motherduck pins can open.
        connection.execute(f"ATTACH '{target}' AS exported (STORAGE_VERSION 'v1.2.0')")
        for name in TABLES:
            schema, table = name.split(".")
            data = warehouse.iceberg_table(name).scan().to_arrow()
            connection.execute(f"CREATE SCHEMA IF NOT EXISTS exported.{schema}")
            connection.register("incoming", data)
            connection.execute(f"CREATE TABLE exported.{schema}.{table} AS SELECT * FROM incoming")
            connection.unregister("incoming")
        connection.execute("DETACH exported")
    finally:
        connection.close()
        warehouse.close()


async def bench(home: Path, database: Path, motherduck: Path, runs: int, audit: Path) -> dict[str, Any]:
    duck = StdioServerParameters(
        command=str(motherduck),
        args=["--db-path", str(database), "--read-only", "--max-rows", "1000"],
        env={**os.environ, "HOME": str(database.parent)},
    )
    info = Implementation(name="lakegate-bench", version="1.0")
    async with (
        connect("analyst", home, LAKEGATE_AUDIT__PATH=str(audit)) as governed,
        Client(duck, client_info=info, read_timeout_seconds=120) as ungoverned,
    ):
        for sql in QUERIES.values():  # warm both: first-call costs are the cold-start benchmark's
            for _ in range(3):
                _check(await governed.call_tool("query", {"sql": sql}), "lakegate", sql)
                _check(await ungoverned.call_tool("execute_query", {"sql": sql}), "motherduck", sql)
        samples: dict[str, dict[str, list[float]]] = {q: {"lakegate": [], "motherduck": []} for q in QUERIES}
        for _ in range(runs):
            for name, sql in QUERIES.items():
                start = time.perf_counter()
                await governed.call_tool("query", {"sql": sql})
                samples[name]["lakegate"].append((time.perf_counter() - start) * 1000)
                start = time.perf_counter()
                await ungoverned.call_tool("execute_query", {"sql": sql})
                samples[name]["motherduck"].append((time.perf_counter() - start) * 1000)
    results: dict[str, Any] = {}
    for name, by_server in samples.items():
        ours, theirs = percentiles(by_server["lakegate"]), percentiles(by_server["motherduck"])
        results[name] = {
            "lakegate": ours,
            "motherduck": theirs,
            "ratio_p50": round(ours["p50_ms"] / theirs["p50_ms"], 3),
        }
    results["median_ratio_p50"] = round(statistics.median(r["ratio_p50"] for r in results.values()), 3)
    return results


def _check(result: Any, server: str, sql: str) -> None:
    if result.is_error:
        text = " ".join(getattr(block, "text", "") for block in result.content)
        raise SystemExit(f"{server} failed on {sql!r}: {text[:300]}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--motherduck", type=Path, required=True, help="the mcp-server-motherduck executable")
    parser.add_argument("--runs", type=int, default=40, help="timed rounds (each query on each server)")
    parser.add_argument("--home", type=Path, default=None, help="state directory with the small demo")
    parser.add_argument("--out", type=Path, default=REPO / "evals" / "results" / "bench_motherduck.json")
    options = parser.parse_args(argv)
    if not options.motherduck.is_file():
        parser.error(f"{options.motherduck} is not a file: install mcp-server-motherduck in a venv of its own")

    with tempfile.TemporaryDirectory() as scratch:
        tmp = Path(scratch)
        home = small_demo(options.home, tmp)
        database = tmp / "demo.duckdb"
        export_to_duckdb(home, database)
        results = anyio.run(bench, home, database, options.motherduck, options.runs, tmp / "audit.jsonl")
    report = {
        "benchmark": "lakegate_vs_motherduck",
        "machine": {"python": sys.version.split()[0], "platform": platform.platform(), "cpus": os.cpu_count()},
        "runs": options.runs,
        "principal": "analyst",
        "motherduck": "mcp-server-motherduck 1.1.0, --read-only, DuckDB file with the same tables",
        "queries": QUERIES,
        "results": results,
    }
    options.out.parent.mkdir(parents=True, exist_ok=True)
    options.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
