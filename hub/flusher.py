"""Coalesced writes: whatever was marked is flushed once, after the event
loop has looked for input once more.

The fan-out marks a topic (and a reply marks one outbox) instead of writing
at once; every socket then gets one write with everything it was given
meanwhile.  Measured on this kind of machine (../shared/PERFORMANCE.md),
coalescing like this is worth about 20x over one ``await send()`` per frame
per socket.

Why one more poll: a flush scheduled with ``call_soon`` from an input
callback runs before the callbacks of the loop's next poll (uvloop runs
such callbacks before it polls; asyncio's loop polls first but runs them
ahead of the new input's callbacks), so it would write what one poll
brought in and no more.  Messages that arrive together rarely come in one
poll: an app's server sends a burst of 1,000 messages as ten concurrent
REST requests of 100, and while the hub fans out the first ones to 1,000
subscribers, the others arrive.  Flushed at once, each socket got such a
burst in about two writes (``perf stat`` on the benchmark's burst: 10,857
sends for 5 bursts to 1,000 sockets; 4,995 with this wait); the kernel's
cost is per write as much as per byte.  So the flush is scheduled from the
next loop turn and comes after that turn's input.  The wait is one poll,
never more: the loop does not sleep in it (a callback is due), so an idle
hub pays one non-blocking ``epoll_wait`` per flush, and a busy one writes
once per two polls at most.
"""

from __future__ import annotations

import asyncio

from hub.outbox import Flushable


class Flusher:
    """Flushes what was marked once, after the loop's next poll for input.

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
            self.loop.call_soon(self._after_next_poll)

    def _after_next_poll(self) -> None:
        # Runs in the next loop turn; the flush, scheduled from here, runs
        # after that turn's input callbacks.
        assert self.loop is not None
        self.loop.call_soon(self.flush)

    def flush(self) -> None:
        self._scheduled = False
        dirty, self._dirty = self._dirty, []
        for item in dirty:
            item.flush()
