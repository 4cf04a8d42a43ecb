"""What a tool may do: the small protocol tool handlers are written against.

A handler receives one object satisfying `ToolScope` and nothing else: no engine, no transport, no
audit log. The gate's call scope (lakegate.server.gate.scope.ToolScope) satisfies it; every method
takes the policy decision first and notes what the call touched for the audit record. Declaring
the protocol here keeps tools/ free of the server: a tool can only use what is listed below.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from lakegate.catalog.definitions import DatasetDoc
    from lakegate.catalog.document_search import DocumentSearch, SearchMode
    from lakegate.catalog.iceberg_writes import AppendOutcome, RestoreOutcome
    from lakegate.catalog.ingest import Document, IngestOutcome
    from lakegate.catalog.metric_definitions import SavedQuery, SemanticCatalog
    from lakegate.catalog.metric_query import CompiledQuery, MetricQuery
    from lakegate.catalog.query_embedder import TextEncoder
    from lakegate.catalog.staged_changes import StagedChange
    from lakegate.catalog.warehouse import DatasetInfo
    from lakegate.policies.columns import ColumnAccess
    from lakegate.policies.enforcer import Decision
    from lakegate.policies.explain import SubjectPolicy
    from lakegate.tools.settings import LimitSettings

__all__ = ["Caller", "QueryPage", "ToolScope"]


@dataclass(frozen=True)
class QueryPage:
    """One page of a governed query's result (or its plan, for explain)."""

    columns: list[tuple[str, str]]  # (name, type)
    rows: list[list[Any]]  # JSON-ready values
    offset: int
    more: bool  # rows exist past this page
    snapshots: dict[str, int | None]  # table -> snapshot id read
    rewritten_sql: str
    masked: dict[str, str]  # "table.column" -> mask method, for the columns the query read
    row_filters: dict[str, list[str]]  # table -> predicates applied
    ordered: bool
    plan: str | None = None
    engine: str = "duckdb"  # which engine ran it: duckdb or spark


class Caller(Protocol):
    """Who is calling, as a tool may know it."""

    @property
    def name(self) -> str: ...


class ToolScope(Protocol):
    """Authorised access to lakegate's data for one call by one principal (see the module docstring).

    Methods raise lakegate.errors client errors (PolicyDenied, NotFound, InvalidArgument,
    LimitExceeded) for what the caller did, and server errors for lakegate's own failures.
    """

    rows: int  # rows the call returned or wrote, for the audit record
    details: dict[str, Any]  # call-specific facts for the audit record

    @property
    def principal(self) -> Caller: ...

    @property
    def limits(self) -> LimitSettings: ...

    @property
    def semantic(self) -> SemanticCatalog: ...

    def decide(self, obj: str, action: str) -> Decision: ...

    def text_encoder(self) -> TextEncoder: ...

    def dataset_kind(self, name: str) -> str: ...

    def text_encoder_if_ready(self) -> TextEncoder | None: ...

    def columns(
        self, dataset: str, names: list[str], field_ids: Mapping[str, int] | None = None
    ) -> list[ColumnAccess]: ...

    def policy_for(self, principal: str | None = None) -> SubjectPolicy: ...

    def record(self, kind: str, name: str, access: str, version: int | None = None) -> None: ...

    def readable_datasets(self) -> list[str]: ...

    def require_dataset(self, name: str) -> None: ...

    def dataset(self, name: str) -> tuple[DatasetInfo, DatasetDoc | None]: ...

    def query(
        self, sql: str, *, as_of: Mapping[str, int | datetime], offset: int, count: int, explain: bool = False
    ) -> QueryPage: ...

    def may_read_metric(self, name: str) -> bool: ...

    def require_metric(self, name: str) -> None: ...

    def saved_queries(self) -> list[SavedQuery]: ...

    def saved_query(self, name: str) -> SavedQuery: ...

    def compile_metrics(self, query: MetricQuery) -> CompiledQuery: ...

    def append_rows(self, name: str, rows: Sequence[Mapping[str, Any]]) -> AppendOutcome | StagedChange: ...

    def change(self, change_id: str) -> StagedChange: ...

    def restore_table(self, name: str, snapshot_id: int) -> RestoreOutcome | StagedChange: ...

    def search_documents(
        self,
        name: str,
        query: str,
        *,
        mode: SearchMode,
        k: int,
        classifications: Sequence[str] | None = None,
        source: str | None = None,
        title_contains: str | None = None,
        version: int | None = None,
    ) -> DocumentSearch: ...

    def add_documents(
        self, name: str, documents: Sequence[Document], *, chunk_size: int, overlap: int
    ) -> IngestOutcome: ...
