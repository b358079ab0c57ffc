"""Hooks for whoever watches the node (the mother aggregator, tests), and
the bus that calls them.

Every hook is called synchronously on the event loop from a hot path: an
observer only updates counters in O(1) and never blocks or awaits.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hub.auth.principal import Principal
    from hub.channels.subscription import Subscription
    from hub.protocol import Broadcast
    from hub.store.base import StoredEvent

log = logging.getLogger(__name__)


class Observer:
    """No-op defaults; override what you need."""

    def connected(self, conn_id: str, principal: Principal) -> None:
        """A WebSocket connection was accepted."""

    def disconnected(self, conn_id: str, principal: Principal) -> None:
        """A WebSocket connection ended (after its channels were left)."""

    def joined(self, sub: Subscription) -> None:
        """A join succeeded; the reply and presence_state are already queued,
        so frames pushed to ``sub.outbox`` now arrive after them."""

    def left(self, sub: Subscription) -> None:
        """A subscription ended (leave, replacement, expiry or disconnect)."""

    def refused(self, topic: str, reason: str) -> None:
        """A join was refused; ``topic`` is what the client sent."""

    def broadcast(self, broadcast: Broadcast, delivered: int) -> None:
        """A broadcast was fanned out to ``delivered`` local subscribers."""

    def durable(self, event: StoredEvent) -> None:
        """The store announced a durable event (each node sees every one)."""


class Observers:
    """The node's observers, called in the order they were added."""

    __slots__ = ("_observers",)

    def __init__(self) -> None:
        self._observers: list[Observer] = []

    def add(self, observer: Observer) -> None:
        self._observers.append(observer)

    def __bool__(self) -> bool:
        return bool(self._observers)

    def notify(self, hook: str, *args: Any) -> None:
        """Call ``hook`` on every observer.  An observer's bug is logged and
        never stops delivery."""
        for observer in self._observers:
            try:
                getattr(observer, hook)(*args)
            except Exception:
                log.exception("observer %r failed in %s", observer, hook)
