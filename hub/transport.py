"""Socket I/O: the bounded outbound buffer and coalesced writes.

Every frame for a connection is appended to its outbox; once per event-loop
iteration the :class:`Flusher` hands each outbox's frames to the socket in
one ``writelines`` call (one ``writev`` under uvloop).  Measured on this kind
of machine (../shared/PERFORMANCE.md), coalescing like this is worth about
20x over one ``await send()`` per frame per socket.

To write pre-built frames straight to the socket, the hub runs uvicorn with
:class:`HubWebSocketProtocol`, a thin subclass of uvicorn's sans-I/O
websockets protocol that exposes itself to the app as the ASGI extension
``hub.socket``.  Under any other ASGI server (or Starlette's TestClient) the
app falls back to :class:`AsgiOutbox`, which sends frames one by one through
ASGI from a writer task; same bounds, less speed.

Every outbox is bounded by ``max_bytes`` (frames waiting here plus bytes the
kernel has not taken yet).  Crossing it closes the connection with
:attr:`~hub.errors.CloseCode.SLOW_CONSUMER`: one client that stops reading
must not make the hub buffer without limit or slow anyone else down.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import Any, Final

from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.http11 import Request

from hub.errors import CloseCode
from hub.frames import Frame, Outbox
from hub.stats import Stats

log = logging.getLogger(__name__)

SOCKET_EXTENSION: Final = "hub.socket"
#: Frames waiting in an outbox are written at the end of the loop iteration,
#: or as soon as this many bytes wait: a burst published in one iteration
#: then lands in the kernel, and only what the kernel refuses counts
#: against the slow-consumer bound.
EAGER_FLUSH_BYTES: Final = 64 * 1024
#: Seconds a closing socket may take to echo our close frame before it is
#: cut.  A slow consumer is not reading, so it gets less.
CLOSE_GRACE: Final = 5.0
SLOW_CLOSE_GRACE: Final = 1.0


class HubWebSocketProtocol(WebSocketsSansIOProtocol):
    """uvicorn's sans-I/O WebSocket protocol, plus direct frame writes.

    Select it with ``uvicorn.Config(ws=HubWebSocketProtocol)``.  The ASGI
    flow is unchanged (accept, receive and the HTTP denial response go
    through ASGI); the extension only adds a faster way out.
    """

    #: The outbox writing to this socket, flushed before a shutdown close.
    hub_outbox: SocketOutbox | None = None

    def shutdown(self) -> None:
        # uvicorn calls this on SIGTERM to close with 1012; frames already
        # queued this iteration must go out before the close frame.
        if self.hub_outbox is not None:
            self.hub_outbox.flush()
            self.hub_outbox.stats.closes[1012] += 1
        super().shutdown()

    def handle_connect(self, event: Request) -> None:
        super().handle_connect(event)
        scope = getattr(self, "scope", None)
        if scope is not None:
            scope["extensions"][SOCKET_EXTENSION] = {"protocol": self}

    def write_frames(self, frames: list[bytes]) -> int:
        """Write complete frames; returns the bytes the kernel has not taken."""
        transport = self.transport
        if self.close_sent or transport.is_closing():
            return 0
        transport.writelines(frames)
        return transport.get_write_buffer_size()

    def buffered(self) -> int:
        return self.transport.get_write_buffer_size()

    def close_now(self, code: int, reason: str, grace: float) -> None:
        """Send a close frame without waiting for the write buffer (which may
        never drain), then cut the socket if the peer does not answer within
        ``grace`` seconds."""
        if self.close_sent or self.transport.is_closing():
            return
        self.conn.send_close(code, reason)
        self.transport.write(b"".join(self.conn.data_to_send()))
        self.close_sent = True
        self.queue.put_nowait({"type": "websocket.disconnect", "code": code, "reason": reason})
        if self.read_paused:
            # Keep reading so the peer's close reply is seen.
            self.read_paused = False
            self.transport.resume_reading()
        self.close_timer = self.loop.call_later(grace, self.transport.abort)


class Flusher:
    """Writes every dirty outbox once per event-loop iteration."""

    def __init__(self, loop: asyncio.AbstractEventLoop, stats: Stats) -> None:
        self.loop = loop
        self.stats = stats
        self._dirty: list[SocketOutbox] = []
        self._scheduled = False

    def mark(self, outbox: SocketOutbox) -> None:
        self._dirty.append(outbox)
        if not self._scheduled:
            self._scheduled = True
            self.loop.call_soon(self.flush)

    def flush(self) -> None:
        self._scheduled = False
        dirty, self._dirty = self._dirty, []
        for outbox in dirty:
            outbox.flush()


class SocketOutbox(Outbox):
    """An outbox written straight to a :class:`HubWebSocketProtocol`."""

    __slots__ = (
        "protocol",
        "flusher",
        "max_bytes",
        "pending",
        "pending_bytes",
        "backlog",
        "close_code",
        "stats",
    )

    def __init__(self, protocol: HubWebSocketProtocol, flusher: Flusher, max_bytes: int) -> None:
        super().__init__()
        self.protocol = protocol
        self.flusher = flusher
        self.max_bytes = max_bytes
        self.pending: list[bytes] = []
        self.pending_bytes = 0
        #: Bytes the kernel had not taken at the last look.
        self.backlog = 0
        self.close_code: int | None = None
        self.stats = flusher.stats
        protocol.hub_outbox = self

    def push(self, frame: Frame) -> None:
        if self.closed:
            return
        wire = frame.wire
        pending = self.pending
        pending.append(wire)
        self.pending_bytes += len(wire)
        if len(pending) == 1:
            self.backlog = self.protocol.buffered()
            self.flusher.mark(self)
        if self.pending_bytes >= EAGER_FLUSH_BYTES:
            self.flush()
        if self.pending_bytes + self.backlog > self.max_bytes:
            self.close(CloseCode.SLOW_CONSUMER, "slow consumer")

    def flush(self) -> None:
        if self.closed or not self.pending:
            return
        self.backlog = self.protocol.write_frames(self.pending)
        self.stats.frames_out += len(self.pending)
        self.stats.bytes_out += self.pending_bytes
        self.pending = []
        self.pending_bytes = 0

    def close(self, code: int, reason: str = "") -> None:
        if self.closed:
            return
        slow = code == CloseCode.SLOW_CONSUMER
        if not slow:
            # Whatever was queued before the close is still owed.
            self.flush()
        self.closed = True
        self.close_code = code
        self.stats.closes[code] += 1
        self.pending = []
        self.pending_bytes = 0
        self.protocol.close_now(code, reason, SLOW_CLOSE_GRACE if slow else CLOSE_GRACE)


class AsgiOutbox(Outbox):
    """The fallback: frames go out through ASGI ``send`` from a writer task.

    Used when the server is not running :class:`HubWebSocketProtocol`.
    """

    def __init__(self, send: Any, max_bytes: int, stats: Stats) -> None:
        super().__init__()
        self.stats = stats
        self._send = send
        self.max_bytes = max_bytes
        self._queue: deque[Frame] = deque()
        self._bytes = 0
        self._wake = asyncio.Event()
        self.close_code: int | None = None
        self._close_reason = ""

    def push(self, frame: Frame) -> None:
        if self.closed:
            return
        self._queue.append(frame)
        self._bytes += len(frame.payload)
        if self._bytes > self.max_bytes:
            self.close(CloseCode.SLOW_CONSUMER, "slow consumer")
            return
        self._wake.set()

    def close(self, code: int, reason: str = "") -> None:
        if self.closed:
            return
        self.closed = True
        self.close_code = code
        self.stats.closes[code] += 1
        self._close_reason = reason
        if code == CloseCode.SLOW_CONSUMER:
            self._queue.clear()
        self._wake.set()

    async def run(self) -> None:
        """Send queued frames until the outbox is closed and drained."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._queue:
                frame = self._queue.popleft()
                self._bytes -= len(frame.payload)
                if frame.is_text:
                    await self._send({"type": "websocket.send", "text": frame.payload.decode()})
                else:
                    await self._send({"type": "websocket.send", "bytes": frame.payload})
            if self.closed:
                assert self.close_code is not None
                close = {"type": "websocket.close", "code": self.close_code}
                await self._send({**close, "reason": self._close_reason})
                return
