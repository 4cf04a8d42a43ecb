"""The Streamable HTTP application: MCP at /mcp behind bearer tokens, and its companions.

Routes:
- `/mcp`: MCP Streamable HTTP through the SDK's session manager (each session bound to the token
  identity that opened it); every request needs a valid bearer token (`server/http_auth.py`).
- `/.well-known/oauth-protected-resource` (and `.../mcp`, the RFC 9728 path of the resource): the
  protected resource metadata, without authentication.
- `/healthz`: version and policy version, without authentication.
- `/metrics`: Prometheus text; who may read it is `http.metrics`.
- `/changes` (GET) and `/changes/{id}/approve|reject` (POST): the changes staged for approval
  (policies/approvals.yaml), decided by a person with their own bearer token, through the gate as
  `lakegate changes` decides them (the same checks: `approve` on the dataset, never one's own change).

Every request first passes the Host and Origin checks (DNS-rebinding protection: 421 for a Host,
403 for a browser Origin, not in the allow lists); the body limit answers 413.

Each of those refusals leaves an audit record, as do a 401 (at /mcp, /metrics, /changes) and a 404 for a
session the caller did not open: through one `RefusalLog`, so that a client that floods the server
gets one record per kind of refusal and window, with the count, instead of one per request.
"""

from __future__ import annotations

import contextlib
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict
from typing import Any
from urllib.parse import urlsplit

import anyio
import structlog
from mcp.server.context import ServerRequestContext
from mcp.server.streamable_http_manager import StreamableHTTPSessionManager
from mcp.server.transport_security import TransportSecurityMiddleware, TransportSecuritySettings
from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lakegate.errors import ClientError, NotFound, PolicyDenied, PolicyUnavailable, ServerError
from lakegate.server.app import Runtime, create_server
from lakegate.server.audit.refusals import REFUSAL_WINDOW_S, RefusalLog
from lakegate.server.gate.identity import ANONYMOUS, CallOrigin, Principal, granted_roles, token_principal
from lakegate.server.gate.role_grants import GrantingEnforcer, acting_as, granting
from lakegate.server.settings import Settings
from lakegate.server.transports.http_auth import (
    MCP_PATH,
    METADATA_PATH,
    TOKEN_SCOPE_KEY,
    BearerGuard,
    InvalidToken,
    JwtVerifier,
    VerifiedToken,
    bearer_token,
    challenge,
    client_address,
    http_refusal_record,
    public_base_url,
    refusal_record,
    resource_url,
)
from lakegate.server.transports.http_metrics import HttpMetrics, RequestMetrics, metered

__all__ = ["create_http_app", "security_settings"]

log = structlog.get_logger(__name__)

HEALTH_PATH = "/healthz"
CHANGES_PATH = "/changes"
METRICS_PATH = "/metrics"
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")
#: The SDK's Host/Origin refusals by status: (outcome, message).
HOST_ORIGIN_REFUSALS = {421: ("foreign_host", "Invalid Host header"), 403: ("foreign_origin", "Invalid Origin header")}
#: Sessions whose opener is remembered, to tell a session of another principal from an unknown one.
MAX_SESSION_OWNERS = 4096
MCP_SESSION_HEADER = "mcp-session-id"


def security_settings(settings: Settings) -> TransportSecuritySettings:
    """Host and Origin allow lists: the configured ones, else the public URL's and the loopback ones."""
    public = urlsplit(public_base_url(settings))
    hosts = list(settings.http.allowed_hosts)
    if not hosts:
        names = {public.hostname and (f"[{public.hostname}]" if ":" in public.hostname else public.hostname)}
        names.update(LOOPBACK_HOSTS)
        hosts = sorted(name for name in names if name)
        hosts += [f"{name}:*" for name in hosts]
    origins = list(settings.http.allowed_origins)
    if not origins:
        origins = [f"{public.scheme}://{public.netloc}"]
        for name in LOOPBACK_HOSTS:
            origins += [f"http://{name}", f"http://{name}:*", f"https://{name}", f"https://{name}:*"]
    return TransportSecuritySettings(enable_dns_rebinding_protection=True, allowed_hosts=hosts, allowed_origins=origins)


