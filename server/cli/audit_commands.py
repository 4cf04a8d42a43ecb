"""``lakegate audit verify|show|summary``: the audit log for governance reviewers.

The parent CLI mounts `audit` and puts the log's path in ``ctx.obj["audit_path"]``; every
subcommand also takes ``--log PATH``. Exit codes: 0 fine, 1 the log failed verification,
2 the log cannot be read (or a usage error, as click does).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click
from rich.console import Console

from lakegate.server.audit.checkpoint_verify import CheckpointTrust
from lakegate.server.audit.checkpoints import Checkpoint, load_public_keys, signing_public_key
from lakegate.server.audit.log import AuditFormatError, VerifyReport, verify
from lakegate.server.audit.record_model import AuditRecord, read_audit_records
from lakegate.server.audit.review import (
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

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    from lakegate.server.settings import Settings

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
        click.option("--decision", type=click.Choice(["allow", "deny", "partial"]), help="Only this decision."),
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


@contextmanager
def _exit_if_unreadable(path: Path) -> Iterator[None]:
    """A malformed or unreadable log: say so on stderr and exit 2."""
    try:
        yield
    except AuditFormatError as exc:
        click.echo(f"error: {exc}; run `lakegate audit verify` for details", err=True)
        raise SystemExit(EXIT_UNREADABLE) from None
    except OSError as exc:
        click.echo(f"error: cannot read audit log {path}: {exc.strerror or exc}", err=True)
        raise SystemExit(EXIT_UNREADABLE) from None


def _records(path: Path) -> Iterator[AuditRecord]:
    """The log's records, rotated files included; a missing log is an empty one, an unreadable one
    (or one with a line that is not a record) exits 2."""
    with _exit_if_unreadable(path):
        try:
            yield from read_audit_records(path)
        except FileNotFoundError:
            return


@click.group("audit")
def audit() -> None:
    """Verify and review the tamper-evident audit log."""


@audit.command("verify")
@_log_option
@click.option("--expect-last-hash", help="Hash of the last record, kept elsewhere: detects a cut-off tail.")
@click.option("--expect-records", type=click.IntRange(min=0), help="Records the log held when that hash was kept.")
@click.option(
    "--public-key",
    "public_keys",
    multiple=True,
    type=click.Path(path_type=Path, dir_okay=False),
    help="Public key (PEM) the checkpoints must be signed with, kept apart from the log; repeat for "
    "several (default: the configured signing key's, else those beside the checkpoints).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.pass_context
def verify_command(
    ctx: click.Context,
    /,
    log_path: Path | None,
    expect_last_hash: str | None,
    expect_records: int | None,
    public_keys: tuple[Path, ...],
    as_json: bool,
) -> None:
    """Check the hash chain across every rotated file, and the signed checkpoints against it; exit 1
    and name each tampered record, missing file, or records cut back past a checkpoint."""
    path = _log_path(ctx, log_path)
    trust = _checkpoint_trust(ctx, path, public_keys)
    with _exit_if_unreadable(path):
        report = verify(path, expect_last_hash=expect_last_hash, expect_records=expect_records, checkpoints=trust)
    if as_json:
        click.echo(json.dumps(_report_dict(path, report), indent=2))
    else:
        _print_report(path, report)
    if not report.ok:
        raise SystemExit(EXIT_FAILED)


def _configured_settings(ctx: click.Context, path: Path) -> Settings | None:
    """The project's settings when ``path`` is the log they configure (else the signing key and the
    checkpoint in PostgreSQL belong to another log), or None."""
    from pydantic import ValidationError

    from lakegate.server.settings import load_settings

    obj = ctx.obj if isinstance(ctx.obj, Mapping) else {}
    try:
        settings = load_settings(obj.get("project"))
    except ValidationError:
        return None  # `audit verify --log` needs no project; the other commands say what is wrong
    return settings if settings.audit_path.resolve() == path.resolve() else None


def _checkpoint_trust(ctx: click.Context, path: Path, public_keys: tuple[Path, ...]) -> CheckpointTrust:
    """What the checkpoints are checked with: ``--public-key``, else, for the configured log, the
    public half of the signing key (kept apart from the log); for the configured log also whether
    checkpoints were ever signed, the writer's checkpoint_every and, in production, the latest
    checkpoint PostgreSQL keeps. Exits 2 when a key given or PostgreSQL cannot be read."""
    from lakegate.errors import ConfigurationError, LakegateError

    keys: tuple[Ed25519PublicKey, ...] = ()
    source = "the public keys beside the checkpoints"
    for file in public_keys:
        try:
            keys += load_public_keys(file)
        except OSError as exc:
            message = f"cannot read {file}: {exc.strerror or exc}"
            raise click.BadParameter(message, param_hint="--public-key") from None
        except ConfigurationError as exc:
            raise click.BadParameter(str(exc), param_hint="--public-key") from None
    if keys:
        source = f"the public key{'s' if len(public_keys) > 1 else ''} {', '.join(map(str, public_keys))}"
    settings = _configured_settings(ctx, path)
    if settings is None:
        return CheckpointTrust(keys, source)
    from lakegate.server.profile import checkpoint_anchor, checkpoint_key_path

    key_file = checkpoint_key_path(settings)
    signed_before = key_file.is_file()
    if not keys and signed_before:
        # Not readable by this user: the keys beside the checkpoints, as the output then says.
        with contextlib.suppress(OSError, ConfigurationError):
            keys, source = (signing_public_key(key_file),), f"the signing key {key_file}"
    anchor: Checkpoint | None = None
    if settings.profile == "production":
        try:
            anchor = checkpoint_anchor(settings)
        except LakegateError as exc:
            click.echo(f"error: {exc}", err=True)
            raise SystemExit(EXIT_UNREADABLE) from None
    return CheckpointTrust(keys, source, signed_before, settings.audit.checkpoint_every, anchor)


def _checkpoint_dict(checkpoint: Checkpoint | None) -> dict[str, Any] | None:
    if checkpoint is None:
        return None
    return {"number": checkpoint.number, "seq": checkpoint.seq, "hash": checkpoint.hash, "time": checkpoint.time}


def _report_dict(path: Path, report: VerifyReport) -> dict[str, Any]:
    covered = report.checkpoints
    return {
        "path": str(path),
        "exists": report.exists,
        "ok": report.ok,
        "records": report.records,
        "first_seq": report.first_seq,
        "last_seq": report.last_seq,
        "last_hash": report.last_hash,
        "problems": [
            {"seq": p.seq, "line": p.line, "kind": p.kind, "message": p.message, "file": p.file}
            for p in report.problems
        ],
        "files": [
            {
                "name": f.name,
                "status": f.status,
                "records": f.records,
                "first_seq": f.first_seq,
                "last_seq": f.last_seq,
                "pruned_at": f.pruned_at,
            }
            for f in report.files
        ],
        "checkpoints": None
        if covered is None
        else {
            "file": covered.file,
            "count": covered.count,
            "last": _checkpoint_dict(covered.last),
            "uncovered": covered.uncovered,
            "key_ids": list(covered.key_ids),
            "key_source": covered.key_source,
            "kept_elsewhere": _checkpoint_dict(covered.anchor),
        },
    }


def _print_report(path: Path, report: VerifyReport) -> None:
    if report.ok:
        if not report.exists:
            click.echo(f"audit log OK: 0 records (no file at {path})")
        elif report.records == 0:
            click.echo("audit log OK: 0 records")
        else:
            click.echo(
                f"audit log OK: {report.records} records{_in_files(report)}, "
                f"seq {report.first_seq}..{report.last_seq}, last hash {report.last_hash}"
            )
        _print_pruned(report)
        _print_checkpoints(report)
        return
    count = len(report.problems)
    click.echo(
        f"audit log FAILED: {count} problem{'s' if count != 1 else ''} in {report.records} records{_in_files(report)}"
    )
    for problem in report.problems:
        click.echo(f"  {problem.kind}: {problem.message}")
    _print_pruned(report)
    _print_checkpoints(report)


def _print_checkpoints(report: VerifyReport) -> None:
    covered = report.checkpoints
    if covered is None:
        if report.records:
            click.echo("  checkpoints: none (records cut from the end of the log cannot be detected)")
        return
    last = covered.last
    if last is None:
        click.echo(f"  checkpoints: none in {covered.file}")
    else:
        ids = ", ".join(covered.key_ids)
        signer = f"key {ids} ({covered.key_source})" if ids else "no key to check them with"
        click.echo(f"  checkpoints: {covered.count} in {covered.file}, the last {last.describe()}; {signer}")
    if covered.anchor is not None:
        click.echo(f"  kept in PostgreSQL: {covered.anchor.describe()}")
    if covered.uncovered:
        # The documented window: records newer than the last checkpoint could be cut unnoticed.
        are = (
            "record after the last checkpoint is" if covered.uncovered == 1 else "records after the last checkpoint are"
        )
        click.echo(f"  {covered.uncovered} {are} not yet covered")


def _in_files(report: VerifyReport) -> str:
    present = [f for f in report.files if f.status in ("ok", "failed")]
    return f" in {len(present)} files" if len(present) > 1 else ""


def _print_pruned(report: VerifyReport) -> None:
    # Not a failure: retention deleted them, and the manifest's last hash still anchors the chain.
    for pruned in report.pruned:
        span = f"seq {pruned.first_seq}..{pruned.last_seq}"
        click.echo(
            f"  pruned: {pruned.name} ({span}, {pruned.records} records) deleted by retention at {pruned.pruned_at}"
        )


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
            click.echo(json.dumps(record.model_dump(), ensure_ascii=False, sort_keys=True))
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
    """Count calls, denials, errors and rows returned, per group, and listings apart."""
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


@audit.command("export")
@_log_option
@click.option(
    "--home",
    type=click.Path(file_okay=False, path_type=Path),
    help="State directory of the warehouse to export into (default: the configured one).",
)
@click.option(
    "--table", default="audit.records", show_default=True, help="Iceberg table to append to (namespace.table)."
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.pass_context
def export_command(ctx: click.Context, /, log_path: Path | None, home: Path | None, table: str, as_json: bool) -> None:
    """Append the verified log's new records to an Iceberg table, as one snapshot.

    Exports nothing (exit 1) when the log does not verify or does not continue the table.
    """
    # Imported here: pyiceberg and the settings are not needed by the other audit commands.
    from pydantic import ValidationError
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

    from lakegate.catalog.definitions import load_definitions
    from lakegate.errors import LakegateError
    from lakegate.server.audit.export import AuditExportRefused, describe_result, export_audit_log
    from lakegate.server.profile import open_warehouse
    from lakegate.server.settings import load_settings

    obj = ctx.obj if isinstance(ctx.obj, Mapping) else {}
    try:
        settings = load_settings(obj.get("project"), **({"home": home} if home is not None else {}))
    except ValidationError as exc:
        raise click.ClickException(f"invalid settings:\n{exc}") from exc
    configured = obj.get("audit_path") if home is None else None
    path = log_path or (Path(configured) if configured is not None else settings.audit_path)
    err = Console(stderr=True, highlight=False)
    try:
        # The profile's warehouse: in production the catalog the replicas share (PostgreSQL).
        warehouse = open_warehouse(settings)
    except LakegateError as exc:
        click.echo(f"error: {exc}", err=True)
        raise SystemExit(EXIT_UNREADABLE) from None
    try:
        with Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=err,
            transient=True,
            disable=not err.is_terminal,
        ) as progress:
            tasks: dict[str, TaskID] = {}
            labels = {"verify": "verifying the audit log", "export": f"exporting records to {table}"}

            def report(step: str, done: int, total: int) -> None:
                if step not in tasks:
                    tasks[step] = progress.add_task(labels.get(step, step), total=total)
                progress.update(tasks[step], completed=done, total=total)

            result = export_audit_log(
                path, warehouse, table=table, definitions=load_definitions(settings.project), progress=report
            )
    except AuditExportRefused as exc:
        click.echo(f"error: {exc}", err=True)
        raise SystemExit(EXIT_FAILED) from None
    except OSError as exc:
        click.echo(f"error: cannot read audit log {path}: {exc.strerror or exc}", err=True)
        raise SystemExit(EXIT_UNREADABLE) from None
    except LakegateError as exc:
        click.echo(f"error: {exc}", err=True)
        raise SystemExit(EXIT_UNREADABLE) from None
    finally:
        warehouse.close()
    if as_json:
        click.echo(json.dumps({"log": str(path), **result.as_dict()}, indent=2))
    else:
        click.echo(describe_result(result))


@audit.command("report")
@_log_option
@_filter_options
@click.option(
    "--output",
    "-o",
    required=True,
    type=click.Path(path_type=Path, dir_okay=False),
    help="HTML file to write (self-contained: opens offline).",
)
@click.option("--title", help="Page title (default: lakegate audit report).")
@click.pass_context
def report_command(ctx: click.Context, /, log_path: Path | None, output: Path, title: str | None, **kw: Any) -> None:
    """Write one HTML page for reviewers: calls by decision over time, denials by principal and rule,
    the most accessed data, every read of a PII column, writes with their snapshots, the chain's
    verification and the records, filterable.

    Exit 1 when the chain does not verify (the page is written and says so).
    """
    # Imported here: plotly and jinja2 (the report extra) are only needed by this command.
    from lakegate.catalog.definitions import load_definitions
    from lakegate.errors import ConfigurationError
    from lakegate.extras import MissingExtra, require_extra

    try:
        require_extra("report", "lakegate audit report")
    except MissingExtra as exc:
        raise click.ClickException(str(exc)) from None
    from lakegate.server.audit.report import DEFAULT_TITLE, PII_TAG, build_report, read_log, render_html
    from lakegate.server.settings import project_dir

    path = _log_path(ctx, log_path)
    filters = _filters(kw)
    with _exit_if_unreadable(path):
        records = select(read_log(path), filters)
        chain = verify(path)
    obj = ctx.obj if isinstance(ctx.obj, Mapping) else {}
    try:
        tags = load_definitions(project_dir(obj.get("project"))).column_tags()
    except ConfigurationError as exc:
        raise click.ClickException(str(exc)) from exc
    report = build_report(
        records,
        chain=chain,
        sensitive_columns=[column for column, column_tags in tags.items() if PII_TAG in column_tags],
        source=str(path),
        filters=filters,
        title=title or DEFAULT_TITLE,
    )
    page = render_html(report)
    try:
        # Written beside the target and renamed: a reader never sees half a page.
        partial = output.with_name(f".{output.name}.partial")
        partial.write_text(page, encoding="utf-8")
        partial.replace(output)
    except OSError as exc:
        raise click.ClickException(f"cannot write {output}: {exc.strerror or exc}") from exc
    counts = report.counts
    status = "OK" if chain.ok else f"FAILED ({len(chain.problems)} problems)"
    listings = f", {counts.listings} listings" if counts.listings else ""
    click.echo(
        f"wrote {output}: {counts.calls} calls{listings}, {counts.denials} denied, "
        f"{counts.pii_clear} reading PII in clear; chain {status}"
    )
    if not chain.ok:
        raise SystemExit(EXIT_FAILED)
