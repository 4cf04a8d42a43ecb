"""Dataset documentation: what each dataset and column means, who owns it, how it is tagged.

The definitions live in a YAML file, `catalog/datasets.yaml`. A project may keep its own copy
(`<project>/catalog/datasets.yaml`); without one, lakegate uses the copy shipped in this package,
which documents the demo warehouse. Column tags (such as `pii`) feed the column policies, so a
file that does not validate is a configuration error, never silently ignored.
"""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

from lakegate.errors import ConfigurationError
from lakegate.policies.column_review import check_tags

__all__ = [
    "DEFINITIONS_FILE",
    "CatalogDefinitions",
    "ColumnDoc",
    "DatasetDoc",
    "default_definitions_text",
    "load_definitions",
]

DEFINITIONS_FILE = "catalog/datasets.yaml"

# One namespace level and one table name, both plain identifiers: the same spelling works as an
# Iceberg identifier, a Lance table name and an unquoted SQL name. A table of an attached catalog
# has the catalog's name first, and may have nested namespace levels (catalog/attached_catalogs.py).
_DATASET_NAME = re.compile(r"^[a-z_][a-z0-9_]*(\.[a-z_][a-z0-9_]*){1,9}$")


class ColumnDoc(BaseModel):
    """Documentation of one column."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    description: str
    tags: tuple[str, ...] = ()

    @field_validator("tags")
    @classmethod
    def _valid_tags(cls, tags: tuple[str, ...]) -> tuple[str, ...]:
        return check_tags(tags)


class DatasetDoc(BaseModel):
    """Documentation of one dataset: an Iceberg table or a Lance dataset."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    kind: Literal["iceberg", "lance"] | None = None  # optional: the store says what a dataset is
    description: str
    owner: str
    tags: tuple[str, ...] = ()
    columns: tuple[ColumnDoc, ...] = ()

    @field_validator("name")
    @classmethod
    def _valid_name(cls, name: str) -> str:
        if not _DATASET_NAME.match(name):
            raise ValueError(
                f"dataset name {name!r} must look like 'namespace.table', or 'catalog.namespace.table' for an "
                "attached catalog (lower case)"
            )
        return name

    @field_validator("tags")
    @classmethod
    def _valid_tags(cls, tags: tuple[str, ...]) -> tuple[str, ...]:
        return check_tags(tags)

    @model_validator(mode="after")
    def _unique_columns(self) -> DatasetDoc:
        seen: set[str] = set()
        for column in self.columns:
            if column.name in seen:
                raise ValueError(f"column {column.name!r} is documented twice in {self.name}")
            seen.add(column.name)
        return self

    def column(self, name: str) -> ColumnDoc | None:
        """The documentation of column `name`, or None when it is not documented."""
        return next((column for column in self.columns if column.name == name), None)


class CatalogDefinitions(BaseModel):
    """Every documented dataset."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    datasets: tuple[DatasetDoc, ...]

    @model_validator(mode="after")
    def _unique_datasets(self) -> CatalogDefinitions:
        seen: set[str] = set()
        for dataset in self.datasets:
            if dataset.name in seen:
                raise ValueError(f"dataset {dataset.name!r} is documented twice")
            seen.add(dataset.name)
        return self

    def dataset(self, name: str) -> DatasetDoc | None:
        """The documentation of dataset `name` ("namespace.table"), or None."""
        return next((dataset for dataset in self.datasets if dataset.name == name), None)

    def column_tags(self) -> dict[str, tuple[str, ...]]:
        """Tags of every tagged column, keyed "namespace.table.column"."""
        return {
            f"{dataset.name}.{column.name}": column.tags
            for dataset in self.datasets
            for column in dataset.columns
            if column.tags
        }


def default_definitions_text() -> str:
    """The YAML text shipped with lakegate (documents the demo warehouse)."""
    return resources.files("lakegate.catalog").joinpath("datasets.yaml").read_text(encoding="utf-8")


def load_definitions(project: Path) -> CatalogDefinitions:
    """Load `<project>/catalog/datasets.yaml`, or the packaged definitions when it does not exist.

    Raises:
        ConfigurationError: the file cannot be read, is not YAML, or does not match the schema; the
            message names the file and the offending field.
    """
    path = project / DEFINITIONS_FILE
    if path.is_file():
        source = str(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigurationError(f"{source}: cannot be read: {exc}") from exc
    else:
        source = "package catalog/datasets.yaml"
        text = default_definitions_text()
    return parse_definitions(text, source=source)


def parse_definitions(text: str, *, source: str) -> CatalogDefinitions:
    """Validate definitions given as YAML text; `source` names the text in error messages.

    Raises:
        ConfigurationError: not YAML, or not matching the schema.
    """
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigurationError(f"{source}: not valid YAML: {exc}") from exc
    try:
        return CatalogDefinitions.model_validate(data)
    except ValidationError as exc:
        raise ConfigurationError(f"{source}: {_describe_validation_error(exc, data)}") from exc


def _describe_validation_error(exc: ValidationError, data: object) -> str:
    """Name each bad field by its path, with dataset names instead of bare list indices."""
    problems = []
    for error in exc.errors():
        problems.append(f"field '{_field_path(error['loc'], data)}': {error['msg']}")
    return "; ".join(problems)


def _field_path(loc: tuple[int | str, ...], data: object) -> str:
    # "datasets.3.columns.1.tags" is hard to act on in a file of 300 lines; resolve each index
    # to the entry's name where it has one: "datasets[sales.orders].columns[status].tags".
    parts: list[str] = []
    node = data
    for key in loc:
        if isinstance(key, int) and isinstance(node, list) and 0 <= key < len(node):
            node = node[key]
            name = node.get("name") if isinstance(node, dict) else None
            label = f"[{name}]" if isinstance(name, str) else f"[{key}]"
            if parts:
                parts[-1] += label
            else:
                parts.append(label)
        else:
            node = node.get(key) if isinstance(node, dict) else None
            parts.append(str(key))
    return ".".join(parts)
