"""A governed query as the SQL guard builds it, once, and what each engine renders of it.

`rewrite` (policies/sql_guard.py) turns an agent's query into one sqlglot tree in which every
governed table is a subquery over its governed scan: visible columns, masks, row filters. Nothing in
the tree belongs to one engine: each table the scans read is a placeholder (`lakegate_source_` and
random hex, per call) and each mask a call of a per-call function name (`masks` says which method).
An engine renders the tree it is handed:

- DuckDB (catalog/query_engine.py) runs `sql`, the tree in DuckDB's dialect, which is the text the
  guard checked; its query worker maps each placeholder to a relation of the planned files and each
  mask name to its macro.
- Spark (policies/spark_sql.py, `to_spark`) names each placeholder's temporary view and each mask's
  session function in a copy of the tree, and writes that in Spark's dialect; what sqlglot cannot
  write for Spark is refused, never dropped.

So the rewrite happens once and no engine edits another engine's SQL text.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property

from sqlglot import exp

__all__ = ["GovernedSql"]

#: The dialect agents write and the guard reads.
DUCKDB = "duckdb"
PAGE_ALIAS = "lakegate_page"


@dataclass(frozen=True)
class GovernedSql:
    """The rewritten query: its checked tree, and the method of each mask function it calls.

    The tree is never changed after it was checked: `page` and the renderers work on copies.
    """

    tree: exp.Query
    masks: Mapping[str, str] = field(default_factory=dict)  # function name, lower case -> mask method

    @cached_property
    def sql(self) -> str:
        """The query in DuckDB's dialect, without comments."""
        return self.tree.sql(DUCKDB, comments=False)

    def page(self, offset: int, count: int) -> GovernedSql:
        """The query limited to `count` rows starting at row `offset`."""
        inner = exp.Subquery(this=self.tree.copy(), alias=exp.TableAlias(this=exp.to_identifier(PAGE_ALIAS)))
        # One copy of the tree (above): the builder's own copies of the select are not needed.
        wrapped = exp.select("*").from_(inner, copy=False).limit(int(count), copy=False).offset(int(offset), copy=False)
        return GovernedSql(wrapped, self.masks)
