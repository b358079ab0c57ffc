"""The engine interface, and what travels through it."""

from __future__ import annotations

import abc
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from hub.channels.presence import PresenceDiff, PresenceMap
from hub.protocol import Broadcast
from hub.quotas import Quotas


@dataclass(frozen=True, slots=True)
class PresenceSnapshot:
    """All of ``node``'s presence entries on ``topic`` (a re-sync)."""

    topic: str
    node: str
    state: Any


@dataclass(frozen=True, slots=True)
class NodeGone:
    """``node`` left or stopped answering: forget what it contributed."""

    node: str


Envelope = Broadcast | PresenceDiff | PresenceSnapshot | NodeGone


class EngineListener(Protocol):
    """What an engine needs from the node's channels registry."""

    def deliver(self, envelope: Envelope) -> None: ...

    def local_presence(self, topic: str) -> PresenceMap: ...

    def topics(self) -> Iterable[str]: ...


class Engine(abc.ABC):
    """Moves envelopes from publishers to every node's channels.

    ``publish``, ``subscribe`` and ``unsubscribe`` are called from the hot
    path and must not block or await: a networked engine queues the work for
    its own tasks.  Envelopes published by one caller are delivered in the
    order they were published, on every node.
    """

    def __init__(self, *, quotas: Quotas | None = None) -> None:
        self._listener: EngineListener | None = None
        #: Per-org quota counters; a networked engine exchanges each node's
        #: share with the others (see hub.quotas).
        self.quotas = quotas

    def bind(self, listener: EngineListener) -> None:
        """Set the registry that receives every envelope for this node (the
        node does this once, where it is wired: hub/node.py)."""
        self._listener = listener

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Connect; called once before the hub accepts connections."""

    async def stop(self) -> None:  # noqa: B027 - optional hook
        """Disconnect; called once at shutdown."""

    @property
    def ready(self) -> bool:
        """Whether messages flow right now (feeds ``/readyz``)."""
        return True

    @property
    def reconnects(self) -> int:
        """How many times the engine lost and re-established its link."""
        return 0

    @abc.abstractmethod
    def publish(self, envelope: Broadcast | PresenceDiff) -> None:
        """Deliver ``envelope`` to this node's subscribers now, and to every
        other node's."""

    def subscribe(self, topic: str) -> None:  # noqa: B027 - optional hook
        """This node gained its first local subscriber of ``topic``."""

    def unsubscribe(self, topic: str) -> None:  # noqa: B027 - optional hook
        """This node lost its last local subscriber of ``topic``."""
