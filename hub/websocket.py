"""The WebSocket protocol (RFC 6455), server side, without I/O.

The hub serves ``/realtime/v1/websocket`` with its own small protocol object
(:class:`hub.transport.socket.HubSocket`) rather than a general WebSocket library:
an idle connection is then a handful of slotted objects, and a connect is
one HTTP parse (uvicorn's httptools) instead of two.  This module holds what
that needs and nothing else:

* :func:`check_upgrade` and :func:`accept_response`: the opening handshake,
  on headers httptools already parsed;
* :class:`FrameReader`: client frames in, complete messages and control
  frames out, with every rule a server must enforce (masking, reserved bits,
  fragmentation, control-frame limits, the message size limit, close
  payloads).  A violation raises :class:`WebSocketError` with the close code
  to answer with;
* :func:`close_frame`: the server's close frame.

Server frames are built by :mod:`hub.frames`.  Unmasking uses websockets'
C ``apply_mask`` (the same library the rest of the stack uses).
No compression is negotiated: frames are built once and written to many
sockets unchanged, which per-socket compression would undo.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from typing import Final

try:  # websockets' C extension; its pure-Python twin where it is not built.
    from websockets.speedups import apply_mask
except ImportError:  # pragma: no cover
    from websockets.utils import apply_mask

from hub.errors import CloseCode, WebSocketError
from hub.frames import Frame

OP_CONT: Final = 0x0
OP_TEXT: Final = 0x1
OP_BINARY: Final = 0x2
OP_CLOSE: Final = 0x8
OP_PING: Final = 0x9
OP_PONG: Final = 0xA


_GUID: Final = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


# -- the opening handshake -----------------------------------------------------------


def check_upgrade(method: str, headers: list[tuple[bytes, bytes]]) -> tuple[int, str] | bytes:
    """The client's ``Sec-WebSocket-Key`` if the request is a valid version
    13 upgrade (``Upgrade``/``Connection`` were checked by uvicorn), else the
    HTTP refusal (status, message)."""
    if method != "GET":
        return 405, "WebSocket upgrade must be a GET"
    key = version = None
    for name, value in headers:
        if name == b"sec-websocket-key":
            if key is not None:
                return 400, "Duplicate Sec-WebSocket-Key"
            key = value.strip()
        elif name == b"sec-websocket-version":
            version = value.strip()
    if version != b"13":
        return 426, "Sec-WebSocket-Version must be 13"
    if key is None:
        return 400, "Missing Sec-WebSocket-Key"
    try:
        raw = base64.b64decode(key, validate=True)
    except binascii.Error:
        raw = b""
    if len(raw) != 16:
        return 400, "Invalid Sec-WebSocket-Key"
    return key


def accept_response(key: bytes) -> bytes:
    """The ``101 Switching Protocols`` answer to ``Sec-WebSocket-Key``."""
    accept = base64.b64encode(hashlib.sha1(key + _GUID).digest())
    return (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n"
    )


# -- frames ----------------------------------------------------------------------------


def close_frame(code: int, reason: str = "") -> Frame:
    """A close frame; the reason is cut to fit the 125-byte control limit."""
    if code == CloseCode.NO_STATUS:
        return Frame(OP_CLOSE, b"")
    body = reason.encode()[:123]
    while True:
        try:
            body.decode()
            break
        except UnicodeDecodeError:  # cut inside a character: drop its start
            body = body[:-1]
    return Frame(OP_CLOSE, code.to_bytes(2, "big") + body)


def _valid_close_code(code: int) -> bool:
    # RFC 6455 7.4: codes a peer may send (1005, 1006 and 1015 are reserved
    # for reporting, never for the wire).
    return code in (1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014) or (
        3000 <= code <= 4999
    )


def parse_close(payload: bytes) -> tuple[int, str]:
    """The code and reason of a received close frame."""
    if not payload:
        return CloseCode.NO_STATUS, ""
    if len(payload) == 1:
        raise WebSocketError(CloseCode.PROTOCOL_ERROR, "close frame with a 1-byte payload")
    code = int.from_bytes(payload[:2], "big")
    if not _valid_close_code(code):
        raise WebSocketError(CloseCode.PROTOCOL_ERROR, f"invalid close code {code}")
    try:
        reason = payload[2:].decode()
    except UnicodeDecodeError:
        raise WebSocketError(CloseCode.INVALID_FRAME, "close reason is not UTF-8") from None
    return code, reason


class FrameReader:
    """Turns the bytes a client sends into messages and control frames.

    :meth:`feed` returns ``(opcode, payload)`` pairs: ``OP_TEXT`` or
    ``OP_BINARY`` with a complete (reassembled) message, or a control frame
    (``OP_PING``, ``OP_PONG``, ``OP_CLOSE``).  Text is returned as bytes;
    the caller checks UTF-8 (1007) where it decodes.  ``max_size`` bounds a
    message; a frame declaring more is refused (1009) before its payload
    is read, so nothing of it is buffered.
    """

    __slots__ = ("_buf", "max_size", "_parts", "_part_opcode", "_part_size")

    def __init__(self, max_size: int) -> None:
        self.max_size = max_size
        #: The start of a frame whose end has not arrived yet.
        self._buf = bytearray()
        #: Payloads of a fragmented message so far (None: none under way).
        self._parts: list[bytes] | None = None
        self._part_opcode = 0
        self._part_size = 0

    @property
    def buffered(self) -> int:
        """Bytes of incomplete frames held."""
        return len(self._buf) + self._part_size

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        buf: bytes | bytearray
        if self._buf:
            # Amortized append: a frame trickling in byte by byte stays linear.
            self._buf += data
            buf = self._buf
        else:
            buf = data
        out: list[tuple[int, bytes]] = []
        pos = 0
        end = len(buf)
        while end - pos >= 2:
            b0 = buf[pos]
            b1 = buf[pos + 1]
            if b0 & 0x70:
                raise WebSocketError(CloseCode.PROTOCOL_ERROR, "reserved bits must be 0")
            if not b1 & 0x80:
                raise WebSocketError(CloseCode.PROTOCOL_ERROR, "client frames must be masked")
            opcode = b0 & 0x0F
            fin = b0 & 0x80
            length = b1 & 0x7F
            head = 2
            if length == 126:
                if end - pos < 4:
                    break
                length = int.from_bytes(buf[pos + 2 : pos + 4], "big")
                head = 4
            elif length == 127:
                if end - pos < 10:
                    break
                length = int.from_bytes(buf[pos + 2 : pos + 10], "big")
                head = 10
            if opcode >= OP_CLOSE:
                if opcode > OP_PONG:
                    raise WebSocketError(CloseCode.PROTOCOL_ERROR, f"unknown opcode {opcode}")
                if not fin or length > 125:
                    raise WebSocketError(
                        CloseCode.PROTOCOL_ERROR,
                        "control frames must be whole and at most 125 bytes",
                    )
            else:
                self._check_data_frame(opcode, length)
            start = pos + head + 4
            stop = start + length
            if stop > end:
                break
            payload = b""
            if length:
                payload = apply_mask(bytes(buf[start:stop]), bytes(buf[start - 4 : start]))
            pos = stop
            if opcode >= OP_CLOSE or (fin and self._parts is None):
                # A control frame (allowed between fragments), or a whole message.
                out.append((opcode, payload))
            else:
                self._fragment(opcode, payload, fin, out)
        if buf is self._buf:
            del self._buf[:pos]
        elif pos < end:
            self._buf += buf[pos:]
        return out

    def _check_data_frame(self, opcode: int, length: int) -> None:
        if opcode == OP_CONT:
            if self._parts is None:
                raise WebSocketError(CloseCode.PROTOCOL_ERROR, "continuation without a message")
        elif opcode in (OP_TEXT, OP_BINARY):
            if self._parts is not None:
                raise WebSocketError(
                    CloseCode.PROTOCOL_ERROR, "new message inside a fragmented one"
                )
        else:
            raise WebSocketError(CloseCode.PROTOCOL_ERROR, f"unknown opcode {opcode}")
        if self._part_size + length > self.max_size:
            raise WebSocketError(CloseCode.MESSAGE_TOO_BIG, f"message over {self.max_size} bytes")

    def _fragment(
        self, opcode: int, payload: bytes, fin: int, out: list[tuple[int, bytes]]
    ) -> None:
        if self._parts is None:
            self._parts = []
            self._part_opcode = opcode
        self._parts.append(payload)
        self._part_size += len(payload)
        if fin:
            out.append((self._part_opcode, b"".join(self._parts)))
            self._parts = None
            self._part_size = 0
