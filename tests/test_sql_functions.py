"""Every DuckDB function an agent's SQL may call is a reviewed decision.

The guard refuses functions by name (files, URLs, engine state, anything that outlives a query); this
test lists every scalar, aggregate and macro function of the installed DuckDB that it lets through,
and compares with a reviewed snapshot. A DuckDB upgrade that adds functions fails here until
someone has read the new names and refreshed the snapshot:

    LAKEGATE_UPDATE_SNAPSHOTS=1 python -m pytest tests/test_sql_functions.py
"""

from __future__ import annotations

import os
from pathlib import Path

import duckdb

from lakegate.policies.sql_guard import function_allowed

SNAPSHOT = Path(__file__).parent / "snapshots" / "sql_functions.txt"


def _allowed_now() -> list[str]:
    connection = duckdb.connect()
    try:
        rows = connection.execute(
            "SELECT DISTINCT function_name FROM duckdb_functions() "
            "WHERE function_type IN ('scalar', 'aggregate', 'macro')"
        ).fetchall()
    finally:
        connection.close()
    return sorted(name for (name,) in rows if function_allowed(name))


def test_functions_agents_may_call_match_the_reviewed_list() -> None:
    current = "\n".join(_allowed_now()) + "\n"
    if os.environ.get("LAKEGATE_UPDATE_SNAPSHOTS"):
        SNAPSHOT.write_text(current)
    added = sorted(set(current.split()) - set(SNAPSHOT.read_text().split()))
    assert not added, f"review these new DuckDB functions, then refresh the snapshot: {added}"


def test_engine_internals_are_not_in_the_list() -> None:
    allowed = set(_allowed_now())
    for name in ("stats", "setseed", "nextval", "current_query_id", "__internal_compress_string_utinyint",
                 "pg_get_viewdef", "getvariable", "version", "lakegate_mask_hash", "write_log", "error"):  # fmt: skip
        assert name not in allowed, name
    assert {"sum", "date_trunc", "regexp_matches", "list_transform", "current_date"} <= allowed
