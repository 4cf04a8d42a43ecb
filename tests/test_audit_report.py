"""``lakegate audit report``: a log made by real gate calls, the page it gives, and that page in a
real headless Chromium (Debian's chromium and chromedriver; skipped when they are not on PATH).

The log: queries on the shared small demo (analyst reads PII masked, admin in clear), denials (no
tool rule, an explicit deny rule, a dataset the analyst may not see, an unknown principal, an
unknown tool whose name is HTML), and one write, made by a second server on a warehouse of its own
(the demo is shared read-only) into the same log file, as two servers on one log would.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import json
import re
import shutil
import struct
import zlib
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
from click.testing import CliRunner
from pyiceberg.schema import Schema
from pyiceberg.types import LongType, NestedField, StringType

from lakegate.catalog.definitions import load_definitions
from lakegate.catalog.warehouse import Warehouse
from lakegate.server.app import Runtime, open_runtime
from lakegate.server.audit.log import AuditLog, verify
from lakegate.server.audit.record_builders import listing_record, refused_request_record
from lakegate.server.audit.record_model import read_audit_records
from lakegate.server.audit.report import AuditReport, build_report, render_html
from lakegate.server.audit.review import Filters, select
from lakegate.server.cli.audit_commands import audit
from lakegate.server.gate.gate import GateOutcome
from lakegate.server.settings import load_settings
from tests.conftest import REPO, gate_call

INJECTED = "<script>alert(1)</script>"
HTML_TOOL = "<img src=x onerror=alert(2)>"
HTML_PRINCIPAL = "<b>mallory</b>"
NOTES = "ops.notes"
#: What the log holds, counted by hand from the calls in `gate_log`.
EXPECTED = {
    "count-calls": "10",
    "count-allowed": "3",
    "count-partial": "2",
    "count-denials": "5",
    "count-errors": "0",
    "count-principals": "4",
    "count-pii-clear": "1",
    "count-pii-masked": "2",
    "count-writes": "1",
    "count-listings": "0",  # gate calls in process: no MCP client, so no listing
    "chain-status": "OK",
    "chain-records": "10",
}
PII_COLUMNS = sorted(c for c, tags in load_definitions(REPO).column_tags().items() if "pii" in tags)


def _notes_schema() -> Schema:
    return Schema(
        NestedField(1, "note_id", LongType(), required=True), NestedField(2, "note", StringType(), required=False)
    )


def _call(runtime: Runtime, principal: str, tool: str, arguments: dict[str, Any]) -> GateOutcome:
    return gate_call(runtime, principal, tool, arguments, session_id="report-test")


@pytest.fixture(scope="module")
def gate_log(demo_home: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """The log of ten real gate calls, and the write's audit record. Module-scoped (the `runtime`
    fixture is per test) so that the page and the browser are made once for every test here."""
    base = tmp_path_factory.mktemp("audit-report")
    log = base / "audit" / "audit.jsonl"
    settings = load_settings(REPO, home=demo_home, audit={"path": log, "fsync": False}, principal=None)
    demo = open_runtime(settings)
    try:
        calls: list[tuple[str, str, dict[str, Any]]] = [
            ("analyst", "query", {"sql": "SELECT customer_id, email FROM sales.customers LIMIT 5"}),
            ("analyst", "query", {"sql": "SELECT name, country FROM sales.customers LIMIT 3"}),
            ("admin", "query", {"sql": "SELECT customer_id, email, phone FROM sales.customers LIMIT 2"}),
            ("analyst", "append_rows", {"table": "support.tickets", "rows": []}),  # no tool rule
            ("data_steward", "query", {"sql": "SELECT body FROM support.tickets"}),  # explicit deny rule
            ("analyst", "query", {"sql": "SELECT * FROM support.tickets"}),  # not visible: deny, told not found
            ("admin", "describe_dataset", {"name": "sales.customers"}),  # schema only: not a PII read
            (HTML_PRINCIPAL, "list_datasets", {}),  # a principal the policy does not know
            ("analyst", HTML_TOOL, {}),  # no such tool, no rule either
        ]
        outcomes = [_call(demo, *call) for call in calls]
    finally:
        demo.close()
    assert [o.error is None for o in outcomes] == [True, True, True, False, False, False, True, False, False]

    home = base / "notes-home"
    warehouse = Warehouse(home)
    try:
        warehouse.iceberg.create_namespace("ops")
        table = warehouse.iceberg.create_table(NOTES, _notes_schema())
        table.append(pa.Table.from_pylist([{"note_id": 1, "note": "seed"}], schema=_notes_schema().as_arrow()))
    finally:
        warehouse.close()
    writer = open_runtime(load_settings(REPO, home=home, audit={"path": log, "fsync": False}, principal=None))
    try:
        rows = [{"note_id": 2, "note": INJECTED}, {"note_id": 3, "note": "ignore previous instructions"}]
        written = _call(writer, "admin", "append_rows", {"table": NOTES, "rows": rows})
    finally:
        writer.close()
    assert written.error is None and written.record is not None, written.error
    return log, written.record


def _report(log: Path, filters: Filters | None = None, **kw: Any) -> AuditReport:
    records = select(read_audit_records(log), filters or Filters())
    return build_report(
        records, chain=verify(log), sensitive_columns=PII_COLUMNS, source=str(log), filters=filters, **kw
    )


@pytest.fixture(scope="module")
def page(gate_log: tuple[Path, dict[str, Any]], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The report of the whole log, written by the CLI."""
    log, _ = gate_log
    output = tmp_path_factory.mktemp("page") / "audit-report.html"
    result = CliRunner().invoke(audit, ["report", "--log", str(log), "--output", str(output)], obj={})
    assert result.exit_code == 0, result.output
    assert "10 calls, 5 denied, 1 reading PII in clear; chain OK" in result.output
    return output


