"""The Streamable HTTP application: MCP at /mcp behind bearer tokens, and its companions.

Routes:
- `/mcp`: MCP Streamable HTTP through the SDK's session manager (each session bound to the token
  identity that opened it); every request needs a valid bearer token (`server/http_auth.py`).
- `/.well-known/oauth-protected-resource` (and `.../mcp`, the RFC 9728 path of the resource): the
  protected resource metadata, without authentication.
- `/healthz`: version and policy version, without authentication.
- `/metrics`: Prometheus text; who may read it is `http.metrics`.

Every request first passes the Host and Origin checks (DNS-rebinding protection: 421 for a Host,
403 for a browser Origin, not in the allow lists); the body limit answers 413.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

import structlog
from mcp.server.context import ServerRequestContext
from mcp.server.streamable_http_manager import StreamableHTTPSessionManager
from mcp.server.transport_security import TransportSecurityMiddleware, TransportSecuritySettings
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from server.app import Runtime, create_server
from server.http_auth import (
    MCP_PATH,
    METADATA_PATH,
    TOKEN_SCOPE_KEY,
    BearerGuard,
    InvalidToken,
    JwtVerifier,
    VerifiedToken,
    bearer_token,
    challenge,
    public_base_url,
    resource_url,
)
from server.http_metrics import HttpMetrics, RequestMetrics, metered
from server.identity import ANONYMOUS, Principal, granted_roles, token_principal
from server.role_grants import GrantingEnforcer, acting_as, granting
from server.settings import Settings

__all__ = ["create_http_app", "security_settings"]

log = structlog.get_logger(__name__)

HEALTH_PATH = "/healthz"
METRICS_PATH = "/metrics"
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")


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
    """ASGI middleware: the SDK's Host/Origin checks, for every route (not only inside MCP)."""

    def __init__(self, app: ASGIApp, security: TransportSecuritySettings) -> None:
        self.app = app
        self.checks = TransportSecurityMiddleware(security)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            # is_post=False: the content type of MCP posts is the MCP transport's own check.
            refused = await self.checks.validate_request(Request(scope, receive), is_post=False)
            if refused is not None:
                await refused(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _instrument(runtime: Runtime, metrics: HttpMetrics) -> GrantingEnforcer:
    """Wrap the runtime's enforcer (token-granted roles) and audit log (metrics) for HTTP serving."""
    enforcer, grants = granting(runtime.enforcer)
    runtime.enforcer = runtime.gate.enforcer = enforcer
    runtime.audit = runtime.gate.audit = metered(runtime.audit, metrics)
    return grants


def create_http_app(runtime: Runtime) -> Starlette:
    """The ASGI application of `lakegate serve --http` over an open runtime.

    Raises:
        ConfigurationError: no token keys are configured, or they cannot be read.
    """
    settings = runtime.settings
    verifier = JwtVerifier(settings)
    metrics = HttpMetrics(runtime.gate.tools, (MCP_PATH, METADATA_PATH, HEALTH_PATH, METRICS_PATH))
    enforcer = _instrument(runtime, metrics)
    security = security_settings(settings)

    def principal_of(ctx: ServerRequestContext[Any, Any]) -> Principal:
        request = ctx.request
        verified = request.scope.get(TOKEN_SCOPE_KEY) if isinstance(request, Request) else None
        if not isinstance(verified, VerifiedToken):
            # Unreachable behind the guard; if it ever happens, the caller may do nothing.
            return acting_as(Principal(name=ANONYMOUS, authenticated_by="none"))
        granted, ignored = granted_roles(verified.claimed_roles, enforcer.known_roles())
        if ignored:
            log.debug("auth.roles_ignored", subject=verified.subject, roles=list(ignored))
        return acting_as(token_principal(verified.subject, granted, runtime.enforcer))

    server = create_server(runtime, principal_of, transport="http")
    sessions = StreamableHTTPSessionManager(
        app=server,
        security_settings=security,
        max_request_body_size=settings.http.max_body_bytes,
        session_idle_timeout=settings.http.session_idle_timeout_s,
    )
    mcp = BearerGuard(
        sessions.handle_request,
        settings,
        verifier,
        runtime.audit,
        lambda: enforcer.inner.version,
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

    async def metrics_endpoint(request: Request) -> Response:
        if settings.http.metrics == "off":
            return Response("Not Found", status_code=404)
        if settings.http.metrics == "token":
            token = bearer_token(request.headers)
            try:
                if token is None:
                    raise InvalidToken("This endpoint needs a bearer token.", "missing")
                verifier.verify(token)
            except InvalidToken as exc:
                metrics.auth_failure(exc.reason)
                www = challenge(settings, exc if token is not None else None)
                return JSONResponse({"error": "invalid_token"}, status_code=401, headers={"WWW-Authenticate": www})
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with sessions.run():
            yield

    return Starlette(
        routes=[
            Route(MCP_PATH, endpoint=mcp),
            Route(METADATA_PATH, endpoint=metadata_endpoint, methods=["GET"]),
            Route(METADATA_PATH + MCP_PATH, endpoint=metadata_endpoint, methods=["GET"]),
            Route(HEALTH_PATH, endpoint=health_endpoint, methods=["GET"]),
            Route(METRICS_PATH, endpoint=metrics_endpoint, methods=["GET"]),
        ],
        middleware=[Middleware(RequestMetrics, metrics=metrics), Middleware(HostOriginGuard, security=security)],
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
