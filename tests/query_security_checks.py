"""The checks of the security corpus and of the property-based queries, shared by the DuckDB suite
(tests/test_query_security.py) and the same suite run on Spark (tests/test_spark_security.py)."""

from __future__ import annotations

from pathlib import Path

from lakegate.errors import ClientError
from lakegate.server.audit.log import read_records, verify
from lakegate.server.gate.gate import GateOutcome
from tests.query_security_corpus import (
    Answers,
    Clear,
    Refused,
    columns_of,
    leaked,
    record_leaks,
    rows_of,
    secrets_for,
)

__all__ = ["check_analyst_answer", "check_attempt", "check_support_answer"]


def check_attempt(
    outcome: GateOutcome, audit_path: Path, clear: Clear, principal: str, expected: Refused | Answers
) -> None:
    """One corpus case: refused with its fragment, or answered as its check says; nothing the caller may
    not read in the error or the audit record, which is the one record of the call."""
    if isinstance(expected, Refused):
        assert isinstance(outcome.error, ClientError), f"expected a refusal, got {outcome.error or outcome.text[:300]}"
        assert expected.fragment in str(outcome.error)
        assert outcome.result is None
        assert not leaked([[str(outcome.error)]], secrets_for(principal, clear), both=False)
    else:
        expected.check(rows_of(outcome), columns_of(outcome), clear)
    assert not record_leaks(outcome, principal, clear)
    records = list(read_records(audit_path))
    assert len(records) == 1
    record = records[-1]
    assert record["tool"] == "query" and record["principal"] == principal
    assert record["outcome"] == (expected.outcome if isinstance(expected, Refused) else "ok")
    assert record["decision"] == expected.decision
    assert verify(audit_path).ok


def check_analyst_answer(outcome: GateOutcome, sql: str, clear: Clear) -> None:
    """analyst's answer holds no clear value of a masked column, in its rows, column names or record."""
    assert outcome.error is None, f"{sql}: {outcome.error}"
    rows = rows_of(outcome)
    assert not leaked(rows, clear.analyst_secrets, clear.cards), sql
    assert not leaked([columns_of(outcome)], clear.analyst_secrets, clear.cards), sql
    assert not record_leaks(outcome, "analyst", clear), sql


def check_support_answer(outcome: GateOutcome, sql: str, clear: Clear) -> None:
    """support_agent's answer holds no row outside EMEA (by its witness columns) and no clear phone."""
    assert outcome.error is None, f"{sql}: {outcome.error}"
    rows = rows_of(outcome)
    assert not leaked(rows, clear.support_secrets, both=False), sql
    assert not record_leaks(outcome, "support_agent", clear), sql
    columns = columns_of(outcome)
    for row in rows:
        record = dict(zip(columns, row, strict=True))
        assert record.get("w_region", "EMEA") == "EMEA", (sql, record)
        if record.get("w_customer") is not None:
            assert record["w_customer"] in clear.emea_customers, (sql, record)
        if record.get("w_order") is not None:
            assert record["w_order"] in clear.emea_orders, (sql, record)
        if "n" in record and isinstance(record["n"], int):
            assert record["n"] <= max(clear.counts["emea_orders"], clear.counts["emea_customers"]), (sql, record)