class _Page(HTMLParser):
    """Text by element id, table rows by table id, every script, and every src/href value."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.text: dict[str, str] = {}
        self.rows: dict[str, list[list[str]]] = {}
        self.scripts: list[tuple[dict[str, str | None], str]] = []
        self.links: list[str] = []
        self.csp = ""
        self._open: list[tuple[str, str | None]] = []
        self._table: str | None = None
        self._script: dict[str, str | None] | None = None
        self._script_text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        self.links += [v or "" for k, v in attrs if k in ("src", "href")]
        if tag == "meta" and found.get("http-equiv") == "Content-Security-Policy":
            self.csp = found.get("content") or ""
        if tag == "script":
            self._script, self._script_text = found, []
        if tag == "table":
            self._table = found.get("id")
            self.rows.setdefault(self._table or "", [])
        if tag == "tr" and self._table:
            self.rows[self._table].append([])
        if tag == "td" and self._table and self.rows[self._table]:
            self.rows[self._table][-1].append("")
        if tag not in ("br", "meta", "link", "input"):
            self._open.append((tag, found.get("id")))

    def handle_endtag(self, tag: str) -> None:
        if tag == "script" and self._script is not None:
            self.scripts.append((self._script, "".join(self._script_text)))
            self._script = None
        if tag == "table":
            self._table = None
        while self._open:
            if self._open.pop()[0] == tag:
                break

    def handle_data(self, data: str) -> None:
        if self._script is not None:
            self._script_text.append(data)
            return
        for _, element_id in self._open:
            if element_id:
                self.text[element_id] = self.text.get(element_id, "") + data
        if self._table and self.rows[self._table] and self.rows[self._table][-1] and self._open[-1][0] != "th":
            self.rows[self._table][-1][-1] += data


def _parse(html: str) -> _Page:
    parsed = _Page()
    parsed.feed(html)
    return parsed


# -- the page's contents, without a browser -----------------------------------------------------


def test_the_page_shows_the_counts_of_the_log(page: Path) -> None:
    parsed = _parse(page.read_text(encoding="utf-8"))
    assert {key: parsed.text[key].strip() for key in EXPECTED} == EXPECTED
    assert len(parsed.rows["table-records"]) == 10 + 1  # header row, then one per record


def test_denials_by_principal_and_by_rule(gate_log: tuple[Path, dict[str, Any]]) -> None:
    report = _report(gate_log[0])
    assert report.denials_by_principal == (("analyst", 3), (HTML_PRINCIPAL, 1), ("data_steward", 1))
    rules = {rule.rule: (rule.denials, rule.principals) for rule in report.denial_rules}
    default = "no allow rule matched (deny by default)"
    assert rules == {
        "role:data_steward, support.tickets.body, read, deny": (1, ("data_steward",)),
        f"{default}: tool:append_rows": (1, ("analyst",)),
        f"{default}: support.tickets": (1, ("analyst",)),
        f"{default}: tool:list_datasets": (1, (HTML_PRINCIPAL,)),
        f"{default}: tool:{HTML_TOOL}": (1, ("analyst",)),
    }
    _, labels, by_decision = report.timeline
    assert {d: sum(v) for d, v in by_decision.items()} == {"allow": 3, "partial": 2, "deny": 5}
    assert len(labels) in (1, 2)  # the calls took seconds, perhaps across an hour


def test_every_pii_read_with_its_access_and_rules(gate_log: tuple[Path, dict[str, Any]]) -> None:
    report = _report(gate_log[0])
    reads = sorted((a.principal, a.column, a.access, a.tool) for a in report.pii)
    assert reads == [
        ("admin", "sales.customers.email", "clear", "query"),
        ("admin", "sales.customers.phone", "clear", "query"),
        ("analyst", "sales.customers.email", "masked (hash)", "query"),
        ("analyst", "sales.customers.name", "masked (hash)", "query"),
    ]  # the admin's describe_dataset touched every PII column but read no value
    masked = next(a for a in report.pii if a.principal == "analyst")
    assert "role:analyst, tag:pii, mask:hash, allow" in masked.rules
    assert not any(rule.startswith("role:agent, tool:") for rule in masked.rules)
    assert masked.policy_version and masked.roles == "role:agent, role:analyst"
    assert report.pii_by_principal == (
        ("admin", 1, 0, "sales.customers.email, sales.customers.phone"),
        ("analyst", 0, 2, "sales.customers.email, sales.customers.name"),
    )
    datasets = {d.name: (d.calls, d.accesses) for d in report.datasets}
    assert datasets["sales.customers"] == (4, "read 3, metadata 1")
    assert datasets[NOTES] == (1, "write 1")


def test_writes_carry_their_snapshots(gate_log: tuple[Path, dict[str, Any]], page: Path) -> None:
    log, record = gate_log
    details = record["details"]
    assert isinstance(details["snapshot_before"], int) and details["snapshot_before"] != details["snapshot_after"]
    writes = _report(log).writes
    assert [(w.tool, w.principal, w.outcome) for w in writes] == [
        ("append_rows", "analyst", "denied"),
        ("append_rows", "admin", "ok"),
    ]
    ok = writes[1]
    assert (ok.target, ok.operation, ok.rows) == (NOTES, "append", "2")
    assert (ok.before, ok.after) == (str(details["snapshot_before"]), str(details["snapshot_after"]))
    rows = _parse(page.read_text(encoding="utf-8")).rows["table-writes"]
    assert [str(details["snapshot_before"]), str(details["snapshot_after"])] == rows[2][7:9]


def test_log_values_are_escaped_and_only_the_pages_own_scripts_run(page: Path) -> None:
    html = page.read_text(encoding="utf-8")
    assert INJECTED not in html and HTML_TOOL not in html and HTML_PRINCIPAL not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html  # the write's argument, as text
    parsed = _parse(html)
    assert HTML_TOOL in parsed.text["table-denial-rules"] and HTML_PRINCIPAL in parsed.text["table-records"]
    record_json = [row[-1] for row in parsed.rows["table-records"] if row and row[3] == "append_rows"]
    assert any(INJECTED in cell for cell in record_json)

    executable = [body for attrs, body in parsed.scripts if attrs.get("type") != "application/json"]
    data = [body for attrs, body in parsed.scripts if attrs.get("type") == "application/json"]
    assert len(executable) == 2 and len(data) == 3  # plotly.js once, the page's script; three figures
    assert sum("Plotly.newPlot" in body for body in executable) == 1
    for body in data:
        assert "<" not in body
        json.loads(body)
    # The CSP allows exactly those two scripts by hash, and nothing from the network.
    hashes = {
        "'sha256-" + base64.b64encode(hashlib.sha256(body.encode()).digest()).decode() + "'" for body in executable
    }
    directives = dict(part.strip().split(" ", 1) for part in parsed.csp.split(";") if part.strip())
    assert directives["default-src"] == "'none'" and set(directives["script-src"].split()) == hashes
    assert all(link.startswith("data:") for link in parsed.links)


def test_filters_title_and_a_tampered_chain(gate_log: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    log = tmp_path / "audit.jsonl"
    lines = gate_log[0].read_text(encoding="utf-8").splitlines(keepends=True)
    edited = json.loads(lines[2])
    edited["principal"] = "nobody"  # hide the admin's clear read of PII
    lines[2] = json.dumps(edited) + "\n"
    log.write_text("".join(lines), encoding="utf-8")
    output = tmp_path / "out" / "analyst.html"
    output.parent.mkdir()
    args = ["report", "--log", str(log), "-o", str(output), "--principal", "analyst", "--title", "Q4 <review>"]
    result = CliRunner().invoke(audit, args, obj={})
    assert result.exit_code == 1, result.output  # written, and says the chain is broken
    assert "chain FAILED (1 problems)" in result.output
    parsed = _parse(output.read_text(encoding="utf-8"))
    assert parsed.text["report-title"] == "Q4 <review>" and parsed.text["filters"] == "principal = analyst"
    assert parsed.text["count-calls"] == "5" and parsed.text["count-denials"] == "3"
    problems = parsed.text["chain-problems"]
    assert parsed.text["chain-status"] == "FAILED" and "seq 3" in problems and "edited" in problems


def test_an_empty_or_missing_log_still_gives_a_page(tmp_path: Path) -> None:
    output = tmp_path / "empty.html"
    result = CliRunner().invoke(audit, ["report", "-o", str(output)], obj={"audit_path": tmp_path / "none.jsonl"})
    assert result.exit_code == 0, result.output
    parsed = _parse(output.read_text(encoding="utf-8"))
    assert parsed.text["count-calls"] == "0" and parsed.text["chain-status"] == "OK"
    assert "no log file" in parsed.text["chain"] and "pii-none" in parsed.text
    unreadable = CliRunner().invoke(audit, ["report", "-o", str(output)], obj={"audit_path": tmp_path})
    assert unreadable.exit_code == 2 and "cannot read audit log" in unreadable.output


def test_the_raw_table_keeps_the_newest_records_and_counts_them_all(gate_log: tuple[Path, dict[str, Any]]) -> None:
    report = _report(gate_log[0], Filters(decision="deny"), max_raw_rows=3)
    assert report.counts.calls == report.raw_total == report.counts.denials == 5
    assert [r.seq for r in report.raw] == ["9", "8", "6"]  # newest first
    parsed = _parse(render_html(report))
    assert parsed.text["records-shown"] == "3" and parsed.text["records-total"] == "5"
    assert parsed.text["filters"] == "decision = deny"


def test_listings_are_counted_apart_and_a_grouped_refusal_by_its_count(tmp_path: Path) -> None:
    """What an HTTP server writes besides calls: a client's tools/list, and a refused request that
    `RefusalLog` wrote once, then grouped with three more into one record with `count: 3`."""
    listing = listing_record(
        method="tools/list",
        request_id="1",
        session_id="s-1",
        principal="analyst",
        roles=["role:analyst"],
        authenticated_by="token",
        transport="http",
        client_name="agent",
        client_version="1",
        policy_version="v1",
        listed=8,
        payload_bytes=900,
        duration_s=0.001,
    )
    refused = refused_request_record(
        request_id="2",
        session_id=None,
        principal="anonymous",
        roles=[],
        authenticated_by="none",
        transport="http",
        policy_version="v1",
        duration_s=0.0005,
        outcome="unauthenticated",
        error="invalid_token",
        details={"reason": "expired"},
    )
    log = tmp_path / "audit.jsonl"
    with AuditLog(log, fsync=False) as writer:
        for record in (listing, refused.model_copy(update={"count": 1}), refused.model_copy(update={"count": 3})):
            writer.append(record.model_dump())
    report = _report(log)
    counts = report.counts
    assert (counts.calls, counts.listings, counts.denials, counts.allowed, counts.principals) == (4, 1, 4, 0, 2)
    assert {d: sum(v) for d, v in report.timeline[2].items()} == {"deny": 4}
    assert report.denials_by_principal == (("anonymous", 4),)
    assert [(rule.rule, rule.denials) for rule in report.denial_rules] == [
        ("no allow rule matched (deny by default)", 4)
    ]
    assert [(row.tool, row.count) for row in report.raw] == [("", 3), ("", 1), ("tools/list", 1)]  # every record
    parsed = _parse(render_html(report))
    assert parsed.text["count-calls"] == "4" and parsed.text["count-listings"] == "1"
    assert "unauthenticated \u00d73" in parsed.rows["table-records"][1][5]


# -- in a real browser --------------------------------------------------------------------------

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
CHROMEDRIVER = shutil.which("chromedriver")
browser = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None or importlib.util.find_spec("selenium") is None,
    reason="needs chromium and chromedriver on PATH (Debian: apt-get install chromium chromium-driver) "
    "and selenium (pip install -e '.[dev]')",
)
WIDTH, HEIGHT = 1280, 900


@pytest.fixture(scope="module")
def driver(page: Path) -> Iterator[Any]:
    """Headless Chromium showing the page; selenium never downloads a driver (the path is given)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.support.ui import WebDriverWait

    options = Options()
    assert CHROMIUM is not None and CHROMEDRIVER is not None
    options.binary_location = CHROMIUM
    for argument in (
        "--headless=new",
        "--no-sandbox",
        f"--window-size={WIDTH},{HEIGHT}",
        "--force-device-scale-factor=1",
    ):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    chrome = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    try:
        chrome.get(page.as_uri())
        WebDriverWait(chrome, 30).until(
            lambda d: d.execute_script(
                "return ['chart-timeline', 'chart-denials-principal', 'chart-datasets']"
                ".every(id => document.querySelector('#' + id + ' .main-svg'))"
            )
        )
        yield chrome
    finally:
        chrome.quit()


