"""Bounded load test of the production profile: two replicas, one PostgreSQL, one killed mid-run.

    python -m lakegate.evals.load_test [--sessions 50] [--duration 60] [--postgres URL]
                              [--out evals/results/load_test.json]

What it does, all on loopback with real processes:
1. Creates a scratch PostgreSQL database, builds the small demo warehouse into it
   (`LAKEGATE_PROFILE=production lakegate demo`) and seeds the Casbin rules (`profile sync-policies`).
2. Starts two `lakegate serve --http` replicas on two ports, sharing the catalog, the rules and
   the global audit chain; each keeps its own local audit file, as on separate hosts.
3. Runs `--sessions` concurrent MCP sessions (the SDK's Streamable HTTP client, HS256 tokens for
   agents with the analyst, support_agent or data_steward role), spread over both replicas, each
   looping over catalog, metric, SQL and document-search calls plus calls policy must deny.
4. At 35% of the run, adds a deny rule to PostgreSQL (as an operator would, in SQL) and measures
   how long each replica takes to apply it, against the stated bound of 2 s.
5. At 60% of the run, SIGKILLs replica 2. Its sessions reconnect to replica 1 and carry on.
6. After the run: verifies the global audit chain and checks it holds one call record per answered
   call: exactly for the surviving replica, and for the killed one at least one per answered call
   and at most one more per call that was in flight when it died. Listing records (the MCP client
   lists the tools after its first call of each tool) and refused requests are counted apart.

Calls are classified as ok, policy (an expected denial), interrupted (in flight on the replica that
was killed) or error (anything else: the goal is zero).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx2 as httpx
import jwt
import psycopg
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client
from mcp.types import Implementation

REPO = Path(__file__).resolve().parents[1]
SECRET = "load-test-shared-secret-" + "x" * 16
ISSUER = "https://idp.load-test.example"
AUDIENCE = "lakegate-load-test"
POLICY_BOUND_S = 2.0
ROLES = ("analyst", "support_agent", "data_steward")

#: Each role's loop: (tool, arguments, expect) with expect "ok" or "deny".
WORKLOAD: dict[str, list[tuple[str, dict[str, Any], str]]] = {
    "analyst": [
        ("list_datasets", {}, "ok"),
        ("search_catalog", {"query": "customer email"}, "ok"),
        ("query", {"sql": "SELECT region, count(*) AS n FROM sales.customers GROUP BY region"}, "ok"),
        ("query_metrics", {"metrics": ["revenue"], "group_by": ["metric_time__month"], "limit": 12}, "ok"),
        ("query", {"sql": "SELECT count(*) FROM support.tickets"}, "deny"),
    ],
    "support_agent": [
        ("list_datasets", {}, "ok"),
        ("search_documents", {"query": "how do refunds work", "k": 5}, "ok"),
        ("query", {"sql": "SELECT status, count(*) AS n FROM support.tickets GROUP BY status"}, "ok"),
        ("query_metrics", {"metrics": ["orders"], "group_by": ["metric_time__month"], "limit": 12}, "ok"),
        ("query", {"sql": "SELECT count(*) FROM finance.payments"}, "deny"),
    ],
    "data_steward": [
        ("describe_dataset", {"name": "sales.orders"}, "ok"),
        ("search_documents", {"query": "warranty claim", "k": 5, "mode": "fulltext"}, "ok"),
        ("query", {"sql": "SELECT count(*) AS n FROM sales.orders"}, "ok"),
        ("append_rows", {"table": "sales.orders", "rows": [{"order_id": 1}]}, "deny"),
    ],
}
#: The policy change made during the load, and the call that shows it.
POLICY_CHANGE = ("p", "role:analyst", "tool:list_datasets", "call", "deny")
PROBE: tuple[str, dict[str, Any]] = ("list_datasets", {})


@dataclass
class Replica:
    name: str
    port: int
    audit: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/mcp"


@dataclass
class Tally:
    latencies: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    outcomes: Counter[str] = field(default_factory=Counter)
    answered: Counter[str] = field(default_factory=Counter)  # per replica: calls that got a result
    in_flight_at_kill: int = 0
    errors: list[str] = field(default_factory=list)
    reconnects: int = 0
    killed_at: float | None = None
    recovery_s: list[float] = field(default_factory=list)  # from the kill to a moved session's first answer


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _token(subject: str, role: str) -> str:
    now = int(time.time())
    claims = {"iss": ISSUER, "aud": AUDIENCE, "sub": subject, "iat": now, "exp": now + 3600, "roles": [role]}
    return jwt.encode(claims, SECRET, algorithm="HS256")


def _environment(home: Path, url: str) -> dict[str, str]:
    return {
        **os.environ,
        "LAKEGATE_HOME": str(home),
        "LAKEGATE_PROFILE": "production",
        "LAKEGATE_POSTGRES__URL": url,
        "LAKEGATE_AUTH__SHARED_SECRET": SECRET,
        "LAKEGATE_AUTH__ISSUER": ISSUER,
        "LAKEGATE_AUTH__AUDIENCE": AUDIENCE,
        "LAKEGATE_PRINCIPAL": "",
        "HF_HUB_OFFLINE": "1",
    }


def _lakegate(env: dict[str, str], *args: str) -> None:
    subprocess.run([sys.executable, "-m", "lakegate", "--project", str(REPO), *args], env=env, check=True, cwd=REPO)


def _start(replica: Replica, env: dict[str, str]) -> None:
    replica_env = {
        **env,
        "LAKEGATE_AUDIT__PATH": str(replica.audit),
        "LAKEGATE_POSTGRES__REPLICA_ID": replica.name,
    }
    args = ["-m", "lakegate", "--project", str(REPO), "serve", "--http", "--port", str(replica.port)]
    log = replica.audit.with_suffix(".log").open("wb")
    replica.process = subprocess.Popen([sys.executable, *args], env=replica_env, cwd=REPO, stdout=log, stderr=log)


def _wait_healthy(replica: Replica, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{replica.port}/healthz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if replica.process is not None and replica.process.poll() is not None:
            raise RuntimeError(f"{replica.name} exited; see {replica.audit.with_suffix('.log')}")
        time.sleep(0.3)
    raise RuntimeError(f"{replica.name} did not become healthy in {timeout_s} s")


def _is_denial(text: str) -> bool:
    lowered = text.lower()
    return any(word in lowered for word in ("denied", "not allowed", "may not", "not found", "no dataset"))


class Session:
    """One agent's MCP session, reconnecting to the other replica when its own dies."""

    def __init__(self, subject: str, role: str, replicas: list[Replica], first: int) -> None:
        self.subject, self.role, self.replicas, self.index = subject, role, replicas, first
        self.token = _token(subject, role)

    async def run(self, stop_at: float, tally: Tally, killed: asyncio.Event, dead: set[str]) -> None:
        steps = WORKLOAD[self.role]
        step = 0
        moved = False
        while time.monotonic() < stop_at:
            replica = self.replicas[self.index]
            if replica.name in dead:
                self.index = (self.index + 1) % len(self.replicas)
                continue
            lost = False
            try:
                http = create_mcp_http_client(
                    headers={"Authorization": f"Bearer {self.token}"}, timeout=httpx.Timeout(60)
                )
                transport = streamable_http_client(replica.url, http_client=http)
                info = Implementation(name="lakegate-load", version="1.0")
                async with http, Client(transport, client_info=info, mode="legacy") as client:
                    while time.monotonic() < stop_at:
                        tool, arguments, expect = steps[step % len(steps)]
                        step += 1
                        started = time.monotonic()
                        result = await client.call_tool(tool, arguments)
                        elapsed = time.monotonic() - started
                        tally.answered[replica.name] += 1
                        tally.latencies[tool].append(elapsed * 1000)
                        if moved and tally.killed_at is not None:
                            tally.recovery_s.append(time.monotonic() - tally.killed_at)
                            moved = False
                        text = " ".join(getattr(block, "text", "") for block in result.content)
                        if not result.is_error and expect == "ok":
                            tally.outcomes["ok"] += 1
                        elif result.is_error and (expect == "deny" or _policy_changed(self.role, tool)):
                            tally.outcomes["policy" if _is_denial(text) else "error"] += 1
                            if not _is_denial(text):
                                tally.errors.append(f"{tool}: {text[:200]}")
                        else:
                            tally.outcomes["error"] += 1
                            tally.errors.append(f"{self.role} {tool} expected {expect}: {text[:200]}")
            except Exception as exc:  # noqa: BLE001 - a killed replica surfaces as many exception types
                if replica.name in dead or killed.is_set():
                    tally.outcomes["interrupted"] += 1
                    lost = True
                    dead.add(replica.name)
                else:
                    tally.outcomes["error"] += 1
                    tally.errors.append(f"{self.role} session on {replica.name}: {exc!r}"[:300])
                    await asyncio.sleep(0.5)
            if lost:
                tally.reconnects += 1
                moved = True
                self.index = (self.index + 1) % len(self.replicas)


