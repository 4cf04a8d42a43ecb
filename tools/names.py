"""The name of every tool lakegate serves; a test checks this matches what the server registers."""

from __future__ import annotations

from enum import StrEnum

__all__ = ["ToolName"]


class ToolName(StrEnum):
    LIST_DATASETS = "list_datasets"
    DESCRIBE_DATASET = "describe_dataset"
    SEARCH_CATALOG = "search_catalog"
    QUERY = "query"
    LIST_METRICS = "list_metrics"
    DESCRIBE_METRIC = "describe_metric"
    QUERY_METRICS = "query_metrics"
    APPEND_ROWS = "append_rows"
    RESTORE_TABLE = "restore_table"
    CHANGE_STATUS = "change_status"
    SEARCH_DOCUMENTS = "search_documents"
    ADD_DOCUMENTS = "add_documents"
    EXPLAIN_ACCESS = "explain_access"
