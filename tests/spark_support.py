"""A real local Spark cluster for the tests that run governed queries on Spark (issue 19).

Started once per test run by `lakegate spark start`'s own code (catalog/spark_cluster.py): a master,
one worker and a Spark Connect server on loopback, about 20-60 s and 2-3 GB. Every Spark test is in
the xdist group "spark", so one pytest worker runs them all against this one cluster.

Skipped where pyspark or Java is missing, unless LAKEGATE_TEST_SPARK is set (.ci/run sets it):
then the tests must run, and a cluster that cannot start fails them.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from lakegate.catalog.spark_cluster import ClusterInfo, LocalSparkCluster, free_port, spark_home
from lakegate.errors import LakegateError

__all__ = ["spark_cluster_or_skip", "spark_query_settings"]


def spark_cluster_or_skip(directory: Path) -> Iterator[ClusterInfo]:
    required = bool(os.environ.get("LAKEGATE_TEST_SPARK"))
    try:
        spark_home()
    except LakegateError as exc:
        if required:
            raise
        pytest.skip(f"no local Spark: {exc}")
    cluster = LocalSparkCluster(directory)

    info = cluster.start(workers=1, worker_memory="1g", port=free_port())
    try:
        yield info
    finally:
        cluster.stop()


def spark_query_settings(info: ClusterInfo, **spark: object) -> dict[str, object]:
    """The `query` settings that route queries to the test cluster (every dataset, unless `spark` says),
    with a time limit that a loaded 2-core machine does not reach (the running totals' range joins
    take about 14 s alone, and twice that beside another test worker)."""
    settings = {"remote": info.remote, "token_file": info.token_file, "datasets": ["*"], **spark}
    return {"timeout_s": 120, "spark": settings}