_POLICY_CHANGED_AT: list[float] = []


def _policy_changed(role: str, tool: str) -> bool:
    return bool(_POLICY_CHANGED_AT) and role == "analyst" and tool == POLICY_CHANGE[2].removeprefix("tool:")


async def _probe_policy(replica: Replica, go: asyncio.Event, tally: Tally, deadline_s: float = 10) -> float | None:
    """Seconds from the change (`go` set) until `replica` denies the probe call; None if it never did.

    The probe's session is opened and warm before the change, so only the policy's propagation and
    one call's latency are measured."""
    token = _token(f"probe-{replica.name}", "analyst")
    http = create_mcp_http_client(headers={"Authorization": f"Bearer {token}"}, timeout=httpx.Timeout(30))
    transport = streamable_http_client(replica.url, http_client=http)
    async with http, Client(transport, client_info=Implementation(name="lakegate-probe", version="1.0")) as client:
        await client.call_tool(*PROBE)
        tally.answered[replica.name] += 1
        await go.wait()
        changed_at = _POLICY_CHANGED_AT[0]
        while time.monotonic() - changed_at < deadline_s:
            result = await client.call_tool(*PROBE)
            tally.answered[replica.name] += 1
            if result.is_error:
                return time.monotonic() - changed_at
            await asyncio.sleep(0.02)
    return None


