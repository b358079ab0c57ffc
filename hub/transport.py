"""Socket I/O: the hub's own WebSocket connections, the bounded outbound
buffer and coalesced writes.

Every frame for a connection is appended to its outbox; once per event-loop
iteration the :class:`Flusher` hands each outbox's frames to the socket in
one ``writelines`` call (one ``writev`` under uvloop).  Measured on this kind
of machine (../shared/PERFORMANCE.md), coalescing like this is worth about
20x over one ``await send()`` per frame per socket.

``/realtime/v1/websocket`` is served without ASGI: uvicorn runs
:class:`HubHttpProtocol` (its httptools protocol plus this one path), which
answers the handshake from the headers httptools already parsed and hands
the socket to a :class:`HubSocket`, a small slotted protocol object that
parses frames with :class:`hub.websocket.FrameReader` and feeds complete
messages to the connection's :class:`~hub.session.Session`.  No task, queue,
event or second HTTP parse exists per connection.  Every other path goes to
uvicorn's own WebSocket protocol and the ASGI app, whose realtime endpoint
(there for other ASGI servers and Starlette's TestClient) uses
:class:`AsgiOutbox`: frames sent one by one through ASGI from a writer
task; same bounds, less speed.

Every outbox is bounded by ``max_bytes`` (bytes the kernel has not taken
yet, looked at after each write).  Crossing it closes the connection with
:attr:`~hub.errors.CloseCode.SLOW_CONSUMER`: one client that stops reading
must not make the hub buffer without limit or slow anyone else down.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections import deque
from http import HTTPStatus
from typing import TYPE_CHECKING, Any, Final, cast
from urllib.parse import parse_qs

import orjson
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from hub.auth.principal import Principal
from hub.auth.tokens import KeyNotCached
from hub.errors import AuthError, CloseCode
from hub.frames import Flushable, Frame, Outbox
from hub.protocol import VERSIONS, VSN1, Vsn
from hub.stats import Stats
from hub.websocket import (
    OP_BINARY,
    OP_CLOSE,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    FrameReader,
    WebSocketError,
    accept_response,
    check_upgrade,
    close_frame,
    parse_close,
)

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from hub.app import Hub
    from hub.session import Session

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
#: The longest request line or header line, and the most header lines, of
#: an upgrade request (the limits of the websockets parser behind uvicorn's
#: WebSocket route).
MAX_HEAD_LINE: Final = 8192
MAX_HEADERS: Final = 128
#: uvicorn's 1012 close on SIGTERM ("service restart": clients reconnect).
SERVICE_RESTART: Final = 1012


class HubHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, plus the hub's WebSocket fast path.

    Select it with ``uvicorn.Config(http=HubHttpProtocol)``.  An upgrade to
    ``/realtime/v1/websocket`` is answered here: the token is checked during
    the handshake (a refusal is HTTP with ``{"error": ...}``, as Supabase
    answers; a token naming a JWKS key not fetched yet waits for the
    refresh) and the socket goes to a :class:`HubSocket`.
    """

    #: A handshake's token check waiting for a JWKS refresh (a reference,
    #: so the task is not collected).
    _token_check: asyncio.Task[Principal] | None = None

    def handle_websocket_upgrade(self) -> None:
        if (
            len(self.url) > MAX_HEAD_LINE
            or len(self.headers) > MAX_HEADERS
            or any(len(name) + len(value) + 2 > MAX_HEAD_LINE for name, value in self.headers)
        ):
            # websockets' parser (behind uvicorn's route) refuses these
            # without answering or closing; answer for every path.
            self.connections.discard(self)
            self._refuse(431, "Request line or header fields too large")
            return
        hub: Hub | None = self.app_state.get("hub")
        raw_path, _, query = self.url.partition(b"?")
        if hub is None or raw_path != REALTIME_PATH.encode():
            super().handle_websocket_upgrade()
            return
        self.connections.discard(self)
        params = parse_qs(query.decode("latin-1"))
        vsn = params.get("vsn", [VSN1])[0]
        token = params.get("apikey", [""])[0]
        refusal = hub.check_handshake(vsn, token)
        if refusal is not None:
            self._answer(hub, vsn, refusal)
            return
        try:
            principal = hub.verifier.verify(token)
        except KeyNotCached:
            # A JWKS key not fetched yet (a rotation): refresh it (at the
            # bounded rate) without blocking the loop, then answer.  The
            # client sends nothing before our answer; reading waits anyway.
            self.transport.pause_reading()
            self._token_check = self.loop.create_task(hub.verifier.verify_async(token))
            self._token_check.add_done_callback(functools.partial(self._verified, hub, vsn))
            return
        except AuthError as exc:
            self._answer(hub, vsn, hub.refuse_handshake(401, exc.message))
            return
        self._answer(hub, vsn, principal)

    def _verified(self, hub: Hub, vsn: str, task: asyncio.Task[Principal]) -> None:
        self._token_check = None
        if task.cancelled() or self.transport.is_closing():
            return  # shutting down, or the client left
        exc = task.exception()
        if exc is None:
            self._answer(hub, vsn, task.result())
        elif isinstance(exc, AuthError):
            self._answer(hub, vsn, hub.refuse_handshake(401, exc.message))
        else:
            log.error("token check failed", exc_info=exc)
            self._refuse(500, "Internal Server Error")

    def _answer(self, hub: Hub, vsn: str, outcome: Principal | tuple[int, str]) -> None:
        """Refuse with (status, message), or accept for ``outcome``'s principal."""
        if isinstance(outcome, tuple):
            self._refuse(*outcome)
            return
        upgrade = check_upgrade(self.scope["method"], self.headers)
        if not isinstance(upgrade, bytes):
            self._refuse(*upgrade)
            return
        socket = HubSocket(hub, self.connections, self.loop)
        self.transport.set_protocol(socket)
        socket.connection_made(self.transport)
        self.transport.write(accept_response(upgrade))
        assert vsn in VERSIONS  # check_handshake refused any other
        socket.start(outcome, cast(Vsn, vsn))
        self.transport.resume_reading()  # paused while a JWKS refresh ran

    def _refuse(self, status: int, message: str) -> None:
        body = orjson.dumps({"error": message})
        self.transport.write(
            f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\n"
            "Content-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
            + body
        )
        self.transport.close()


