"""The MCP surface beyond tools and resources: prompts, completions, subscriptions, logging level.

Every handler here answers through the gate (`Gate.request` or an audited listing): the caller's
policy decides what it lists, completes or lets it subscribe to, and each request leaves an audit
record. `create_server` (server/app.py) passes these handlers to the SDK's `Server`.

Change notifications follow the protocol version the client negotiated. Up to 2025-11-25 a client
sends `resources/subscribe` per dataset. From 2026-07-28 on it opens a `subscriptions/listen`
stream with a filter; lakegate honours only the dataset URIs the caller may read (the others are
left out of the acknowledgement, unknown and hidden alike), and for `tools`, `prompts` and
`resources` list changes it re-computes what this caller may see whenever the policy version
changes, and notifies only when that differs. Either way, a dataset update reaches a subscriber
only after the policy is asked again (server/subscriptions.py).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

import anyio
import anyio.to_thread
from anyio.streams.memory import MemoryObjectSendStream
from mcp.server.context import ServerRequestContext
from mcp.shared.exceptions import MCPError
from mcp.shared.subscriptions import (
    SUBSCRIPTION_ID_META_KEY,
    PromptsListChanged,
    ResourcesListChanged,
    ResourceUpdated,
    ServerEvent,
    ToolsListChanged,
    event_to_notification,
)
from mcp.types import (
    INTERNAL_ERROR,
    INVALID_PARAMS,
    CompleteRequestParams,
    CompleteResult,
    Completion,
    EmptyResult,
    GetPromptRequestParams,
    GetPromptResult,
    ListPromptsResult,
    PaginatedRequestParams,
    Prompt,
    PromptArgument,
    PromptMessage,
    PromptReference,
    SetLevelRequestParams,
    SubscribeRequestParams,
    SubscriptionFilter,
    SubscriptionsAcknowledgedNotification,
    SubscriptionsAcknowledgedNotificationParams,
    SubscriptionsListenRequestParams,
    SubscriptionsListenResult,
    TextContent,
    UnsubscribeRequestParams,
)
from mcp_types.version import MODERN_PROTOCOL_VERSIONS
from pydantic import BaseModel

from lakegate.errors import ClientError, InvalidArgument, LakegateError, NotFound, ServerError
from lakegate.policies.resources import prompt_resource, tool_resource
from lakegate.server.gate.gate import Gate
from lakegate.server.gate.identity import CallOrigin, Principal
from lakegate.server.gate.scope import CallScope
from lakegate.server.subscriptions import Subscriptions
from lakegate.tools.names import ToolName
from lakegate.tools.prompts import ALL_PROMPTS, PromptSpec, complete_argument, prompts_by_name

__all__ = ["DATASET_URI", "ListWatchers", "dataset_of_uri", "mcp_error", "subscribable", "surface_handlers"]

DATASET_URI = "lakegate://datasets/{name}"
_DATASET_PREFIX = DATASET_URI.split("{", 1)[0]

AnswerT = TypeVar("AnswerT")
Context = ServerRequestContext[Any, Any]
CallerOf = Callable[[Context], tuple[Principal, CallOrigin]]
#: The longest typed text a completion looks at (and its audit record keeps).
MAX_TYPED = 200
#: How often the list watchers (listen streams, 2025 sessions) check the policy version.
POLICY_CHECK_S = 2.0
#: Dataset URIs one listen stream may name, and events it may hold unsent before it is ended.
MAX_LISTEN_URIS = 100
#: The longest URI a subscription takes (dataset names are short; a longer one names nothing).
MAX_URI_CHARS = 300
MAX_BUFFERED_EVENTS = 256
#: Writes the audit record of a listing (method, principal, items listed, result, start time).
AuditListing = Callable[[Context, str, Principal, int, BaseModel, float], Awaitable[None]]


def dataset_of_uri(uri: str) -> str | None:
    """The dataset a `lakegate://datasets/{name}` URI names; None for any other URI."""
    return uri[len(_DATASET_PREFIX) :] or None if uri.startswith(_DATASET_PREFIX) else None


def mcp_error(error: LakegateError) -> MCPError:
    """The JSON-RPC error for a refused or failed request: the agent's mistake as invalid params,
    with what to do instead; lakegate's own failure as an internal error that hides the details."""
    if isinstance(error, ClientError):
        return MCPError(code=INVALID_PARAMS, message=str(error))
    public = type(error).public_message if isinstance(error, ServerError) else "internal error"
    return MCPError(code=INTERNAL_ERROR, message=public)


