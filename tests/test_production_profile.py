"""The production profile on a real PostgreSQL: the Iceberg catalog, the Casbin rules with change
notification, and the global audit chain; and the embedded default, untouched.

The server is $LAKEGATE_TEST_POSTGRES_URL (.ci/run sets it: then these tests must run, and fail if
it does not answer), else the local default if one answers, else they are skipped. Each test
session (each xdist worker) works in a database of its own, created here and dropped after.
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, LiteralString

import psycopg
import pytest
from click.testing import CliRunner
from pydantic import ValidationError
from structlog.testing import capture_logs

from lakegate.errors import AuditWriteError, PolicyDenied, PolicyUnavailable, QuotaExceeded
from lakegate.policies.enforcer import noting_unavailable
from lakegate.policies.pg_policies import PostgresRules
from lakegate.policies.quotas import load_quotas
from lakegate.server.app import Runtime, open_runtime, resource_groups
from lakegate.server.audit.checkpoints import Checkpoint, signing_public_key
from lakegate.server.audit.files import LogNames
from lakegate.server.audit.log import AuditLog, read_records, record_hash, verify
from lakegate.server.audit.pg import MirroredAuditLog, PostgresAuditChain, create_audit_schema, verify_chain
from lakegate.server.cli.main import cli
from lakegate.server.gate.gate import GateOutcome, to_call_result
from lakegate.server.gate.quota_ledger_pg import PostgresLedger, create_quota_schema
from lakegate.server.gate.quotas import Quotas
from lakegate.server.profile import checkpoint_anchor, checkpoint_chain, checkpoint_key_path, open_audit, sync_policies
from lakegate.server.settings import Settings, load_settings
from tests.conftest import gate_call

REPO = Path(__file__).resolve().parents[1]
#: The stated bound (policies/pg_policies.py): a change reaches every replica within 2 s.
BOUND_S = 2.0


# --- the database (pg_server, pg_url and fresh_pg_url are in tests/conftest.py) --------------


def execute(url: str, statement: LiteralString, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    with psycopg.connect(url, autocommit=True) as conn:
        cursor = conn.execute(statement, params or None)
        return cursor.fetchall() if cursor.description else []


# --- runtimes --------------------------------------------------------------------------------


def production_settings(url: str, home: Path, audit_path: Path, **postgres: Any) -> Settings:
    return load_settings(
        REPO,
        home=home,
        audit={"path": audit_path, "fsync": False},
        principal=None,
        profile="production",
        postgres={"url": url, **postgres},
    )


@pytest.fixture(scope="session")
def pg_home(pg_url: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The small demo warehouse built by `lakegate demo` into the PostgreSQL catalog, with the rules
    seeded by `lakegate profile sync-policies`."""
    home = tmp_path_factory.mktemp("pg-home")
    env = {"LAKEGATE_HOME": str(home), "LAKEGATE_PROFILE": "production", "LAKEGATE_POSTGRES__URL": pg_url}
    runner = CliRunner()
    built = runner.invoke(cli, ["--project", str(REPO), "demo"], env=env)
    assert built.exit_code == 0, built.output
    seeded = runner.invoke(cli, ["--project", str(REPO), "profile", "sync-policies"], env=env)
    assert seeded.exit_code == 0, seeded.output
    assert "rules in PostgreSQL" in seeded.output
    return home


@pytest.fixture
def open_replica(pg_url: str, pg_home: Path, tmp_path: Path) -> Iterator[Callable[..., Runtime]]:
    """Opens runtimes ("replicas") on the shared database and warehouse, each with its own local
    audit file; the rules are reset to policy.csv after the test."""
    opened: list[Runtime] = []

    def open_one(name: str, **postgres: Any) -> Runtime:
        settings = production_settings(pg_url, pg_home, tmp_path / f"{name}.jsonl", replica_id=name, **postgres)
        runtime = open_runtime(settings)
        opened.append(runtime)
        return runtime

    yield open_one
    for runtime in opened:
        runtime.close()
    sync_policies(production_settings(pg_url, pg_home, tmp_path / "reset.jsonl"))


