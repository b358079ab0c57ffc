"""The mother aggregator (placeholder: issue 5 fills this in)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from hub.channels.observer import Observer
from hub.channels.registry import Channels
from hub.store.base import EventStore


class Mother(Observer):
    def __init__(
        self,
        *,
        channels: Channels,
        store: EventStore,
        node_id: str,
        redis_url: str | None = None,
        redis_prefix: str = "hub",
        rate: float = 1.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.channels = channels
        self.store = store
        self.node_id = node_id
        self.redis_url = redis_url
        self.redis_prefix = redis_prefix
        self.rate = rate
        self.clock = clock

    def snapshot(self) -> dict[str, Any]:
        return {"node": self.node_id, "time": self.clock()}

    async def run(self) -> None:
        """Long-lived: rebuild windows, publish updates to ``mother``."""
