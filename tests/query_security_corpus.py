"""The attempts of the security corpus of the governed query tool, and the helpers its tests share:
calling the gate with every output scanned, admin's clear values, and the checks of an answer.

Imported by tests/test_query_security.py (the corpus, the properties) and
tests/test_query_sandbox.py (the engine on its own); not a test module itself.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import pytest

from lakegate.evals.leaks import Forbidden
from lakegate.server.app import Runtime, open_runtime
from lakegate.server.gate.gate import GateOutcome
from lakegate.server.gate.identity import CallOrigin, stdio_principal
from lakegate.server.settings import load_settings

REPO = Path(__file__).resolve().parents[1]
HASHED = re.compile(r"^[0-9a-f]{16}$")
PARTIAL = re.compile(r"^\*+\d{4}$")


# -- calling the gate ----------------------------------------------------------------------------


def call(runtime: Runtime, principal: str, arguments: dict[str, Any]) -> GateOutcome:
    """One query through the gate; every output of it (text, structured content, plan, error, column
    names) and its audit record are scanned for keys and server paths."""
    who = stdio_principal(principal, runtime.enforcer)
    origin = CallOrigin(transport="in-process", session_id="security")
    outcome: GateOutcome = anyio.run(runtime.gate.call, "query", arguments, who, origin)
    shown = [outcome.text, outcome.payload, str(outcome.error or ""), outcome.record]
    assert not Forbidden.of(runtime.settings.state_dir, REPO).found(shown, sent=arguments), arguments
    return outcome


def secrets_for(principal: str, clear: Clear) -> list[str]:
    """Clear values `principal` may not read."""
    return {"analyst": clear.analyst_secrets, "support_agent": clear.support_secrets}.get(principal, [])


def record_leaks(outcome: GateOutcome, principal: str, clear: Clear) -> list[str]:
    """Clear values the caller may not read, found in its audit record (its own arguments aside)."""
    record = {key: value for key, value in (outcome.record or {}).items() if key != "arguments"}
    cards = clear.cards if principal in ("analyst", "support_agent") else frozenset()
    return leaked([[json.dumps(record)]], secrets_for(principal, clear), cards)


def rows_of(outcome: GateOutcome) -> list[list[Any]]:
    assert outcome.error is None, f"refused: {outcome.error}"
    assert outcome.result is not None
    rows: list[list[Any]] = outcome.result.rows  # type: ignore[attr-defined]
    return rows


def columns_of(outcome: GateOutcome) -> list[str]:
    assert outcome.result is not None
    return [column.name for column in outcome.result.columns]  # type: ignore[attr-defined]


def cells(value: Any) -> Iterator[Any]:
    """Every scalar inside a result value (structs and lists included)."""
    if isinstance(value, dict):
        for item in value.values():
            yield from cells(item)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from cells(item)
    else:
        yield value


# -- what admin sees: the clear values and the EMEA rows -----------------------------------------


@dataclass(frozen=True)
class Clear:
    emails: frozenset[str]
    names: frozenset[str]
    phones: frozenset[str]
    cards: frozenset[str]
    emea_customers: frozenset[int]
    emea_orders: frozenset[int]
    emea_order_customers: frozenset[int]
    emea_emails: frozenset[str]
    emea_names: frozenset[str]
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def analyst_secrets(self) -> list[str]:
        return sorted(self.emails | self.names | self.phones)

    @property
    def support_secrets(self) -> list[str]:
        # support_agent reads EMEA names and emails in clear; phones are always partial.
        visible = [value.lower() for value in self.emea_emails | self.emea_names]
        hidden = {value for value in self.emails | self.names if not any(value.lower() in shown for shown in visible)}
        return sorted(self.phones | hidden)


@pytest.fixture(scope="module")
def clear(demo_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Clear]:
    audit = tmp_path_factory.mktemp("clear-audit") / "audit.jsonl"
    opened = open_runtime(load_settings(REPO, home=demo_home, audit={"path": audit, "fsync": False}, principal=None))

    def admin(sql: str) -> list[list[Any]]:
        return rows_of(call(opened, "admin", {"sql": sql, "limit": 100}))

    def paged(sql: str) -> list[list[Any]]:
        found: list[list[Any]] = []
        while True:
            page = admin(f"{sql} LIMIT 100 OFFSET {len(found)}")
            found.extend(page)
            if len(page) < 100:
                return found

    try:
        customers = paged("SELECT customer_id, name, email, phone, region FROM sales.customers ORDER BY 1")
        orders = paged("SELECT order_id, customer_id FROM sales.orders WHERE region = 'EMEA' ORDER BY 1")
        cards = paged("SELECT DISTINCT card_last4 FROM finance.payments WHERE card_last4 IS NOT NULL ORDER BY 1")
        counts = {
            "orders": admin("SELECT count(*) FROM sales.orders")[0][0],
            "emea_orders": len(orders),
            "emea_customers": sum(1 for row in customers if row[4] == "EMEA"),
            "emea_revenue": admin("SELECT sum(total_amount) FROM sales.orders WHERE region = 'EMEA'")[0][0],
        }
        emea = [row for row in customers if row[4] == "EMEA"]
        yield Clear(
            emails=frozenset(row[2] for row in customers if row[2]),
            names=frozenset(row[1] for row in customers if row[1]),
            phones=frozenset(row[3] for row in customers if row[3]),
            cards=frozenset(row[0] for row in cards),
            emea_customers=frozenset(row[0] for row in emea),
            emea_orders=frozenset(row[0] for row in orders),
            emea_order_customers=frozenset(row[1] for row in orders),
            emea_emails=frozenset(row[2] for row in emea if row[2]),
            emea_names=frozenset(row[1] for row in emea if row[1]),
            counts=counts,
        )
    finally:
        opened.close()


def leaked(
    rows: list[list[Any]], secrets: list[str], cards: frozenset[str] = frozenset(), both: bool = True
) -> list[str]:
    """Clear values found in the result: a cell holding one, or (with `both`) a cell of 8 or more
    characters that is part of one (a substring of a clear email is still a leak)."""
    lowered = [secret.lower() for secret in secrets]
    haystack = "\x00".join(lowered)
    found = []
    for row in rows:
        for value in cells(row):
            if value is None:
                continue
            text = str(value)
            if isinstance(value, str) and text in cards:
                found.append(text)
                continue
            lower = text.lower()
            if both and len(lower) >= 8 and lower in haystack:
                found.append(text)
            found.extend(secret for secret in lowered if secret in lower)
    return found


# -- the corpus ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Refused:
    """A client error whose message holds `fragment`, audited with `outcome` and `decision`."""

    fragment: str
    outcome: str = "invalid"
    decision: str = "allow"


@dataclass(frozen=True)
class Answers:
    """An answer; `check` asserts on its rows (with admin's clear values at hand)."""

    check: Callable[[list[list[Any]], list[str], Clear], None]
    decision: str = "partial"


def _no_clear_pii(rows: list[list[Any]], columns: list[str], clear: Clear) -> None:
    assert rows
    assert not leaked(rows, clear.analyst_secrets, clear.cards)


def _hashed(*positions: int) -> Callable[[list[list[Any]], list[str], Clear], None]:
    def check(rows: list[list[Any]], columns: list[str], clear: Clear) -> None:
        _no_clear_pii(rows, columns, clear)
        for row in rows:
            for position in positions:
                assert row[position] is None or HASHED.match(row[position]), row

    return check


def _hashed_struct(rows: list[list[Any]], columns: list[str], clear: Clear) -> None:
    _no_clear_pii(rows, columns, clear)
    for row in rows:
        value = row[0]
        record = value if isinstance(value, dict) else json.loads(value)
        assert HASHED.match(record["email"]) and HASHED.match(record["name"]), record


def _all_hashed(rows: list[list[Any]], columns: list[str], clear: Clear) -> None:
    _no_clear_pii(rows, columns, clear)
    values = [value for row in rows for value in cells(row) if value is not None]
    assert values and all(HASHED.match(value) for value in values), values[:5]


def _joined_hashes(rows: list[list[Any]], columns: list[str], clear: Clear) -> None:
    _no_clear_pii(rows, columns, clear)
    parts = rows[0][0].split(",")
    assert len(parts) == len(clear.emails) and all(HASHED.match(part) for part in parts)


def _emea_only(rows: list[list[Any]], columns: list[str], clear: Clear) -> None:
    assert rows
    assert not leaked(rows, clear.support_secrets, both=False)
    for row in rows:
        record = dict(zip(columns, row, strict=True))
        if "region" in record:
            assert record["region"] == "EMEA", record
        if "customer_id" in record:
            assert record["customer_id"] in clear.emea_customers, record
        if "order_id" in record:
            assert record["order_id"] in clear.emea_orders, record
        if "phone" in record and record["phone"] is not None:
            assert PARTIAL.match(record["phone"]), record


def _count(key: str) -> Callable[[list[list[Any]], list[str], Clear], None]:
    def check(rows: list[list[Any]], columns: list[str], clear: Clear) -> None:
        assert rows == [[clear.counts[key]]], (rows, clear.counts)

    return check


def _empty(rows: list[list[Any]], columns: list[str], clear: Clear) -> None:
    assert rows == []


def _emea_revenue(rows: list[list[Any]], columns: list[str], clear: Clear) -> None:
    assert rows == [[clear.counts["emea_revenue"]]]


def _value(expected: Any) -> Callable[[list[list[Any]], list[str], Clear], None]:
    def check(rows: list[list[Any]], columns: list[str], clear: Clear) -> None:
        assert rows == expected

    return check


FILE_FUNCTION = "is not allowed: lakegate queries read governed tables only"
FUNCTION = "is not allowed: it reads files or URLs, or reveals the engine's internals"
NO_TABLE = "There is no table named"
NOT_AVAILABLE = "is available to you"
READ_ONLY = "Only read-only queries (SELECT) are allowed"


def _injection(table: str, replaces: list[tuple[str, str]]) -> str:
    """The red-team's bypass: a quoted type name that sqlglot wrote back as SQL opened a dollar-quoted
    string (tag with a no-break space, which sqlglot does not read as one) around the governed
    scan and ran it through query(replace(...)) without its mask or row filter."""
    tag = "$q\u00a0$"
    opens = "replace(" * len(replaces)
    closes = "".join(f", '{old}', '{new}')" for old, new in replaces)
    first = f"integral) AS a, q.* FROM query({opens}{tag}SELECT c.*, CAST(1 AS integral"
    second = f"integral) = 1{tag}{closes}) AS q WHERE CAST(1 AS integral"
    return f'SELECT CAST(1 AS "{first}") AS a FROM {table} AS c WHERE CAST(1 AS "{second}") = 1'


CORPUS: list[tuple[str, str, str | dict[str, Any], Refused | Answers]] = [
    # files and table functions
    ("read_csv", "analyst", "SELECT * FROM read_csv('/etc/passwd')", Refused(f"read_csv() {FILE_FUNCTION}")),
    (
        "read_parquet",
        "analyst",
        "SELECT * FROM read_parquet('/tmp/*.parquet')",
        Refused(f"read_parquet() {FILE_FUNCTION}"),
    ),
    ("read_json", "analyst", "SELECT * FROM read_json('/etc/hosts')", Refused(f"read_json() {FILE_FUNCTION}")),
    ("read_text", "analyst", "SELECT content FROM read_text('/etc/passwd')", Refused(f"read_text() {FILE_FUNCTION}")),
    ("read_blob_scalar", "analyst", "SELECT read_blob('/etc/passwd')", Refused(f"read_blob() {FUNCTION}")),
    ("glob", "analyst", "SELECT * FROM glob('/etc/*')", Refused(f"glob() {FILE_FUNCTION}")),
    (
        "parquet_metadata",
        "analyst",
        "SELECT * FROM parquet_metadata('x.parquet')",
        Refused(f"parquet_metadata() {FILE_FUNCTION}"),
    ),
    ("file_as_table", "analyst", "SELECT * FROM 'file.csv'", Refused(f"{NO_TABLE} 'file.csv'")),
    ("path_as_table", "analyst", 'SELECT * FROM "/etc/passwd"', Refused(f"{NO_TABLE} '/etc/passwd'")),
    (
        "iceberg_scan",
        "analyst",
        "SELECT * FROM iceberg_scan('warehouse/sales/customers')",
        Refused(f"iceberg_scan() {FILE_FUNCTION}"),
    ),
    (
        "query_string",
        "analyst",
        "SELECT * FROM query('SELECT email FROM sales.customers')",
        Refused(f"query() {FILE_FUNCTION}"),
    ),
    (
        "query_table",
        "analyst",
        "SELECT * FROM query_table('sales.customers')",
        Refused(f"query_table() {FILE_FUNCTION}"),
    ),
    ("getenv", "analyst", "SELECT getenv('HOME')", Refused(f"getenv() {FUNCTION}")),
    (
        "current_setting",
        "analyst",
        "SELECT current_setting('allowed_directories')",
        Refused(f"current_setting() {FUNCTION}"),
    ),
    ("version", "analyst", "SELECT version()", Refused(f"version() {FUNCTION}")),
    # the engine's catalog
    ("duckdb_tables", "analyst", "SELECT * FROM duckdb_tables()", Refused(f"duckdb_tables() {FILE_FUNCTION}")),
    ("duckdb_settings", "analyst", "SELECT * FROM duckdb_settings()", Refused(f"duckdb_settings() {FILE_FUNCTION}")),
    (
        "duckdb_functions",
        "analyst",
        "SELECT macro_definition FROM duckdb_functions()",
        Refused(f"duckdb_functions() {FILE_FUNCTION}"),
    ),
    ("duckdb_view", "analyst", "SELECT * FROM duckdb_columns", Refused(f"{NO_TABLE} 'duckdb_columns'")),
    (
        "information_schema",
        "analyst",
        "SELECT * FROM information_schema.tables",
        Refused(f"'information_schema.tables' {NOT_AVAILABLE}", "denied", "deny"),
    ),
    (
        "pg_catalog",
        "analyst",
        "SELECT * FROM pg_catalog.pg_proc",
        Refused(f"'pg_catalog.pg_proc' {NOT_AVAILABLE}", "denied", "deny"),
    ),
    ("pg_proc_bare", "analyst", "SELECT * FROM pg_proc", Refused(f"{NO_TABLE} 'pg_proc'")),
    ("sqlite_master", "analyst", "SELECT * FROM sqlite_master", Refused(f"{NO_TABLE} 'sqlite_master'")),
    # A three-part name is a table of an attached catalog: DuckDB's own catalogs are no such thing.
    (
        "catalog_name",
        "analyst",
        "SELECT * FROM system.main.duckdb_settings",
        Refused(f"'system.main.duckdb_settings' {NOT_AVAILABLE}", "denied", "deny"),
    ),
    (
        "embedded_catalog_name",
        "analyst",
        'SELECT * FROM "_embedded".pg_catalog.pg_proc',
        Refused(f"'pg_catalog.pg_proc' {NOT_AVAILABLE}", "denied", "deny"),
    ),
    # a CTE must not vouch for the same name outside its scope (pg_proc holds the hash key)
    (
        "cte_scope_sibling",
        "analyst",
        "SELECT * FROM (WITH pg_proc AS (SELECT 1) SELECT * FROM pg_proc) x, pg_proc",
        Refused(f"{NO_TABLE} 'pg_proc'"),
    ),
    (
        "cte_self_reference",
        "analyst",
        "WITH pg_settings AS (SELECT * FROM pg_settings) SELECT * FROM pg_settings",
        Refused(f"{NO_TABLE} 'pg_settings'"),
    ),
    (
        "cte_forward_reference",
        "analyst",
        "WITH a AS (SELECT * FROM pg_proc), pg_proc AS (SELECT 1) SELECT * FROM a",
        Refused(f"{NO_TABLE} 'pg_proc'"),
    ),
    (
        "cte_recursive_anchor",
        "analyst",
        "WITH RECURSIVE pg_settings AS (SELECT name FROM pg_settings "
        "UNION ALL SELECT name FROM pg_settings WHERE false) "
        "SELECT * FROM pg_settings",
        Refused(f"{NO_TABLE} 'pg_settings'"),
    ),
    (
        # Spark substitutes ${env:X}, ${system:X} and ${spark:X} into SQL text where allowed to.
        "variable_substitution",
        "admin",
        "SELECT '${system:user.dir}' AS d, '${env:HOME}' AS h FROM sales.orders LIMIT 1",
        Answers(_value([["${system:user.dir}", "${env:HOME}"]]), "allow"),
    ),
    (
        "cte_recursive_ok",
        "analyst",
        "WITH RECURSIVE r AS (SELECT 1 AS n UNION ALL SELECT n + 1 FROM r WHERE n < 3) SELECT count(*) FROM r",
        Answers(_value([[3]]), "allow"),
    ),
    # names sqlglot writes back verbatim: a quoted type, EXTRACT unit or DECIMAL argument holding SQL
    ("quoted_type", "analyst", 'SELECT 1::"varint) AS a --"', Refused("is not one lakegate knows")),
    (
        "quoted_try_cast",
        "analyst",
        'SELECT TRY_CAST(1 AS "oid) AS a, 1 AS b --")',
        Refused("is not one lakegate knows"),
    ),
    (
        "quoted_struct_field_type",
        "analyst",
        'SELECT STRUCT_PACK(a := 1)::STRUCT(a "integral) AS x, 1 AS y --")',
        Refused("is not one lakegate knows"),
    ),
    (
        "quoted_extract_unit",
        "analyst",
        """SELECT EXTRACT("year FROM current_date) AS a, current_setting('temp_directory') AS t, """
        """EXTRACT(year" FROM current_date)""",
        Refused("does not read back as written"),
    ),
    (
        "quoted_decimal_argument",
        "analyst",
        """SELECT CAST(1 AS DECIMAL("1)) AS a, lakegate_keyed_hash('1234') AS h, CAST(1 AS DECIMAL(1")) AS b""",
        Refused("does not read back as written"),
    ),
    (
        "quoted_type_unmasks_cards",
        "analyst",
        _injection("finance.payments", [("LAKEGATE_MASK_HASH", "")]),
        Refused("is not one lakegate knows"),
    ),
    (
        "quoted_type_lifts_the_row_filter",
        "support_agent",
        _injection(
            "sales.customers",
            [("LAKEGATE_MASK_PARTIAL", ""), ("WHERE (region = ''EMEA'')", "WHERE region <> ''EMEA''")],
        ),
        Refused("is not one lakegate knows"),
    ),
    # the second red-team pass: well-formed SQL smuggled through a quoted unit, argument or collation
    (
        "smuggled_mask_oracle_extract",
        "analyst",
        'SELECT p.payment_id, EXTRACT("YEAR FROM d) AS y, (SELECT v FROM (SELECT lakegate_mask_hash(v) AS h, v '
        "FROM (SELECT lpad(CAST(range AS VARCHAR), 4, '0') AS v FROM range(10000))) WHERE h = p.card_last4) AS c, "
        "EXTRACT(YEAR\" FROM d) AS e FROM finance.payments p, (SELECT DATE '2020-01-01' AS d) dd ORDER BY 1 LIMIT 3",
        Refused("does not read back as written"),
    ),
    (
        "smuggled_mask_oracle_decimal",
        "analyst",
        "SELECT CAST(1 AS DECIMAL(\"1, 0)) AS a, (SELECT lakegate_mask_hash(v) FROM (SELECT '3327' AS v)) AS h, "
        'CAST(1 AS DECIMAL(1", 0)) AS z',
        Refused("does not read back as written"),
    ),
    (
        "smuggled_catalog_view_by_cte_name",
        "analyst",
        'SELECT EXTRACT("YEAR FROM d) AS y, (SELECT * FROM pg_settings LIMIT 1) AS s, (WITH pg_settings AS '
        "(SELECT 1) SELECT 1) AS z, EXTRACT(YEAR\" FROM d) AS e FROM (SELECT DATE '2020-01-01' AS d)",
        Refused("does not read back as written"),
    ),
    ("error_channel", "analyst", "SELECT error(email) FROM sales.customers", Refused("error() is not allowed")),
    # the mask macros
    (
        "mask_macro",
        "analyst",
        "SELECT lakegate_mask_hash('alice@example.com')",
        Refused(f"lakegate_mask_hash() {FUNCTION}"),
    ),
    (
        "mask_macro_quoted_case",
        "analyst",
        'SELECT "LAKEGATE_MASK_PARTIAL"(email) FROM sales.customers',
        Refused(f"lakegate_mask_partial() {FUNCTION}"),
    ),
    (
        "mask_macro_schema",
        "analyst",
        "SELECT main.lakegate_mask_redact(email) FROM sales.customers",
        Refused(f"lakegate_mask_redact() {FUNCTION}"),
    ),
    # identifiers, comments
    ("quoted_case", "analyst", 'SELECT "EMAIL" FROM "SALES"."Customers" LIMIT 5', Answers(_hashed(0))),
    ("mixed_case", "analyst", "SELECT EmAiL, NaMe FROM SaLeS.CuStOmErS LIMIT 5", Answers(_hashed(0, 1))),
    ("quoted_dotted_name", "analyst", 'SELECT * FROM "sales.customers"', Refused(f"{NO_TABLE} 'sales.customers'")),
    (
        "line_comment",
        "analyst",
        "SELECT customer_id -- , email\n, email FROM sales.customers LIMIT 5",
        Answers(_hashed(1)),
    ),
    (
        "block_comment_in_name",
        "analyst",
        "SELECT /* name */ email FROM sales./**/customers LIMIT 5",
        Answers(_hashed(0)),
    ),
    (
        "nested_comment",
        "analyst",
        "SELECT 1 /* a /* b */ , (SELECT email FROM sales.customers LIMIT 1) */ AS x",
        Answers(_value([[1]]), "allow"),
    ),
    (
        "fully_qualified_column",
        "analyst",
        "SELECT sales.customers.email FROM sales.customers LIMIT 5",
        Answers(_hashed(0)),
    ),
    # shadowing, subqueries, set operations
    (
        "cte_shadows_table_name",
        "analyst",
        "WITH orders AS (SELECT email AS status FROM sales.customers) SELECT status FROM orders LIMIT 5",
        Answers(_hashed(0)),
    ),
    (
        "cte_named_like_governed",
        "analyst",
        "WITH customers AS (SELECT 'x' AS email) SELECT c.email FROM sales.customers c LIMIT 5",
        Answers(_hashed(0)),
    ),
    (
        "union_into_masked",
        "analyst",
        "SELECT status FROM sales.orders UNION ALL SELECT email FROM sales.customers",
        Answers(_no_clear_pii),
    ),
    (
        "masked_in_subquery",
        "analyst",
        "SELECT e FROM (SELECT email AS e FROM sales.customers) s WHERE e IS NOT NULL LIMIT 5",
        Answers(_hashed(0)),
    ),
    ("scalar_subquery", "analyst", "SELECT (SELECT max(email) FROM sales.customers) AS e", Answers(_hashed(0))),
    (
        "window",
        "analyst",
        "SELECT email, row_number() OVER (PARTITION BY region ORDER BY email) FROM sales.customers LIMIT 5",
        Answers(_hashed(0)),
    ),
    (
        "lateral",
        "analyst",
        "SELECT c.customer_id, x.e FROM sales.customers c, LATERAL (SELECT c.email AS e) x LIMIT 5",
        Answers(_hashed(1)),
    ),
    (
        "exists_on_clear_value",
        "analyst",
        "SELECT count(*) FROM sales.customers WHERE EXISTS (SELECT 1 FROM sales.customers d WHERE d.email LIKE '%@%')",
        Answers(_value([[0]])),
    ),
    ("support_count", "support_agent", "SELECT count(*) FROM sales.orders", Answers(_count("emea_orders"))),
    ("support_sum", "support_agent", "SELECT sum(total_amount) FROM sales.orders", Answers(_emea_revenue)),
    (
        "support_or_true",
        "support_agent",
        "SELECT * FROM sales.customers WHERE 1 = 1 OR region <> 'EMEA'",
        Answers(_emea_only),
    ),
    ("support_non_emea", "support_agent", "SELECT * FROM sales.customers WHERE region <> 'EMEA'", Answers(_empty)),
    (
        "support_join",
        "support_agent",
        "SELECT count(*) FROM sales.orders o JOIN sales.customers c USING (customer_id)",
        Answers(_count("emea_orders")),
    ),
    (
        "support_lateral_count",
        "support_agent",
        "SELECT x.n FROM sales.customers c, "
        "LATERAL (SELECT count(*) AS n FROM sales.orders o WHERE o.region <> 'EMEA') x LIMIT 1",
        Answers(_value([[0]])),
    ),
    (
        "support_rows",
        "support_agent",
        "SELECT c.customer_id, c.region, c.phone, o.order_id "
        "FROM sales.customers c JOIN sales.orders o USING (customer_id) ORDER BY o.order_id DESC",
        Answers(_emea_only),
    ),
    # several statements, DDL, DML and engine commands
    (
        "two_statements",
        "analyst",
        "SELECT 1; DROP TABLE sales.customers",
        Refused("Send exactly one statement; this SQL holds 2"),
    ),
    ("drop", "analyst", "DROP TABLE sales.customers", Refused(f"{READ_ONLY}; this is a DROP statement")),
    (
        "insert",
        "analyst",
        "INSERT INTO sales.orders SELECT * FROM sales.orders",
        Refused(f"{READ_ONLY}; this is a INSERT statement"),
    ),
    ("update", "analyst", "UPDATE sales.customers SET email = 'x'", Refused(READ_ONLY)),
    ("create_macro", "analyst", "CREATE MACRO lakegate_mask_hash(x) AS x", Refused(READ_ONLY)),
    ("create_table_as", "analyst", "CREATE TABLE t AS SELECT * FROM sales.customers", Refused(READ_ONLY)),
    ("attach", "analyst", "ATTACH '/tmp/x.db' AS x", Refused(READ_ONLY)),
    ("copy", "analyst", "COPY (SELECT * FROM sales.customers) TO '/tmp/x.csv'", Refused(READ_ONLY)),
    ("pragma", "analyst", "PRAGMA database_list", Refused(READ_ONLY)),
    ("set", "analyst", "SET enable_external_access = true", Refused(READ_ONLY)),
    ("install", "analyst", "INSTALL httpfs", Refused(READ_ONLY)),
    ("load", "analyst", "LOAD httpfs", Refused(READ_ONLY)),
    ("call", "analyst", "CALL duckdb_settings()", Refused(READ_ONLY)),
    ("export", "analyst", "EXPORT DATABASE '/tmp/out'", Refused("The SQL does not parse")),
    (
        "select_into",
        "analyst",
        "SELECT * INTO leak FROM sales.customers",
        Refused("INTO is not allowed inside a query"),
    ),
    ("describe", "analyst", "DESCRIBE sales.customers", Refused(f"{READ_ONLY}; this is a DESCRIBE statement")),
    ("summarize", "analyst", "SUMMARIZE sales.customers", Refused(f"{READ_ONLY}; this is a SUMMARIZE statement")),
    ("show", "analyst", "SHOW TABLES", Refused(f"{READ_ONLY}; this is a SHOW statement")),
    (
        "parameter_dollar",
        "analyst",
        "SELECT * FROM sales.customers WHERE customer_id = $1",
        Refused("Query parameters (?, $1, :name) are not supported"),
    ),
    ("parameter_question", "analyst", "SELECT ?", Refused("Query parameters (?, $1, :name) are not supported")),
    # size, nesting and text
    ("too_long", "analyst", "SELECT 1 -- " + "x" * 20_100, Refused("the most lakegate accepts is 20,000")),
    (
        "too_long_for_the_tool",
        "analyst",
        "SELECT 1 -- " + "x" * 100_100,
        Refused("String should have at most 100000 characters"),
    ),
    (
        "deep_parentheses",
        "analyst",
        "SELECT " + "(" * 60 + "1" + ")" * 60,
        Refused("nests parentheses more than 48 deep"),
    ),
    (
        "deep_subqueries",
        "analyst",
        "SELECT * FROM " + "(SELECT * FROM " * 50 + "sales.orders" + ") t" * 50,
        Refused("nests parentheses more than 48 deep"),
    ),
    ("deep_expression", "analyst", "SELECT " + "- " * 5000 + "1", Refused("nests expressions too deeply")),
    ("nul", "analyst", "SELECT 1\x00; DROP TABLE x", Refused("NUL character or invalid Unicode")),
    # who and what
    ("unknown_principal", "mallory", "SELECT 1", Refused("Principal 'mallory' may not call query", "denied", "deny")),
    (
        "denied_table",
        "analyst",
        "SELECT * FROM support.tickets",
        Refused(f"No dataset named 'support.tickets' {NOT_AVAILABLE}", "denied", "deny"),
    ),
    (
        "denied_table_time_travel",
        "analyst",
        {"sql": "SELECT * FROM support.tickets", "as_of": {"support.tickets": 1}},
        Refused(f"No dataset named 'support.tickets' {NOT_AVAILABLE}", "denied", "deny"),
    ),
    (
        "time_travel_in_sql",
        "analyst",
        "SELECT * FROM sales.customers AT (VERSION => 1)",
        Refused("For time travel pass as_of"),
    ),
    (
        "support_finance",
        "support_agent",
        "SELECT card_last4 FROM finance.payments",
        Refused(f"No dataset named 'finance.payments' {NOT_AVAILABLE}", "denied", "deny"),
    ),
    (
        "lance_dataset",
        "support_agent",
        "SELECT * FROM kb.articles",
        Refused("kb.articles is a Lance dataset of documents, not a table SQL can read"),
    ),
    # struct, list, JSON and star tricks
    ("struct_pack", "analyst", "SELECT struct_pack(email) FROM sales.customers LIMIT 5", Answers(_no_clear_pii)),
    ("list", "analyst", "SELECT list(email) FROM sales.customers", Answers(_all_hashed)),
    ("string_agg", "analyst", "SELECT string_agg(email, ',') FROM sales.customers", Answers(_joined_hashes)),
    ("to_json_row", "analyst", "SELECT to_json(c) FROM sales.customers c LIMIT 5", Answers(_hashed_struct)),
    ("whole_row", "analyst", "SELECT c FROM sales.customers c LIMIT 5", Answers(_hashed_struct)),
    ("row_to_json", "analyst", "SELECT row_to_json(c) FROM sales.customers c LIMIT 5", Answers(_hashed_struct)),
    ("alias_star", "analyst", "SELECT c.* FROM sales.customers c LIMIT 5", Answers(_hashed(1, 2, 3))),
    (
        "alias_column_list",
        "analyst",
        "SELECT t.a, t.b, t.c FROM sales.customers AS t(a, b, c) LIMIT 5",
        Answers(_hashed(1, 2)),
    ),
    ("columns_regex", "analyst", "SELECT COLUMNS('.*mail.*') FROM sales.customers LIMIT 5", Answers(_hashed(0))),
    ("star_like", "analyst", "SELECT * LIKE '%mail%' FROM sales.customers LIMIT 5", Answers(_hashed(0))),
    (
        "cast_masked",
        "analyst",
        "SELECT CAST(email AS VARCHAR(200)), email::BLOB FROM sales.customers LIMIT 5",
        Answers(_hashed(0)),
    ),
    (
        "cast_error_message",
        "analyst",
        "SELECT CAST(email AS INTEGER) FROM sales.customers WHERE email IS NOT NULL",
        Refused("Could not convert string", decision="partial"),
    ),
    ("exclude", "analyst", "SELECT * EXCLUDE (customer_id) FROM sales.customers LIMIT 5", Answers(_hashed(0, 1, 2))),
    (
        "replace",
        "analyst",
        "SELECT * REPLACE (upper(email) AS email) FROM sales.customers LIMIT 5",
        Answers(_no_clear_pii),
    ),
    ("from_first", "analyst", "FROM sales.customers SELECT email LIMIT 5", Answers(_hashed(0))),
    ("pivot_statement", "analyst", "PIVOT sales.customers ON region USING count(*)", Refused(READ_ONLY)),
    (
        "pivot_clause",
        "analyst",
        "SELECT * FROM sales.customers PIVOT (count(*) FOR region IN ('EMEA', 'NA')) LIMIT 5",
        Answers(_hashed(1, 2)),
    ),
    (
        "unpivot",
        "analyst",
        "SELECT v FROM (SELECT customer_id, name, email FROM sales.customers) "
        "UNPIVOT (v FOR k IN (name, email)) LIMIT 6",
        Answers(_all_hashed),
    ),
    (
        "recursive_carries_masked",
        "analyst",
        "WITH RECURSIVE r(n, e) AS (SELECT 1, (SELECT min(email) FROM sales.customers) "
        "UNION ALL SELECT n + 1, e FROM r WHERE n < 3) SELECT e FROM r",
        Answers(_hashed(0)),
    ),
    (
        "card_last4",
        "analyst",
        "SELECT card_last4 FROM finance.payments WHERE card_last4 IS NOT NULL LIMIT 5",
        Answers(_hashed(0)),
    ),
]


CORPUS_ARGUMENTS = {case[0]: {"sql": case[2]} if isinstance(case[2], str) else case[2] for case in CORPUS}