async def _warm_up(replicas: list[Replica], tally: Tally) -> None:
    """One pass of every role's workload on every replica, so first-call costs (loading the embedding
    model, planning the first scans) are not reported as load latency. These calls are audited too."""
    for replica in replicas:
        for role, steps in WORKLOAD.items():
            token = _token(f"warm-{role}", role)
            http = create_mcp_http_client(headers={"Authorization": f"Bearer {token}"}, timeout=httpx.Timeout(120))
            transport = streamable_http_client(replica.url, http_client=http)
            info = Implementation(name="lakegate-warm-up", version="1.0")
            async with http, Client(transport, client_info=info) as client:
                for tool, arguments, _ in steps:
                    await client.call_tool(tool, arguments)
                    tally.answered[replica.name] += 1


def _change_policy(url: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("INSERT INTO casbin_rule (ptype, v0, v1, v2, v3) VALUES (%s, %s, %s, %s, %s)", POLICY_CHANGE)


async def _load(replicas: list[Replica], url: str, sessions: int, duration: float) -> dict[str, Any]:
    tally = Tally()
    await _warm_up(replicas, tally)
    killed, dead, go = asyncio.Event(), set[str](), asyncio.Event()
    probes = [asyncio.create_task(_probe_policy(r, go, tally)) for r in replicas]
    start = time.monotonic()
    stop_at = start + duration
    agents = [Session(f"agent-{i:03d}", ROLES[i % len(ROLES)], replicas, i % len(replicas)) for i in range(sessions)]
    tasks = [asyncio.create_task(a.run(stop_at, tally, killed, dead)) for a in agents]

    await asyncio.sleep(duration * 0.35)
    _POLICY_CHANGED_AT.append(time.monotonic())
    await asyncio.to_thread(_change_policy, url)
    go.set()
    propagation = await asyncio.gather(*probes)

    await asyncio.sleep(max(0.0, start + duration * 0.6 - time.monotonic()))
    victim = replicas[1]
    assert victim.process is not None
    tally.killed_at = time.monotonic()
    killed.set()
    victim.process.send_signal(signal.SIGKILL)
    killed_at = time.monotonic() - start

    await asyncio.gather(*tasks)
    elapsed = time.monotonic() - start
    calls = sum(len(samples) for samples in tally.latencies.values())  # the load's calls, not warm-up or probes
    return {
        "sessions": sessions,
        "duration_s": round(elapsed, 1),
        "calls_answered": calls,
        "throughput_calls_per_s": round(calls / elapsed, 1),
        "answered_per_replica": dict(tally.answered),  # warm-up and probe calls included: all are audited
        "outcomes": dict(tally.outcomes),
        "non_policy_errors": tally.outcomes["error"],
        "errors_sample": tally.errors[:10],
        "latency_ms_per_tool": {
            tool: {
                "n": len(samples),
                "p50": round(statistics.median(samples), 1),
                "p99": round(sorted(samples)[min(len(samples) - 1, int(len(samples) * 0.99))], 1),
            }
            for tool, samples in sorted(tally.latencies.items())
        },
        "policy_change": {
            "rule": ", ".join(POLICY_CHANGE),
            "applied_after_s": {
                r.name: (round(s, 3) if s is not None else None) for r, s in zip(replicas, propagation, strict=True)
            },
            "bound_s": POLICY_BOUND_S,
            "within_bound": all(s is not None and s <= POLICY_BOUND_S for s in propagation),
        },
        "kill": {
            "replica": victim.name,
            "at_s": round(killed_at, 1),
            "sessions_reconnected": tally.reconnects,
            "interrupted_calls": tally.outcomes["interrupted"],
            "sessions_answered_again": len(tally.recovery_s),
            "kill_to_answer_s_max": round(max(tally.recovery_s), 3) if tally.recovery_s else None,
        },
    }


def _audit_check(url: str, replicas: list[Replica], load: dict[str, Any]) -> dict[str, Any]:
    from lakegate.server.audit.log import verify
    from lakegate.server.audit.pg import verify_chain
    from lakegate.server.audit.record_model import audit_record

    chain = verify_chain(url)
    rows: Counter[str] = Counter()
    calls: Counter[str] = Counter()
    listings: Counter[str] = Counter()
    refused: Counter[str] = Counter()
    with psycopg.connect(url) as conn:
        for replica, text in conn.execute("SELECT replica, record FROM lakegate_audit"):
            record = audit_record(json.loads(text))
            rows[replica] += 1
            if record.is_listing:
                listings[replica] += 1
            elif record.tool is None:  # a request refused before it reached the gate
                refused[replica] += record.requests
            else:
                calls[replica] += 1
    answered = load["answered_per_replica"]
    survivor, victim = replicas[0].name, replicas[1].name
    interrupted = load["kill"]["interrupted_calls"]
    exact = calls[survivor] - answered.get(survivor, 0)
    killed_extra = calls[victim] - answered.get(victim, 0)
    return {
        "chain_verifies": chain.ok,
        "chain_records": chain.records,
        "records_per_replica": dict(rows),
        "call_records_per_replica": dict(calls),
        "listings_per_replica": dict(listings),
        "refused_requests_per_replica": dict(refused),
        "survivor_records_minus_answered_calls": exact,
        "killed_records_minus_answered_calls": killed_extra,
        "one_record_per_call": exact == 0 and 0 <= killed_extra <= interrupted,
        "local_files_verify": {r.name: verify(r.audit).ok for r in replicas if r.audit.exists()},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=50)
    parser.add_argument("--duration", type=float, default=60.0)
    parser.add_argument(
        "--postgres", default=os.environ.get("LAKEGATE_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
    )
    parser.add_argument("--out", type=Path, default=REPO / "evals" / "results" / "load_test.json")
    args = parser.parse_args(argv)

    database = f"lakegate_load_{secrets.token_hex(4)}"
    with psycopg.connect(args.postgres, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{database}"')
    url = args.postgres.rsplit("/", 1)[0] + "/" + database
    replicas: list[Replica] = []
    try:
        with tempfile.TemporaryDirectory(prefix="lakegate-load-") as scratch:
            home = Path(scratch)
            env = _environment(home, url)
            print("building the demo warehouse into PostgreSQL ...", flush=True)
            _lakegate(env, "demo")
            _lakegate(env, "profile", "sync-policies")
            replicas = [Replica(f"r{i + 1}", _free_port(), home / f"audit-r{i + 1}.jsonl") for i in range(2)]
            for replica in replicas:
                _start(replica, env)
            for replica in replicas:
                _wait_healthy(replica)
            print(
                f"{args.sessions} sessions for {args.duration:.0f} s over {[r.url for r in replicas]} ...", flush=True
            )
            load = asyncio.run(_load(replicas, url, args.sessions, args.duration))
            for replica in replicas:
                if replica.process is not None and replica.process.poll() is None:
                    replica.process.send_signal(signal.SIGTERM)
                    replica.process.wait(timeout=30)
            load["audit"] = _audit_check(url, replicas, load)
    finally:
        for replica in replicas:
            if replica.process is not None and replica.process.poll() is None:
                replica.process.kill()
        with psycopg.connect(args.postgres, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
    load["machine"] = {"python": sys.version.split()[0], "platform": platform.platform(), "cpus": os.cpu_count()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(load, indent=2) + "\n")
    print(json.dumps(load, indent=2))
    ok = load["non_policy_errors"] == 0 and load["policy_change"]["within_bound"] and load["audit"]["chain_verifies"]
    return 0 if ok and load["audit"]["one_record_per_call"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