def call(runtime: Runtime, principal: str, tool: str, **arguments: Any) -> GateOutcome:
    return gate_call(runtime, principal, tool, arguments)


def rules_of(runtime: Runtime) -> PostgresRules:
    source = runtime.enforcer.rule_source
    assert isinstance(source, PostgresRules)
    return source


def seconds_until(predicate: Callable[[], bool], limit: float) -> float:
    """How long until `predicate` holds, checked every 10 ms; fails after `limit` seconds."""
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > limit:
            pytest.fail(f"not within {limit} s")
        time.sleep(0.01)
    return time.monotonic() - started


# --- the catalog -----------------------------------------------------------------------------


def test_demo_is_built_into_the_postgres_catalog(pg_url: str, pg_home: Path) -> None:
    tables = execute(pg_url, "SELECT table_namespace || '.' || table_name, metadata_location FROM iceberg_tables")
    names = {name for name, _ in tables}
    assert {"sales.customers", "sales.orders", "finance.payments", "support.tickets"} <= names
    # The catalog is PostgreSQL; the files stay in the local warehouse directory.
    assert not (pg_home / "iceberg" / "catalog.db").exists()
    warehouse_dir = (pg_home / "iceberg" / "warehouse").resolve().as_uri()
    assert all(location.startswith(warehouse_dir) for _, location in tables)


def test_governed_query_through_the_gate_on_the_postgres_catalog(
    open_replica: Callable[..., Runtime], pg_url: str
) -> None:
    runtime = open_replica("r1")
    assert runtime.warehouse.catalog_uri is not None and runtime.warehouse.catalog_uri.startswith("postgresql+psycopg")
    outcome = call(runtime, "support_agent", "query", sql="SELECT region, count(*) FROM sales.customers GROUP BY 1")
    assert outcome.error is None, str(outcome.error)
    assert outcome.result is not None
    assert [row[0] for row in outcome.result.rows] == ["EMEA"]  # type: ignore[attr-defined]  # the row filter
    assert outcome.record is not None and outcome.record["decision"] == "partial"
    # The call is in the local file and in the global chain, with the same body.
    (local,) = read_records(runtime.audit.path)
    (stored,) = execute(pg_url, "SELECT record FROM lakegate_audit WHERE seq = %s", (local["global_seq"],))
    global_record = json.loads(stored[0])
    assert global_record["request_id"] == local["request_id"] and global_record["replica"] == "r1"
    assert global_record["time"] == local["time"]
    assert verify(runtime.audit.path).ok and verify_chain(pg_url).ok


# --- policies --------------------------------------------------------------------------------


def test_a_policy_change_reaches_the_other_replica_by_notification_within_the_bound(
    open_replica: Callable[..., Runtime],
) -> None:
    # Polling every 30 s: only the NOTIFY can bring the change within the bound.
    writer, reader = open_replica("a", policy_poll_interval_s=30), open_replica("b", policy_poll_interval_s=30)
    before = reader.enforcer.version
    assert reader.enforcer.decide("alice", "tool:query", "call").allowed
    assert writer.enforcer.version == before  # same rules, same version on every replica

    rules_of(writer).add_rule("p", "role:analyst", "tool:query", "call", "deny")
    took = seconds_until(lambda: not reader.enforcer.decide("alice", "tool:query", "call").allowed, BOUND_S)
    assert took < BOUND_S
    decision = reader.enforcer.decide("alice", "tool:query", "call")
    assert decision.rule == ("role:analyst", "tool:query", "call", "deny")
    assert reader.enforcer.version != before
    seconds_until(lambda: writer.enforcer.version == reader.enforcer.version, BOUND_S)

    # The gate of the other replica refuses, and audits the new policy version.
    outcome = call(reader, "alice", "query", sql="SELECT count(*) FROM sales.orders")
    assert isinstance(outcome.error, PolicyDenied)
    assert outcome.record is not None and outcome.record["policy_version"] == reader.enforcer.version

    assert rules_of(writer).remove_rule("p", "role:analyst", "tool:query", "call", "deny")
    seconds_until(lambda: reader.enforcer.decide("alice", "tool:query", "call").allowed, BOUND_S)
    assert reader.enforcer.version == before


