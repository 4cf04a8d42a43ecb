"""Redaction in the audit log: what policies/redaction.yaml marks sensitive is logged only as an
HMAC under the state directory's key, through real gate calls on a private warehouse."""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
from pyiceberg.schema import Schema
from pyiceberg.types import LongType, NestedField, StringType

from lakegate.catalog.definitions import load_definitions
from lakegate.catalog.metric_definitions import parse_semantic_catalog
from lakegate.catalog.warehouse import Warehouse
from lakegate.errors import AuditWriteError
from lakegate.policies.redaction import RedactionRules, load_redaction
from lakegate.server.app import Runtime, open_runtime
from lakegate.server.audit.log import read_records, verify
from lakegate.server.audit.redaction import REDACTED, AuditKey, audit_arguments, redact_arguments
from lakegate.server.settings import load_settings
from tests.conftest import gate_call

REPO = Path(__file__).resolve().parents[1]
CUSTOMERS = "sales.customers"
MARKER = re.compile(r"\[redacted hmac-sha256:[0-9a-f]{16}\]")
EMAIL = "jane.doe@example.com"


def _customers_schema() -> Schema:
    # A part of the demo's sales.customers: name and email are tagged pii, region is not.
    return Schema(
        NestedField(1, "customer_id", LongType(), required=True),
        NestedField(2, "name", StringType(), required=False),
        NestedField(3, "email", StringType(), required=False),
        NestedField(4, "region", StringType(), required=False),
    )


def make_home(path: Path) -> Path:
    warehouse = Warehouse(path)
    warehouse.iceberg.create_namespace("sales")
    table = warehouse.iceberg.create_table(CUSTOMERS, _customers_schema())
    seed = [{"customer_id": 0, "name": "Seed", "email": "seed@example.com", "region": "NA"}]
    table.append(pa.Table.from_pylist(seed, schema=_customers_schema().as_arrow()))
    warehouse.close()
    return path


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return make_home(tmp_path / "home")


@contextmanager
def opened(home: Path, audit: Path, project: Path = REPO, **audit_settings: Any) -> Iterator[Runtime]:
    settings = load_settings(
        project, home=home, audit={"path": audit, "fsync": False, **audit_settings}, principal=None
    )
    runtime = open_runtime(settings)
    try:
        yield runtime
    finally:
        runtime.close()


call = gate_call


def customer(customer_id: int, email: str) -> dict[str, Any]:
    return {"customer_id": customer_id, "name": f"Customer {customer_id}", "email": email, "region": "EMEA"}


def expected_marker(home: Path, value: str) -> str:
    key = bytes.fromhex((home / "audit.key").read_text().strip())
    return f"[redacted hmac-sha256:{hmac.new(key, value.encode(), hashlib.sha256).hexdigest()[:16]}]"


def stored_emails(home: Path) -> set[str]:
    warehouse = Warehouse(home)
    try:
        rows = warehouse.iceberg_table(CUSTOMERS).scan().to_arrow().to_pylist()
        return {row["email"] for row in rows}
    finally:
        warehouse.close()


# -- through the gate ---------------------------------------------------------------------------


def test_appended_email_is_logged_only_as_a_keyed_hash(home: Path, tmp_path: Path) -> None:
    audit = tmp_path / "audit.jsonl"
    with opened(home, audit) as runtime:
        first = call(runtime, "admin", "append_rows", {"table": CUSTOMERS, "rows": [customer(1, EMAIL)]})
        second = call(
            runtime,
            "admin",
            "append_rows",
            {"table": CUSTOMERS, "rows": [customer(2, EMAIL), customer(3, "other@example.com")]},
        )
    assert first.error is None and second.error is None, (first.error, second.error)
    assert {EMAIL, "other@example.com"} <= stored_emails(home)  # the table holds the data in clear

    text = audit.read_text()
    assert EMAIL not in text and "other@example.com" not in text and "Customer 1" not in text
    records = list(read_records(audit))
    rows = [row for record in records for row in record["arguments"]["rows"]]
    assert all(MARKER.fullmatch(row["email"]) and MARKER.fullmatch(row["name"]) for row in rows)
    # The same email hashes the same in both calls; another email does not.
    assert rows[0]["email"] == rows[1]["email"] == expected_marker(home, EMAIL)
    assert rows[2]["email"] == expected_marker(home, "other@example.com") != rows[0]["email"]
    # Untagged columns and the table name stay readable.
    assert [row["region"] for row in rows] == ["EMEA"] * 3 and [row["customer_id"] for row in rows] == [1, 2, 3]
    assert records[0]["arguments"]["table"] == CUSTOMERS
    # The key file is the owner's alone and never in the log.
    key_file = home / "audit.key"
    assert key_file.stat().st_mode & 0o777 == 0o600
    assert key_file.read_text().strip() not in text
    assert verify(audit).ok


