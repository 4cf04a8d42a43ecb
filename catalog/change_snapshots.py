"""Which snapshots of a table hold rows staged for approval and not (yet) approved.

A staged append (catalog/staged_changes.py) is a snapshot on a branch of the table; its summary
names the change (`lakegate.staged-change`). Until the change is approved by fast-forward, that
snapshot is not the table's data: no read by snapshot id, no restore and no listing may reach it,
or an agent could read (or restore into main) rows that nobody approved. This module knows only
table metadata, so that the scan planner, the describe path and restores can all ask it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["CHANGE_PROPERTY_PREFIX", "STAGED_CHANGE_PROPERTY", "unapproved_snapshots"]

#: Table property holding one change's record (JSON), per change id.
CHANGE_PROPERTY_PREFIX = "lakegate.change."
#: Snapshot summary property of a staged snapshot: the change it stages.
STAGED_CHANGE_PROPERTY = "lakegate.staged-change"


def unapproved_snapshots(snapshots: Iterable[Any], properties: Mapping[str, str]) -> frozenset[int]:
    """The ids of staged snapshots whose change is not approved by fast-forward (pending, rejected,
    expired, or approved by committing its files anew: then main holds a snapshot of its own)."""
    hidden = set()
    for snapshot in snapshots:
        summary = snapshot.summary
        change_id = summary.get(STAGED_CHANGE_PROPERTY) if summary is not None else None
        if change_id is None:
            continue
        record = properties.get(CHANGE_PROPERTY_PREFIX + change_id)
        decided = json.loads(record) if record else {}
        if not (decided.get("status") == "approved" and decided.get("fast_forward")):
            hidden.add(snapshot.snapshot_id)
    return frozenset(hidden)
