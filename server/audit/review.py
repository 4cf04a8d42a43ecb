"""Reading the audit log as a reviewer: filters, the ``show`` table and the ``summary`` counts.

Pure functions over records (as `lakegate.server.audit.record_model.read_audit_records` parses them);
nothing here touches a file or a terminal, so the CLI stays thin and these are tested directly.

Not every record is one tool call: a listing (`AuditRecord.is_listing`) is counted apart from the
calls, and a refused HTTP request grouped with others (`lakegate.server.audit.refusals.RefusalLog`)
stands for as many requests as its ``count`` says (`AuditRecord.requests`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from rich.table import Table

from lakegate.server.audit.record_model import AuditRecord

__all__ = [
    "DIMENSIONS",
    "Dimension",
    "Filters",
    "SummaryRow",
    "matches",
    "parse_dimensions",
    "parse_when",
    "select",
    "show_table",
    "summarise",
    "summary_table",
]

Dimension = Literal["principal", "tool", "decision", "resource", "day"]
DIMENSIONS: tuple[Dimension, ...] = ("principal", "tool", "decision", "resource", "day")

_RELATIVE = re.compile(r"^\s*(\d+)\s*([smhdw])\s*$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_when(text: str, *, now: datetime | None = None) -> datetime:
    """A point in time from an ISO date or datetime, or ``<n>s|m|h|d|w`` meaning "that long ago".

    Dates and datetimes without a zone are taken as UTC (the log writes UTC).

    Raises:
        ValueError: ``text`` is neither.
    """
    relative = _RELATIVE.match(text)
    if relative:
        amount, unit = int(relative.group(1)), relative.group(2)
        return (now or datetime.now(UTC)) - timedelta(**{_UNITS[unit]: amount})
    try:
        value = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(f"{text!r} is not a date, a datetime or a relative time such as 24h or 7d") from None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


@dataclass(frozen=True)
class Filters:
    """What ``show`` and ``summary`` keep. Every given criterion must match; ``limit`` keeps the
    newest N of what matched."""

    principal: str | None = None
    tool: str | None = None
    decision: str | None = None
    resource: str | None = None  # substring of any resource name
    since: datetime | None = None  # inclusive
    until: datetime | None = None  # exclusive
    limit: int | None = None


def matches(record: AuditRecord, filters: Filters) -> bool:
    """Whether one record passes every criterion (``limit`` aside).

    A record without a readable time fails a ``since``/``until`` filter: a reviewer asking for
    a time window should not get records that cannot be placed in it.
    """
    if filters.principal is not None and record.principal != filters.principal:
        return False
    if filters.tool is not None and record.tool != filters.tool:
        return False
    if filters.decision is not None and record.decision != filters.decision:
        return False
    if filters.resource is not None:
        needle = filters.resource.lower()
        if not any(needle in r.name.lower() for r in record.resources):
            return False
    if filters.since is not None or filters.until is not None:
        when = record.written_at
        if when is None:
            return False
        if filters.since is not None and when < filters.since:
            return False
        if filters.until is not None and when >= filters.until:
            return False
    return True


def select(records: Iterable[AuditRecord], filters: Filters) -> list[AuditRecord]:
    """The matching records in log order (newest last), the newest ``limit`` of them if set."""
    kept = [r for r in records if matches(r, filters)]
    if filters.limit is not None:
        kept = kept[-filters.limit :] if filters.limit > 0 else []
    return kept


# -- show ---------------------------------------------------------------------------------------


def _short_time(record: AuditRecord) -> str:
    # Month to second, without the year: the table's title gives the years it spans, and the
    # saved width goes to names. --json keeps the full timestamp.
    when = record.written_at
    return when.astimezone(UTC).strftime("%m-%d %H:%M:%S") if when else (record.time or "")[:14]


def _span(records: Sequence[AuditRecord]) -> str:
    times = [t for t in (r.written_at for r in records) if t is not None]
    if not times:
        return ""
    first, last = (t.astimezone(UTC).date().isoformat() for t in (min(times), max(times)))
    return f"{first} .. {last} UTC" if first != last else f"{first} UTC"


def _short_resources(record: AuditRecord, width: int = 20) -> str:
    """Resource names joined until ``width``, then ``+N`` for the rest (never empty if any)."""
    names = [r.name for r in record.resources]
    text = ""
    for shown, name in enumerate(names):
        candidate = f"{text}, {name}" if text else name
        rest = len(names) - shown - 1
        if text and len(candidate) + (len(f" +{rest}") if rest else 0) > width:
            return f"{text} +{len(names) - shown}"
        text = candidate
    return text


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _compact(value: Any) -> str:
    """At most five characters: 999, 9999, 12k, 3.4M (the table must fit 80 columns)."""
    if not _is_number(value):
        return ""
    n = float(value)
    for limit, divisor, suffix in ((1e4, 1.0, ""), (999_500, 1e3, "k"), (999_500_000, 1e6, "M")):
        if abs(n) < limit:
            scaled = n / divisor
            return f"{scaled:.0f}{suffix}" if suffix == "" or abs(scaled) >= 10 else f"{scaled:.1f}{suffix}"
    return f"{n / 1e9:.0f}G"


def _duration(value: Any) -> str:
    if not _is_number(value):
        return ""
    return f"{value:.0f}" if value < 10_000 else f"{value / 1000:.0f}s"


def _table(title: str | None = None) -> Table:
    # One space between columns (collapsed padding), no borders: nine columns in 80 characters.
    return Table(
        title=title or None,
        title_justify="left",
        title_style="dim",
        box=None,
        header_style="bold",
        pad_edge=False,
        show_edge=False,
        collapse_padding=True,
    )


def show_table(records: Sequence[AuditRecord]) -> Table:
    """One row per record, in the order given; fits an 80-column terminal by folding long names."""
    table = _table(_span(records))
    table.add_column("time", no_wrap=True)
    table.add_column("seq", justify="right", no_wrap=True)
    # Minimum widths keep short names on one line when a long one elsewhere forces folding.
    table.add_column("principal", overflow="fold", min_width=9, max_width=14)
    table.add_column("tool", overflow="fold", min_width=9, max_width=16)
    table.add_column("decision", no_wrap=True)
    table.add_column("outcome", overflow="fold", min_width=6, max_width=12)
    table.add_column("resources", overflow="fold", min_width=12, max_width=20)
    table.add_column("rows", justify="right", no_wrap=True)
    table.add_column("ms", justify="right", no_wrap=True)
    for r in records:
        style = "red" if r.is_denial else "yellow" if r.is_error else None
        table.add_row(
            _short_time(r),
            str(r.seq) if r.seq is not None else "",
            r.principal,
            r.tool or "",
            r.decision,
            r.outcome + (f" \u00d7{r.requests}" if r.requests > 1 else ""),
            _short_resources(r),
            _compact(r.rows),
            _duration(r.duration_ms),
            style=style,
        )
    return table


# -- summary ------------------------------------------------------------------------------------


def parse_dimensions(values: Iterable[str]) -> tuple[Dimension, ...]:
    """``--by`` values, repeated and/or comma separated, in order, without duplicates.

    Raises:
        ValueError: a value is not one of `DIMENSIONS`.
    """
    out: list[Dimension] = []
    for value in values:
        for part in value.split(","):
            name = part.strip().lower()
            if not name:
                continue
            if name not in DIMENSIONS:
                raise ValueError(f"cannot group by {name!r}; choose from {', '.join(DIMENSIONS)}")
            if name not in out:
                out.append(name)
    return tuple(out)


@dataclass
class SummaryRow:
    """Counts for one group. ``calls`` are tool calls and refused requests (a grouped refusal by
    its ``count``), ``rows`` the sum of rows returned by them; ``listings`` are the group's listing
    records, in neither."""

    key: tuple[str, ...]
    calls: int = 0
    denials: int = 0
    errors: int = 0
    rows: int = 0
    listings: int = 0

    def as_dict(self, by: Sequence[Dimension]) -> dict[str, Any]:
        return {
            **dict(zip(by, self.key, strict=True)),
            "calls": self.calls,
            "denials": self.denials,
            "errors": self.errors,
            "rows": self.rows,
            "listings": self.listings,
        }


def _values(record: AuditRecord, dim: Dimension) -> list[str]:
    if dim == "resource":
        # A call touching several resources counts once under each of them.
        names = sorted({r.name for r in record.resources})
        return names or ["(none)"]
    if dim == "day":
        when = record.written_at
        return [when.astimezone(UTC).date().isoformat() if when else "(unknown)"]
    value = {"principal": record.principal, "tool": record.tool, "decision": record.decision}[dim]
    return [value if value is not None else "(none)"]


def _keys(record: AuditRecord, by: Sequence[Dimension]) -> list[tuple[str, ...]]:
    keys: list[tuple[str, ...]] = [()]
    for dim in by:
        keys = [key + (value,) for key in keys for value in _values(record, dim)]
    return keys


def summarise(records: Iterable[AuditRecord], by: Sequence[Dimension]) -> list[SummaryRow]:
    """Counts per group, sorted by group key. With no dimensions, one row for everything.

    Grouping by resource counts a call under each resource it touched, so those totals can
    exceed the number of calls.
    """
    groups: dict[tuple[str, ...], SummaryRow] = {}
    for record in records:
        if record.is_listing:
            # A listing's `rows` are the items listed, not data returned: not added to `rows`.
            for key in _keys(record, by):
                groups.setdefault(key, SummaryRow(key)).listings += 1
            continue
        count = record.requests
        for key in _keys(record, by):
            row = groups.setdefault(key, SummaryRow(key))
            row.calls += count
            row.denials += count * record.is_denial
            row.errors += count * record.is_error
            row.rows += record.rows
    return [groups[k] for k in sorted(groups)]


_COUNTS = ("calls", "denials", "errors", "rows", "listings")


def summary_table(rows: Sequence[SummaryRow], by: Sequence[Dimension]) -> Table:
    """The summary as a table, with a total line when there is more than one group."""
    table = _table()
    for dim in by:
        table.add_column(dim, overflow="fold", max_width=30)
    for name in _COUNTS:
        table.add_column(name, justify="right", no_wrap=True)
    for row in rows:
        table.add_row(*row.key, *(f"{getattr(row, name):,}" for name in _COUNTS))
    if len(rows) > 1 and by and "resource" not in by:
        table.add_section()
        totals = [sum(getattr(r, n) for r in rows) for n in _COUNTS]
        label = ["total"] + [""] * (len(by) - 1)
        table.add_row(*label, *(f"{t:,}" for t in totals), style="bold")
    return table
