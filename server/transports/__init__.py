"""Transports: how MCP messages reach the server (stdio with its parse guard; Streamable HTTP with
bearer-token auth and metrics). Each only decides who the principal is; the gate does the rest."""

from lakegate.server.transports.serve import serve_http, serve_stdio

__all__ = ["serve_http", "serve_stdio"]
