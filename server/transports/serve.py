"""Transports: how MCP messages reach the server. Each one only decides who the principal is:
stdio serves one configured principal; HTTP takes it from each request's verified bearer token."""

from __future__ import annotations

from typing import Any

from mcp.server.context import ServerRequestContext
from mcp.server.stdio import stdio_server

from lakegate.extras import require_extra
from lakegate.server.app import Runtime, create_server
from lakegate.server.gate.identity import Principal, stdio_principal
from lakegate.server.transports.stdio_guard import GuardedStdin, claimed_stdin

__all__ = ["serve_http", "serve_stdio"]


async def serve_stdio(runtime: Runtime, principal_name: str | None) -> None:
    """Serve MCP over stdin/stdout as one configured principal until the client disconnects.

    A line the SDK cannot read as a JSON-RPC message is answered with a JSON-RPC error and audited
    (lakegate.server.transports.stdio_guard) instead of being left for the client to time out on.
    """

    def principal_of(ctx: ServerRequestContext[Any, Any]) -> Principal:
        # Resolved per request so that a policy reload that changes roles applies at once.
        return stdio_principal(principal_name, runtime.enforcer)

    server = create_server(runtime, principal_of, transport="stdio")
    # An explicit stdin: the SDK then leaves fd 0 alone (claimed_stdin diverts it instead) and
    # still claims fd 1 itself, so nothing but its writer reaches the real stdout.
    with claimed_stdin() as wire:
        stdin = GuardedStdin(wire, runtime, principal_name)
        async with stdio_server(stdin=stdin) as (read_stream, write_stream):
            stdin.reply_through(write_stream)
            await server.run(read_stream, write_stream, server.create_initialization_options())


def serve_http(runtime: Runtime) -> None:
    """Serve MCP Streamable HTTP on `http.host`:`http.port` until interrupted (Ctrl-C, SIGTERM).

    Raises:
        ConfigurationError: no token keys are configured, or they cannot be read.
        MissingExtra: the http extra is not installed (the message says how to install it).
    """
    require_extra("http", "lakegate serve --http")
    import uvicorn

    from lakegate.server.transports.http_app import create_http_app

    settings = runtime.settings
    app = create_http_app(runtime)
    config = uvicorn.Config(
        app,
        host=settings.http.host,
        port=settings.http.port,
        log_level=settings.log_level.lower(),
        lifespan="on",
        server_header=False,
        # Behind a proxy, the client address in audit records is the proxy's: trusting forwarded
        # headers is a deployment decision this server does not make for you.
        proxy_headers=False,
    )
    uvicorn.Server(config).run()
