"""``lakegate audit report``: the audit log as one self-contained HTML page for governance reviewers.

Two pure steps. `build_report` turns records (`AuditRecord`s, as `lakegate.server.audit.review.select` keeps them) into
counts and tables: calls over time by decision, denials by principal and by rule, the most
accessed datasets and columns, every access to a PII column, the writes with their snapshots, the
chain's verification and the raw records. `render_html` turns that into the page: a jinja2
template with autoescaping (the log holds agent-supplied text: SQL, tool names, errors, prompt
injections), charts drawn by plotly, plotly.js inline once.

Calls are tool calls and refused requests, a grouped refusal record (`RefusalLog`) counting as many
as its ``count``. Listing records (tools/list, ...) are no calls: they are counted apart
(`Counts.listings`) and shown among the raw records, and in no chart or table of calls.

The page loads nothing. Its Content-Security-Policy allows no network and only its own two
scripts, by hash (plotly.js and `report.js`); the figures and the records travel as JSON data
blocks, which never run. A value that got past escaping still could not execute.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
from collections import Counter
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import jinja2
import plotly.graph_objects as go
import plotly.io as pio
import plotly.offline
from markupsafe import Markup

from lakegate.server.audit.log import VerifyReport
from lakegate.server.audit.record_model import AuditRecord, read_audit_records
from lakegate.server.audit.review import Filters, summarise
from lakegate.tools.names import ToolName

__all__ = [
    "DEFAULT_TITLE",
    "MAX_RAW_ROWS",
    "PII_TAG",
    "AuditReport",
    "ColumnAccess",
    "Counts",
    "DenialRule",
    "RawRow",
    "ResourceCount",
    "WriteRow",
    "build_report",
    "describe_filters",
    "read_log",
    "render_html",
]

DEFAULT_TITLE = "lakegate audit report"
PII_TAG = "pii"
#: The raw-records table keeps the newest this many (every count and chart still covers all): a
#: page of a million rows would not open. Narrow the report with --since or --principal instead.
MAX_RAW_ROWS = 2000
TOP = 15

#: Tools whose column entries say what a column *is* (and how it would be shown), not that its
#: values were read: describe_dataset records a PII column as "masked" without reading a row;
#: explain_access says what a principal could read, and reads nothing either.
_SCHEMA_TOOLS = frozenset(
    {ToolName.LIST_DATASETS, ToolName.DESCRIBE_DATASET, ToolName.SEARCH_CATALOG, "explain_access"}
)
#: Calls that write, or decide a write: the tools, and what people do through the gate by command.
_WRITE_TOOLS = frozenset(
    {
        ToolName.APPEND_ROWS,
        ToolName.RESTORE_TABLE,
        ToolName.ADD_DOCUMENTS,
        "changes/approve",
        "changes/reject",
        "table/load",
        "table/register",
    }
)
_STAGED = ("append_staged", "restore_staged")
_DECISION_ORDER = ("allow", "partial", "deny")
_DECISION_COLOURS = {"allow": "#2e7d32", "partial": "#f9a825", "deny": "#c62828"}
_OTHER_COLOUR = "#607d8b"
_DEFAULT_DENY = "no allow rule matched (deny by default)"


def read_log(path: Path) -> Iterator[AuditRecord]:
    """Every record of the log in order, rotated files included (`read_audit_records`); a missing log
    is an empty one.

    Raises:
        OSError: the log cannot be read.
        lakegate.server.audit.log.AuditFormatError: a line is not a record.
    """
    try:
        yield from read_audit_records(path)
    except FileNotFoundError:
        return


# -- what the page shows ------------------------------------------------------------------------


@dataclass(frozen=True)
class Counts:
    """The headline numbers. PII counts are calls (a call reading three PII columns counts once);
    ``listings`` are listing records, in no other count."""

    calls: int = 0
    allowed: int = 0
    partial: int = 0
    denials: int = 0
    errors: int = 0
    principals: int = 0
    pii_clear: int = 0
    pii_masked: int = 0
    writes: int = 0  # committed (outcome ok); refused attempts are in the writes table too
    listings: int = 0


@dataclass(frozen=True)
class DenialRule:
    """Denials decided by one rule (or by the default deny), and who was refused."""

    rule: str
    denials: int
    principals: tuple[str, ...]


@dataclass(frozen=True)
class ResourceCount:
    """Calls that touched one dataset or column, by how many principals, with which access."""

    name: str
    calls: int
    principals: tuple[str, ...]
    accesses: str  # "read 3, masked 2"


@dataclass(frozen=True)
class ColumnAccess:
    """One call's access to one PII column, with the data rules and the policy version in force."""

    seq: str
    time: str
    principal: str
    roles: str
    tool: str
    column: str
    access: str  # "clear", "masked (hash)", "denied", ...
    clear: bool
    outcome: str
    rules: tuple[str, ...]
    policy_version: str


