"""The socket outbox and the flusher, fed by the fan-out, with a fake socket.

What the fan-out promises: every frame is built once, each socket is
written at most once per loop iteration with everything it got in that
iteration (one ``writelines``), in publish order, and a socket whose
unread bytes pass the bound is closed with 4001 instead of buffered.
"""

from __future__ import annotations

import asyncio

import pytest

from hub.auth.principal import Principal
from hub.channels.fanout import Channels
from hub.channels.subscription import Subscription
from hub.channels.topics import parse_topic
from hub.counters import Counters
from hub.errors import CloseCode
from hub.flusher import Flusher
from hub.frames import OP_BINARY, OP_TEXT, Frame
from hub.outbox import PYTHON_WRITES, ListOutbox, Writes, native_writes
from hub.protocol import VSN2, Broadcast
from hub.transport.outbox import SocketOutbox
from tests.support.channels import local_channels

MEMBER = Principal(role="authenticated", exp=2e9, sub="u", orgs={"42": "member"})


class FakeSocket:
    """Stands in for HubSocket: records each write call."""

    def __init__(self, unread_after_write: int = 0) -> None:
        self.writes: list[list[bytes]] = []
        self.unread = unread_after_write
        self.closed_with: int | None = None

    def write_frames(self, frames: list[bytes]) -> int:
        self.writes.append(list(frames))
        return self.unread

    def write_frame(self, frame: bytes) -> int:
        return self.write_frames([frame])

    def close_now(self, code: int, reason: str, grace: float) -> None:
        self.closed_with = code


async def flushed() -> None:
    """Let the flusher write what was marked: it schedules the flush from
    the next loop turn (so that it comes after the loop's next poll)."""
    for _ in range(2):
        await asyncio.sleep(0)


_native = native_writes()
assert _native is not None, "hub._writes is built by `pip install -e .` here"
#: The pure-Python loops and the compiled ones (which keep consecutive
#: broadcasts to a topic for later): every test here runs on both.
WRITES = {"python": PYTHON_WRITES, "compiled": _native}


@pytest.fixture(params=list(WRITES))
def writes(request: pytest.FixtureRequest) -> Writes:
    return WRITES[request.param]


def _setup(
    loop: asyncio.AbstractEventLoop,
    sockets: list[FakeSocket],
    writes: Writes,
    max_bytes: int = 1 << 20,
) -> tuple[Channels, list[Subscription]]:
    stats = Counters()
    flusher = Flusher()
    flusher.start(loop)
    channels = local_channels(stats=stats, schedule=flusher.mark, writes=writes)
    subs = [_join(channels, flusher, sock, f"c{i}", max_bytes) for i, sock in enumerate(sockets)]
    return channels, subs


def _join(
    channels: Channels, flusher: Flusher, sock: FakeSocket, conn: str, max_bytes: int = 1 << 20
) -> Subscription:
    pending = channels.writes.pending()
    outbox = SocketOutbox(sock, flusher, max_bytes, channels.stats, pending)
    sub = Subscription(parse_topic("org:42"), "1", VSN2, outbox, MEMBER, conn)
    channels.subscribe(sub)
    return sub


async def test_one_write_per_socket_per_iteration_in_order(writes: Writes) -> None:
    sockets = [FakeSocket() for _ in range(3)]
    channels, _ = _setup(asyncio.get_running_loop(), sockets, writes)
    broadcasts = [Broadcast("org:42", "m", b'{"i":%d}' % i) for i in range(5)]
    for b in broadcasts:
        channels.publish(b)
    assert all(s.writes == [] for s in sockets)  # nothing written mid-iteration
    await flushed()
    wires = [b.frame_v2().wire for b in broadcasts]
    for sock in sockets:
        assert sock.writes == [wires]
    # The frame objects are shared: built once, not per socket.
    assert sockets[0].writes[0][0] is sockets[2].writes[0][0]
    assert channels.stats.frames_out == 15


