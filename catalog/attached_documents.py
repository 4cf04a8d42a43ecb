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
differently governed way into data lakegate already governs. So the uri is one plain form (an
absolute path, opened with its links resolved, or s3://bucket/key), and a local dataset must be
self-contained (no link inside it, no data files of another dataset: a shallow clone). Earlier
versions are readable only with `time_travel = true`. A dataset that cannot be opened is tried
again after RETRY_S, and S3 reads give up after a timeout.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
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

#: A dataset that could not be opened is tried again after this long, not on every call (a store
#: that does not answer must not hold every listing and search up).
RETRY_S = 60.0
#: Lance's object-store client settings unless storage_options give them: give up on a store that
#: does not answer (about 30 s to open, measured against a socket that never replies) instead of
#: waiting without end.
_S3_DEFAULTS = {"connect_timeout": "2s", "timeout": "5s", "client_max_retries": "1", "client_retry_timeout": "5"}


@dataclass(frozen=True)
class DocumentSpec:
    """An attached dataset of documents as configured (storage options still hold `${NAME}`)."""

    name: str
    uri: str  # an absolute path or s3://bucket/key (catalog/settings.py checks its shape)
    layout: PassageLayout
    storage_options: Mapping[str, str]
    description: str | None = None
    time_travel: bool = False  # whether earlier versions may be read


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
        ("doc_id", layout.doc_id, is_text, "a string column"),
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

    def __init__(self, spec: DocumentSpec, *, dimension: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.spec = spec
        self._dimension = dimension
        self._clock = clock
        self._connection: LanceDBConnection | None = None
        self._lock = threading.Lock()
        self._failed: tuple[float, str] | None = None  # when an open last failed, and why
        self._contained_version: int | None = None  # the last version whose files were checked

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
        with self._lock:
            failed = self._failed
            if failed is not None:
                if self._clock() - failed[0] < RETRY_S:
                    raise self._unavailable(failed[1], logged=False)
                # This call tries again; calls meanwhile get the last failure at once, not a wait.
                self._failed = (self._clock(), failed[1])
        try:
            table = self._open(forbidden)
        except SourceUnavailable as exc:
            with self._lock:
                self._failed = (self._clock(), str(exc).removeprefix(f"attached documents {self.name}: "))
            raise
        with self._lock:
            self._failed = None
        return table

    def _open(self, forbidden: Sequence[str]) -> LanceTable:
        from lancedb.table import LanceTable

        # The one location lakegate opens, and checks: an absolute path with its links resolved, or
        # s3://bucket/key as configured (its shape checked in the settings). Lance is handed this
        # form, never the configured text, so that what is checked is what is read.
        location = self.spec.uri if self.spec.uri.startswith("s3://") else os.path.realpath(self.spec.uri)
        normal = normal_location(location)
        if normal is None or any(location_under(normal, normal_location(place)) for place in forbidden):
            raise self._unavailable("its uri lies in lakegate's own files, or is not an absolute path or s3:// uri")
        try:
            connection = self._connect(location)
            table: LanceTable = LanceTable.open(
                connection, self.name, location=location, storage_options=self._storage_options()
            )
        except ConfigurationError as exc:
            raise self._unavailable(str(exc)) from exc
        except Exception as exc:
            raise self._unavailable(f"cannot open it: {type(exc).__name__}: {exc}") from exc
        problems = layout_problems(table.schema, self.layout, self._dimension)
        if problems:
            raise self._unavailable("; ".join(problems))
        if not location.startswith("s3://"):
            self._check_contained(table, location)
        return table

    def _check_contained(self, table: LanceTable, location: str) -> None:
        """Refuse a local dataset that reads files outside its own directory: a link inside it, or
        more data files in its manifest than its data/ directory holds (a shallow clone of another
        dataset). Checked once per version.

        Raises:
            SourceUnavailable: it is not self-contained.
        """
        version = int(table.version)
        with self._lock:
            if self._contained_version == version:
                return
        for root, directories, files in os.walk(location):
            for entry in [*directories, *files]:
                if os.path.islink(os.path.join(root, entry)):
                    raise self._unavailable("its directory holds a link; lakegate reads only a self-contained dataset")
        current = next((v for v in table.list_versions() if int(v["version"]) == version), None)
        referenced = int(((current or {}).get("metadata") or {}).get("total_data_files", 0))
        held = sum(
            1 for _, _, files in os.walk(os.path.join(location, "data")) for name in files if name.endswith(".lance")
        )
        if referenced > held:
            raise self._unavailable(
                f"its manifest names {referenced} data files and its data directory holds {held}: a shallow clone "
                "reads another dataset's files; lakegate reads only a self-contained dataset"
            )
        with self._lock:
            self._contained_version = version

    def _storage_options(self) -> dict[str, str]:
        section = f'lakegate.toml names it in [documents."{self.name}".storage_options]'
        options = expand_secrets(self.name, self.spec.storage_options, section=section)
        if self.spec.uri.startswith("s3://"):
            options = {**_S3_DEFAULTS, **options}
        return options

    def _connect(self, location: str) -> LanceDBConnection:
        """A connection to lancedb that the dataset is opened through by its location (the
        connection's own directory is never read: tables are opened by explicit location)."""
        import lancedb
        from lancedb.db import LanceDBConnection

        with self._lock:
            if self._connection is None:
                parent = location.rstrip("/").rpartition("/")[0] or "/"
                connection: Any = lancedb.connect(parent, storage_options=self._storage_options())
                if not isinstance(connection, LanceDBConnection):
                    raise TypeError(f"lancedb opened {parent} as {type(connection).__name__}")
                self._connection = connection
            return self._connection

    def _unavailable(self, detail: str, *, logged: bool = True) -> SourceUnavailable:
        message = f"attached documents {self.name}: {detail}"
        if logged:
            log.warning("documents.unavailable", dataset=self.name, error=message)
        return SourceUnavailable(message, table=self.name)
