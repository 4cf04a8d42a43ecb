"""Warming what the first calls need, in the background, right after start-up.

An agent's first call should not pay for opening the Iceberg catalog, starting a query worker,
opening the query encoder or embedding the catalog's descriptions. `start_warm_up` does these in a
thread of its own once the runtime is open: `initialize` is never delayed and no request waits
for it (a call that arrives first does the same work itself, under the same locks, and the warm-up
then finds it done). Each step is timed in the log (`warm_up.done`); a step that fails is logged
and left to the first call that needs it, which reports the error to its caller.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import structlog

from lakegate.catalog.catalog_search import warm_entries
from lakegate.catalog.query_embedder import get_query_embedder
from lakegate.errors import LakegateError
from lakegate.server.app import Runtime
from lakegate.tools.catalog import dataset_candidates, metric_candidate

__all__ = ["start_warm_up", "warm_up"]

log = structlog.get_logger(__name__)


def _catalog_search(runtime: Runtime) -> int:
    """Embed the description of every dataset, column and metric, as search_catalog ranks them."""
    encoder = get_query_embedder(runtime.warehouse.models_dir)
    entries = []
    for name in runtime.warehouse.dataset_names():
        try:
            info = runtime.warehouse.describe(name)
        except LakegateError:  # one dataset that cannot be read now does not stop the others
            continue
        visible = {column.name for column in info.columns}
        entries += [entry for _, entry in dataset_candidates(name, info, runtime.definitions.dataset(name), visible)]
    semantic = runtime.gate.semantic
    if semantic is not None:
        entries += [metric_candidate(name, semantic.metric(name))[1] for name in semantic.metric_names()]
    return warm_entries(entries, encoder.model_hash, encoder.embed)


def warm_up(runtime: Runtime) -> dict[str, float]:
    """Run every step now; returns the seconds each took (-1 where it failed)."""
    # In the order first calls need them: listing and describing, search, then queries (a worker
    # process of its own, which competes least for the CPU once the rest is done).
    steps: dict[str, Callable[[], object]] = {
        "iceberg_catalog": runtime.warehouse.dataset_names,
        "query_encoder": lambda: get_query_embedder(runtime.warehouse.models_dir),
        "catalog_search": lambda: _catalog_search(runtime),
        "query_worker": runtime.warehouse.query_engine(runtime.settings.query).warm,
    }
    took: dict[str, float] = {}
    for name, step in steps.items():
        started = time.perf_counter()
        try:
            step()
            took[name] = round(time.perf_counter() - started, 3)
        except Exception as exc:  # the first call that needs it does it again, and reports the error
            log.warning("warm_up.step_failed", step=name, error=f"{type(exc).__name__}: {exc}")
            took[name] = -1.0
    log.info("warm_up.done", **took)
    return took


def start_warm_up(runtime: Runtime) -> threading.Thread:
    """Warm up in a daemon thread (it never keeps the process alive)."""
    thread = threading.Thread(target=warm_up, args=(runtime,), name="lakegate-warm-up", daemon=True)
    thread.start()
    return thread
