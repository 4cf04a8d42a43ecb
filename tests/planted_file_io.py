"""A FileIO that a table's own `py-io-impl` property names (tests/test_vended_credentials.py): it
notes the properties of every one pyiceberg makes, as a module an attacker chose would see them."""

from __future__ import annotations

from typing import Any

from pyiceberg.io.pyarrow import PyArrowFileIO

#: The properties each PlantedFileIO was made with.
MADE: list[dict[str, str]] = []


class PlantedFileIO(PyArrowFileIO):
    def __init__(self, properties: Any = None) -> None:
        MADE.append(dict(properties or {}))
        super().__init__(properties or {})