@dataclass(frozen=True)
class WriteRow:
    """One call of a write tool: what it changed from which snapshot (or version) to which."""

    seq: str
    time: str
    principal: str
    tool: str
    target: str
    operation: str
    rows: str
    before: str
    after: str
    outcome: str
    error: str


@dataclass(frozen=True)
class ChangeRow:
    """One change staged for a person's approval, and its decision as far as the records show."""

    change_id: str
    requested: str  # time (UTC)
    requested_by: str
    table: str
    what: str  # "21 rows" or "restore to <snapshot>"
    status: str  # pending, approved, rejected
    decided_by: str
    decided: str  # time (UTC)
    snapshot: str  # main's snapshot that holds an approved change


@dataclass(frozen=True)
class RawRow:
    """One record as the raw table shows it, with the whole record as indented JSON."""

    seq: str
    time: str
    principal: str
    tool: str
    decision: str
    outcome: str
    resources: str
    error: str
    record_json: str
    kind: str  # "denial", "error" or "" (row styling)
    count: int = 1  # requests the record stands for (a grouped refusal's `count`)


@dataclass(frozen=True)
class AuditReport:
    """Everything the page shows, computed from the records; `render_html` only lays it out."""

    title: str
    generated: str
    source: str
    filters: str
    span: str
    counts: Counts
    chain: VerifyReport
    #: (bucket unit, bucket labels, decision -> calls per bucket)
    timeline: tuple[str, tuple[str, ...], dict[str, tuple[int, ...]]]
    denials_by_principal: tuple[tuple[str, int], ...]
    denial_rules: tuple[DenialRule, ...]
    datasets: tuple[ResourceCount, ...]
    columns: tuple[ResourceCount, ...]
    pii_columns: tuple[str, ...]
    pii: tuple[ColumnAccess, ...]
    #: (principal, calls with a clear PII read, calls with a masked one, PII columns touched)
    pii_by_principal: tuple[tuple[str, int, int, str], ...]
    writes: tuple[WriteRow, ...]
    changes: tuple[ChangeRow, ...]
    raw: tuple[RawRow, ...]
    raw_total: int
    untimed: int = 0


def _text(value: Any) -> str:
    return "" if value is None else str(value)


def _time(record: AuditRecord) -> str:
    when = record.written_at
    return when.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S") if when else _text(record.time)


def _details(record: AuditRecord) -> Mapping[str, Any]:
    return record.details or {}


def _rule_text(rule: Sequence[str]) -> str:
    # The policy.csv spelling without its "p, ": subject, object, action, effect.
    return ", ".join(rule)


def describe_filters(filters: Filters) -> str:
    """The filters as a reviewer reads them: "principal = analyst; since 2026-11-24 09:00 UTC"."""
    parts = [
        f"{name} = {value}"
        for name in ("principal", "tool", "decision")
        if (value := getattr(filters, name)) is not None
    ]
    if filters.resource is not None:
        parts.append(f"resource contains {filters.resource}")
    for name in ("since", "until"):
        when: datetime | None = getattr(filters, name)
        if when is not None:
            parts.append(f"{name} {when.astimezone(UTC).strftime('%Y-%m-%d %H:%M')} UTC")
    if filters.limit is not None:
        parts.append(f"newest {filters.limit}")
    return "; ".join(parts) or "none (every record)"