def test_another_home_has_another_key(home: Path, tmp_path: Path) -> None:
    other = make_home(tmp_path / "other-home")
    markers = []
    for state in (home, other):
        audit = state / "audit-test.jsonl"
        with opened(state, audit) as runtime:
            outcome = call(runtime, "admin", "append_rows", {"table": CUSTOMERS, "rows": [customer(1, EMAIL)]})
        assert outcome.error is None, outcome.error
        (record,) = read_records(audit)
        markers.append(record["arguments"]["rows"][0]["email"])
    assert MARKER.fullmatch(markers[0]) and MARKER.fullmatch(markers[1])
    assert markers[0] != markers[1]
    assert (home / "audit.key").read_text() != (other / "audit.key").read_text()


def test_sensitive_argument_names_are_hashed_even_in_a_refused_call(home: Path, tmp_path: Path) -> None:
    audit = tmp_path / "audit.jsonl"
    with opened(home, audit, sensitive_arguments=["name"]) as runtime:
        refused = call(runtime, "admin", "list_datasets", {"token": "s3cret-token", "nested": {"Password": "pw1"}})
        described = call(runtime, "admin", "describe_dataset", {"name": CUSTOMERS})
    assert refused.error is not None and refused.error.outcome == "invalid"
    assert described.error is None, described.error
    text = audit.read_text()
    assert "s3cret-token" not in text and "pw1" not in text
    first, second = read_records(audit)
    assert first["arguments"]["token"] == expected_marker(home, "s3cret-token")
    assert MARKER.fullmatch(first["arguments"]["nested"]["Password"])
    assert second["arguments"]["name"] == expected_marker(home, CUSTOMERS)  # named in the settings


def test_an_unreadable_key_fails_the_call_closed(home: Path, tmp_path: Path) -> None:
    (home / "audit.key").mkdir()
    audit = tmp_path / "audit.jsonl"
    with opened(home, audit) as runtime:
        outcome = call(runtime, "admin", "describe_dataset", {"name": CUSTOMERS, "token": "abc"})
        plain = call(runtime, "admin", "describe_dataset", {"name": CUSTOMERS})  # nothing to hide: no key needed
    assert outcome.error is not None and outcome.error.outcome == "audit_error" and outcome.result is None
    assert plain.error is None, plain.error
    assert [r["arguments"] for r in read_records(audit)] == [{"name": CUSTOMERS}]


def test_invalid_redaction_file_fails_closed_and_is_part_of_the_policy_version(home: Path, tmp_path: Path) -> None:
    project = tmp_path / "project"
    (project / "policies").mkdir(parents=True)
    redaction = project / "policies" / "redaction.yaml"
    redaction.write_text("arguments: [token]\ncolumn_tags: [pii]\nunknown: 1\n")
    audit = tmp_path / "audit.jsonl"
    with opened(home, audit, project=project) as runtime:
        assert runtime.enforcer.load_error is not None and "redaction.yaml" in runtime.enforcer.load_error
        assert runtime.enforcer.redaction.everything
        denied = call(runtime, "admin", "append_rows", {"table": CUSTOMERS, "rows": [customer(9, EMAIL)]})
        assert denied.error is not None and denied.error.outcome == "denied"

        redaction.write_text("arguments: [token]\ncolumn_tags: [pii]\n")
        assert runtime.enforcer.reload_if_changed() and runtime.enforcer.load_error is None
        own_version = runtime.enforcer.version
        allowed = call(runtime, "admin", "append_rows", {"table": CUSTOMERS, "rows": [customer(9, EMAIL)]})
        assert allowed.error is None, allowed.error
    with opened(home, tmp_path / "audit-repo.jsonl") as packaged:
        assert packaged.enforcer.version != own_version  # the redaction file is in the version

    denied_record, allowed_record = read_records(audit)
    # While the policy set was invalid nothing was known to be safe: every value was hashed.
    assert denied_record["policy_version"] == "invalid"
    assert MARKER.fullmatch(denied_record["arguments"]["table"])
    row = denied_record["arguments"]["rows"][0]
    assert all(MARKER.fullmatch(value) for value in row.values())
    assert allowed_record["arguments"]["table"] == CUSTOMERS
    assert allowed_record["arguments"]["rows"][0]["email"] == expected_marker(home, EMAIL)
    assert EMAIL not in audit.read_text()


# -- the functions, directly --------------------------------------------------------------------


