"""`lakegate token`: mint a development bearer token for `serve --http`."""

from __future__ import annotations

import re

import click

from lakegate.server.cli.context import command_settings
from lakegate.server.gate.identity import ROLE_PREFIX
from lakegate.server.transports.http_auth import mint_token, resource_url

__all__ = ["parse_ttl", "token"]

_TTL = re.compile(r"^\s*(\d+)\s*([smhd]?)\s*$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
MAX_TTL_S = 30 * 86400


def parse_ttl(text: str) -> int:
    """Seconds from `90`, `90s`, `30m`, `1h` or `7d`.

    Raises:
        click.BadParameter: not one of those forms, zero, or longer than 30 days.
    """
    match = _TTL.match(text)
    if match is None:
        raise click.BadParameter(f"{text!r} is not a duration such as 90s, 30m, 1h or 7d")
    seconds = int(match.group(1)) * _UNITS[match.group(2)]
    if not 0 < seconds <= MAX_TTL_S:
        raise click.BadParameter("the lifetime must be between 1 second and 30 days")
    return seconds


@click.command()
@click.option("--subject", required=True, help="The token's sub: the principal name the policy decides on.")
@click.option(
    "--roles",
    default="",
    help="Comma-separated roles to grant (analyst or role:analyst); only roles the policy knows count.",
)
@click.option("--ttl", default="1h", show_default=True, help="Lifetime: 90s, 30m, 1h, 7d (at most 30 days).")
@click.pass_context
def token(ctx: click.Context, subject: str, roles: str, ttl: str) -> None:
    """Print an HS256 bearer token for `serve --http` (development only).

    \b
    Needs LAKEGATE_AUTH__SHARED_SECRET (the same one the server uses); signs with the configured
    issuer and the resource URL as audience. Example:
      export LAKEGATE_AUTH__SHARED_SECRET=$(python -c 'import secrets; print(secrets.token_urlsafe(32))')
      TOKEN=$(lakegate token --subject alice --roles analyst --ttl 1h)
    """
    settings = command_settings(ctx)
    if subject.startswith(ROLE_PREFIX) or not subject.strip():
        raise click.BadParameter("the subject names a principal, not a role", param_hint="--subject")
    granted = tuple(part.strip() for part in roles.split(",") if part.strip())
    printed = mint_token(settings, subject, granted, parse_ttl(ttl))
    click.echo(printed)
    click.echo(f"audience {resource_url(settings)}, issuer {settings.auth.issuer}", err=True)
