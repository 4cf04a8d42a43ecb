"""The demo warehouse: a fictional retail company's sales, finance and support data, plus a
knowledge base of policy and support articles with sentence embeddings.

Everything is drawn from seeded NumPy generators, so the same seed and scale always give the same
rows. Orders follow retail seasonality (weekends, a July sale, the November-December peak, growth
from 2024 to 2025), and the tables are consistent with each other (catalog/demo_tables.py says how).

The "large" scale (10M orders, 1M knowledge-base passages) is for benchmarks: it is generated and
written in batches so that memory stays bounded, and it reports progress.

Where the parts live:
- catalog/demo_tables.py draws the Iceberg rows; catalog/demo_iceberg.py creates and appends to the tables;
- catalog/demo_kb.py writes the knowledge base (kb.articles);
- the prose is package data, read by catalog/demo_data.py: catalog/demo_vocabulary.yaml,
  demo_tickets.yaml, demo_kb.yaml and demo_injections.yaml (the prompt injection planted for the
  red-team evals);
- which roles may read each classification of article is policy: policies/document_readers.yaml.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np

from lakegate.catalog.definitions import CatalogDefinitions
from lakegate.catalog.demo_data import injections, ticket_templates, vocabulary
from lakegate.catalog.demo_iceberg import IcebergWriter
from lakegate.catalog.demo_kb import (
    KB_DATASET,
    KbScale,
    kb_access_columns,
    kb_readers,
    kb_steps,
    sample_passages,
    write_kb,
)
from lakegate.catalog.demo_tables import Ids, generate_customers, generate_products, order_batch
from lakegate.catalog.warehouse import Warehouse, translate_errors
from lakegate.errors import InvalidArgument

if TYPE_CHECKING:
    from lakegate.catalog.embedder import Embedder

__all__ = [
    "DEMO_NAMESPACES",
    "INJECTED_ARTICLE_ID",
    "INJECTED_PRODUCT_NAME",
    "INJECTED_TICKET_BODY",
    "KB_DATASET",
    "DemoSummary",
    "build_demo",
    "kb_access_columns",
    "sample_passages",
]

DEMO_NAMESPACES = ("sales", "finance", "support", "kb")

# The prompt injection planted in the data (catalog/demo_injections.yaml says where and why), for
# the red-team evals and their tests.
INJECTED_PRODUCT_NAME = injections().product_name
INJECTED_TICKET_BODY = injections().ticket_body
INJECTED_ARTICLE_ID = injections().article.doc_id

Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class DemoSummary:
    """What build_demo wrote: rows per dataset name, and how long it took."""

    scale: str
    tables: dict[str, int]
    seconds: float


@dataclass(frozen=True)
class _Scale:
    customers: int
    products: int
    orders: int
    order_batch: int
    kb: KbScale


_SCALES: dict[str, _Scale] = {
    # Two order batches even at small scale, so that sales.orders has a history of two snapshots.
    "small": _Scale(500, 120, 5_000, 2_500, KbScale(rows=0, pool=0, batch=0)),
    "large": _Scale(1_000_000, 2_000, 10_000_000, 1_000_000, KbScale(rows=1_000_000, pool=6_000, batch=100_000)),
}


def build_demo(
    warehouse: Warehouse,
    definitions: CatalogDefinitions,
    scale: Literal["small", "large"] = "small",
    *,
    seed: int = 7,
    progress: Progress | None = None,
    embedder: Embedder | None = None,
) -> DemoSummary:
    """Write the demo datasets, replacing earlier ones of the same names, so reruns are safe.

    Tables and columns are documented from `definitions`. `progress(step, done, total)` is called
    after each step. `embedder` defaults to the process-wide one (`get_embedder()`).

    Raises:
        InvalidArgument: unknown scale.
        BackendError: pyiceberg or lancedb failed.
        ConfigurationError: the embedding model cannot be loaded (ModelIntegrityError: tampered), or
            a demo data file (catalog/demo_*.yaml, policies/document_readers.yaml) is missing or
            malformed; the data files are checked before anything is dropped.
    """
    if scale not in _SCALES:
        raise InvalidArgument(f"Unknown demo scale {scale!r}.", hint="Use 'small' or 'large'.")
    sizes = _SCALES[scale]
    # Read every data file first: a malformed one fails the build before anything is dropped.
    vocabulary()
    ticket_templates()
    kb_readers()
    started = time.perf_counter()
    batches = -(-sizes.orders // sizes.order_batch)
    total = 4 + batches + kb_steps(sizes.kb)
    done = 0

    def step(description: str) -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(description, done, total)

    writer = IcebergWriter(warehouse, definitions, note=f"lakegate demo scale={scale} seed={seed}")
    writer.recreate_tables()
    with translate_errors(f"drop {KB_DATASET}", KB_DATASET):
        warehouse.lance.drop_table(KB_DATASET, ignore_missing=True)
    step("created empty demo datasets")

    customers = generate_customers(np.random.default_rng([seed, 1]), sizes.customers)
    writer.append("sales.customers", customers.columns)
    step(f"wrote {sizes.customers:,} customers")
    products = generate_products(np.random.default_rng([seed, 2]), sizes.products)
    writer.append("sales.products", products.columns)
    step(f"wrote {sizes.products:,} products")

    ids = Ids()
    for number in range(batches):
        count = min(sizes.order_batch, sizes.orders - number * sizes.order_batch)
        batch = order_batch(np.random.default_rng([seed, 3, number]), count, customers, products, ids)
        for name, columns in batch.tables.items():
            writer.append(name, columns)
        step(f"wrote {(number * sizes.order_batch + count):,} of {sizes.orders:,} orders")

    if embedder is None:
        from lakegate.catalog.embedder import get_embedder

        embedder = get_embedder()
    step("loaded the embedding model")
    kb_rows = write_kb(warehouse, definitions, embedder, sizes.kb, seed, step)
    # torch is loaded now: export the query encoder's graph, so that serving never needs torch.
    from lakegate.catalog.query_graph import ensure_query_graph

    ensure_query_graph(warehouse.models_dir, embedder)

    tables = dict(writer.rows)
    tables[KB_DATASET] = kb_rows
    return DemoSummary(scale=scale, tables=tables, seconds=time.perf_counter() - started)
