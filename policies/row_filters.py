"""Row policy: predicates attached to (role or principal, dataset), read from policies/row_filters.yaml.

The file is part of the policy set: it is versioned with the Casbin files (its content goes into
the policy version), reloaded with them, and an invalid file fails closed (the enforcer then
denies everything). The SQL guard injects the filters into every scan of their dataset.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import sqlglot
from pydantic import BaseModel, ConfigDict, Field, field_validator
from sqlglot import exp

from lakegate.policies.policy_file import read_policy_file

__all__ = ["ROW_FILTER_FILE", "RowFilter", "RowFilterSet", "load_row_filters"]

ROW_FILTER_FILE = "row_filters.yaml"
DIALECT = "duckdb"


#: What a row filter's top node may be: something true or false for each row.
_PREDICATES = (exp.Predicate, exp.Connector, exp.Not, exp.Boolean, exp.Paren)


class RowFilterEntry(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    subject: str = Field(min_length=1)
    dataset: str = Field(
        pattern=r"^[a-z_][a-z0-9_]*(\.[a-z_][a-z0-9_]*){1,9}$"
    )  # namespace.table, or catalog.namespace.table
    where: str = Field(min_length=1)
    reason: str = ""

    @field_validator("where")
    @classmethod
    def _plain_predicate(cls, where: str) -> str:
        predicate_of(where)
        return where


class RowFilterFile(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    filters: tuple[RowFilterEntry, ...] = ()


@dataclass(frozen=True)
class RowFilter:
    """One predicate on one dataset, for the subject it is attached to."""

    subject: str
    dataset: str
    where: str
    reason: str

    def predicate(self) -> exp.Expr:
        return predicate_of(self.where)

    def sql(self) -> str:
        """The predicate as lakegate injects it: regenerated from the tree, so a comment or stray
        text in the file can never reach past it into the rest of the query."""
        return self.predicate().sql(DIALECT, comments=False)

    def columns(self) -> set[str]:
        return {column.name.lower() for column in self.predicate().find_all(exp.Column)}


def predicate_of(where: str) -> exp.Expr:
    """Parse a row filter; it may use only columns, literals, operators and plain functions.

    Raises:
        ValueError: not one predicate, or it holds a subquery, a table or a qualified column.
    """
    from lakegate.policies.sql_guard import InvalidQuery, check_functions

    try:
        parsed = sqlglot.parse_one(where, dialect=DIALECT)
    except sqlglot.errors.ParseError as exc:
        raise ValueError(f"row filter {where!r} is not a SQL predicate: {exc}") from exc
    if any(isinstance(node, exp.Query | exp.Table | exp.Subquery) for node in parsed.walk()):
        raise ValueError(f"row filter {where!r} may not hold a subquery or a table")
    if any(column.table for column in parsed.find_all(exp.Column)):
        raise ValueError(f"row filter {where!r} must name its dataset's columns without a table prefix")
    if not isinstance(parsed, _PREDICATES):
        raise ValueError(f"row filter {where!r} is not a condition (compare a column with a value)")
    try:
        check_functions(parsed)
    except InvalidQuery as exc:
        raise ValueError(f"row filter {where!r}: {exc.message}") from exc
    return parsed


class RowFilterSet:
    """Every row filter, looked up by the subjects (principal and roles) of a caller."""

    def __init__(self, filters: tuple[RowFilter, ...] = ()) -> None:
        self.filters = filters

    def for_subjects(self, subjects: set[str], dataset: str) -> list[RowFilter]:
        """The filters on `dataset` that apply to any of `subjects`, in file order."""
        return [f for f in self.filters if f.dataset == dataset and f.subject in subjects]


def load_row_filters(path: Path | None) -> RowFilterSet:
    """Read a row filter file; no file means no row filters.

    Raises:
        ValueError: the file is not YAML or does not match the schema (the message says where).
    """
    parsed = read_policy_file(path, RowFilterFile)
    if parsed is None:
        return RowFilterSet()
    return RowFilterSet(tuple(RowFilter(e.subject, e.dataset, e.where, e.reason) for e in parsed.filters))
