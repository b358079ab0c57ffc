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
from http import HTTPStatus
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import parse_qs, unquote

import orjson
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from hub.auth.tokens import KeyNotCached
from hub.errors import AuthError, CloseCode
from hub.frames import Flushable, Frame, Outbox
from hub.protocol import VSN1
from hub.stats import Stats

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from hub.app import Hub
    from hub.session import Session

SOCKET_EXTENSION: Final = "hub.socket"
REALTIME_PATH: Final = "/realtime/v1/websocket"
#: Frames waiting in an outbox are written at the end of the loop iteration,
#: or, for frames pushed to that one connection (a replay), as soon as this
#: many bytes wait: a long burst then lands in the kernel as it is made, and
#: only what the kernel refuses counts against the slow-consumer bound.
EAGER_FLUSH_BYTES: Final = 64 * 1024
#: Seconds a closing socket may take to echo our close frame before it is
#: cut.  A slow consumer is not reading, so it gets less.
CLOSE_GRACE: Final = 5.0
SLOW_CLOSE_GRACE: Final = 1.0


class HubWebSocketProtocol(WebSocketsSansIOProtocol):
    """uvicorn's sans-I/O WebSocket protocol, plus the hub's fast path.

    Select it with ``uvicorn.Config(ws=HubWebSocketProtocol)``.

    For ``/realtime/v1/websocket`` the protocol serves the connection itself,
    without an ASGI task: it checks the token during the handshake, answers
    a refusal with HTTP and ``{"error": ...}`` as Supabase does, and feeds
    each complete client message straight to the connection's
    :class:`~hub.session.Session`.  No task, queue or ASGI scope exists per
    connection, which roughly halves the memory of an idle connection and
    the CPU time of a connect.  Work that must await (a JWKS refresh, a
    replay read from the store) runs as a task while reading pauses, so a
    connection's frames are still handled in order.

    Every other path, and a token whose JWKS key is not cached yet, takes
    uvicorn's ASGI route; the ``hub.socket`` extension then still lets the
    app write pre-built frames directly.
    """

    #: The outbox writing to this socket, flushed before a shutdown close.
    hub_outbox: SocketOutbox | None = None
    _hub: Hub | None = None
    _session: Session | None = None
    #: Messages that arrived while an awaited step ran; None when idle.
    _backlog: deque[str | bytes] | None = None

    def shutdown(self) -> None:
        # uvicorn calls this on SIGTERM to close with 1012; frames already
        # queued this iteration must go out before the close frame.
        if self.hub_outbox is not None:
            self.hub_outbox.flush()
            self.hub_outbox.stats.closes[1012] += 1
        super().shutdown()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if (
            not self.handshake_initiated
            and self.conn.handshake_exc is not None
            and not self.transport.is_closing()
        ):
            # The request was refused by the parser (a request line or
            # headers over websockets' 8 KiB limit, e.g. a huge apikey);
            # uvicorn would leave the socket open and unanswered.
            response = self.conn.reject(431, "Request line or header fields too large\n")
            self.transport.write(response.serialize())
            self.transport.close()

    def handle_connect(self, event: Request) -> None:
        hub: Hub | None = self.app_state.get("hub")
        raw_path, _, query = event.path.partition("?")
        fast = hub is not None and unquote(raw_path) == REALTIME_PATH
        if fast and self._serve_fast(hub, event, query):  # type: ignore[arg-type]
            return
        super().handle_connect(event)
        scope = getattr(self, "scope", None)
        if scope is not None:
            scope["extensions"][SOCKET_EXTENSION] = {"protocol": self}

    def _serve_fast(self, hub: Hub, event: Request, query: str) -> bool:
        """Handle the handshake here; False hands it to the ASGI route."""
        params = parse_qs(query)
        vsn = params.get("vsn", [VSN1])[0]
        token = params.get("apikey", [""])[0]
        refusal = hub.check_handshake(vsn, token)
        principal = None
        if refusal is None:
            try:
                principal = hub.verifier.verify(token)
            except KeyNotCached:
                return False  # the ASGI route awaits the JWKS refresh
            except AuthError as exc:
                refusal = hub.refuse_handshake(401, exc.message)
        self.handshake_initiated = True
        self.handshake_complete = True
        if refusal is not None or principal is None:
            assert refusal is not None
            status, message = refusal
            self._respond(status, orjson.dumps({"error": message}))
            return True
        response = self.conn.accept(event)
        if response.status_code != 101:
            # Not a valid upgrade request: websockets built the answer.
            self.close_sent = True
            self.conn.send_response(response)
            self.transport.write(b"".join(self.conn.data_to_send()))
            self.transport.close()
            return True
        self.conn.send_response(response)
        self.transport.write(b"".join(self.conn.data_to_send()))
        outbox = SocketOutbox(self, hub.flusher, hub.settings.max_outbox_bytes)
        self._hub = hub
        self._session = hub.open_session(principal, vsn, outbox)  # type: ignore[arg-type]
        return True

    def _respond(self, status: int, body: bytes) -> None:
        headers = Headers(
            [
                ("Content-Type", "application/json"),
                ("Content-Length", str(len(body))),
                ("Connection", "close"),
            ]
        )
        phrase = HTTPStatus(status).phrase
        self.close_sent = True
        self.conn.send_response(Response(status, phrase, headers, body))
        self.transport.write(b"".join(self.conn.data_to_send()))
        self.transport.close()

    def send_receive_event_to_app(self) -> None:
        session = self._session
        if session is None:
            super().send_receive_event_to_app()
            return
        data = self.frames[0] if len(self.frames) == 1 else b"".join(self.frames)
        self.frames = []
        if self.close_sent:
            return
        message: str | bytes
        if self.curr_msg_data_type == "text":
            try:
                message = bytes(data).decode()
            except UnicodeDecodeError:
                session.outbox.close(CloseCode.INVALID_FRAME, "text frame is not UTF-8")
                return
        else:
            message = bytes(data)
        if self._backlog is not None:
            self._backlog.append(message)
            return
        self._feed(session, message)

    def _feed(self, session: Session, message: str | bytes) -> None:
        assert self._hub is not None
        pending = self._hub.feed(session, message)
        if pending is None:
            return
        # Hold further frames until this step is done.
        self._backlog = deque()
        self.transport.pause_reading()
        task = self.loop.create_task(pending)
        task.add_done_callback(self._resume)

    def _resume(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("connection step failed", exc_info=task.exception())
        session, backlog = self._session, self._backlog
        self._backlog = None
        if session is None or backlog is None:
            return
        while backlog:
            self._feed(session, backlog.popleft())
            if self._backlog is not None:
                # Another awaited step started: it takes over the rest.
                self._backlog.extend(backlog)
                return
        if not self.transport.is_closing():
            self.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        session, self._session = self._session, None
        if session is not None and self._hub is not None:
            self._hub.close_session(session)
        super().connection_lost(exc)

    def write_frames(self, frames: list[bytes]) -> int:
        """Write complete frames; returns the bytes the kernel has not taken."""
        transport = self.transport
        if self.close_sent or transport.is_closing():
            return 0
        transport.writelines(frames)
        return transport.get_write_buffer_size()

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
    """Flushes what was marked (outboxes, and topics the fan-out wrote to)
    once, at the end of the current event-loop iteration."""

    def __init__(self, loop: asyncio.AbstractEventLoop, stats: Stats) -> None:
        self.loop = loop
        self.stats = stats
        self._dirty: list[Flushable] = []
        self._scheduled = False

    def mark(self, item: Flushable) -> None:
        self._dirty.append(item)
        if not self._scheduled:
            self._scheduled = True
            self.loop.call_soon(self.flush)

    def flush(self) -> None:
        self._scheduled = False
        dirty, self._dirty = self._dirty, []
        for item in dirty:
            item.flush()


class SocketOutbox(Outbox):
    """An outbox written straight to a :class:`HubWebSocketProtocol`.

    ``pending`` is one list for the outbox's lifetime (cleared in place), so
    ``sink`` can be its bound ``append``: the fan-out then adds a frame to a
    thousand outboxes with a thousand C calls, and the bookkeeping (bytes,
    the slow-consumer bound, statistics) happens once per outbox per loop
    iteration, in :meth:`flush`.  ``push``, for frames meant for this
    connection alone (replies, replays), also keeps the byte count, so a
    long replay is written early and cut as soon as it passes the bound.
    """

    __slots__ = (
        "protocol",
        "flusher",
        "max_bytes",
        "pending",
        "pending_bytes",
        "marked",
        "close_code",
        "stats",
    )

    def __init__(self, protocol: HubWebSocketProtocol, flusher: Flusher, max_bytes: int) -> None:
        super().__init__()
        self.protocol = protocol
        self.flusher = flusher
        self.max_bytes = max_bytes
        self.pending: list[Frame] = []
        self.sink = self.pending.append
        #: Bytes pushed (not sunk) since the last flush.
        self.pending_bytes = 0
        #: True while this outbox is in the flusher's list.
        self.marked = False
        self.close_code: int | None = None
        self.stats = flusher.stats
        protocol.hub_outbox = self

    def push(self, frame: Frame) -> None:
        if self.closed:
            return
        self.pending.append(frame)
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
        wires = [frame.wire for frame in pending]
        pending.clear()
        self.pending_bytes = 0
        self.stats.frames_out += len(wires)
        self.stats.bytes_out += sum(map(len, wires))
        # What the kernel has not taken stays in the transport's buffer;
        # past the bound the client is not reading: cut it, do not buffer.
        if self.protocol.write_frames(wires) > self.max_bytes:
            self.close(CloseCode.SLOW_CONSUMER, "slow consumer")

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
        self.pending.clear()
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
