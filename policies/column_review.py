"""Columns nobody has reviewed, hidden until a person has: policies/column_review.yaml.

A catalog lakegate attaches changes under it: another team adds a column upstream, and a column
nobody has looked at would become readable to every role that reads its table. The governance team
can name catalogs or namespaces whose unreviewed columns are hidden from everyone until reviewed:

    hide_unreviewed: [lake, local.sales]   # catalogs ("lake") or namespaces ("local.sales")
    reviewed:                              # `lakegate catalog review --accept` writes these
      lake.sales.customers.email: {tags: [pii], by: steward, at: "2026-12-07", evidence: "..."}
      lake.sales.orders.note: {tags: []}   # reviewed: nothing to tag

A column is reviewed when it is listed here, or tagged in catalog/datasets.yaml. A reviewed
column's tags join the tag groups of catalog/datasets.yaml (`tag:pii` rules apply to it). An
unreviewed column in scope is hidden from every principal except those allowed the action
`review` on its dataset (`p, role:data_steward, lake.*, review, allow`): the reviewers, who read it
as their other rules say, to decide. The file is part of the policy set: hot-reloaded, versioned,
and an invalid file denies everything until it is fixed.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator

from lakegate.policies.policy_file import read_policy_file

__all__ = [
    "COLUMN_REVIEW_FILE",
    "REVIEW_ACTION",
    "ColumnReview",
    "ReviewedColumn",
    "check_tags",
    "load_column_review",
    "parse_column_review",
]

COLUMN_REVIEW_FILE = "column_review.yaml"
#: The action that lets a principal read unreviewed columns of a dataset (to review them).
REVIEW_ACTION = "review"

_SCOPE = re.compile(r"^[a-z_][a-z0-9_]*(\.[a-z_][a-z0-9_]*)*$")
_COLUMN = re.compile(r"^[a-z_][a-z0-9_]*(\.[a-z_][a-z0-9_]*){2,10}$")
_TAG = re.compile(r"^[a-z0-9_:-]+$")


def check_tags(tags: tuple[str, ...]) -> tuple[str, ...]:
    """`tags`, when each is a plain tag (the name of a tag group, `tag:<tag>`, in the rules).

    Raises:
        ValueError: a tag is not lower-case letters, digits, '_', ':' or '-'.
    """
    for tag in tags:
        if not _TAG.match(tag):
            raise ValueError(f"tag {tag!r} must be lower-case letters, digits, '_', ':' or '-'")
    return tags


class ReviewedColumn(BaseModel):
    """One reviewed column: its tags (none: nothing to tag), and who decided, when, on what."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    tags: tuple[str, ...] = ()
    field_id: int | None = None  # the Iceberg field reviewed; None: whatever field has the name
    by: str | None = None
    at: str | None = None
    evidence: str | None = None

    @field_validator("tags")
    @classmethod
    def _plain_tags(cls, tags: tuple[str, ...]) -> tuple[str, ...]:
        return check_tags(tags)


class _File(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    hide_unreviewed: tuple[str, ...] = Field(default=(), description="Catalogs or namespaces.")
    reviewed: dict[str, ReviewedColumn] = Field(default_factory=dict)

    @field_validator("hide_unreviewed")
    @classmethod
    def _scopes(cls, scopes: tuple[str, ...]) -> tuple[str, ...]:
        for scope in scopes:
            if not _SCOPE.match(scope):
                raise ValueError(f"{scope!r} is not a catalog or namespace name (lower case, dots between levels)")
        return scopes

    @field_validator("reviewed")
    @classmethod
    def _columns(cls, reviewed: dict[str, ReviewedColumn]) -> dict[str, ReviewedColumn]:
        for column in reviewed:
            if not _COLUMN.match(column):
                raise ValueError(f"{column!r} is not a column's full name (dataset.column, lower case)")
        return reviewed


@dataclass(frozen=True)
class ColumnReview:
    """The scopes whose unreviewed columns are hidden, and the reviewed columns."""

    scopes: tuple[str, ...] = ()
    reviewed: Mapping[str, ReviewedColumn] = field(default_factory=dict)

    def in_scope(self, column: str) -> bool:
        """Whether `column` ("catalog.namespace.table.column") lies in a scope of hide_unreviewed."""
        return any(column.startswith(scope + ".") for scope in self.scopes)

    def is_reviewed(self, column: str, field_id: int | None) -> bool:
        """Whether `column` is reviewed: listed, and, where the review names a field, that field.
        A field that cannot be told (None) is not the reviewed one."""
        entry = self.reviewed.get(column)
        return entry is not None and (entry.field_id is None or entry.field_id == field_id)

    def groups(self) -> list[tuple[str, str]]:
        """(column, "tag:<tag>") for each tag of each reviewed column: Casbin g2 lines."""
        return [(column, f"tag:{tag}") for column, entry in self.reviewed.items() for tag in entry.tags]


def parse_column_review(data: Mapping[str, object]) -> ColumnReview:
    """The review file's content, as parsed YAML.

    Raises:
        pydantic.ValidationError: it does not match the schema.
    """
    parsed = _File.model_validate(data)
    return ColumnReview(parsed.hide_unreviewed, dict(parsed.reviewed))


def load_column_review(path: Path | None) -> ColumnReview:
    """Read the column review file; no file means no column is hidden for want of review.

    Raises:
        ValueError: the file is not YAML or does not match the schema (the message says where).
    """
    parsed = read_policy_file(path, _File)
    if parsed is None:
        return ColumnReview()
    return ColumnReview(parsed.hide_unreviewed, dict(parsed.reviewed))
