"""Security of the governed query tool (issue 3): attempts to get past the SQL guard, the DuckDB
sandbox on its own, and property-based queries that must never show a clear masked value or a
filtered row.

Every query runs in process through the gate (real DuckDB, pyiceberg and Casbin). A case either is
refused with a client error whose message says why, or answers with the masked and filtered values
the policy allows, and leaves exactly one audit record.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lakegate.errors import ClientError
from lakegate.evals.leaks import Forbidden
from lakegate.policies.sql_guard import InvalidQuery, parse_query
from lakegate.server.app import Runtime
from lakegate.server.audit.log import read_records, verify
from lakegate.server.audit.record_model import audit_record
from tests.query_security_checks import check_analyst_answer, check_attempt, check_support_answer
from tests.query_security_corpus import (
    CORPUS,
    CORPUS_ARGUMENTS,
    REPO,
    Answers,
    Clear,
    Refused,
    call,
    leaked,
    rows_of,
)


@pytest.mark.parametrize(
    ("principal", "arguments", "expected"), [case[1:] for case in CORPUS], ids=[case[0] for case in CORPUS]
)
def test_attempt_is_refused_or_governed(
    runtime: Runtime,
    audit_path: Path,
    clear: Clear,
    principal: str,
    arguments: str | dict[str, Any],
    expected: Refused | Answers,
) -> None:
    outcome = call(runtime, principal, {"sql": arguments} if isinstance(arguments, str) else arguments)
    check_attempt(outcome, audit_path, clear, principal, expected)


def test_the_corpus_is_large_enough() -> None:
    assert len(CORPUS) >= 45
    assert len({case[0] for case in CORPUS}) == len(CORPUS)


def test_a_denied_table_looks_like_a_missing_one(runtime: Runtime) -> None:
    for sql, time_travel in (("SELECT * FROM {}", False), ("SELECT count(*) FROM {}", True)):
        messages = []
        for table in ("support.tickets", "support.nothing"):
            arguments: dict[str, Any] = {"sql": sql.format(table)}
            if time_travel:
                arguments["as_of"] = {table: 1}
            outcome = call(runtime, "analyst", arguments)
            assert isinstance(outcome.error, ClientError) and outcome.record is not None
            messages.append((str(outcome.error).replace(table, "T"), outcome.record["outcome"]))
        assert messages[0] == messages[1]


def test_whole_row_reads_are_audited_as_masked_columns(runtime: Runtime) -> None:
    outcome = call(runtime, "analyst", {"sql": "SELECT to_json(c) FROM sales.customers c LIMIT 1"})
    assert outcome.record is not None
    masked = {r["name"] for r in outcome.record["resources"] if r["type"] == "column" and r["access"] == "masked"}
    assert masked == {"sales.customers.name", "sales.customers.email", "sales.customers.phone"}


def test_guard_refuses_invalid_unicode_before_anything_else() -> None:
    # Through the gate, pydantic refuses a lone surrogate first; the guard refuses it too.
    for sql in ("SELECT '\udc80'", "SELECT 1 \x00"):
        with pytest.raises(InvalidQuery, match="NUL character or invalid Unicode"):
            parse_query(sql, max_chars=1000)


def test_lone_surrogate_is_refused_and_audited(runtime: Runtime, audit_path: Path) -> None:
    outcome = call(runtime, "analyst", {"sql": "SELECT '\udc80'"})
    assert isinstance(outcome.error, ClientError)
    (record,) = read_records(audit_path)
    # The record keeps what was sent, as an escape (UTF-8 cannot hold a lone surrogate).
    assert record["arguments"]["sql"] == "SELECT '\\udc80'" and record["outcome"] == "invalid"


# -- property-based queries ----------------------------------------------------------------------

TEXT_FUNCTIONS = (
    "{}", "upper({})", "lower({})", "concat({}, '!')", "substr({}, 2, 12)", "left({}, 10)", "right({}, 9)",
    "trim({})", "coalesce({}, '-')", "CAST({} AS VARCHAR)", "{} || ''", "replace({}, '#', '%')", "ltrim({}, 'x')",
)  # fmt: skip
TABLES = {
    "c": ("sales.customers", ("name", "email", "phone", "region", "segment", "country"), "customer_id"),
    "o": ("sales.orders", ("status", "channel", "region"), "order_id"),
    "p": ("finance.payments", ("card_last4", "method"), "payment_id"),
}
PREDICATES = {
    "c": ("c.region = 'NA'", "c.email LIKE '%a%'", "c.customer_id < 120", "length(c.name) > 5", "c.phone IS NOT NULL"),
    "o": ("o.total_amount > 100", "o.status = 'delivered'", "o.region <> 'EMEA'", "o.order_id % 3 = 0"),
    "p": ("p.method = 'card'", "p.amount > 50", "p.card_last4 IS NOT NULL"),
}
#: Witness columns: raw ids and regions whose values must lie in admin's EMEA sets for support_agent.
WITNESSES = {
    "c": "c.customer_id AS w_customer, c.region AS w_region",
    "o": "o.order_id AS w_order, o.region AS w_region",
}
WITNESS_IDS = {"c": "w_customer", "o": "w_order"}


@st.composite
def queries(draw: st.DrawFn, aliases: tuple[str, ...]) -> str:
    def text(alias: str) -> str:
        column = draw(st.sampled_from(TABLES[alias][1]))
        return draw(st.sampled_from(TEXT_FUNCTIONS)).format(f"{alias}.{column}")

    def where(alias: str) -> str:
        if not draw(st.booleans()):
            return ""
        return " WHERE " + draw(st.sampled_from(PREDICATES[alias]))

    def projection(alias: str) -> str:
        parts = [f"{text(alias)} AS v{i}" for i in range(draw(st.integers(1, 3)))]
        if alias in WITNESSES:
            parts.append(WITNESSES[alias])
        return ", ".join(parts)

    alias = draw(st.sampled_from(aliases))
    table = TABLES[alias][0]
    shape = draw(st.sampled_from(("plain", "join", "group", "union", "subquery", "cte", "scalar", "in")))
    limit = f" LIMIT {draw(st.integers(1, 25))}"
    if shape == "join" and {"c", "o"} <= set(aliases):
        parts = [f"{text('c')} AS v0", f"{text('o')} AS v1", WITNESSES["c"], "o.order_id AS w_order"]
        pred = draw(st.sampled_from(("", " WHERE " + draw(st.sampled_from(PREDICATES["c"] + PREDICATES["o"])))))
        join = "sales.customers c JOIN sales.orders o ON c.customer_id = o.customer_id"
        return f"SELECT {', '.join(parts)} FROM {join}{pred}{limit}"
    if shape == "group":
        key = text(alias)
        aggregate = draw(
            st.sampled_from((f"string_agg({text(alias)}, ',')", f"max({text(alias)})", f"list({text(alias)})"))
        )
        witness = f", min({alias}.{TABLES[alias][2]}) AS {WITNESS_IDS.get(alias, 'w_any')}"
        source = f"{table} {alias}{where(alias)}"
        return f"SELECT {key} AS g, count(*) AS n, {aggregate} AS a{witness} FROM {source} GROUP BY 1{limit}"
    if shape == "union":
        other = draw(st.sampled_from(aliases))
        keyword = draw(st.sampled_from(("UNION", "UNION ALL", "EXCEPT", "INTERSECT")))
        return (
            f"SELECT {text(alias)} AS v FROM {table} {alias}{where(alias)} {keyword} "
            f"SELECT {text(other)} FROM {TABLES[other][0]} {other}{where(other)}{limit}"
        )
    if shape == "subquery":
        return f"SELECT * FROM (SELECT {projection(alias)} FROM {table} {alias}{where(alias)}) s{limit}"
    if shape == "cte":
        source = f"{table} {alias}{where(alias)}"
        return f"WITH x AS (SELECT {projection(alias)} FROM {source}) SELECT * FROM x ORDER BY 1{limit}"
    if shape == "scalar":
        source = f"{table} {alias}{where(alias)}"
        return f"SELECT (SELECT max({text(alias)}) FROM {source}) AS v, (SELECT count(*) FROM {table} {alias}) AS n"
    if shape == "in" and {"c", "o"} <= set(aliases):
        return (
            f"SELECT {projection('c')} FROM sales.customers c WHERE c.customer_id IN "
            f"(SELECT o.customer_id FROM sales.orders o{where('o')}){limit}"
        )
    return f"SELECT {projection(alias)} FROM {table} {alias}{where(alias)}{limit}"


SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@SETTINGS
@given(sql=queries(("c", "o", "p")))
def test_analyst_never_sees_a_clear_value(runtime: Runtime, clear: Clear, sql: str) -> None:
    check_analyst_answer(call(runtime, "analyst", {"sql": sql, "limit": 50}), sql, clear)


@SETTINGS
@given(sql=queries(("c", "o")))
def test_support_agent_never_sees_a_filtered_row_or_a_clear_phone(runtime: Runtime, clear: Clear, sql: str) -> None:
    check_support_answer(call(runtime, "support_agent", {"sql": sql, "limit": 50}), sql, clear)


def test_the_leak_checks_catch_what_admin_sees(runtime: Runtime, clear: Clear) -> None:
    """Positive control: the same checks flag admin's clear answers, so the properties above can fail."""
    for sql in (
        "SELECT substr(c.email, 2, 12) FROM sales.customers c",
        "SELECT upper(c.name) || '!' FROM sales.customers c",
        "SELECT string_agg(c.phone, ',') FROM sales.customers c",
    ):
        rows = rows_of(call(runtime, "admin", {"sql": sql, "limit": 50}))
        assert leaked(rows, clear.analyst_secrets, clear.cards), sql
    rows = rows_of(call(runtime, "admin", {"sql": "SELECT c.name, c.phone FROM sales.customers c", "limit": 50}))
    assert leaked(rows, clear.support_secrets, both=False)
    ids = rows_of(call(runtime, "admin", {"sql": "SELECT customer_id FROM sales.customers", "limit": 50}))
    assert any(row[0] not in clear.emea_customers for row in ids)
    cards = rows_of(call(runtime, "admin", {"sql": "SELECT card_last4 FROM finance.payments", "limit": 50}))
    assert leaked(cards, [], clear.cards)


