"""A channels registry wired to an engine the way :class:`hub.node.Node`
wires them, for tests that drive the registry without a node."""

from __future__ import annotations

from typing import Any

from hub.channels.fanout import Channels
from hub.engine.base import Engine
from hub.engine.memory import MemoryEngine


def local_channels(engine: Engine | None = None, **kwargs: Any) -> Channels:
    """A :class:`Channels` bound to ``engine`` (an in-process one by default)."""
    engine = engine or MemoryEngine()
    channels = Channels(engine, **kwargs)
    engine.bind(channels)
    return channels
