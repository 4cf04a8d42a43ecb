"""The query engine on its own: with the SQL guard switched off, and in a bare sandbox, it reads no
file by name and nothing it was not handed; the red-team review's recursive CTEs; what explain,
column names and errors may show; the worker's memory limit."""

from __future__ import annotations

import json
from pathlib import Path

import anyio
import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lakegate.catalog.arrow_relations import SourceColumn, TableSource
from lakegate.catalog.query_sandbox import SandboxConfig, open_sandbox
from lakegate.errors import BackendError, ClientError, InvalidArgument, LakegateError, LimitExceeded
from lakegate.policies.sql_guard import InvalidQuery
from lakegate.server.app import Runtime
from lakegate.server.gate.gate import GateOutcome
from lakegate.server.gate.identity import CallOrigin, stdio_principal
from tests.query_security_corpus import (
    Clear,
    call,
    columns_of,
    leaked,
    rows_of,
)

# -- the sandbox alone ---------------------------------------------------------------------------


def _attacks(runtime: Runtime, outside: Path) -> list[str]:
    """SQL that names files: outside the warehouse, the warehouse's own data and metadata, the
    state directory, relative paths and the recursive-CTE form the red-team review used."""
    home = runtime.settings.state_dir
    plan = runtime.warehouse.scans.plan("sales.customers")
    data_file = plan.files[0][0]
    data_glob = str(runtime.warehouse.iceberg_data_dir / "sales" / "customers" / "data" / "*.parquet")
    relative = str(Path(data_file).relative_to(Path.cwd())) if Path(data_file).is_relative_to(Path.cwd()) else data_file
    return [
        "SELECT * FROM read_text('/etc/passwd')",
        "SELECT * FROM read_blob('/etc/passwd')",
        "SELECT * FROM read_csv('/etc/passwd')",
        f"SELECT * FROM read_csv('{outside}/secret.csv')",
        f"SELECT * FROM read_parquet('{outside}/secret.parquet')",
        f"SELECT * FROM '{outside}/secret.parquet'",
        f"SELECT * FROM glob('{outside}/*')",
        f"SELECT * FROM read_parquet('{data_file}')",
        f"SELECT * FROM '{data_file}'",
        f"SELECT * FROM '{data_glob}'",
        f"SELECT * FROM '{relative}'",
        f"SELECT * FROM read_text('{home}/mask.key')",
        f"SELECT * FROM read_text('{home}/audit.key')",
        "SELECT * FROM read_text('pyproject.toml')",
        f"SELECT * FROM glob('{home}/**')",
        *(
            f'WITH RECURSIVE "{data_glob}" AS (SELECT NULL AS d {operation} SELECT * FROM "{data_glob}") '
            f'SELECT to_json(t) FROM "{data_glob}" t'
            for operation in RECURSIVE_SET_OPERATIONS
        ),
    ]


#: The set operations under WITH RECURSIVE that DuckDB does not bind as a recursive CTE.
RECURSIVE_SET_OPERATIONS = (
    "UNION ALL BY NAME", "UNION BY NAME", "INTERSECT", "INTERSECT ALL", "EXCEPT", "EXCEPT ALL",
)  # fmt: skip


def _sandbox_config(tmp_path: Path) -> SandboxConfig:
    spill = tmp_path / "spill"
    return SandboxConfig(threads=1, memory_limit="256MB", spill_dir=str(spill), spill_limit="64MB", hash_key="k" * 64)


