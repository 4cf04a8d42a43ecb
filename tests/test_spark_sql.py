"""Governed SQL rendered for Spark (policies/spark_sql.py): every function Spark may run of an
agent's query is a reviewed decision, and nothing the rendering writes reads a path or a relation the
gate did not hand the call.

The allow-list is held to a reviewed snapshot; refresh it after reading what changed:

    LAKEGATE_UPDATE_SNAPSHOTS=1 python -m pytest tests/test_spark_sql.py
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import sqlglot

from lakegate.catalog.spark_cluster import ClusterInfo
from lakegate.errors import GovernanceViolation, InvalidQuery
from lakegate.policies.governed_sql import GovernedSql
from lakegate.policies.spark_sql import (
    PLAN_EXPRESSIONS,
    SPARK_FUNCTIONS,
    check_spark_plan,
    plan_sections,
    to_spark,
)
from tests.conftest import REPO

SNAPSHOT = Path(__file__).parent / "snapshots" / "spark_functions.txt"
SOURCE = "lakegate_source_0123456789abcdef"


def test_the_spark_allow_list_matches_the_reviewed_snapshot() -> None:
    current = "\n".join(sorted(SPARK_FUNCTIONS)) + "\n"
    if os.environ.get("LAKEGATE_UPDATE_SNAPSHOTS"):
        SNAPSHOT.write_text(current)
    assert current == SNAPSHOT.read_text(), "review the change to SPARK_FUNCTIONS, then refresh the snapshot"


def test_functions_that_reach_java_files_or_the_session_are_not_allowed() -> None:
    for name in ("reflect", "java_method", "try_reflect", "input_file_name", "input_file_block_start",
                 "raise_error", "assert_true", "current_user", "session_user", "user", "current_database",
                 "version", "spark_partition_id", "from_avro", "from_protobuf", "xpath", "python_worker_logs",
                 "schema_of_json", "aes_decrypt", "uuid", "monotonically_increasing_id"):  # fmt: skip
        assert name not in SPARK_FUNCTIONS, name


@pytest.mark.parametrize(
    ("template", "fragment"),
    [
        (f"SELECT reflect('java.lang.System', 'getenv', 'HOME') FROM \"{SOURCE}\"", "reflect()"),
        (f'SELECT input_file_name() FROM "{SOURCE}"', "input_file_name()"),
        (f'SELECT current_user FROM "{SOURCE}"', "current_user"),
        ('SELECT * FROM parquet."/etc/passwd"', "not a governed table"),
        ("SELECT * FROM other_view", "not a governed table"),
        (f'SELECT * FROM "{SOURCE}" JOIN lakegate_source_ffffffffffffffff USING (id)', "not a governed table"),
    ],
)
def test_the_rendering_refuses_what_spark_may_not_run(template: str, fragment: str) -> None:
    statement = GovernedSql(sqlglot.parse_one(template, read="duckdb"))

    with pytest.raises(InvalidQuery, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        to_spark(statement, views={SOURCE: SOURCE}, functions={})


def test_views_and_masks_are_named_inside_a_cast_of_unnest_too() -> None:
    # The cast moves inside the explode (Spark runs a generator only as a whole select item); the
    # view and the mask inside it are named first.
    template = (
        f'SELECT CAST(unnest((SELECT list(t.email) FROM (SELECT lakegate_mask_hash_0a("email") AS "email" FROM '
        f'"{SOURCE}") AS t)) AS VARCHAR) AS e'
    )
    statement = GovernedSql(sqlglot.parse_one(template, read="duckdb"), {"lakegate_mask_hash_0a": "hash"})

    sql = to_spark(statement, views={SOURCE: "lakegate_view_1"}, functions={"hash": "lakegate_mask_hash_9f"})

    assert "EXPLODE(TRANSFORM(" in sql and "FROM `lakegate_view_1`" in sql
    assert "LAKEGATE_MASK_HASH_9F(CAST(`email` AS STRING))" in sql and "0A" not in sql


def test_text_that_spark_would_substitute_a_variable_into_is_refused() -> None:
    statement = GovernedSql(sqlglot.parse_one(f"SELECT '${{env:HOME}}' AS home FROM \"{SOURCE}\"", read="duckdb"))

    with pytest.raises(InvalidQuery, match="variable to substitute"):
        to_spark(statement, views={SOURCE: SOURCE}, functions={})


def test_a_governed_statement_renders_with_its_views_masks_and_ctes() -> None:
    template = (
        f'WITH t AS (SELECT "id", lakegate_mask_hash_0a("email") AS "email", lakegate_mask_null_0a("phone") AS '
        f'"phone" FROM "{SOURCE}" WHERE (region = \'EU\' AND note <> \'"{SOURCE}"\')) '
        "SELECT email, phone, count(*) AS n FROM t GROUP BY email, phone "
        "QUALIFY row_number() OVER (ORDER BY n DESC) <= 3"
    )
    statement = GovernedSql(
        sqlglot.parse_one(template, read="duckdb"), {"lakegate_mask_hash_0a": "hash", "lakegate_mask_null_0a": "null"}
    )

    sql = to_spark(statement, views={SOURCE: "lakegate_view_1"}, functions={"hash": "lakegate_mask_hash_9f"})

    # The placeholder is named by its view in the tree: a string that spells it is left as written.
    assert "FROM `lakegate_view_1`" in sql and f"note <> '\"{SOURCE}\"'" in sql and "region = 'EU'" in sql
    assert "LAKEGATE_MASK_HASH_9F(CAST(`email` AS STRING)) AS `email`" in sql
    assert "CASE WHEN FALSE THEN `phone` END AS `phone`" in sql
    assert statement.sql == sqlglot.parse_one(template, read="duckdb").sql("duckdb"), "the tree was changed"


def _explained(analysed: str) -> str:
    """Spark's EXPLAIN EXTENDED layout around an analysed plan."""
    return (
        "== Parsed Logical Plan ==\n'Project [*]\n\n== Analyzed Logical Plan ==\n"
        f"{analysed}\n\n== Optimized Logical Plan ==\nProject\n\n== Physical Plan ==\n*(1) Project\n"
    )