def visible_prompts(scope: CallScope) -> list[PromptSpec]:
    """The prompts this caller may get: granted `prompt:<name>`, and allowed every tool it teaches."""
    return [
        spec
        for spec in ALL_PROMPTS
        if scope.decide(prompt_resource(spec.name), "get").allowed
        and all(scope.decide(tool_resource(tool.value), "call").allowed for tool in spec.tools)
    ]


def _visible_prompt(scope: CallScope, name: str) -> PromptSpec:
    """Raises: NotFound: no such prompt, or not one this caller may get (the same answer)."""
    for spec in visible_prompts(scope):
        if spec.name == name:
            scope.record("prompt", name, "get")
            return spec
    if name in prompts_by_name():  # the record says a policy refused it; a missing one is just missing
        scope.record("prompt", name, "denied")
    raise NotFound(f"There is no prompt named '{name[:64]}' available to you.", hint="List the prompts.")


def mcp_prompt(spec: PromptSpec) -> Prompt:
    return Prompt(
        name=spec.name,
        title=spec.title,
        description=spec.description,
        arguments=[PromptArgument(name=a.name, description=a.description, required=a.required) for a in spec.arguments],
    )


def surface_handlers(
    gate: Gate, caller_of: CallerOf, audit_listing: AuditListing, subscriptions: Subscriptions, watchers: ListWatchers
) -> dict[str, Any]:
    """The SDK `Server` keyword arguments for prompts, completions, subscriptions and logging."""

    async def list_prompts(ctx: Context, params: PaginatedRequestParams | None) -> ListPromptsResult:
        started = time.perf_counter()
        principal, origin = caller_of(ctx)
        await watchers.watch_session(ctx, origin.session_id, principal)
        result = ListPromptsResult(prompts=[mcp_prompt(spec) for spec in visible_prompts(gate.scope(principal))])
        await audit_listing(ctx, "prompts/list", principal, len(result.prompts), result, started)
        return result

    async def get_prompt(ctx: Context, params: GetPromptRequestParams) -> GetPromptResult:
        principal, origin = caller_of(ctx)
        values = dict(params.arguments or {})

        def answer(scope: CallScope) -> GetPromptResult:
            spec = _visible_prompt(scope, params.name)
            text = spec.render(scope, values)
            scope.rows = 1
            message = PromptMessage(role="user", content=TextContent(type="text", text=text))
            return GetPromptResult(description=spec.description, messages=[message])

        arguments = {"name": params.name, "arguments": values}
        return await _answered(gate.request("prompts/get", arguments, principal, origin, answer, size=_size))

    async def complete(ctx: Context, params: CompleteRequestParams) -> CompleteResult:
        principal, origin = caller_of(ctx)
        ref = params.ref
        typed = params.argument.value[:MAX_TYPED]

        def answer(scope: CallScope) -> CompleteResult:
            values: list[str] = []
            total = 0
            if isinstance(ref, PromptReference):
                spec = next((s for s in visible_prompts(scope) if s.name == ref.name), None)
                arg = next((a for a in spec.arguments if a.name == params.argument.name), None) if spec else None
                if arg is not None:
                    values, total = complete_argument(scope, arg.kind, typed)
            elif (
                # A dataset resource is describe_dataset's answer: nothing to offer a caller who may not call it.
                ref.uri == DATASET_URI
                and params.argument.name == "name"
                and scope.decide(tool_resource(ToolName.DESCRIBE_DATASET.value), "call").allowed
            ):
                values, total = complete_argument(scope, "dataset", typed)
            scope.rows = len(values)
            return CompleteResult(completion=Completion(values=values, total=total, has_more=total > len(values)))

        target = ref.name if isinstance(ref, PromptReference) else ref.uri
        # Keyed by the argument's name, so that the redaction rules hash a sensitive one (api_key).
        arguments = {"ref": target[:MAX_URI_CHARS], "argument": {params.argument.name[:64]: typed}}
        return await _answered(gate.request("completion/complete", arguments, principal, origin, answer, size=_size))

    async def subscribe(ctx: Context, params: SubscribeRequestParams) -> EmptyResult:
        principal, origin = caller_of(ctx)
        uri = str(params.uri)

        def answer(scope: CallScope) -> str:
            named = dataset_of_uri(uri)
            if named is None:
                raise NotFound(f"Unknown resource {uri[:200]}; lakegate serves {DATASET_URI}.")
            if subscribable(scope, uri) is None:
                raise NotFound(f"No dataset named '{named[:200]}' is available to you.", hint="List the resources.")
            return named

        await _answered(gate.request("resources/subscribe", {"uri": uri}, principal, origin, answer))
        subscriptions.add(uri, origin.session_id, ctx.session, principal)
        return EmptyResult()

    async def unsubscribe(ctx: Context, params: UnsubscribeRequestParams) -> EmptyResult:
        principal, origin = caller_of(ctx)
        uri = str(params.uri)

        def answer(scope: CallScope) -> bool:
            removed = subscriptions.remove(uri, origin.session_id)
            scope.rows = int(removed)
            return removed

        await _answered(gate.request("resources/unsubscribe", {"uri": uri}, principal, origin, answer))
        return EmptyResult()

    async def listen(ctx: Context, params: SubscriptionsListenRequestParams) -> SubscriptionsListenResult:
        principal, origin = caller_of(ctx)
        wanted = params.notifications
        uris = [str(uri) for uri in (wanted.resource_subscriptions or ())]

        def answer(scope: CallScope) -> list[str]:
            if ctx.request_id is None:
                raise InvalidArgument("subscriptions/listen needs a request id.")
            if len(uris) > MAX_LISTEN_URIS:
                raise InvalidArgument(f"Listen to at most {MAX_LISTEN_URIS} datasets per stream.")
            honored = [uri for uri in dict.fromkeys(uris) if subscribable(scope, uri) is not None]
            scope.rows = len(honored)
            return honored

        lists = {
            kind
            for kind, asked in (
                ("tools", wanted.tools_list_changed),
                ("prompts", wanted.prompts_list_changed),
                ("resources", wanted.resources_list_changed),
            )
            if asked
        }
        arguments = {"resource_subscriptions": [uri[:MAX_URI_CHARS] for uri in uris], "list_changes": sorted(lists)}
        honored = await _answered(gate.request("subscriptions/listen", arguments, principal, origin, answer))
        meta: dict[str, Any] = {SUBSCRIPTION_ID_META_KEY: ctx.request_id}
        acknowledged = SubscriptionFilter(
            tools_list_changed=True if "tools" in lists else None,
            prompts_list_changed=True if "prompts" in lists else None,
            resources_list_changed=True if "resources" in lists else None,
            resource_subscriptions=honored or None,
        )
        send, receive = anyio.create_memory_object_stream[ServerEvent](MAX_BUFFERED_EVENTS)
        sink = _StreamSink(send)
        stream_key = f"listen/{uuid.uuid4().hex}"  # request ids repeat across clients and sessions
        for uri in honored:
            subscriptions.add(uri, stream_key, sink, principal)
        try:
            if lists:
                await watchers.watch(stream_key, principal, frozenset(lists), sink.list_changed)
            ack = SubscriptionsAcknowledgedNotificationParams(notifications=acknowledged, _meta=meta)
            await ctx.session.send_notification(
                SubscriptionsAcknowledgedNotification(params=ack), related_request_id=ctx.request_id
            )
            async for event in receive:
                notification = event_to_notification(event, meta)
                await ctx.session.send_notification(notification, related_request_id=ctx.request_id)
        finally:
            watchers.unwatch(stream_key)
            for uri in honored:
                subscriptions.remove(uri, stream_key)
            send.close()
            receive.close()
        return SubscriptionsListenResult(_meta=meta)

    async def set_logging_level(ctx: Context, params: SetLevelRequestParams) -> EmptyResult:
        # lakegate sends no log notifications (its diagnostics go to stderr and never carry data
        # values), so any level is accepted and nothing changes; the request is audited all the same.
        principal, origin = caller_of(ctx)
        await _answered(gate.request("logging/setLevel", {"level": params.level}, principal, origin, lambda _: None))
        return EmptyResult()

    return {
        "on_list_prompts": list_prompts,
        "on_get_prompt": get_prompt,
        "on_completion": complete,
        "on_subscribe_resource": subscribe,
        "on_unsubscribe_resource": unsubscribe,
        "on_subscriptions_listen": listen,
        "on_set_logging_level": set_logging_level,
    }


