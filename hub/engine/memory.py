"""The in-process engine: one node, no network, delivery on the spot."""

from __future__ import annotations

from hub.channels.presence import PresenceDiff
from hub.engine.base import Engine
from hub.protocol import Broadcast


class MemoryEngine(Engine):
    """Delivers every envelope synchronously to this process's channels."""

    def publish(self, envelope: Broadcast | PresenceDiff) -> None:
        assert self._listener is not None, "engine used before bind()"
        self._listener.deliver(envelope)
