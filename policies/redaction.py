"""Redaction policy: which values of a tool call the audit log holds only as a keyed hash.

Read from policies/redaction.yaml. The file is part of the policy set, like the row filters: its
content goes into the policy version, it is reloaded with the Casbin files, and an invalid file
fails closed (the enforcer then denies everything, and `RedactionRules.fail_closed` hides every
argument value of the denied calls' audit records). The gate applies the rules (server/redaction.py).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, field_validator

from lakegate.policies.policy_file import read_policy_file

__all__ = ["DEFAULT_ARGUMENTS", "DEFAULT_COLUMN_TAGS", "REDACTION_FILE", "RedactionRules", "load_redaction"]

REDACTION_FILE = "redaction.yaml"
#: Used when a policy set names no redaction file (the packaged file lists more).
DEFAULT_ARGUMENTS = ("password", "token", "secret", "api_key")
DEFAULT_COLUMN_TAGS = ("pii",)

_TAG = re.compile(r"^[a-z0-9_:-]+$")


class RedactionFile(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    arguments: tuple[str, ...] = DEFAULT_ARGUMENTS
    column_tags: tuple[str, ...] = DEFAULT_COLUMN_TAGS

    @field_validator("arguments")
    @classmethod
    def _names(cls, names: tuple[str, ...]) -> tuple[str, ...]:
        if any(not name.strip() for name in names):
            raise ValueError("an argument name is empty")
        return tuple(name.strip().lower() for name in names)

    @field_validator("column_tags")
    @classmethod
    def _tags(cls, tags: tuple[str, ...]) -> tuple[str, ...]:
        for tag in tags:
            if not _TAG.match(tag):
                raise ValueError(f"tag {tag!r} must be lower-case letters, digits, '_', ':' or '-'")
        return tags


@dataclass(frozen=True)
class RedactionRules:
    """What is sensitive: argument names (anywhere in the arguments, lower case) and column tags.

    ``everything``: nothing is known to be safe (the policy set failed to load), so every value is.
    """

    arguments: frozenset[str] = frozenset(DEFAULT_ARGUMENTS)
    column_tags: frozenset[str] = frozenset(DEFAULT_COLUMN_TAGS)
    everything: bool = False

    @classmethod
    def fail_closed(cls) -> RedactionRules:
        """The rules while the policy set is invalid: every argument value is sensitive."""
        return cls(everything=True)


def load_redaction(path: Path | None) -> RedactionRules:
    """Read a redaction file; no path, or no file there, means the defaults.

    Raises:
        ValueError: the file is not YAML or does not match the schema (the message says where).
    """
    parsed = read_policy_file(path, RedactionFile)
    if parsed is None:
        return RedactionRules()
    return RedactionRules(frozenset(parsed.arguments), frozenset(parsed.column_tags))
