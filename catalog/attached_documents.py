"""Lance datasets of documents lakegate did not create, attached by name in lakegate.toml.

    [documents."handbook.pages"]
    uri = "/srv/lance/handbook.lance"            # a directory, or s3://bucket/prefix/handbook.lance
    classification = "internal"                  # every passage's label; or name columns.classification
    embedding_model = "sentence-transformers/all-MiniLM-L6-v2"
    [documents."handbook.pages".columns]         # which column holds each part of a passage
    text = "body"
    doc_id = "page_id"
    vector = "embedding"
    title = "heading"
    [documents."handbook.pages".storage_options] # Lance's own options, for an s3:// uri
    aws_access_key_id = "${HANDBOOK_S3_KEY}"     # ${NAME}: read from the environment when opened

The dataset is served to search_documents and describe_dataset under its configured name, a
two-part `namespace.name` like lakegate's own datasets, so policy rules, datasets.yaml and the audit
record name it the same way. It is read-only: add_documents refuses it. Policy is applied as for
lakegate's own datasets (catalog/document_search.py): the dataset rule, then one rule per
classification, then the passage's allowed roles; a dataset without a roles column is governed by
its dataset and classification rules alone. Vector search is refused unless the configured model
is the one lakegate embeds queries with.

A name an embedded dataset already has is not served (the embedded one is), and a uri inside
lakegate's own state directory or object store is refused: an attachment must not become a second,
differently governed way into data lakegate already governs.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog

from lakegate.catalog.attached_catalogs import expand_secrets, location_under, normal_location
from lakegate.catalog.document_search import PassageLayout
from lakegate.errors import ConfigurationError, SourceUnavailable

if TYPE_CHECKING:
    import pyarrow as pa
    from lancedb.db import LanceDBConnection
    from lancedb.table import Table as LanceTable

__all__ = ["AttachedDocuments", "DocumentSpec", "layout_problems"]

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class DocumentSpec:
    """An attached dataset of documents as configured (storage options still hold `${NAME}`)."""

    name: str
    uri: str
    layout: PassageLayout
    storage_options: Mapping[str, str]
    description: str | None = None


def layout_problems(schema: pa.Schema, layout: PassageLayout, dimension: int) -> list[str]:
    """What in `schema` does not fit `layout`: missing columns and columns of the wrong type, each
    named (empty when it fits). `dimension` is the length of the vectors of lakegate's model."""
    import pyarrow as pa

    def is_text(kind: pa.DataType) -> bool:
        return bool(pa.types.is_string(kind) or pa.types.is_large_string(kind))

    def is_roles(kind: pa.DataType) -> bool:
        lists = pa.types.is_list(kind) or pa.types.is_large_list(kind)
        return bool(lists and is_text(kind.value_type))

    def is_vector(kind: pa.DataType) -> bool:
        return bool(pa.types.is_fixed_size_list(kind) and pa.types.is_floating(kind.value_type))

    checks = (
        ("text", layout.text, is_text, "a string column"),
        ("doc_id", layout.doc_id, lambda _kind: True, "any column"),
        ("title", layout.title, is_text, "a string column"),
        ("source", layout.source, is_text, "a string column"),
        ("chunk_index", layout.chunk_index, pa.types.is_integer, "an integer column"),
        ("classification", layout.classification, is_text, "a string column"),
        ("allowed_roles", layout.allowed_roles, is_roles, "a list of strings"),
        ("vector", layout.vector, is_vector, "a fixed-size list of floats"),
    )
    problems = []
    for part, column, fits, wanted in checks:
        if column is None:
            continue
        index = schema.get_field_index(column)
        if index < 0:
            problems.append(f"columns.{part} names {column!r}, which the dataset does not have")
        elif not fits(schema.field(index).type):
            problems.append(f"columns.{part}: {column!r} is {schema.field(index).type}, not {wanted}")
    if layout.vector is not None and (index := schema.get_field_index(layout.vector)) >= 0:
        kind = schema.field(index).type
        if is_vector(kind) and kind.list_size != dimension:
            problems.append(
                f"columns.vector: {layout.vector!r} holds vectors of {kind.list_size} numbers, and queries are "
                f"embedded as {dimension}"
            )
    return problems


class AttachedDocuments:
    """One attached Lance dataset: opened fresh for every call (a version checkout must never
    affect another call), its layout checked against its schema each time (an upstream schema
    change is seen at once)."""

    def __init__(self, spec: DocumentSpec, *, dimension: int) -> None:
        self.spec = spec
        self._dimension = dimension
        self._connection: LanceDBConnection | None = None
        self._lock = threading.Lock()

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def layout(self) -> PassageLayout:
        return self.spec.layout

    def open(self, *, forbidden: Sequence[str]) -> LanceTable:
        """The dataset, checked against its layout.

        `forbidden` are the places the uri may not lie in (lakegate's own files).

        Raises:
            SourceUnavailable: the uri is forbidden, its secrets are not set, the dataset cannot be
                opened, or its columns do not fit the configured layout (the log has the details;
                the caller is told to ask the platform team).
        """
        from lancedb.table import LanceTable

        normal = normal_location(self.spec.uri)
        if normal is None or any(location_under(normal, normal_location(place)) for place in forbidden):
            raise self._unavailable("its uri is not a local path or s3:// location outside lakegate's own files")
        try:
            connection = self._connect()
            table: LanceTable = LanceTable.open(
                connection, self.name, location=self.spec.uri, storage_options=self._storage_options()
            )
        except ConfigurationError as exc:
            raise self._unavailable(str(exc)) from exc
        except Exception as exc:
            raise self._unavailable(f"cannot open it: {type(exc).__name__}: {exc}") from exc
        problems = layout_problems(table.schema, self.layout, self._dimension)
        if problems:
            raise self._unavailable("; ".join(problems))
        return table

    def _storage_options(self) -> dict[str, str]:
        section = f'lakegate.toml names it in [documents."{self.name}".storage_options]'
        return expand_secrets(self.name, self.spec.storage_options, section=section)

    def _connect(self) -> LanceDBConnection:
        """A connection to lancedb that the dataset is opened through by its location (the
        connection's own directory is never read: tables are opened by explicit location)."""
        import lancedb
        from lancedb.db import LanceDBConnection

        with self._lock:
            if self._connection is None:
                parent = self.spec.uri.rstrip("/").rpartition("/")[0] or "."
                connection: Any = lancedb.connect(parent, storage_options=self._storage_options())
                if not isinstance(connection, LanceDBConnection):
                    raise TypeError(f"lancedb opened {parent} as {type(connection).__name__}")
                self._connection = connection
            return self._connection

    def _unavailable(self, detail: str) -> SourceUnavailable:
        message = f"attached documents {self.name}: {detail}"
        log.warning("documents.unavailable", dataset=self.name, error=message)
        return SourceUnavailable(message, table=self.name)
