"""Benchmark: governed SQL on DuckDB and on a local Spark cluster of 1 and of 2 workers (issue 19).

    python -m lakegate.evals.bench_spark --home DIR [--runs 3] [--workers 1 2] [--out evals/results/bench_spark.json]

DIR is a state directory holding the large demo warehouse (10M orders):
    LAKEGATE_HOME=DIR lakegate demo --scale large

For each cluster size, one run, interleaved so that machine noise hits every path alike:

1. Start-up: `lakegate spark start`'s cluster until Spark Connect listens and the workers registered,
   then the first governed query (a new Spark Connect session, its mask functions, the first job).
2. Warm latency per analytical query (bench_query's), as `analyst` through `Gate.call`: on DuckDB
   (lakegate's own workers) and on Spark. Ratios Spark/DuckDB of the medians.
3. The governed path's cost on Spark: the same query submitted by hand to the same Spark Connect
   server (a session with views over the same planned files, no masks, no plan check, no audit),
   as the ratio governed/by hand of the medians (goal: at most 1.15 at the median).
4. Where routing to Spark starts to pay: an aggregate over a growing time range of sales.orders,
   its planned scan bytes (the Iceberg plan's, as routing reads them) against DuckDB's and Spark's
   medians; the crossover is the smallest scan on which Spark was faster, or none in the range.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio

from lakegate.evals.bench_gate import percentiles
from lakegate.evals.bench_query import QUERIES as ALL_QUERIES
from lakegate.server.app import Runtime, open_runtime
from lakegate.server.gate.identity import CallOrigin, stdio_principal
from lakegate.server.settings import load_settings

REPO = Path(__file__).resolve().parents[1]
QUERY_NAMES = ("revenue_by_region", "orders_by_month_2025", "status_mix_one_month", "top_customers",
               "segment_join", "channel_window", "distinct_hashed_emails")  # fmt: skip
QUERIES = {name: ALL_QUERIES[name] for name in QUERY_NAMES}
#: The crossover probe: one aggregate over orders from the first month to each month given.
SCAN_PROBE = "SELECT count(*) AS n, sum(total_amount) AS revenue FROM sales.orders WHERE order_ts < TIMESTAMPTZ '{end}'"
SCAN_ENDS = ("2024-02-01", "2024-07-01", "2025-01-01", "2025-07-01", "2026-01-01")
TABLES = ("sales.orders", "sales.customers")


def _runtime(home: Path, audit: Path, query: dict[str, Any] | None = None) -> Runtime:
    return open_runtime(load_settings(REPO, home=home, audit={"path": audit, "fsync": False}, query=query or {}))


def _governed(runtime: Runtime) -> Callable[[str], dict[str, Any]]:
    principal = stdio_principal("analyst", runtime.enforcer)
    origin = CallOrigin(transport="bench", session_id="bench")

    def call(sql: str) -> dict[str, Any]:
        outcome = anyio.run(runtime.gate.call, "query", {"sql": sql, "limit": 1000}, principal, origin)
        assert outcome.error is None, outcome.error
        assert outcome.result is not None
        return {"rows": len(outcome.result.rows), "record": outcome.record}  # type: ignore[attr-defined]

    return call


def _by_hand(runtime: Runtime, remote: str, token_file: str) -> tuple[Any, Callable[[str], int]]:
    """A Spark Connect session with one view per table over the same planned files, and a function
    that runs a query (DuckDB's dialect, rendered for Spark by sqlglot) on it."""
    import sqlglot
    from pyspark.sql.connect.session import SparkSession

    from lakegate.catalog.spark_engine import SESSION_CONF, register_views

    token = Path(token_file).read_text().strip()
    spark = SparkSession.builder.remote(f"{remote}/;token={token}").create()
    for key, value in SESSION_CONF.items():
        spark.conf.set(key, value)
    register_views(spark, {name.replace(".", "_"): runtime.warehouse.scans.plan(name).source() for name in TABLES})

    def run(sql: str) -> int:
        spark_sql = sqlglot.transpile(sql, read="duckdb", write="spark")[0]
        for name in TABLES:
            spark_sql = spark_sql.replace(name, name.replace(".", "_"))
        return int(spark.sql(spark_sql).toArrow().num_rows)

    return spark, run


def _timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1000


def bench_cluster(home: Path, workers: int, runs: int, tmp: Path, duckdb: Runtime) -> dict[str, Any]:
    from lakegate.catalog.spark_cluster import LocalSparkCluster, free_port

    cluster = LocalSparkCluster(tmp / f"spark-{workers}")
    started = time.perf_counter()
    info = cluster.start(workers=workers, worker_cores=1, worker_memory="2g", port=free_port())
    startup_s = time.perf_counter() - started
    settings = {"spark": {"remote": info.remote, "token_file": info.token_file, "datasets": ["*"]}}
    runtime = _runtime(home, tmp / f"spark-{workers}.jsonl", settings)
    spark, by_hand = _by_hand(runtime, info.remote, info.token_file)
    on_spark, on_duckdb = _governed(runtime), _governed(duckdb)
    results: dict[str, Any] = {"startup_s": round(startup_s, 1), "queries": {}}
    try:
        first = next(iter(QUERIES.values()))
        results["first_query_ms"] = round(_timed(lambda: on_spark(first)), 1)
        for name, sql in QUERIES.items():
            for _ in range(2):  # warm: plans, footers, the JVM's code paths
                assert on_spark(sql)["rows"] == on_duckdb(sql)["rows"] == by_hand(sql)
            spark_ms: list[float] = []
            hand_ms: list[float] = []
            duck_ms: list[float] = []
            for _ in range(runs):
                hand_ms.append(_timed(lambda q=sql: by_hand(q)))  # type: ignore[misc]
                spark_ms.append(_timed(lambda q=sql: on_spark(q)))  # type: ignore[misc]
                duck_ms.append(_timed(lambda q=sql: on_duckdb(q)))  # type: ignore[misc]
            s, h, d = percentiles(spark_ms), percentiles(hand_ms), percentiles(duck_ms)
            results["queries"][name] = {
                "spark_governed": s,
                "spark_by_hand": h,
                "duckdb_governed": d,
                "governed_over_by_hand_p50": round(s["p50_ms"] / h["p50_ms"], 3),
                "spark_over_duckdb_p50": round(s["p50_ms"] / d["p50_ms"], 3),
            }
            print(
                f"{workers} worker(s) {name}: spark {s['p50_ms']} ms, by hand {h['p50_ms']} ms, duckdb {d['p50_ms']} ms"
            )
        crossover: list[dict[str, Any]] = []
        for end in SCAN_ENDS:
            sql = SCAN_PROBE.format(end=end)
            record = on_spark(sql)["record"]
            scan = record["details"]["planned_scan"]["sales.orders"]["bytes"]
            spark_p50 = statistics.median(_timed(lambda q=sql: on_spark(q)) for _ in range(runs))  # type: ignore[misc]
            duck_p50 = statistics.median(_timed(lambda q=sql: on_duckdb(q)) for _ in range(runs))  # type: ignore[misc]
            crossover.append({"until": end, "scan_bytes": scan, "spark_p50_ms": round(spark_p50, 1),
                              "duckdb_p50_ms": round(duck_p50, 1)})  # fmt: skip
        results["scan_size"] = crossover
        paying = [point["scan_bytes"] for point in crossover if point["spark_p50_ms"] < point["duckdb_p50_ms"]]
        results["spark_pays_from_scan_bytes"] = min(paying) if paying else None
    finally:
        spark.stop()
        runtime.close()
        cluster.stop()
    ratios = [q["governed_over_by_hand_p50"] for q in results["queries"].values()]
    results["median_governed_over_by_hand_p50"] = round(statistics.median(ratios), 3)
    results["median_spark_over_duckdb_p50"] = round(
        statistics.median(q["spark_over_duckdb_p50"] for q in results["queries"].values()), 3
    )
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--home", type=Path, required=True, help="state directory with the large demo warehouse")
    parser.add_argument("--runs", type=int, default=3, help="timed runs per query and path")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="cluster sizes to measure")
    parser.add_argument("--out", type=Path, default=REPO / "evals" / "results" / "bench_spark.json")
    options = parser.parse_args(argv)

    clusters: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as scratch:
        tmp = Path(scratch)
        duckdb = _runtime(options.home, tmp / "duckdb.jsonl")
        try:
            for workers in options.workers:
                clusters[f"{workers}_workers"] = bench_cluster(options.home, workers, options.runs, tmp, duckdb)
        finally:
            duckdb.close()
    report = {
        "benchmark": "spark",
        "machine": {"python": sys.version.split()[0], "platform": platform.platform(), "cpus": _cpus()},
        "runs": options.runs,
        "principal": "analyst",
        "worker": {"cores": 1, "memory": "2g"},
        "queries": QUERIES,
        "clusters": clusters,
    }
    options.out.parent.mkdir(parents=True, exist_ok=True)
    options.out.write_text(json.dumps(report, indent=2) + "\n")
    summary = {
        size: {key: value for key, value in result.items() if key not in ("queries", "scan_size")}
        for size, result in clusters.items()
    }
    print(json.dumps(summary, indent=2))


def _cpus() -> int:
    import os

    return os.cpu_count() or 0


if __name__ == "__main__":
    main()