def test_redaction_file_defaults_and_validation(tmp_path: Path) -> None:
    packaged = load_redaction(REPO / "policies" / "redaction.yaml")
    assert {"password", "token", "secret", "api_key"} <= packaged.arguments
    assert packaged.column_tags == frozenset({"pii"})
    assert load_redaction(None) == RedactionRules() and load_redaction(tmp_path / "none.yaml") == RedactionRules()
    bad = tmp_path / "redaction.yaml"
    for text in ("column_tags: [PII!]\n", "arguments: ['  ']\n", "arguments: [token\n"):
        bad.write_text(text)
        with pytest.raises(ValueError, match="redaction.yaml"):
            load_redaction(bad)
    bad.write_text("arguments: [Token]\ncolumn_tags: []\n")
    assert load_redaction(bad) == RedactionRules(frozenset({"token"}), frozenset())


def test_redact_arguments_with_and_without_a_key(tmp_path: Path) -> None:
    key = AuditKey(tmp_path / "audit.key")
    arguments = {"query": "x", "API_KEY": "k1", "nested": {"password": None, "token": {"a": 1}}, "n": 5}
    hashed = redact_arguments(arguments, ("api_key", "password", "token"), key=key)
    assert hashed["query"] == "x" and hashed["n"] == 5
    assert hashed["API_KEY"] == key.marker("k1") and MARKER.fullmatch(hashed["API_KEY"])
    assert hashed["nested"]["password"] is None  # null hides nothing
    assert hashed["nested"]["token"] == key.marker({"a": 1})
    assert AuditKey(tmp_path / "audit.key").marker("k1") == key.marker("k1")  # one key per file
    assert "audit.key" in repr(key) and (tmp_path / "audit.key").read_text().strip() not in repr(key)
    # Without a key (in-process callers that only need the shape): a constant marker.
    assert redact_arguments(arguments, ("api_key",))["API_KEY"] == REDACTED
    everything = redact_arguments({"a": "x", "b": [1, None], "c": {"d": True}}, (), key=key, everything=True)
    assert everything["b"][1] is None and all(
        MARKER.fullmatch(v) for v in (everything["a"], everything["b"][0], everything["c"]["d"])
    )
    with pytest.raises(AuditWriteError):
        AuditKey(tmp_path).marker("x")  # a directory holds no key


SEMANTIC = """
semantic_models:
  - name: customers
    table: sales.customers
    entities:
      - {name: customer, type: primary, expr: customer_id}
    dimensions:
      - {name: email, type: categorical}
      - {name: email_domain, type: categorical, expr: "split_part(email, '@', 2)"}
      - {name: region, type: categorical}
    measures:
      - {name: customer_count, agg: count, expr: customer_id}
metrics:
  - {name: customers, version: 1, type: simple, measure: customer_count, description: "Accounts", owner: me}
"""


def test_metric_filters_on_pii_dimensions_are_hashed(tmp_path: Path) -> None:
    key = AuditKey(tmp_path / "audit.key")
    semantic = parse_semantic_catalog(SEMANTIC, source="test")
    arguments = {
        "metrics": ["customers"],
        "where": [
            {"dimension": "customer__email", "op": "=", "value": EMAIL},
            {"dimension": "customer__email_domain", "op": "in", "value": ["example.com", "example.org"]},
            {"dimension": "customer__region", "op": "in", "value": ["EMEA"]},
            {"dimension": "customer__email", "op": "is null"},
            {"dimension": "not a dimension", "op": "=", "value": "kept"},
        ],
    }
    logged = audit_arguments(
        "query_metrics", arguments, RedactionRules(), key, definitions=load_definitions(REPO), semantic=semantic
    )
    where = logged["where"]
    assert where[0]["value"] == key.marker(EMAIL)
    assert where[1]["value"] == [key.marker("example.com"), key.marker("example.org")]
    assert where[2]["value"] == ["EMEA"] and "value" not in where[3] and where[4]["value"] == "kept"
    # With no tag marked sensitive, the same filters are logged as sent.
    plain = audit_arguments(
        "query_metrics",
        arguments,
        RedactionRules(column_tags=frozenset()),
        key,
        definitions=load_definitions(REPO),
        semantic=semantic,
    )
    assert plain["where"][0]["value"] == EMAIL


def test_a_pii_dimension_two_joins_away_is_hashed_too(tmp_path: Path) -> None:
    key = AuditKey(tmp_path / "audit.key")
    semantic = parse_semantic_catalog(TWO_HOPS, source="test")
    arguments = {"metrics": ["units"], "where": [{"dimension": "order__customer__email", "op": "=", "value": EMAIL}]}
    logged = audit_arguments(
        "query_metrics", arguments, RedactionRules(), key, definitions=load_definitions(REPO), semantic=semantic
    )
    assert logged["where"][0]["value"] == key.marker(EMAIL)  # the model at the end of the path holds the column


