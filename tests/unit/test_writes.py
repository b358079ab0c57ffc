"""hub._writes, the compiled fan-out writes, against real socket pairs: it
writes an outbox's frames itself only when nothing else may be in the way,
leaves exactly the unsent bytes pending when the kernel takes part, and
hands every other case to the outbox's own flush."""

from __future__ import annotations

import itertools
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from hub.outbox import fan_out, native_writes

native = native_writes()
write = native.flush if native is not None else None


@dataclass
class Transport:
    closing: bool = False

    def is_closing(self) -> bool:
        return self.closing


@dataclass
class Outbox:
    """The attributes the compiled loop reads of a SocketOutbox."""

    fd: int
    transport: Transport = field(default_factory=Transport)
    pending: list[bytes] = field(default_factory=list)
    pending_bytes: int = 0
    closed: bool = False
    flushed: int = 0

    def flush(self) -> None:
        self.flushed += 1


@dataclass(eq=False)
class Sub:
    outbox: Outbox


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    yield a, b
    a.close()
    b.close()


def test_the_extension_is_built() -> None:
    # `pip install -e .` builds it on this kind of machine; a missing build
    # would make every other test here meaningless.
    assert native is not None


def test_fan_out_calls_every_sink_but_the_origins_as_the_python_loop_does() -> None:
    assert native is not None
    for loop in (native.fan_out, fan_out):
        got: dict[str, list[bytes]] = {"a": [], "b": [], "c": []}
        group = {name: frames.append for name, frames in got.items()}
        assert loop(group, b"f1", None) == 3
        assert loop(group, b"f2", "b") == 2
        assert loop(group, b"f3", "nobody") == 3
        assert got == {"a": [b"f1", b"f2", b"f3"], "b": [b"f1", b"f3"], "c": [b"f1", b"f2", b"f3"]}


Pair = tuple[socket.socket, socket.socket]


def test_pending_frames_go_to_the_socket_in_order(pair: Pair) -> None:
    assert write is not None
    a, b = pair
    one = Outbox(a.fileno(), pending=[b"first", b"-second"], pending_bytes=12)
    frames, sent = write({Sub(one): None})
    assert (frames, sent) == (2, 12)
    assert b.recv(100) == b"first-second"
    assert one.pending == [] and one.pending_bytes == 0 and one.flushed == 0


@pytest.mark.parametrize(
    "outbox_change",
    [
        {"fd": -1},
        {"closed": True},
        {"transport": Transport(closing=True)},
        {"pending": [b"x"] * 65},
    ],
    # No fd also stands for a transport holding unsent bytes (HubSocket
    # takes it away from pause_writing() to resume_writing()).
    ids=["no-fd", "closed", "transport-closing", "too-many-frames"],
)
def test_every_other_case_is_the_outboxs_own_flush(
    pair: tuple[socket.socket, socket.socket], outbox_change: dict[str, object]
) -> None:
    assert write is not None
    a, b = pair
    box = Outbox(a.fileno(), pending=[b"frame"])
    for key, value in outbox_change.items():
        setattr(box, key, value)
    before = list(box.pending)
    assert write([Sub(box)]) == (0, 0)
    assert box.flushed == 1 and box.pending == before
    with pytest.raises(BlockingIOError):
        b.recv(100)


def test_what_the_kernel_does_not_take_stays_pending(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    assert write is not None
    a, b = pair
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    frames = [bytes([65 + i]) * 100_000 for i in range(3)]
    box = Outbox(a.fileno(), pending=list(frames))
    done, sent = write([Sub(box)])
    assert 0 < sent < 300_000
    assert box.flushed == 1  # the rest is the transport's
    # Written and pending add up to the frames, byte for byte, in order.
    received = b""
    while True:
        try:
            chunk = b.recv(1 << 20)
        except BlockingIOError:
            break
        received += chunk
    assert len(received) == sent
    assert received + b"".join(box.pending) == b"".join(frames)
    # The frames sent whole are counted; the one cut, with what follows it,
    # is counted by the flush that writes the rest.
    assert done == sum(1 for end in itertools.accumulate(map(len, frames)) if end <= sent)


def test_a_failed_send_leaves_everything_to_the_flush(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    assert write is not None
    a, b = pair
    b.close()  # the peer is gone: EPIPE
    box = Outbox(a.fileno(), pending=[b"lost?"])
    assert write([Sub(box)]) == (0, 0)
    assert box.flushed == 1 and box.pending == [b"lost?"]


def test_one_loop_over_many_subscriptions() -> None:
    assert write is not None
    pairs = [socket.socketpair() for _ in range(50)]
    try:
        boxes = [Outbox(a.fileno(), pending=[b"m%d" % i]) for i, (a, _) in enumerate(pairs)]
        quiet = Outbox(-1, pending=[b"slow path"])
        subs = {Sub(box): None for box in [*boxes, quiet]}
        assert write(subs) == (50, sum(len(b"m%d" % i) for i in range(50)))
        assert [b.recv(10) for _, b in pairs] == [b"m%d" % i for i in range(50)]
        assert quiet.flushed == 1
    finally:
        for a, b in pairs:
            a.close()
            b.close()


def test_python_code_run_by_the_checks_cannot_change_what_is_sent(pair: Pair) -> None:
    # A transport in Python runs code in is_closing(): the pending list is
    # read after it, so the loop never sends items that are gone.
    assert write is not None
    a, b = pair
    box = Outbox(a.fileno(), pending=[b"one", b"two"])

    class Emptying(Transport):
        def is_closing(self) -> bool:
            box.pending.clear()
            return False

    box.transport = Emptying()
    assert write([Sub(box)]) == (0, 0)
    assert box.flushed == 1
    with pytest.raises(BlockingIOError):
        b.recv(100)
