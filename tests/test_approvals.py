"""Writes that a person approves (policies/approvals.yaml): an append that a rule matches is staged
on an Iceberg branch, main unchanged, until someone allowed to `approve` the dataset decides.

The demo's rule: support_agent's appends of more than 20 rows to support.* wait for a data steward.
Decisions go through the gate exactly as `lakegate changes approve|reject` makes them.
"""

from __future__ import annotations

import json
import threading
import time
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import httpx2
import pytest
from click.testing import CliRunner

from lakegate.catalog.staged_changes import APPROVED_TAG_PREFIX, BRANCH_PREFIX, StagedChange
from lakegate.catalog.warehouse import Warehouse
from lakegate.errors import InvalidArgument, LakegateError, NotFound, PolicyDenied
from lakegate.server.app import Runtime, open_runtime
from lakegate.server.cli.main import cli
from lakegate.server.gate.identity import CallOrigin, stdio_principal
from lakegate.server.settings import load_settings
from tests.conftest import REPO, gate_call, runtime_with_policy_file
from tests.test_audit_report import _parse
from tests.test_http import _serving
from tests.test_writes import TICKETS, build_write_home, read_rows, snapshots, ticket


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return build_write_home(tmp_path / "home")


def _open(home: Path, audit: Path) -> Runtime:
    return open_runtime(load_settings(REPO, home=home, audit={"path": audit, "fsync": False}, principal=None))


@pytest.fixture
def runtime(home: Path, tmp_path: Path) -> Any:
    opened = _open(home, tmp_path / "audit.jsonl")
    yield opened
    opened.close()


def _tickets(first: int, count: int) -> list[dict[str, Any]]:
    return [ticket(first + n) for n in range(count)]


def _stage(runtime: Runtime, principal: str = "support_agent", count: int = 25, first: int = 100) -> str:
    outcome = gate_call(runtime, principal, "append_rows", {"table": TICKETS, "rows": _tickets(first, count)})
    assert outcome.error is None, str(outcome.error)
    result = outcome.result.model_dump()  # type: ignore[union-attr]
    assert result["status"] == "pending" and result["snapshot_id"] is None, result
    assert "not in the table yet" in outcome.text
    return str(result["change_id"])


def _decide(runtime: Runtime, principal: str, change_id: str, *, approve: bool) -> StagedChange:
    """A decision through the gate, as `lakegate changes approve|reject` makes it."""
    who = stdio_principal(principal, runtime.enforcer)
    origin = CallOrigin(transport="cli", session_id="cli")
    method = "changes/approve" if approve else "changes/reject"
    decided: StagedChange = anyio.run(
        partial(
            runtime.gate.request,
            method,
            {"change_id": change_id},
            who,
            origin,
            lambda scope: scope.decide_change(change_id, approve=approve),
        )
    )
    return decided


def _refs(home: Path) -> set[str]:
    warehouse = Warehouse(home)
    try:
        return set(warehouse.iceberg_table(TICKETS).metadata.refs)
    finally:
        warehouse.close()


def _records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_bulk_append_is_staged_on_a_branch_and_main_is_unchanged(
    runtime: Runtime, home: Path, tmp_path: Path
) -> None:
    before = snapshots(home, TICKETS)
    change_id = _stage(runtime)
    assert snapshots(home, TICKETS)[0] == before[0]
    assert len(read_rows(home, TICKETS)) == 1
    assert BRANCH_PREFIX + change_id in _refs(home)
    # The agent follows its change; another agent cannot see it.
    status = gate_call(runtime, "support_agent", "change_status", {"change_id": change_id})
    assert status.error is None and status.result.model_dump()["status"] == "pending"  # type: ignore[union-attr]
    hidden = gate_call(runtime, "analyst", "change_status", {"change_id": change_id})
    assert isinstance(hidden.error, NotFound)
    # A small append is under the rule's threshold: applied at once.
    small = gate_call(runtime, "support_agent", "append_rows", {"table": TICKETS, "rows": _tickets(500, 2)})
    assert small.result is not None and small.result.model_dump()["status"] == "applied"
    staged = next(r for r in _records(tmp_path / "audit.jsonl") if r["details"].get("operation") == "append_staged")
    assert staged["details"]["change_id"] == change_id and staged["details"]["rows"] == 25
    assert staged["details"]["snapshot_before"] == before[0]
    assert any(r["type"] == "dataset" and r["access"] == "staged" for r in staged["resources"]), staged["resources"]


