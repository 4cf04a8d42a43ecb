"""The one choke point: principal -> Casbin decision -> run -> audit record -> result.

Every tool call, whatever the transport, goes through `Gate.call`:
1. the tool-level decision (`tool:<name>`, action `call`); deny by default;
2. argument validation against the tool's model (bad arguments are audited too);
3. the handler, in a worker thread, with a `CallScope` that takes a decision on every resource;
4. the audit record, written before anything is returned; if it cannot be written, the call fails
   and no data leaves the server (fail closed);
5. the result, or an MCP tool error whose text tells the agent what to do instead.

A listing (`tools/list`, `resources/list`, ...) is audited too, through `Gate.audit_listing`, and
fails closed the same way: no record, no list. Every other request that reads or decides anything
(`prompts/get`, `completion/complete`, `resources/subscribe`) goes through `Gate.request`: the
same scope, decisions and record as a call, with the MCP method in the record's `tool`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import anyio
import anyio.to_thread
import structlog
from mcp.types import CallToolResult, TextContent
from pydantic import BaseModel, ValidationError

from lakegate.catalog.definitions import CatalogDefinitions
from lakegate.catalog.live_metrics import LiveMetrics
from lakegate.catalog.metric_definitions import SemanticCatalog
from lakegate.catalog.warehouse import Warehouse
from lakegate.errors import (
    AuditWriteError,
    Cancelled,
    ClientError,
    InvalidArgument,
    LakegateError,
    NotFound,
    PolicyDenied,
    PolicyUnavailable,
    QuotaExceeded,
    ServerError,
)
from lakegate.policies.enforcer import PolicyEnforcer, noting_unavailable
from lakegate.policies.resources import tool_resource
from lakegate.server.audit.log import AuditLog
from lakegate.server.audit.record_builders import call_record, listing_record
from lakegate.server.audit.record_model import AuditRecord, Decision
from lakegate.server.audit.redaction import (
    KEY_FILE,
    AuditKey,
    audit_arguments,
    hidden_filter_values,
    hide_filter_values_in_sql,
    loggable,
    redact_arguments,
)
from lakegate.server.gate.identity import CallOrigin, Principal
from lakegate.server.gate.quota_ledger import InProcessLedger, QuotaLedger
from lakegate.server.gate.quotas import Admission, Quotas
from lakegate.server.gate.scope import CallScope, ProgressFn
from lakegate.server.settings import Settings
from lakegate.tools.base import ToolSpec

__all__ = ["Gate", "GateOutcome", "redact_arguments", "to_call_result"]

log = structlog.get_logger(__name__)

MAX_TOOL_NAME = 64
#: In a refused call's `_meta`: seconds until the quota that refused it frees up.
RETRY_AFTER_META = "io.lakegate/retry_after_s"
AnswerT = TypeVar("AnswerT")


@dataclass(frozen=True)
class GateOutcome:
    """What a call produced, before it is turned into an MCP result."""

    result: BaseModel | None
    text: str
    error: LakegateError | None
    record: dict[str, Any] | None
    #: The result as JSON, serialised once: its size goes to the audit record, its content to the client.
    payload: str = ""


def _validation_message(tool: str, exc: ValidationError) -> str:
    problems = []
    for error in exc.errors()[:5]:
        where = ".".join(str(part) for part in error["loc"]) or "arguments"
        problems.append(f"{where}: {error['msg']}")
    return f"Invalid arguments for {tool}: " + "; ".join(problems) + "."


class Gate:
    def __init__(
        self,
        settings: Settings,
        enforcer: PolicyEnforcer,
        warehouse: Warehouse,
        definitions: CatalogDefinitions,
        audit: AuditLog,
        tools: Mapping[str, ToolSpec[Any, Any]],
        metrics: LiveMetrics | None = None,
        ledger: QuotaLedger | None = None,
    ) -> None:
        self.settings = settings
        self.enforcer = enforcer
        self.warehouse = warehouse
        self.definitions = definitions
        self.audit = audit
        self.tools = dict(tools)
        self.metrics = metrics
        #: Quota use is counted here: in process unless the profile gives a shared ledger.
        self.quotas = Quotas(ledger or InProcessLedger())
        # Keys the hashes of redacted argument values; read (or created) when first needed.
        self.audit_key = AuditKey(settings.state_dir / KEY_FILE)

    @property
    def semantic(self) -> SemanticCatalog | None:
        """The metric definitions in force (None: this server serves no metrics)."""
        return self.metrics.catalog if self.metrics is not None else None

    def visible_tools(self, principal: Principal) -> list[ToolSpec[Any, Any]]:
        """The tools this principal may call: an agent is not shown what it cannot use."""
        return [
            spec
            for name, spec in self.tools.items()
            if self.enforcer.decide(principal.name, tool_resource(name), "call").allowed
        ]

    async def audit_listing(
        self, method: str, principal: Principal, origin: CallOrigin, *, listed: int, payload_bytes: int, started: float
    ) -> dict[str, Any]:
        """Write the audit record of one listing (`tools/list`, ...) and return it as written.

        The listing must not be answered when this raises: no record, no list (fail closed).

        Raises:
            AuditWriteError: the record could not be written.
        """
        record = listing_record(
            method=method,
            request_id=origin.request_id,
            session_id=origin.session_id,
            principal=principal.name,
            roles=principal.roles,
            authenticated_by=principal.authenticated_by,
            transport=origin.transport,
            client_name=origin.client_name,
            client_version=origin.client_version,
            policy_version=self.enforcer.version,
            listed=listed,
            payload_bytes=payload_bytes,
            duration_s=time.perf_counter() - started,
        )
        try:
            # As for a call: off the event loop, and a cancel does not separate a listing from its record.
            with anyio.CancelScope(shield=True):
                written: dict[str, Any] = await anyio.to_thread.run_sync(self.audit.append, record.model_dump())
        except AuditWriteError as exc:
            log.error("audit.write_failed", tool=method, error=repr(exc.__cause__))
            raise
        return written

    def scope(self, principal: Principal, progress: ProgressFn | None = None) -> CallScope:
        return CallScope(
            principal, self.enforcer, self.warehouse, self.definitions, self.settings, progress, self.metrics
        )

    async def call(
        self,
        tool_name: str,
        arguments: Mapping[str, Any] | None,
        principal: Principal,
        origin: CallOrigin,
        progress: ProgressFn | None = None,
    ) -> GateOutcome:
        """Run one tool call through the gate. Never raises: failures become the outcome's error."""
        with noting_unavailable() as unavailable:
            return await self._call(tool_name, arguments, principal, origin, progress, unavailable)

    async def _call(
        self,
        tool_name: str,
        arguments: Mapping[str, Any] | None,
        principal: Principal,
        origin: CallOrigin,
        progress: ProgressFn | None,
        unavailable: list[str],
    ) -> GateOutcome:
        started = time.perf_counter()
        arguments = dict(arguments or {})
        scope = self.scope(principal, progress)
        result: BaseModel | None = None
        text = ""
        payload = ""
        error: LakegateError | None = None
        admission: Admission | None = None
        tool_name = loggable(tool_name)
        tool_decision = scope.decide(tool_resource(tool_name[:MAX_TOOL_NAME]), "call")
        scope.record("tool", tool_name[:MAX_TOOL_NAME], "call" if tool_decision.allowed else "denied")
        try:
            _require_available(unavailable)
            spec = self.tools.get(tool_name)
            if not tool_decision.allowed:
                if spec is None:
                    raise NotFound(
                        f"There is no tool named '{tool_name[:MAX_TOOL_NAME]}'.",
                        hint="List the tools to see the ones you can use.",
                    )
                raise PolicyDenied(
                    f"Principal '{principal.name}' may not call {tool_name} ({tool_decision.rule_text}).",
                    hint="Use one of the tools you were listed, or ask a data steward for access.",
                    rule=list(tool_decision.rule),
                )
            if spec is None:
                raise NotFound(f"There is no tool named '{tool_name[:MAX_TOOL_NAME]}'.")
            admission = await self._admit(scope, spec)
            try:
                args = spec.args.model_validate(arguments)
            except ValidationError as exc:
                raise InvalidArgument(
                    _validation_message(tool_name, exc),
                    hint="Check the tool's input schema and call it again.",
                ) from exc
            produced = await _run_handler(spec, scope, args)
            if spec.read_only:
                # A decision taken while the policy could not be confirmed was a denial: a result
                # built on it would be incomplete without saying why. A write has landed by now
                # and is reported as it is.
                _require_available(unavailable)
            text = spec.render(produced)
            payload = produced.model_dump_json()
            result = produced
        except anyio.get_cancelled_exc_class():
            # The client cancelled: the handler was interrupted; the call is still audited.
            with anyio.CancelScope(shield=True):
                try:
                    record = self._record(
                        tool_name, arguments, principal, origin, scope, tool_decision.allowed, 0, Cancelled(), started
                    )
                    await anyio.to_thread.run_sync(self.audit.append, record.model_dump())
                except AuditWriteError as exc:
                    log.error("audit.write_failed", tool=tool_name, error=repr(exc.__cause__))
            raise
        except Exception as exc:
            error = _failure(exc, tool_name)
            if unavailable and isinstance(error, ClientError):
                # Refused on a decision the policy store could not back (a column "hidden", a
                # dataset "not found"): say so, so that the agent retries instead of giving up.
                error = PolicyUnavailable(unavailable[0])
        finally:
            if admission is not None:
                with anyio.CancelScope(shield=True):
                    # Rows count when a query or a search returned them (not a write's rows, nor the
                    # items of a catalog listing).
                    family = spec.family if spec is not None else None
                    returned = error is None and result is not None and family in ("query", "search")
                    settled = await self._settle(admission, scope, returned=returned)
                error = error or settled
        if isinstance(error, QuotaExceeded):
            scope.details["quota"] = {
                "limit": error.limit,
                "used": error.used,
                "allowed": error.allowed,
                "retry_after_s": error.retry_after_s,
            }

        try:
            # Building the record may fail too (the redaction key cannot be read): fail closed as well.
            record = self._record(
                tool_name, arguments, principal, origin, scope, tool_decision.allowed, len(payload), error, started
            )
            # Off the event loop: an fsync, or a round trip to PostgreSQL in the production profile,
            # must not stall the other sessions this process serves. Shielded: once the call has
            # run, a cancel must not separate it from its record.
            with anyio.CancelScope(shield=True):
                written = await anyio.to_thread.run_sync(self.audit.append, record.model_dump())
        except AuditWriteError as exc:
            log.error("audit.write_failed", tool=tool_name, error=repr(exc.__cause__))
            return GateOutcome(None, "", exc, None)
        if error is not None:
            return GateOutcome(None, text, error, written)
        return GateOutcome(result, text, None, written, payload)

    async def _admit(self, scope: CallScope, spec: ToolSpec[Any, Any]) -> Admission:
        """Let the call in under its caller's quotas, and hand its query the scan budget left.

        Raises:
            QuotaExceeded: a quota is used up; the call does not run.
            BackendError: the shared ledger cannot be reached (fail closed).
        """
        quotas, principal, roles = scope.quotas(), scope.principal.name, scope.roles()

        def admit() -> Admission:
            return self.quotas.admit(quotas, principal, roles, spec.family)

        admission = admit() if self.quotas.ledger.in_process else await anyio.to_thread.run_sync(admit)
        scope.scan_budget = admission.scan_budget
        return admission

    async def _settle(self, admission: Admission, scope: CallScope, *, returned: bool) -> LakegateError | None:
        """Count the call's use against its quotas; a ledger failure is the call's error (no data
        leaves a call whose use could not be counted)."""

        def settle() -> None:
            self.quotas.settle(admission, scan_bytes=scope.scan_bytes, rows=scope.rows if returned else 0)

        try:
            if self.quotas.ledger.in_process:
                settle()
            else:
                await anyio.to_thread.run_sync(settle)
        except LakegateError as exc:
            log.error("quota.settle_failed", error=repr(exc))
            return exc
        return None

    async def request(
        self,
        method: str,
        arguments: Mapping[str, Any],
        principal: Principal,
        origin: CallOrigin,
        answer: Callable[[CallScope], AnswerT],
        *,
        size: Callable[[AnswerT], int] = lambda _: 0,
    ) -> AnswerT:
        """Answer one MCP request that is not a tool call through the gate.

        `answer` runs in a worker thread with the caller's scope, which takes every decision and
        notes what was touched; the audit record (tool = `method`, `rows` = scope.rows) is written
        before the answer is returned, and on failure too.

        Raises:
            ClientError: what `answer` raised for the caller's mistake or a denial (recorded).
            ServerError: lakegate failed (recorded; its message hides the details).
            AuditWriteError: no record could be written (no answer leaves the server).
        """
        started = time.perf_counter()
        scope = self.scope(principal)
        error: LakegateError | None = None
        payload = 0
        with noting_unavailable() as unavailable:
            try:
                answered = await anyio.to_thread.run_sync(answer, scope)
                _require_available(unavailable)
                payload = size(answered)
            except Exception as exc:
                error = _failure(exc, method)
                if unavailable and isinstance(error, ClientError):
                    error = PolicyUnavailable(unavailable[0])
        try:
            record = self._record(method, arguments, principal, origin, scope, True, payload, error, started)
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(self.audit.append, record.model_dump())
        except AuditWriteError as exc:
            log.error("audit.write_failed", tool=method, error=repr(exc.__cause__))
            raise
        if error is not None:
            raise error
        return answered

    def _record(
        self,
        tool_name: str,
        arguments: Mapping[str, Any],
        principal: Principal,
        origin: CallOrigin,
        scope: CallScope,
        tool_allowed: bool,
        payload_bytes: int,
        error: LakegateError | None,
        started: float,
    ) -> AuditRecord:
        """The call's audit record.

        Raises:
            AuditWriteError: it cannot be built (the redaction key cannot be read, a value does not fit).
        """
        accesses = {touched.access for touched in scope.touched}
        # A dataset (or metric) the caller may not read is refused with NotFound, so that the agent
        # cannot tell it from a missing one; the record, read by reviewers and never by the agent,
        # says what the policy did. The tool's own entry is left out: an unknown tool is really missing.
        refused_resource = any(t.access == "denied" and t.type != "tool" for t in scope.touched)
        decision: Decision
        if not tool_allowed or isinstance(error, PolicyDenied) or refused_resource:
            decision = "deny"
        elif accesses & {"masked", "hidden", "filtered"}:
            decision = "partial"
        else:
            decision = "allow"
        if error is None:
            outcome = "ok"
        elif refused_resource and isinstance(error, NotFound):
            outcome = PolicyDenied.outcome
        else:
            outcome = error.outcome
        audited = audit_arguments(
            tool_name,
            arguments,
            self.enforcer.redaction,
            self.audit_key,
            definitions=self.definitions,
            semantic=self.semantic,
            extra_names=self.settings.audit.sensitive_arguments,
        )
        hidden = hidden_filter_values(
            tool_name,
            arguments,
            self.enforcer.redaction,
            definitions=self.definitions,
            semantic=self.semantic,
            extra_names=self.settings.audit.sensitive_arguments,
        )
        message = None if error is None else _public_message(error)
        details, message = hide_filter_values_in_sql(scope.details, message, hidden, self.audit_key)
        return call_record(
            request_id=origin.request_id,
            session_id=origin.session_id,
            principal=principal.name,
            roles=principal.roles,
            authenticated_by=principal.authenticated_by,
            transport=origin.transport,
            client_name=origin.client_name,
            client_version=origin.client_version,
            tool=tool_name[:MAX_TOOL_NAME],
            arguments=audited,
            decision=decision,
            rules=scope.rules,
            policy_version=self.enforcer.version,
            resources=scope.touched,
            rows=scope.rows if error is None else 0,
            payload_bytes=payload_bytes if error is None else 0,
            duration_s=time.perf_counter() - started,
            outcome=outcome,
            error=message,
            details=details,
        )


