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

from lakegate.catalog.spark_cluster import ClusterInfo
from lakegate.errors import InvalidQuery
from lakegate.policies.spark_sql import SPARK_FUNCTIONS, to_spark
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
    with pytest.raises(InvalidQuery, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        to_spark(template, tables=[SOURCE])


def test_a_governed_template_renders_with_its_masks_and_ctes() -> None:
    template = (
        f'WITH t AS (SELECT "id", lakegate_mask_hash_0a("email") AS "email" FROM "{SOURCE}" WHERE (region = \'EU\')) '
        "SELECT email, count(*) AS n FROM t GROUP BY email QUALIFY row_number() OVER (ORDER BY n DESC) <= 3"
    )

    sql = to_spark(template, own_functions=["lakegate_mask_hash_0a"], tables=[SOURCE])

    assert f"`{SOURCE}`" in sql and "LAKEGATE_MASK_HASH_0A(`email`)" in sql and "region = 'EU'" in sql


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