class HostOriginGuard:
    """ASGI middleware: the SDK's Host/Origin checks, for every route (not only inside MCP); each
    refusal is audited (outcome `foreign_host` or `foreign_origin`) before it is answered."""

    def __init__(
        self,
        app: ASGIApp,
        security: TransportSecuritySettings,
        refusals: RefusalLog,
        policy_version: Callable[[], str],
    ) -> None:
        self.app = app
        self.checks = TransportSecurityMiddleware(security)
        self.refusals = refusals
        self.policy_version = policy_version

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            started = time.perf_counter()
            # is_post=False: the content type of MCP posts is the MCP transport's own check.
            refused = await self.checks.validate_request(Request(scope, receive), is_post=False)
            if refused is not None:
                outcome, message = HOST_ORIGIN_REFUSALS.get(refused.status_code, ("refused", "Refused"))
                record = http_refusal_record(
                    scope,
                    Headers(scope=scope),
                    status=refused.status_code,
                    outcome=outcome,
                    error=message,
                    reason=outcome,
                    policy_version=self.policy_version(),
                    duration_s=time.perf_counter() - started,
                )
                await self.refusals.refuse(record, kind=outcome, source=client_address(scope))
                await refused(scope, receive, send)
                return
        await self.app(scope, receive, send)


class SessionRefusals:
    """ASGI middleware between the bearer guard and the SDK's session manager: audits what the
    manager refuses before MCP, a body over the limit (413, outcome `body_too_large`) and a session
    the caller may not use (404, outcome `session_not_found`), as the verified caller.

    The manager answers a session opened by another identity exactly as an unknown one, and keeps
    who opened which to itself; this middleware remembers the openers of the last
    `MAX_SESSION_OWNERS` sessions, so that the record's `details.reason` can say `other_principal`
    (a valid token trying someone else's session) rather than `unknown_session`.
    """

    def __init__(
        self,
        app: ASGIApp,
        refusals: RefusalLog,
        policy_version: Callable[[], str],
        caller: Callable[[VerifiedToken], Principal],
    ) -> None:
        self.app = app
        self.refusals = refusals
        self.policy_version = policy_version
        self.caller = caller
        self._owners: OrderedDict[str, tuple[str, str, str]] = OrderedDict()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        verified = scope.get(TOKEN_SCOPE_KEY)
        if scope["type"] != "http" or not isinstance(verified, VerifiedToken):
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        headers = Headers(scope=scope)
        session = headers.get(MCP_SESSION_HEADER)
        identity = (verified.issuer, verified.subject, verified.client_id)

        async def watch(message: Message) -> None:
            if message["type"] == "http.response.start":
                status = int(message["status"])
                if status == 413:
                    await self._refused(scope, headers, verified, status, "body_too_large", started)
                elif status == 404 and session is not None:
                    owner = self._owners.get(session)
                    reason = "other_principal" if owner is not None and owner != identity else "unknown_session"
                    await self._refused(scope, headers, verified, status, "session_not_found", started, reason)
                elif session is None and status < 300:
                    opened = Headers(raw=message.get("headers", [])).get(MCP_SESSION_HEADER)
                    if opened is not None:
                        self._remember(opened, identity)
            # The record first: once answered, the client may read the log.
            await send(message)

        await self.app(scope, receive, watch)
        if scope.get("method") == "DELETE" and session is not None and self._owners.get(session) == identity:
            self._owners.pop(session, None)

    def _remember(self, session: str, identity: tuple[str, str, str]) -> None:
        self._owners[session] = identity
        while len(self._owners) > MAX_SESSION_OWNERS:
            self._owners.popitem(last=False)

    async def _refused(
        self,
        scope: Scope,
        headers: Headers,
        verified: VerifiedToken,
        status: int,
        outcome: str,
        started: float,
        reason: str | None = None,
    ) -> None:
        caller = self.caller(verified)
        messages = {"body_too_large": "Request body too large", "session_not_found": "Session not found"}
        record = http_refusal_record(
            scope,
            headers,
            status=status,
            outcome=outcome,
            error=messages[outcome],
            reason=reason or outcome,
            policy_version=self.policy_version(),
            duration_s=time.perf_counter() - started,
            principal=caller.name,
            roles=caller.roles,
            authenticated_by=caller.authenticated_by,
        )
        await self.refusals.refuse(record, kind=outcome, source=client_address(scope))