def test_a_policy_change_without_a_notice_is_found_by_polling_within_the_bound(
    open_replica: Callable[..., Runtime], pg_url: str
) -> None:
    reader = open_replica("b", policy_poll_interval_s=0.5)
    assert reader.enforcer.decide("sam", "tool:query", "call").allowed
    # A change that sends no notice: the trigger is off, and the version is bumped by hand.
    execute(pg_url, "ALTER TABLE casbin_rule DISABLE TRIGGER lakegate_policy_changed")
    try:
        execute(
            pg_url,
            "INSERT INTO casbin_rule (ptype, v0, v1, v2, v3)"
            " VALUES ('p', 'role:support_agent', 'tool:query', 'call', 'deny');"
            "UPDATE lakegate_policy_version SET version = version + 1",
        )
        took = seconds_until(lambda: not reader.enforcer.decide("sam", "tool:query", "call").allowed, BOUND_S)
    finally:
        execute(pg_url, "ALTER TABLE casbin_rule ENABLE TRIGGER lakegate_policy_changed")
    assert took < 0.5 + 1.0


def test_a_replica_that_cannot_confirm_the_policy_version_denies_everything(
    open_replica: Callable[..., Runtime], pg_url: str
) -> None:
    reader = open_replica("b", policy_poll_interval_s=0.2, policy_stale_after_s=1.0)
    assert reader.enforcer.decide("alice", "tool:list_datasets", "call").allowed
    execute(pg_url, "ALTER TABLE lakegate_policy_version RENAME TO lakegate_policy_version_away")
    try:
        seconds_until(lambda: not reader.enforcer.decide("alice", "tool:list_datasets", "call").allowed, 5)
        with noting_unavailable() as reasons:
            decision = reader.enforcer.decide("alice", "tool:list_datasets", "call")
        assert decision.unavailable and "could not be read" in decision.reason and reasons == [decision.reason]
        outcome = call(reader, "alice", "list_datasets")
        # Refused for its real cause, with what to do: not "denied", not a hidden column.
        assert isinstance(outcome.error, PolicyUnavailable) and outcome.result is None
        assert "Retry in a few seconds" in to_call_result(outcome).content[0].text  # type: ignore[union-attr]
        columns = call(reader, "analyst", "query", sql="SELECT region FROM sales.customers LIMIT 1")
        assert isinstance(columns.error, PolicyUnavailable) and "hidden" not in str(columns.error)
        assert outcome.record is not None and outcome.record["outcome"] == "policy_unavailable"
    finally:
        execute(pg_url, "ALTER TABLE lakegate_policy_version_away RENAME TO lakegate_policy_version")
    seconds_until(lambda: reader.enforcer.decide("alice", "tool:list_datasets", "call").allowed, BOUND_S)


def test_no_rules_in_postgres_denies_everything_and_says_how_to_seed(
    fresh_pg_url: str, pg_home: Path, tmp_path: Path
) -> None:
    settings = production_settings(fresh_pg_url, pg_home, tmp_path / "a.jsonl")
    runtime = open_runtime(settings)
    try:
        with noting_unavailable() as reasons:
            refused = runtime.enforcer.decide("admin", "tool:list_datasets", "call")
        # Not an outage: rules that are missing are the operator's to fix, a denial until then.
        assert not refused.allowed and not refused.unavailable and reasons == []
        assert "sync-policies" in (runtime.enforcer.load_error or "")
        count = sync_policies(settings)
        assert count == len(rules_of(runtime).rules()) > 50
        seconds_until(lambda: runtime.enforcer.decide("admin", "tool:list_datasets", "call").allowed, BOUND_S)
    finally:
        runtime.close()


