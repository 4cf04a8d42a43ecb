"""All of lakegate's settings, in one place.

Precedence, highest first: keyword arguments (the CLI's flags), environment variables
(`LAKEGATE_` prefix, `__` between nested names, e.g. `LAKEGATE_AUDIT__FSYNC=false`), the project's
`lakegate.toml`, then the defaults below. With no file and no variables, lakegate runs on the
embedded default: a SQLite Iceberg catalog, a local Lance directory, CSV policies and a JSON-lines
audit log, all under the state directory.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from lakegate.catalog.attached_catalogs import CATALOG_NAME
from lakegate.catalog.settings import CatalogSettings, DocumentSettings, QuerySettings, StorageSettings, WriteSettings
from lakegate.tools.settings import LimitSettings

__all__ = [
    "AuditSettings",
    "AuthSettings",
    "HttpSettings",
    "LimitSettings",
    "PolicySettings",
    "PostgresSettings",
    "Profile",
    "QuerySettings",
    "Settings",
    "StorageSettings",
    "WriteSettings",
    "load_settings",
    "project_dir",
]

CONFIG_FILE = "lakegate.toml"
STATE_DIR = ".lakegate"
_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float:
    """Seconds in "90", "90s", "15m", "12h" or "1d".

    Raises:
        ValueError: not a number with an optional unit s, m, h or d.
    """
    spelled = text.strip().lower()
    unit = _DURATION_UNITS.get(spelled[-1:]) if spelled else None
    number = spelled[:-1] if unit is not None else spelled
    try:
        return float(number) * (unit or 1)
    except ValueError:
        raise ValueError(
            f"{text!r} is not a duration: use seconds, or a number with s, m, h or d (e.g. '1d')"
        ) from None


#: Where the shared state lives: "embedded" keeps everything under the state directory (SQLite
#: catalog, policy.csv, JSON-lines audit); "production" keeps the Iceberg catalog, the Casbin rules
#: and a global audit chain in PostgreSQL, shared by every replica (server/profile.py).
Profile = Literal["embedded", "production"]


class AuditSettings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    path: Path | None = Field(
        default=None,
        description="Audit log file (JSON lines, hash-chained). Default: <home>/audit/audit.jsonl.",
    )
    fsync: bool = Field(
        default=True,
        description="fsync the log after every record, so a record survives a machine crash, not only a process crash.",
    )
    sensitive_arguments: tuple[str, ...] = Field(
        default=(),
        description="More tool argument names whose values the log keeps only as a keyed hash, on top of "
        "those in policies/redaction.yaml (password, token, secret, api_key, ...).",
    )
    rotate_bytes: int | None = Field(
        default=64 * 1024 * 1024,
        ge=1024,
        description="Rotate the active log file once it holds this many bytes (null: never by size). The "
        "hash chain continues in the next file.",
    )
    rotate_age: float | None = Field(
        default=None,
        gt=0,
        description="Rotate the active log file once its first record is this old: seconds, or a number "
        "with s, m, h or d ('1d'). Null: never by age.",
    )
    keep_files: int | None = Field(
        default=None,
        ge=1,
        description="Rotated log files to keep; older ones are deleted and marked pruned in the manifest, "
        "which keeps their last hash so the chain still verifies. Null: keep every file.",
    )
    checkpoint_every: int | None = Field(
        default=100,
        ge=1,
        description="Sign a checkpoint of the chain's head after this many records (null: not by count). "
        "Records after the last checkpoint can be cut from the log's end undetected: this bounds how many.",
    )
    checkpoint_interval: float | None = Field(
        default=60.0,
        gt=0,
        description="Sign a checkpoint at most this long after a record was written: seconds, or a number "
        "with s, m, h or d ('1m'). Bounds how long a record stays uncovered while the server runs. Null: "
        "not by time; with checkpoint_every also null, no checkpoints.",
    )
    checkpoint_key: Path | None = Field(
        default=None,
        description="Ed25519 private key that signs the checkpoints (PEM, created 0600 on first use). "
        "Default: <home>/audit-checkpoint.key, outside the log's directory; its public key is written "
        "beside the checkpoints.",
    )

    @field_validator("rotate_age", "checkpoint_interval", mode="before")
    @classmethod
    def _parse_age(cls, value: object) -> object:
        return parse_duration(value) if isinstance(value, str) else value


class PolicySettings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    reload_interval_s: float = Field(
        default=1.0,
        ge=0,
        description="How often the policy files are checked for changes (hot reload); 0 checks every call.",
    )


class PostgresSettings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    url: SecretStr | None = Field(
        default=None,
        description="PostgreSQL URL of the production profile's shared state "
        "(postgresql://user:password@host:5432/db): Iceberg catalog, Casbin rules, audit chain.",
    )
    policy_poll_interval_s: float = Field(
        default=1.0,
        gt=0,
        le=60,
        description="How often each replica reads the policy version row when no change notification "
        "arrives; a policy change reaches every replica within this plus 1 s.",
    )
    policy_stale_after_s: float = Field(
        default=5.0,
        gt=0,
        description="A replica that cannot confirm the policy version for this long denies every call "
        "until it can (fail closed).",
    )
    replica_id: str | None = Field(
        default=None,
        min_length=1,
        max_length=200,
        description="This replica's name in audit records. Default: <hostname>:<pid>.",
    )


class HttpSettings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    host: str = Field(
        default="127.0.0.1",
        description="Address `serve --http` listens on. Loopback by default; a public address belongs behind a "
        "TLS proxy.",
    )
    port: int = Field(default=8765, ge=1, le=65535, description="Port `serve --http` listens on.")
    public_url: str | None = Field(
        default=None,
        description="Where clients reach the server (scheme://host[:port], no path), e.g. a TLS proxy's URL. "
        "The resource URL, which tokens must name as audience, is this plus /mcp. Default: http://<host>:<port>.",
    )
    allowed_hosts: tuple[str, ...] = Field(
        default=(),
        description="Host headers accepted (DNS-rebinding protection); name:* allows any port. Default: the "
        "public URL's host and the loopback names.",
    )
    allowed_origins: tuple[str, ...] = Field(
        default=(),
        description="Browser Origin headers accepted; others get 403 (DNS-rebinding protection). Requests "
        "without an Origin (non-browser clients) pass. scheme://host:* allows any port. Default: the public "
        "URL's origin and the loopback origins.",
    )
    max_body_bytes: int = Field(
        default=4 * 1024 * 1024, ge=1024, description="Largest request body accepted; larger ones get 413."
    )
    session_idle_timeout_s: float = Field(
        default=1800.0, gt=0, description="An MCP session with no request for this long is closed."
    )
    metrics: Literal["token", "open", "off"] = Field(
        default="token",
        description="Who may read /metrics: callers with a valid token (token), anyone who reaches the port "
        "(open: for a scraper on a private network), or nobody (off).",
    )


class AuthSettings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    issuer: str = Field(
        default="lakegate",
        description="The iss claim every bearer token must carry: your identity provider's issuer. "
        "`lakegate token` signs with it.",
    )
    audience: str | None = Field(
        default=None,
        description="The aud claim every token must carry. Default: the resource URL (<public_url>/mcp).",
    )
    jwks_file: Path | None = Field(
        default=None,
        description="JSON Web Key Set file with the issuer's public keys (RS256, ES256); relative to the "
        "project. Re-read when it changes.",
    )
    shared_secret: SecretStr | None = Field(
        default=None,
        description="HS256 secret (at least 32 bytes), for development only: whoever holds it can mint tokens "
        "(`lakegate token`).",
    )
    roles_claim: str = Field(
        default="roles",
        description="Claim holding the caller's roles (a list, or a space-separated string; dots reach into "
        "objects, e.g. realm_access.roles). Only roles the policy knows count; they add to the policy's roles.",
    )
    leeway_s: float = Field(
        default=30.0, ge=0, le=300, description="Clock skew allowed when checking exp, nbf and iat."
    )
    authorization_servers: tuple[str, ...] = Field(
        default=(),
        description="Authorization servers named in the protected resource metadata (RFC 9728). Default: the "
        "issuer, when it is a URL.",
    )
    scopes: tuple[str, ...] = Field(default=(), description="Scopes named in the protected resource metadata.")


class Settings(BaseSettings):
    """Validated settings; build them with `load_settings`."""

    model_config = SettingsConfigDict(
        env_prefix="LAKEGATE_", env_nested_delimiter="__", extra="forbid", frozen=True, hide_input_in_errors=True
    )

    project: Path = Field(
        default=Path("."),
        description="Project directory: holds lakegate.toml, policies/ and catalog/ definitions.",
    )
    home: Path | None = Field(
        default=None,
        description="State directory for the embedded warehouse, Lance datasets and audit log. "
        "Default: <project>/.lakegate.",
    )
    principal: str | None = Field(
        default=None,
        description="Who is calling in stdio mode. Unknown principals are denied everything.",
    )
    demo_scale: Literal["small", "large"] = Field(
        default="small", description="Size of the demo warehouse built on first serve."
    )
    build_demo: bool = Field(
        default=True,
        description="Build the demo warehouse when `serve` finds the state directory empty "
        "(a project made by `lakegate init --empty` sets false: it serves its own data).",
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        default="WARNING", description="Level of the server's diagnostic log (stderr), not the audit log."
    )
    audit: AuditSettings = Field(default_factory=AuditSettings, description="The audit log.")
    limits: LimitSettings = Field(default_factory=LimitSettings, description="Per-call result budgets.")
    policy: PolicySettings = Field(default_factory=PolicySettings, description="Policy loading.")
    query: QuerySettings = Field(default_factory=QuerySettings, description="Governed SQL queries.")
    writes: WriteSettings = Field(default_factory=WriteSettings, description="Governed writes.")
    http: HttpSettings = Field(default_factory=HttpSettings, description="The Streamable HTTP transport.")
    auth: AuthSettings = Field(default_factory=AuthSettings, description="Bearer token checks (HTTP).")
    profile: Profile = Field(
        default="embedded",
        description="Where shared state lives: embedded (under the state directory) or production "
        "(PostgreSQL at postgres.url).",
    )
    postgres: PostgresSettings = Field(
        default_factory=PostgresSettings, description="The production profile's PostgreSQL."
    )
    storage: StorageSettings = Field(
        default_factory=StorageSettings,
        description="Where the data files live: the state directory, or S3 (catalog/object_store.py).",
    )
    catalogs: dict[str, CatalogSettings] = Field(
        default_factory=dict,
        description="Iceberg catalogs lakegate did not create, attached by name ([catalogs.NAME] in lakegate.toml): "
        "their tables are the datasets NAME.<namespace>.<table> (catalog/attached_catalogs.py).",
    )
    documents: dict[str, DocumentSettings] = Field(
        default_factory=dict,
        description="Lance datasets of documents lakegate did not create, attached for search_documents by their "
        'dataset name ([documents."NAMESPACE.NAME"] in lakegate.toml; catalog/attached_documents.py). Read-only.',
    )

    @model_validator(mode="after")
    def _production_needs_postgres(self) -> Settings:
        if self.profile == "production" and self.postgres.url is None:
            raise ValueError("profile 'production' needs a PostgreSQL URL: set LAKEGATE_POSTGRES__URL")
        for name in self.catalogs:
            if not CATALOG_NAME.match(name):
                raise ValueError(
                    f"catalog name {name!r}: use a lower-case identifier (letters, digits, _; a letter first), "
                    "it starts the names of the catalog's datasets"
                )
        for name in self.documents:
            namespace, _, table = name.partition(".")
            if not (CATALOG_NAME.match(namespace) and CATALOG_NAME.match(table)):
                raise ValueError(
                    f"documents {name!r}: name an attached dataset of documents NAMESPACE.NAME, each a lower-case "
                    "identifier (letters, digits, _; a letter first), as lakegate names its own datasets"
                )
            if namespace in self.catalogs:
                raise ValueError(
                    f"documents {name!r}: {namespace} is the name of an attached catalog; use another namespace"
                )
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        toml_file = project_dir() / CONFIG_FILE
        return (init_settings, env_settings, TomlConfigSettingsSource(settings_cls, toml_file=toml_file))

    @property
    def state_dir(self) -> Path:
        return (self.home or self.project / STATE_DIR).resolve()

    @property
    def audit_path(self) -> Path:
        return self.audit.path or self.state_dir / "audit" / "audit.jsonl"


def project_dir(explicit: Path | str | None = None) -> Path:
    """The project directory: `--project`, else `$LAKEGATE_PROJECT`, else the current directory."""
    chosen = explicit or os.environ.get("LAKEGATE_PROJECT") or "."
    return Path(chosen).resolve()


def load_settings(project: Path | str | None = None, **overrides: Any) -> Settings:
    """Read settings for a project, with CLI overrides on top.

    Raises:
        pydantic.ValidationError: a setting has an invalid value (the message names it).
    """
    root = project_dir(project)
    # The TOML source reads the file of the project being loaded, which the CLI may name.
    previous = os.environ.get("LAKEGATE_PROJECT")
    os.environ["LAKEGATE_PROJECT"] = str(root)
    try:
        given = {key: value for key, value in overrides.items() if value is not None}
        return Settings(project=root, **given)
    finally:
        if previous is None:
            del os.environ["LAKEGATE_PROJECT"]
        else:
            os.environ["LAKEGATE_PROJECT"] = previous
