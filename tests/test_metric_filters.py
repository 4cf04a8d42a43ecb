"""Filters as dbt MetricFlow writes them (OR, NOT, references through joins), grouping by an
entity, and saved queries: parsed by sqlglot, never spliced; under policy like every metric query."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from lakegate.catalog.metric_definitions import parse_semantic_catalog, split_references
from lakegate.catalog.metric_filters import compared_values, hide_filter_values, parse_filter
from lakegate.catalog.metric_query import DimensionFilter, FilterTree
from lakegate.errors import InvalidArgument
from lakegate.server.app import Runtime
from lakegate.server.audit.log import read_records
from tests.metrics_support import assert_table, gate, hand, metric_rows, metrics, ok, refused

SECRET = "ada@example.com"

# --- reading the text ------------------------------------------------------------------------------


def test_a_reference_is_a_placeholder_until_the_compiler_resolves_it() -> None:
    text, names = split_references(
        "{{ Dimension('customer__Country') }} = 'MX' "
        "OR {{Dimension('region', entity_path=['customer', 'country'])}} IS NULL "
        "OR {{ TimeDimension('metric_time', 'Month') }} = '2022-03-01' OR {{ Entity('customer') }} = 'c1' "
        "OR {{ TimeDimension('ds', 'day', entity_path=['transaction']) }} > '2022-01-01'"
    )
    assert text == (
        "lakegate_ref_0 = 'MX' OR lakegate_ref_1 IS NULL OR lakegate_ref_2 = '2022-03-01' OR lakegate_ref_3 = 'c1' "
        "OR lakegate_ref_4 > '2022-01-01'"
    )
    assert names == [
        "customer__country",
        "customer__country__region",
        "metric_time__month",
        "customer",
        "transaction__ds__day",
    ]
    for unsupported in (
        "{{ Metric('revenue', group_by=['customer']) }} > 10",
        "{{ Dimension('region', 'month') }} = 'x'",  # a grain belongs to a TimeDimension
        "{{ TimeDimension('metric_time', 'fortnight') }} = 'x'",
        "{{ Dimension('region') | upper }} = 'X'",
    ):
        with pytest.raises(ValueError, match="only"):
            split_references(unsupported)


def test_a_filter_reads_as_typed_filters_joined_by_and_or_and_not() -> None:
    country = "{{ Dimension('customer__customer_country') }}"
    read = parse_filter(f"NOT ({country} = 'MX' OR {{{{ Dimension('transaction__is_large') }}}})")
    assert read == (
        FilterTree(
            "not",
            (
                FilterTree(
                    "or",
                    (
                        DimensionFilter("customer__customer_country", "=", "MX"),
                        DimensionFilter("transaction__is_large", "=", True),
                    ),
                ),
            ),
        ),
    )
    # A top-level AND is a list of filters, each as a typed filter would be.
    read = parse_filter(
        f"{country} IN ('MX', 'CA') AND 10 < {{{{ Dimension('order__total') }}}} AND {country} IS NOT NULL "
        f"AND {country} NOT IN ('US') AND {{{{ TimeDimension('metric_time', 'day') }}}} BETWEEN DATE '2022-03-01' "
        "AND '2022-03-31' AND {{ Entity('customer') }} != -3"
    )
    assert read == (
        DimensionFilter("customer__customer_country", "in", ["MX", "CA"]),
        DimensionFilter("order__total", ">", 10),  # the literal on the left: the comparison flips
        DimensionFilter("customer__customer_country", "is not null"),
        DimensionFilter("customer__customer_country", "not in", ["US"]),
        DimensionFilter("metric_time__day", ">=", "2022-03-01"),  # BETWEEN alone: two filters joined by AND
        DimensionFilter("metric_time__day", "<=", "2022-03-31"),
        DimensionFilter("customer", "!=", -3),
    )
    between = parse_filter(f"NOT {country} BETWEEN 'A' AND 'M'")  # inside NOT: still one condition
    assert between == (
        FilterTree(
            "not",
            (
                FilterTree(
                    "and",
                    (
                        DimensionFilter("customer__customer_country", ">=", "A"),
                        DimensionFilter("customer__customer_country", "<=", "M"),
                    ),
                ),
            ),
        ),
    )


@pytest.mark.parametrize(
    "text",
    [
        f"upper({{{{ Dimension('customer__email') }}}}) = '{SECRET}'",  # a function
        f"{{{{ Dimension('customer__email') }}}} = (SELECT '{SECRET}')",  # a subquery
        f"email = '{SECRET}'",  # a column, not a reference
        f"{{{{ Dimension('customer__email') }}}} LIKE '{SECRET}%'",
        f"{{{{ Dimension('customer__email') }}}} || 'x' = '{SECRET}'",
        f"{{{{ Dimension('customer__email') }}}} = '{SECRET}'; DROP TABLE x",
        f"{{{{ Dimension('customer__email') }}}} = '{SECRET}",  # does not parse
        f"{{{{ Dimension('customer__email') }}}} IN (SELECT '{SECRET}')",
        "{{ Dimension('customer__email') }} = {{ Dimension('customer__name') }}",
        f"'{SECRET}'",
        f"{{{{ Dimension('customer__email') }}}} BETWEEN SYMMETRIC '{SECRET}' AND 'a'",
        f"{{{{ Dimension('customer__email') }}}} = CAST('{SECRET}' AS VARCHAR)",
    ],
)
def test_a_filter_that_is_more_than_comparisons_with_values_is_refused_without_its_values(text: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        parse_filter(text)
    assert SECRET not in str(caught.value) and SECRET not in (caught.value.hint or "")
    assert "Dimension" in (caught.value.hint or "")  # says how to write one


def test_values_of_a_hidden_dimension_are_replaced_in_the_filter_text() -> None:
    def marker(value: object) -> str:
        return f"[hidden {len(str(value))}]"

    text = f"{{{{ Dimension('customer__email') }}}} = '{SECRET}' OR {{{{ Dimension('customer__region') }}}} = 'EMEA'"
    shown = hide_filter_values(text, lambda name: name == "customer__email", marker)
    assert shown is not None and SECRET not in shown and "[hidden 15]" in shown and "'EMEA'" in shown
    assert compared_values(text) == [("customer__email", SECRET), ("customer__region", "EMEA")]
    assert hide_filter_values(text, lambda name: False, marker) == text  # nothing hidden: as sent
    # A filter lakegate refuses that names a hidden dimension is hidden whole: a refused construct
    # may hold a value in any form (a function's argument, a double-quoted "value", $$value$$).
    for refused_text in (
        f"upper({{{{ Dimension('customer__email') }}}}) = '{SECRET}' OR 'EMEA' = 'EMEA'",
        f"{{{{ Dimension('customer__email') }}}} = \"{SECRET}\"",
        f"{{{{ Dimension('customer__email') }}}} = $${SECRET}$$",
        f"'{SECRET}",  # does not parse
    ):
        assert hide_filter_values(refused_text, lambda name: name == "customer__email", marker) is None
    # A value that spells a placeholder stays the value it was in the record.
    spelled = "{{ Dimension('customer__email') }} = 'lakegate_ref_0'"
    assert hide_filter_values(spelled, lambda name: True, marker) == (
        "{{ Dimension('customer__email') }} = '[hidden 14]'"
    )
    both = spelled + " OR {{ Dimension('x__y') }} = 'lakegate_ref_0'"
    assert hide_filter_values(both, lambda name: name == "x__y", marker) == (
        "{{ Dimension('customer__email') }} = 'lakegate_ref_0' OR {{ Dimension('x__y') }} = '[hidden 14]'"
    )


def test_filter_text_that_would_take_long_to_read_is_refused_at_once() -> None:
    import time

    started = time.perf_counter()
    with pytest.raises(InvalidArgument):  # backtracking in the reference pattern was exponential
        parse_filter("{{ Dimension('a', entity_path=[" + "'a' " * 40 + "x")
    with pytest.raises(InvalidArgument, match="nests more than"):  # sqlglot parses by recursion
        parse_filter("NOT " * 900 + "{{ Dimension('customer__region') }} = 'x'")
    with pytest.raises(InvalidArgument, match="nests more than"):
        parse_filter("(" * 500 + "{{ Dimension('customer__region') }} = 'x'" + ")" * 500)
    assert time.perf_counter() - started < 5


# --- on the demo warehouse -------------------------------------------------------------------------


def test_or_and_not_filters_give_the_rows_of_the_same_filter_in_sql(rt: Runtime) -> None:
    expected = hand(
        rt,
        """
        SELECT o.region, sum(o.total_amount) FROM sales.orders o JOIN sales.customers c ON c.customer_id = o.customer_id
        WHERE o.status <> 'cancelled' AND NOT (c.segment = 'smb' OR o.channel IN ('web', 'app'))
        GROUP BY o.region ORDER BY o.region
        """,
    )
    where = "NOT ({{ Dimension('customer__segment') }} = 'smb' OR {{ Dimension('order__channel') }} IN ('web', 'app'))"
    assert_table(metric_rows(rt, metrics=["revenue"], group_by=["order__region"], where=[where]), expected)
    # Typed filters and text filters mix, joined by AND.
    typed = {"dimension": "order__region", "op": "=", "value": "EMEA"}
    assert_table(
        metric_rows(rt, metrics=["revenue"], group_by=["order__region"], where=[typed, where]),
        [row for row in expected if row[0] == "EMEA"],
    )


def test_an_or_filter_cannot_widen_a_row_filter(rt: Runtime) -> None:
    either = "{{ Dimension('order__region') }} = 'EMEA' OR {{ Dimension('order__region') }} != 'EMEA'"
    rows = metric_rows(rt, "support_agent", metrics=["orders"], group_by=["order__region"], where=[either])
    assert [row[0] for row in rows] == ["EMEA"]
    everyone = metric_rows(rt, "admin", metrics=["orders"], group_by=["order__region"], where=[either])
    assert len(everyone) > 1 and [r for r in everyone if r[0] == "EMEA"] == rows


def test_a_metric_time_between_is_two_period_filters(rt: Runtime) -> None:
    between = "{{ TimeDimension('metric_time', 'day') }} BETWEEN '2025-01-01' AND '2025-03-31'"
    rows = metric_rows(rt, metrics=["revenue"], group_by=["metric_time__month"], where=[between])
    typed = [
        {"dimension": "metric_time__day", "op": ">=", "value": "2025-01-01"},
        {"dimension": "metric_time__day", "op": "<=", "value": "2025-03-31"},
    ]
    assert [row[0] for row in rows] == ["2025-01-01", "2025-02-01", "2025-03-01"]
    assert rows == metric_rows(rt, metrics=["revenue"], group_by=["metric_time__month"], where=typed)


def test_a_metric_time_filter_inside_or_is_refused_with_what_to_do(rt: Runtime) -> None:
    where = "{{ TimeDimension('metric_time', 'month') }} = '2025-01-01' OR {{ Dimension('order__region') }} = 'EMEA'"
    error = refused(rt, "query_metrics", metrics=["revenue"], group_by=["metric_time__month"], where=[where])
    assert "metric_time" in str(error) and "on its own" in (error.hint or "")
    alone = "{{ TimeDimension('metric_time', 'month') }} = '2025-01-01'"
    rows = metric_rows(rt, metrics=["revenue"], group_by=["metric_time__month"], where=[alone])
    assert [row[0] for row in rows] == ["2025-01-01"]


def test_grouping_by_an_entity_gives_its_keys(rt: Runtime) -> None:
    expected = hand(
        rt,
        "SELECT customer_id, count(*) FROM sales.orders WHERE customer_id <= 5 GROUP BY 1 ORDER BY 1",
    )
    rows = metric_rows(
        rt,
        metrics=["orders"],
        group_by=["customer"],
        where=[{"dimension": "customer", "op": "<=", "value": 5}],
    )
    assert rows == expected
    error = refused(rt, "query_metrics", metrics=["orders"], group_by=["product"])
    assert "holds no product key" in str(error)
    described = ok(rt, "describe_metric", name="orders")
    assert "customer" in described["dimensions"] and "order" in described["dimensions"]


def test_a_saved_query_answers_as_its_metrics_do_and_is_listed(rt: Runtime) -> None:
    listed = ok(rt, "list_metrics")
    saved = {line.split(":")[0]: line for line in listed["saved_queries"]}
    assert saved["revenue_by_region_and_month"].startswith(
        "revenue_by_region_and_month: revenue, orders by metric_time__month"
    )
    answer = metrics(rt, saved_query="revenue_by_region_and_month")
    asked = metrics(rt, metrics=["revenue", "orders"], group_by=["metric_time__month", "order__region"])
    assert answer["rows"] == asked["rows"] and answer["columns"] == asked["columns"]
    narrowed = metrics(
        rt,
        saved_query="revenue_by_region_and_month",
        where=["{{ Dimension('order__region') }} = 'EMEA'"],
        order_by=["-revenue"],
    )
    assert {row[1] for row in narrowed["rows"]} == {"EMEA"}
    revenue = [Decimal(row[2]) for row in narrowed["rows"]]
    assert revenue == sorted(revenue, reverse=True)
    error = refused(rt, "query_metrics", saved_query="revenue_by_region_and_month", metrics=["revenue"])
    assert "saved query" in str(error)


def test_a_saved_query_under_policy(rt: Runtime) -> None:
    # The demo's support_agent may read revenue and orders (EMEA rows only), not active_customers.
    listed = ok(rt, "list_metrics", "support_agent")["saved_queries"]
    assert [line.split(":")[0] for line in listed] == ["revenue_by_region_and_month"]
    rows = metrics(rt, "support_agent", saved_query="revenue_by_region_and_month")["rows"]
    assert rows and {row[1] for row in rows} == {"EMEA"}
    hidden = refused(rt, "query_metrics", "support_agent", saved_query="business_revenue_by_month")
    missing = refused(rt, "query_metrics", "support_agent", saved_query="no_such_query")
    assert hidden.outcome == missing.outcome == "not_found"
    assert str(hidden).replace("business_revenue_by_month", "X") == str(missing).replace("no_such_query", "X")
    # Its own filter applies: smb and enterprise customers only.
    business = metric_rows(
        rt,
        metrics=["revenue"],
        group_by=["metric_time__month"],
        where=[{"dimension": "customer__segment", "op": "in", "value": ["smb", "enterprise"]}],
    )
    saved = metrics(rt, saved_query="business_revenue_by_month")
    assert [row[:2] for row in saved["rows"]] == business


def test_the_audit_record_of_a_text_filter_hides_values_of_tagged_dimensions(tmp_path: Path) -> None:
    from lakegate.catalog.definitions import load_definitions
    from lakegate.server.audit.redaction import (
        AuditKey,
        RedactionRules,
        audit_arguments,
        hidden_filter_values,
        hide_filter_values_in_sql,
    )
    from tests.test_audit_redaction import REPO, SEMANTIC

    key = AuditKey(tmp_path / "audit.key")
    semantic = parse_semantic_catalog(SEMANTIC, source="test")
    text = f"{{{{ Dimension('customer__email') }}}} = '{SECRET}' OR {{{{ Dimension('customer__region') }}}} = 'EMEA'"
    arguments = {"metrics": ["customers"], "where": [text]}
    logged = audit_arguments(
        "query_metrics", arguments, RedactionRules(), key, definitions=load_definitions(REPO), semantic=semantic
    )
    assert SECRET not in str(logged) and key.marker(SECRET) in logged["where"][0] and "'EMEA'" in logged["where"][0]
    details = {"compiled_sql": f"SELECT 1 WHERE email = '{SECRET}' OR region = 'EMEA'"}
    hidden = hidden_filter_values(
        "query_metrics", arguments, RedactionRules(), definitions=load_definitions(REPO), semantic=semantic
    )
    assert hidden == [SECRET]
    cleaned, _ = hide_filter_values_in_sql(details, None, hidden, key)
    assert SECRET not in cleaned["compiled_sql"] and key.marker(SECRET) in cleaned["compiled_sql"]
    # A filter text longer than the record keeps of a string: its values are still cut out of the SQL.
    long_text = text + " AND {{ Dimension('customer__region') }} != '" + "x" * 2100 + "'"
    hidden = hidden_filter_values(
        "query_metrics", {"where": [long_text]}, RedactionRules(), definitions=load_definitions(REPO), semantic=semantic
    )
    assert hidden == [SECRET]


def test_a_text_filter_call_is_audited_with_its_filter(rt: Runtime) -> None:
    where = "{{ Dimension('order__region') }} = 'EMEA' OR {{ Dimension('order__channel') }} = 'web'"
    outcome = gate(rt, "query_metrics", "admin", {"metrics": ["orders"], "where": [where]})
    assert outcome.error is None
    record = list(read_records(rt.settings.audit.path))[-1]
    assert record["tool"] == "query_metrics" and record["arguments"]["where"] == [where]
    assert " OR " in record["details"]["compiled_sql"]


def test_a_grain_on_a_dimension_that_is_not_time_and_an_infinite_value_are_refused(rt: Runtime) -> None:
    # A grain would cast the dimension's text to a time, and the engine's error would quote a value.
    error = refused(rt, "query_metrics", metrics=["orders"], group_by=["order__region__day"])
    assert "takes no grain" in str(error)
    where = ["{{ Dimension('order__region__day') }} = '2020-01-01'"]
    assert "takes no grain" in str(refused(rt, "query_metrics", metrics=["orders"], where=where))
    error = refused(rt, "query_metrics", metrics=["orders"], where=["{{ Entity('customer') }} > 1e999"])
    assert "finite" in str(error)
    for finer in ("metric_time__hour", "order__order_ts__minute"):  # MetricFlow's sub-day grains
        error = refused(rt, "query_metrics", metrics=["orders"], group_by=[finer])
        assert "no grain finer than a day" in str(error) and "__day" in (error.hint or "")
    # A dimension that is not time, named like a grain, is simply unknown.
    assert "no grain finer" not in str(refused(rt, "query_metrics", metrics=["orders"], group_by=["order__hour"]))


def test_saved_queries_are_imported_with_their_order_limit_and_filters() -> None:
    import json

    from lakegate.catalog.metric_compiler import compile_query
    from lakegate.catalog.metric_definitions import SavedQuery
    from lakegate.catalog.metric_filters import saved_metric_query
    from lakegate.catalog.metric_import import translate_manifest
    from tests.test_metricflow_reference import FIXTURES, TABLES

    manifest = json.loads((FIXTURES / "inputs" / "semantic_manifest.json").read_text())

    def where(template: str) -> dict[str, Any]:
        return {"where_filters": [{"where_sql_template": template}]}

    params = {
        "metrics": ["transactions"],
        "group_by": ["Dimension('customer__customer_country')"],
        "limit": 2,
        "order_by": ["Metric('transactions').descending(True)", "Dimension('customer__customer_country')"],
        "where": where("{{ Dimension('customer__customer_country') }} != 'US'"),
    }
    odd = {**params, "where": where("{{ Dimension('transaction__is_large') }} LIKE 't%'")}
    manifest["saved_queries"] = [
        {"name": "top_countries", "description": "Two", "query_params": params, "exports": [{"name": "x"}]},
        {"name": "liked", "description": "", "query_params": odd, "exports": []},
    ]
    translation = translate_manifest(manifest, TABLES, owner="me")
    [saved] = translation.saved_queries
    assert saved == {
        "name": "top_countries",
        "description": "Two",
        "metrics": ["transactions"],
        "group_by": ["customer__customer_country"],
        "where": ["{{ Dimension('customer__customer_country') }} != 'US'"],
        "order_by": ["-transactions", "customer__customer_country"],
        "limit": 2,
    }
    notes = {note.where: (note.kind, note.what) for note in translation.notes}
    assert notes["saved query top_countries"][0] == "differs" and "exports" in notes["saved query top_countries"][1]
    assert notes["saved query liked"][0] == "dropped"  # LIKE: a filter lakegate does not read, so not served
    semantic = parse_semantic_catalog(
        json.dumps({"semantic_models": translation.semantic_models, "metrics": translation.metrics}), source="t"
    )
    sql = compile_query(semantic, saved_metric_query(SavedQuery.model_validate(saved))).sql
    assert sql.endswith("LIMIT 2") and 'ORDER BY "transactions" DESC' in sql and "<> 'US'" in sql.replace("!=", "<>")