def _span(times: Sequence[datetime]) -> str:
    if not times:
        return "no timed records"
    first, last = (t.astimezone(UTC).strftime("%Y-%m-%d %H:%M") for t in (min(times), max(times)))
    return f"{first} .. {last} UTC"


def _bucket_unit(times: Sequence[datetime]) -> str:
    span = max(times) - min(times) if times else timedelta(0)
    return "hour" if span <= timedelta(days=2) else "day" if span <= timedelta(days=180) else "week"


def _bucket(when: datetime, unit: str) -> str:
    when = when.astimezone(UTC)
    if unit == "hour":
        return when.strftime("%Y-%m-%d %H:00")
    day = when.date() - timedelta(days=when.weekday()) if unit == "week" else when.date()
    return day.isoformat()


def _timeline(calls: Sequence[AuditRecord]) -> tuple[str, tuple[str, ...], dict[str, tuple[int, ...]]]:
    timed = [(when, r.decision, r) for r in calls if (when := r.written_at)]
    unit = _bucket_unit([when for when, _, _ in timed])
    counts: Counter[tuple[str, str]] = Counter()
    for when, decision, record in timed:
        counts[(_bucket(when, unit), decision)] += record.requests
    labels = tuple(sorted({label for label, _ in counts}))
    present = {decision for _, decision in counts}
    decisions = [d for d in _DECISION_ORDER if d in present] + sorted(present - set(_DECISION_ORDER))
    return unit, labels, {d: tuple(counts[(label, d)] for label in labels) for d in decisions}


def _denial_rule(record: AuditRecord) -> str:
    """The deny rule that decided, else the default deny with the object no rule allowed."""
    denying = [rule for rule in record.rules if rule and rule[-1] == "deny"]
    if denying:
        return _rule_text(denying[-1])
    refused = [r for r in record.resources if r.access == "denied"]
    if refused:
        kind, name = refused[0].type, refused[0].name
        return f"{_DEFAULT_DENY}: {kind}:{name}" if kind == "tool" else f"{_DEFAULT_DENY}: {name}"
    return _DEFAULT_DENY


def _denials(
    calls: Sequence[AuditRecord],
) -> tuple[tuple[tuple[str, int], ...], tuple[DenialRule, ...]]:
    by_principal = tuple(
        (row.key[0], row.denials)
        for row in sorted(summarise(calls, ("principal",)), key=lambda r: (-r.denials, r.key))
        if row.denials
    )
    rules: dict[str, tuple[int, set[str]]] = {}
    for record in calls:
        if record.is_denial:
            rule = _denial_rule(record)
            count, who = rules.get(rule, (0, set()))
            who.add(record.principal)
            rules[rule] = (count + record.requests, who)
    ordered = sorted(rules.items(), key=lambda item: (-item[1][0], item[0]))
    return by_principal, tuple(DenialRule(rule, n, tuple(sorted(who))) for rule, (n, who) in ordered)


def _most_accessed(records: Sequence[AuditRecord], kind: str) -> tuple[ResourceCount, ...]:
    calls: Counter[str] = Counter()
    principals: dict[str, set[str]] = {}
    accesses: dict[str, Counter[str]] = {}
    for record in records:
        seen: set[str] = set()
        for resource in record.resources:
            name = resource.name
            if resource.type != kind or name in seen:
                continue
            seen.add(name)
            calls[name] += 1
            principals.setdefault(name, set()).add(record.principal)
            accesses.setdefault(name, Counter())[resource.access or "?"] += 1
    top = sorted(calls, key=lambda name: (-calls[name], name))[:TOP]
    return tuple(
        ResourceCount(
            name,
            calls[name],
            tuple(sorted(principals[name])),
            ", ".join(f"{access} {n}" for access, n in accesses[name].most_common()),
        )
        for name in top
    )


