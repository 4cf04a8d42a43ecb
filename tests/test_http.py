"""The real server over Streamable HTTP (uvicorn on a loopback port), driven by the SDK's HTTP client
with real JWTs: HS256 from the shared secret, RS256 and ES256 from a JWKS file made here."""

from __future__ import annotations

import contextlib
import contextvars
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import httpx2
import jwt
import pytest
import uvicorn
from click.testing import CliRunner
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client
from mcp.types import Implementation

from lakegate.evals.mcp_client import text_of
from lakegate.server.app import Runtime, open_runtime
from lakegate.server.audit.log import read_records, verify
from lakegate.server.audit.record_model import audit_record
from lakegate.server.audit.refusals import REFUSAL_WINDOW_S
from lakegate.server.cli.main import cli
from lakegate.server.gate.identity import Principal, granted_roles
from lakegate.server.gate.role_grants import acting_as, granting
from lakegate.server.settings import Settings, load_settings
from lakegate.server.transports.http_app import create_http_app
from lakegate.server.transports.http_auth import JwtVerifier

REPO = Path(__file__).resolve().parents[1]
SECRET = "test-secret-that-is-long-enough-for-hs256-0123456789"
ISSUER = "https://idp.example.test/"
MAX_BODY = 64 * 1024
INITIALIZE = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {
        "protocolVersion": "2025-06-18",
        "capabilities": {},
        "clientInfo": {"name": "raw-http", "version": "0"},
    },
}
MCP_HEADERS = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}


@dataclass
class Served:
    base: str
    settings: Settings
    runtime: Runtime
    audit_path: Path
    rsa_key: rsa.RSAPrivateKey
    ec_key: ec.EllipticCurvePrivateKey

    @property
    def url(self) -> str:
        return self.base + "/mcp"

    def token(self, subject: str = "alice", roles: list[str] | None = None, **overrides: Any) -> str:
        """An HS256 token as the identity provider would issue it; `overrides` replace claims."""
        key: Any = overrides.pop("key", SECRET)
        algorithm = overrides.pop("algorithm", "HS256")
        headers = overrides.pop("headers", None)
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": ISSUER,
            "aud": self.url,
            "sub": subject,
            "iat": now,
            "exp": now + 600,
            "roles": roles if roles is not None else [],
        }
        claims.update(overrides)
        claims = {name: value for name, value in claims.items() if value is not None}
        return jwt.encode(claims, key, algorithm=algorithm, headers=headers)

    def records(self) -> list[dict[str, Any]]:
        return list(read_records(self.audit_path)) if self.audit_path.exists() else []


def _jwks(rsa_key: rsa.RSAPrivateKey, ec_key: ec.EllipticCurvePrivateKey) -> dict[str, Any]:
    keys = []
    for kid, alg, key in (("rsa-1", "RS256", rsa_key), ("ec-1", "ES256", ec_key)):
        jwk = json.loads(jwt.algorithms.get_default_algorithms()[alg].to_jwk(key.public_key()))
        keys.append({**jwk, "kid": kid, "alg": alg, "use": "sig"})
    return {"keys": keys}


def _wait_until_up(base: str, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if httpx2.get(base + "/healthz", timeout=2).status_code == 200:
                return
        except httpx2.TransportError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"{base} did not come up")


