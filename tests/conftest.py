"""Shared fixtures: one small demo warehouse per test session, built with the real engines."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from catalog.definitions import load_definitions
from catalog.demo import build_demo
from catalog.warehouse import Warehouse
from server.app import Runtime, open_runtime
from server.settings import Settings, load_settings

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


@pytest.fixture(scope="session")
def demo_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A state directory holding the small demo warehouse (read-only for tests that share it)."""
    return build_small_demo(tmp_path_factory.mktemp("lakegate-home"))


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