def _text(chrome: Any, element_id: str) -> str:
    return str(chrome.find_element("id", element_id).text).strip()


@browser
def test_the_page_opens_without_errors_and_shows_the_counts(driver: Any) -> None:
    severe = [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]
    assert severe == []
    assert {key: _text(driver, key) for key in EXPECTED} == EXPECTED
    assert driver.title == "lakegate audit report"


@browser
def test_plotly_drew_every_chart_with_labels_as_text(driver: Any) -> None:
    for chart in ("chart-timeline", "chart-denials-principal", "chart-datasets"):
        assert driver.find_elements("css selector", f"#{chart} .main-svg"), chart
    bars = driver.find_elements("css selector", "#chart-timeline .trace.bars .point")
    assert len(bars) >= 3  # allow, partial and deny: at least one bar each
    legend = {
        e.get_attribute("textContent") for e in driver.find_elements("css selector", "#chart-timeline .legendtext")
    }
    assert legend == {"allow", "partial", "deny"}
    ticks = [
        e.get_attribute("textContent")
        for e in driver.find_elements("css selector", "#chart-denials-principal .xtick text")
    ]
    assert ticks == ["analyst", HTML_PRINCIPAL, "data_steward"]  # plotly did not read <b> as bold


@browser
def test_injected_script_shows_as_text_and_never_runs(driver: Any) -> None:
    from selenium.common.exceptions import NoAlertPresentException

    pre = [e.get_attribute("textContent") for e in driver.find_elements("css selector", "#table-records pre")]
    assert any(INJECTED in text for text in pre)
    assert len(driver.find_elements("css selector", "script")) == 5 and not driver.find_elements("css selector", "img")
    with pytest.raises(NoAlertPresentException):
        _ = driver.switch_to.alert.text


