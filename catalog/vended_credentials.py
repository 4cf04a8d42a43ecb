"""Short-lived S3 credentials that an Iceberg REST catalog vends for one table, and S3 file systems.

A REST catalog asked for `X-Iceberg-Access-Delegation: vended-credentials` (pyiceberg asks by
default) may answer a table load with S3 credentials that reach only that table's files, in the
load result's `config` or `storage-credentials`; pyiceberg merges them into the table's FileIO
properties and plans scans with them. lakegate's query workers read each call's planned files
themselves, so the credentials travel with the call's scan (`TableSource.vended`), and a worker
opens one S3 file system per set of credentials.

Trust: the files are read with the FileIO properties the scan is planned with: the catalog's answer
(credentials, endpoint, region) over lakegate.toml's. A table's own properties are never used, since
whoever may commit to the table sets them (catalog/sealed_file_io.py keeps them out of pyiceberg's
FileIO too).

Held: a catalog may mint new credentials on every load (SeaweedFS does, and lakegate loads a table
again every `table_refresh_s`). The same credentials are used until RENEW_BEFORE_S before they
expire, or for UNDATED_HOLD_S where the catalog does not say when, so that a worker's cache of file
footers, kept per file system, is not thrown away on every load.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from lakegate.errors import BackendError

if TYPE_CHECKING:
    from pyarrow.fs import FileSystem
    from pyiceberg.table import Table as IcebergTable

__all__ = ["RENEW_BEFORE_S", "UNDATED_HOLD_S", "VendedCredentials", "expiring", "s3_filesystem", "vended_credentials"]

#: Credentials are replaced by fresher ones this long before they expire: longer than any query runs.
RENEW_BEFORE_S = 300.0
#: Credentials whose expiry the catalog does not give are held this long (AWS STS vends 15 min at least).
UNDATED_HOLD_S = 300.0
#: FileIO properties that make up the credentials; all three must come from the catalog's answer.
CREDENTIAL_KEYS = ("s3.access-key-id", "s3.secret-access-key", "s3.session-token")
EXPIRES_KEY = "s3.session-token-expires-at-ms"
#: Where the files are: the catalog's answer, else lakegate.toml's value.
PLACE_KEYS = ("s3.endpoint", "s3.region", "client.region", "s3.path-style-access", "s3.force-virtual-addressing")
#: What is taken from the catalog's answer to a table load.
ANSWER_KEYS = (*CREDENTIAL_KEYS, EXPIRES_KEY, *PLACE_KEYS)


@dataclass(frozen=True)
class VendedCredentials:
    """Credentials a catalog vended for one table, with the S3 properties to reach its files."""

    properties: tuple[tuple[str, str], ...] = field(repr=False)  # s3.* FileIO properties
    expires_at: float | None  # seconds since the epoch; None: the catalog did not say
    received_at: float

    @property
    def key(self) -> str:
        """A name for these credentials that does not reveal them (a worker's file systems are kept by it)."""
        return hashlib.sha256(repr(sorted(self.properties)).encode()).hexdigest()[:16]

    @property
    def usable_until(self) -> float:
        """When they stop being handed to queries (seconds since the epoch)."""
        if self.expires_at is None:
            return self.received_at + UNDATED_HOLD_S
        return self.expires_at - RENEW_BEFORE_S

    def filesystem(self, catalog: str) -> FileSystem:
        """An S3 file system that reads with these credentials.

        Raises:
            BackendError: pyarrow cannot create the S3 client.
        """
        return s3_filesystem(catalog, dict(self.properties))


def vended_credentials(table: IcebergTable, own: Mapping[str, str], *, received_at: float) -> VendedCredentials | None:
    """The credentials the catalog vended with `table`, or None where it vended none (its files are
    then read with the catalog's own properties). `own` is the catalog's configured properties;
    `received_at` when the table was loaded (seconds since the epoch)."""
    # An attached catalog's tables carry its load answer as `config` (catalog/sealed_file_io.py).
    answer = {key: value for key in ANSWER_KEYS if (value := table.config.get(key)) is not None}
    if any(key not in answer for key in CREDENTIAL_KEYS):
        return None
    expires = answer.pop(EXPIRES_KEY, None)
    expires_at = int(expires) / 1000 if expires is not None and expires.isdigit() else None
    properties = {key: own[key] for key in PLACE_KEYS if own.get(key)} | answer
    return VendedCredentials(tuple(sorted(properties.items())), expires_at, received_at)


def expiring(table: IcebergTable, own: Mapping[str, str], *, received_at: float) -> bool:
    """Whether the credentials vended with `table` (loaded at `received_at`) are due to be replaced:
    the table is to be loaded again for fresh ones."""
    vended = vended_credentials(table, own, received_at=received_at)
    return vended is not None and time.time() >= vended.usable_until


def s3_filesystem(catalog: str, properties: Mapping[str, str]) -> FileSystem:
    """pyarrow's S3 file system for pyiceberg's FileIO properties: s3.*, falling back to the client.*
    ones that pyiceberg's own FileIO falls back to (the keys that also sign a REST catalog's calls).

    Raises:
        BackendError: pyarrow cannot create the S3 client.
    """
    from urllib.parse import urlsplit

    from pyarrow.fs import S3FileSystem

    def first(name: str) -> str | None:
        return properties.get(f"s3.{name}") or properties.get(f"client.{name}")

    options: dict[str, Any] = {"region": first("region") or "us-east-1"}
    if endpoint := properties.get("s3.endpoint"):
        parts = urlsplit(endpoint)
        options["endpoint_override"] = parts.netloc or endpoint
        options["scheme"] = parts.scheme or "https"
    virtual = properties.get("s3.force-virtual-addressing", "false").lower() == "true"
    options["force_virtual_addressing"] = virtual or properties.get("s3.path-style-access", "").lower() == "false"
    key, secret = first("access-key-id"), first("secret-access-key")
    if key and secret:
        options["access_key"], options["secret_key"] = key, secret
        if token := first("session-token"):
            options["session_token"] = token
    try:
        return S3FileSystem(**options)
    except Exception as exc:
        raise BackendError(f"cannot create the S3 client for catalog {catalog}: {type(exc).__name__}") from exc
