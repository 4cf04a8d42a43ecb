"""What the gate's query path needs of an engine that runs governed SQL.

Two engines implement it: the DuckDB sandbox in lakegate's own worker processes
(catalog/query_engine.py, the default) and Apache Spark through Spark Connect
(catalog/spark_engine.py, for queries routed there by `[query.spark]`). Both receive the same
`GovernedSql` (the guard's rewritten tree: a placeholder per table, the call's mask function names),
render it in their own dialect, read one `TableSource` per placeholder, and answer an
`EngineResult` with their own account of what they read.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

from lakegate.catalog.arrow_relations import TableSource
from lakegate.catalog.query_engine import EngineResult, OnCancel, OnProgress
from lakegate.policies.governed_sql import GovernedSql

__all__ = ["SqlEngine"]


class SqlEngine(Protocol):
    """An engine that runs one governed statement at a time per call (see QueryEngine.run_page)."""

    @property
    def name(self) -> str:
        """duckdb or spark: what the answer and the audit record say ran the query."""
        ...

    def run_page(
        self,
        statement: GovernedSql,
        sources: Mapping[str, TableSource],
        on_cancel: OnCancel | None = None,
        on_progress: OnProgress | None = None,
        max_bytes: int | None = None,
    ) -> EngineResult: ...

    def explain(self, statement: GovernedSql, sources: Mapping[str, TableSource]) -> str: ...

    def warm(self) -> None: ...

    def close(self) -> None: ...