def test_approval_applies_the_change_once_by_fast_forward_and_keeps_its_history(
    runtime: Runtime, home: Path, tmp_path: Path
) -> None:
    change_id = _stage(runtime)
    decided = _decide(runtime, "data_steward", change_id, approve=True)
    assert decided.status == "approved" and decided.decided_by == "data_steward"
    # main fast-forwarded to the staged snapshot: no copy, and the branch became a tag.
    assert decided.applied_snapshot_id == decided.staged_snapshot_id == snapshots(home, TICKETS)[0]
    assert len(read_rows(home, TICKETS)) == 26
    assert _refs(home) == {"main", APPROVED_TAG_PREFIX + change_id}
    with pytest.raises(InvalidArgument, match="already approved by data_steward"):
        _decide(runtime, "data_steward", change_id, approve=True)
    assert len(read_rows(home, TICKETS)) == 26
    status = gate_call(runtime, "support_agent", "change_status", {"change_id": change_id})
    shown = status.result.model_dump()  # type: ignore[union-attr]
    assert shown["status"] == "approved" and shown["snapshot_id"] == decided.applied_snapshot_id
    approved = [r for r in _records(tmp_path / "audit.jsonl") if r["tool"] == "changes/approve"]
    assert approved[0]["outcome"] == "ok" and approved[0]["principal"] == "data_steward"
    details = approved[0]["details"]
    assert details["requested_by"] == "support_agent" and details["snapshot_after"] == decided.applied_snapshot_id
    assert approved[1]["outcome"] == "invalid"


def test_approval_after_main_moved_commits_the_staged_files_on_top(runtime: Runtime, home: Path) -> None:
    change_id = _stage(runtime)
    moved = gate_call(runtime, "admin", "append_rows", {"table": TICKETS, "rows": _tickets(900, 1)})
    assert moved.error is None
    decided = _decide(runtime, "data_steward", change_id, approve=True)
    current, _ = snapshots(home, TICKETS)
    assert decided.applied_snapshot_id == current and current != decided.staged_snapshot_id
    ids = sorted(row["ticket_id"] for row in read_rows(home, TICKETS))
    assert ids == sorted([1, 900, *range(100, 125)])


def test_nobody_decides_their_own_change_and_only_approvers_decide(home: Path, tmp_path: Path) -> None:
    # admin may approve everything; with a rule on its own appends, it still may not approve those.
    rules = "rules:\n  - subject: admin\n    above_rows: 0\n"
    runtime = runtime_with_policy_file(home, tmp_path, "approvals.yaml", rules)
    try:
        change_id = _stage(runtime, "admin", count=1)
        with pytest.raises(PolicyDenied, match="nobody may decide their own change"):
            _decide(runtime, "admin", change_id, approve=True)
        with pytest.raises(LakegateError):  # support_agent may read tickets but not approve
            _decide(runtime, "support_agent", change_id, approve=True)
        with pytest.raises(NotFound):  # analyst may not even read tickets: the change is not there
            _decide(runtime, "analyst", change_id, approve=False)
        assert len(read_rows(home, TICKETS)) == 1
        assert _decide(runtime, "data_steward", change_id, approve=False).status == "rejected"
    finally:
        runtime.close()
    assert _refs(home) == {"main"}  # a rejected change's branch is removed
    assert len(read_rows(home, TICKETS)) == 1