async def _run_handler(spec: ToolSpec[Any, Any], scope: CallScope, args: BaseModel) -> BaseModel:
    """Run a handler in a worker thread.

    A read-only call that the client cancels stops at once: the scope interrupts its query, and the
    gate audits the call as cancelled. A write is never abandoned half-way: it runs to its end
    shielded from cancellation, so that its audit record says what really happened to the table.
    """
    if not spec.read_only:
        with anyio.CancelScope(shield=True):
            written: BaseModel = await anyio.to_thread.run_sync(spec.handler, scope, args)
        return written
    try:
        # abandon_on_cancel: cancellation reaches this await at once, instead of after the thread.
        produced: BaseModel = await anyio.to_thread.run_sync(spec.handler, scope, args, abandon_on_cancel=True)
    except anyio.get_cancelled_exc_class():
        scope.cancel()
        raise
    return produced


def _require_available(unavailable: list[str]) -> None:
    """Raises: PolicyUnavailable: a decision of this call was denied because the policy store
    could not be confirmed current (production profile)."""
    if unavailable:
        raise PolicyUnavailable(unavailable[0])


def _failure(exc: Exception, tool: str) -> LakegateError:
    """What a failed handler raised, as the error the caller gets: the caller's own mistake as it
    is, lakegate's failures logged here with their details (which the caller never sees). A log that
    fails does not stop the call's audit record."""
    if isinstance(exc, ClientError):
        return exc
    try:
        if isinstance(exc, ServerError):
            log.error("tool.server_error", tool=tool, error=repr(exc), cause=repr(exc.__cause__))
        else:
            log.error("tool.unexpected_error", tool=tool, exc_info=exc)
    except Exception:  # noqa: S110 - the record matters more than this log line
        pass
    return exc if isinstance(exc, ServerError) else ServerError(f"{type(exc).__name__}: {exc}")


def _public_message(error: LakegateError) -> str:
    if isinstance(error, ServerError):
        return error.public_message
    return str(error)


def to_call_result(outcome: GateOutcome) -> CallToolResult:
    """The MCP result for a gate outcome: structured content plus its compact text, or a tool error."""
    if outcome.error is not None:
        message = _public_message(outcome.error)
        if isinstance(outcome.error, ServerError) and outcome.record is not None:
            message += f" Reference: request {outcome.record['request_id']}."
        meta = {RETRY_AFTER_META: outcome.error.retry_after_s} if isinstance(outcome.error, QuotaExceeded) else None
        return CallToolResult(content=[TextContent(type="text", text=message)], is_error=True, _meta=meta)
    structured = json.loads(outcome.payload)
    return CallToolResult(content=[TextContent(type="text", text=outcome.text)], structured_content=structured)