# --- audit -----------------------------------------------------------------------------------


def test_two_replicas_audit_concurrently_into_one_verifiable_chain(
    open_replica: Callable[..., Runtime], pg_url: str
) -> None:
    replicas = [open_replica("a"), open_replica("b")]
    (already,) = execute(pg_url, "SELECT count(*) FROM lakegate_audit")[0]
    calls = 15
    errors: list[BaseException] = []

    def work(runtime: Runtime) -> None:
        try:
            for number in range(calls):
                outcome = call(
                    runtime, "analyst", "describe_dataset", name="sales.orders" if number % 2 else "sales.customers"
                )
                assert outcome.error is None, str(outcome.error)
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(runtime,)) for runtime in replicas]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors

    report = verify_chain(pg_url)
    assert report.ok, report.problems
    assert report.records == already + 2 * calls
    order = [
        row[0] for row in execute(pg_url, "SELECT replica FROM lakegate_audit WHERE seq > %s ORDER BY seq", (already,))
    ]
    assert order.count("a") == order.count("b") == calls
    # Each replica's local file is a chain of its own, and names where each record sits globally.
    for runtime in replicas:
        assert verify(runtime.audit.path).ok
        global_seqs = [record["global_seq"] for record in read_records(runtime.audit.path)]
        assert global_seqs == sorted(global_seqs) and len(global_seqs) == calls
    result = CliRunner().invoke(
        cli,
        ["--project", str(REPO), "profile", "verify-audit"],
        env={"LAKEGATE_PROFILE": "production", "LAKEGATE_POSTGRES__URL": pg_url},
    )
    assert result.exit_code == 0 and f"ok: {report.records} records" in result.output, result.output


def test_tampered_rows_in_the_chain_are_detected(fresh_pg_url: str, tmp_path: Path) -> None:
    with psycopg.connect(fresh_pg_url, autocommit=True) as conn:
        create_audit_schema(conn)
    one, two = PostgresAuditChain(fresh_pg_url, "one"), PostgresAuditChain(fresh_pg_url, "two")
    for number in range(6):
        (one if number % 2 else two).append({"tool": "query", "n": number, "duration_ms": 0.1 + number})
    one.close()
    two.close()
    assert verify_chain(fresh_pg_url).ok

    def problems() -> list[tuple[int | None, str]]:
        report = verify_chain(fresh_pg_url)
        return [(problem.seq, problem.kind) for problem in report.problems]

    (original,) = execute(fresh_pg_url, "SELECT record FROM lakegate_audit WHERE seq = 3")[0]
    edited = json.loads(original) | {"tool": "append_rows"}
    execute(fresh_pg_url, "UPDATE lakegate_audit SET record = %s WHERE seq = 3", (json.dumps(edited),))
    assert problems() == [(3, "edited")]
    execute(fresh_pg_url, "UPDATE lakegate_audit SET record = %s WHERE seq = 3", (original,))
    assert problems() == []

    # The replica column no longer matches the hashed record.
    (replica,) = execute(fresh_pg_url, "SELECT replica FROM lakegate_audit WHERE seq = 2")[0]
    execute(fresh_pg_url, "UPDATE lakegate_audit SET replica = 'intruder' WHERE seq = 2")
    assert problems() == [(2, "edited")]
    execute(fresh_pg_url, "UPDATE lakegate_audit SET replica = %s WHERE seq = 2", (replica,))
    assert problems() == []

    # Rewritten and re-hashed: the next record's link breaks.
    forged = edited | {"hash": record_hash(edited)}
    execute(
        fresh_pg_url,
        "UPDATE lakegate_audit SET record = %s, hash = %s WHERE seq = 3",
        (json.dumps(forged), forged["hash"]),
    )
    assert problems() == [(4, "broken_chain")]
    execute(
        fresh_pg_url,
        "UPDATE lakegate_audit SET record = %s, hash = %s WHERE seq = 3",
        (original, json.loads(original)["hash"]),
    )
    assert problems() == []

    saved = execute(
        fresh_pg_url, "DELETE FROM lakegate_audit WHERE seq >= 5 RETURNING seq, replica, prev_hash, hash, record"
    )
    by_seq = {row[0]: row for row in saved}
    assert problems() == [(5, "deleted")]  # the head still says seq 6: the tail was cut
    execute(fresh_pg_url, "INSERT INTO lakegate_audit VALUES (%s, %s, %s, %s, %s)", by_seq[6])
    assert problems() == [(5, "deleted")]  # now a gap in the middle
    execute(fresh_pg_url, "INSERT INTO lakegate_audit VALUES (%s, %s, %s, %s, %s)", by_seq[5])
    assert verify_chain(fresh_pg_url).ok


