"""Catalog tools: what data exists, what it means, and what this caller may see of it."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal, overload

import structlog
from pydantic import Field

from lakegate.catalog.catalog_search import STARTING_UP_NOTE, CatalogEntry, rank_entries
from lakegate.errors import ConfigurationError, SourceUnavailable
from lakegate.tools.base import Page, PageArgs, SnapshotId, ToolArgs, ToolResult, ToolSpec, paginate
from lakegate.tools.names import ToolName
from lakegate.tools.scope import ToolScope

if TYPE_CHECKING:
    from lakegate.catalog.definitions import DatasetDoc
    from lakegate.catalog.metric_definitions import Metric
    from lakegate.catalog.warehouse import DatasetInfo

log = structlog.get_logger(__name__)

__all__ = ["CATALOG_TOOLS"]

DatasetKind = Literal["iceberg", "lance"]


# --- list_datasets ------------------------------------------------------------------------------


class ListDatasetsArgs(PageArgs):
    namespace: str | None = Field(
        default=None, max_length=128, description="Only datasets in this namespace, e.g. 'sales'."
    )


class DatasetSummary(ToolResult):
    name: str = Field(description="Dataset name, 'namespace.table'.")
    kind: DatasetKind
    description: str
    owner: str
    tags: list[str]
    row_count: int
    last_updated: datetime | None


class DatasetList(Page):
    datasets: list[DatasetSummary]


def list_datasets(scope: ToolScope, args: ListDatasetsArgs) -> DatasetList:
    names = scope.readable_datasets()
    if args.namespace:
        names = [name for name in names if name.split(".", 1)[0] == args.namespace]
    page, truncated, cursor = paginate(_Summaries(scope, names), args, scope)
    return DatasetList(datasets=page, truncated=truncated, next_cursor=cursor)


class _Summaries(Sequence[DatasetSummary]):
    """The summaries of `names`, each read from the catalog only when its page is cut: an attached
    catalog may hold thousands of tables, and a page shows a few."""

    def __init__(self, scope: ToolScope, names: list[str]) -> None:
        self._scope = scope
        self._names = names

    def __len__(self) -> int:
        return len(self._names)

    @overload
    def __getitem__(self, index: int) -> DatasetSummary: ...

    @overload
    def __getitem__(self, index: slice) -> Sequence[DatasetSummary]: ...

    def __getitem__(self, index: int | slice) -> DatasetSummary | Sequence[DatasetSummary]:
        if isinstance(index, slice):
            return [self._summary(name) for name in self._names[index]]
        return self._summary(self._names[index])

    def _summary(self, name: str) -> DatasetSummary:
        try:
            info, doc = self._scope.dataset(name)
        except SourceUnavailable as exc:  # one broken table upstream must not break the listing
            log.warning("list_datasets.dataset_unavailable", dataset=name, error=str(exc))
            return DatasetSummary(
                name=name,
                kind=_kind(self._scope, name),
                description="(cannot be read right now: its catalog or files cannot be reached)",
                owner="",
                tags=[],
                row_count=0,
                last_updated=None,
            )
        return DatasetSummary(
            name=name,
            kind=info.kind,
            description=doc.description if doc else info.properties.get("comment", ""),
            owner=doc.owner if doc else info.properties.get("owner", ""),
            tags=list(doc.tags) if doc else [],
            row_count=info.row_count,
            last_updated=info.last_updated,
        )


def render_dataset_list(result: DatasetList) -> str:
    lines = [f"{len(result.datasets)} dataset(s):"]
    for d in result.datasets:
        updated = d.last_updated.strftime("%Y-%m-%d") if d.last_updated else "never"
        tags = f" [{', '.join(d.tags)}]" if d.tags else ""
        lines.append(f"- {d.name} ({d.kind}, {d.row_count:,} rows, updated {updated}){tags}: {d.description}")
    if result.truncated:
        lines.append(f"More datasets: call again with cursor={result.next_cursor}")
    return "\n".join(lines)


# --- describe_dataset ---------------------------------------------------------------------------


class DescribeDatasetArgs(ToolArgs):
    name: str = Field(min_length=1, max_length=256, description="Dataset name, 'namespace.table'.")
    versions: int = Field(default=5, ge=0, le=100, description="How many recent snapshots/versions to list.")


class ColumnView(ToolResult):
    name: str
    type: str | None = Field(description="Column type; null when the column is hidden from you.")
    required: bool | None = None
    description: str | None = None
    tags: list[str] = Field(default_factory=list)
    access: Literal["clear", "masked", "hidden"] = Field(
        description="clear: you read real values; masked: you read masked values; hidden: you may not read it."
    )
    mask: str | None = Field(default=None, description="Masking method when access is masked.")


class VersionView(ToolResult):
    id: SnapshotId = Field(description="Iceberg snapshot id or Lance version number.")
    timestamp: datetime
    operation: str


class DatasetDescription(ToolResult):
    name: str
    kind: DatasetKind
    description: str
    owner: str
    tags: list[str]
    columns: list[ColumnView]
    partitioning: list[str]
    row_count: int
    last_updated: datetime | None
    freshness_hours: float | None = Field(description="Hours since the last update.")
    current_version: SnapshotId | None
    versions: list[VersionView] = Field(description="Most recent snapshots/versions, newest first.")


def describe_dataset(scope: ToolScope, args: DescribeDatasetArgs) -> DatasetDescription:
    info, doc = scope.dataset(args.name)
    names = [column.name for column in info.columns]
    columns = []
    for column, access in zip(info.columns, scope.columns(args.name, names), strict=True):
        column_doc = doc.column(column.name) if doc else None
        scope.record("column", access.column, access.access if access.access != "clear" else "metadata")
        if access.access == "hidden":
            columns.append(ColumnView(name=column.name, type=None, access="hidden"))
            continue
        columns.append(
            ColumnView(
                name=column.name,
                type=column.type,
                required=column.required,
                description=column_doc.description if column_doc else column.doc,
                tags=list(column_doc.tags) if column_doc else [],
                access=access.access,
                mask=access.mask,
            )
        )
    age = None
    if info.last_updated is not None:
        age = round((datetime.now(UTC) - info.last_updated).total_seconds() / 3600, 2)
    scope.rows += len(columns)
    return DatasetDescription(
        name=info.name,
        kind=info.kind,
        description=doc.description if doc else info.properties.get("comment", ""),
        owner=doc.owner if doc else info.properties.get("owner", ""),
        tags=list(doc.tags) if doc else [],
        columns=columns,
        partitioning=list(info.partitioning),
        row_count=info.row_count,
        last_updated=info.last_updated,
        freshness_hours=age,
        current_version=info.current_version,
        versions=[VersionView(id=v.id, timestamp=v.timestamp, operation=v.operation) for v in info.versions][
            : args.versions
        ],
    )


def render_description(result: DatasetDescription) -> str:
    lines = [
        f"{result.name} ({result.kind}, {result.row_count:,} rows, owner {result.owner}): {result.description}",
    ]
    if result.partitioning:
        lines.append(f"Partitioned by: {', '.join(result.partitioning)}")
    lines.append("Columns:")
    for c in result.columns:
        if c.access == "hidden":
            lines.append(f"- {c.name}: hidden from you by policy")
            continue
        flags = [c.type or ""]
        if c.tags:
            flags.append(", ".join(c.tags))
        if c.access == "masked":
            flags.append(f"masked: {c.mask}")
        lines.append(f"- {c.name} ({'; '.join(flags)}): {c.description or ''}".rstrip(": "))
    if result.versions:
        latest = result.versions[0]
        lines.append(
            f"Current version {result.current_version}, last {latest.operation} at {latest.timestamp:%Y-%m-%d %H:%M}Z"
            f" ({len(result.versions)} recent listed)."
        )
    return "\n".join(lines)


# --- search_catalog -----------------------------------------------------------------------------


class SearchCatalogArgs(PageArgs):
    query: str = Field(
        min_length=1, max_length=500, description="Words or a question, e.g. 'customer email' or 'money we made'."
    )
    limit: int = Field(default=10, ge=1, le=100, description="Most matches to return in this page.")


class CatalogMatch(ToolResult):
    kind: Literal["dataset", "column", "metric"]
    dataset: str | None = None
    column: str | None = None
    metric: str | None = None
    description: str
    tags: list[str]
    score: float = Field(description="Higher is better: word and meaning rankings, fused by rank.")


class CatalogMatches(Page):
    matches: list[CatalogMatch]
    note: str | None = Field(default=None, description="How this answer differs from a usual one, if it does.")


Candidate = tuple[CatalogMatch, CatalogEntry]


def dataset_candidates(
    name: str, info: DatasetInfo, doc: DatasetDoc | None, visible: Collection[str]
) -> list[Candidate]:
    """A dataset and its `visible` columns as matches-to-be and the entries search ranks."""
    description = doc.description if doc else ""
    tags = list(doc.tags) if doc else []
    found: list[Candidate] = [
        (
            CatalogMatch(kind="dataset", dataset=name, description=description, tags=tags, score=0),
            CatalogEntry(name, description, tuple(tags)),
        )
    ]
    for column in info.columns:
        if column.name not in visible:
            continue
        column_doc = doc.column(column.name) if doc else None
        text = column_doc.description if column_doc else (column.doc or "")
        column_tags = list(column_doc.tags) if column_doc else []
        match = CatalogMatch(
            kind="column", dataset=name, column=column.name, description=text, tags=column_tags, score=0
        )
        found.append((match, CatalogEntry(column.name, text, tuple(column_tags))))
    return found


def metric_candidate(name: str, metric: Metric) -> Candidate:
    synonyms = tuple(metric.synonyms)
    match = CatalogMatch(kind="metric", metric=name, description=metric.description, tags=list(synonyms), score=0)
    return match, CatalogEntry(name, metric.description, synonyms)


def _kind(scope: ToolScope, name: str) -> DatasetKind:
    """Which store holds `name`, from the names alone (for a dataset that cannot be read now)."""
    return "lance" if scope.dataset_kind(name) == "lance" else "iceberg"


def _candidates(scope: ToolScope) -> list[Candidate]:
    """Everything the caller may read, as matches-to-be and the entries search ranks."""
    found: list[Candidate] = []
    for name in scope.readable_datasets():
        try:
            info, doc = scope.dataset(name)
        except SourceUnavailable as exc:  # one broken table upstream must not break the search
            log.warning("catalog_search.dataset_unavailable", dataset=name, error=str(exc))
            continue
        names = [column.name for column in info.columns]
        visible = {c for c, access in zip(names, scope.columns(name, names), strict=True) if access.visible}
        found += dataset_candidates(name, info, doc, visible)
    semantic = scope.semantic
    found += [
        metric_candidate(name, semantic.metric(name)) for name in semantic.metric_names() if scope.may_read_metric(name)
    ]
    return found


#: Said with a search ranked by words alone: the model is not ready yet, or not there at all.
NO_MODEL_NOTE = "ranked by words only: this server has no embedding model to match by meaning"


def search_catalog(scope: ToolScope, args: SearchCatalogArgs) -> CatalogMatches:
    candidates = _candidates(scope)
    note = None
    try:
        # Just after start-up the warm-up may still be building the model's graph (seconds on a
        # state directory without one): rank by words now rather than keep the agent waiting.
        encoder = scope.text_encoder_if_ready()
    except ConfigurationError as exc:  # no model: words still work, and the log says why
        log.warning("catalog_search_words_only", error=str(exc))
        encoder, note = None, NO_MODEL_NOTE
    if encoder is None:
        model, embed, embed_query = "", None, None
        note = note or STARTING_UP_NOTE
    else:
        model, embed, embed_query = encoder.model_hash, encoder.embed, encoder.embed_query
    ranked = rank_entries(
        args.query, [entry for _, entry in candidates], model=model, embed=embed, embed_query=embed_query
    )
    matches = [candidates[i][0].model_copy(update={"score": round(score, 5)}) for i, score in ranked]
    page, truncated, cursor = paginate(matches, args, scope)
    return CatalogMatches(matches=page, truncated=truncated, next_cursor=cursor, note=note)


def render_matches(result: CatalogMatches) -> str:
    if not result.matches:
        return "No datasets or columns match. Try other words, or call list_datasets." + (
            f" ({result.note})" if result.note else ""
        )
    lines = [f"{len(result.matches)} match(es){f' ({result.note})' if result.note else ''}:"]
    for m in result.matches:
        where = m.metric or (f"{m.dataset}.{m.column}" if m.column else m.dataset)
        tags = f" [{', '.join(m.tags)}]" if m.tags else ""
        lines.append(f"- {m.kind} {where}{tags}: {m.description}")
    if result.truncated:
        lines.append(f"More matches: call again with cursor={result.next_cursor}")
    return "\n".join(lines)


CATALOG_TOOLS: tuple[ToolSpec[Any, Any], ...] = (
    ToolSpec(
        name=ToolName.LIST_DATASETS,
        title="List datasets",
        args=ListDatasetsArgs,
        result=DatasetList,
        handler=list_datasets,
        render=render_dataset_list,
        read_only=True,
        destructive=False,
        idempotent=True,
        family="catalog",
    ),
    ToolSpec(
        name=ToolName.DESCRIBE_DATASET,
        title="Describe a dataset",
        args=DescribeDatasetArgs,
        result=DatasetDescription,
        handler=describe_dataset,
        render=render_description,
        read_only=True,
        destructive=False,
        idempotent=True,
        family="catalog",
    ),
    ToolSpec(
        name=ToolName.SEARCH_CATALOG,
        title="Search the catalog",
        args=SearchCatalogArgs,
        result=CatalogMatches,
        handler=search_catalog,
        render=render_matches,
        read_only=True,
        destructive=False,
        idempotent=True,
        family="catalog",
    ),
)
