"""What `lakegate` subcommands need from the click context: the project's settings, and, for the
commands that read or write data as a person (`changes`, `table`), the gate."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping
from functools import partial
from typing import TYPE_CHECKING, Any, TypeVar

import anyio
import click
from pydantic import ValidationError

from lakegate.errors import LakegateError
from lakegate.server.settings import Settings, load_settings

if TYPE_CHECKING:
    from lakegate.server.gate.scope import CallScope

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])

__all__ = ["as_principal", "command_settings", "through_gate"]


def command_settings(ctx: click.Context, **overrides: Any) -> Settings:
    """Settings for a command: the group's `--project`, then `overrides`.

    Raises:
        click.ClickException: the settings are invalid (click prints it and exits 1).
    """
    obj = ctx.obj if isinstance(ctx.obj, Mapping) else {}
    try:
        return load_settings(obj.get("project"), **overrides)
    except ValidationError as exc:
        raise click.ClickException(f"invalid settings:\n{exc}") from exc


def as_principal(func: F) -> F:
    """The `--as PRINCIPAL` option of a command that acts as a person through the gate."""
    option = click.option(
        "--as",
        "principal",
        envvar="LAKEGATE_PRINCIPAL",
        required=True,
        help="The principal you act as (default: $LAKEGATE_PRINCIPAL); policy decides what it may do.",
    )
    return option(func)


def through_gate(
    ctx: click.Context, principal: str, method: str, arguments: dict[str, str], answer: Callable[[CallScope], T]
) -> T:
    """Run `answer` through the gate as `principal` (decided and audited like a tool call, `method`
    in the record's tool); a refusal or failure exits with its message.

    Raises:
        click.ClickException: the gate refused the call or it failed (the message says why).
    """
    from lakegate.server.app import open_runtime
    from lakegate.server.gate.identity import CallOrigin, stdio_principal
    from lakegate.server.logs import configure_logging

    settings = command_settings(ctx)
    configure_logging(settings.log_level)  # the server's log format: plain, never rich's tracebacks
    runtime = open_runtime(settings)
    try:
        who = stdio_principal(principal, runtime.enforcer)
        origin = CallOrigin(transport="cli", session_id="cli", request_id=uuid.uuid4().hex, client_name="lakegate")
        return anyio.run(partial(runtime.gate.request, method, arguments, who, origin, answer))
    except LakegateError as exc:
        raise click.ClickException(str(exc)) from exc
    finally:
        runtime.close()
