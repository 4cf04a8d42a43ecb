"""The governed query as one tree (policies/governed_sql.py): the guard's rewrite builds it once, it
pages without changing, and DuckDB runs exactly the text the guard checked."""

from __future__ import annotations

import pytest
import sqlglot

from lakegate.policies.governed_sql import GovernedSql
from lakegate.policies.sql_guard import parse_query, rewrite

SOURCE = "lakegate_source_0123456789abcdef"
SCAN = (
    f'SELECT "order_id", "order_date", "status", lakegate_mask_hash_0a("email") AS "email" FROM "{SOURCE}" '
    "WHERE (region = 'EMEA')"
)


def _rewritten(sql: str) -> GovernedSql:
    return rewrite(parse_query(sql, max_chars=20_000), {"sales.orders": SCAN}, masks={"lakegate_mask_hash_0a": "hash"})


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT status, count(*) AS n FROM sales.orders GROUP BY status ORDER BY n DESC LIMIT 3",
        "(SELECT status FROM sales.orders ORDER BY 1 LIMIT 2) UNION ALL (SELECT 'x') ORDER BY 1",
        "WITH o AS (SELECT * FROM sales.orders) SELECT email /* a comment */ FROM o -- and another",
        "SELECT \"order_id\" AS \"lakegate_page\", 'it''s' AS q FROM sales.orders QUALIFY row_number() "
        "OVER (PARTITION BY status ORDER BY order_id) = 1",
    ],
)
def test_a_page_is_the_checked_text_wrapped_and_leaves_the_statement_as_it_was(sql: str) -> None:
    statement = _rewritten(sql)
    checked = statement.sql

    paged = statement.page(5, 10)

    assert paged.sql == f"SELECT * FROM ({checked}) AS lakegate_page LIMIT 10 OFFSET 5"
    assert statement.sql == checked == statement.tree.sql("duckdb", comments=False)
    assert paged.masks == {"lakegate_mask_hash_0a": "hash"} and f'"{SOURCE}"' in checked
    assert 'lakegate_mask_hash_0a("email")' in checked.lower()


def test_a_construct_that_reads_back_as_another_spelling_is_checked_in_that_spelling() -> None:
    # sqlglot writes date_add(d, 1) as d + INTERVAL 1 DAY, which it writes again as INTERVAL '1' DAY.
    statement = _rewritten("SELECT date_add(order_date, 1) AS next_day FROM sales.orders")

    assert "INTERVAL '1' DAY" in statement.sql
    # The spelling checked is a fixed point: read and written again, it is the same text.
    assert sqlglot.parse_one(statement.sql, read="duckdb").sql("duckdb", comments=False) == statement.sql
