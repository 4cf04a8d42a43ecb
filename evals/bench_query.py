"""Benchmark: governed SQL through the query tool versus the same SQL run directly in DuckDB.

    python -m lakegate.evals.bench_query --home DIR [--runs 15] [--out evals/results/bench_query.json]

DIR is a state directory holding the large demo warehouse (10M orders):
    LAKEGATE_HOME=DIR lakegate demo --scale large

1. In process, interleaved in one run: each query through `Gate.call` as `analyst` (tool decision,
   SQL guard, column decisions, masks, rewrite, query worker with its locked DuckDB sandbox, JSON
   rows, audit record), the same SQL in a plain DuckDB connection over views of the same Parquet
   files (raw), and the same again over the Arrow datasets the worker reads them through (raw over
   Arrow). Reports the governed/raw ratio of the medians per query and the median of those ratios,
   and its two factors: governed over raw-over-Arrow (what governance costs) and raw-over-Arrow
   over raw (what reading only through registered datasets costs).
2. Over stdio with the real MCP client: p50/p99 end-to-end latency per query.
3. Peak memory (max RSS) of this process and of the stdio server.
4. The two ways to read Iceberg from DuckDB 2.0 without its extension, on a filtered aggregate:
   pyiceberg's scan to Arrow, and pyiceberg's file planning followed by read_parquet (what lakegate uses).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio

from lakegate.evals.bench_gate import percentiles
from lakegate.server.app import open_runtime
from lakegate.server.gate.identity import CallOrigin, stdio_principal
from lakegate.server.settings import load_settings

REPO = Path(__file__).resolve().parents[1]
TABLES = ("sales.orders", "sales.customers", "sales.order_items", "sales.products")

QUERIES: dict[str, str] = {
    "revenue_by_region": "SELECT region, sum(total_amount) AS revenue FROM sales.orders GROUP BY region "
    "ORDER BY region",
    "orders_by_month_2025": "SELECT date_trunc('month', order_ts) AS month, count(*) AS orders FROM sales.orders "
    "WHERE order_ts >= TIMESTAMPTZ '2025-01-01' GROUP BY 1 ORDER BY 1",
    "status_mix_one_month": "SELECT status, count(*) AS n FROM sales.orders WHERE order_ts >= TIMESTAMPTZ '2025-11-01' "
    "AND order_ts < TIMESTAMPTZ '2025-12-01' GROUP BY status ORDER BY n DESC",
    "top_customers": "SELECT customer_id, sum(total_amount) AS spent FROM sales.orders GROUP BY customer_id "
    "ORDER BY spent DESC LIMIT 10",
    "segment_join": "SELECT c.segment, count(*) AS orders, avg(o.total_amount) AS avg_order FROM sales.orders o "
    "JOIN sales.customers c ON o.customer_id = c.customer_id GROUP BY c.segment ORDER BY c.segment",
    "channel_window": "SELECT channel, month, orders, "
    "sum(orders) OVER (PARTITION BY channel ORDER BY month) AS running "
    "FROM (SELECT channel, date_trunc('month', order_ts) AS month, count(*) AS orders FROM sales.orders GROUP BY 1, 2) "
    "ORDER BY channel, month",
    "point_lookup": "SELECT * FROM sales.orders WHERE order_id = 5000000",
    "distinct_hashed_emails": "SELECT count(DISTINCT email) AS customers FROM sales.customers",
}


def _raw_connection(runtime: Any, *, arrow: bool = False) -> Any:
    """Plain DuckDB (no sandbox, no policy, no worker) with one view per table over the same planned
    files: read by DuckDB's own Parquet reader, or (`arrow`) through the same Arrow datasets the
    query worker registers, which is the only way the sandbox may read them."""
    import duckdb
    import pyarrow.fs

    from lakegate.catalog.arrow_relations import FragmentCache, build_relation

    connection = duckdb.connect(config={"threads": runtime.settings.query.threads})
    connection.execute("SET TimeZone = 'UTC'")
    cache = FragmentCache(pyarrow.fs.LocalFileSystem())
    for name in TABLES:
        plan = runtime.warehouse.scans.plan(name)
        namespace, table = name.split(".")
        if arrow:
            source = build_relation(plan.source(), cache, connection.register, name, lambda *_: None)
        else:
            source = "read_parquet([" + ", ".join("'" + path + "'" for path, _ in plan.files) + "])"
        connection.execute(f"CREATE SCHEMA IF NOT EXISTS {namespace}")
        connection.execute(f"CREATE VIEW {namespace}.{table} AS SELECT * FROM {source}")
    return connection


async def bench_in_process(home: Path, runs: int, tmp: Path) -> dict[str, Any]:
    settings = load_settings(REPO, home=home, audit={"path": tmp / "bench.jsonl", "fsync": True})
    runtime = open_runtime(settings)
    principal = stdio_principal("analyst", runtime.enforcer)
    origin = CallOrigin(transport="bench", session_id="bench")
    raw = _raw_connection(runtime)
    raw_arrow = _raw_connection(runtime, arrow=True)
    results: dict[str, Any] = {}
    try:
        for name, sql in QUERIES.items():
            arguments = {"sql": sql, "limit": 1000}

            async def governed(a: dict[str, Any] = arguments) -> int:
                outcome = await runtime.gate.call("query", a, principal, origin)
                assert outcome.error is None, outcome.error
                return len(outcome.result.rows)  # type: ignore[union-attr]

            def direct(q: str = sql, connection: Any = raw) -> int:
                return int(connection.sql(q).to_arrow_table().num_rows)

            def through_arrow(q: str = sql) -> int:
                return direct(q, raw_arrow)

            for _ in range(2):  # warm the OS cache, plans, footers and workers
                assert await governed() == direct() == through_arrow()
            governed_ms: list[float] = []
            raw_ms: list[float] = []
            arrow_ms: list[float] = []
            for _ in range(runs):  # interleaved: machine noise hits all three alike
                for samples, run in ((raw_ms, direct), (arrow_ms, through_arrow)):
                    start = time.perf_counter()
                    run()
                    samples.append((time.perf_counter() - start) * 1000)
                start = time.perf_counter()
                await governed()
                governed_ms.append((time.perf_counter() - start) * 1000)
            g, r, a = percentiles(governed_ms), percentiles(raw_ms), percentiles(arrow_ms)
            results[name] = {
                "governed": g,
                "raw": r,
                "raw_over_arrow": a,
                "ratio_p50": round(g["p50_ms"] / r["p50_ms"], 3),
                "governed_over_raw_arrow_p50": round(g["p50_ms"] / a["p50_ms"], 3),
                "arrow_over_native_p50": round(a["p50_ms"] / r["p50_ms"], 3),
            }
            print(
                f"{name}: governed {g['p50_ms']} ms, raw {r['p50_ms']} ms, raw over Arrow {a['p50_ms']} ms, "
                f"ratio {results[name]['ratio_p50']}"
            )
    finally:
        raw.close()
        raw_arrow.close()
        runtime.close()
    return results


def bench_read_paths(home: Path, runs: int) -> dict[str, Any]:
    """The two ways to read Iceberg from DuckDB 2.0 without its extension, on one filtered aggregate."""
    import duckdb

    from lakegate.catalog.warehouse import Warehouse

    warehouse = Warehouse(home)
    table = warehouse.iceberg_table("sales.orders")
    sql = "SELECT region, sum(total_amount) FROM orders WHERE order_ts >= TIMESTAMPTZ '2025-07-01' GROUP BY 1"
    row_filter = "order_ts >= '2025-07-01T00:00:00+00:00'"  # pyiceberg parses this into its expression

    def arrow_scan() -> int:
        # pyiceberg reads and filters the files into one Arrow table; DuckDB aggregates it.
        orders = table.scan(row_filter=row_filter, selected_fields=("region", "total_amount", "order_ts")).to_arrow()
        connection = duckdb.connect()
        connection.register("orders", orders)
        return len(connection.sql(sql).fetchall())

    def planned_files() -> int:
        # pyiceberg only plans (manifest and partition pruning); DuckDB reads the planned Parquet files.
        tasks = table.scan(row_filter=row_filter).plan_files()
        files = ", ".join("'" + task.file.file_path.removeprefix("file://") + "'" for task in tasks)
        connection = duckdb.connect()
        return len(connection.sql(sql.replace("FROM orders", f"FROM read_parquet([{files}])")).fetchall())

    results: dict[str, Any] = {}
    try:
        for name, fn in (("pyiceberg_scan_to_arrow", arrow_scan), ("plan_files_then_read_parquet", planned_files)):
            fn()
            samples = []
            for _ in range(max(3, runs // 3)):
                start = time.perf_counter()
                fn()
                samples.append((time.perf_counter() - start) * 1000)
            results[name] = percentiles(samples)
    finally:
        warehouse.close()
    results["arrow_over_planned_p50"] = round(
        results["pyiceberg_scan_to_arrow"]["p50_ms"] / results["plan_files_then_read_parquet"]["p50_ms"], 2
    )
    return results


async def bench_stdio(home: Path, runs: int, tmp: Path) -> dict[str, Any]:
    from lakegate.evals.mcp_client import connect

    results: dict[str, Any] = {}
    audit = tmp / "stdio.jsonl"
    async with connect("analyst", home, LAKEGATE_AUDIT__PATH=str(audit), LAKEGATE_AUDIT__FSYNC="true") as client:
        for name, sql in QUERIES.items():
            arguments = {"sql": sql, "limit": 1000}
            for _ in range(2):
                await client.call_tool("query", arguments)
            samples = []
            for _ in range(runs):
                start = time.perf_counter()
                answer = await client.call_tool("query", arguments)
                samples.append((time.perf_counter() - start) * 1000)
                assert not answer.is_error
            results[name] = percentiles(samples)
    return results


def _max_rss_mib(who: int) -> float:
    return round(resource.getrusage(who).ru_maxrss / 1024, 1)  # Linux reports KiB


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--home", type=Path, required=True, help="state directory with the large demo warehouse")
    parser.add_argument("--runs", type=int, default=15, help="timed runs per query and path")
    parser.add_argument("--out", type=Path, default=REPO / "evals" / "results" / "bench_query.json")
    options = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as scratch:
        tmp = Path(scratch)
        in_process = anyio.run(bench_in_process, options.home, options.runs, tmp)
        in_process_rss = _max_rss_mib(resource.RUSAGE_SELF)
        stdio = anyio.run(bench_stdio, options.home, options.runs, tmp)
        read_paths = bench_read_paths(options.home, options.runs)
    ratios = [entry["ratio_p50"] for entry in in_process.values()]
    governance = [entry["governed_over_raw_arrow_p50"] for entry in in_process.values()]
    read_path = [entry["arrow_over_native_p50"] for entry in in_process.values()]
    report = {
        "benchmark": "query",
        "machine": {"python": sys.version.split()[0], "platform": platform.platform(), "cpus": _cpus()},
        "runs": options.runs,
        "principal": "analyst",
        "queries": QUERIES,
        "in_process": in_process,
        "median_ratio_p50": round(statistics.median(ratios), 3),
        # The two factors of that ratio: governance (gate, guard, rewrite, worker, audit) over the
        # same Arrow reads, and the sandbox's read path (Arrow datasets) over DuckDB's own reader.
        "median_governed_over_raw_arrow_p50": round(statistics.median(governance), 3),
        "median_arrow_over_native_p50": round(statistics.median(read_path), 3),
        "stdio_end_to_end": stdio,
        "iceberg_read_paths": read_paths,
        "peak_rss_mib": {"benchmark_process": in_process_rss, "stdio_server": _max_rss_mib(resource.RUSAGE_CHILDREN)},
    }
    options.out.parent.mkdir(parents=True, exist_ok=True)
    options.out.write_text(json.dumps(report, indent=2) + "\n")
    shown = ("median_ratio_p50", "median_governed_over_raw_arrow_p50", "median_arrow_over_native_p50", "peak_rss_mib")
    print(json.dumps({k: report[k] for k in shown}, indent=2))


def _cpus() -> int:
    import os

    return os.cpu_count() or 0


if __name__ == "__main__":
    main()
