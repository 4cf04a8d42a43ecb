"""Benchmark: metric queries through the query_metrics tool versus hand-written SQL in plain DuckDB.

    python -m lakegate.evals.bench_metrics --home DIR [--runs 10] [--out evals/results/bench_metrics.json]

DIR holds the large demo warehouse (`LAKEGATE_HOME=DIR lakegate demo --scale large`). In one run,
interleaved: each metric query through `Gate.call("query_metrics", ...)` as `analyst` (metric
decisions, compilation, SQL guard, rewrite, locked sandbox, audit record), and the SQL an analyst
would write by hand for the same numbers, in a plain DuckDB connection over views of the same
Parquet files. Reports the governed/hand-written ratio of the medians, and the compile time alone.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio

from lakegate.catalog.metric_compiler import compile_query
from lakegate.catalog.metric_query import MetricQuery
from lakegate.evals.bench_gate import percentiles
from lakegate.evals.bench_query import _raw_connection
from lakegate.server.app import open_runtime
from lakegate.server.gate.identity import CallOrigin, stdio_principal
from lakegate.server.settings import load_settings

REPO = Path(__file__).resolve().parents[1]
NOT_CANCELLED = "status <> 'cancelled'"
MONTHLY_REVENUE = (
    f"SELECT CAST(date_trunc('month', order_ts) AS DATE) AS month, sum(total_amount) AS revenue "
    f"FROM sales.orders WHERE {NOT_CANCELLED} GROUP BY 1"
)

#: name -> (query_metrics arguments, the hand-written SQL for the same numbers)
CASES: dict[str, tuple[dict[str, Any], str]] = {
    "revenue_by_month": (
        {"metrics": ["revenue"], "group_by": ["metric_time__month"]},
        f"{MONTHLY_REVENUE} ORDER BY 1",
    ),
    "revenue_orders_aov_by_region": (
        {"metrics": ["revenue", "orders", "average_order_value"], "group_by": ["order__region"]},
        f"SELECT region, sum(total_amount) FILTER (WHERE {NOT_CANCELLED}), count(*), "
        f"sum(total_amount) FILTER (WHERE {NOT_CANCELLED}) / count(*) FILTER (WHERE {NOT_CANCELLED}) "
        "FROM sales.orders GROUP BY 1 ORDER BY 1",
    ),
    "refund_rate_by_quarter": (
        {"metrics": ["refund_rate"], "group_by": ["metric_time__quarter"]},
        "SELECT CAST(date_trunc('quarter', order_ts) AS DATE), count(*) FILTER (WHERE status = 'returned') / "
        f"count(*) FILTER (WHERE {NOT_CANCELLED}) FROM sales.orders GROUP BY 1 ORDER BY 1",
    ),
    "revenue_by_customer_segment": (
        {"metrics": ["revenue"], "group_by": ["customer__segment"]},
        "SELECT c.segment, sum(o.total_amount) FROM sales.orders o LEFT JOIN sales.customers c "
        f"ON o.customer_id = c.customer_id WHERE o.{NOT_CANCELLED} GROUP BY 1 ORDER BY 1",
    ),
    "cumulative_revenue_by_month": (
        {"metrics": ["cumulative_revenue"], "group_by": ["metric_time__month"]},
        f"SELECT month, sum(revenue) OVER (ORDER BY month) FROM ({MONTHLY_REVENUE}) ORDER BY 1",
    ),
    "revenue_growth_mom": (
        # As dbt MetricFlow answers: every month with revenue, and the month after each (its earlier
        # month has revenue), so the month after the last is a row too.
        {"metrics": ["revenue_growth_mom"], "group_by": ["metric_time__month"]},
        f"WITH r AS ({MONTHLY_REVENUE}), p AS (SELECT CAST(month + INTERVAL 1 MONTH AS DATE) AS month, "
        "revenue AS before FROM r) SELECT month, (r.revenue - p.before) / p.before FROM r FULL JOIN p USING (month) "
        "ORDER BY 1",
    ),
    "active_customers_by_month": (
        {"metrics": ["active_customers"], "group_by": ["metric_time__month"]},
        "SELECT CAST(date_trunc('month', order_ts) AS DATE), count(DISTINCT customer_id) FROM sales.orders "
        f"WHERE {NOT_CANCELLED} GROUP BY 1 ORDER BY 1",
    ),
}


async def bench(home: Path, runs: int, tmp: Path) -> dict[str, Any]:
    settings = load_settings(REPO, home=home, audit={"path": tmp / "bench.jsonl", "fsync": True})
    runtime = open_runtime(settings)
    principal = stdio_principal("analyst", runtime.enforcer)
    origin = CallOrigin(transport="bench", session_id="bench")
    raw = _raw_connection(runtime)
    semantic = runtime.gate.semantic
    assert semantic is not None
    results: dict[str, Any] = {}
    try:
        for name, (arguments, hand_sql) in CASES.items():
            arguments = {**arguments, "limit": 1000}

            async def governed(a: dict[str, Any] = arguments) -> int:
                outcome = await runtime.gate.call("query_metrics", a, principal, origin)
                assert outcome.error is None, outcome.error
                return len(outcome.result.rows)  # type: ignore[union-attr]

            def by_hand(q: str = hand_sql) -> int:
                return int(raw.sql(q).to_arrow_table().num_rows)

            query = MetricQuery(tuple(arguments["metrics"]), tuple(arguments["group_by"]))
            for _ in range(2):  # warm caches; the same number of rows both ways
                assert await governed() == by_hand(), name
            governed_ms: list[float] = []
            hand_ms: list[float] = []
            compile_ms: list[float] = []
            for _ in range(runs):
                start = time.perf_counter()
                compile_query(semantic, query)
                compile_ms.append((time.perf_counter() - start) * 1000)
                start = time.perf_counter()
                await governed()
                governed_ms.append((time.perf_counter() - start) * 1000)
                start = time.perf_counter()
                by_hand()
                hand_ms.append((time.perf_counter() - start) * 1000)
            g, h = percentiles(governed_ms), percentiles(hand_ms)
            results[name] = {
                "governed": g,
                "hand_written": h,
                "ratio_p50": round(g["p50_ms"] / h["p50_ms"], 3),
                "compile_p50_ms": round(statistics.median(compile_ms), 3),
            }
            print(f"{name}: metrics {g['p50_ms']} ms, by hand {h['p50_ms']} ms, ratio {results[name]['ratio_p50']}")
    finally:
        raw.close()
        runtime.close()
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--home", type=Path, required=True, help="state directory with the large demo warehouse")
    parser.add_argument("--runs", type=int, default=10, help="timed runs per query and path")
    parser.add_argument("--out", type=Path, default=REPO / "evals" / "results" / "bench_metrics.json")
    options = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        results = anyio.run(bench, options.home, options.runs, Path(scratch))
    report = {
        "benchmark": "metrics",
        "machine": {"python": sys.version.split()[0], "platform": platform.platform()},
        "runs": options.runs,
        "principal": "analyst",
        "cases": {name: {"arguments": args, "hand_written_sql": sql} for name, (args, sql) in CASES.items()},
        "results": results,
        "median_ratio_p50": round(statistics.median(r["ratio_p50"] for r in results.values()), 3),
        "median_compile_ms": round(statistics.median(r["compile_p50_ms"] for r in results.values()), 3),
    }
    options.out.parent.mkdir(parents=True, exist_ok=True)
    options.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: report[k] for k in ("median_ratio_p50", "median_compile_ms")}, indent=2))


if __name__ == "__main__":
    main()
