"""Resource subscriptions: which MCP sessions asked to hear when a dataset changes.

A session subscribes to `lakegate://datasets/{name}` (resources/subscribe, through the gate: only a
dataset it may read). When a write through lakegate lands a new Iceberg snapshot or Lance version,
every session subscribed to that dataset is sent `notifications/resources/updated`, but only after
the policy is asked again whether its principal may still read the dataset: a subscriber whose
access was withdrawn since is dropped, never notified. Subscriptions live in this process: over
HTTP with several replicas, a session hears about the writes its own replica serves.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import anyio.to_thread
import structlog

from lakegate.server.gate.identity import Principal

__all__ = ["Subscriptions"]

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class _Subscriber:
    key: str
    session: Any  # mcp's ServerSession: send_resource_updated(uri)
    principal: Principal


class Subscriptions:
    """Subscribers by URI, each under a key that names its session (or listen stream)."""

    def __init__(self) -> None:
        self._by_uri: dict[str, dict[str, _Subscriber]] = {}
        self._lock = threading.Lock()

    def add(self, uri: str, key: str, session: Any, principal: Principal) -> None:
        """Subscribe `session` (anything with `async send_resource_updated(uri)`) under `key`."""
        with self._lock:
            self._by_uri.setdefault(uri, {})[key] = _Subscriber(key, session, principal)

    def remove(self, uri: str, key: str) -> bool:
        """Forget one subscription; whether there was one."""
        with self._lock:
            found = self._by_uri.get(uri, {}).pop(key, None)
            if uri in self._by_uri and not self._by_uri[uri]:
                del self._by_uri[uri]
        return found is not None

    def subscribers(self, uri: str) -> int:
        with self._lock:
            return len(self._by_uri.get(uri, {}))

    async def notify(self, uri: str, may_read: Callable[[Principal], bool]) -> int:
        """Send resources/updated for `uri` to each subscriber that `may_read` still allows; drop
        the others, and those whose session has gone. Returns the number notified."""
        with self._lock:
            subscribers = list(self._by_uri.get(uri, {}).values())
        sent = 0
        for subscriber in subscribers:
            if not await anyio.to_thread.run_sync(may_read, subscriber.principal):  # policy and catalog reads
                self.remove(uri, subscriber.key)
                log.info("subscription.dropped", uri=uri, principal=subscriber.principal.name, reason="no read")
                continue
            try:
                await subscriber.session.send_resource_updated(uri)
                sent += 1
            except Exception as exc:  # the client went away: nothing to tell it any more
                self.remove(uri, subscriber.key)
                log.info("subscription.dropped", uri=uri, reason=type(exc).__name__)
        return sent