def test_the_sandbox_alone_reads_no_file_by_name(runtime: Runtime, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    pq.write_table(pa.table({"secret": ["parquet"]}), outside / "secret.parquet")
    (outside / "secret.csv").write_text("secret\ncsv\n")
    sandbox = open_sandbox(_sandbox_config(tmp_path))
    try:
        for sql in [
            *_attacks(runtime, outside),
            f"ATTACH '{outside}/other.duckdb' AS other",
            f"COPY (SELECT 1) TO '{outside}/written.csv'",
            "INSTALL httpfs",
            "LOAD httpfs",
        ]:
            with pytest.raises(duckdb.Error):
                pytest.fail(f"{sql} answered {sandbox.sql(sql).fetchall()}")
        for sql in (
            "SET enable_external_access = true",
            f"SET allowed_directories = ['{outside}']",
            f"SET allowed_paths = ['{outside}/secret.csv']",
            "SET lock_configuration = false",
        ):
            with pytest.raises(duckdb.InvalidInputException, match="the configuration has been locked"):
                sandbox.execute(sql)
        assert not (outside / "written.csv").exists()
        # The hash mask's key is in no catalog view of the sandbox: the macro calls a Python function.
        definitions = sandbox.sql("SELECT * FROM duckdb_functions() WHERE function_name LIKE 'lakegate%'").fetchall()
        assert definitions and "k" * 64 not in str(definitions)
        # Positive control: the same sandbox reads a registered dataset, the one way in.
        sandbox.register("handed", pa.table({"x": [1, 2]}))
        assert sandbox.sql('SELECT sum(x) FROM "handed"').fetchall() == [(3,)]
    finally:
        sandbox.close()


def test_with_the_guard_off_the_engine_reads_nothing_it_was_not_handed(runtime: Runtime, tmp_path: Path) -> None:
    """The query worker runs SQL that never passed the guard: no attack reads a row."""
    outside = tmp_path / "outside"
    outside.mkdir()
    pq.write_table(pa.table({"secret": ["parquet"]}), outside / "secret.parquet")
    (outside / "secret.csv").write_text("secret\ncsv\n")
    engine = runtime.warehouse.query_engine(runtime.settings.query)
    for sql in _attacks(runtime, outside):
        with pytest.raises(LakegateError):
            engine.run_sql(sql, {})
    # DuckDB's own reading of what runs is checked too: what the guard refuses, DuckDB may not run.
    for sql in (
        "SELECT current_setting('temp_directory')",
        "SELECT * FROM query('SELECT 1')",
        "SELECT lakegate_mask_hash('1234')",
        "SELECT lakegate_keyed_hash('1234')",
        "SELECT * FROM duckdb_views()",
        "SELECT * FROM information_schema.tables",
        "SELECT * FROM pg_catalog.pg_settings",
        "SELECT * FROM lakegate_rel_0123456789abcdef",
        "SELECT * FROM glob('*')",
        # A CTE of that name elsewhere in the statement does not make a catalog view one.
        "SELECT (SELECT count(*) FROM pg_settings) AS s, (WITH pg_settings AS (SELECT 1) SELECT 1) AS z",
    ):
        with pytest.raises(BackendError, match="refused"):
            engine.run_sql(sql, {})
    # A table handed with some of its columns: the others do not exist for the engine.
    plan = runtime.warehouse.scans.plan("sales.customers")
    region = next(c for c in plan.columns if c.name == "region")
    source = TableSource((SourceColumn(region.name, region.duckdb_type, region.field_id),), plan.files)
    handed = engine.run_sql('SELECT count(*), count(DISTINCT region) FROM "t"', {"t": source})
    assert handed.table is not None and handed.table.to_pylist()[0]["count_star()"] == 500
    assert handed.scanned == {"t": ["region"]}
    with pytest.raises(InvalidArgument, match="email"):
        engine.run_sql('SELECT email FROM "t"', {"t": source})


@pytest.mark.parametrize("principal", ["analyst", "support_agent"])
@pytest.mark.parametrize("operation", RECURSIVE_SET_OPERATIONS)
def test_a_recursive_cte_named_after_files_is_refused(
    runtime: Runtime, audit_path: Path, principal: str, operation: str
) -> None:
    data = runtime.warehouse.iceberg_data_dir / "sales" / "customers" / "data"
    for name in (f"{data}/*.parquet", "sales/customers/data/*.parquet", "customers"):
        sql = f'WITH RECURSIVE "{name}" AS (SELECT NULL AS d {operation} SELECT * FROM "{name}") '
        outcome = call(runtime, principal, {"sql": sql + f'SELECT to_json(t) FROM "{name}" t'})
        assert isinstance(outcome.error, InvalidQuery), outcome.text[:300]
        assert f"There is no table named '{name}'" in str(outcome.error)
    # The plain UNION ALL form is a real recursive CTE, and answers.
    sql = "WITH RECURSIVE r AS (SELECT 1 AS n UNION SELECT n + 1 FROM r WHERE n < 3) SELECT count(*) FROM r"
    assert rows_of(call(runtime, principal, {"sql": sql})) == [[3]]


def test_explain_shows_no_key_and_no_path(runtime: Runtime) -> None:
    outcome = call(
        runtime, "analyst", {"sql": "SELECT email FROM sales.customers WHERE email LIKE 'a%'", "explain": True}
    )
    key = (runtime.settings.state_dir / "mask.key").read_text().strip()
    assert outcome.error is None and outcome.record is not None
    shown = outcome.text + json.dumps(outcome.record)
    assert "lakegate_keyed_hash" in shown.lower()  # the plan shows the mask, by name
    assert key not in shown and str(runtime.settings.state_dir) not in shown


def test_a_scalar_subquery_column_is_named_from_the_agents_sql(runtime: Runtime) -> None:
    outcome = call(runtime, "support_agent", {"sql": "SELECT (SELECT max(phone) FROM sales.customers), 1 AS one"})
    assert columns_of(outcome) == ["(SELECT MAX(phone) FROM sales.customers)", "one"]


def test_an_engine_error_shows_no_value_the_agent_did_not_write(runtime: Runtime, clear: Clear) -> None:
    # The cast can run before the row filter: its error must not carry a filtered row's value.
    outcome = call(runtime, "support_agent", {"sql": "SELECT * FROM sales.customers WHERE CAST(email AS INT) = 1"})
    assert isinstance(outcome.error, ClientError) and outcome.record is not None
    shown = str(outcome.error) + json.dumps(outcome.record)
    assert "'<value>'" in shown
    assert not leaked([[shown]], sorted(clear.emails | clear.names), both=False)
    # The agent's own literals stay, so the message still says what to fix.
    outcome = call(runtime, "analyst", {"sql": "SELECT CAST('abc' AS INT)"})
    assert "'abc'" in str(outcome.error)


def test_a_query_over_the_memory_limit_is_stopped_and_the_server_keeps_serving(runtime: Runtime) -> None:
    """DuckDB's own memory limit does not cover a list built in one expression: the worker's
    operating-system limit does, and four such queries at once do not take the server down."""

    async def four() -> list[GateOutcome]:
        who = stdio_principal("analyst", runtime.enforcer)
        outcomes: list[GateOutcome] = []

        async def one(i: int) -> None:
            origin = CallOrigin(transport="in-process", session_id=f"memory-{i}")
            sql = "SELECT list_transform(range(50000000), lambda x: x) AS l"
            outcomes.append(await runtime.gate.call("query", {"sql": sql}, who, origin))

        async with anyio.create_task_group() as group:
            for i in range(4):
                group.start_soon(one, i)
        return outcomes

    for outcome in anyio.run(four):
        assert isinstance(outcome.error, LimitExceeded), outcome.error or outcome.text[:200]
        assert "too much memory" in str(outcome.error)
        assert outcome.record is not None and outcome.record["outcome"] == "limit_exceeded"
    assert rows_of(call(runtime, "analyst", {"sql": "SELECT count(*) FROM sales.orders"})) == [[5000]]
