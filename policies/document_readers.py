"""Who may read a document of each classification, read from policies/document_readers.yaml.

The demo knowledge base writes these roles into each passage's `allowed_roles`; search then admits
a passage only to a caller who may read its classification and holds one of them. The file is data
the catalog reads when it builds the demo, not part of the policy set the enforcer versions and
reloads: editing it changes the next build's rows, never a decision.
"""

from __future__ import annotations

import re
from functools import cache
from importlib import resources

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from lakegate.errors import ConfigurationError

__all__ = ["DOCUMENT_READERS_FILE", "DocumentReaders", "load_document_readers", "parse_document_readers"]

DOCUMENT_READERS_FILE = "document_readers.yaml"

_CLASSIFICATION = re.compile(r"^[a-z][a-z0-9_]*$")
_ROLE = re.compile(r"^role:[a-z][a-z0-9_]*$")


class ClassificationReaders(BaseModel):
    """The roles that may read documents of one classification, in the order they are written."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    classification: str = Field(pattern=_CLASSIFICATION.pattern)
    roles: tuple[str, ...] = Field(min_length=1)

    @field_validator("roles")
    @classmethod
    def _valid_roles(cls, roles: tuple[str, ...]) -> tuple[str, ...]:
        for role in roles:
            if not _ROLE.match(role):
                raise ValueError(f"role {role!r} must look like 'role:<name>' (lower case)")
        if len(set(roles)) != len(roles):
            raise ValueError(f"a role is listed twice in {list(roles)}")
        return roles


class DocumentReaders(BaseModel):
    """Readers by classification."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    readers: tuple[ClassificationReaders, ...] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique_classifications(self) -> DocumentReaders:
        names = [entry.classification for entry in self.readers]
        if len(set(names)) != len(names):
            raise ValueError(f"a classification is listed twice in {names}")
        return self

    @property
    def classifications(self) -> tuple[str, ...]:
        return tuple(entry.classification for entry in self.readers)

    def roles(self, classification: str) -> tuple[str, ...]:
        """The roles that may read a document of `classification`.

        Raises:
            ConfigurationError: the file names no readers for it.
        """
        for entry in self.readers:
            if entry.classification == classification:
                return entry.roles
        raise ConfigurationError(
            f"policies/{DOCUMENT_READERS_FILE} names no readers for classification {classification!r} "
            f"(it lists {', '.join(self.classifications)})"
        )


def parse_document_readers(text: str, origin: str = f"policies/{DOCUMENT_READERS_FILE}") -> DocumentReaders:
    """Validate a readers file's text; `origin` names it in the error.

    Raises:
        ConfigurationError: not YAML, or not the schema (the message says where).
    """
    try:
        return DocumentReaders.model_validate(yaml.safe_load(text))
    except (yaml.YAMLError, ValidationError) as exc:
        raise ConfigurationError(f"{origin} is malformed: {exc}") from exc


@cache
def load_document_readers() -> DocumentReaders:
    """The packaged policies/document_readers.yaml, read and validated once per process.

    Raises:
        ConfigurationError: the file is missing or malformed.
    """
    try:
        text = resources.files("lakegate.policies").joinpath(DOCUMENT_READERS_FILE).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigurationError(f"policies/{DOCUMENT_READERS_FILE} cannot be read: {exc}") from exc
    return parse_document_readers(text)
