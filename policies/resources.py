"""The objects policies are written about, built in one place.

A Casbin rule names its object as text (`tool:query`, `metric:revenue`, `sales.customers.email`,
`kb.articles.classification:internal`); every package that asks the enforcer builds that text
through these constructors, so that a spelling lives here only and a reader can find every kind
of resource lakegate decides on.
"""

from __future__ import annotations

__all__ = [
    "CLASSIFICATION_MARK",
    "METRIC_PREFIX",
    "PROMPT_PREFIX",
    "TOOL_PREFIX",
    "classification_resource",
    "column_resource",
    "dataset_resource",
    "metric_resource",
    "prompt_resource",
    "tool_resource",
]

TOOL_PREFIX = "tool:"
METRIC_PREFIX = "metric:"
PROMPT_PREFIX = "prompt:"
#: Between a document dataset and a classification: `kb.articles.classification:internal`.
CLASSIFICATION_MARK = ".classification:"


def tool_resource(name: str) -> str:
    """`tool:<name>`, decided with action `call`."""
    return f"{TOOL_PREFIX}{name}"


def metric_resource(name: str) -> str:
    """`metric:<name>`, decided with action `read`."""
    return f"{METRIC_PREFIX}{name}"


def prompt_resource(name: str) -> str:
    """`prompt:<name>`, decided with action `get`."""
    return f"{PROMPT_PREFIX}{name}"


def dataset_resource(name: str) -> str:
    """A dataset is named as itself (`namespace.table`), decided with read, write or restore."""
    return name


def column_resource(dataset: str, column: str) -> str:
    """`<dataset>.<column>` in lower case, decided with read, mask:<method> or write. SQL names a
    column in any case, so the rules must too: a column `SSN` upstream is the resource `...ssn`."""
    return f"{dataset}.{column.lower()}"


def classification_resource(dataset: str, classification: str) -> str:
    """`<dataset>.classification:<value>`: whether passages of that classification may be read."""
    return f"{dataset}{CLASSIFICATION_MARK}{classification}"
