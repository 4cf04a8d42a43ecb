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

from pydantic import BaseModel, ConfigDict, Field
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

__all__ = [
    "AuditSettings",
    "LimitSettings",
    "PolicySettings",
    "QuerySettings",
    "Settings",
    "WriteSettings",
    "load_settings",
    "project_dir",
]

CONFIG_FILE = "lakegate.toml"
STATE_DIR = ".lakegate"


class AuditSettings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    path: Path | None = Field(
        default=None,
        description="Audit log file (JSON lines, hash-chained). Default: <home>/audit/audit.jsonl.",
    )
    fsync: bool = Field(
        default=True,
        description="fsync the log after every record, so a record survives a machine crash, not only "
        "a process crash.",
    )
    sensitive_arguments: tuple[str, ...] = Field(
        default=("password", "token", "secret", "api_key"),
        description="Tool argument names whose values are replaced by a redaction marker in the log.",
    )


class LimitSettings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    max_rows: int = Field(default=200, ge=1, description="Most rows (or items) one tool call returns.")
    max_bytes: int = Field(
        default=64 * 1024, ge=1024, description="Most bytes of JSON one tool call returns."
    )


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
        default=4, ge=1, description="Queries that run at once; further queries wait for a free sandbox."
    )
    max_sql_chars: int = Field(default=20_000, ge=100, description="Longest SQL text accepted by the query tool.")


class WriteSettings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    max_rows: int = Field(default=10_000, ge=1, description="Most rows one append_rows call may write.")
    commit_attempts: int = Field(
        default=20,
        ge=1,
        description="How often lakegate retries an Iceberg commit that lost a race with another writer.",
    )


class PolicySettings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    reload_interval_s: float = Field(
        default=1.0,
        ge=0,
        description="How often the policy files are checked for changes (hot reload); 0 checks every call.",
    )


class Settings(BaseSettings):
    """Validated settings; build them with `load_settings`."""

    model_config = SettingsConfigDict(
        env_prefix="LAKEGATE_", env_nested_delimiter="__", extra="forbid", frozen=True
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
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        default="WARNING", description="Level of the server's diagnostic log (stderr), not the audit log."
    )
    audit: AuditSettings = Field(default_factory=AuditSettings, description="The audit log.")
    limits: LimitSettings = Field(default_factory=LimitSettings, description="Per-call result budgets.")
    policy: PolicySettings = Field(default_factory=PolicySettings, description="Policy loading.")
    query: QuerySettings = Field(default_factory=QuerySettings, description="Governed SQL queries.")
    writes: WriteSettings = Field(default_factory=WriteSettings, description="Governed writes.")

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
