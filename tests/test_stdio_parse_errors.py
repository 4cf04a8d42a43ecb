"""Lines the SDK cannot read over stdio get a JSON-RPC error and an audit record (server/stdio_guard.py)."""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import pytest
from mcp.types import INVALID_REQUEST, LATEST_PROTOCOL_VERSION, PARSE_ERROR

from lakegate.evals.mcp_client import REPO, server_params
from lakegate.server.audit.log import read_records, verify
from lakegate.server.transports.stdio_guard import MAX_LOGGED_LINE, check_line, logged_prefix, scan_envelope


def nested(levels: int) -> str:
    return "[" * levels + "]" * levels


def call_line(ident: Any, arguments: str, *, id_last: bool = False) -> str:
    """A tools/call line written by hand, with the id first (Python SDK) or last (JavaScript)."""
    body = f'"method":"tools/call","params":{{"name":"query","arguments":{arguments}}}'
    head = json.dumps(ident)
    return '{"jsonrpc":"2.0",' + (f'{body},"id":{head}}}' if id_last else f'"id":{head},{body}}}')


# -- the scanner ----------------------------------------------------------------------------------


def test_scanner_finds_the_top_level_id_first_or_last() -> None:
    deep = '{"sql":"select 1","x":' + nested(300) + "}"
    assert scan_envelope(call_line(7, deep)).id == 7
    assert scan_envelope(call_line("req-9", deep, id_last=True)).id == "req-9"
    envelope = scan_envelope(call_line(7, deep))
    assert envelope.method == "tools/call" and envelope.depth == 303


def test_scanner_is_not_fooled_by_ids_inside_arguments_or_strings() -> None:
    arguments = '{"id":99,"rows":[{"id":98}],"note":"\\"id\\": 97, }","sql":"select \'{\'"}'
    assert scan_envelope(call_line(5, arguments, id_last=True)).id == 5
    assert scan_envelope(call_line(5, arguments)).id == 5
    # "id" as a value, not a key, and an escaped backslash before a closing quote
    assert scan_envelope('{"jsonrpc":"2.0","x":"id","y":"a\\\\","method":"ping","id":3}').id == 3


def test_scanner_without_recursion_reads_any_depth() -> None:
    line = '{"jsonrpc":"2.0","method":"tools/call","params":' + '{"a":' * 50_000 + "1" + "}" * 50_000 + ',"id":4}'
    envelope = scan_envelope(line)
    assert envelope.id == 4 and envelope.depth == 50_001


@pytest.mark.parametrize(
    "line",
    [
        '{"jsonrpc":"2.0","id":3,"result":' + nested(300) + "}",  # a response: its id is the server's
        '{"jsonrpc":"2.0","id":true,"method":"ping"}',
        '{"jsonrpc":"2.0","id":1.5,"method":"ping"}',
        '{"jsonrpc":"2.0","id":{"n":1},"method":"ping"}',
        '[{"jsonrpc":"2.0","id":1,"method":"ping"}]',
        '{"jsonrpc":"2.0","params":{"id":1,"method":"ping"}}',
        "not json at all",
        "",
    ],
)
def test_scanner_gives_no_id_when_there_is_no_request_id(line: str) -> None:
    assert scan_envelope(line).id is None


def test_scanner_reads_a_line_cut_short() -> None:
    assert scan_envelope('{"jsonrpc":"2.0","method":"tools/call","id":12').id == 12
    assert scan_envelope('{"jsonrpc":"2.0","id":12,"method":"tools/call","params":{"name":"qu').id == 12
    assert scan_envelope('{"jsonrpc":"2.0","id":12,"method":"tools/ca').id is None  # no whole method


def test_check_line_passes_what_the_sdk_reads_and_classifies_the_rest() -> None:
    assert check_line(call_line(1, '{"sql":"select 1"}') + "\n") is None
    deep = check_line(call_line(2, '{"x":' + nested(300) + "}"))
    assert deep is not None and deep.error.code == INVALID_REQUEST and deep.error.reason == "too_deep"
    assert "nested too deeply" in str(deep.error) and "about 200" in str(deep.error) and "Flatten" in str(deep.error)
    broken = check_line('{"jsonrpc":"2.0","id":3,"method":"tools/call",\n')
    assert broken is not None and broken.error.code == PARSE_ERROR and broken.envelope.id == 3
    assert "line 1" in str(broken.error)  # the newline is not part of the message
    other = check_line('{"jsonrpc":"1.0","id":4,"method":"ping"}')
    assert other is not None and other.error.code == INVALID_REQUEST and other.error.reason == "not_jsonrpc"
    assert "jsonrpc" in str(other.error)
    response = deep.response()
    assert response.id == 2 and response.error.code == INVALID_REQUEST and response.error.data == {"reason": "too_deep"}


def test_logged_prefix_is_short_and_stops_before_arguments_and_sensitive_keys() -> None:
    line = call_line(1, '{"sql":"select 1","Password":"hunter2","x":' + nested(300) + "}")
    prefix = logged_prefix(line, ("password", "token"))
    assert '"method":"tools/call"' in prefix and "select 1" not in prefix and "hunter2" not in prefix
    assert logged_prefix('{"jsonrpc":"2.0","id":1,"token":"abc","method":"x"}', ("token",)) == (
        '{"jsonrpc":"2.0","id":1,'
    )
    long = logged_prefix('{"jsonrpc":"2.0","id":1,"method":"x","params":{"x":' + nested(300) + "}}", ())
    assert len(long) == MAX_LOGGED_LINE
    assert logged_prefix('{"a":"\ud800"}', ()) == '{"a":"\\ud800"}'  # a lone surrogate stays visible