def test_a_query_naming_hundreds_of_tables_is_refused_before_duckdb_plans_it(runtime: Runtime) -> None:
    """DuckDB's join ordering cannot be interrupted: 300 self-joins held a sandbox for ~2 minutes."""
    joins = " ".join(f"JOIN sales.orders o{i} USING (order_id)" for i in range(1, 300))
    outcome = call(runtime, "analyst", {"sql": f"SELECT count(*) FROM sales.orders o0 {joins}"})
    assert isinstance(outcome.error, InvalidQuery) and "at most 32" in str(outcome.error)


def test_the_corpus_through_the_real_mcp_client_over_stdio(demo_home: Path, audit_path: Path, clear: Clear) -> None:
    """The same attempts, sent by the MCP SDK client to a `lakegate serve` subprocess: what an agent
    sees over the wire is the same refusal or the same governed answer, and every call is audited."""
    from lakegate.evals.mcp_client import connect, text_of

    by_principal: dict[str, list[tuple[str, dict[str, Any], Refused | Answers]]] = {}
    for case_id, principal, arguments, expected in CORPUS:
        payload = {"sql": arguments} if isinstance(arguments, str) else arguments
        by_principal.setdefault(principal, []).append((case_id, payload, expected))

    async def scenario() -> list[tuple[str, Refused | Answers, bool, str, Any]]:
        seen = []
        for principal, cases in by_principal.items():
            async with connect(principal, demo_home, LAKEGATE_AUDIT__PATH=str(audit_path)) as client:
                for case_id, payload, expected in cases:
                    answer = await client.call_tool("query", payload)
                    seen.append((case_id, expected, bool(answer.is_error), text_of(answer), answer.structured_content))
        return seen

    seen = anyio.run(scenario)
    forbidden = Forbidden.of(demo_home, REPO)
    for case_id, expected, is_error, text, structured in seen:
        assert not forbidden.found([text, structured], sent=dict(CORPUS_ARGUMENTS[case_id])), case_id
        if isinstance(expected, Refused):
            assert is_error and expected.fragment in text, f"{case_id}: {text[:300]}"
            assert structured is None, case_id
        else:
            assert not is_error, f"{case_id}: {text[:300]}"
            expected.check(structured["rows"], [c["name"] for c in structured["columns"]], clear)
    records = [record for record in read_records(audit_path) if not audit_record(record).is_listing]
    assert len(records) == len(CORPUS) and all(r["transport"] == "stdio" for r in records)
    for record in records:
        assert not forbidden.found({k: v for k, v in record.items() if k != "arguments"}), record["request_id"]
    assert verify(audit_path).ok
