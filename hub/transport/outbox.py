"""The socket-backed outbox: a connection's frames, bounded, written once
per loop iteration.

Every outbox is bounded by ``max_bytes`` (bytes the kernel has not taken
yet, looked at after each write).  Crossing it closes the connection with
:attr:`~hub.errors.CloseCode.SLOW_CONSUMER`: one client that stops reading
must not make the hub buffer without limit or slow anyone else down.
"""

from __future__ import annotations

from typing import Final, Protocol

from hub.counters import Counters
from hub.errors import CloseCode
from hub.flusher import Flusher
from hub.frames import Frame
from hub.outbox import Outbox

#: Frames waiting in an outbox are written at the end of the loop iteration,
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

    def write_frames(self, frames: list[bytes]) -> int: ...

    def write_frame(self, frame: bytes) -> int: ...

    def close_now(self, code: int, reason: str, grace: float) -> None: ...


class SocketOutbox(Outbox):
    """An outbox written straight to a socket.

    ``pending`` is one list for the outbox's lifetime (cleared in place), so
    ``sink`` can be its bound ``append``: the fan-out then adds a frame to a
    thousand outboxes with a thousand C calls, and the bookkeeping (bytes,
    the slow-consumer bound, statistics) happens once per outbox per loop
    iteration, in :meth:`flush`.  ``push``, for frames meant for this
    connection alone (replies, replays), also keeps the byte count, so a
    long replay is written early and cut as soon as it passes the bound.
    """

    # What the compiled fan-out loop reads per delivery (the base class's
    # closed and fd, then pending, transport, pending_bytes) comes first:
    # one cache line of the object rather than two, at a cache miss each.
    __slots__ = (
        "pending",
        "transport",
        "pending_bytes",
        "socket",
        "flusher",
        "max_bytes",
        "marked",
        "close_code",
        "stats",
    )

    def __init__(
        self, socket: FrameWriter, flusher: Flusher, max_bytes: int, stats: Counters
    ) -> None:
        super().__init__()
        self.socket = socket
        self.flusher = flusher
        self.max_bytes = max_bytes
        #: Wire bytes, in order, for one writelines.
        self.pending: list[bytes] = []
        self.sink = self.pending.append
        #: Bytes pushed (not sunk) since the last flush.
        self.pending_bytes = 0
        #: True while this outbox is in the flusher's list.
        self.marked = False
        self.close_code: int | None = None
        self.stats = stats
        #: The socket's transport, and in ``fd`` its descriptor while the
        #: compiled fan-out loop may write to it directly: set by
        #: :class:`~hub.transport.socket.HubSocket` while the transport holds
        #: nothing unsent; the loop also checks that it is not closing.
        self.transport: object = None

    def push(self, frame: Frame) -> None:
        if self.closed:
            return
        self.pending.append(frame.wire)
        self.pending_bytes += len(frame.wire)
        if not self.marked:
            self.marked = True
            self.flusher.mark(self)
        if self.pending_bytes >= EAGER_FLUSH_BYTES:
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
        self.pending_bytes = 0
        # What the kernel has not taken stays in the transport's buffer;
        # past the bound the client is not reading: cut it, do not buffer.
        if unsent > self.max_bytes:
            self.close(CloseCode.SLOW_CONSUMER, "slow consumer")

    def close(self, code: int, reason: str = "") -> None:
        if self.closed:
            return
        self.fd = -1
        slow = code == CloseCode.SLOW_CONSUMER
        if not slow:
            # Whatever was queued before the close is still owed.
            self.flush()
        self.closed = True
        self.close_code = code
        self.stats.closes[code] += 1
        self.pending.clear()
        self.pending_bytes = 0
        self.socket.close_now(code, reason, SLOW_CLOSE_GRACE if slow else CLOSE_GRACE)
