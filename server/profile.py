"""The deployment profile: where the Iceberg catalog, the Casbin rules and the audit trail live.

One setting chooses (``profile``, `LAKEGATE_PROFILE`):

- ``embedded`` (the default): everything under the state directory: the SQLite SqlCatalog, the
  policy.csv file (hot-reloaded), the JSON-lines audit log. Nothing to run.
- ``production``: what every replica must agree on lives in PostgreSQL (``postgres.url``): the
  Iceberg catalog (pyiceberg SqlCatalog over psycopg), the Casbin rules (policies/pg_policies.py:
  a change reaches every replica within 2 s) and one global audit hash chain, written beside each
  replica's local file (server/audit_pg.py).

The data files follow ``storage`` in either profile: under the state directory (``local``, the
default: ``<home>/iceberg/warehouse`` and ``<home>/lance``, shared by replicas only through one
volume), or on S3-compatible object storage (``s3``: the Iceberg files under
``storage.iceberg_location``, the Lance datasets under ``storage.lance_location``; see
catalog/object_store.py), which replicas on different hosts share. Still on each replica's disk:
``mask.key`` and the policy files other than the rules (model.conf, row_filters.yaml, scan_limits.yaml,
quotas.yaml). Quota use is counted in PostgreSQL in production (server/gate/quota_ledger_pg.py), so
that replicas enforce one budget, and in the process in the embedded profile.

The tables are created on first use (idempotent, under advisory locks, so replicas may start
together); the rules are copied from policy.csv only on request (`sync_policies`, the command
``lakegate profile sync-policies``).

In either profile the audit log signs checkpoints of its chain with the key
`checkpoint_key_path` (in the state directory, apart from the log); in production the latest
checkpoint of each replica's local chain (`checkpoint_chain`) is also kept in PostgreSQL.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import structlog

from lakegate.catalog.object_store import ObjectStore
from lakegate.catalog.warehouse import Warehouse
from lakegate.errors import AuditWriteError, BackendError, ConfigurationError
from lakegate.extras import require_extra
from lakegate.policies.enforcer import PolicyEnforcer, policy_files
from lakegate.server.audit.checkpoints import CHECKPOINT_KEY_FILE, Checkpoint
from lakegate.server.audit.log import AuditLog, VerifyReport
from lakegate.server.gate.quota_ledger import InProcessLedger, QuotaLedger
from lakegate.server.settings import Settings

if TYPE_CHECKING:
    import psycopg

    from lakegate.catalog.attached_catalogs import AttachedCatalog
    from lakegate.catalog.attached_documents import AttachedDocuments
    from lakegate.server.catalog_refresh import RefreshRequests

__all__ = [
    "catalog_uri",
    "checkpoint_anchor",
    "checkpoint_chain",
    "checkpoint_key_path",
    "open_audit",
    "open_enforcer",
    "open_quota_ledger",
    "open_warehouse",
    "postgres_url",
    "refresh_requests",
    "replica_id",
    "sync_policies",
    "verify_audit",
]

log = structlog.get_logger(__name__)

_CATALOG_LOCK = 0x6C67_0003
_SCHEMES = ("postgresql", "postgres", "postgresql+psycopg")


def postgres_url(settings: Settings) -> str:
    """The production profile's PostgreSQL as a libpq URL (postgresql://...).

    Raises:
        ConfigurationError: the profile is not production, or the URL is not a postgresql:// URL.
        MissingExtra: the postgres extra is not installed (the message says how to install it).
    """
    require_extra("postgres", "The production profile")
    if settings.profile != "production" or settings.postgres.url is None:
        raise ConfigurationError(
            "this needs the production profile: set LAKEGATE_PROFILE=production and LAKEGATE_POSTGRES__URL"
        )
    url = settings.postgres.url.get_secret_value()
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in _SCHEMES:
        raise ConfigurationError("LAKEGATE_POSTGRES__URL must be a URL such as postgresql://user@host:5432/db")
    return f"postgresql://{rest}"


def catalog_uri(url: str) -> str:
    """The SQLAlchemy URL pyiceberg's SqlCatalog needs for a libpq URL (the psycopg 3 driver)."""
    return "postgresql+psycopg://" + url.partition("://")[2]


def _where(url: str) -> str:
    # For messages: host, port and database, never the password.
    parts = urlsplit(url)
    return f"{parts.hostname or 'localhost'}:{parts.port or 5432}{parts.path or ''}"


def replica_id(settings: Settings) -> str:
    """This replica's name in audit records: the setting, else <hostname>:<pid>."""
    return settings.postgres.replica_id or f"{socket.gethostname()}:{os.getpid()}"


