"""Benchmark: how long an agent waits on a server that has just started.

    python -m lakegate.evals.bench_cold_start [--home DIR] [--warm-calls 5] [--out evals/results/bench_cold_start.json]

For each transport (stdio, Streamable HTTP) and each state directory (fresh: the demo warehouse
without the query encoder's graph, which the warm-up then builds with torch; warm: the graph is
there), a new server process is started twice:
- "during warm-up": every read tool is called once, right after `initialize`, while the start-up
  warm-up may still run; then each again `--warm-calls` times;
- "after warm-up": the same once the server has logged `warm_up.done`.
Measured: process start to the `initialize` answer, each tool's first call, and its warm p50.
Goals (issue 22): initialize under 1.5 s; a first call after the warm-up within twice its warm p50
plus 200 ms; a first call during the warm-up never over 2 s.

DIR (default: a new small demo in a temporary directory) holds the demo warehouse; it is copied,
never changed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
from mcp import Client
from mcp.client.stdio import StdioServerParameters, stdio_client
from mcp.types import Implementation

REPO = Path(__file__).resolve().parents[1]
#: The read tools, each with a principal who may call it and arguments that answer.
CALLS: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("analyst", "list_datasets", {}),
    ("analyst", "describe_dataset", {"name": "sales.orders"}),
    ("analyst", "search_catalog", {"query": "money we made"}),
    ("analyst", "query", {"sql": "SELECT region, count(*) FROM sales.orders GROUP BY 1 ORDER BY 1"}),
    ("analyst", "list_metrics", {}),
    ("analyst", "describe_metric", {"name": "revenue"}),
    ("analyst", "query_metrics", {"metrics": ["revenue"], "group_by": ["metric_time__month"], "limit": 5}),
    ("analyst", "explain_access", {"resource": "sales.customers"}),
    ("support_agent", "search_documents", {"query": "refund for a damaged parcel", "k": 5}),
)
SECRET = secrets.token_urlsafe(32)
ISSUER = "https://bench.example"
READY = "warm_up.done"


def _env(home: Path, log: Path) -> dict[str, str]:
    return {
        **os.environ,
        "LAKEGATE_HOME": str(home),
        "LAKEGATE_AUDIT__PATH": str(log.with_suffix(".jsonl")),
        "LAKEGATE_AUDIT__FSYNC": "false",
        "LAKEGATE_PRINCIPAL": "",
        "LAKEGATE_AUTH__SHARED_SECRET": SECRET,
        "LAKEGATE_AUTH__ISSUER": ISSUER,
        "HF_HUB_OFFLINE": "1",
        "LAKEGATE_LOG_LEVEL": "INFO",  # the bench waits for warm_up.done, an info line
    }


async def _wait_for(log: Path, marker: str, timeout_s: float = 180) -> float:
    started = time.perf_counter()
    while marker not in (log.read_text(errors="replace") if log.exists() else ""):
        if time.perf_counter() - started > timeout_s:
            raise TimeoutError(f"no {marker!r} in {log} after {timeout_s} s")
        await anyio.sleep(0.05)
    return time.perf_counter() - started


@asynccontextmanager
async def _stdio(home: Path, log: Path, principal: str) -> AsyncIterator[tuple[Client, float]]:
    params = StdioServerParameters(
        command=sys.executable,
        args=["-m", "lakegate", "--project", str(REPO), "serve", "--principal", principal],
        env=_env(home, log),
        cwd=str(REPO),
    )
    with log.open("w") as errlog:
        started = time.perf_counter()
        transport = stdio_client(params, errlog=errlog)  # the server's stderr: its log, with warm_up.done
        async with Client(
            transport, client_info=Implementation(name="bench", version="1"), read_timeout_seconds=300
        ) as c:
            yield c, time.perf_counter() - started


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@asynccontextmanager
async def _http(home: Path, log: Path, principal: str) -> AsyncIterator[tuple[Client, float]]:
    from mcp.client.streamable_http import streamable_http_client
    from mcp.shared._httpx_utils import create_mcp_http_client

    from lakegate.server.settings import load_settings
    from lakegate.server.transports.http_auth import mint_token

    port = _free_port()
    env = _env(home, log) | {"LAKEGATE_HTTP__PORT": str(port)}
    started = time.perf_counter()
    with log.open("w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "lakegate", "--project", str(REPO), "serve", "--http"],
            env=env,
            cwd=REPO,
            stdout=out,
            stderr=out,
        )
    try:
        settings = load_settings(REPO, home=home, http={"port": port}, auth={"shared_secret": SECRET, "issuer": ISSUER})
        token = mint_token(settings, principal, (), 3600)
        url = f"http://127.0.0.1:{port}/mcp"
        while True:  # until the server listens
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                    break
            except OSError:
                if process.poll() is not None:
                    raise RuntimeError(f"the server exited; see {log}") from None
                await anyio.sleep(0.02)
        http = create_mcp_http_client(headers={"Authorization": f"Bearer {token}"})
        client = Client(
            streamable_http_client(url, http_client=http), client_info=Implementation(name="bench", version="1")
        )
        async with http, client:
            yield client, time.perf_counter() - started
    finally:
        process.terminate()
        process.wait(timeout=60)


async def _run(transport: str, home: Path, work: Path, after_warm_up: bool, warm_calls: int) -> dict[str, Any]:
    """One server per principal (stdio serves one), the tools called in order."""
    by_principal: dict[str, list[tuple[str, dict[str, Any]]]] = {}
    for principal, tool, arguments in CALLS:
        by_principal.setdefault(principal, []).append((tool, arguments))
    opened = _stdio if transport == "stdio" else _http
    result: dict[str, Any] = {"initialize_s": {}, "warm_up_s": {}, "tools": {}}
    for principal, calls in by_principal.items():
        log = work / f"{transport}-{principal}-{'after' if after_warm_up else 'during'}.log"
        async with opened(home, log, principal) as (client, initialize_s):
            result["initialize_s"][principal] = round(initialize_s, 3)
            if after_warm_up:
                result["warm_up_s"][principal] = round(initialize_s + await _wait_for(log, READY), 3)
            firsts = {}
            for tool, arguments in calls:
                started = time.perf_counter()
                answer = await client.call_tool(tool, arguments)
                firsts[tool] = (time.perf_counter() - started) * 1000
                assert not answer.is_error, (tool, answer.content)
            for tool, arguments in calls:
                samples = []
                for _ in range(warm_calls):
                    started = time.perf_counter()
                    await client.call_tool(tool, arguments)
                    samples.append((time.perf_counter() - started) * 1000)
                p50 = statistics.median(samples)
                limit = 2 * p50 + 200 if after_warm_up else 2000.0
                result["tools"][tool] = {
                    "first_ms": round(firsts[tool], 1),
                    "warm_p50_ms": round(p50, 1),
                    "limit_ms": round(limit, 1),
                    "meets_goal": firsts[tool] <= limit,
                }
    return result


def _states(home: Path, scratch: Path) -> dict[str, Path]:
    """The demo warehouse twice: without the query encoder's graph (fresh) and with it (warm)."""
    from lakegate.catalog.query_graph import GRAPH_DIR, load_query_graph

    warm = scratch / "warm"
    shutil.copytree(home, warm, ignore=shutil.ignore_patterns("audit*", "spill"))
    if load_query_graph(warm / GRAPH_DIR) is None:
        subprocess.run(
            [sys.executable, "-m", "lakegate", "--project", str(REPO), "models", "build"],
            env={**os.environ, "LAKEGATE_HOME": str(warm)},
            check=True,
        )
    fresh = scratch / "fresh"
    shutil.copytree(warm, fresh, ignore=shutil.ignore_patterns(GRAPH_DIR))
    return {"fresh": fresh, "warm": warm}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--home", type=Path, help="state directory with the demo warehouse (default: build one)")
    parser.add_argument("--warm-calls", type=int, default=5, help="calls of each tool after its first, for the p50")
    parser.add_argument("--out", type=Path, default=REPO / "evals" / "results" / "bench_cold_start.json")
    options = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch_dir:
        scratch = Path(scratch_dir)
        home = options.home
        if home is None:
            home = scratch / "demo"
            subprocess.run(
                [sys.executable, "-m", "lakegate", "--project", str(REPO), "demo"],
                env={**os.environ, "LAKEGATE_HOME": str(home)},
                check=True,
            )
        runs: dict[str, Any] = {}
        for state, state_home in _states(home, scratch).items():
            for transport in ("stdio", "http"):
                for after in (False, True):
                    label = f"{transport}/{state}/{'after' if after else 'during'}_warm_up"
                    work = scratch / label.replace("/", "-")
                    work.mkdir()
                    runs[label] = anyio.run(_run, transport, state_home, work, after, options.warm_calls)
                    slow = [t for t, r in runs[label]["tools"].items() if not r["meets_goal"]]
                    print(f"{label}: initialize {runs[label]['initialize_s']} s; over the goal: {slow or 'none'}")
    initialize = [s for run in runs.values() for s in run["initialize_s"].values()]
    report = {
        "benchmark": "cold_start",
        "machine": {"python": sys.version.split()[0], "platform": platform.platform(), "cpus": os.cpu_count()},
        "warm_calls": options.warm_calls,
        "initialize_s_max": max(initialize),
        "initialize_s_median": round(statistics.median(initialize), 3),
        "runs": runs,
        "goals_met": {
            "initialize_under_1_5_s": max(initialize) < 1.5,
            "first_calls": all(r["meets_goal"] for run in runs.values() for r in run["tools"].values()),
        },
    }
    options.out.parent.mkdir(parents=True, exist_ok=True)
    options.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: report[k] for k in ("initialize_s_median", "initialize_s_max", "goals_met")}, indent=2))


if __name__ == "__main__":
    main()