TWO_HOPS = """
semantic_models:
  - name: customers
    table: sales.customers
    entities:
      - {name: customer, type: primary, expr: customer_id}
    dimensions:
      - {name: email, type: categorical}
    measures: []
  - name: orders
    table: sales.orders
    entities:
      - {name: order, type: primary, expr: order_id}
      - {name: customer, type: foreign, expr: customer_id}
    measures: []
  - name: order_items
    table: sales.order_items
    entities:
      - {name: order_line, type: primary, expr: "order_id * 1000 + line_number"}
      - {name: order, type: foreign, expr: order_id}
    measures:
      - {name: units_sum, agg: sum, expr: quantity}
metrics:
  - {name: units, version: 1, type: simple, measure: units_sum, description: "Units", owner: me}
"""


def test_a_hidden_filter_value_is_cut_out_of_the_compiled_sql_too(tmp_path: Path) -> None:
    from lakegate.catalog.metric_compiler import compile_query
    from lakegate.catalog.metric_query import DimensionFilter, MetricQuery
    from lakegate.server.audit.redaction import SQL_WITHHELD, hidden_filter_values, hide_filter_values_in_sql

    key = AuditKey(tmp_path / "audit.key")
    semantic = parse_semantic_catalog(SEMANTIC, source="test")
    definitions = load_definitions(REPO)
    odd = "o'brien@example.com"
    # More values than the audit record keeps of a list: each one is still cut out of the SQL.
    many = [f"person{i}@example.com" for i in range(30)]
    where = [{"dimension": "customer__email", "op": "in", "value": [EMAIL, odd, *many]}]
    arguments = {"metrics": ["customers"], "where": where}
    filters = tuple(DimensionFilter(f["dimension"], f["op"], f["value"]) for f in where)
    compiled = compile_query(semantic, MetricQuery(("customers",), where=filters)).sql
    assert EMAIL in compiled and many[-1] in compiled  # the compiled SQL holds each filter value as a literal
    hidden = hidden_filter_values(
        "query_metrics", arguments, RedactionRules(), definitions=definitions, semantic=semantic
    )
    assert hidden == [EMAIL, odd, *many]
    details = {"compiled_sql": compiled, "rewritten_sql": compiled, "metrics": {"customers": 1}}
    cleaned, error = hide_filter_values_in_sql(details, f"bad value {EMAIL}", hidden, key)
    for field in ("compiled_sql", "rewritten_sql"):
        assert EMAIL not in cleaned[field] and "brien" not in cleaned[field] and many[-1] not in cleaned[field]
        assert key.marker(EMAIL) in cleaned[field]
    assert cleaned["metrics"] == {"customers": 1}
    assert error == SQL_WITHHELD  # an engine's error that quotes a hidden value is withheld too
    # Where a value cannot be cut out exactly (written another way), the SQL is withheld, not kept.
    other = {"compiled_sql": compiled.replace(f"'{EMAIL}'", f'"{EMAIL}"')}
    assert hide_filter_values_in_sql(other, None, hidden, key)[0]["compiled_sql"] == SQL_WITHHELD
    # A number is written by the SQL as Python writes it, whatever its spelling in filter text.
    text = ["{{ Dimension('customer__email') }} = 04915112345678"]
    numbers = hidden_filter_values(
        "query_metrics", {"where": text}, RedactionRules(), definitions=definitions, semantic=semantic
    )
    assert numbers == [4915112345678]
    number_sql = {"compiled_sql": "SELECT 1 WHERE email = 4915112345678"}
    assert hide_filter_values_in_sql(number_sql, None, numbers, key)[0]["compiled_sql"] == SQL_WITHHELD
    # Nothing hidden: the details as they were.
    plain = {"metrics": ["customers"], "where": [{"dimension": "customer__region", "op": "=", "value": "EMEA"}]}
    assert (
        hidden_filter_values("query_metrics", plain, RedactionRules(), definitions=definitions, semantic=semantic) == []
    )
    assert hide_filter_values_in_sql(details, "an error", [], key) == (details, "an error")


def test_filter_values_of_a_sensitive_argument_name_are_cut_out_of_the_sql_too(tmp_path: Path) -> None:
    from lakegate.server.audit.redaction import hidden_filter_values

    semantic = parse_semantic_catalog(SEMANTIC, source="test")
    arguments = {
        "metrics": ["customers"],
        "where": [
            {"dimension": "customer__region", "op": "=", "value": "EMEA"},
            "{{ Dimension('customer__region') }} = 'NA'",
        ],
    }
    definitions = load_definitions(REPO)
    for rules, extra in ((RedactionRules(arguments=frozenset({"value"})), ()), (RedactionRules(), ("where",))):
        hidden = hidden_filter_values(
            "query_metrics", arguments, rules, definitions=definitions, semantic=semantic, extra_names=extra
        )
        assert hidden == ["EMEA", "NA"]  # the record hides them: so must the SQL beside it
    everything = RedactionRules(everything=True)
    assert hidden_filter_values("query_metrics", arguments, everything, definitions=definitions, semantic=semantic) == [
        "EMEA",
        "NA",
    ]
