"""Prometheus metrics of the HTTP server: tool calls by tool and decision, their latency, denials,
calls refused by a quota (by quota), refused tokens and HTTP requests by route and status.

Tool-call figures come from the audit records the gate writes (through `MeteredAuditLog`), so they
count exactly what the audit log holds. Label values are bounded: a tool name that is not
registered counts as `(unknown)`, a path that is not a route as `(other)`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, cast

import structlog
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lakegate.errors import QuotaExceeded
from lakegate.policies.quotas import QUOTA_NAMES
from lakegate.server.audit.log import AuditFormatError, AuditLog
from lakegate.server.audit.record_model import AuditRecord, audit_record

__all__ = ["HttpMetrics", "MeteredAuditLog", "RequestMetrics", "metered"]

log = structlog.get_logger(__name__)

UNKNOWN = "(unknown)"
OTHER = "(other)"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class HttpMetrics:
    """One server's metrics, in a registry of its own (so that servers in one process do not mix)."""

    def __init__(self, tools: Iterable[str], routes: Iterable[str]) -> None:
        self.tools = frozenset(tools)
        self.routes = tuple(routes)
        self.registry = CollectorRegistry()
        self.tool_calls = Counter(
            "lakegate_tool_calls",
            "Tool calls by tool, decision (allow, partial, deny) and outcome.",
            ["tool", "decision", "outcome"],
            registry=self.registry,
        )
        self.tool_latency = Histogram(
            "lakegate_tool_call_duration_seconds",
            "Time the gate took per tool call, decision and audit record included.",
            ["tool"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.denials = Counter(
            "lakegate_denials", "Tool calls the policy denied, by tool.", ["tool"], registry=self.registry
        )
        self.quota_refusals = Counter(
            "lakegate_quota_refusals",
            "Tool calls refused by a quota, by quota (calls_per_minute.<family>, concurrent_calls, "
            "daily_scan_bytes, daily_rows).",
            ["quota"],
            registry=self.registry,
        )
        self.auth_failures = Counter(
            "lakegate_auth_failures",
            "Requests refused for their bearer token, by reason (missing, expired, audience, signature, ...).",
            ["reason"],
            registry=self.registry,
        )
        self.http_requests = Counter(
            "lakegate_http_requests", "HTTP requests by route and status.", ["route", "status"], registry=self.registry
        )

    def observe_record(self, record: AuditRecord) -> None:
        """Count one audit record of a tool call (records of refusals and listings are not)."""
        if record.tool is None or record.is_listing:
            return
        label = record.tool if record.tool in self.tools else UNKNOWN
        self.tool_calls.labels(label, record.decision, record.outcome).inc()
        self.tool_latency.labels(label).observe(record.duration_ms / 1000)
        if record.decision == "deny":
            self.denials.labels(label).inc()
        if record.outcome == QuotaExceeded.outcome:
            quota = (record.details or {}).get("quota", {}).get("limit")
            self.quota_refusals.labels(quota if quota in QUOTA_NAMES else UNKNOWN).inc()

    def auth_failure(self, reason: str) -> None:
        self.auth_failures.labels(reason).inc()

    def route_of(self, path: str) -> str:
        for route in self.routes:
            if path == route or path.startswith(route.rstrip("/") + "/"):
                return route
        return OTHER

    def render(self) -> tuple[bytes, str]:
        """The metrics in Prometheus text format, and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class MeteredAuditLog:
    """The runtime's audit log, unchanged, with every record it writes also counted.

    `append` is its own; everything else is the wrapped log's, looked up on each access.
    """

    def __init__(self, inner: AuditLog, metrics: HttpMetrics) -> None:
        self._inner = inner
        self._metrics = metrics

    def __getattr__(self, name: str) -> Any:
        # Only reached for names this class does not define.
        return getattr(self._inner, name)

    def append(self, record: Mapping[str, Any]) -> dict[str, Any]:
        """Write the record through the wrapped log, then count it (a record that failed is not counted).

        Raises:
            AuditWriteError: as the wrapped log's `append`.
        """
        written = self._inner.append(record)
        try:
            counted = audit_record(written)
        except AuditFormatError as exc:
            # Written, so no reason to fail the call: the metrics miss one record, the log says why.
            log.error("metrics.unreadable_record", error=str(exc))
        else:
            self._metrics.observe_record(counted)
        return written


def metered(audit: AuditLog, metrics: HttpMetrics) -> AuditLog:
    """The audit log with its records counted, typed as the log the gate takes."""
    return cast(AuditLog, MeteredAuditLog(audit, metrics))


class RequestMetrics:
    """ASGI middleware counting every HTTP request by route and response status."""

    def __init__(self, app: ASGIApp, metrics: HttpMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500  # what the client sees when the app fails before answering

        async def watch(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, watch)
        finally:
            self.metrics.http_requests.labels(self.metrics.route_of(scope["path"]), str(status)).inc()
