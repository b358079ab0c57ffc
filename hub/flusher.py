"""Coalesced writes: whatever was marked is flushed once, at the end of the
current event-loop iteration.

The fan-out marks a topic (and a reply marks one outbox) instead of writing
at once; every socket then gets one ``writelines`` per loop iteration with
everything it was given in it.  Measured on this kind of machine
(../shared/PERFORMANCE.md), coalescing like this is worth about 20x over one
``await send()`` per frame per socket.
"""

from __future__ import annotations

import asyncio

from hub.outbox import Flushable


class Flusher:
    """Flushes what was marked once, at the end of the loop iteration.

    Built with the node, before any loop runs; :meth:`start` gives it the
    loop it schedules on (the node's start-up does this).
    """

    __slots__ = ("loop", "_dirty", "_scheduled")

    def __init__(self) -> None:
        self.loop: asyncio.AbstractEventLoop | None = None
        self._dirty: list[Flushable] = []
        self._scheduled = False

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop

    def mark(self, item: Flushable) -> None:
        self._dirty.append(item)
        if not self._scheduled:
            if self.loop is None:
                raise RuntimeError("Flusher.mark() before start(): the node is not running")
            self._scheduled = True
            self.loop.call_soon(self.flush)

    def flush(self) -> None:
        self._scheduled = False
        dirty, self._dirty = self._dirty, []
        for item in dirty:
            item.flush()
