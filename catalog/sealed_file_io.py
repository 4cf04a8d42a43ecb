"""The FileIO of an attached catalog's tables: the catalog's properties and its answer, never the
table's own properties.

pyiceberg builds the FileIO a table is read with from the catalog's properties, then the table's
own properties, then (REST) the load answer's `config` and `storage-credentials`. Whoever may
commit to a table sets its properties: `py-io-impl` would make lakegate import a module of their
choosing and call it with every property, secrets included; `s3.proxy-uri` or `s3.endpoint` would
send lakegate's signed reads of manifests elsewhere. `seal` makes a catalog build each table's
FileIO from its own properties and, for a REST catalog, the load answer, which the table then
carries as `config` exactly (catalog/vended_credentials.py reads it). Attached catalogs are sealed,
and so is the embedded one, which `lakegate table register` may give a table written elsewhere.

pyiceberg 0.12's `_load_file_io` (every catalog) and `_response_to_table` / `_response_to_staged_table`
(RestCatalog) are replaced on the instance; tests/test_vended_credentials.py holds the behaviour.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MethodType
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from pyiceberg.catalog import Catalog
    from pyiceberg.io import FileIO

C = TypeVar("C", bound="Catalog")

__all__ = ["FILE_IO_KEYS", "seal", "steering_properties"]

#: Prefixes of the properties that choose or configure a FileIO (pyiceberg.io and its FileIOs).
FILE_IO_KEYS = ("py-io-impl", "s3.", "client.", "gcs.", "adls.", "hdfs.", "oss.", "pyarrow.", "hf.")


def steering_properties(properties: Mapping[str, str]) -> list[str]:
    """The keys of `properties` (a table's own) that would configure the FileIO it is read with."""
    return sorted(key for key in properties if key.lower().startswith(FILE_IO_KEYS))


def seal(catalog: C) -> C:
    """`catalog`, its tables' FileIO built without their own properties; returns it."""
    from pyiceberg.catalog.rest import RestCatalog

    if isinstance(catalog, RestCatalog):
        instance: Any = catalog  # methods replaced on this instance only
        instance._response_to_table = MethodType(_rest_table, catalog)
        instance._response_to_staged_table = MethodType(_rest_staged_table, catalog)
    else:
        instance = catalog
        instance._load_file_io = MethodType(_own_file_io, catalog)
    return catalog


def _own_file_io(self: Catalog, properties: Mapping[str, str] = {}, location: str | None = None) -> FileIO:  # noqa: B006
    """The catalog's FileIO: its own properties (what the table passes is left out)."""
    from pyiceberg.io import load_file_io

    return load_file_io(dict(self.properties), location)


def _answer(self: Any, response: Any) -> dict[str, str]:
    """The load answer's FileIO properties: `config`, under the storage credentials for the table."""
    credentials = self._resolve_storage_credentials(response.storage_credentials, response.metadata_location)
    return {**response.config, **credentials}


def _rest_table(self: Any, identifier: tuple[str, ...], response: Any) -> Any:
    from pyiceberg.table import Table

    answer = _answer(self, response)
    io = self._load_file_io(answer, response.metadata_location)
    return Table(identifier, response.metadata, response.metadata_location, io, self, config=answer)


def _rest_staged_table(self: Any, identifier: tuple[str, ...], response: Any) -> Any:
    from pyiceberg.table import StagedTable

    io = self._load_file_io(_answer(self, response), response.metadata_location)
    return StagedTable(identifier, response.metadata, response.metadata_location, io, self)