def test_claimed_stdin_serves_the_wire_and_gives_fd_0_eof() -> None:
    script = (
        "import os\n"
        "from lakegate.server.transports.stdio_guard import claimed_stdin\n"
        "with claimed_stdin() as wire:\n"
        "    print(repr(os.read(0, 10)), repr(wire.readline()))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], input=b"hello\n", capture_output=True, cwd=REPO, timeout=60, check=True
    )
    assert done.stdout.decode().split() == ["b''", "b'hello\\n'"]


# -- the real server over pipes -------------------------------------------------------------------


class RawClient:
    """A `lakegate serve` subprocess driven by writing raw lines to its stdin."""

    def __init__(self, process: subprocess.Popen[bytes]) -> None:
        assert process.stdin is not None and process.stdout is not None
        self.process = process
        self.stdin: IO[bytes] = process.stdin
        self.lines: queue.Queue[bytes] = queue.Queue()
        threading.Thread(target=self._read, args=(process.stdout,), daemon=True).start()

    def _read(self, stdout: IO[bytes]) -> None:
        for line in stdout:
            self.lines.put(line)

    def send(self, line: str) -> None:
        self.stdin.write(line.encode() + b"\n")
        self.stdin.flush()

    def receive(self, timeout: float) -> dict[str, Any]:
        return dict(json.loads(self.lines.get(timeout=timeout)))

    def request(self, ident: int, method: str, params: dict[str, Any], timeout: float = 120) -> dict[str, Any]:
        self.send(json.dumps({"jsonrpc": "2.0", "id": ident, "method": method, "params": params}))
        return self.receive(timeout)


@pytest.fixture
def raw_server(demo_home: Path, audit_path: Path) -> Iterator[RawClient]:
    params = server_params("analyst", demo_home, LAKEGATE_AUDIT__PATH=str(audit_path))
    process = subprocess.Popen(
        [params.command, *params.args],
        env=params.env,
        cwd=params.cwd,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    client = RawClient(process)
    try:
        hello = {
            "protocolVersion": LATEST_PROTOCOL_VERSION,
            "capabilities": {},
            "clientInfo": {"name": "raw", "version": "1"},
        }
        assert "result" in client.request(0, "initialize", hello)
        client.send('{"jsonrpc":"2.0","method":"notifications/initialized"}')
        yield client
    finally:
        client.stdin.close()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def test_unreadable_lines_are_answered_audited_and_the_server_keeps_serving(
    raw_server: RawClient, audit_path: Path
) -> None:
    deep = '{"sql":"select 1","x":' + nested(300) + "}"
    started = time.monotonic()
    raw_server.send(call_line(7, deep))
    too_deep = raw_server.receive(timeout=10)
    assert time.monotonic() - started < 10
    assert too_deep["id"] == 7 and too_deep["error"]["code"] == INVALID_REQUEST
    assert "nested too deeply" in too_deep["error"]["message"] and "Flatten" in too_deep["error"]["message"]

    # JavaScript order, with "id" keys of its own inside the arguments
    raw_server.send(call_line("js-1", '{"id":99,"rows":[{"id":98}],"x":' + nested(300) + "}", id_last=True))
    js = raw_server.receive(timeout=10)
    assert js["id"] == "js-1" and js["error"]["code"] == INVALID_REQUEST

    raw_server.send("{this is not json")
    broken = raw_server.receive(timeout=10)
    assert broken["id"] is None and broken["error"]["code"] == PARSE_ERROR
    assert "not valid JSON" in broken["error"]["message"]

    raw_server.send("")  # a blank line is no message: no answer, so the next answer is the call's
    after = raw_server.request(8, "tools/call", {"name": "query", "arguments": {"sql": "select 1 as one"}})
    assert after["id"] == 8 and after["result"]["isError"] is False, after

    records = list(read_records(audit_path))
    assert [(r["outcome"], r["request_id"]) for r in records] == [
        ("invalid_request", "7"),
        ("invalid_request", "js-1"),
        ("invalid_request", records[2]["request_id"]),
        ("ok", "8"),
    ]
    refused = records[0]
    assert refused["decision"] == "deny" and refused["principal"] == "analyst" and refused["transport"] == "stdio"
    assert refused["tool"] is None and refused["arguments"] == {} and "role:analyst" in refused["roles"]
    jsonrpc = refused["details"]["jsonrpc"]
    assert jsonrpc["id"] == 7 and jsonrpc["method"] == "tools/call" and jsonrpc["depth"] == 303
    assert len(jsonrpc["line_prefix"]) <= MAX_LOGGED_LINE and jsonrpc["line_chars"] > 600
    assert '"arguments"' not in jsonrpc["line_prefix"]  # argument values never reach the log raw
    assert records[2]["details"] == {
        "reason": "not_json",
        "jsonrpc": {"id": None, "method": None, "depth": 1, "line_chars": 17, "line_prefix": "{this is not json"},
    }
    assert verify(audit_path).ok