async def test_the_sender_is_skipped_and_the_rest_get_it(writes: Writes) -> None:
    sockets = [FakeSocket() for _ in range(3)]
    channels, subs = _setup(asyncio.get_running_loop(), sockets, writes)
    channels.publish(Broadcast("org:42", "m", b"{}", origin=subs[1]))
    await flushed()
    assert [len(s.writes) for s in sockets] == [1, 0, 1]
    assert channels.delivered == 2


async def test_leaving_in_the_same_iteration_still_gets_what_was_sent_before(
    writes: Writes,
) -> None:
    sockets = [FakeSocket() for _ in range(2)]
    channels, subs = _setup(asyncio.get_running_loop(), sockets, writes)
    channels.publish(Broadcast("org:42", "m", b'{"before":1}'))
    channels.unsubscribe(subs[0])
    channels.publish(Broadcast("org:42", "m", b'{"after":1}'))
    await flushed()
    assert [len(w) for w in sockets[0].writes] == [1]
    assert [len(w) for w in sockets[1].writes] == [2]


async def test_joining_between_two_broadcasts_gets_the_second_only(writes: Writes) -> None:
    sockets = [FakeSocket() for _ in range(2)]
    channels, subs = _setup(asyncio.get_running_loop(), sockets, writes)
    channels.publish(Broadcast("org:42", "m", b'{"before":1}'))
    late = FakeSocket()
    assert subs[0].outbox.flusher is subs[1].outbox.flusher  # type: ignore[attr-defined]
    _join(channels, subs[0].outbox.flusher, late, "late")  # type: ignore[attr-defined]
    channels.publish(Broadcast("org:42", "m", b'{"after":1}'))
    await flushed()
    assert [len(w) for w in sockets[0].writes] == [2]
    assert late.writes == [[Broadcast("org:42", "m", b'{"after":1}').frame_v2().wire]]


async def test_a_socket_that_does_not_read_is_closed_not_buffered(writes: Writes) -> None:
    slow, fast = FakeSocket(unread_after_write=2_000), FakeSocket()
    channels, subs = _setup(asyncio.get_running_loop(), [slow, fast], writes, max_bytes=1_000)
    channels.publish(Broadcast("org:42", "m", b"{}"))
    await flushed()
    assert slow.closed_with == CloseCode.SLOW_CONSUMER
    assert fast.closed_with is None
    # Until its session is gone the fan-out still reaches the closed
    # outbox; what it adds is dropped at the next flush, never written.
    for _ in range(3):
        channels.publish(Broadcast("org:42", "m", b"{}"))
        await flushed()
    assert len(slow.writes) == 1
    assert list(subs[0].outbox.pending) == []  # type: ignore[attr-defined]
    assert len(fast.writes) == 4


def test_frame_from_wire_rebuilds_every_header_length() -> None:
    # Outboxes that are not sockets get the fan-out's wire bytes back as
    # a Frame: the 2-, 4- and 10-byte headers all give the same frame.
    for opcode, size in ((OP_TEXT, 0), (OP_TEXT, 125), (OP_BINARY, 126), (OP_BINARY, 70_000)):
        frame = Frame(opcode, bytes(range(256)) * (size // 256) + b"x" * (size % 256))
        again = Frame.from_wire(frame.wire)
        assert (again.opcode, again.payload, again.wire) == (opcode, frame.payload, frame.wire)


def test_a_fanned_out_frame_reaches_a_list_outbox_whole() -> None:
    outbox = ListOutbox()
    channels = local_channels()
    channels.subscribe(
        Subscription(
            topic=parse_topic("org:42"),
            join_ref="1",
            vsn=VSN2,
            outbox=outbox,
            principal=MEMBER,
            conn_id="c",
        )
    )
    broadcast = Broadcast("org:42", "m", b'{"a":1}')
    channels.publish(broadcast)
    assert [f.wire for f in outbox.frames] == [broadcast.frame_v2().wire]
    assert outbox.frames[0].opcode == OP_BINARY