def subscribable(scope: CallScope, uri: str) -> str | None:
    """The dataset `uri` names when the caller may hear of its changes (a dataset that exists and
    that it may describe and read), else None: unknown and hidden datasets alike. A refused
    existing dataset is recorded as denied."""
    name = dataset_of_uri(uri) if len(uri) <= MAX_URI_CHARS else None
    if name is None or not scope.decide(tool_resource(ToolName.DESCRIBE_DATASET.value), "call").allowed:
        return None
    try:
        scope.dataset_kind(name)  # before the policy: no decision is taken (or cached) on a made-up name
    except NotFound:
        return None
    if not scope.decide(name, "read").allowed:
        scope.record("dataset", name, "denied")
        return None
    scope.record("dataset", name, "subscribe")
    return name


class _StreamSink:
    """A listen stream as a subscriber of server/subscriptions.py: updates go into its buffer; a
    full buffer (a client that stopped reading) raises, and the registry drops the subscription."""

    def __init__(self, send: MemoryObjectSendStream[ServerEvent]) -> None:
        self._send = send

    async def send_resource_updated(self, uri: str) -> None:
        self._send.send_nowait(ResourceUpdated(uri=uri))

    async def list_changed(self, kind: str) -> None:
        self._send.send_nowait(_LIST_EVENTS[kind])


