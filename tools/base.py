"""What every lakegate tool is made of, and the one result-size convention they all follow.

A tool is a `ToolSpec`: a name, a description (markdown beside this module), a pydantic model of
its arguments, a pydantic model of its result, a handler that gets a `ToolScope` and the validated
arguments, and a compact text rendering of the result. The server registers specs; it alone calls
handlers, and only through the gate.

Result size: list-shaped results return at most `limit` items (capped by the server's row budget)
and at most the server's byte budget, with `truncated` set and a `next_cursor` to continue. Nothing
is ever cut silently.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from importlib import resources
from typing import Annotated, Any, Generic, TypeVar

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, PlainSerializer, WithJsonSchema

from lakegate.errors import InvalidArgument
from lakegate.policies.quotas import ToolFamily
from lakegate.tools.names import ToolName
from lakegate.tools.scope import ToolScope

__all__ = [
    "Page",
    "PageArgs",
    "SnapshotId",
    "ToolArgs",
    "ToolResult",
    "ToolSpec",
    "decode_cursor",
    "encode_cursor",
    "paginate",
]

ArgsT = TypeVar("ArgsT", bound="ToolArgs")
ResultT = TypeVar("ResultT", bound="ToolResult")
ItemT = TypeVar("ItemT", bound=BaseModel)


def _snapshot_id(value: Any) -> Any:
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    return value


#: An Iceberg snapshot id (or Lance version): a 64-bit integer, which JavaScript clients (Claude
#: Desktop, the MCP Inspector) would round if it travelled as a JSON number. So it is sent as a
#: string of digits, and accepted as either.
SnapshotId = Annotated[
    int,
    BeforeValidator(_snapshot_id),
    PlainSerializer(str, return_type=str, when_used="json"),
    WithJsonSchema({"type": "string", "pattern": "^-?[0-9]+$", "description": "64-bit id, as a string of digits."}),
]


class ToolArgs(BaseModel):
    """Base of every tool's arguments: unknown arguments are an error, not silently ignored."""

    # No tool takes infinity or NaN: JSON allows 1e999, SQL and the audit log do not.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class ToolResult(BaseModel):
    model_config = ConfigDict(frozen=True)


class PageArgs(ToolArgs):
    limit: int = Field(default=50, ge=1, le=1000, description="Most items to return in this page.")
    cursor: str | None = Field(
        default=None, description="next_cursor from the previous page, to continue a truncated listing."
    )


class Page(ToolResult):
    truncated: bool = Field(description="True when more items exist; pass next_cursor to get them.")
    next_cursor: str | None = Field(default=None, description="Cursor for the next page, if truncated.")


@dataclass(frozen=True, kw_only=True)
class ToolSpec(Generic[ArgsT, ResultT]):
    """One tool: what the agent sees (name, title, argument and result schemas, the description in
    descriptions/<name>.md, the three MCP hints) and what runs (handler, compact text rendering).

    The hints have no defaults: every tool says whether it only reads, whether it may destroy
    (replace or roll back) data, and whether calling it twice with the same arguments is the same
    as calling it once, so that a client can decide what to confirm with a person.
    """

    name: ToolName
    title: str
    args: type[ArgsT]
    result: type[ResultT]
    handler: Callable[[ToolScope, ArgsT], ResultT]
    render: Callable[[ResultT], str]
    read_only: bool
    destructive: bool
    idempotent: bool
    #: What its calls count against in the caller's quotas (policies/quotas.py).
    family: ToolFamily

    def __post_init__(self) -> None:
        if self.read_only and (self.destructive or not self.idempotent):
            raise ValueError(f"tool {self.name.value}: a read-only tool is neither destructive nor non-idempotent")

    @cached_property
    def description(self) -> str:
        text = resources.files("lakegate.tools").joinpath("descriptions", f"{self.name.value}.md").read_text()
        return text.strip()


def _fingerprint(args: BaseModel) -> str:
    payload = args.model_dump(mode="json", exclude={"cursor", "limit"})
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


#: No result has more rows than this; a cursor past it was not made by lakegate.
MAX_CURSOR_OFFSET = 2**62


def encode_cursor(offset: int, args: BaseModel, pinned: dict[str, Any] | None = None) -> str:
    """A cursor for the page at `offset` of the call `args`; `pinned` keeps state for the next page
    (the snapshots a query read, so that every page reads the same data)."""
    raw = json.dumps({"o": offset, "f": _fingerprint(args), **({"p": pinned} if pinned else {})}).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str, args: BaseModel) -> tuple[int, dict[str, Any]]:
    """The offset and pinned state of a cursor made by `encode_cursor` for the same arguments.

    Raises:
        InvalidArgument: the cursor is malformed or belongs to a call with other arguments.
    """
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        data = json.loads(base64.urlsafe_b64decode(padded))
        offset, fingerprint, pinned = int(data["o"]), str(data["f"]), dict(data.get("p") or {})
    except (ValueError, KeyError, TypeError) as exc:
        raise InvalidArgument(
            "The cursor is not valid.", hint="Pass next_cursor exactly as the previous page returned it."
        ) from exc
    if fingerprint != _fingerprint(args) or not 0 <= offset <= MAX_CURSOR_OFFSET:
        raise InvalidArgument(
            "The cursor belongs to a different call.",
            hint="Repeat the call with the same arguments as the page that gave this cursor.",
        )
    return offset, pinned


def paginate(items: Sequence[ItemT], args: PageArgs, scope: ToolScope) -> tuple[list[ItemT], bool, str | None]:
    """Cut one page from `items` within the row and byte budgets; returns (page, truncated, cursor)."""
    start = decode_cursor(args.cursor, args)[0] if args.cursor else 0
    row_budget = min(args.limit, scope.limits.max_rows)
    page: list[ItemT] = []
    used = 0
    for item in items[start : start + row_budget]:
        size = len(item.model_dump_json())
        if page and used + size > scope.limits.max_bytes:
            break
        page.append(item)
        used += size
    end = start + len(page)
    truncated = end < len(items)
    scope.rows += len(page)
    return page, truncated, encode_cursor(end, args) if truncated else None
