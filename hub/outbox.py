"""Where a connection's outbound frames go: the :class:`Outbox` interface.

The session and the fan-out see only this interface; the socket-backed
outbox is :class:`hub.transport.outbox.SocketOutbox`.  :class:`ListOutbox`
keeps what it is given (tests, tools).  No I/O happens here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from hub.frames import Frame

#: Appends one frame, given as its ``wire`` bytes, to an outbox without
#: scheduling a write.
Sink = Callable[[bytes], None]


class Flushable(Protocol):
    """Something with frames to write at the end of a loop iteration."""

    def flush(self) -> None: ...


class Outbox:
    """Where a connection's outbound frames go.  The interface the session
    and the fan-out see; :mod:`hub.transport.outbox` holds the socket-backed one.

    ``push`` never blocks and never awaits: a connection that cannot keep up
    is closed, not waited for.

    ``sink`` is the fan-out's way in, and takes a frame's ``wire`` bytes:
    for a socket it is the pending list's own ``append`` (a C call, no
    Python frame per subscriber), and the list goes to ``writelines`` as it
    is.  A sink does not schedule a write; whoever uses it must get
    :meth:`flush` called before the loop sleeps (the registry does this
    once per topic per loop iteration) or call :meth:`schedule`.  Outboxes
    that are not sockets take the slow way: the frame is rebuilt and pushed.
    """

    __slots__ = ("closed", "sink")

    def __init__(self) -> None:
        self.closed = False
        self.sink: Sink = self._push_wire

    def _push_wire(self, wire: bytes) -> None:
        self.push(Frame.from_wire(wire))

    def push(self, frame: Frame) -> None:
        raise NotImplementedError

    def schedule(self) -> None:
        """Make sure frames added through ``sink`` are written soon."""

    def flush(self) -> None:
        """Write what is waiting now (outboxes that write at once: no-op)."""

    def close(self, code: int, reason: str = "") -> None:
        raise NotImplementedError


class ListOutbox(Outbox):
    """An outbox that keeps what it is given: for tests and for tools."""

    def __init__(self) -> None:
        super().__init__()
        self.frames: list[Frame] = []
        self.close_code: int | None = None
        self.close_reason = ""

    def push(self, frame: Frame) -> None:
        if not self.closed:
            self.frames.append(frame)

    def close(self, code: int, reason: str = "") -> None:
        if not self.closed:
            self.closed = True
            self.close_code = code
            self.close_reason = reason
