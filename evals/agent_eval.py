"""Agent evals: YAML scenarios of tool calls, run against the real server with the real MCP client.

Each scenario (format: `evals.agent_scenarios`, files in `evals/scenarios/`) is a sequence of
steps taken as one demo principal over stdio (`lakegate serve --principal NAME`), each with what
it must produce: values at paths of the structured result, text in the rendering, or a tool error
whose message says something.

Besides what each step expects, every step is checked for what must always hold: the audit log
grew by exactly one call record per tool call, naming the tool and the principal, and by none for
a step without one (listing records, `AuditRecord.is_listing`, are not calls: a `list_tools`
step must leave one, and the MCP client lists the tools by itself after its first call of a tool
it has not listed); no new record carries a key or a server path; and nothing lakegate says
itself, outside the data fields (tool descriptions, the initialize instructions, error messages,
the text around the data), reads as an instruction to the agent (`evals.scenario_checks`). The
runner starts one server per principal and runs that principal's scenarios in it, in file order
(a scenario with `own_server: true` gets a server of its own); a scenario stops at its first
failing step.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

import anyio
from mcp import Client
from mcp.client.stdio import stdio_client
from mcp.types import Implementation
from pydantic import BaseModel, ConfigDict, Field

from lakegate.evals.agent_scenarios import SCENARIOS_DIR, Expect, Scenario, Step, load_scenarios, select, substitute
from lakegate.evals.leaks import Forbidden
from lakegate.evals.mcp_client import REPO, server_params, text_of
from lakegate.evals.scenario_checks import (
    all_strings,
    check_planted,
    check_value,
    instruction_like,
    non_data_problem,
    resolve,
)
from lakegate.server.audit.log import verify
from lakegate.server.audit.record_model import audit_record, read_audit_records

__all__ = [
    "RESULTS_PATH",
    "SCENARIOS_DIR",
    "EvalReport",
    "Scenario",
    "ScenarioResult",
    "load_scenarios",
    "run",
    "run_eval",
    "select",
]

RESULTS_PATH = Path(__file__).resolve().parent / "results" / "agent_eval.json"
#: Longest wait for one answer: a request the server never answers fails its step, not the eval.
STEP_TIMEOUT_S = 60.0
CLIENT = Implementation(name="lakegate-agent-eval", version="1.0")
MAX_TOOL_NAME = 64  # the gate keeps this much of a tool name in the audit record
#: The call each server answers before its turn: it loads the embedding model (a few seconds of
#: CPU) while the previous principal's scenarios run. Denied for a principal without the tool.
WARM_UP: tuple[str, dict[str, Any]] = ("search_catalog", {"query": "orders"})
#: How many servers start and warm up ahead of the one running scenarios: two keep both of a
#: 2-core machine's cores busy while scenarios run one principal at a time.
PREFETCH = 2


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class StepResult(_Strict):
    index: int
    action: str
    passed: bool
    reason: str | None = None
    seconds: float
    calls: int = Field(0, description="Tool calls the step made (more than one with until_error).")


class ScenarioResult(_Strict):
    name: str
    principal: str
    file: str
    tags: list[str]
    steps: int
    steps_run: int
    passed: bool
    reason: str | None = None
    seconds: float
    step_results: list[StepResult]


class EvalReport(_Strict):
    generated_at: str
    home: str
    scenarios_dir: str
    seconds: float
    passed: int
    failed: int
    audit_records: int = Field(description="Records in the principals' audit logs, listings included.")
    audit_listings: int = Field(0, description="Of those, listing records (tools/list, ...): not tool calls.")
    audit_verified: bool
    audit_problem: str | None = None
    startup_seconds: dict[str, float] = Field(
        description="Time to start each server and answer its warm-up call, by principal (or "
        "principal-scenario for a scenario with a server of its own)."
    )
    cpus: int | None = Field(description="CPU cores of the machine that ran the eval.")
    load_average: float | None = Field(description="1-minute load average when the eval started (shared machines).")
    scenarios: list[ScenarioResult]

    @property
    def ok(self) -> bool:
        return self.failed == 0 and self.audit_verified and bool(self.scenarios)


# --- audit ----------------------------------------------------------------------------------------


class _AuditWatch:
    """The records appended to the audit log since the last look."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = path.stat().st_size if path.exists() else 0

    def new_records(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        if self.path.stat().st_size < self.offset:
            self.offset = 0  # the log was rotated: a new active file
        with self.path.open("rb") as handle:
            handle.seek(self.offset)
            data = handle.read()
        complete = data[: data.rfind(b"\n") + 1]
        self.offset += len(complete)
        return [json.loads(line) for line in complete.splitlines() if line.strip()]


# --- running ----------------------------------------------------------------------------------------


#: What `_call` answers for a call that succeeded where `until_error` waits for one that fails.
_NOT_YET = "the call succeeded (not yet the expected error)"


def _short(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


class _Session:
    """One principal's server, and the steps run against it."""

    def __init__(self, client: Client, principal: str, audit: _AuditWatch, forbidden: Forbidden) -> None:
        self.client = client
        self.principal = principal
        self.audit = audit
        self.forbidden = forbidden
        self.calls = 0  # tool calls made so far

    async def run(self, scenario: Scenario) -> ScenarioResult:
        started = time.perf_counter()
        saved: dict[str, Any] = {}
        results: list[StepResult] = []
        reason = None
        for index, step in enumerate(scenario.steps, 1):
            step_started, calls_before = time.perf_counter(), self.calls
            try:
                problem = await self._step(step, saved)
            except Exception as exc:  # the eval reports it; the next scenario still runs
                problem = f"{type(exc).__name__}: {_short(str(exc), 300)}"
            results.append(
                StepResult(
                    index=index,
                    action=step.action,
                    passed=problem is None,
                    reason=problem,
                    seconds=round(time.perf_counter() - step_started, 3),
                    calls=self.calls - calls_before,
                )
            )
            if problem is not None:
                reason = f"step {index} ({step.action}): {problem}"
                break
        return ScenarioResult(
            name=scenario.name,
            principal=scenario.principal,
            file=scenario.file,
            tags=scenario.tags,
            steps=len(scenario.steps),
            steps_run=len(results),
            passed=reason is None,
            reason=reason,
            seconds=round(time.perf_counter() - started, 3),
            step_results=results,
        )

    async def _step(self, step: Step, saved: dict[str, Any]) -> str | None:
        expect = Expect.model_validate(substitute(step.expect.model_dump(exclude_unset=True), saved))
        if step.call is not None and step.until_error is not None:
            problem = await self._call_until_error(step.call, substitute(step.args, saved), expect, step.until_error)
        elif step.call is not None:
            problem = await self._call(step.call, substitute(step.args, saved), expect, step.save, saved)
        elif step.list_tools:
            problem = await self._list_tools(expect)
        else:
            problem = _check_words("instructions", self.client.instructions or "", expect)
        if problem is None and step.call is None:
            problem = self._no_call_audited(listed=step.list_tools)
        return problem

    async def _call_until_error(self, tool: str, args: dict[str, Any], expect: Expect, most: int) -> str | None:
        for _ in range(most):
            problem = await self._call(tool, args, expect, {}, {}, success_is_not_yet=True)
            if problem is not _NOT_YET:
                return problem
        return f"the call did not fail in {most} tries (expected an error containing {expect.error!r})"

    async def _call(
        self,
        tool: str,
        args: dict[str, Any],
        expect: Expect,
        save: dict[str, str],
        saved: dict[str, Any],
        *,
        success_is_not_yet: bool = False,
    ) -> str | None:
        self.calls += 1
        try:
            result = await self.client.call_tool(tool, args, read_timeout_seconds=STEP_TIMEOUT_S)
        except Exception as exc:
            # A request the server never answers (or a client that refuses to send it) ends here.
            self.audit.new_records()
            return f"no answer to the call ({type(exc).__name__}: {_short(str(exc), 200) or 'timed out'})"
        problem = self._audited(tool, args)
        if problem is not None:
            return problem
        text = text_of(result)
        structured = result.structured_content
        if leaks := self.forbidden.found([text, structured], sent=args):
            return f"the answer carries {', '.join(leaks)}"
        if expect.error is not None:
            if not result.is_error:
                if success_is_not_yet:
                    return non_data_problem(structured, text) or _NOT_YET
                return f"expected an error containing {expect.error!r}, but the call succeeded: {_short(text)}"
            if expect.error.lower() not in text.lower():
                return f"expected an error containing {expect.error!r}, got: {_short(text)}"
        elif result.is_error:
            return f"the call failed: {_short(text)}"
        problem = non_data_problem(structured, text) or _check_words("text", text, expect)
        for check in expect.values:
            problem = problem or check_value(structured or {}, check)
        if problem is None and expect.planted:
            # An error holds no data: planted text must not be in it at all.
            problem = (
                non_data_problem(None, text, planted=expect.planted)
                if result.is_error
                else check_planted(structured, text, expect.planted)
            )
        if problem is not None:
            return problem
        for name, path in save.items():
            found = resolve(structured or {}, path)
            if not found:
                return f"nothing at {path} to save as {name}"
            saved[name] = found[0]
        return None

    def _audited(self, tool: str, args: dict[str, Any]) -> str | None:
        records = self.audit.new_records()
        # The listing the client may have sent after the call's result is a reviewer's reading too.
        if leaks := self.forbidden.found(records, sent=args):
            return f"the audit record carries {', '.join(leaks)}"
        calls = [record for record in records if not audit_record(record).is_listing]
        if len(calls) != 1:
            return f"the audit log grew by {len(calls)} call record(s) for one call (expected exactly 1)"
        record = calls[0]
        if record.get("tool") != tool[:MAX_TOOL_NAME] or record.get("principal") != self.principal:
            return (
                f"the audit record names tool {record.get('tool')!r} and principal {record.get('principal')!r}, "
                f"not {tool!r} and {self.principal!r}"
            )
        return None

    def _no_call_audited(self, *, listed: bool) -> str | None:
        """A step without a tool call left no call record; a `list_tools` step left its listing's."""
        records = self.audit.new_records()
        if leaks := self.forbidden.found(records):
            return f"the audit record carries {', '.join(leaks)}"
        if calls := [record for record in records if not audit_record(record).is_listing]:
            return f"the audit log grew by {len(calls)} call record(s) without a tool call"
        listings = [r for r in records if r.get("tool") == "tools/list" and r.get("principal") == self.principal]
        if listed and len(listings) != 1:
            return f"the audit log grew by {len(listings)} tools/list record(s) for one listing (expected exactly 1)"
        return None

    async def _list_tools(self, expect: Expect) -> str | None:
        listed = (await self.client.list_tools()).tools
        names = {tool.name for tool in listed}
        missing = sorted(set(expect.tools) - names)
        if missing:
            return f"tools not listed: {', '.join(missing)} (listed: {', '.join(sorted(names)) or 'none'})"
        unexpected = sorted(set(expect.tools_not) & names)
        if unexpected:
            return f"tools listed that must not be: {', '.join(unexpected)}"
        listing = {"tools": [tool.model_dump(mode="json", exclude_none=True) for tool in listed]}
        for tool in listing["tools"]:
            for where, text in all_strings(tool):
                phrase = instruction_like(text)
                if phrase is not None:
                    return f"tool {tool['name']} reads as an instruction at {where}: {phrase!r}"
                planted = next((p for p in expect.planted if p.lower() in text.lower()), None)
                if planted is not None:
                    return f"planted text {planted!r} in the description of tool {tool['name']} ({where})"
        for check in expect.values:
            problem = check_value(listing, check)
            if problem is not None:
                return problem
        return None


def _check_words(what: str, text: str, expect: Expect) -> str | None:
    lowered = text.lower()
    for wanted in expect.text:
        if wanted.lower() not in lowered:
            return f"the {what} does not contain {wanted!r}: {_short(text)}"
    for unwanted in expect.text_not:
        if unwanted.lower() in lowered:
            return f"the {what} contains {unwanted!r}: {_short(text)}"
    if what == "instructions":
        phrase = instruction_like(text)
        if phrase is not None:
            return f"the instructions read as an injected instruction: {phrase!r}"
        planted = next((p for p in expect.planted if p.lower() in lowered), None)
        if planted is not None:
            return f"planted text {planted!r} in the instructions"
    return None


@asynccontextmanager
async def _serve(
    principal: str, home: Path, project: Path, audit: Path, errlog: TextIO, catalogs: str
) -> AsyncIterator[Client]:
    # Embedded whatever the environment says: the scenarios expect the demo warehouse in `home`.
    params = server_params(
        principal,
        home,
        project=project,
        LAKEGATE_AUDIT__PATH=str(audit),
        LAKEGATE_PROFILE="embedded",
        LAKEGATE_CATALOGS=catalogs,
    )
    async with Client(stdio_client(params, errlog=errlog), client_info=CLIENT, read_timeout_seconds=120) as client:
        yield client


#: The name the servers attach the outside catalog under (scenarios in evals/scenarios/attached.yaml).
ATTACHED = "crm_lake"


def outside_catalog(root: Path) -> dict[str, Any]:
    """An Iceberg catalog lakegate did not create, as another team's pipeline made it: a SQLite SQL
    catalog "outside" under `root` (made once) with crm.contacts; its settings for `[catalogs.X]`."""
    from pyiceberg.catalog.sql import SqlCatalog

    uri, files = f"sqlite:///{root / 'catalog.db'}", (root / "files").as_uri()
    if not (root / "catalog.db").exists():
        import pyarrow as pa

        root.mkdir(parents=True, exist_ok=True)
        catalog = SqlCatalog("outside", uri=uri, warehouse=files)
        catalog.create_namespace("crm")
        contacts = pa.table(
            {
                "contact_id": pa.array([1, 2, 3, 4], pa.int64()),
                "company": ["Acme", "Globex", "Initech", "Umbrella"],
                "segment": ["smb", "enterprise", "smb", "enterprise"],
            }
        )
        table = catalog.create_table(
            ("crm", "contacts"), schema=contacts.schema, properties={"comment": "CRM accounts."}
        )
        table.append(contacts)
    return {"catalog_name": "outside", "properties": {"type": "sql", "uri": uri, "warehouse": files}}


def _failed(scenario: Scenario, reason: str) -> ScenarioResult:
    return ScenarioResult(
        name=scenario.name,
        principal=scenario.principal,
        file=scenario.file,
        tags=scenario.tags,
        steps=len(scenario.steps),
        steps_run=0,
        passed=False,
        reason=reason,
        seconds=0.0,
        step_results=[],
    )


def _tail(path: Path, lines: int = 5) -> str:
    try:
        kept = [line for line in path.read_text(errors="replace").splitlines() if line.strip()][-lines:]
    except OSError:
        return ""
    return " / ".join(kept)


async def run_eval(
    scenarios: list[Scenario],
    home: Path,
    work: Path,
    *,
    project: Path = REPO,
    scenarios_dir: Path = SCENARIOS_DIR,
    on_result: Callable[[ScenarioResult], None] | None = None,
) -> EvalReport:
    """Run `scenarios` against the warehouse in `home`, one server per principal (and one for each
    scenario with `own_server`), in order.

    Principals take turns in the order they first appear, and only one runs scenarios at a time,
    so that a scenario's writes never race another's reads. The next principals' servers (up to
    `PREFETCH`) start and answer a warm-up call (`WARM_UP`: it loads the embedding model) while
    the current one runs; the warm-up's audit record precedes the scenarios' and is not theirs
    (the first principal's server, started when nothing else runs, gets none). Each server writes
    its audit log to `work/audit-<principal>.jsonl` (checked per call and verified at the end) and
    its stderr to `work/server-<principal>.log`. `on_result` is called as each scenario finishes,
    in order. A failure never raises: it is in the report.
    """
    started = time.perf_counter()
    load = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
    work.mkdir(parents=True, exist_ok=True)
    outside = work / "outside-catalog"
    catalogs = json.dumps({ATTACHED: outside_catalog(outside)})
    # One server per principal, and one more for each scenario that asks for a server of its own;
    # each named by its label: the principal, or "principal-scenario".
    by_principal: dict[str, list[Scenario]] = {}
    for scenario in scenarios:
        label = f"{scenario.principal}-{scenario.name}" if scenario.own_server else scenario.principal
        by_principal.setdefault(label, []).append(scenario)
    principals = list(by_principal)
    may_start = [anyio.Event() for _ in principals]
    turn = [anyio.Event() for _ in principals]
    results: list[ScenarioResult] = []
    startup: dict[str, float] = {}

    def done(result: ScenarioResult) -> None:
        results.append(result)
        if on_result is not None:
            on_result(result)

    async def session(index: int) -> None:
        label = principals[index]
        pending = list(by_principal[label])
        principal = pending[0].principal
        log_path = work / f"server-{label}.log"
        audit_path = work / f"audit-{label}.jsonl"
        await may_start[index].wait()
        began = time.perf_counter()
        try:
            with log_path.open("w", encoding="utf-8") as errlog:
                async with _serve(principal, home, project, audit_path, errlog, catalogs) as client:
                    if index > 0:  # started ahead of its turn: load the model meanwhile
                        await client.call_tool(*WARM_UP, read_timeout_seconds=STEP_TIMEOUT_S)
                    startup[label] = round(time.perf_counter() - began, 3)
                    await turn[index].wait()
                    allow_start(index + PREFETCH)
                    forbidden = Forbidden.of(home, project, outside)
                    runner = _Session(client, principal, _AuditWatch(audit_path), forbidden)
                    while pending:
                        done(await runner.run(pending.pop(0)))
        except Exception as exc:
            await turn[index].wait()
            reason = f"the server for {principal} failed ({type(exc).__name__}: {_short(str(exc), 200)})"
            log_tail = _tail(log_path)
            for scenario in pending:
                done(_failed(scenario, reason + (f"; its log ends: {_short(log_tail, 300)}" if log_tail else "")))
        finally:
            allow_start(index + PREFETCH)
            if index + 1 < len(principals):
                turn[index + 1].set()

    def allow_start(index: int) -> None:
        if index < len(principals):
            may_start[index].set()

    for index in range(PREFETCH + 1):
        allow_start(index)
    if principals:
        turn[0].set()
    async with anyio.create_task_group() as group:
        for index in range(len(principals)):
            group.start_soon(session, index)

    records, listings, problems = 0, 0, []
    for label in principals:
        audit_path = work / f"audit-{label}.jsonl"
        if audit_path.exists():
            report = verify(audit_path)
            records += report.records
            problems += [f"{label}: {problem.message}" for problem in report.problems[:3]]
            if report.ok:
                listings += sum(record.is_listing for record in read_audit_records(audit_path))
    failed = sum(1 for result in results if not result.passed)
    return EvalReport(
        generated_at=datetime.now(UTC).isoformat(timespec="seconds"),
        home=str(home),
        scenarios_dir=str(scenarios_dir),
        seconds=round(time.perf_counter() - started, 3),
        passed=len(results) - failed,
        failed=failed,
        audit_records=records,
        audit_listings=listings,
        audit_verified=not problems,
        audit_problem="; ".join(problems) or None,
        startup_seconds={label: startup[label] for label in principals if label in startup},
        cpus=os.cpu_count(),
        load_average=load,
        scenarios=results,
    )


def run(scenarios: list[Scenario], home: Path, work: Path, **kwargs: Any) -> EvalReport:
    """`run_eval` from synchronous code."""

    async def main() -> EvalReport:
        return await run_eval(scenarios, home, work, **kwargs)

    return anyio.run(main)
