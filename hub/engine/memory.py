"""The in-process engine: one node, no network, delivery on the spot."""

from __future__ import annotations

from hub.engine.base import Engine, Envelope


class MemoryEngine(Engine):
    """Delivers every envelope synchronously to this process's channels."""

    def publish(self, envelope: Envelope) -> None:
        assert self._deliver is not None, "engine used before bind()"
        self._deliver(envelope)
