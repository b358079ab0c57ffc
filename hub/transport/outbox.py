"""The socket-backed outbox: a connection's frames, bounded, written once
per flush (:mod:`hub.flusher`: after the loop's next poll).

Every outbox is bounded by ``max_bytes`` (bytes the kernel has not taken
yet, looked at after each write).  Crossing it closes the connection with
:attr:`~hub.errors.CloseCode.SLOW_CONSUMER`: one client that stops reading
must not make the hub buffer without limit or slow anyone else down.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final, Protocol

from hub.counters import Counters
from hub.errors import CloseCode
from hub.flusher import Flusher
from hub.frames import Frame
from hub.outbox import FrameList, Outbox, Pending

#: Frames waiting in an outbox are written at the next flush,
#: or, for frames pushed to that one connection (a replay), as soon as this
#: many bytes wait: a long burst then lands in the kernel as it is made, and
#: only what the kernel refuses counts against the slow-consumer bound.
EAGER_FLUSH_BYTES: Final = 64 * 1024
#: Seconds a closing socket may take to echo our close frame before it is
#: cut.  A slow consumer is not reading, so it gets less.
CLOSE_GRACE: Final = 5.0
SLOW_CLOSE_GRACE: Final = 1.0


class FrameWriter(Protocol):
    """What the outbox needs of its socket (:class:`~hub.transport.socket.HubSocket`)."""

    def write_frames(self, frames: Iterable[bytes]) -> int: ...

    def write_frame(self, frame: bytes) -> int: ...

    def close_now(self, code: int, reason: str, grace: float) -> None: ...


class SocketOutbox(Outbox):
    """An outbox written straight to a socket.

    ``pending`` (a :class:`~hub.outbox.FrameList`) is one list for the
    outbox's lifetime, cleared in place, and it is the ``sink``: the fan-out
    adds a frame to a thousand outboxes without a Python call each (with the
    compiled loops, without a call at all), and the bookkeeping (bytes, the
    slow-consumer bound, statistics) happens once per outbox per loop
    iteration, in :meth:`flush`.  ``push``, for frames meant for this
    connection alone (replies, replays), also keeps the byte count, so a
    long replay is written early and cut as soon as it passes the bound.
    The list's ``fd`` is the socket's descriptor while the compiled loop may
    write to it directly (set by :class:`~hub.transport.socket.HubSocket`).
    """

    __slots__ = ("pending", "socket", "flusher", "max_bytes", "marked", "close_code", "stats")

    def __init__(
        self,
        socket: FrameWriter,
        flusher: Flusher,
        max_bytes: int,
        stats: Counters,
        pending: FrameList | None = None,
    ) -> None:
        super().__init__()
        self.socket = socket
        self.flusher = flusher
        self.max_bytes = max_bytes
        #: Wire bytes, in order, for one writelines.
        self.pending: FrameList = pending if pending is not None else Pending()
        self.sink = self.pending
        #: True while this outbox is in the flusher's list.
        self.marked = False
        self.close_code: int | None = None
        self.stats = stats

    def allow_direct_writes(self, fd: int) -> None:
        """Let the compiled loop write to descriptor ``fd`` (-1: no more)."""
        self.pending.fd = fd if not self.closed else -1

    def push(self, frame: Frame) -> None:
        if self.closed:
            return
        pushed = self.pending.push(frame.wire)
        if not self.marked:
            self.marked = True
            self.flusher.mark(self)
        if pushed >= EAGER_FLUSH_BYTES:
            self.flush()

    def schedule(self) -> None:
        if self.pending and not self.marked:
            self.marked = True
            self.flusher.mark(self)

    def flush(self) -> None:
        self.marked = False
        pending = self.pending
        if not pending:
            return
        if self.closed:
            # The fan-out's sink reaches a closed outbox until its session
            # is gone; drop what it added.
            pending.clear()
            return
        stats = self.stats
        if len(pending) == 1:
            # The common case when not saturated (one event for this
            # socket in this iteration).
            wire = pending[0]
            stats.bytes_out += len(wire)
            unsent = self.socket.write_frame(wire)
        else:
            stats.bytes_out += sum(map(len, pending))
            # writelines copies the references out; the list is ours again.
            unsent = self.socket.write_frames(pending)
        stats.frames_out += len(pending)
        pending.clear()
        # What the kernel has not taken stays in the transport's buffer;
        # past the bound the client is not reading: cut it, do not buffer.
        if unsent > self.max_bytes:
            self.close(CloseCode.SLOW_CONSUMER, "slow consumer")

    def close(self, code: int, reason: str = "") -> None:
        if self.closed:
            return
        self.pending.fd = -1
        slow = code == CloseCode.SLOW_CONSUMER
        if not slow:
            # Whatever was queued before the close is still owed.
            self.flush()
        self.closed = True
        self.close_code = code
        self.stats.closes[code] += 1
        self.pending.clear()
        self.socket.close_now(code, reason, SLOW_CLOSE_GRACE if slow else CLOSE_GRACE)
