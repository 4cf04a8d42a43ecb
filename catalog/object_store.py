"""S3-compatible object storage for the data files: where they live and how each library reaches them.

With ``storage.backend = "s3"`` the Iceberg data and metadata files are written under one
``s3://bucket/prefix`` and the Lance datasets under another, so that replicas on different hosts
share them. Three libraries talk to the store, each configured here from the same settings:

- pyiceberg (catalog properties for its PyArrowFileIO): table metadata, manifests, appends;
- pyarrow's S3FileSystem: the governed SQL path reads the planned data files through it
  (catalog/arrow_scan.py), since DuckDB's httpfs extension is not available to the sandbox;
- lancedb (storage options of its object_store client): the Lance datasets.

The secret key is kept out of every repr; the option dictionaries built here carry it, so they are
handed to the libraries and never logged.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from lakegate.errors import BackendError, ConfigurationError

if TYPE_CHECKING:
    from pyarrow.fs import S3FileSystem

    from lakegate.catalog.settings import StorageSettings

__all__ = ["ObjectStore"]


@dataclass(frozen=True)
class ObjectStore:
    """The S3 locations of the Iceberg warehouse and of the Lance datasets, and the credentials."""

    iceberg_location: str  # s3://bucket/prefix, no trailing slash
    lance_location: str
    endpoint: str | None = None  # scheme://host[:port]; None: AWS S3 of the region
    region: str = "us-east-1"
    access_key_id: str | None = None
    secret_access_key: str | None = field(default=None, repr=False)
    path_style: bool = True

    @classmethod
    def from_settings(cls, settings: StorageSettings) -> ObjectStore | None:
        """The object store the settings name, or None when the data files stay local.

        Raises:
            ConfigurationError: the endpoint is not an http:// or https:// URL.
        """
        if settings.backend == "local":
            return None
        endpoint = settings.endpoint.rstrip("/") if settings.endpoint else None
        if endpoint is not None:
            parts = urlsplit(endpoint)
            if parts.scheme not in ("http", "https") or not parts.netloc or parts.path:
                raise ConfigurationError(
                    f"LAKEGATE_STORAGE__ENDPOINT {endpoint!r} must be a URL such as http://minio:9000 (no path)"
                )
        secret = settings.secret_access_key.get_secret_value() if settings.secret_access_key else None
        return cls(
            iceberg_location=settings.iceberg_location,
            lance_location=settings.lance_location,
            endpoint=endpoint,
            region=settings.region,
            access_key_id=settings.access_key_id,
            secret_access_key=secret,
            path_style=settings.path_style,
        )

    @property
    def _scheme(self) -> str:
        return urlsplit(self.endpoint).scheme if self.endpoint else "https"

    def iceberg_properties(self) -> dict[str, str]:
        """pyiceberg catalog properties: its PyArrowFileIO reads and writes the store with them."""
        properties = {
            "py-io-impl": "pyiceberg.io.pyarrow.PyArrowFileIO",
            "s3.region": self.region,
            "s3.force-virtual-addressing": "false" if self.path_style else "true",
        }
        if self.endpoint:
            properties["s3.endpoint"] = self.endpoint
        if self.access_key_id and self.secret_access_key:
            properties["s3.access-key-id"] = self.access_key_id
            properties["s3.secret-access-key"] = self.secret_access_key
        return properties

    def lance_storage_options(self) -> dict[str, str]:
        """lancedb storage options (its object_store client's AWS settings)."""
        options = {
            "aws_region": self.region,
            "aws_virtual_hosted_style_request": "false" if self.path_style else "true",
        }
        if self.endpoint:
            options["aws_endpoint"] = self.endpoint
            if self._scheme == "http":
                options["allow_http"] = "true"
        if self.access_key_id and self.secret_access_key:
            options["aws_access_key_id"] = self.access_key_id
            options["aws_secret_access_key"] = self.secret_access_key
        return options

    @functools.cached_property
    def filesystem(self) -> S3FileSystem:
        """pyarrow's S3 file system for this store (one per store: it pools its connections).

        Raises:
            BackendError: pyarrow cannot create the S3 client.
        """
        from pyarrow.fs import S3FileSystem

        options: dict[str, object] = {"region": self.region, "force_virtual_addressing": not self.path_style}
        if self.endpoint:
            options["endpoint_override"] = urlsplit(self.endpoint).netloc
            options["scheme"] = self._scheme
        if self.access_key_id and self.secret_access_key:
            options["access_key"] = self.access_key_id
            options["secret_key"] = self.secret_access_key
        try:
            return S3FileSystem(**options)
        except Exception as exc:
            raise BackendError(f"cannot create the S3 client for {self.endpoint or 'AWS S3'}: {exc}") from exc

    def in_warehouse(self, uri: str) -> bool:
        """Whether `uri` lies under the Iceberg location (s3:// or s3a:// spellings)."""
        scheme, sep, rest = uri.partition("://")
        return bool(sep) and scheme in ("s3", "s3a", "s3n") and f"s3://{rest}".startswith(self.iceberg_location + "/")

    @staticmethod
    def path_of(uri: str) -> str:
        """The "bucket/key" path pyarrow's S3FileSystem takes for an s3:// URI."""
        return uri.partition("://")[2]