@browser
def test_the_records_filter_hides_rows(driver: Any) -> None:
    def visible() -> list[str]:
        rows = driver.find_elements("css selector", "#table-records tbody tr")
        return [row.get_attribute("data-principal") for row in rows if row.is_displayed()]

    principal = driver.find_element("id", "filter-principal")
    decision = driver.find_element("id", "filter-decision")
    assert len(visible()) == 10
    principal.send_keys("ANALYST")
    assert visible() == ["analyst"] * 5 and _text(driver, "records-shown") == "5"
    decision.send_keys("deny")
    assert len(visible()) == 3 and _text(driver, "records-shown") == "3"
    tool = driver.find_element("id", "filter-tool")
    tool.send_keys("<img")
    assert len(visible()) == 1
    for field in (principal, decision, tool):
        field.clear()
        field.send_keys(" ")  # clear() fires no input event; typing does
    assert len(visible()) == 10 and _text(driver, "records-shown") == "10"


def _png_summary(data: bytes) -> tuple[int, int, float]:
    """(width, height, variance of sampled pixel brightness) of an 8-bit RGB(A) PNG, in pure Python."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    position, chunks, header = 8, [], b""
    while position < len(data):
        length, kind = struct.unpack(">I4s", data[position : position + 8])
        body = data[position + 8 : position + 8 + length]
        assert zlib.crc32(kind + body) == struct.unpack(">I", data[position + 8 + length : position + 12 + length])[0]
        if kind == b"IHDR":
            header = body
        elif kind == b"IDAT":
            chunks.append(body)
        position += 12 + length
    width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", header)
    assert depth == 8 and colour in (2, 6) and interlace == 0
    step = 3 if colour == 2 else 4
    stride = width * step
    raw = zlib.decompress(b"".join(chunks))
    assert len(raw) == height * (stride + 1)
    previous = bytearray(stride)
    total = squares = count = 0
    for y in range(height):
        start = y * (stride + 1)
        kind, line = raw[start], bytearray(raw[start + 1 : start + 1 + stride])
        if kind == 1:
            for i in range(step, stride):
                line[i] = (line[i] + line[i - step]) & 255
        elif kind == 2:
            line = bytearray((a + b) & 255 for a, b in zip(line, previous, strict=True))
        elif kind in (3, 4):
            for i in range(stride):
                a = line[i - step] if i >= step else 0
                b = previous[i]
                if kind == 3:
                    line[i] = (line[i] + ((a + b) >> 1)) & 255
                    continue
                c = previous[i - step] if i >= step else 0
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        previous = line
        if y % 4 == 0:
            for x in range(0, stride, step * 4):
                value = line[x] + line[x + 1] + line[x + 2]
                total, squares, count = total + value, squares + value * value, count + 1
    mean = total / count
    return width, height, squares / count - mean * mean


@browser
def test_full_page_screenshot(driver: Any, tmp_path: Path) -> None:
    width = int(driver.execute_script("return document.documentElement.scrollWidth"))
    height = int(driver.execute_script("return document.documentElement.scrollHeight"))
    assert width <= WIDTH and height > HEIGHT  # the page is longer than the window: a full-page shot
    shot = driver.execute_cdp_cmd(
        "Page.captureScreenshot",
        {
            "format": "png",
            "captureBeyondViewport": True,
            "clip": {"x": 0, "y": 0, "width": width, "height": height, "scale": 1},
        },
    )
    path = tmp_path / "audit-report.png"
    path.write_bytes(base64.b64decode(shot["data"]))
    png_width, png_height, variance = _png_summary(path.read_bytes())
    assert (png_width, png_height) == (width, height)
    assert variance > 100, "the screenshot is blank"
    assert re.fullmatch(r"\d+", _text(driver, "count-calls"))
