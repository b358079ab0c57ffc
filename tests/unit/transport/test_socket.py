"""When HubSocket lets the compiled fan-out loop write to its descriptor:
only while its transport holds nothing unsent, and never after a close
frame or the connection's end.  A fake transport and gateway: what is
checked is the bookkeeping, not I/O (tests/integration/test_wire.py sends
real bytes through both paths)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from hub.counters import Counters
from hub.flusher import Flusher
from hub.gateway import SocketLimits
from hub.outbox import PYTHON_WRITES, Writes, native_writes
from hub.protocol import VSN2
from hub.transport.socket import HubSocket

FD = 37


class FakeSock:
    def fileno(self) -> int:
        return FD


@dataclass
class FakeTransport:
    buffered: int = 0
    limits: tuple[int, int] | None = None
    closing: bool = False
    written: list[bytes] = field(default_factory=list)

    def get_extra_info(self, name: str) -> Any:
        return FakeSock() if name == "socket" else None

    def set_write_buffer_limits(self, high: int) -> None:
        self.limits = (high, 0)

    def get_write_buffer_size(self) -> int:
        return self.buffered

    def is_closing(self) -> bool:
        return self.closing

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def close(self) -> None:
        self.closing = True

    def resume_reading(self) -> None:
        pass

    def abort(self) -> None:
        self.closing = True


@dataclass
class FakeChannels:
    writes: Writes = field(default_factory=lambda: native_writes() or PYTHON_WRITES)


class FakeGateway:
    def __init__(self) -> None:
        self.channels = FakeChannels()
        self.socket_limits = SocketLimits(max_frame_bytes=1 << 20, max_outbox_bytes=1 << 20)
        self.flusher = Flusher()
        self.counters = Counters()
        self.closed: list[object] = []

    def open_session(self, principal: object, vsn: str, outbox: object) -> object:
        return object()

    def close_session(self, session: object) -> None:
        self.closed.append(session)


def _socket(transport: FakeTransport) -> HubSocket:
    loop = asyncio.get_running_loop()
    sock = HubSocket(FakeGateway(), set(), loop)  # type: ignore[arg-type]
    sock.connection_made(transport)  # type: ignore[arg-type]
    sock.start(None, VSN2)  # type: ignore[arg-type]
    return sock


async def test_the_descriptor_is_offered_while_nothing_is_queued() -> None:
    transport = FakeTransport()
    sock = _socket(transport)
    outbox = sock.hub_outbox
    assert outbox is not None
    # A high-water mark of 0: the transport says so the moment it queues.
    assert transport.limits == (0, 0)
    assert outbox.pending.fd == FD
    sock.pause_writing()
    assert outbox.pending.fd == -1
    sock.resume_writing()
    assert outbox.pending.fd == FD


async def test_bytes_queued_before_the_upgrade_hold_it_back_until_they_are_gone() -> None:
    # A response on the same connection the client has not read yet: the
    # transport may have paused for the HTTP protocol, and not tell again.
    transport = FakeTransport(buffered=300_000)
    sock = _socket(transport)
    assert sock.hub_outbox is not None and sock.hub_outbox.pending.fd == -1
    transport.buffered = 0
    sock.resume_writing()
    assert sock.hub_outbox.pending.fd == FD


async def test_never_after_a_close_frame_or_the_end() -> None:
    for end in ("close", "lost", "outbox", "eof"):
        transport = FakeTransport()
        sock = _socket(transport)
        outbox = sock.hub_outbox
        assert outbox is not None and outbox.pending.fd == FD
        if end == "close":
            sock.close_now(1000, "", 1.0)
        elif end == "lost":
            sock.connection_lost(None)
        elif end == "eof":
            assert not sock.eof_received()
        else:
            outbox.close(1000)
        assert outbox.pending.fd == -1, end
        sock.resume_writing()
        assert outbox.pending.fd == -1, end
