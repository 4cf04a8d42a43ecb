"""Iceberg catalogs lakegate did not create, attached by name in lakegate.toml.

    [catalogs.lake]
    writable = false
    catalog_name = "prod"                 # its own name, where it differs (a SQL catalog's)
    [catalogs.lake.properties]            # pyiceberg's own catalog properties, passed through
    type = "rest"
    uri = "https://iceberg.example.com"
    "s3.access-key-id" = "${LAKE_S3_KEY}" # ${NAME}: read from the environment when attached

Naming: a table of an attached catalog is the dataset `<catalog>.<namespace>.<table>`, with a
nested namespace's levels joined by dots (`lake.sales.emea.orders`). The embedded catalog's tables
keep their two-part `namespace.table` names, so the number of parts says which catalog a name is
in. The same name is used in list_datasets, the policy files (`p, role:analyst, lake.sales.*,
read, allow`), datasets.yaml, metrics and the audit record; in SQL it is `lake.sales.orders`
(DuckDB's catalog.schema.table), a nested namespace quoted as one part: `lake."sales.emea".orders`.

Discovery: every table the catalog lists is a dataset (denied until policy grants it). The listing
walks the namespaces and is kept for `refresh_s`; `refresh()` lists again at once. A loaded table is
kept for `table_refresh_s`, so that a table another engine commits to is seen within that time, and
a table that is dropped or changes its schema is picked up without a restart.

Secrets: properties may name environment variables (`${NAME}`); their values are read when the
catalog is attached and never appear in a message, a log line or the settings.
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlparse

import structlog

from lakegate.catalog.sealed_file_io import seal
from lakegate.catalog.vended_credentials import VendedCredentials, expiring, s3_filesystem, vended_credentials
from lakegate.errors import BackendError, ConfigurationError, NotFound, SourceUnavailable

if TYPE_CHECKING:
    from pyarrow.fs import FileSystem
    from pyiceberg.catalog import Catalog
    from pyiceberg.table import Table as IcebergTable

log = structlog.get_logger(__name__)

__all__ = ["AttachedCatalog", "CatalogSpec", "expand_secrets", "location_under", "normal_location"]

#: A catalog's name: one plain identifier (it is the first part of its datasets' names).
CATALOG_NAME = re.compile(r"^[a-z][a-z0-9_]{0,62}$")
#: A namespace level or table name lakegate serves: plain identifiers (others are skipped, logged).
_PART = re.compile(r"^[a-z_][a-z0-9_]*$")
#: Namespace levels walked at most (REST catalogs nest namespaces).
MAX_NAMESPACE_DEPTH = 8
#: A name not in the listing lists the catalog again only when the listing is at least this old.
MIN_RELIST_S = 1.0
_SECRET = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def expand_secrets(catalog: str, properties: Mapping[str, str], *, section: str | None = None) -> dict[str, str]:
    """`properties` with each `${NAME}` replaced by the environment variable NAME; `section` is
    where lakegate.toml names them (default: the catalog's properties).

    Raises:
        ConfigurationError: a variable is not set (the message names it, never a value).
    """

    def value(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in os.environ:
            where = section or f"catalog {catalog}: lakegate.toml names it in the catalog's properties"
            raise ConfigurationError(f"environment variable {name} is not set ({where})")
        return os.environ[name]

    return {key: _SECRET.sub(value, text) for key, text in properties.items()}


@dataclass(frozen=True)
class CatalogSpec:
    """An attached catalog as configured (properties still hold `${NAME}` references)."""

    name: str
    properties: Mapping[str, str]
    writable: bool = False
    catalog_name: str | None = None  # the catalog's own name, where it is not `name`
    refresh_s: float = 60.0
    table_refresh_s: float = 5.0


@dataclass
class _Listing:
    names: dict[str, tuple[str, ...]] = field(default_factory=dict)  # dataset name -> identifier
    at: float = float("-inf")
    skipped: tuple[str, ...] = ()  # identifiers listed but not served (not plain identifiers)


class AttachedCatalog:
    """One attached catalog: its pyiceberg catalog (opened on first use), its discovered tables and
    the file system its data files are read through."""

    def __init__(self, spec: CatalogSpec, *, clock: Callable[[], float] = time.monotonic) -> None:
        if not CATALOG_NAME.match(spec.name):
            raise ConfigurationError(
                f"catalog name {spec.name!r} is not a plain lower-case identifier (it starts every dataset name "
                "of the catalog)"
            )
        self.spec = spec
        self._clock = clock
        self._catalog: Catalog | None = None
        self._properties: dict[str, str] | None = None
        self._listing = _Listing()
        self._tables: dict[str, tuple[float, IcebergTable, float]] = {}  # (clock, table, time.time()) at load
        self._vended: dict[str, tuple[str, VendedCredentials]] = {}  # dataset -> (table uuid, held credentials)
        self._lock = threading.Lock()

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def properties(self) -> dict[str, str]:
        """The catalog's properties with their secrets read from the environment.

        Raises:
            ConfigurationError: a secret's environment variable is not set.
        """
        if self._properties is None:
            self._properties = expand_secrets(self.name, self.spec.properties)
        return self._properties

    @property
    def catalog(self) -> Catalog:
        """The pyiceberg catalog (loaded on first use).

        Raises:
            ConfigurationError: a secret is missing, or pyiceberg rejects the properties.
        """
        with self._lock:
            if self._catalog is None:
                from pyiceberg.catalog import load_catalog

                try:
                    self._catalog = seal(load_catalog(self.spec.catalog_name or self.name, **self.properties))
                except ConfigurationError:
                    raise
                except Exception as exc:
                    raise ConfigurationError(
                        f"catalog {self.name}: pyiceberg cannot open it ({type(exc).__name__}); check its type, uri "
                        "and credentials in lakegate.toml"
                    ) from exc
            return self._catalog

    # -- discovery -----------------------------------------------------------------------------

    def table_names(self) -> list[str]:
        """The dataset names of the catalog's tables (listed at most every `refresh_s`).

        Raises:
            BackendError: the catalog cannot be listed (and was never listed before).
        """
        return sorted(self.listed())

    def listed(self) -> Mapping[str, tuple[str, ...]]:
        """The listing (dataset name -> identifier), listed again when older than `refresh_s`.

        Raises:
            BackendError: the catalog cannot be listed (and was never listed before).
        """
        with self._lock:
            if self._clock() - self._listing.at < self.spec.refresh_s:
                return self._listing.names
        self.refresh()
        with self._lock:
            return self._listing.names

    def refresh(self) -> list[str]:
        """List the catalog's tables now.

        Raises:
            BackendError: the catalog cannot be listed and was never listed before (a later failure
                keeps the last listing, and says so in the log). Either way it is tried again after
                `refresh_s`, not on every call: a catalog that is down must not slow every listing.
        """
        try:
            names, skipped = self._walk()
        except Exception as exc:
            with self._lock:
                self._listing.at = self._clock()
                if self._listing.names:
                    log.warning("catalog.refresh_failed", catalog=self.name, error=type(exc).__name__)
                    return sorted(self._listing.names)
            raise BackendError(f"cannot list the tables of catalog {self.name}: {type(exc).__name__}") from exc
        with self._lock:
            self._listing = _Listing(names, self._clock(), skipped)
            for gone in set(self._tables) - set(names):
                del self._tables[gone]
                self._vended.pop(gone, None)
        return sorted(names)

    def expire(self) -> None:
        """Forget when the catalog was listed and which tables were loaded: the next call that needs
        them lists and loads again (a refresh asked for on demand)."""
        with self._lock:
            self._listing.at = float("-inf")
            self._tables.clear()
            self._vended.clear()

    def _walk(self) -> tuple[dict[str, tuple[str, ...]], tuple[str, ...]]:
        catalog = self.catalog
        found: dict[str, tuple[str, ...]] = {}
        skipped: list[str] = []
        pending: list[tuple[str, ...]] = [()]
        seen: set[tuple[str, ...]] = set()
        while pending:
            parent = pending.pop()
            for listed in catalog.list_namespaces(parent):
                namespace = tuple(listed)
                if namespace in seen or len(namespace) <= len(parent) or namespace[: len(parent)] != parent:
                    continue  # listed before, or not below the parent (some catalogs list every namespace)
                seen.add(namespace)
                if len(namespace) < MAX_NAMESPACE_DEPTH:
                    pending.append(namespace)
                for identifier in catalog.list_tables(namespace):
                    identifier = tuple(identifier)
                    name = self.dataset_name(identifier)
                    if name is None:
                        log.warning("catalog.table_skipped", catalog=self.name, reason="not plain identifiers")
                        skipped.append(".".join(identifier))
                        continue
                    found.setdefault(name, identifier)
        return found, tuple(skipped)

    def skipped(self) -> tuple[str, ...]:
        """What the last listing found but does not serve: identifiers that are not plain names."""
        with self._lock:
            return self._listing.skipped

    def dataset_name(self, identifier: tuple[str, ...]) -> str | None:
        """`<catalog>.<namespace levels>.<table>` for an identifier, or None when a part is not a
        plain identifier lakegate can serve."""
        parts = [part.lower() for part in identifier]
        if len(parts) < 2 or not all(_PART.match(part) for part in parts):
            return None
        return ".".join([self.name, *parts])

    def identifier(self, name: str) -> tuple[str, ...]:
        """The catalog's identifier of dataset `name`.

        Raises:
            NotFound: the catalog lists no such table (after listing again if it was not known).
        """
        with self._lock:
            known = self._listing.names.get(name)
            # A name not listed may be a table created since: list again, but at most once every
            # MIN_RELIST_S, so that asking for made-up names cannot make lakegate walk the catalog.
            stale = self._clock() - self._listing.at >= MIN_RELIST_S
        if known is None and stale:
            try:
                self.refresh()
            except (BackendError, ConfigurationError) as exc:
                raise SourceUnavailable(str(exc), table=name, catalog=self.name) from exc
            with self._lock:
                known = self._listing.names.get(name)
        if known is None:
            raise _not_found(name)
        return known

    def load_table(self, name: str) -> IcebergTable:
        """Table `name`, loaded again when the last load is older than `table_refresh_s` or the
        credentials the catalog vended with it are due to be replaced.

        Raises:
            NotFound: no such table.
            BackendError: its metadata cannot be read.
        """
        now = self._clock()
        with self._lock:
            cached = self._tables.get(name)
        if (
            cached is not None
            and now - cached[0] < self.spec.table_refresh_s
            and not expiring(cached[1], self.properties, received_at=cached[2])
        ):
            return cached[1]
        identifier = self.identifier(name)
        from pyiceberg.exceptions import NoSuchTableError

        try:
            catalog = self.catalog
        except ConfigurationError as exc:
            raise SourceUnavailable(str(exc), table=name, catalog=self.name) from exc
        try:
            table = catalog.load_table(identifier)
        except NoSuchTableError as exc:
            with self._lock:
                self._tables.pop(name, None)
                self._listing.names.pop(name, None)
            raise _not_found(name) from exc
        except Exception as exc:
            detail = f"cannot load table {name} from catalog {self.name}: {type(exc).__name__}: {exc}"
            raise SourceUnavailable(detail, table=name, catalog=self.name) from exc
        with self._lock:
            self._tables[name] = (now, table, time.time())
        return table

    # -- reading files -------------------------------------------------------------------------

    def vended(self, name: str, table: IcebergTable) -> VendedCredentials | None:
        """The credentials the catalog vended for reading table `name` (loaded as `table`), or None
        where it vends none (the files are read with the catalog's own s3.* properties).

        The credentials held for the table are kept until they are due to be replaced, though each
        load may bring new ones (catalog/vended_credentials.py says why); a table dropped and created
        again under the same name gets its own.
        """
        with self._lock:
            loaded = self._tables.get(name)
        # Credentials date from the load that brought them (a table may be kept for table_refresh_s).
        received_at = loaded[2] if loaded is not None and loaded[1] is table else time.time()
        fresh = vended_credentials(table, self.properties, received_at=received_at)
        uuid = str(table.metadata.table_uuid)
        with self._lock:
            if fresh is None:
                self._vended.pop(name, None)
                return None
            held = self._vended.get(name)
            if held is not None and held[0] == uuid and time.time() < held[1].usable_until:
                return held[1]
            self._vended[name] = (uuid, fresh)
            return fresh

    @property
    def reads_s3(self) -> bool:
        """Whether the catalog's own properties say how to reach S3 (without vended credentials)."""
        properties = self.properties
        return any(key.startswith("s3.") for key in properties) or _is_s3(properties.get("warehouse"))

    @property
    def files_root(self) -> str | None:
        """Where every data file of the catalog must lie: its `warehouse`, when that is a location.
        None where it is not (a REST catalog's may name a warehouse of the catalog, as Polaris's
        does) or is not set: then each table's files are read only with the credentials the catalog
        vends for that table (the catalog decides what they reach), never with lakegate's own."""
        warehouse = self.properties.get("warehouse") or ""
        return warehouse if "://" in warehouse or warehouse.startswith("/") else None

    def file_path(self, location: str, table_location: str, *, forbidden: Sequence[str]) -> str:
        """Where the worker reads data file `location` of one of this catalog's tables: "bucket/key"
        on the catalog's S3, or a local path.

        Whoever commits to an attached catalog decides which files its tables name, and where the
        tables are: so a file is read only when it lies under the catalog's `files_root`, or, without
        one, on S3 under the table's location (read with the credentials vended for the table alone:
        the scan planner refuses a read without them), and never in lakegate's own storage
        (`forbidden`: its state directory and object store locations), whose files hold other
        tables under other policies.

        Raises:
            BackendError: the file lies outside those places (the log names it, the agent never does).
        """
        normal = normal_location(location)
        root = self.files_root
        if root is None:
            within = normal_location(table_location)
            allowed = normal is not None and _is_s3(normal) and location_under(normal, within)
        else:
            allowed = normal is not None and location_under(normal, normal_location(root))
        if not allowed or any(location_under(normal, normal_location(place)) for place in forbidden):
            raise BackendError(
                f"a file of catalog {self.name} (data, manifest or manifest list) lies outside its warehouse "
                f"({root or table_location}) or in lakegate's own storage: {location}"
            )
        assert normal is not None
        return normal.partition("://")[2] if normal.startswith("s3://") else normal

    @property
    def filesystem(self) -> FileSystem:
        """The file system the catalog's data files are read through: S3 with the catalog's s3.*
        properties, or the local one.

        Raises:
            BackendError: pyarrow cannot create the S3 client.
        """
        if not self.reads_s3:
            from pyarrow.fs import LocalFileSystem

            return LocalFileSystem()
        return s3_filesystem(self.name, self.properties)


def _not_found(name: str) -> NotFound:
    return NotFound(f"No dataset named {name!r}.", hint="Call list_datasets to see the datasets you can use.")


def _is_s3(location: str | None) -> bool:
    return str(location or "").startswith(("s3://", "s3a://", "s3n://"))


def normal_location(location: str | None) -> str | None:
    """ "s3://bucket/key" for an object store location, an absolute path with every link resolved
    for a local one; None for what cannot be compared safely (other schemes, dot segments)."""
    if not location:
        return None
    scheme, sep, rest = location.partition("://")
    if sep and scheme in ("s3", "s3a", "s3n"):
        if "/../" in f"/{rest}/" or "/./" in f"/{rest}/":
            return None
        return "s3://" + rest
    if sep and scheme != "file":
        return None
    path = unquote(urlparse(location).path) if sep else location
    return os.path.realpath(path)


def location_under(path: str | None, root: str | None) -> bool:
    if path is None or root is None:
        return False
    root = root.rstrip("/")
    return path == root or path.startswith(root + "/")
