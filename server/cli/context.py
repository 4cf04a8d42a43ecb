"""What every `lakegate` subcommand needs from the click context: the project's settings."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import click
from pydantic import ValidationError

from lakegate.server.settings import Settings, load_settings

__all__ = ["command_settings"]


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