def _pii_accesses(records: Sequence[AuditRecord], sensitive: Collection[str]) -> list[ColumnAccess]:
    out = []
    for record in records:
        if record.tool in _SCHEMA_TOOLS:
            continue
        masks = _details(record).get("masked_columns")
        masks = masks if isinstance(masks, Mapping) else {}
        data_rules = tuple(
            _rule_text(rule) for rule in record.rules if len(rule) > 1 and not rule[1].startswith("tool:")
        )
        for resource in record.resources:
            name, access = resource.name, resource.access
            if resource.type != "column" or name not in sensitive or access == "metadata":
                continue
            label = {"read": "clear", "masked": f"masked ({masks[name]})" if name in masks else "masked"}.get(
                access, access
            )
            out.append(
                ColumnAccess(
                    seq=_text(record.seq),
                    time=_time(record),
                    principal=record.principal,
                    roles=", ".join(record.roles),
                    tool=_text(record.tool),
                    column=name,
                    access=label,
                    clear=access == "read",
                    outcome=record.outcome,
                    rules=data_rules,
                    policy_version=record.policy_version,
                )
            )
    return out


def _pii_by_principal(accesses: Sequence[ColumnAccess]) -> tuple[tuple[str, int, int, str], ...]:
    clear: dict[str, set[str]] = {}
    masked: dict[str, set[str]] = {}
    columns: dict[str, set[str]] = {}
    for access in accesses:
        columns.setdefault(access.principal, set()).add(access.column)
        if access.clear:
            clear.setdefault(access.principal, set()).add(access.seq)
        elif access.access.startswith("masked"):
            masked.setdefault(access.principal, set()).add(access.seq)
    return tuple(
        (who, len(clear.get(who, ())), len(masked.get(who, ())), ", ".join(sorted(columns[who])))
        for who in sorted(columns, key=lambda w: (-len(clear.get(w, ())), w))
    )


def _write(record: AuditRecord) -> WriteRow:
    details = _details(record)
    arguments = record.arguments
    target = details.get("table") or details.get("dataset") or arguments.get("table") or arguments.get("dataset")
    before = details.get("snapshot_before", details.get("version_before"))
    after = details.get("snapshot_after", details.get("version_after"))
    rows = details.get("rows", details.get("chunks"))
    return WriteRow(
        seq=_text(record.seq),
        time=_time(record),
        principal=record.principal,
        tool=_text(record.tool),
        target=_text(target),
        operation=_text(details.get("operation")),
        rows=_text(rows),
        before=_text(before) if "operation" in details else "",
        after=_text(after),
        outcome=record.outcome,
        error=_text(record.error),
    )


def _changes(calls: Sequence[AuditRecord]) -> tuple[ChangeRow, ...]:
    """Every staged change in the records, newest first, with the decision that followed (if one
    did: a change decided outside the selected records shows as pending)."""
    decisions: dict[str, AuditRecord] = {}
    for record in calls:
        if record.tool in ("changes/approve", "changes/reject") and record.outcome == "ok":
            decisions[str(_details(record).get("change_id"))] = record
    rows = []
    for record in calls:
        details = _details(record)
        if details.get("operation") not in _STAGED or record.outcome != "ok":
            continue
        change_id = str(details.get("change_id"))
        decided = decisions.get(change_id)
        outcome = _details(decided) if decided is not None else {}
        restore = details.get("operation") == "restore_staged"
        rows.append(
            ChangeRow(
                change_id=change_id,
                requested=_time(record),
                requested_by=record.principal,
                table=_text(details.get("table")),
                what=f"restore to {details.get('restore_to')}" if restore else f"{details.get('rows')} rows",
                status=_text(outcome.get("decision")) if decided is not None else "pending",
                decided_by=decided.principal if decided is not None else "",
                decided=_time(decided) if decided is not None else "",
                snapshot=_text(outcome.get("snapshot_after")) if decided is not None else "",
            )
        )
    return tuple(reversed(rows))