class HubSocket(asyncio.Protocol):
    """One client WebSocket on the fast path: frames in, session, frames out.

    Each complete client message is fed straight to the connection's
    :class:`~hub.session.Session`.  Work that must await (a JWKS refresh, a
    replay read from the store) runs as a task while reading pauses, so a
    connection's messages are still handled in order.
    """

    __slots__ = (
        "hub",
        "connections",
        "loop",
        "transport",
        "reader",
        "session",
        "hub_outbox",
        "backlog",
        "close_sent",
        "close_received",
        "close_timer",
    )

    def __init__(self, hub: Hub, connections: set[Any], loop: asyncio.AbstractEventLoop) -> None:
        self.hub = hub
        self.connections = connections
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.reader = FrameReader(hub.settings.max_frame_bytes)
        self.session: Session | None = None
        #: The outbox writing to this socket, flushed before a shutdown close.
        self.hub_outbox: SocketOutbox | None = None
        #: Messages that arrived while an awaited step ran; None when idle.
        self.backlog: deque[str | bytes] | None = None
        self.close_sent = False
        self.close_received = False
        self.close_timer: asyncio.TimerHandle | None = None

    # -- asyncio.Protocol -------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        # uvicorn's graceful shutdown calls shutdown() on each and waits
        # for the set to empty.
        self.connections.add(self)

    def start(self, principal: Principal, vsn: Vsn) -> None:
        outbox = SocketOutbox(self, self.hub.flusher, self.hub.settings.max_outbox_bytes)
        self.session = self.hub.open_session(principal, vsn, outbox)

    def data_received(self, data: bytes) -> None:
        if self.close_received:
            return
        try:
            messages = self.reader.feed(data)
        except WebSocketError as exc:
            self._fail(exc.code, exc.reason)
            return
        for opcode, payload in messages:
            if opcode in (OP_TEXT, OP_BINARY):  # a (reassembled) message
                self._message(opcode, payload)
            elif opcode == OP_PING:
                if not self.close_sent:
                    self._write(Frame(OP_PONG, payload).wire)
            elif opcode == OP_CLOSE:
                self._peer_closed(payload)
                return
            # Pongs need no answer.
            if self.close_received or self.transport is None or self.transport.is_closing():
                return

    def connection_lost(self, exc: Exception | None) -> None:
        if self.close_timer is not None:
            self.close_timer.cancel()
            self.close_timer = None
        self.connections.discard(self)
        session, self.session = self.session, None
        if session is not None:
            self.hub.close_session(session)

    def eof_received(self) -> bool | None:
        return None  # the transport closes itself

    def pause_writing(self) -> None:
        # Nothing waits for the socket to drain: the outbox bound cuts a
        # client that does not read (see SocketOutbox).
        pass

    def resume_writing(self) -> None:
        pass

    # -- uvicorn's server ----------------------------------------------------------

    def shutdown(self) -> None:
        """SIGTERM: send what is queued, then close with 1012 so clients
        reconnect elsewhere."""
        if self.hub_outbox is not None:
            self.hub_outbox.flush()
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if not self.close_sent:
            self.close_sent = True
            self.hub.stats.closes[SERVICE_RESTART] += 1
            self._write(close_frame(SERVICE_RESTART).wire)
        transport.close()

    # -- messages --------------------------------------------------------------------

    def _message(self, opcode: int, payload: bytes) -> None:
        session = self.session
        if session is None or self.close_sent:
            return
        message: str | bytes
        if opcode == OP_TEXT:
            try:
                message = payload.decode()
            except UnicodeDecodeError:
                session.outbox.close(CloseCode.INVALID_FRAME, "text frame is not UTF-8")
                return
        else:
            message = payload
        if self.backlog is not None:
            self.backlog.append(message)
            return
        self._feed(session, message)

    def _feed(self, session: Session, message: str | bytes) -> None:
        pending = self.hub.feed(session, message)
        if pending is None:
            return
        # Hold further messages until this step is done.
        self.backlog = deque()
        assert self.transport is not None
        self.transport.pause_reading()
        task = self.loop.create_task(pending)
        task.add_done_callback(self._resume)

    def _resume(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("connection step failed", exc_info=task.exception())
        session, backlog = self.session, self.backlog
        self.backlog = None
        if session is None or backlog is None:
            return
        while backlog:
            self._feed(session, backlog.popleft())
            if self.backlog is not None:
                # Another awaited step started: it takes over the rest.
                self.backlog.extend(backlog)
                return
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    # -- closing ---------------------------------------------------------------------

    def _peer_closed(self, payload: bytes) -> None:
        self.close_received = True
        try:
            code, _ = parse_close(payload)
        except WebSocketError as exc:
            self._fail(exc.code, exc.reason)
            return
        if not self.close_sent:
            # Echo the peer's code, as RFC 6455 asks; what is queued goes
            # first.
            if self.hub_outbox is not None:
                self.hub_outbox.flush()
            self.close_sent = True
            self._write(close_frame(code).wire)
        assert self.transport is not None
        self.transport.close()

    def _fail(self, code: int, reason: str) -> None:
        """The peer broke the protocol: close with ``code``, drop the rest."""
        self.close_received = True
        if self.hub_outbox is not None:
            self.hub_outbox.close(code, reason)
        else:
            self.close_now(code, reason, CLOSE_GRACE)

    def _write(self, data: bytes) -> None:
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.write(data)

    # -- what SocketOutbox uses ----------------------------------------------------

    def write_frames(self, frames: list[bytes]) -> int:
        """Write complete frames; returns the bytes the kernel has not taken."""
        transport = self.transport
        if self.close_sent or transport is None or transport.is_closing():
            return 0
        transport.writelines(frames)
        return transport.get_write_buffer_size()

    def write_frame(self, frame: bytes) -> int:
        """:meth:`write_frames` for one frame."""
        transport = self.transport
        if self.close_sent or transport is None or transport.is_closing():
            return 0
        transport.write(frame)
        return transport.get_write_buffer_size()

    def close_now(self, code: int, reason: str, grace: float) -> None:
        """Send a close frame without waiting for the write buffer (which may
        never drain), then cut the socket if the peer does not answer within
        ``grace`` seconds."""
        transport = self.transport
        if self.close_sent or transport is None or transport.is_closing():
            return
        self.close_sent = True
        transport.write(close_frame(code, reason).wire)
        if self.close_received:
            transport.close()
            return
        # Keep reading (a paused connection too) so the reply is seen.
        transport.resume_reading()
        self.close_timer = self.loop.call_later(grace, transport.abort)


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
    """An outbox written straight to a :class:`HubSocket`.

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

    def __init__(self, protocol: HubSocket, flusher: Flusher, max_bytes: int) -> None:
        super().__init__()
        self.protocol = protocol
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
        self.stats = flusher.stats
        protocol.hub_outbox = self

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
            unsent = self.protocol.write_frame(wire)
        else:
            stats.bytes_out += sum(map(len, pending))
            # writelines copies the references out; the list is ours again.
            unsent = self.protocol.write_frames(pending)
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

    Used when the connection did not take :class:`HubHttpProtocol`'s fast
    path.
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