#: Analysed plans as Spark 4 prints them (trimmed), each of a query the rendering lets through.
ALLOWED_PLANS = [
    "Project [upper(name#1) AS n#10, lakegate_mask_hash_0a(x#16) AS h#11]\n"
    "+- Project [name#1, cast(cast(name#1 as string) as string) AS x#16]",
    "Window [sum(amount#2) windowspecdefinition(name#1, d#3 ASC NULLS FIRST, specifiedwindowframe(RowFrame, "
    "unboundedpreceding$(), currentrow$())) AS s#21], [name#1]",
    "Project [transform(tags#4, lambdafunction(upper(lambda x#28), lambda x#28, false)) AS t#22]",
    "Filter (name#58 = outer(name#1))",
    "Project [__pivot_count(1) AS `count(1)`#38854[0] AS EMEA#38855L]\n+- Aggregate [pivotfirst(region#1, "
    "count(1)#38848L, EMEA, NA, 0, 0) AS __pivot_count(1) AS `count(1)`#38854]",
    "Project [date_add(d#3, extractansiintervaldays(INTERVAL '1' DAY)) AS x#82, "
    "date_trunc(month, cast(d#3 as timestamp), Some(UTC)) AS m#88]",
]


@pytest.mark.parametrize("analysed", ALLOWED_PLANS)
def test_an_analysed_plan_of_allowed_calls_passes(analysed: str) -> None:
    found, physical = plan_sections(_explained(analysed))

    check_spark_plan(found, "SELECT 1", own_functions=["lakegate_mask_hash_0a"])
    assert found.strip() == analysed and physical.strip() == "*(1) Project"


@pytest.mark.parametrize(
    "analysed",
    [
        "Project [reflect(java.lang.System, getenv, HOME, true) AS home#77]",
        "Project [typeof(name#1) AS t#5]",  # off the allow-list though on no deny-list
        "Project [spark_catalog.other.udf(name#1) AS u#5]",  # a catalog function by its qualified name
        "Project [spark_catalog.default.upper(name#1) AS u#5]",  # not the built-in of that name
        "Project [__pivot_reflect(x) AS y#1]",
        "Project [name#1, ... 40 more fields]",  # cut short: its calls cannot all be read
    ],
)
def test_an_analysed_plan_with_a_call_off_the_allow_list_is_a_governance_violation(analysed: str) -> None:
    found, _ = plan_sections(_explained(analysed))

    with pytest.raises(GovernanceViolation):
        check_spark_plan(found, "SELECT 1 AS one")


def test_a_call_the_querys_own_text_spells_is_refused_with_what_to_do() -> None:
    analysed = "Project [Report(2024) AS title#5]\n+- Filter (name#1 = Report(2024))"

    with pytest.raises(InvalidQuery, match=r"'report\(' .*text in a string") as refused:
        check_spark_plan(analysed, "SELECT 'Report(2024)' AS title FROM t WHERE name = 'Report(2024)'")

    assert refused.value.hint is not None and "space before the parenthesis" in refused.value.hint


@pytest.mark.parametrize(
    "explained",
    [
        _explained("Project [x#1]") + "== Analyzed Logical Plan ==\n",  # a literal spelling a header
        _explained("Project [x#1]").replace("== Optimized Logical Plan ==", ""),
        "== Physical Plan ==\n" + _explained("Project [x#1]").split("== Physical Plan ==")[0],
    ],
)
def test_a_plan_whose_sections_cannot_be_told_apart_is_refused(explained: str) -> None:
    with pytest.raises(InvalidQuery, match="header of Spark's plans"):
        plan_sections(explained)


@pytest.mark.xdist_group("spark")
def test_every_allowed_function_is_one_spark_has(spark_cluster: ClusterInfo) -> None:
    from pyspark.sql.connect.session import SparkSession

    token = Path(spark_cluster.token_file).read_text()
    spark = SparkSession.builder.remote(f"{spark_cluster.remote}/;token={token}").create()
    try:
        known = {str(row[0]).lower() for row in spark.sql("SHOW FUNCTIONS").collect()}
    finally:
        spark.stop()
    # SQL syntax that sqlglot renders as a call but Spark lists under no function name.
    syntax = {"try_cast", "interval", "extract"}
    assert SPARK_FUNCTIONS - known <= syntax, sorted(SPARK_FUNCTIONS - known - syntax)
    # What the plan check lets through besides the allow-list is no function a query could call.
    assert not PLAN_EXPRESSIONS & known, sorted(PLAN_EXPRESSIONS & known)


def test_spark_status_and_stop_say_when_no_cluster_was_started_here(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from lakegate.server.cli.main import cli

    home = ["--project", str(REPO)]
    env = {"LAKEGATE_HOME": str(tmp_path)}
    status = CliRunner().invoke(cli, [*home, "spark", "status"], env=env)
    stop = CliRunner().invoke(cli, [*home, "spark", "stop"], env=env)
    helped = CliRunner().invoke(cli, [*home, "spark", "start", "--help"], env=env)

    assert status.exit_code == 0 and "no Spark cluster was started here" in status.output
    assert stop.exit_code == 0 and "no Spark cluster started here is running" in stop.output
    assert helped.exit_code == 0 and "--workers" in helped.output and "token" in helped.output