def test_a_failed_postgres_write_returns_no_data_and_no_local_record(
    open_replica: Callable[..., Runtime], pg_url: str
) -> None:
    runtime = open_replica("a")
    assert call(runtime, "analyst", "list_datasets").error is None
    local_before = len(list(read_records(runtime.audit.path)))
    execute(pg_url, "ALTER TABLE lakegate_audit RENAME TO lakegate_audit_away")
    try:
        outcome = call(runtime, "analyst", "list_datasets")
    finally:
        execute(pg_url, "ALTER TABLE lakegate_audit_away RENAME TO lakegate_audit")
    assert isinstance(outcome.error, AuditWriteError)
    assert outcome.result is None and outcome.payload == "" and outcome.record is None
    assert len(list(read_records(runtime.audit.path))) == local_before  # nothing half-written
    assert call(runtime, "analyst", "list_datasets").error is None  # it reconnects
    assert verify_chain(pg_url).ok and verify(runtime.audit.path).ok


def test_a_failed_local_write_rolls_the_postgres_record_back(fresh_pg_url: str, tmp_path: Path) -> None:
    with psycopg.connect(fresh_pg_url, autocommit=True) as conn:
        create_audit_schema(conn)
    blocked = tmp_path / "audit.jsonl"
    blocked.mkdir()  # the local file cannot be written
    log = MirroredAuditLog(blocked).mirror_to(PostgresAuditChain(fresh_pg_url, "a"))
    with pytest.raises(AuditWriteError):
        log.append({"tool": "query"})
    log.close()
    assert execute(fresh_pg_url, "SELECT seq FROM lakegate_audit_head") == [(0,)]
    assert execute(fresh_pg_url, "SELECT count(*) FROM lakegate_audit") == [(0,)]


def checkpointed_settings(url: str, tmp_path: Path, replica: str) -> Settings:
    """A replica whose audit file signs a checkpoint every 3 records (none by time)."""
    audit = {"path": tmp_path / "audit" / f"{replica}.jsonl", "fsync": False, "checkpoint_every": 3}
    return load_settings(
        REPO,
        home=tmp_path / "home",
        audit={**audit, "checkpoint_interval": None},
        principal=None,
        profile="production",
        postgres={"url": url, "replica_id": replica},
    )


def keep_lines(path: Path, count: int) -> None:
    path.write_text("".join(path.read_text().splitlines(keepends=True)[:count]))


