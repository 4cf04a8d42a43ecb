"""Drive a real `lakegate serve` subprocess with the MCP Python SDK client over stdio."""

from __future__ import annotations

import os
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from mcp import Client
from mcp.client.stdio import StdioServerParameters
from mcp.types import CallToolResult, Implementation

REPO = Path(__file__).resolve().parents[1]  # the repository is itself a lakegate project


def server_params(principal: str | None, home: Path, *, project: Path = REPO, **env: str) -> StdioServerParameters:
    args = ["-m", "lakegate", "--project", str(project), "serve"]
    if principal is not None:
        args += ["--principal", principal]
    environment = {
        **os.environ,
        "LAKEGATE_HOME": str(home),
        "LAKEGATE_AUDIT__FSYNC": "false",
        "LAKEGATE_PRINCIPAL": "",
        "HF_HUB_OFFLINE": "1",
        **env,
    }
    return StdioServerParameters(command=sys.executable, args=args, env=environment, cwd=str(project))


@asynccontextmanager
async def connect(principal: str | None, home: Path, **kwargs: Any) -> AsyncIterator[Client]:
    params = server_params(principal, home, **kwargs)
    client = Client(params, client_info=Implementation(name="lakegate-tests", version="1.0"), read_timeout_seconds=120)
    async with client:
        yield client


def text_of(result: CallToolResult) -> str:
    return "\n".join(getattr(block, "text", "") for block in result.content)
