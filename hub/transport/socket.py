"""One client WebSocket on the fast path: frames in, to its session.

:class:`HubSocket` is a small slotted protocol object: it parses frames
with :class:`hub.websocket.FrameReader` and feeds complete messages to the
connection's :class:`~hub.session.Session` through the node's
:class:`~hub.gateway.Gateway`.  No task, queue, event or second HTTP parse
exists per connection.  Frames go out through its
:class:`~hub.transport.outbox.SocketOutbox`.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Iterable
from typing import Any

from hub.auth.principal import Principal
from hub.errors import CloseCode, WebSocketError
from hub.frames import Frame
from hub.gateway import Gateway
from hub.protocol import Vsn
from hub.session import Session
from hub.transport.outbox import CLOSE_GRACE, SocketOutbox
from hub.websocket import (
    OP_BINARY,
    OP_CLOSE,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    FrameReader,
    close_frame,
    parse_close,
)

log = logging.getLogger(__name__)


class HubSocket(asyncio.Protocol):
    """One client WebSocket on the fast path: frames in, session, frames out.

    Each complete client message is fed straight to the connection's
    :class:`~hub.session.Session`.  Work that must await (a JWKS refresh, a
    replay read from the store) runs as a task while reading pauses, so a
    connection's messages are still handled in order.
    """

    __slots__ = (
        "gateway",
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
        "direct_fd",
    )

    def __init__(
        self, gateway: Gateway, connections: set[Any], loop: asyncio.AbstractEventLoop
    ) -> None:
        self.gateway = gateway
        self.connections = connections
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.reader = FrameReader(gateway.socket_limits.max_frame_bytes)
        self.session: Session | None = None
        #: The outbox writing to this socket, flushed before a shutdown close.
        self.hub_outbox: SocketOutbox | None = None
        #: Messages that arrived while an awaited step ran; None when idle.
        self.backlog: deque[str | bytes] | None = None
        self.close_sent = False
        self.close_received = False
        self.close_timer: asyncio.TimerHandle | None = None
        #: The socket's descriptor, offered to the compiled fan-out loop
        #: (see start()); -1 when it may not be.
        self.direct_fd = -1

    # -- asyncio.Protocol -------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        # uvicorn's graceful shutdown calls shutdown() on each and waits
        # for the set to empty.
        self.connections.add(self)

    def start(self, principal: Principal, vsn: Vsn) -> None:
        gateway = self.gateway
        outbox = SocketOutbox(
            self,
            gateway.flusher,
            gateway.socket_limits.max_outbox_bytes,
            gateway.counters,
            gateway.channels.writes.pending(),
        )
        self.hub_outbox = outbox
        transport = self.transport
        if transport is not None:
            # Offered to the compiled fan-out loop (hub/_writes.c), when the
            # node uses it, while the transport holds nothing unsent: with
            # a high-water mark of 0 the transport calls pause_writing() as
            # soon as it buffers a byte and resume_writing() once it is
            # empty again, so a direct write never overtakes queued bytes.
            # Only a plain socket: under TLS the bytes must go through the
            # transport's encryption.
            sock = transport.get_extra_info("socket")
            if sock is not None and transport.get_extra_info("sslcontext") is None:
                transport.set_write_buffer_limits(high=0)
                self.direct_fd = sock.fileno()
                # Bytes may be queued already (an HTTP response on the same
                # connection the client has not read, with the transport
                # paused for the protocol before this one, which is then
                # not told again): resume_writing() offers it once they
                # are gone.
                if transport.get_write_buffer_size() == 0:
                    outbox.allow_direct_writes(self.direct_fd)
        self.session = gateway.open_session(principal, vsn, outbox)

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
        # The descriptor is closed (and may be reused): never written again.
        self._no_direct_writes()
        if self.close_timer is not None:
            self.close_timer.cancel()
            self.close_timer = None
        self.connections.discard(self)
        session, self.session = self.session, None
        if session is not None:
            self.gateway.close_session(session)

    def eof_received(self) -> bool | None:
        # The transport closes itself; what it would not send any more is
        # not sent around it either.
        self._no_direct_writes()
        return None

    def pause_writing(self) -> None:
        # Nothing waits for the socket to drain: the outbox bound cuts a
        # client that does not read (see SocketOutbox).  But the transport
        # holds bytes now: frames go through it, behind them.
        if self.hub_outbox is not None:
            self.hub_outbox.allow_direct_writes(-1)

    def resume_writing(self) -> None:
        outbox = self.hub_outbox
        if outbox is not None and self.direct_fd >= 0:
            outbox.allow_direct_writes(self.direct_fd)

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
            self._sending_close()
            self.gateway.counters.closes[CloseCode.SERVICE_RESTART] += 1
            self._write(close_frame(CloseCode.SERVICE_RESTART).wire)
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
        pending = self.gateway.feed(session, message)
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
            self._sending_close()
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

    def _sending_close(self) -> None:
        """Nothing goes after a close frame: not through the outbox, and not
        straight to the descriptor."""
        self.close_sent = True
        self._no_direct_writes()

    def _no_direct_writes(self) -> None:
        self.direct_fd = -1
        if self.hub_outbox is not None:
            self.hub_outbox.allow_direct_writes(-1)

    def _write(self, data: bytes) -> None:
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.write(data)

    # -- what SocketOutbox uses ----------------------------------------------------

    def write_frames(self, frames: Iterable[bytes]) -> int:
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
        self._sending_close()
        transport.write(close_frame(code, reason).wire)
        if self.close_received:
            transport.close()
            return
        # Keep reading (a paused connection too) so the reply is seen.
        transport.resume_reading()
        self.close_timer = self.loop.call_later(grace, transport.abort)
