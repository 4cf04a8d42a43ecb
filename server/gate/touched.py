"""What a call touched, resource by resource, for its audit record."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Touched"]


@dataclass(frozen=True)
class Touched:
    """One resource a call touched, as the audit record lists it."""

    type: str
    name: str
    access: str
    version: int | None = None
