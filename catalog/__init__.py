"""lakegate's catalog: dataset documentation, the storage interface, the embedder and the demo.

The public names below load on first use (PEP 562), so that importing any module of the package,
as the server does at start-up, does not import the demo, numpy or the storage libraries.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lakegate.catalog.definitions import CatalogDefinitions, ColumnDoc, DatasetDoc, load_definitions
    from lakegate.catalog.demo import DemoSummary, build_demo
    from lakegate.catalog.embedder import Embedder, get_embedder
    from lakegate.catalog.warehouse import ColumnInfo, DatasetInfo, VersionInfo, Warehouse

__all__ = [
    "CatalogDefinitions",
    "ColumnDoc",
    "ColumnInfo",
    "DatasetDoc",
    "DatasetInfo",
    "DemoSummary",
    "Embedder",
    "VersionInfo",
    "Warehouse",
    "build_demo",
    "get_embedder",
    "load_definitions",
]

_HOMES = {
    "CatalogDefinitions": "definitions",
    "ColumnDoc": "definitions",
    "DatasetDoc": "definitions",
    "load_definitions": "definitions",
    "DemoSummary": "demo",
    "build_demo": "demo",
    "Embedder": "embedder",
    "get_embedder": "embedder",
    "ColumnInfo": "warehouse",
    "DatasetInfo": "warehouse",
    "VersionInfo": "warehouse",
    "Warehouse": "warehouse",
}


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)
