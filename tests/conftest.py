"""Shared fixtures: one small demo warehouse per test session, built with the real engines."""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import anyio
import pytest
import structlog

from lakegate.catalog.definitions import load_definitions
from lakegate.catalog.demo import build_demo
from lakegate.catalog.spark_cluster import ClusterInfo
from lakegate.catalog.warehouse import Warehouse
from lakegate.server.app import Runtime, open_runtime
from lakegate.server.gate.gate import GateOutcome
from lakegate.server.gate.identity import CallOrigin, stdio_principal
from lakegate.server.settings import Settings, load_settings
from tests.seaweed_support import Seaweed, seaweed_or_skip
from tests.spark_support import spark_cluster_or_skip

REPO = Path(__file__).resolve().parents[1]

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def build_small_demo(home: Path) -> Path:
    """Build the small demo warehouse into `home` with the real engines; returns `home`."""
    warehouse = Warehouse(home)
    try:
        build_demo(warehouse, load_definitions(REPO), "small")
    finally:
        warehouse.close()
    return home


def copy_demo_project(project: Path) -> Path:
    """`project` made a copy of the demo's policies and catalog definitions (to edit); returns it."""
    ignore = shutil.ignore_patterns("*.py", "__pycache__")
    shutil.copytree(REPO / "policies", project / "policies", ignore=ignore)
    shutil.copytree(REPO / "catalog", project / "catalog", ignore=ignore)
    return project


def runtime_with_policy_file(demo_home: Path, tmp_path: Path, file: str, text: str) -> Runtime:
    """A runtime over the demo warehouse whose project has its own copy of the demo's policies and
    catalog, with policies/`file` holding `text`; audited to tmp_path/audit.jsonl."""
    project = copy_demo_project(tmp_path / "project")
    (project / "policies" / file).write_text(text)
    audit = {"path": tmp_path / "audit.jsonl", "fsync": False}
    return open_runtime(load_settings(project, home=demo_home, audit=audit, principal=None))


def gate_call(
    runtime: Runtime, principal: str, tool: str, arguments: dict[str, Any], *, session_id: str = "t"
) -> GateOutcome:
    """One tool call through the gate, in process, as `principal` would make it over stdio."""
    who = stdio_principal(principal, runtime.enforcer)
    origin = CallOrigin(transport="in-process", session_id=session_id)
    return anyio.run(runtime.gate.call, tool, arguments, who, origin)


def gate_ok(
    runtime: Runtime, principal: str, tool: str, arguments: dict[str, Any], *, session_id: str = "t"
) -> dict[str, Any]:
    """gate_call that must succeed; its structured result."""
    outcome = gate_call(runtime, principal, tool, arguments, session_id=session_id)
    assert outcome.error is None, str(outcome.error)
    assert outcome.result is not None
    return outcome.result.model_dump()


@pytest.fixture(scope="session")
def demo_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A state directory holding the small demo warehouse (read-only for tests that share it)."""
    return build_small_demo(tmp_path_factory.mktemp("lakegate-home"))


@pytest.fixture(scope="session")
def spark_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterInfo]:
    """A local Spark cluster (master, one worker, Spark Connect), started once per pytest worker: the
    Spark tests are one xdist group, so once per run (tests/spark_support.py)."""
    yield from spark_cluster_or_skip(tmp_path_factory.mktemp("spark"))


@pytest.fixture(scope="session")
def seaweed_started(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Seaweed]:
    """SeaweedFS (S3 and an Iceberg REST catalog) started, not yet waited for: it boots (~10 s)
    while other fixtures build."""
    yield from seaweed_or_skip(tmp_path_factory.mktemp("seaweed"))


# The PostgreSQL of the production profile's tests: $LAKEGATE_TEST_POSTGRES_URL (.ci/run sets it:
# then the tests must run, and fail if it does not answer), else the local default if one answers,
# else they are skipped. Each test session (each xdist worker) works in a database of its own.
DEFAULT_POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/test"


@pytest.fixture(scope="session")
def pg_server() -> str:
    psycopg = pytest.importorskip("psycopg", reason="the production profile's extra: pip install -e '.[dev]'")
    url = os.environ.get("LAKEGATE_TEST_POSTGRES_URL")
    if url:
        return url  # set (as in CI): the tests must run, so an unreachable server fails them
    try:
        psycopg.connect(DEFAULT_POSTGRES_URL, connect_timeout=2).close()
    except psycopg.OperationalError as exc:
        pytest.skip(
            f"no PostgreSQL: LAKEGATE_TEST_POSTGRES_URL is unset and nothing answers at {DEFAULT_POSTGRES_URL} "
            f"({str(exc).strip()})"
        )
    return DEFAULT_POSTGRES_URL


def _create_database(server: str) -> str:
    import psycopg
    from psycopg import sql

    name = f"lakegate_test_{secrets.token_hex(6)}"
    with psycopg.connect(server, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return urlunsplit(urlsplit(server)._replace(path=f"/{name}"))


def _drop_database(server: str, url: str) -> None:
    import psycopg
    from psycopg import sql

    name = urlsplit(url).path.lstrip("/")
    with psycopg.connect(server, autocommit=True) as admin:
        admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture(scope="session")
def pg_url(pg_server: str) -> Iterator[str]:
    """A database of this test session's own (xdist workers and reruns never share one)."""
    url = _create_database(pg_server)
    yield url
    _drop_database(pg_server, url)


@pytest.fixture
def fresh_pg_url(pg_server: str) -> Iterator[str]:
    """A database of this test's own, for tests that tamper with what is in it."""
    url = _create_database(pg_server)
    yield url
    _drop_database(pg_server, url)


@pytest.fixture
def audit_path(tmp_path: Path) -> Path:
    return tmp_path / "audit" / "audit.jsonl"


@pytest.fixture
def settings(demo_home: Path, audit_path: Path) -> Settings:
    return load_settings(REPO, home=demo_home, audit={"path": audit_path, "fsync": False}, principal=None)


@pytest.fixture
def runtime(settings: Settings) -> Iterator[Runtime]:
    opened = open_runtime(settings)
    yield opened
    opened.close()


@pytest.fixture(autouse=True)
def _reset_structlog() -> Iterator[None]:
    yield
    structlog.reset_defaults()


# The security corpus's view of admin's clear values, for the query security and sandbox tests.
# The metric tests' runtime and hand-written baselines.
from tests.metrics_support import monthly, monthly_refunds, revenue_by_month, rt  # noqa: E402, F401
from tests.query_security_corpus import clear  # noqa: E402, F401
