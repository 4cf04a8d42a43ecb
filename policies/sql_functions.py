"""Which DuckDB functions an agent's SQL may call: the one list the SQL guard (on sqlglot's reading of
the query) and the query worker (on DuckDB's own reading, catalog/query_sandbox.py) both apply.

Kept free of sqlglot and DuckDB so that the worker imports it cheaply.
"""

from __future__ import annotations

from lakegate.policies.masks import MACRO_PREFIX

__all__ = ["TABLE_FUNCTIONS", "function_allowed"]

#: Functions that read files or URLs, reveal the engine's state, or run SQL given as a string.
FORBIDDEN_FUNCTIONS = frozenset(
    {
        "getenv", "current_setting", "glob", "query", "query_table", "sniff_csv", "which_secret",
        "checkpoint", "force_checkpoint", "install", "load", "sql_auto_complete", "json_execute_serialized_sql",
        "json_serialize_sql", "json_deserialize_sql", "json_serialize_plan",
        "from_substrait", "get_substrait", "get_substrait_json", "test_all_types", "test_vector_types",
        "enable_logging", "disable_logging", "truncate_duckdb_logs", "write_log",
        "version", "duckdb_api", "read_text", "read_blob", "list_files", "set_variable", "getvariable",
        # Parquet statistics are taken before row filters: min/max would show filtered rows.
        "stats",
        # State that would outlive the query in a pooled sandbox, or reveal other callers' queries.
        "setseed", "nextval", "currval", "setval", "get_block_size", "txid_current",
        "user", "session_user", "in_search_path", "obj_description", "col_description", "shobj_description",
        "format_pg_type", "format_type", "pg_typeof",
        # Raises with a message of the query's choosing: a channel around the result's governance.
        "error",
    }
)  # fmt: skip
FORBIDDEN_PREFIXES = (
    "read_", "duckdb_", "pragma_", "parquet_", "iceberg_", "delta_", "sqlite_", "postgres_", "mysql_",
    "http", "s3_", "lance_", "arrow_scan", "arrow_", "pandas_", "python_", "ducklake_", "__internal", "pg_",
    "has_", "current_", "icu_", MACRO_PREFIX,
)  # fmt: skip
#: Functions under a forbidden prefix that are plain values.
ALLOWED_FUNCTIONS = frozenset(
    {"current_date", "current_time", "current_timestamp", "current_localtime", "current_localtimestamp"}
)
#: The only table functions a query may use: they generate rows and read nothing.
TABLE_FUNCTIONS = frozenset({"range", "generate_series", "unnest"})


def function_allowed(name: str) -> bool:
    """Whether a function of this (DuckDB) name may appear in an agent's query."""
    name = name.lower()
    if name in ALLOWED_FUNCTIONS:
        return True
    return not (name in FORBIDDEN_FUNCTIONS or name.startswith(FORBIDDEN_PREFIXES))
