"""Transports: how MCP messages reach the server. Each one only decides who the principal is."""

from __future__ import annotations

from typing import Any

from mcp.server.context import ServerRequestContext
from mcp.server.stdio import stdio_server

from server.app import Runtime, create_server
from server.identity import Principal, stdio_principal

__all__ = ["serve_stdio"]


async def serve_stdio(runtime: Runtime, principal_name: str | None) -> None:
    """Serve MCP over stdin/stdout as one configured principal until the client disconnects."""

    def principal_of(ctx: ServerRequestContext[Any, Any]) -> Principal:
        # Resolved per request so that a policy reload that changes roles applies at once.
        return stdio_principal(principal_name, runtime.enforcer)

    server = create_server(runtime, principal_of, transport="stdio")
    async with stdio_server() as (read_stream, write_stream):
        await server.run(read_stream, write_stream, server.create_initialization_options())