def _prepare(url: str, create: Callable[[psycopg.Connection[Any]], None]) -> None:
    import psycopg

    from lakegate.policies.pg_policies import connect

    try:
        with connect(url) as conn:
            create(conn)
    except psycopg.Error as exc:
        raise BackendError(f"cannot prepare the PostgreSQL tables at {_where(url)}: {exc}") from exc


def attached_catalogs(settings: Settings) -> dict[str, AttachedCatalog]:
    """The catalogs lakegate.toml attaches (`[catalogs.NAME]`), not yet opened."""
    from lakegate.catalog.attached_catalogs import AttachedCatalog, CatalogSpec

    return {
        name: AttachedCatalog(
            CatalogSpec(
                name,
                dict(entry.properties),
                writable=entry.writable,
                catalog_name=entry.catalog_name,
                refresh_s=entry.refresh_s,
                table_refresh_s=entry.table_refresh_s,
            )
        )
        for name, entry in settings.catalogs.items()
    }


def attached_documents(settings: Settings) -> dict[str, AttachedDocuments]:
    """The Lance datasets of documents lakegate.toml attaches (`[documents."NS.NAME"]`), not yet opened."""
    from lakegate.catalog.attached_documents import AttachedDocuments, DocumentSpec
    from lakegate.catalog.document_search import PassageLayout
    from lakegate.catalog.embedder import DIMENSION

    found = {}
    for name, entry in settings.documents.items():
        layout = PassageLayout(
            **entry.columns.model_dump(),
            fixed_classification=entry.classification,
            embedding_model=entry.embedding_model,
            embedding_model_sha256=entry.embedding_model_sha256,
        )
        spec = DocumentSpec(
            name, entry.uri, layout, dict(entry.storage_options), entry.description, time_travel=entry.time_travel
        )
        found[name] = AttachedDocuments(spec, dimension=DIMENSION)
    return found


def refresh_requests(settings: Settings) -> RefreshRequests:
    """Where `lakegate catalog refresh` records its requests for the profile's serving processes."""
    from lakegate.server.catalog_refresh import FileRefreshRequests, PostgresRefreshRequests

    if settings.profile == "embedded":
        return FileRefreshRequests(settings.state_dir)
    return PostgresRefreshRequests(postgres_url(settings))


def open_warehouse(settings: Settings) -> Warehouse:
    """The warehouse of the profile, on the storage of the settings; in production its catalog
    tables exist when this returns.

    Raises:
        ConfigurationError: the PostgreSQL URL or the S3 endpoint is invalid.
        BackendError: PostgreSQL cannot be reached or the catalog cannot be opened.
    """
    store = ObjectStore.from_settings(settings.storage)
    attached = attached_catalogs(settings)
    documents = attached_documents(settings)
    refresh = refresh_requests(settings).latest if attached else None
    if settings.profile == "embedded":
        return Warehouse(
            settings.state_dir, object_store=store, attached=attached, documents=documents, refresh_requested=refresh
        )
    url = postgres_url(settings)
    warehouse = Warehouse(
        settings.state_dir,
        catalog_uri=catalog_uri(url),
        object_store=store,
        attached=attached,
        documents=documents,
        refresh_requested=refresh,
    )

    def create_catalog_tables(conn: psycopg.Connection[Any]) -> None:
        # pyiceberg creates its tables when it first finds them missing; replicas starting at once
        # would race to create them, so the first does it under the lock and the others find them.
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_CATALOG_LOCK,))
            _ = warehouse.iceberg

    _prepare(url, create_catalog_tables)
    return warehouse


def open_enforcer(settings: Settings, resource_groups: Mapping[str, Iterable[str]] | None = None) -> PolicyEnforcer:
    """The policy enforcer of the profile: policy.csv, or the rules in PostgreSQL (watched).

    Raises:
        ConfigurationError: the PostgreSQL URL is invalid.
        BackendError: the policy tables cannot be created.
    """
    files = policy_files(settings.project)
    interval = settings.policy.reload_interval_s
    if settings.profile == "embedded":
        return PolicyEnforcer(files, resource_groups, reload_interval_s=interval)
    url = postgres_url(settings)
    from lakegate.policies.pg_policies import PostgresRules, create_policy_schema

    _prepare(url, create_policy_schema)
    rules = PostgresRules(
        url,
        poll_interval_s=settings.postgres.policy_poll_interval_s,
        stale_after_s=settings.postgres.policy_stale_after_s,
    )
    return PolicyEnforcer(files, resource_groups, reload_interval_s=interval, rules=rules)


