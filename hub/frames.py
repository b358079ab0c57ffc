"""Pre-built WebSocket frames.

A message that goes to many sockets is framed once: the RFC 6455 header is
prepended to the payload here, and the same ``bytes`` object is handed to
every socket's outbox.  Server frames are never masked, and the hub turns
permessage-deflate off, so a frame is byte-identical for every receiver.
No I/O happens here.
"""

from __future__ import annotations

from typing import Final

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
