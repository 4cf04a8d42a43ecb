"""``lakegate audit verify|show|summary``: the audit log for governance reviewers.

The parent CLI mounts `audit` and puts the log's path in ``ctx.obj["audit_path"]``; every
subcommand also takes ``--log PATH``. Exit codes: 0 fine, 1 the log failed verification,
2 the log cannot be read (or a usage error, as click does).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import click
from rich.console import Console

from server.audit import AuditFormatError, VerifyReport, read_records, verify
from server.audit_review import (
    DIMENSIONS,
    Filters,
    parse_dimensions,
    parse_when,
    select,
    show_table,
    summarise,
    summary_table,
)

__all__ = ["audit"]

F = TypeVar("F", bound=Callable[..., Any])

EXIT_FAILED = 1
EXIT_UNREADABLE = 2


def _console() -> Console:
    # Created per command so that it writes to the stdout in effect now (CliRunner swaps it).
    return Console(highlight=False, soft_wrap=False)


def _log_path(ctx: click.Context, override: Path | None) -> Path:
    if override is not None:
        return override
    obj = ctx.obj if isinstance(ctx.obj, Mapping) else {}
    path = obj.get("audit_path")
    if path is None:
        raise click.UsageError("no audit log configured; pass --log PATH")
    return Path(path)


def _when(_: click.Context, param: click.Parameter, value: str | None) -> datetime | None:
    if value is None:
        return None
    try:
        return parse_when(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param=param) from None


def _log_option(func: F) -> F:
    return click.option(
        "--log",
        "log_path",
        type=click.Path(path_type=Path, dir_okay=False),
        help="Audit log file (default: the configured one).",
    )(func)


def _filter_options(func: F) -> F:
    options = [
        click.option("--principal", help="Only calls by this principal."),
        click.option("--tool", help="Only calls of this tool."),
        click.option(
            "--decision", type=click.Choice(["allow", "deny", "partial"]), help="Only this decision."
        ),
        click.option("--resource", help="Only calls touching a resource whose name contains this."),
        click.option("--since", callback=_when, help="From this time: ISO date/datetime, or 24h, 7d ago."),
        click.option("--until", callback=_when, help="Before this time (same forms as --since)."),
        click.option("--limit", type=click.IntRange(min=0), help="Keep only the newest N matches."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _filters(kw: Mapping[str, Any]) -> Filters:
    return Filters(
        principal=kw["principal"],
        tool=kw["tool"],
        decision=kw["decision"],
        resource=kw["resource"],
        since=kw["since"],
        until=kw["until"],
        limit=kw["limit"],
    )


def _records(path: Path) -> Iterator[dict[str, Any]]:
    """The log's records; a missing file is an empty log, an unreadable one exits 2."""
    try:
        yield from read_records(path)
    except FileNotFoundError:
        return
    except AuditFormatError as exc:
        click.echo(f"error: {exc}; run `lakegate audit verify` for details", err=True)
        raise SystemExit(EXIT_UNREADABLE) from None
    except OSError as exc:
        click.echo(f"error: cannot read audit log {path}: {exc.strerror or exc}", err=True)
        raise SystemExit(EXIT_UNREADABLE) from None


@click.group("audit")
def audit() -> None:
    """Verify and review the tamper-evident audit log."""


@audit.command("verify")
@_log_option
@click.option("--expect-last-hash", help="Hash of the last record, kept elsewhere: detects a cut-off tail.")
@click.option(
    "--expect-records", type=click.IntRange(min=0), help="Records the log held when that hash was kept."
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.pass_context
def verify_command(
    ctx: click.Context,
    /,
    log_path: Path | None,
    expect_last_hash: str | None,
    expect_records: int | None,
    as_json: bool,
) -> None:
    """Check the hash chain; exit 1 and name each tampered record if it is broken."""
    path = _log_path(ctx, log_path)
    try:
        report = verify(path, expect_last_hash=expect_last_hash, expect_records=expect_records)
    except OSError as exc:
        click.echo(f"error: cannot read audit log {path}: {exc.strerror or exc}", err=True)
        raise SystemExit(EXIT_UNREADABLE) from None
    if as_json:
        click.echo(json.dumps(_report_dict(path, report), indent=2))
    else:
        _print_report(path, report)
    if not report.ok:
        raise SystemExit(EXIT_FAILED)


def _report_dict(path: Path, report: VerifyReport) -> dict[str, Any]:
    return {
        "path": str(path),
        "exists": report.exists,
        "ok": report.ok,
        "records": report.records,
        "first_seq": report.first_seq,
        "last_seq": report.last_seq,
        "last_hash": report.last_hash,
        "problems": [
            {"seq": p.seq, "line": p.line, "kind": p.kind, "message": p.message} for p in report.problems
        ],
    }


def _print_report(path: Path, report: VerifyReport) -> None:
    if report.ok:
        if not report.exists:
            click.echo(f"audit log OK: 0 records (no file at {path})")
        elif report.records == 0:
            click.echo("audit log OK: 0 records")
        else:
            click.echo(
                f"audit log OK: {report.records} records, seq {report.first_seq}..{report.last_seq}, "
                f"last hash {report.last_hash}"
            )
        return
    count = len(report.problems)
    click.echo(f"audit log FAILED: {count} problem{'s' if count != 1 else ''} in {report.records} records")
    for problem in report.problems:
        click.echo(f"  {problem.kind}: {problem.message}")


@audit.command("show")
@_log_option
@_filter_options
@click.option("--json", "as_json", is_flag=True, help="Print matching records as JSON lines.")
@click.pass_context
def show_command(ctx: click.Context, /, log_path: Path | None, as_json: bool, **kw: Any) -> None:
    """List matching calls, newest last."""
    path = _log_path(ctx, log_path)
    records = select(_records(path), _filters(kw))
    if as_json:
        for record in records:
            click.echo(json.dumps(record, ensure_ascii=False, sort_keys=True))
        return
    if not records:
        click.echo("no matching records")
        return
    console = _console()
    console.print(show_table(records))
    console.print(f"{len(records)} record{'s' if len(records) != 1 else ''}")


@audit.command("summary")
@_log_option
@_filter_options
@click.option(
    "--by",
    "by_values",
    multiple=True,
    default=("principal",),
    show_default=True,
    help=f"Group by {', '.join(DIMENSIONS)}; repeat or give a comma list.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the counts as JSON.")
@click.pass_context
def summary_command(
    ctx: click.Context, /, log_path: Path | None, by_values: tuple[str, ...], as_json: bool, **kw: Any
) -> None:
    """Count calls, denials, errors and rows returned, per group."""
    try:
        by = parse_dimensions(by_values)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--by") from None
    path = _log_path(ctx, log_path)
    rows = summarise(select(_records(path), _filters(kw)), by)
    if as_json:
        click.echo(json.dumps([row.as_dict(by) for row in rows], indent=2, ensure_ascii=False))
        return
    if not rows:
        click.echo("no matching records")
        return
    _console().print(summary_table(rows, by))
