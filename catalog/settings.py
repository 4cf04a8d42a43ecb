"""The settings of lakegate's storage and query components, defined beside them.

server/settings.py composes them into the one `Settings` object (environment `LAKEGATE_QUERY__*`,
`LAKEGATE_WRITES__*`, `LAKEGATE_STORAGE__*`), and hands each component the part it needs.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from lakegate.catalog.vector_index import INDEX_MIN_ROWS

__all__ = [
    "CatalogSettings",
    "DocumentSettings",
    "PassageColumns",
    "QuerySettings",
    "SparkSettings",
    "StorageSettings",
    "WriteSettings",
    "parse_bytes",
]

_BYTE_UNITS = {"": 1, "B": 1, "KB": 1000, "MB": 1000**2, "GB": 1000**3, "TB": 1000**4,
               "KIB": 1024, "MIB": 1024**2, "GIB": 1024**3, "TIB": 1024**4}  # fmt: skip


def parse_bytes(text: str) -> int:
    """Bytes in "4GB", "512MiB" or "1000000" (DuckDB's spelling of sizes: GB is 1000^3, GiB 1024^3).

    Raises:
        ValueError: not a number with an optional unit.
    """
    spelled = text.strip().upper().replace(" ", "")
    number = spelled.rstrip("KMGTIB")
    unit = spelled[len(number) :]
    if unit not in _BYTE_UNITS:
        raise ValueError(f"{text!r} is not a size: use bytes, or a number with KB, MB, GB, KiB, MiB or GiB")
    try:
        return int(float(number) * _BYTE_UNITS[unit])
    except ValueError:
        raise ValueError(f"{text!r} is not a size: use bytes, or a number with KB, MB, GB, KiB, MiB or GiB") from None


class SparkSettings(BaseModel):
    """Where governed queries may run on Apache Spark, through Spark Connect (catalog/spark_engine.py)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    remote: str | None = Field(
        default=None,
        description="Spark Connect endpoint, e.g. sc://127.0.0.1:15002 (Spark's Python client allows a "
        "plain connection to localhost only: put a TLS proxy in front of a remote server and add ;use_ssl=true). "
        "Null: every query runs on DuckDB.",
    )
    token_env: str = Field(
        default="LAKEGATE_SPARK_TOKEN",
        description="Environment variable that holds the Spark Connect server's token (never printed).",
    )
    token_file: str | None = Field(
        default=None,
        description="File that holds the token instead (`lakegate spark start` writes <home>/spark/token).",
    )
    datasets: list[str] = Field(
        default_factory=list,
        description="Datasets whose queries always run on Spark: names or patterns (sales.*, lake.*.*).",
    )
    min_scan_bytes: str | None = Field(
        default=None,
        description="A query whose planned scan reads at least this much (the Iceberg plan's column bytes, "
        "before it runs) runs on Spark, e.g. 10GB. Null: only the datasets above do.",
    )
    sessions: int = Field(default=4, ge=1, description="Spark Connect sessions kept open: queries that run at once.")

    @field_validator("min_scan_bytes")
    @classmethod
    def _check_size(cls, value: str | None) -> str | None:
        if value is not None:
            parse_bytes(value)
        return value

    def runs(self, datasets: list[str], scan_bytes: int, *, local: bool = True) -> bool:
        """Whether a query of `datasets` that reads `scan_bytes` runs on Spark. A query of tables on
        object storage (not `local`) goes there only when its datasets are named: this build's Spark
        engine reads local files only, and a scan-size rule should not turn large queries into errors."""
        from fnmatch import fnmatchcase

        if self.remote is None:
            return False
        if any(fnmatchcase(name.lower(), pattern.lower()) for name in datasets for pattern in self.datasets):
            return True
        return local and self.min_scan_bytes is not None and scan_bytes >= parse_bytes(self.min_scan_bytes)


class QuerySettings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    timeout_s: float = Field(
        default=30.0, gt=0, description="Longest a governed SQL query may run before it is interrupted."
    )
    memory_limit: str = Field(
        default="1GB", description="DuckDB memory limit of one query (each query runs in its own sandbox)."
    )
    threads: int = Field(default=2, ge=1, description="DuckDB worker threads per query.")
    spill_limit: str = Field(
        default="2GB",
        description="Most disk one query may spill to when it outgrows its memory (under <home>/spill).",
    )
    concurrency: int = Field(
        default=4,
        ge=1,
        description="Queries that run at once, each in a worker process of its own; further "
        "queries wait for a free worker.",
    )
    worker_memory_limit: str | None = Field(
        default="3GB",
        description="Operating-system limit on the memory of one query worker process (its data segment, "
        "RLIMIT_DATA), DuckDB and Python together: a query that outgrows it is stopped with a clear error "
        "and the server keeps serving. Must leave room above memory_limit. Null: no limit.",
    )
    max_sql_chars: int = Field(default=20_000, ge=100, description="Longest SQL text accepted by the query tool.")
    cache_bytes: str = Field(
        default="256MB",
        description="Table data each query worker keeps decoded in memory, so that a small table read again "
        "is not read from its files again (a table is kept when its planned files are at most a quarter of "
        "this). Counts within worker_memory_limit. 0: nothing is kept.",
    )
    spark: SparkSettings = Field(
        default_factory=SparkSettings,
        description="Apache Spark for queries too big for one machine (off unless remote is set).",
    )

    @field_validator("worker_memory_limit", "cache_bytes")
    @classmethod
    def _check_size(cls, value: str | None) -> str | None:
        if value is not None:
            parse_bytes(value)
        return value


class WriteSettings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    max_rows: int = Field(default=10_000, ge=1, description="Most rows one append_rows call may write.")
    commit_attempts: int = Field(
        default=20,
        ge=1,
        description="How often lakegate retries an Iceberg commit that lost a race with another writer.",
    )
    vector_index_min_rows: int = Field(
        default=INDEX_MIN_ROWS,
        ge=256,
        description="add_documents builds a dataset's vector index once it holds more passages than this; "
        "below it, exact search is fast enough.",
    )


class StorageSettings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    backend: Literal["local", "s3"] = Field(
        default="local",
        description="Where the Iceberg data and metadata files and the Lance datasets live: local (under the "
        "state directory) or s3 (S3-compatible object storage, shared by replicas on different hosts).",
    )
    endpoint: str | None = Field(
        default=None,
        description="S3 endpoint URL, e.g. http://minio:9000 (http:// allows plain HTTP). Default: AWS S3 of "
        "the region.",
    )
    region: str = Field(default="us-east-1", min_length=1, description="S3 region of the buckets.")
    iceberg_location: str = Field(
        default="s3://warehouse/lakegate",
        description="s3://bucket/prefix under which the Iceberg data and metadata files are written; the "
        "only place governed SQL reads from.",
    )
    lance_location: str = Field(
        default="s3://lance/lakegate",
        description="s3://bucket/prefix holding one Lance dataset per namespace.table.",
    )
    access_key_id: str | None = Field(
        default=None,
        description="S3 access key id. Default: the AWS default chain (AWS_ACCESS_KEY_ID, profiles, instance role).",
    )
    secret_access_key: SecretStr | None = Field(
        default=None, description="S3 secret access key, with access_key_id; never printed."
    )
    path_style: bool = Field(
        default=True,
        description="Path-style requests (endpoint/bucket/key), which MinIO, SeaweedFS and Ceph need; false "
        "for virtual-hosted style (bucket.endpoint/key).",
    )

    @field_validator("iceberg_location", "lance_location")
    @classmethod
    def _s3_location(cls, value: str) -> str:
        bucket = value.removeprefix("s3://").split("/", 1)[0]
        if not value.startswith("s3://") or not bucket:
            raise ValueError(f"{value!r} is not an S3 location: use s3://bucket/prefix")
        return value.rstrip("/")

    @model_validator(mode="after")
    def _keys_in_pairs(self) -> StorageSettings:
        if (self.access_key_id is None) != (self.secret_access_key is None):
            raise ValueError("set both storage.access_key_id and storage.secret_access_key, or neither")
        return self


#: Property names that hold credentials: lakegate.toml may only name an environment variable for
#: them (`${NAME}`), so that no secret is written in a project file or shown with the settings.
_SECRET_PROPERTY = re.compile(
    r"secret|password|token|credential|session|key|connection-string|authorization|^header\.|json", re.IGNORECASE
)
#: Headers that carry no secret, written as plain values: how the catalog shares storage access
#: (vended-credentials, the default, or remote-signing).
_PLAIN_HEADERS = frozenset({"header.x-iceberg-access-delegation"})
_REFERENCE = re.compile(r"^\$\{[A-Za-z_][A-Za-z0-9_]*\}$")
#: A URI with a password in it (scheme://user:password@host).
_URI_PASSWORD = re.compile(r"://[^/@:]*:[^/@]*@")


def _check_secret_references(values: dict[str, str], noun: str) -> None:
    """Refuse a credential written as a value rather than as `${NAME}` (the message never holds it).

    Raises:
        ValueError: a credential's key with a literal value, or a URI with a literal password.
    """
    for key, text in values.items():
        if _SECRET_PROPERTY.search(key) and key.lower() not in _PLAIN_HEADERS and not _REFERENCE.match(text):
            raise ValueError(
                f"{noun} {key!r} holds a credential: write it as ${{NAME}} and set the environment variable NAME"
            )
        if _URI_PASSWORD.search(text) and "${" not in text:
            raise ValueError(
                f"{noun} {key!r} holds a password in a URI: write it as ${{NAME}} (scheme://user:${{NAME}}@host) "
                "and set the environment variable NAME"
            )


class CatalogSettings(BaseModel):
    """An Iceberg catalog lakegate did not create, attached as `[catalogs.NAME]` (see
    catalog/attached_catalogs.py): its tables are the datasets NAME.<namespace>.<table>."""

    # A refused value is never echoed in the error: it may be a credential.
    model_config = ConfigDict(frozen=True, extra="forbid", hide_input_in_errors=True)

    properties: dict[str, str] = Field(
        description="pyiceberg's catalog properties, passed to load_catalog as they are: type (rest, sql, glue, "
        "hive, ...), uri, warehouse, credentials, s3.* ... A value may name an environment variable as ${NAME}; "
        "credentials (any key, secret, password, token, credential, session, connection string, authorization "
        "header or JSON, and a password in a URI) must.",
    )
    catalog_name: str | None = Field(
        default=None,
        description="The catalog's own name where it differs from the name it is attached as: a SQL catalog "
        "keeps its tables under the name it was created with.",
    )
    writable: bool = Field(default=False, description="Whether lakegate may write to the catalog's tables.")
    refresh_s: float = Field(default=60.0, gt=0, description="How long a listing of the catalog's tables is kept.")
    table_refresh_s: float = Field(
        default=5.0, ge=0, description="How long a loaded table is kept before its metadata is read again."
    )

    @field_validator("properties")
    @classmethod
    def _secrets_from_the_environment(cls, value: dict[str, str]) -> dict[str, str]:
        _check_secret_references(value, "property")
        if "type" not in value and "uri" not in value:
            raise ValueError("give the catalog's type (rest, sql, glue, hive, ...) or uri, as pyiceberg expects")
        return value


#: A column an attached dataset of documents names (lancedb filters quote it with backticks).
_COLUMN_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")


class PassageColumns(BaseModel):
    """Which column of an attached Lance dataset holds each part of a passage."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    text: str = Field(description="The passage text: what full-text search reads and the agent gets back.")
    doc_id: str = Field(description="The document a passage belongs to (several passages may share one).")
    vector: str | None = Field(
        default=None, description="The passage's embedding (fixed-size list of floats); none: full-text search only."
    )
    title: str | None = Field(default=None, description="The document's title.")
    source: str | None = Field(default=None, description="Where the document came from (URL or path).")
    chunk_index: str | None = Field(default=None, description="The passage's position in its document (integer).")
    classification: str | None = Field(
        default=None,
        description="Each passage's classification (public, internal, confidential, restricted; any other "
        "value is readable by nobody). Without it, `classification` labels every passage.",
    )
    allowed_roles: str | None = Field(
        default=None,
        description="The roles that may read each passage (list of strings). Without it the dataset is governed "
        "by its dataset and classification rules only.",
    )

    @field_validator("*")
    @classmethod
    def _plain_name(cls, value: str | None) -> str | None:
        if value is not None and not _COLUMN_NAME.match(value):
            raise ValueError(f"column {value!r}: use the column's plain name (letters, digits and _)")
        return value


class DocumentSettings(BaseModel):
    """A Lance dataset of documents lakegate did not create, attached as `[documents."NS.NAME"]` for
    search_documents (see catalog/attached_documents.py). Read-only: add_documents refuses it."""

    model_config = ConfigDict(frozen=True, extra="forbid", hide_input_in_errors=True)

    uri: str = Field(
        description="The Lance dataset: an absolute directory path (`/srv/lance/handbook.lance`) or "
        "s3://bucket/prefix. It may not lie in lakegate's own state directory or object store."
    )
    time_travel: bool = Field(
        default=False,
        description="Whether search_documents may read the dataset's earlier versions (under today's labels). "
        "Off by default: the dataset's owner, not lakegate, decides how long old versions are kept.",
    )
    storage_options: dict[str, str] = Field(
        default_factory=dict,
        description="Lance's storage options for an s3:// uri (aws_endpoint, aws_region, allow_http, ...); "
        "credentials must name an environment variable as ${NAME}.",
    )
    columns: PassageColumns = Field(description="Which column holds each part of a passage.")
    classification: Literal["public", "internal", "confidential", "restricted"] | None = Field(
        default=None, description="The classification of every passage, for a dataset without a classification column."
    )
    embedding_model: str | None = Field(
        default=None,
        description="The sentence-transformers model the vectors were made with, by its full name "
        "(sentence-transformers/all-MiniLM-L6-v2). Vector search is refused unless it is the model lakegate runs.",
    )
    embedding_model_sha256: str | None = Field(
        default=None, description="The SHA-256 of that model's weights, where known: checked as well as the name."
    )
    description: str | None = Field(default=None, description="What the dataset holds, for list_datasets.")

    @field_validator("storage_options")
    @classmethod
    def _secrets_from_the_environment(cls, value: dict[str, str]) -> dict[str, str]:
        _check_secret_references(value, "storage option")
        return value

    @field_validator("uri")
    @classmethod
    def _plain_location(cls, value: str) -> str:
        if value.startswith("s3://"):
            parts = value.removeprefix("s3://").rstrip("/").split("/")
            if len(parts) < 2 or any(part in ("", ".", "..") or "%" in part for part in parts):
                raise ValueError(
                    f"{value!r}: write an s3 uri as s3://bucket/prefix, without empty, '.' or '..' parts or %"
                )
            return value.rstrip("/")
        if "://" in value or value.startswith(("~", "file:")) or not value.startswith("/"):
            raise ValueError(f"{value!r}: use an absolute local path (/srv/lance/docs.lance) or s3://bucket/prefix")
        return value

    @model_validator(mode="after")
    def _one_classification(self) -> DocumentSettings:
        if (self.classification is None) == (self.columns.classification is None):
            raise ValueError(
                "name the classification column (columns.classification) or give one classification for every "
                'passage (classification = "internal"), not both'
            )
        if self.columns.vector is not None and self.embedding_model is None:
            raise ValueError(
                "columns.vector needs embedding_model: the model the vectors were made with (vector search compares "
                "them with queries embedded by lakegate's model)"
            )
        return self