@pytest.fixture(scope="module")
def served(demo_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    with _serving(demo_home, tmp_path_factory.mktemp("http")) as serving:
        yield serving


@contextlib.contextmanager
def _serving(demo_home: Path, folder: Path, refusal_window_s: float = REFUSAL_WINDOW_S) -> Iterator[Served]:
    """A real server on a loopback port of its own, stopped (lifespan shutdown included) on exit."""
    folder.mkdir(parents=True, exist_ok=True)
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ec_key = ec.generate_private_key(ec.SECP256R1())
    (folder / "jwks.json").write_text(json.dumps(_jwks(rsa_key, ec_key)))
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    audit_path = folder / "audit.jsonl"
    settings = load_settings(
        REPO,
        home=demo_home,
        principal=None,
        audit={"path": audit_path, "fsync": False},
        http={"port": port, "max_body_bytes": MAX_BODY},
        auth={
            "issuer": ISSUER,
            "shared_secret": SECRET,
            "jwks_file": folder / "jwks.json",
            "authorization_servers": [ISSUER],
            "scopes": ["lakegate"],
        },
    )
    runtime = open_runtime(settings)
    app = create_http_app(runtime, refusal_window_s=refusal_window_s)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_until_up(base)
        yield Served(base, settings, runtime, audit_path, rsa_key, ec_key)
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        runtime.close()
        sock.close()


async def _as(url: str, token: str, *calls: tuple[str, dict[str, Any]], mode: str = "legacy") -> list[Any]:
    """Open an MCP session at `url` with the SDK's Streamable HTTP client and make the calls in it.

    `legacy` is the initialize handshake with an Mcp-Session-Id; `auto` lets the client choose
    (today: the session-less 2026 protocol, every request on its own)."""
    http = create_mcp_http_client(headers={"Authorization": f"Bearer {token}"})
    transport = streamable_http_client(url, http_client=http)
    results: list[Any] = []
    async with (
        http,
        Client(transport, client_info=Implementation(name="http-tests", version="1.0"), mode=mode) as client,
    ):
        for name, arguments in calls:
            if name == "tools/list":
                results.append(await client.list_tools())
            elif name == "resources/list":
                results.append(await client.list_resources())
            elif name == "resources/templates/list":
                results.append(await client.list_resource_templates())
            else:
                results.append(await client.call_tool(name, arguments))
    return results


def await_(coroutine: Coroutine[Any, Any, Any]) -> Any:
    async def run() -> Any:
        return await coroutine

    return anyio.run(run)


def _post(
    served: Served, body: Any = INITIALIZE, token: str | None = None, *, source: str | None = None, **headers: str
) -> httpx2.Response:
    """POST to /mcp; from the loopback address `source` (127.0.0.x) when given, so that a test's
    refusals are not counted into the window of another test's (refusals aggregate per address)."""
    sent = {**MCP_HEADERS, **headers}
    if token is not None:
        sent["Authorization"] = f"Bearer {token}"
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    with _client(source) as client:
        return client.post(served.url, content=content, headers=sent)


def _client(source: str | None) -> httpx2.Client:
    return httpx2.Client(transport=httpx2.HTTPTransport(local_address=source), timeout=30)


def _new_records(served: Served, before: int) -> list[dict[str, Any]]:
    return served.records()[before:]


def _calls(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The records of tool calls. The SDK client lists the tools to check the first result of a
    tool it has not listed yet against its output schema: that listing is audited too."""
    return [record for record in records if not audit_record(record).is_listing]


# -- authenticated calls ---------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["legacy", "auto"])
def test_hs256_token_calls_a_tool_as_its_subject(served: Served, mode: str) -> None:
    before = len(served.records())
    listed, result = await_(
        _as(served.url, served.token("alice", ["analyst"]), ("tools/list", {}), ("list_datasets", {}), mode=mode)
    )
    assert "query" in {tool.name for tool in listed.tools}
    assert not result.is_error, text_of(result)
    names = {d["name"] for d in result.structured_content["datasets"]}
    assert {"sales.orders", "finance.payments"} <= names and not any(n.startswith("support.") for n in names)
    listing, record = _new_records(served, before)
    assert (listing["principal"], listing["tool"], listing["rows"]) == ("alice", "tools/list", len(listed.tools))
    assert listing["session_id"] == record["session_id"] and listing["transport"] == "http"
    assert (record["principal"], record["tool"], record["decision"]) == ("alice", "list_datasets", "allow")
    assert record["transport"] == "http" and record["authenticated_by"] == "bearer"
    assert "role:analyst" in record["roles"]
    assert record["client"] == {"name": "http-tests", "version": "1.0"}
    assert verify(served.audit_path).ok


@pytest.mark.parametrize("mode", ["legacy", "auto"])
def test_a_long_query_reports_progress_over_http_and_is_cancelled(served: Served, mode: str) -> None:
    """As over stdio (tests/test_query.py): progress notifications while a query runs, in both
    protocol eras (the 2025 session and the 2026 session-less requests); the client's cancel stops
    it, the call is audited as cancelled, and the server keeps answering."""
    progress: list[tuple[float, float | None, str | None]] = []
    reported = anyio.Event()

    async def on_progress(done: float, total: float | None, message: str | None) -> None:
        progress.append((done, total, message))
        reported.set()

    async def scenario() -> Any:
        http = create_mcp_http_client(headers={"Authorization": f"Bearer {served.token('analyst')}"})
        transport = streamable_http_client(served.url, http_client=http)
        async with (
            http,
            Client(transport, client_info=Implementation(name="http-tests", version="1.0"), mode=mode) as c,
        ):
            slow = {"sql": "SELECT count(*) FROM range(100000000000) a WHERE a.range % 7 = 1"}
            async with anyio.create_task_group() as group:  # cancelled once it reported progress
                group.start_soon(partial(c.call_tool, "query", slow, progress_callback=on_progress))
                with anyio.move_on_after(30):
                    await reported.wait()
                group.cancel_scope.cancel()
            return await c.call_tool("query", {"sql": "SELECT count(*) FROM sales.products"})

    before = len(served.records())
    after = await_(scenario())
    assert not after.is_error and after.structured_content["rows"] == [[120]]
    assert progress and all(total == 100.0 and message and "query running" in message for _, total, message in progress)
    queries = [r for r in _new_records(served, before) if r["tool"] == "query"]
    assert [r["outcome"] for r in queries] == ["cancelled", "ok"]


def test_listen_streams_of_two_principals_each_hear_of_a_third_ones_write(demo_home: Path, tmp_path: Path) -> None:
    """Two 2026 listen streams (requests without a session id) on one dataset both hear of a third
    principal's write; bob, whose role comes from his token, is judged by his own token's roles,
    not by the writer's."""
    home = tmp_path / "home"
    shutil.copytree(demo_home, home)  # this test writes
    uri = "lakegate://datasets/support.tickets"
    row = {"ticket_id": 880_002, "customer_id": 7, "opened_ts": "2025-12-01T09:30:00+00:00", "priority": "low",
           "status": "open", "subject": "Heard", "body": "Two listeners."}  # fmt: skip

    async def listener(served: Served, token: str, heard: dict[str, list[str]], ready: anyio.Event) -> None:
        http = create_mcp_http_client(headers={"Authorization": f"Bearer {token}"})
        async with (
            http,
            Client(streamable_http_client(served.url, http_client=http)) as client,
            client.listen(resource_subscriptions=[uri]) as stream,
        ):
            heard.setdefault(token, [])
            if len(heard) == 2:
                ready.set()
            async for event in stream:
                heard[token].append(event.uri)  # type: ignore[union-attr]
                return

    async def scenario(served: Served) -> dict[str, list[str]]:
        heard: dict[str, list[str]] = {}
        ready = anyio.Event()
        tokens = [served.token("support_agent"), served.token("bob", ["support_agent"])]
        with anyio.fail_after(60):
            async with anyio.create_task_group() as listeners:
                for token in tokens:
                    listeners.start_soon(listener, served, token, heard, ready)
                await ready.wait()
                [written] = await _as(
                    served.url, served.token("sam"), ("append_rows", {"table": "support.tickets", "rows": [row]})
                )
                assert not written.is_error, text_of(written)
        return {("bob" if token == tokens[1] else "support_agent"): uris for token, uris in heard.items()}

    with _serving(home, tmp_path / "http") as served:
        heard = anyio.run(scenario, served)
    assert heard == {"support_agent": [uri], "bob": [uri]}


def test_each_http_session_is_audited_under_its_own_session_id(served: Served) -> None:
    before = len(served.records())
    token = served.token("alice", ["analyst"])
    for _ in range(2):
        await_(_as(served.url, token, ("list_datasets", {}), ("list_metrics", {})))
    records = _calls(_new_records(served, before))
    assert len(records) == 4
    first, second = {r["session_id"] for r in records[:2]}, {r["session_id"] for r in records[2:]}
    assert len(first) == 1 and len(second) == 1 and first != second, records


@pytest.mark.parametrize(("algorithm", "kid"), [("RS256", "rsa-1"), ("ES256", "ec-1")])
def test_asymmetric_tokens_verify_against_the_jwks_file(served: Served, algorithm: str, kid: str) -> None:
    key = served.rsa_key if algorithm == "RS256" else served.ec_key
    token = served.token("dana", key=key, algorithm=algorithm, headers={"kid": kid})
    before = len(served.records())
    [result] = anyio.run(_as, served.url, token, ("list_datasets", {}))
    assert not result.is_error, text_of(result)
    assert "support.tickets" in {d["name"] for d in result.structured_content["datasets"]}  # data_steward sees it
    [record] = _calls(_new_records(served, before))
    assert record["principal"] == "dana" and "role:data_steward" in record["roles"]


def test_token_roles_add_to_the_policy_and_unknown_roles_count_for_nothing(served: Served) -> None:
    # bob is in no g rule: the policy alone gives him nothing; his token grants support_agent.
    bare = served.token("bob", ["no_such_role", "admin_please"])
    [listed] = anyio.run(_as, served.url, bare, ("tools/list", {}))
    assert listed.tools == []

    granted = served.token("bob", ["support_agent", "no_such_role"])
    before = len(served.records())
    listed, datasets, regions = anyio.run(
        _as,
        served.url,
        granted,
        ("tools/list", {}),
        ("list_datasets", {}),
        ("query", {"sql": "SELECT DISTINCT region FROM sales.customers ORDER BY 1"}),
    )
    assert "append_rows" in {tool.name for tool in listed.tools}  # support_agent's own tool
    names = {d["name"] for d in datasets.structured_content["datasets"]}
    assert "support.tickets" in names and "finance.payments" not in names
    assert not regions.is_error, text_of(regions)
    # support_agent's row filter (EMEA only) applies to the granted role too.
    assert [row[0] for row in regions.structured_content["rows"]] == ["EMEA"]
    records = _new_records(served, before)
    assert {r["principal"] for r in records} == {"bob"}
    assert records[-1]["roles"] == ["role:agent", "role:support_agent"]
    assert records[-1]["decision"] == "partial"  # rows filtered


def test_listings_over_http_are_audited_as_the_token_subject(served: Served) -> None:
    before = len(served.records())
    tools, resources, templates = anyio.run(
        _as,
        served.url,
        served.token("alice", ["analyst"]),
        ("tools/list", {}),
        ("resources/list", {}),
        ("resources/templates/list", {}),
    )
    records = _new_records(served, before)
    assert [(r["tool"], r["rows"]) for r in records] == [
        ("tools/list", len(tools.tools)),
        ("resources/list", len(resources.resources)),
        ("resources/templates/list", 1),
    ]
    assert len(tools.tools) > 0 and len(resources.resources) > 0
    for record in records:
        assert audit_record(record).is_listing and record["details"] == {"listing": record["tool"]}
        assert (record["principal"], record["transport"], record["authenticated_by"]) == ("alice", "http", "bearer")
        assert (record["decision"], record["outcome"]) == ("allow", "ok") and "role:analyst" in record["roles"]
        assert record["client"] == {"name": "http-tests", "version": "1.0"}
    assert len({r["session_id"] for r in records}) == 1 and records[0]["session_id"]
    assert verify(served.audit_path).ok


def test_granted_roles_decide_together_with_deny_overriding(runtime: Runtime) -> None:
    _, grants = granting(runtime.enforcer)
    assert {"role:analyst", "role:support_agent", "role:data_steward", "role:agent"} <= grants.known_roles()
    assert "alice" not in grants.known_roles()
    assert granted_roles(["support_agent", "role:data_steward", "root"], grants.known_roles()) == (
        ("role:data_steward", "role:support_agent"),
        ("root",),
    )

    def body_read(*granted: str) -> tuple[bool, tuple[str, ...]]:
        acting_as(Principal("bob", granted=granted))
        decision = grants.decide("bob", "support.tickets.body", "read")
        return decision.allowed, decision.rule

    # Each call in a context of its own, as each request is: the binding does not outlive it.
    assert contextvars.copy_context().run(body_read, "role:support_agent")[0]
    allowed, rule = contextvars.copy_context().run(body_read, "role:support_agent", "role:data_steward")
    assert not allowed and rule[-1] == "deny"  # data_steward's deny on ticket bodies wins
    assert not grants.decide("bob", "support.tickets.body", "read").allowed  # no principal bound here


def test_granted_roles_count_for_the_scan_limit(runtime: Runtime) -> None:
    wrapped, _ = granting(runtime.enforcer)
    runtime.gate.enforcer = wrapped  # as the HTTP app builds its gate

    def limit(*granted: str) -> int | None:
        bob = acting_as(Principal("bob", granted=granted))
        found = runtime.gate.scope(bob).scan_limit()
        return found.max_scan_bytes if found is not None else None

    # The demo caps data_steward (policies/scan_limits.yaml); bob holds the role only through a token.
    assert contextvars.copy_context().run(limit, "role:data_steward") == 128_000_000
    assert contextvars.copy_context().run(limit) is None


def test_a_session_answers_only_the_identity_that_opened_it(served: Served) -> None:
    opened = _post(served, token=served.token("alice", ["analyst"]))
    assert opened.status_code == 200, opened.text
    session = opened.headers["mcp-session-id"]
    listing = {"jsonrpc": "2.0", "id": 2, "method": "tools/list"}
    before = len(served.records())
    bob = served.token("bob", ["support_agent"])
    stolen = _post(served, listing, token=bob, source="127.0.0.11", **{"mcp-session-id": session})
    assert stolen.status_code == 404
    [record] = _new_records(served, before)
    assert (record["decision"], record["outcome"], record["principal"]) == ("deny", "session_not_found", "bob")
    assert record["session_id"] == session and record["authenticated_by"] == "bearer"
    assert "role:support_agent" in record["roles"] and record["tool"] is None and record["count"] == 1
    assert record["details"]["reason"] == "other_principal" and record["details"]["status"] == 404
    assert record["details"]["http"]["remote"] == "127.0.0.11"
    assert bob not in served.audit_path.read_text()

    before = len(served.records())
    unknown = _post(served, listing, token=bob, source="127.0.0.12", **{"mcp-session-id": "f" * 32})
    assert unknown.status_code == 404
    [record] = _new_records(served, before)
    assert record["outcome"] == "session_not_found" and record["details"]["reason"] == "unknown_session"
    assert verify(served.audit_path).ok


# -- refusals --------------------------------------------------------------------------------------


def _bad_tokens(served: Served) -> dict[str, str | None]:
    now = int(time.time())
    forged = served.token("alice", ["admin"], key="another-secret-that-is-long-enough-for-hs256-xx")
    return {
        "missing": None,
        "expired": served.token("alice", iat=now - 7200, exp=now - 3600),
        "audience": served.token("alice", aud="https://elsewhere.example/mcp"),
        "signature": forged,
        "issuer": served.token("alice", iss="https://evil.example/"),
        "malformed": "not-a-jwt",
        "unknown_key": served.token("alice", key=served.rsa_key, algorithm="RS256", headers={"kid": "gone"}),
    }


REASONS = ["missing", "expired", "audience", "signature", "issuer", "malformed", "unknown_key"]


@pytest.mark.parametrize("reason", REASONS)
def test_refused_tokens_get_a_401_challenge_and_an_audit_record(served: Served, reason: str) -> None:
    token = _bad_tokens(served)[reason]
    before = len(served.records())
    source = f"127.0.0.{20 + REASONS.index(reason)}"
    response = _post(served, token=token, source=source, **{"User-Agent": "refusal-test"})
    assert response.status_code == 401
    challenge = response.headers["www-authenticate"]
    assert challenge.startswith("Bearer ")
    assert f'resource_metadata="{served.base}/.well-known/oauth-protected-resource/mcp"' in challenge
    if token is None:
        assert "error=" not in challenge  # RFC 6750: no error code when no token was sent
    else:
        assert 'error="invalid_token"' in challenge and 'error_description="' in challenge
    [record] = _new_records(served, before)
    assert (record["decision"], record["outcome"], record["principal"]) == ("deny", "unauthenticated", "anonymous")
    assert record["details"]["reason"] == reason and record["error"]
    assert record["details"]["http"]["user_agent"] == "refusal-test"
    assert record["details"]["http"]["remote"] == source and record["details"]["status"] == 401
    if token is not None:
        assert token not in served.audit_path.read_text()


def test_expired_token_is_described_as_expired(served: Served) -> None:
    now = int(time.time())
    response = _post(served, token=served.token("alice", iat=now - 7200, exp=now - 3600))
    assert 'error_description="The token has expired."' in response.headers["www-authenticate"]


def test_a_subject_named_like_a_role_is_refused(served: Served) -> None:
    response = _post(served, token=served.token("role:admin"))
    assert response.status_code == 401 and "names a role" in response.headers["www-authenticate"]


def test_foreign_browser_origin_is_refused_and_loopback_origin_is_not(served: Served) -> None:
    token = served.token("alice", ["analyst"])
    before = len(served.records())
    assert _post(served, token=token, source="127.0.0.31", Origin="http://evil.example").status_code == 403
    [record] = _new_records(served, before)
    assert (record["decision"], record["outcome"], record["principal"]) == ("deny", "foreign_origin", "anonymous")
    assert record["details"]["status"] == 403 and record["count"] == 1 and record["transport"] == "http"
    assert record["details"]["http"] | {"user_agent": None} == {
        "method": "POST",
        "path": "/mcp",
        "remote": "127.0.0.31",
        "user_agent": None,
        "origin": "http://evil.example",
        "host": served.base.removeprefix("http://"),
    }
    assert token not in served.audit_path.read_text()

    before = len(served.records())
    assert _post(served, token=token, Origin="http://localhost:6274").status_code == 200
    assert not any(r["decision"] == "deny" for r in _new_records(served, before))
    with _client("127.0.0.32") as client:
        assert client.get(served.base + "/healthz", headers={"Origin": "http://evil.example"}).status_code == 403
    [record] = _new_records(served, before)
    assert record["outcome"] == "foreign_origin" and record["details"]["http"]["path"] == "/healthz"


def test_foreign_host_header_is_refused(served: Served) -> None:
    before = len(served.records())
    response = _post(served, token=served.token("alice"), source="127.0.0.33", Host="rebound.example:80")
    assert response.status_code == 421
    [record] = _new_records(served, before)
    assert (record["decision"], record["outcome"], record["details"]["status"]) == ("deny", "foreign_host", 421)
    assert record["details"]["http"]["host"] == "rebound.example:80"
    assert record["details"]["http"]["remote"] == "127.0.0.33"


def test_oversized_body_gets_413(served: Served) -> None:
    body = {"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {"pad": "x" * (MAX_BODY + 1)}}
    before = len(served.records())
    response = _post(served, body, token=served.token("alice", ["analyst"]), source="127.0.0.34")
    assert response.status_code == 413
    [record] = _new_records(served, before)
    assert (record["decision"], record["outcome"], record["principal"]) == ("deny", "body_too_large", "alice")
    assert record["details"]["status"] == 413 and record["details"]["http"]["remote"] == "127.0.0.34"
    assert "role:analyst" in record["roles"]
    assert verify(served.audit_path).ok


def test_a_flood_of_refusals_is_counted_into_few_records(demo_home: Path, tmp_path: Path) -> None:
    """Per kind of refusal and client address: the first at once, the rest of the window as one
    record with its count, and what is still counted when the server stops."""
    flood, window = 48, 2.0

    def send(served: Served, source: str, kinds: list[tuple[dict[str, str], int]], times: int) -> None:
        with _client(source) as client:
            for _ in range(times):
                for headers, expected in kinds:
                    assert client.post(served.url, headers=headers).status_code == expected

    def flood_from(served: Served, source: str, *kinds: tuple[dict[str, str], int]) -> float:
        """Send `flood` requests of each kind from 8 clients at once; the seconds it took."""
        started = time.monotonic()
        with ThreadPoolExecutor(max_workers=8) as pool:
            for done in [pool.submit(send, served, source, list(kinds), flood // 8) for _ in range(8)]:
                done.result()
        return time.monotonic() - started

    foreign, bad_token = ({"Origin": "http://evil.example"}, 403), ({"Authorization": "Bearer not-a-jwt"}, 401)
    with _serving(demo_home, tmp_path / "short", refusal_window_s=window) as served:
        elapsed = flood_from(served, "127.0.0.41", foreign, bad_token)
        send(served, "127.0.0.42", [foreign], 1)
        # Served as usual meanwhile.
        [result] = anyio.run(_as, served.url, served.token("alice", ["analyst"]), ("list_datasets", {}))
        assert not result.is_error

        def of(outcome: str, remote: str) -> list[dict[str, Any]]:
            return [r for r in served.records() if r["outcome"] == outcome and r["details"]["http"]["remote"] == remote]

        def counted(outcome: str) -> int:
            return sum(r["count"] for r in of(outcome, "127.0.0.41"))

        deadline = time.monotonic() + 10 * window
        while min(counted("foreign_origin"), counted("unauthenticated")) < flood and time.monotonic() < deadline:
            time.sleep(0.1)  # the window's record is written when the window ends, not on the next request
        for outcome in ("foreign_origin", "unauthenticated"):
            records = of(outcome, "127.0.0.41")
            assert sum(r["count"] for r in records) == flood, (outcome, [r["count"] for r in records])
            # One at once, then one per window while the flood lasted (and one for its last window).
            assert 2 <= len(records) <= 2 + elapsed / window < flood, (outcome, [r["count"] for r in records])
            first, *rest = records
            assert first["count"] == 1 and "aggregated" not in first["details"]
            for record in rest:
                assert record["decision"] == "deny" and record["details"]["aggregated"]["window_s"] == window
                assert record["details"]["aggregated"]["first_at"] <= record["details"]["aggregated"]["last_at"]
        assert [r["count"] for r in of("foreign_origin", "127.0.0.42")] == [1]  # an address of its own
        assert verify(served.audit_path).ok

    with _serving(demo_home, tmp_path / "long", refusal_window_s=3600) as served:
        flood_from(served, "127.0.0.43", foreign)
        assert [r["count"] for r in served.records()] == [1]
    # Stopping the server wrote what the window still counted.
    assert [r["count"] for r in served.records()] == [1, flood - 1]
    assert verify(served.audit_path).ok


# -- companions ------------------------------------------------------------------------------------


def test_healthz_reports_versions_without_a_token(served: Served) -> None:
    response = httpx2.get(served.base + "/healthz")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "ok"
    assert body["policy_version"] == served.runtime.enforcer.version and re.fullmatch(
        r"[0-9a-f]{16}", body["policy_version"]
    )
    assert body["version"]


def test_protected_resource_metadata(served: Served) -> None:
    for path in ("/.well-known/oauth-protected-resource", "/.well-known/oauth-protected-resource/mcp"):
        response = httpx2.get(served.base + path)
        assert response.status_code == 200
        document = response.json()
        assert document["resource"] == served.url
        assert document["authorization_servers"] == [ISSUER]
        assert document["bearer_methods_supported"] == ["header"]
        assert document["scopes_supported"] == ["lakegate"]


def _sample(text: str, name: str, **labels: str) -> float:
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}", 1)[0]))
        if all(found.get(key) == value for key, value in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_metrics_need_a_token_and_count_calls_denials_and_refusals(served: Served) -> None:
    before_refusal = len(served.records())
    with _client("127.0.0.51") as client:
        assert client.get(served.base + "/metrics").status_code == 401
    [refused] = _new_records(served, before_refusal)
    assert (refused["decision"], refused["outcome"], refused["details"]["reason"]) == (
        "deny",
        "unauthenticated",
        "missing",
    )
    assert refused["details"]["http"]["path"] == "/metrics" and refused["details"]["http"]["remote"] == "127.0.0.51"
    token = served.token("alice", ["analyst"])
    auth = {"Authorization": f"Bearer {token}"}

    def scrape() -> str:
        response = httpx2.get(served.base + "/metrics", headers=auth)
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
        return response.text

    before = scrape()
    anyio.run(
        _as,
        served.url,
        token,
        ("list_datasets", {}),
        ("describe_dataset", {"name": "support.tickets"}),
        ("restore_table", {}),
    )
    _post(served, token="not-a-jwt")
    after = scrape()
    allowed = dict(tool="list_datasets", decision="allow", outcome="ok")
    assert (
        _sample(after, "lakegate_tool_calls_total", **allowed)
        == _sample(before, "lakegate_tool_calls_total", **allowed) + 1
    )
    assert (
        _sample(after, "lakegate_denials_total", tool="restore_table")
        == _sample(before, "lakegate_denials_total", tool="restore_table") + 1
    )
    assert _sample(after, "lakegate_tool_call_duration_seconds_count", tool="list_datasets") >= 1
    # The client listed the tools (to check results against their schemas): a listing is no tool call.
    unknown = dict(tool="(unknown)", decision="allow", outcome="ok")
    assert _sample(after, "lakegate_tool_calls_total", **unknown) == _sample(
        before, "lakegate_tool_calls_total", **unknown
    )
    assert (
        _sample(after, "lakegate_auth_failures_total", reason="malformed")
        == _sample(before, "lakegate_auth_failures_total", reason="malformed") + 1
    )
    assert _sample(after, "lakegate_http_requests_total", route="/mcp", status="401") >= 1


# -- the command line ------------------------------------------------------------------------------


def test_token_command_mints_what_the_server_accepts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LAKEGATE_AUTH__SHARED_SECRET", SECRET)
    result = CliRunner().invoke(
        cli, ["--project", str(REPO), "token", "--subject", "alice", "--roles", "analyst", "--ttl", "1h"]
    )
    assert result.exit_code == 0, result.output
    token = result.stdout.strip().splitlines()[0]
    verified = JwtVerifier(load_settings(REPO)).verify(token)
    assert (verified.subject, verified.claimed_roles) == ("alice", ("analyst",))
    assert 3500 < verified.expires_at - time.time() <= 3600


def test_token_command_needs_the_shared_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LAKEGATE_AUTH__SHARED_SECRET", raising=False)
    result = CliRunner().invoke(cli, ["--project", str(REPO), "token", "--subject", "alice"])
    assert result.exit_code != 0 and "LAKEGATE_AUTH__SHARED_SECRET" in str(result.exception)


def test_lakegate_serve_http_end_to_end(demo_home: Path, tmp_path: Path) -> None:
    """The deployment path: `lakegate serve --http` in its own process, a token from `lakegate token`."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    audit_path = tmp_path / "audit.jsonl"
    env = {
        **os.environ,
        "LAKEGATE_HOME": str(demo_home),
        "LAKEGATE_AUDIT__PATH": str(audit_path),
        "LAKEGATE_AUDIT__FSYNC": "false",
        "LAKEGATE_AUTH__SHARED_SECRET": SECRET,
        "LAKEGATE_HTTP__PORT": str(port),  # the token's audience names the port
        "HF_HUB_OFFLINE": "1",
    }
    command = [sys.executable, "-m", "lakegate", "--project", str(REPO)]
    minted = subprocess.run(
        [*command, "token", "--subject", "sam", "--ttl", "10m"], env=env, capture_output=True, text=True, check=True
    )
    process = subprocess.Popen(
        [*command, "serve", "--http", "--port", str(port)], env=env, stderr=subprocess.PIPE, text=True
    )
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_until_up(base, seconds=120)
        [result] = anyio.run(_as, base + "/mcp", minted.stdout.strip(), ("list_datasets", {}))
        assert not result.is_error and "support.tickets" in text_of(result)
    finally:
        process.terminate()
        _, stderr = process.communicate(timeout=30)
    assert f"Streamable HTTP at {base}/mcp" in stderr
    [record] = _calls(list(read_records(audit_path)))
    assert record["principal"] == "sam" and record["roles"] == ["role:agent", "role:support_agent"]


def test_serve_http_without_keys_says_what_to_set(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LAKEGATE_AUTH__SHARED_SECRET", raising=False)
    monkeypatch.delenv("LAKEGATE_AUTH__JWKS_FILE", raising=False)
    result = CliRunner().invoke(cli, ["--project", str(tmp_path), "serve", "--http"])
    assert result.exit_code != 0 and "LAKEGATE_AUTH__JWKS_FILE" in str(result.exception)


def test_a_token_with_only_the_agent_role_reads_no_table_through_a_recursive_cte(served: Served) -> None:
    """The red-team review's HTTP case: `agent` may call the tools but read no dataset; a recursive
    CTE named after the warehouse's files read them all. Now the guard refuses the name and the
    engine could not read the files anyway."""
    data = served.settings.state_dir / "iceberg" / "warehouse" / "sales" / "customers" / "data"
    token = served.token("bob", ["agent"])
    calls = [
        (
            "query",
            {
                "sql": f'WITH RECURSIVE "{name}" AS (SELECT NULL AS d {operation} SELECT * FROM "{name}") '
                f'SELECT to_json(t) FROM "{name}" t'
            },
        )
        for name in (f"{data}/*.parquet", "sales/customers/data/*.parquet")
        for operation in ("UNION ALL BY NAME", "INTERSECT", "EXCEPT")
    ]
    calls.append(("query", {"sql": "SELECT count(*) FROM sales.customers"}))
    before = len(served.records())
    answers = anyio.run(_as, served.url, token, *calls)
    assert all(answer.is_error for answer in answers), [text_of(a)[:200] for a in answers if not a.is_error]
    assert all("There is no table named" in text_of(answer) for answer in answers[:-1])
    assert "is available to you" in text_of(answers[-1])
    records = _calls(_new_records(served, before))
    assert len(records) == len(calls) and all(r["rows"] == 0 and r["principal"] == "bob" for r in records)
    assert records[-1]["decision"] == "deny"