def test_the_latest_checkpoint_is_kept_in_postgres_so_a_cut_checkpoint_file_shows(
    fresh_pg_url: str, tmp_path: Path
) -> None:
    settings = checkpointed_settings(fresh_pg_url, tmp_path, "r1")
    env = {
        "LAKEGATE_PROFILE": "production",
        "LAKEGATE_POSTGRES__URL": fresh_pg_url,
        "LAKEGATE_POSTGRES__REPLICA_ID": "r1",
        "LAKEGATE_HOME": str(tmp_path / "home"),
        "LAKEGATE_AUDIT__PATH": str(settings.audit_path),
        "LAKEGATE_AUDIT__CHECKPOINT_EVERY": "3",
    }

    def verify_cli() -> Any:
        return CliRunner().invoke(cli, ["--project", str(REPO), "audit", "verify"], env=env)

    def kept() -> list[tuple[Any, ...]]:
        return execute(
            fresh_pg_url,
            "SELECT number, seq FROM lakegate_audit_checkpoint WHERE chain = %s",
            (checkpoint_chain(settings),),
        )

    audit = open_audit(settings)
    try:
        assert isinstance(audit, MirroredAuditLog)
        for number in range(7):
            audit.append({"tool": "query", "n": number})
        # Handed over by the log's own thread, off the calls' path.
        seconds_until(lambda: kept() == [(2, 6)], 5)
        assert checkpoint_chain(settings) == f"r1:{settings.audit_path}"
        result = verify_cli()
        assert result.exit_code == 0, result.output
        assert "kept in PostgreSQL: checkpoint #2 (seq 6, signed " in result.output
        assert "1 record after the last checkpoint is not yet covered" in result.output

        # The log cut back to seq 3, and its checkpoint file to the checkpoint of seq 3: the files
        # alone agree with each other; PostgreSQL does not.
        keep_lines(settings.audit_path, 3)
        keep_lines(LogNames(settings.audit_path).checkpoints, 1)
        assert verify(settings.audit_path).ok
        result = verify_cli()
        assert result.exit_code == 1
        assert (
            "checkpoint: the checkpoint file was cut: it ends at checkpoint #1 (seq 3), but PostgreSQL keeps "
            "checkpoint #2 (seq 6, signed " in result.output
        )
        assert "truncated: the log ends at seq 3, but checkpoint #2 (seq 6, signed " in result.output

        # The writer goes on from seq 3. Its next checkpoint (#2 again) is refused; it numbers the
        # following ones above what PostgreSQL keeps, so the gap stays in the file.
        with capture_logs() as logs:
            for number in range(3):
                audit.append({"tool": "query", "n": 100 + number})
            seconds_until(lambda: any(entry["event"] == "audit.checkpoint_file_cut" for entry in logs), 5)
        assert kept() == [(2, 6)]
        for number in range(3):
            audit.append({"tool": "query", "n": 200 + number})
        seconds_until(lambda: kept() == [(4, 9)], 5)
        result = verify_cli()
        assert result.exit_code == 1
        assert "checkpoint #4 (line 3) follows checkpoint #2: checkpoint #3 was gone" in result.output
    finally:
        audit.close()


def test_a_replica_that_stops_hands_its_last_checkpoint_over(fresh_pg_url: str, tmp_path: Path) -> None:
    settings = checkpointed_settings(fresh_pg_url, tmp_path, "r2")
    audit = open_audit(settings)
    audit.append({"tool": "query"})
    audit.close()
    (row,) = execute(
        fresh_pg_url,
        "SELECT number, seq, hash, checkpoint FROM lakegate_audit_checkpoint WHERE chain = %s",
        (checkpoint_chain(settings),),
    )
    (local,) = read_records(settings.audit_path)
    assert row[:3] == (1, 1, local["hash"])
    stored = Checkpoint.model_validate_json(row[3])
    assert stored.signed_by(signing_public_key(checkpoint_key_path(settings)))
    assert checkpoint_anchor(settings) == stored
    assert verify_chain(fresh_pg_url).ok  # the global chain is untouched by the checkpoints


# --- the switch, and the embedded default ----------------------------------------------------


def test_production_needs_a_url_and_never_shows_it(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="LAKEGATE_POSTGRES__URL"):
        load_settings(tmp_path, profile="production")
    settings = load_settings(tmp_path, profile="production", postgres={"url": "postgresql://u:hunter2@db/x"})
    assert "hunter2" not in repr(settings) and "hunter2" not in str(settings.model_dump())