def _instrument(runtime: Runtime, metrics: HttpMetrics) -> GrantingEnforcer:
    """Wrap the runtime's enforcer (token-granted roles) and audit log (metrics) for HTTP serving."""
    enforcer, grants = granting(runtime.enforcer)
    runtime.enforcer = runtime.gate.enforcer = enforcer
    runtime.audit = runtime.gate.audit = metered(runtime.audit, metrics)
    return grants


def create_http_app(runtime: Runtime, *, refusal_window_s: float = REFUSAL_WINDOW_S) -> Starlette:
    """The ASGI application of `lakegate serve --http` over an open runtime; refusals of one kind
    from one client address are counted into one audit record per `refusal_window_s`.

    Raises:
        ConfigurationError: no token keys are configured, or they cannot be read.
    """
    settings = runtime.settings
    verifier = JwtVerifier(settings)
    metrics = HttpMetrics(runtime.gate.tools, (MCP_PATH, METADATA_PATH, HEALTH_PATH, METRICS_PATH, CHANGES_PATH))
    enforcer = _instrument(runtime, metrics)
    security = security_settings(settings)
    refusals = RefusalLog(runtime.audit, window_s=refusal_window_s)

    def policy_version() -> str:
        return enforcer.inner.version

    def caller(verified: VerifiedToken) -> Principal:
        granted, ignored = granted_roles(verified.claimed_roles, enforcer.known_roles())
        if ignored:
            log.debug("auth.roles_ignored", subject=verified.subject, roles=list(ignored))
        return token_principal(verified.subject, granted, runtime.enforcer)

    def principal_of(ctx: ServerRequestContext[Any, Any]) -> Principal:
        request = ctx.request
        verified = request.scope.get(TOKEN_SCOPE_KEY) if isinstance(request, Request) else None
        if not isinstance(verified, VerifiedToken):
            # Unreachable behind the guard; if it ever happens, the caller may do nothing.
            return acting_as(Principal(name=ANONYMOUS, authenticated_by="none"))
        return acting_as(caller(verified))

    server = create_server(runtime, principal_of, transport="http")
    sessions = StreamableHTTPSessionManager(
        app=server,
        security_settings=security,
        max_request_body_size=settings.http.max_body_bytes,
        session_idle_timeout=settings.http.session_idle_timeout_s,
    )
    mcp = BearerGuard(
        SessionRefusals(sessions.handle_request, refusals, policy_version, caller),
        settings,
        verifier,
        refusals,
        policy_version,
        metrics.auth_failure,
    )
    metadata = protected_resource_metadata(settings)

    async def metadata_endpoint(request: Request) -> Response:
        return JSONResponse(metadata, headers={"Access-Control-Allow-Origin": "*", "Cache-Control": "max-age=300"})

    async def health_endpoint(request: Request) -> Response:
        problem = enforcer.inner.load_error
        body = {
            "status": "ok" if problem is None else "policy_invalid",
            "version": server.version,
            "policy_version": enforcer.inner.version,
        }
        return JSONResponse(body, status_code=200 if problem is None else 503)

    async def verified_or_401(request: Request, path: str) -> VerifiedToken | Response:
        """The request's verified token, or the 401 to answer (its refusal audited)."""
        started = time.perf_counter()
        token = bearer_token(request.headers)
        try:
            if token is None:
                raise InvalidToken("This endpoint needs a bearer token.", "missing")
            return verifier.verify(token)
        except InvalidToken as exc:
            metrics.auth_failure(exc.reason)
            record = refusal_record(
                request.scope,
                request.headers,
                exc,
                policy_version=policy_version(),
                duration_s=time.perf_counter() - started,
            )
            await refusals.refuse(
                record, kind=f"unauthenticated:{exc.reason}:{path}", source=client_address(request.scope)
            )
            www = challenge(settings, exc if token is not None else None)
            return JSONResponse({"error": "invalid_token"}, status_code=401, headers={"WWW-Authenticate": www})

    async def metrics_endpoint(request: Request) -> Response:
        if settings.http.metrics == "off":
            return Response("Not Found", status_code=404)
        if settings.http.metrics == "token":
            verified = await verified_or_401(request, METRICS_PATH)
            if isinstance(verified, Response):
                return verified
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    async def changes_endpoint(request: Request) -> Response:
        verified = await verified_or_401(request, CHANGES_PATH)
        if isinstance(verified, Response):
            return verified
        person = acting_as(caller(verified))
        origin = CallOrigin(
            transport="http", session_id="changes", client_name=(request.headers.get("user-agent") or "")[:100] or None
        )
        change_id = request.path_params.get("change_id")
        decision = request.path_params.get("decision")
        try:
            if change_id is None:
                listed = await runtime.gate.request(
                    "changes/list", {}, person, origin, lambda scope: scope.changes_to_decide()
                )
                return JSONResponse({"changes": [asdict(change) for change in listed]})
            if decision not in ("approve", "reject"):
                return JSONResponse({"error": "not_found"}, status_code=404)
            decided = await runtime.gate.request(
                f"changes/{decision}",
                {"change_id": change_id},
                person,
                origin,
                lambda scope: scope.decide_change(change_id, approve=decision == "approve"),
            )
            return JSONResponse({"change": asdict(decided)})
        except ClientError as exc:
            status = 403 if isinstance(exc, PolicyDenied) else 404 if isinstance(exc, NotFound) else 409
            return JSONResponse({"error": exc.outcome, "message": str(exc)}, status_code=status)
        except ServerError as exc:
            status = 503 if isinstance(exc, PolicyUnavailable) else 500
            return JSONResponse({"error": exc.outcome, "message": exc.public_message}, status_code=status)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with sessions.run(), anyio.create_task_group() as tasks:
            # Writes the counted refusals as their windows end, and what is left at shutdown.
            tasks.start_soon(refusals.run)
            try:
                yield
            finally:
                tasks.cancel_scope.cancel()

    return Starlette(
        routes=[
            Route(MCP_PATH, endpoint=mcp),
            Route(METADATA_PATH, endpoint=metadata_endpoint, methods=["GET"]),
            Route(METADATA_PATH + MCP_PATH, endpoint=metadata_endpoint, methods=["GET"]),
            Route(HEALTH_PATH, endpoint=health_endpoint, methods=["GET"]),
            Route(METRICS_PATH, endpoint=metrics_endpoint, methods=["GET"]),
            Route(CHANGES_PATH, endpoint=changes_endpoint, methods=["GET"]),
            Route(CHANGES_PATH + "/{change_id}/{decision}", endpoint=changes_endpoint, methods=["POST"]),
        ],
        middleware=[
            Middleware(RequestMetrics, metrics=metrics),
            Middleware(HostOriginGuard, security=security, refusals=refusals, policy_version=policy_version),
        ],
        lifespan=lifespan,
    )


def protected_resource_metadata(settings: Settings) -> dict[str, Any]:
    """The RFC 9728 document: this resource, who issues its tokens, how to send them."""
    servers = list(settings.auth.authorization_servers)
    if not servers and settings.auth.issuer.startswith(("https://", "http://")):
        servers = [settings.auth.issuer]
    document: dict[str, Any] = {
        "resource": resource_url(settings),
        "authorization_servers": servers,
        "bearer_methods_supported": ["header"],
        "resource_name": "lakegate",
    }
    if settings.auth.scopes:
        document["scopes_supported"] = list(settings.auth.scopes)
    return document
