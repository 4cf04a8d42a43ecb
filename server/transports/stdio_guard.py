"""Lines on stdin that the MCP SDK cannot read as JSON-RPC messages: answered and audited here.

The SDK's stdio transport turns such a line (not JSON, nested deeper than its JSON parser allows,
or JSON that is no JSON-RPC message) into an exception that nothing answers, so the client waits
for its timeout. `GuardedStdin` is the stdin lakegate hands the SDK: it checks each line with the
SDK's own parser and passes on only those that parse; for any other it writes an audit record and
a JSON-RPC error (-32700 for a parse error, -32600 for an invalid request) through the SDK's
ordered writer, with the request's id when `scan_envelope` can find it in the raw line.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import os
import re
import time
import uuid
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, BinaryIO, Protocol

import anyio
import anyio.to_thread
import structlog
from mcp.shared.message import SessionMessage
from mcp.types import INVALID_REQUEST, PARSE_ERROR, ErrorData, JSONRPCError, jsonrpc_message_adapter
from pydantic import ValidationError

from lakegate.errors import AuditWriteError, ClientError
from lakegate.server.audit.record_builders import refused_request_record
from lakegate.server.audit.record_model import AuditRecord
from lakegate.server.audit.redaction import loggable
from lakegate.server.gate.identity import Principal, stdio_principal

if TYPE_CHECKING:
    from lakegate.server.app import Runtime

__all__ = [
    "Envelope",
    "GuardedStdin",
    "RefusedLine",
    "UnreadableMessage",
    "check_line",
    "claimed_stdin",
    "logged_prefix",
    "refusal_record",
    "scan_envelope",
]

log = structlog.get_logger(__name__)

#: About how deeply the SDK's JSON parser (pydantic-core) lets objects and arrays nest.
MAX_NESTING = 200
#: How much of a refused line its audit record keeps.
MAX_LOGGED_LINE = 200
#: A top-level "id" or "method" value longer than this is not read.
MAX_ENVELOPE_VALUE = 200

_STRUCTURAL = re.compile(r'["{}\[\],:]')
_QUOTE_OR_ESCAPE = re.compile(r'["\\]')


class MessageSender(Protocol):
    """Where messages to the client go: the write stream `stdio_server` yields."""

    async def send(self, item: SessionMessage, /) -> None: ...


class UnreadableMessage(ClientError):
    """A line that is no JSON-RPC message the server can read; `code` is its JSON-RPC error code
    and `reason` a short name for it (not_json, too_deep, not_jsonrpc)."""

    outcome = "invalid_request"

    def __init__(self, message: str, *, hint: str, code: int, reason: str) -> None:
        super().__init__(message, hint=hint)
        self.code = code
        self.reason = reason


@dataclass(frozen=True)
class Envelope:
    """What a line says about itself, read without parsing it."""

    id: int | str | None  # the request's id; None when absent, unreadable, or not a request
    method: str | None
    depth: int  # the deepest nesting of objects and arrays


@dataclass(frozen=True)
class RefusedLine:
    """A line stdin delivered and the server cannot read, and why."""

    line: str
    envelope: Envelope
    error: UnreadableMessage

    def response(self) -> JSONRPCError:
        """The JSON-RPC error response that answers it."""
        data = {"reason": self.error.reason}
        return JSONRPCError(
            jsonrpc="2.0",
            id=self.envelope.id,
            error=ErrorData(code=self.error.code, message=str(self.error), data=data),
        )


def _string_end(line: str, start: int) -> int | None:
    """Where the string whose content begins at ``start`` ends (after its closing quote), or
    None when it does not end on this line."""
    pos = start
    while (match := _QUOTE_OR_ESCAPE.search(line, pos)) is not None:
        if match.group() == '"':
            return match.end()
        pos = match.start() + 2  # a backslash escapes the next character, a quote included
    return None


def _scalar(text: str | None, kinds: tuple[type, ...]) -> Any:
    """The JSON scalar ``text`` if it is one of ``kinds`` (never a bool), else None."""
    if text is None or not text or len(text) > MAX_ENVELOPE_VALUE:
        return None
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, kinds) and not isinstance(value, bool) else None


def scan_envelope(line: str) -> Envelope:
    """The top-level "id" and "method" of a JSON-RPC line and how deeply it nests.

    A scanner that tracks only string state and depth, without recursion, so that nesting too deep
    for a parser does not stop it, and whether the id comes first (Python clients) or last
    (JavaScript ones); an "id" inside the arguments is deeper than the top-level object and does
    not count. The id is kept only beside a "method": the id of a client's unreadable response
    names one of the server's requests, not one the client is waiting on.
    """
    depth = max_depth = 0
    in_object = False  # the top-level value is an object
    key: str | None = None  # the raw top-level key whose value is being read
    value_start = -1  # where that value starts; -1 while a key is expected
    nested = False  # the value holds an object or array, so it is no id or method
    found: dict[str, str] = {}

    def finish(end: int) -> None:
        if key is not None and value_start >= 0 and not nested and len(key) <= MAX_ENVELOPE_VALUE:
            name = _scalar(key, (str,))
            if name in ("id", "method"):
                found[name] = line[value_start:end].strip()

    pos = 0
    while (match := _STRUCTURAL.search(line, pos)) is not None:
        at, char = match.start(), match.group()
        pos = at + 1
        if char == '"':
            end = _string_end(line, pos)
            if end is None:
                break  # an unterminated string: nothing after it can be read
            if depth == 1 and in_object and value_start < 0:
                key = line[at:end]
            pos = end
        elif char in "{[":
            if depth == 0:
                if max_depth > 0:
                    break  # a second top-level value
                in_object = char == "{"
            elif depth == 1:
                nested = True
            depth += 1
            max_depth = max(max_depth, depth)
        elif char in "}]":
            if depth == 1 and in_object:
                finish(at)
            depth = max(depth - 1, 0)
            if depth == 0:
                break
        elif depth == 1 and in_object:
            if char == ":" and value_start < 0:
                value_start, nested = pos, False
            elif char == ",":
                finish(at)
                key, value_start = None, -1
    if depth == 1 and in_object:
        finish(len(line))  # a line cut short may still hold a whole last value
    method = _scalar(found.get("method"), (str,))
    ident = _scalar(found.get("id"), (int, str)) if method is not None else None
    return Envelope(id=ident, method=method, depth=max_depth)


def _unreadable(exc: Exception, envelope: Envelope) -> UnreadableMessage:
    errors = exc.errors(include_url=False, include_input=False) if isinstance(exc, ValidationError) else []
    first: Mapping[str, Any] = errors[0] if errors else {}
    if first.get("type") == "json_invalid":
        detail = str(first.get("ctx", {}).get("error") or first.get("msg"))
        if "recursion limit" in detail:
            return UnreadableMessage(
                f"Invalid request: the message is nested too deeply ({envelope.depth} levels of objects and "
                f"arrays; the limit is about {MAX_NESTING}).",
                hint="Flatten the arguments (fewer levels of nested lists and objects) and send the request again.",
                code=INVALID_REQUEST,
                reason="too_deep",
            )
        return UnreadableMessage(
            f"Parse error: the line is not valid JSON ({detail}).",
            hint="Send one JSON-RPC message per line, as UTF-8 JSON without line breaks inside it.",
            code=PARSE_ERROR,
            reason="not_json",
        )
    where = ".".join(str(part) for part in first.get("loc", ())[1:])
    detail = f" ({where + ': ' if where else ''}{first['msg']})" if "msg" in first else ""
    return UnreadableMessage(
        f"Invalid request: the line is JSON but not a JSON-RPC 2.0 message{detail[:MAX_LOGGED_LINE]}.",
        hint='Send an object with "jsonrpc": "2.0", a "method", and an "id" for a request.',
        code=INVALID_REQUEST,
        reason="not_jsonrpc",
    )


def check_line(line: str) -> RefusedLine | None:
    """None when the SDK can read ``line`` as a JSON-RPC message; otherwise why it cannot."""
    line = line.rstrip("\r\n")  # JSON whitespace: it changes no verdict, only the positions in messages
    try:
        # The same call the SDK's stdio reader makes, so a line passed on is one it reads.
        jsonrpc_message_adapter.validate_json(line, by_name=False)
    except Exception as exc:  # anything the SDK's reader would turn into an unanswered exception
        envelope = scan_envelope(line)
        return RefusedLine(line, envelope, _unreadable(exc, envelope))
    return None


def logged_prefix(line: str, sensitive: Iterable[str]) -> str:
    """The start of a refused line as its audit record may hold it: at most `MAX_LOGGED_LINE`
    characters, cut before the tool's arguments (their values may be personal data, which the gate
    would have logged only as keyed hashes) and before the first key named like a sensitive one."""
    prefix = line[:MAX_LOGGED_LINE]
    lowered = prefix.lower()
    cuts = [at for name in (*sensitive, "arguments") if (at := lowered.find(f'"{name.lower()}"')) >= 0]
    return loggable(prefix[: min(cuts)] if cuts else prefix)


def refusal_record(
    refused: RefusedLine,
    principal: Principal,
    *,
    policy_version: str,
    sensitive: Iterable[str] | None,
    duration_s: float,
) -> AuditRecord:
    """The audit record of a refused line: the gate's record shape, decision `deny`, outcome
    `invalid_request`, with the line's id, method and start (none of it when ``sensitive`` is None:
    every value is sensitive then)."""
    envelope = refused.envelope
    method = loggable(envelope.method[:MAX_LOGGED_LINE]) if envelope.method is not None else None
    request_id = envelope.id if envelope.id is None or isinstance(envelope.id, int) else loggable(envelope.id)
    return refused_request_record(
        request_id=str(request_id) if request_id is not None else uuid.uuid4().hex,
        session_id=None,
        principal=principal.name,
        roles=principal.roles,
        authenticated_by=principal.authenticated_by,
        transport="stdio",
        policy_version=policy_version,
        duration_s=duration_s,
        outcome=refused.error.outcome,
        error=str(refused.error),
        details={
            "reason": refused.error.reason,
            "jsonrpc": {
                "id": request_id,
                "method": method,
                "depth": envelope.depth,
                "line_chars": len(refused.line),
                "line_prefix": logged_prefix(refused.line, sensitive) if sensitive is not None else None,
            },
        },
    )


@contextlib.contextmanager
def claimed_stdin() -> Iterator[BinaryIO]:
    """The wire's stdin on a private descriptor, with fd 0 reading the null device meanwhile.

    What the SDK's `stdio_server` does for a stdin it opens itself (and skips for one it is
    given): a handler or child process that reads fd 0 gets EOF instead of a client's request.

    Raises:
        OSError: fd 0 is not open.
    """
    wire = fcntl.fcntl(0, fcntl.F_DUPFD_CLOEXEC, 3)
    null = os.open(os.devnull, os.O_RDONLY)
    try:
        os.dup2(null, 0)
    finally:
        os.close(null)
    try:
        # closefd=False: a reader thread may still block on the descriptor after serving ends.
        yield os.fdopen(wire, "rb", closefd=False)
    finally:
        os.dup2(wire, 0)


class GuardedStdin(anyio.AsyncFile[str]):
    """The lines of stdin that the SDK can read; every other one is audited and answered here.

    Answers go through `reply_through`'s stream (the SDK's ordered stdout writer), so that they
    never interleave with another message. Blank lines are skipped: they are no message.
    """

    def __init__(self, wire: BinaryIO, runtime: Runtime, principal_name: str | None) -> None:
        super().__init__(io.TextIOWrapper(wire, encoding="utf-8", errors="replace"))
        self._runtime = runtime
        self._principal_name = principal_name
        self._replies: MessageSender | None = None
        self._replies_set = anyio.Event()

    def reply_through(self, write_stream: MessageSender) -> None:
        """Where answers to refused lines are sent: the stream the server writes its messages to."""
        self._replies = write_stream
        self._replies_set.set()

    async def __aiter__(self) -> AsyncIterator[str]:
        async for line in super().__aiter__():
            if not line.strip():
                continue
            started = time.perf_counter()
            refused = check_line(line)
            if refused is None:
                yield line
                continue
            # The record first: once answered, the client may read the log.
            await self._audit(refused, time.perf_counter() - started)
            await self._replies_set.wait()
            assert self._replies is not None
            with contextlib.suppress(anyio.ClosedResourceError, anyio.BrokenResourceError):
                await self._replies.send(SessionMessage(refused.response()))  # unless the server has stopped

    async def _audit(self, refused: RefusedLine, duration_s: float) -> None:
        runtime = self._runtime
        rules = runtime.enforcer.redaction
        sensitive = None if rules.everything else (*rules.arguments, *runtime.settings.audit.sensitive_arguments)
        record = refusal_record(
            refused,
            stdio_principal(self._principal_name, runtime.enforcer),
            policy_version=runtime.enforcer.version,
            sensitive=sensitive,
            duration_s=duration_s,
        )
        try:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(runtime.audit.append, record.model_dump())
        except AuditWriteError as exc:
            log.error("audit.write_failed", tool=None, error=repr(exc.__cause__))
        log.warning("stdio.unreadable_line", reason=refused.error.reason, id=refused.envelope.id)
