"""Benchmark: catalog tool latency over stdio, and the gate's own cost per call.

    python -m lakegate.evals.bench_gate [--calls 300] [--out evals/results/bench_gate.json]

1. Starts `lakegate serve` as a subprocess and drives it with the MCP SDK client over stdio:
   p50/p99 round-trip latency of list_datasets and describe_dataset.
2. In-process, on the same warehouse and policies: the same calls through `Gate.call` (tool
   decision, argument validation, worker thread, audit record) and with the gate bypassed (the
   handler called directly with a scope), interleaved, reported as a ratio in one run, with the
   audit log's fsync on and off.
3. What quotas and the scan estimate add to a call in the embedded profile: the quota check
   before a call and its settling after (policies/quotas.py, in-process ledger), and the scan
   limit lookup and the estimate's sum that a query adds to its Iceberg plan, as analyst.
Builds the small demo warehouse in a temporary directory unless --home points at one.
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio

from lakegate.catalog.definitions import load_definitions
from lakegate.catalog.demo import build_demo
from lakegate.catalog.warehouse import Warehouse
from lakegate.server.app import open_runtime
from lakegate.server.gate.identity import CallOrigin, stdio_principal
from lakegate.server.gate.quota_ledger import InProcessLedger
from lakegate.server.gate.quotas import Quotas
from lakegate.server.settings import load_settings

REPO = Path(__file__).resolve().parents[1]
CALLS: dict[str, dict[str, Any]] = {
    "list_datasets": {},
    "describe_dataset": {"name": "sales.customers"},
}


def percentiles(samples_ms: list[float]) -> dict[str, float]:
    ordered = sorted(samples_ms)
    return {
        "p50_ms": round(statistics.median(ordered), 3),
        "p99_ms": round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))], 3),
        "mean_ms": round(statistics.fmean(ordered), 3),
        "n": len(ordered),
    }


async def timed(fn: Callable[[], Awaitable[Any]], n: int) -> list[float]:
    samples = []
    for _ in range(n):
        start = time.perf_counter()
        await fn()
        samples.append((time.perf_counter() - start) * 1000)
    return samples


async def bench_stdio(home: Path, calls: int, audit: Path) -> dict[str, Any]:
    from lakegate.evals.mcp_client import connect

    results: dict[str, Any] = {}
    async with connect("analyst", home, LAKEGATE_AUDIT__PATH=str(audit), LAKEGATE_AUDIT__FSYNC="true") as client:
        for name, arguments in CALLS.items():
            for _ in range(10):  # warm caches
                await client.call_tool(name, arguments)

            async def call(n: str = name, a: dict[str, Any] = arguments) -> None:
                await client.call_tool(n, a)

            samples = await timed(call, calls)
            results[name] = percentiles(samples)
    return results


async def bench_gate(home: Path, calls: int, fsync: bool, tmp: Path) -> dict[str, Any]:
    settings = load_settings(REPO, home=home, audit={"path": tmp / f"gate-{fsync}.jsonl", "fsync": fsync})
    runtime = open_runtime(settings)
    principal = stdio_principal("analyst", runtime.enforcer)
    origin = CallOrigin(transport="bench", session_id="bench")
    results: dict[str, Any] = {}
    try:
        for name, arguments in CALLS.items():
            spec = runtime.gate.tools[name]
            args = spec.args.model_validate(arguments)

            async def gated(n: str = name, a: dict[str, Any] = arguments) -> None:
                outcome = await runtime.gate.call(n, a, principal, origin)
                assert outcome.error is None

            async def bypassed(s: Any = spec, a: Any = args) -> None:
                await anyio.to_thread.run_sync(s.handler, runtime.gate.scope(principal), a)

            for _ in range(10):
                await gated()
                await bypassed()
            gated_ms: list[float] = []
            bypassed_ms: list[float] = []
            for _ in range(calls):  # interleaved, so machine noise hits both alike
                gated_ms += await timed(gated, 1)
                bypassed_ms += await timed(bypassed, 1)
            g, b = percentiles(gated_ms), percentiles(bypassed_ms)
            results[name] = {
                "gated": g,
                "bypassed": b,
                "ratio_p50": round(g["p50_ms"] / b["p50_ms"], 3),
                "gate_cost_p50_ms": round(g["p50_ms"] - b["p50_ms"], 3),
            }
    finally:
        runtime.close()
    return results


def bench_quota(home: Path, calls: int, tmp: Path) -> dict[str, Any]:
    """The quota check and settle of one call, and the scan-limit lookup of one query, in process."""
    settings = load_settings(REPO, home=home, audit={"path": tmp / "quota.jsonl", "fsync": False})
    runtime = open_runtime(settings)
    try:
        principal = stdio_principal("analyst", runtime.enforcer)
        # The embedded profile's ledger, on a clock that moves a minute per reading: thousands of
        # calls in a few seconds would otherwise meet the demo's own per-minute quota.
        minutes = itertools.count()
        quotas = Quotas(InProcessLedger(clock=lambda: 60.0 * next(minutes)))
        spec = runtime.gate.tools["query"]

        def quota_check() -> None:
            scope = runtime.gate.scope(principal)
            admission = quotas.admit(scope.quotas(), principal.name, scope.roles(), spec.family)
            quotas.settle(admission, scan_bytes=1_000, rows=10)

        # The plan itself is made for every query anyway (it lists the files to read); what the
        # estimate adds is its sum and the caller's limit.
        plan = runtime.gate.scope(principal).plan_scan("sales.orders", None)

        def scan_estimate() -> None:
            scope = runtime.gate.scope(principal)
            limit = scope.scan_limit()
            over = limit is not None and plan.bytes > limit.max_scan_bytes
            assert not over

        results: dict[str, Any] = {}
        for name, work in (("quota_check_and_settle", quota_check), ("scan_estimate_and_limit", scan_estimate)):
            for _ in range(50):
                work()
            samples = []
            for _ in range(calls):
                start = time.perf_counter()
                work()
                samples.append((time.perf_counter() - start) * 1000)
            results[name] = percentiles(samples)
        return results
    finally:
        runtime.close()


def small_demo(home: Path | None, scratch: Path) -> Path:
    """`home` when given; else the small demo warehouse, built into `scratch`."""
    if home is not None:
        return home
    built = scratch / "home"
    warehouse = Warehouse(built)
    build_demo(warehouse, load_definitions(REPO), "small")
    warehouse.close()
    return built


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=300, help="timed calls per measurement")
    parser.add_argument("--home", type=Path, default=None, help="state directory with a demo warehouse")
    parser.add_argument("--out", type=Path, default=REPO / "evals" / "results" / "bench_gate.json")
    options = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as scratch:
        tmp = Path(scratch)
        home = small_demo(options.home, tmp)
        report = {
            "benchmark": "gate",
            "machine": {"python": sys.version.split()[0], "platform": platform.platform(), "cpus": _cpus()},
            "calls": options.calls,
            "stdio_round_trip": anyio.run(bench_stdio, home, options.calls, tmp / "stdio.jsonl"),
            "in_process_fsync": anyio.run(bench_gate, home, options.calls, True, tmp),
            "in_process_no_fsync": anyio.run(bench_gate, home, options.calls, False, tmp),
            "quota_and_estimate": bench_quota(home, options.calls * 10, tmp),
        }
    options.out.parent.mkdir(parents=True, exist_ok=True)
    options.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


def _cpus() -> int:
    import os

    return os.cpu_count() or 0


if __name__ == "__main__":
    main()