def test_the_embedded_profile_is_the_default_and_unchanged(runtime: Runtime, demo_home: Path) -> None:
    assert runtime.settings.profile == "embedded"
    assert runtime.warehouse.catalog_uri is None and (demo_home / "iceberg" / "catalog.db").is_file()
    assert type(runtime.audit) is AuditLog
    enforcer = runtime.enforcer
    assert enforcer.rule_source is None
    groups = resource_groups(runtime.definitions)
    # The version is still the hash of the policy files, as before the profiles existed.
    expected = enforcer.files.content_hash(f"{obj}>{group}" for obj, tags in groups.items() for group in tags)
    assert enforcer.version == expected
    outcome = call(runtime, "support_agent", "query", sql="SELECT region, count(*) FROM sales.customers GROUP BY 1")
    assert outcome.error is None and outcome.record is not None
    assert "global_seq" not in outcome.record and "replica" not in outcome.record
    assert verify(runtime.audit.path).ok


# --- quotas ----------------------------------------------------------------------------------


def test_two_replicas_draw_on_one_quota(open_replica: Callable[..., Runtime]) -> None:
    replicas = [open_replica("qa"), open_replica("qb")]
    # One minute for both, chosen by the test (far from now, so no other test counts in it).
    minute = 60 * (16_000_000 + secrets.randbelow(100_000))
    for runtime in replicas:
        runtime.gate.quotas.ledger.clock = lambda: minute + 1.5
    # The demo allows data_steward 60 queries a minute (policies/quotas.yaml), whichever replica runs them.
    for number in range(60):
        outcome = call(replicas[number % 2], "data_steward", "query", sql="SELECT 1 AS one")
        assert outcome.error is None, str(outcome.error)
    for runtime in replicas:
        refused = call(runtime, "data_steward", "query", sql="SELECT 1 AS one")
        assert isinstance(refused.error, QuotaExceeded), refused.error
        assert (refused.error.used, refused.error.allowed, refused.error.retry_after_s) == (60, 60, 59)


def test_quota_counts_in_postgres_hold_under_concurrency_within_the_stated_bound(
    fresh_pg_url: str, tmp_path: Path
) -> None:
    with psycopg.connect(fresh_pg_url, autocommit=True) as conn:
        create_quota_schema(conn)
    ledgers = [PostgresLedger(fresh_pg_url, lease_s=60) for _ in range(2)]
    (tmp_path / "quotas.yaml").write_text("defaults:\n  concurrent_calls: 3\n  daily_rows: 100\n")
    policy = load_quotas(tmp_path / "quotas.yaml")
    counted: list[str] = []
    slots: list[str] = []
    lock = threading.Lock()

    def per_minute(ledger: PostgresLedger) -> None:
        for _ in range(10):
            if ledger.count_call("alice", "calls_per_minute.query", 25) is None:
                with lock:
                    counted.append("ok")

    def running(ledger: PostgresLedger) -> None:
        taken = ledger.enter("bob", 3)
        if isinstance(taken, str):
            with lock:
                slots.append(taken)

    def spend(ledger: PostgresLedger) -> None:
        quotas = Quotas(ledger)
        while True:
            try:
                admission = quotas.admit(policy, "carol", [], "catalog")
            except QuotaExceeded as exc:
                if exc.limit == "daily_rows":
                    return
                time.sleep(0.005)  # calls_per_minute or concurrent_calls: try again
                continue
            time.sleep(0.01)
            quotas.settle(admission, scan_bytes=0, rows=10)

    try:
        for work in (per_minute, running, spend):
            threads = [threading.Thread(target=work, args=(ledgers[n % 2],)) for n in range(6)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(timeout=120)
        # One conditional upsert per call, one advisory lock per slot: exact across replicas.
        assert len(counted) == 25
        assert len(slots) == 3
        # Daily budgets are checked before and added after a call: calls let in together may pass
        # the budget, by less than concurrent_calls times the largest call (README, "Quotas").
        used = ledgers[0].day_use("carol").rows
        assert 100 <= used < 100 + 3 * 10, used
    finally:
        for ledger in ledgers:
            ledger.close()