def _views(gate: Gate, principal: Principal) -> dict[str, frozenset[str]]:
    """What this caller may list now: tool names, prompt names, dataset resources."""
    scope = gate.scope(principal)
    may_describe = scope.decide(tool_resource(ToolName.DESCRIBE_DATASET.value), "call").allowed
    return {
        "tools": frozenset(spec.name.value for spec in gate.visible_tools(principal)),
        "prompts": frozenset(spec.name for spec in visible_prompts(scope)),
        "resources": frozenset(scope.readable_datasets() if may_describe else ()),
    }


_LIST_EVENTS: dict[str, ServerEvent] = {
    "tools": ToolsListChanged(),
    "prompts": PromptsListChanged(),
    "resources": ResourcesListChanged(),
}


#: What a watcher may be told has changed, as `_views` names them.
LIST_KINDS = frozenset(("tools", "prompts", "resources"))


@dataclass
class _Watcher:
    principal: Principal
    kinds: frozenset[str]
    tell: Callable[[str], Awaitable[None]]  # called with a kind whose list changed
    version: str  # the policy version `seen` was taken at (read before it)
    seen: dict[str, frozenset[str]]


class ListWatchers:
    """Who is told when a policy change alters what its principal may list: 2026 listen streams
    that asked for it (`watch`), and sessions of protocol 2025-11-25 and earlier that listed tools,
    prompts or resources (`watch_session`). `run` is the one watcher loop, for the server's
    lifespan: at each policy version it re-computes each watcher's lists and tells it what differs;
    a watcher that cannot be told any more is dropped."""

    def __init__(self, gate: Gate) -> None:
        self._gate = gate
        self._watchers: dict[str, _Watcher] = {}

    async def watch(
        self, key: str, principal: Principal, kinds: frozenset[str], tell: Callable[[str], Awaitable[None]]
    ) -> None:
        """Watch from now on (what `principal` may list now is the baseline), once per key."""
        if key not in self._watchers:
            version, seen = await anyio.to_thread.run_sync(self._versioned_views, principal)
            self._watchers[key] = _Watcher(principal, kinds, tell, version, seen)

    async def watch_session(self, ctx: Context, key: str, principal: Principal) -> None:
        """Watch a handshake-era session (2026 sessions listen instead)."""
        if ctx.protocol_version not in MODERN_PROTOCOL_VERSIONS:
            await self.watch(key, principal, LIST_KINDS, partial(_tell_session, ctx.session))

    def unwatch(self, key: str) -> None:
        self._watchers.pop(key, None)

    def _version(self) -> str:  # may reload the policy files: called off the event loop
        return self._gate.enforcer.version

    def _versioned_views(self, principal: Principal) -> tuple[str, dict[str, frozenset[str]]]:
        # The version first: a reload between the two is then seen as a change at the next check.
        return self._version(), _views(self._gate, principal)

    async def run(self) -> None:
        while True:
            await anyio.sleep(POLICY_CHECK_S)
            latest = await anyio.to_thread.run_sync(self._version)
            for key, watcher in list(self._watchers.items()):
                if watcher.version == latest:
                    continue
                version, now = await anyio.to_thread.run_sync(self._versioned_views, watcher.principal)
                changed = sorted(kind for kind in watcher.kinds if now[kind] != watcher.seen[kind])
                watcher.version, watcher.seen = version, now
                try:
                    for kind in changed:
                        await watcher.tell(kind)
                except Exception:  # the client went away, or stopped reading
                    self.unwatch(key)


async def _tell_session(session: Any, kind: str) -> None:
    if kind == "tools":
        await session.send_tool_list_changed()
    elif kind == "prompts":
        await session.send_prompt_list_changed()
    else:
        await session.send_resource_list_changed()


async def _answered(pending: Awaitable[AnswerT]) -> AnswerT:
    """The gate's answer, or its refusal as an MCP error."""
    try:
        return await pending
    except LakegateError as exc:
        raise mcp_error(exc) from exc


def _size(result: BaseModel) -> int:
    return len(result.model_dump_json(by_alias=True, exclude_none=True))