def _raw(record: AuditRecord) -> RawRow:
    names = [r.name for r in record.resources if r.type != "tool"]
    return RawRow(
        seq=_text(record.seq),
        time=_time(record),
        principal=record.principal,
        tool=_text(record.tool),
        decision=record.decision,
        outcome=record.outcome,
        resources=", ".join(names),
        error=_text(record.error),
        record_json=json.dumps(record.model_dump(), indent=2, sort_keys=True, ensure_ascii=False),
        kind="denial" if record.is_denial else "error" if record.is_error else "",
        count=record.requests,
    )


def build_report(
    records: Sequence[AuditRecord],
    *,
    chain: VerifyReport,
    sensitive_columns: Collection[str],
    source: str,
    filters: Filters | None = None,
    title: str = DEFAULT_TITLE,
    generated: datetime | None = None,
    max_raw_rows: int = MAX_RAW_ROWS,
) -> AuditReport:
    """Compute the page's contents from the selected records.

    ``chain`` is `lakegate.server.audit.log.verify` of the whole log (not only the selected records);
    ``sensitive_columns`` are the "namespace.table.column" names tagged PII.
    """
    times = [when for when in (r.written_at for r in records) if when is not None]
    calls = [r for r in records if not r.is_listing]
    totals = summarise(records, ())
    total = totals[0] if totals else None
    pii = _pii_accesses(calls, frozenset(sensitive_columns))
    writes = [_write(r) for r in calls if r.tool in _WRITE_TOOLS]
    by_principal, rules = _denials(calls)
    counts = Counts(
        calls=total.calls if total else 0,
        allowed=sum(r.requests for r in calls if r.decision == "allow"),
        partial=sum(r.requests for r in calls if r.decision == "partial"),
        denials=total.denials if total else 0,
        errors=total.errors if total else 0,
        principals=len({r.principal for r in records}),
        pii_clear=len({a.seq for a in pii if a.clear}),
        pii_masked=len({a.seq for a in pii if a.access.startswith("masked")}),
        writes=sum(w.outcome == "ok" for w in writes),
        listings=total.listings if total else 0,
    )
    shown = list(records)[-max_raw_rows:] if max_raw_rows > 0 else []
    return AuditReport(
        title=title,
        generated=(generated or datetime.now(UTC)).astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
        source=source,
        filters=describe_filters(filters or Filters()),
        span=_span(times),
        counts=counts,
        chain=chain,
        timeline=_timeline(calls),
        denials_by_principal=by_principal,
        denial_rules=rules,
        datasets=_most_accessed(calls, "dataset"),
        columns=_most_accessed(calls, "column"),
        pii_columns=tuple(sorted(sensitive_columns)),
        pii=tuple(pii),
        pii_by_principal=_pii_by_principal(pii),
        writes=tuple(writes),
        changes=_changes(calls),
        raw=tuple(_raw(r) for r in reversed(shown)),  # newest first: what a reviewer looks at first
        raw_total=len(records),
        untimed=sum(r.written_at is None for r in calls),
    )


# -- the page -----------------------------------------------------------------------------------


def _plot_text(value: str) -> str:
    # Plotly reads labels as its own small HTML (<b>, <a href>, <br>) and decodes entities after:
    # escaped, a principal named "<b>x</b>" shows as typed.
    return html.escape(value, quote=False)


def _layout(title: str, **extra: Any) -> dict[str, Any]:
    return {
        "title": {"text": title, "x": 0, "font": {"size": 15}},
        "template": "plotly_white",
        "height": 340,
        "margin": {"l": 50, "r": 20, "t": 50, "b": 50},
        **extra,
    }


