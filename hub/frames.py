"""Pre-built WebSocket frames.

A message that goes to many sockets is framed once: the RFC 6455 header is
prepended to the payload here, and the same ``bytes`` object is handed to
every socket's outbox.  Server frames are never masked, and the hub turns
permessage-deflate off, so a frame is byte-identical for every receiver.
No I/O happens here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final, Protocol

OP_TEXT: Final = 0x1
OP_BINARY: Final = 0x2


def _header(opcode: int, length: int) -> bytes:
    first = 0x80 | opcode  # FIN set: the hub never fragments.
    if length < 126:
        return bytes((first, length))
    if length < 65536:
        return bytes((first, 126)) + length.to_bytes(2, "big")
    return bytes((first, 127)) + length.to_bytes(8, "big")


class Frame:
    """One outbound WebSocket message, framed once.

    ``payload`` is the message body (UTF-8 JSON for text frames); ``wire`` is
    the complete frame as it goes on the socket.
    """

    __slots__ = ("opcode", "payload", "wire")

    def __init__(self, opcode: int, payload: bytes) -> None:
        self.opcode = opcode
        self.payload = payload
        self.wire = _header(opcode, len(payload)) + payload

    @classmethod
    def from_wire(cls, wire: bytes) -> Frame:
        """The Frame whose ``wire`` is ``wire`` (a frame this module built:
        FIN set, unmasked, length in the shortest form)."""
        length = wire[1] & 0x7F
        start = 2 if length < 126 else 4 if length == 126 else 10
        frame = cls.__new__(cls)
        frame.opcode = wire[0] & 0x0F
        frame.payload = wire[start:]
        frame.wire = wire
        return frame

    @property
    def is_text(self) -> bool:
        return self.opcode == OP_TEXT

    def __len__(self) -> int:
        return len(self.wire)

    def __repr__(self) -> str:
        kind = "text" if self.is_text else "binary"
        return f"Frame({kind}, {self.payload[:60]!r})"


def text_frame(payload: bytes) -> Frame:
    return Frame(OP_TEXT, payload)


def binary_frame(payload: bytes) -> Frame:
    return Frame(OP_BINARY, payload)


#: Appends one frame, given as its ``wire`` bytes, to an outbox without
#: scheduling a write.
Sink = Callable[[bytes], None]


class Flushable(Protocol):
    """Something with frames to write at the end of a loop iteration."""

    def flush(self) -> None: ...


class Outbox:
    """Where a connection's outbound frames go.  The interface the session
    and the fan-out see; :mod:`hub.transport` holds the socket-backed ones.

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
