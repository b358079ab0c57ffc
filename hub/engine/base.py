"""The engine interface."""

from __future__ import annotations

import abc
from collections.abc import Callable

from hub.channels.presence import PresenceDiff
from hub.protocol import Broadcast

Envelope = Broadcast | PresenceDiff
Deliver = Callable[[Envelope], None]


class Engine(abc.ABC):
    """Moves envelopes from publishers to every node's channels.

    ``publish``, ``subscribe`` and ``unsubscribe`` are called from the hot
    path and must not block or await: a networked engine queues the work for
    its own tasks.  Envelopes published by one caller are delivered in the
    order they were published.
    """

    def __init__(self) -> None:
        self._deliver: Deliver | None = None

    def bind(self, deliver: Deliver) -> None:
        """Set the function that receives every envelope for this node."""
        self._deliver = deliver

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Connect; called once before the hub accepts connections."""

    async def stop(self) -> None:  # noqa: B027 - optional hook
        """Disconnect; called once at shutdown."""

    @property
    def ready(self) -> bool:
        """Whether messages flow right now (feeds ``/readyz``)."""
        return True

    @abc.abstractmethod
    def publish(self, envelope: Envelope) -> None:
        """Send ``envelope`` to every node's subscribers of its topic."""

    def subscribe(self, topic: str) -> None:  # noqa: B027 - optional hook
        """This node gained its first local subscriber of ``topic``."""

    def unsubscribe(self, topic: str) -> None:  # noqa: B027 - optional hook
        """This node lost its last local subscriber of ``topic``."""