def open_quota_ledger(settings: Settings) -> QuotaLedger:
    """Where quota use is counted: in this process, or in PostgreSQL (production) for all replicas.

    Raises:
        ConfigurationError: the PostgreSQL URL is invalid.
        BackendError: the quota tables cannot be created.
    """
    if settings.profile == "embedded":
        return InProcessLedger()
    url = postgres_url(settings)
    from lakegate.server.gate.quota_ledger_pg import PostgresLedger, create_quota_schema

    _prepare(url, create_quota_schema)
    # A running call's slot outlives the longest call (a query's timeout, plus the time to page
    # and audit it) before a dead replica's slot frees itself.
    return PostgresLedger(url, lease_s=2 * settings.query.timeout_s + 60)


def checkpoint_key_path(settings: Settings) -> Path:
    """The private key that signs the audit checkpoints: the setting, else in the state directory."""
    return settings.audit.checkpoint_key or settings.state_dir / CHECKPOINT_KEY_FILE


def checkpoint_chain(settings: Settings) -> str:
    """The name under which PostgreSQL keeps this replica's latest checkpoint: the replica (its
    setting, else the host name: the pid would change at every restart) and its audit file."""
    return f"{settings.postgres.replica_id or socket.gethostname()}:{settings.audit_path}"


def open_audit(settings: Settings) -> AuditLog:
    """The audit log of the profile, signing checkpoints: the local file, mirrored into the global
    chain in production, where its latest checkpoint is kept too.

    Raises:
        ConfigurationError: the PostgreSQL URL is invalid.
        BackendError: the audit tables cannot be created.
    """
    key = checkpoint_key_path(settings)
    if key.resolve().parent == settings.audit_path.resolve().parent:
        # Whoever can rewrite the log's directory could then also re-sign what they cut.
        log.warning("audit.checkpoint_key_beside_log", key=str(key), log=str(settings.audit_path))
    if settings.profile == "embedded":
        return AuditLog.from_settings(settings.audit_path, settings.audit, signing_key=key)
    url = postgres_url(settings)
    from lakegate.server.audit.pg import (
        MirroredAuditLog,
        PostgresAuditChain,
        PostgresCheckpointStore,
        create_audit_schema,
    )

    _prepare(url, create_audit_schema)
    local = MirroredAuditLog.from_settings(settings.audit_path, settings.audit, signing_key=key)
    assert isinstance(local, MirroredAuditLog)
    local.publish_checkpoints_to(PostgresCheckpointStore(url, checkpoint_chain(settings)))
    return local.mirror_to(PostgresAuditChain(url, replica_id(settings)))


def checkpoint_anchor(settings: Settings) -> Checkpoint | None:
    """The latest checkpoint PostgreSQL keeps for this replica's audit file (production), or None.

    Raises:
        ConfigurationError: not the production profile.
        BackendError: it cannot be read.
    """
    url = postgres_url(settings)
    import psycopg

    from lakegate.server.audit.pg import load_checkpoint

    try:
        return load_checkpoint(url, checkpoint_chain(settings))
    except (psycopg.Error, AuditWriteError) as exc:
        raise BackendError(f"cannot read the audit checkpoint at {_where(url)}: {exc}") from exc


def sync_policies(settings: Settings) -> int:
    """Replace the rules in PostgreSQL by the project's policy.csv (one transaction); returns how
    many rules there are now. Every replica applies them within the bound (policies/pg_policies.py).

    Raises:
        ConfigurationError: not the production profile, or the file is not a valid policy.
        BackendError: PostgreSQL cannot be written.
    """
    from sqlalchemy.exc import SQLAlchemyError

    url = postgres_url(settings)
    from lakegate.policies.pg_policies import create_policy_schema, open_rules

    files = policy_files(settings.project)
    _prepare(url, create_policy_schema)
    with open_rules(url) as rules:
        try:
            return rules.replace_all(files.model, files.policy)
        except SQLAlchemyError as exc:
            raise BackendError(f"cannot write the rules to PostgreSQL at {_where(url)}: {exc}") from exc
        except Exception as exc:
            raise ConfigurationError(f"{files.policy} is not a valid policy: {exc}") from exc


def verify_audit(settings: Settings) -> VerifyReport:
    """Verify the global audit chain in PostgreSQL.

    Raises:
        ConfigurationError: not the production profile.
        BackendError: the chain cannot be read.
    """
    url = postgres_url(settings)
    import psycopg

    from lakegate.server.audit.pg import verify_chain

    try:
        return verify_chain(url)
    except psycopg.Error as exc:
        raise BackendError(f"cannot read the audit chain at {_where(url)}: {exc}") from exc