def _count_axis(largest: int) -> dict[str, Any]:
    # Counts are whole numbers: no 0.2 ticks on a chart of three calls.
    return {"rangemode": "tozero", "tickformat": ",d", **({"dtick": 1} if largest <= 10 else {})}


def _empty(figure: go.Figure, message: str) -> go.Figure:
    figure.add_annotation(text=message, showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper")
    figure.update_xaxes(visible=False)
    figure.update_yaxes(visible=False)
    return figure


def _figures(report: AuditReport) -> dict[str, go.Figure]:
    unit, labels, by_decision = report.timeline
    timeline = go.Figure(
        [
            go.Bar(
                name=_plot_text(decision),
                x=list(labels),
                y=list(values),
                marker_color=_DECISION_COLOURS.get(decision, _OTHER_COLOUR),
            )
            for decision, values in by_decision.items()
        ],
        layout=_layout(
            f"Calls per {unit} by decision (UTC)",
            barmode="stack",
            legend={"orientation": "h"},
            yaxis=_count_axis(max(map(sum, zip(*by_decision.values(), strict=True)), default=0)),
        ),
    )
    if not labels:
        _empty(timeline, "no timed records")

    who = [_plot_text(p) for p, _ in report.denials_by_principal]
    denials = go.Figure(
        go.Bar(x=who, y=[n for _, n in report.denials_by_principal], marker_color=_DECISION_COLOURS["deny"]),
        layout=_layout(
            "Denials by principal", yaxis=_count_axis(max((n for _, n in report.denials_by_principal), default=0))
        ),
    )
    if not who:
        _empty(denials, "no denials")

    top = list(reversed(report.datasets))  # plotly draws horizontal bars bottom-up
    datasets = go.Figure(
        go.Bar(x=[d.calls for d in top], y=[_plot_text(d.name) for d in top], orientation="h", marker_color="#1565c0"),
        layout=_layout(
            "Most accessed datasets (calls)",
            margin={"l": 160, "r": 20, "t": 50, "b": 40},
            xaxis=_count_axis(max((d.calls for d in top), default=0)),
        ),
    )
    if not top:
        _empty(datasets, "no dataset accessed")
    return {"fig-timeline": timeline, "fig-denials": denials, "fig-datasets": datasets}


def _script_safe_json(text: str) -> Markup:
    # Inside <script type="application/json"> only "</script" or "<!--" could end the block; JSON
    # has "<" only inside strings, where \u003c means the same.
    return Markup(text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026"))


def _csp_hash(script: str) -> str:
    digest = hashlib.sha256(script.encode("utf-8")).digest()
    return f"'sha256-{base64.b64encode(digest).decode('ascii')}'"


@cache
def _assets() -> tuple[str, str, jinja2.Template]:
    package = resources.files("lakegate.server.audit")
    app_js = package.joinpath("report.js").read_text(encoding="utf-8")
    environment = jinja2.Environment(
        autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True
    )
    template = environment.from_string(package.joinpath("report.html.j2").read_text(encoding="utf-8"))
    plotly_js = plotly.offline.get_plotlyjs()
    # The bundle goes into a <script> verbatim: it must not be able to close it.
    if "</script" in plotly_js.lower():
        raise RuntimeError("this plotly.js bundle cannot be inlined: it contains </script")
    return plotly_js, app_js, template


def render_html(report: AuditReport) -> str:
    """The whole page: one HTML document with plotly.js, the figures and the records inline."""
    plotly_js, app_js, template = _assets()
    figures = {key: _script_safe_json(pio.to_json(figure, validate=True)) for key, figure in _figures(report).items()}
    csp = (
        "default-src 'none'; "
        f"script-src {_csp_hash(plotly_js)} {_csp_hash(app_js)}; "
        "style-src 'unsafe-inline'; img-src data: blob:; font-src data:"
    )
    return template.render(
        report=report,
        figures=figures,
        csp=csp,
        plotly_js=Markup(plotly_js),
        app_js=Markup(app_js),
    )