@pytest.mark.parametrize(
    ("moved", "decisions"),
    [(False, (True, True)), (True, (True, True)), (True, (True, False))],
    ids=["fast-forward", "main-moved", "approve-against-reject"],
)
def test_concurrent_decisions_apply_the_change_at_most_once(
    home: Path, tmp_path: Path, moved: bool, decisions: tuple[bool, bool]
) -> None:
    first = _open(home, tmp_path / "a.jsonl")
    change_id = _stage(first)
    if moved:  # main moves after staging: approval commits the staged files on top
        assert gate_call(first, "admin", "append_rows", {"table": TICKETS, "rows": _tickets(900, 1)}).error is None
    replicas = [first, _open(home, tmp_path / "b.jsonl")]
    outcomes: list[Any] = []
    start = threading.Barrier(2)

    def decide(runtime: Runtime, approve: bool) -> None:
        start.wait()
        try:
            outcomes.append(_decide(runtime, "data_steward", change_id, approve=approve))
        except LakegateError as exc:
            outcomes.append(exc)

    try:
        threads = [threading.Thread(target=decide, args=pair) for pair in zip(replicas, decisions, strict=True)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
    finally:
        for runtime in replicas:
            runtime.close()
    decided = [o for o in outcomes if isinstance(o, StagedChange)]
    refused = [o for o in outcomes if isinstance(o, InvalidArgument)]
    assert len(decided) == 1 and len(refused) == 1, outcomes
    assert "already" in str(refused[0])
    applied = 25 if decided[0].status == "approved" else 0
    assert len(read_rows(home, TICKETS)) == 1 + int(moved) + applied
    if applied:
        assert APPROVED_TAG_PREFIX + change_id in _refs(home)


def test_a_bulk_change_split_into_small_appends_still_waits_for_a_person(runtime: Runtime, home: Path) -> None:
    # The demo's rule: more than 20 rows within 60 minutes, counting the agent's earlier appends.
    first = gate_call(runtime, "support_agent", "append_rows", {"table": TICKETS, "rows": _tickets(100, 15)})
    assert first.result is not None and first.result.model_dump()["status"] == "applied"
    second = gate_call(runtime, "support_agent", "append_rows", {"table": TICKETS, "rows": _tickets(200, 10)})
    assert second.result is not None and second.result.model_dump()["status"] == "pending"
    # Another principal's appends do not count against this one's.
    other = gate_call(runtime, "sam", "append_rows", {"table": TICKETS, "rows": _tickets(300, 10)})
    assert other.result is not None and other.result.model_dump()["status"] == "applied"
    assert len(read_rows(home, TICKETS)) == 1 + 15 + 10


def test_changes_staged_at_the_same_time_all_stage(runtime: Runtime, home: Path) -> None:
    staged: list[Any] = []

    def stage(number: int) -> None:
        rows = _tickets(1000 * (number + 1), 21)
        staged.append(gate_call(runtime, "support_agent", "append_rows", {"table": TICKETS, "rows": rows}))

    threads = [threading.Thread(target=stage, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert all(o.error is None and o.result.model_dump()["status"] == "pending" for o in staged), [
        str(o.error) for o in staged
    ]
    assert len({o.result.model_dump()["change_id"] for o in staged}) == 4
    assert len(_refs(home)) == 1 + 4


def test_a_change_left_undecided_expires_and_is_removed(home: Path, tmp_path: Path) -> None:
    rules = "expire_after_hours: 0.0002\nrules:\n  - subject: role:support_agent\n    above_rows: 0\n"
    runtime = runtime_with_policy_file(home, tmp_path, "approvals.yaml", rules)
    try:
        change_id = _stage(runtime, count=1)
        time.sleep(1.0)  # 0.72 s
        # Listing what there is to decide expires it first: nothing is left to decide.
        who = stdio_principal("data_steward", runtime.enforcer)
        listed = anyio.run(
            partial(
                runtime.gate.request, "changes/list", {}, who, CallOrigin("cli", "cli"), lambda s: s.changes_to_decide()
            )
        )
        assert listed == []
        with pytest.raises(InvalidArgument, match="expired"):
            _decide(runtime, "data_steward", change_id, approve=True)
        status = gate_call(runtime, "support_agent", "change_status", {"change_id": change_id})
        assert status.result is not None and status.result.model_dump()["status"] == "expired"
    finally:
        runtime.close()
    assert _refs(home) == {"main"} and len(read_rows(home, TICKETS)) == 1


def test_the_changes_command_lists_approves_and_refuses(runtime: Runtime, home: Path) -> None:
    change_id = _stage(runtime)
    env = {"LAKEGATE_HOME": str(home)}
    runner = CliRunner()
    listed = runner.invoke(cli, ["--project", str(REPO), "changes", "list", "--as", "data_steward", "--json"], env=env)
    assert listed.exit_code == 0, listed.output
    lines = [line for line in listed.output.splitlines() if line.startswith("{")]  # the log writes to stdout too
    assert [json.loads(line)["change_id"] for line in lines] == [change_id]
    # support_agent may not approve: nothing to list, and approving is refused.
    assert "No changes pending" in runner.invoke(cli, ["changes", "list", "--as", "support_agent"], env=env).output
    refused = runner.invoke(cli, ["--project", str(REPO), "changes", "approve", change_id, "--as", "sam"], env=env)
    assert refused.exit_code == 1 and "may not approve" in refused.output, refused.output
    approved = runner.invoke(
        cli, ["--project", str(REPO), "changes", "approve", change_id, "--as", "data_steward"], env=env
    )
    assert approved.exit_code == 0 and f"Approved change {change_id}: 25 row(s)" in approved.output, approved.output
    assert len(read_rows(home, TICKETS)) == 26


def test_staged_rows_cannot_be_read_listed_or_restored_until_approved(
    runtime: Runtime, home: Path, tmp_path: Path
) -> None:
    change_id = _stage(runtime)
    staged = next(r for r in _records(tmp_path / "audit.jsonl") if r["details"].get("change_id") == change_id)
    snapshot = staged["details"]["staged_snapshot"]
    sql = {"sql": "SELECT count(*) AS n FROM support.tickets", "as_of": {TICKETS: str(snapshot)}}
    read = gate_call(runtime, "data_steward", "query", sql)
    assert isinstance(read.error, NotFound), read.error
    versions = gate_call(runtime, "data_steward", "describe_dataset", {"name": TICKETS}).result.model_dump(mode="json")  # type: ignore[union-attr]
    assert str(snapshot) not in json.dumps(versions)
    restore = gate_call(runtime, "data_steward", "restore_table", {"table": TICKETS, "snapshot_id": str(snapshot)})
    assert isinstance(restore.error, NotFound), restore.error
    assert len(read_rows(home, TICKETS)) == 1
    # Approved by fast-forward, the staged snapshot is the table's: readable by id.
    _decide(runtime, "data_steward", change_id, approve=True)
    after = gate_call(runtime, "data_steward", "query", sql)
    assert after.error is None and after.result.model_dump()["rows"] == [[26]]  # type: ignore[union-attr]


def test_a_person_decides_over_http_with_their_own_token(home: Path, tmp_path: Path) -> None:
    with _serving(home, tmp_path / "http") as served:
        change_id = _stage(served.runtime)
        url = f"{served.base}/changes/{change_id}/approve"

        def post(token: str | None) -> httpx2.Response:
            headers = {"Authorization": f"Bearer {token}"} if token else {}
            return httpx2.post(url, headers=headers, timeout=30)

        assert post(None).status_code == 401
        # May read tickets, may not approve; the requester may not approve its own change, even
        # holding a role that may approve others'.
        assert post(served.token("sam", ["support_agent"])).status_code == 403
        own = post(served.token("support_agent", ["data_steward"]))
        assert own.status_code == 403 and "nobody may decide their own change" in own.json()["message"]
        listed = httpx2.get(f"{served.base}/changes", headers={"Authorization": f"Bearer {served.token('dana')}"})
        assert [c["change_id"] for c in listed.json()["changes"]] == [change_id]
        approved = post(served.token("dana"))
        assert approved.status_code == 200 and approved.json()["change"]["status"] == "approved"
        again = post(served.token("dana"))
        assert again.status_code == 409 and "already approved by dana" in again.json()["message"]
        records = served.records()
    assert len(read_rows(home, TICKETS)) == 26
    decided = [r for r in records if r["tool"] == "changes/approve"]
    assert [(r["principal"], r["outcome"]) for r in decided] == [
        ("sam", "denied"),
        ("support_agent", "denied"),
        ("dana", "ok"),
        ("dana", "invalid"),
    ]


RESTORE_RULES = """
rules:
  - subject: role:data_steward
    operations: [restore]
    datasets: ["support.*"]
"""


def test_a_restore_waits_for_a_person_and_is_refused_when_the_table_moved_meanwhile(home: Path, tmp_path: Path) -> None:
    runtime = runtime_with_policy_file(home, tmp_path, "approvals.yaml", RESTORE_RULES)
    try:
        first, _ = snapshots(home, TICKETS)
        assert gate_call(runtime, "admin", "append_rows", {"table": TICKETS, "rows": _tickets(700, 2)}).error is None
        latest, _ = snapshots(home, TICKETS)
        asked = gate_call(runtime, "data_steward", "restore_table", {"table": TICKETS, "snapshot_id": str(first)})
        result = asked.result.model_dump()  # type: ignore[union-attr]
        assert (result["status"], result["changed"], result["snapshot_id"]) == ("pending", False, latest)
        assert "pending a person's approval" in asked.text
        assert snapshots(home, TICKETS)[0] == latest  # unchanged until approved
        change_id = result["change_id"]
        repeated = gate_call(runtime, "data_steward", "restore_table", {"table": TICKETS, "snapshot_id": str(first)})
        assert repeated.result.model_dump()["change_id"] == change_id  # type: ignore[union-attr]  # idempotent
        # Who may not read the table learns nothing of the change, not even the table's name.
        with pytest.raises(NotFound, match="no change .* that you can see"):
            _decide(runtime, "analyst", change_id, approve=True)
        with pytest.raises(PolicyDenied, match="nobody may decide their own change"):
            _decide(runtime, "data_steward", change_id, approve=True)
        decided = _decide(runtime, "admin", change_id, approve=True)
        assert decided.status == "approved" and decided.applied_snapshot_id == first
        assert snapshots(home, TICKETS)[0] == first and len(read_rows(home, TICKETS)) == 1
        status = gate_call(runtime, "data_steward", "change_status", {"change_id": change_id}).result
        assert status is not None and status.model_dump()["kind"] == "restore"
        # Asked again, then the table moves: approving would undo the new rows unseen, so it is refused.
        again = gate_call(runtime, "data_steward", "restore_table", {"table": TICKETS, "snapshot_id": str(latest)})
        change = again.result.model_dump()["change_id"]  # type: ignore[union-attr]
        assert gate_call(runtime, "admin", "append_rows", {"table": TICKETS, "rows": _tickets(800, 1)}).error is None
        with pytest.raises(InvalidArgument, match="changed since the restore"):
            _decide(runtime, "admin", change, approve=True)
        assert _decide(runtime, "admin", change, approve=False).status == "rejected"
        # A restore to the snapshot that is current already needs nobody.
        current, _ = snapshots(home, TICKETS)
        same = gate_call(runtime, "data_steward", "restore_table", {"table": TICKETS, "snapshot_id": str(current)})
        assert same.result is not None and same.result.model_dump()["status"] == "applied"
    finally:
        runtime.close()


def test_the_audit_report_shows_changes_pending_and_decided(runtime: Runtime, home: Path, tmp_path: Path) -> None:
    decided = _stage(runtime)
    _decide(runtime, "data_steward", decided, approve=True)
    pending = _stage(runtime, first=300)
    page = tmp_path / "report.html"
    args = ["--project", str(REPO), "audit", "report", "--log", str(tmp_path / "audit.jsonl"), "-o", str(page)]
    made = CliRunner().invoke(cli, args, env={"LAKEGATE_HOME": str(home)})
    assert made.exit_code == 0, made.output
    rows = _parse(page.read_text(encoding="utf-8")).rows["table-changes"]
    by_change = {row[0]: row for row in rows[1:]}
    assert by_change[pending][5] == "pending" and by_change[pending][2] == "support_agent"
    assert by_change[decided][5] == "approved" and by_change[decided][6] == "data_steward"
    assert by_change[decided][4] == "25 rows" and by_change[decided][8]  # the snapshot that holds it
