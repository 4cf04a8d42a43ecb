"""lakegate's catalog: dataset documentation, the storage interface, the embedder and the demo.

Importing this package imports neither torch nor lancedb; they load on first use.
"""

from __future__ import annotations

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
