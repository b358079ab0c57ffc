"""hub._writes, the compiled fan-out writes, against real socket pairs: it
writes a socket's frames itself only when its list offers a descriptor,
leaves exactly the unsent bytes pending when the kernel takes part, and
hands every other case to the outbox's own flush.  Its frame list,
``Pending``, behaves as the pure-Python one (hub/outbox.py)."""

from __future__ import annotations

import itertools
import socket
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from hub.outbox import PYTHON_WRITES, FrameList, Pending, native_writes

native = native_writes()
write = native.flush if native is not None else None
Pair = tuple[socket.socket, socket.socket]


def _pending(fd: int, frames: list[bytes]) -> FrameList:
    assert native is not None
    pending = native.pending()
    for frame in frames:
        pending(frame)
    pending.fd = fd
    return pending


@dataclass
class Outbox:
    """What the compiled loop uses of a SocketOutbox: its flush, for what
    it does not write itself."""

    pending: Any = None
    flushed: int = 0
    on_flush: Callable[[], None] | None = None

    def flush(self) -> None:
        self.flushed += 1
        if self.on_flush is not None:
            self.on_flush()


@dataclass(eq=False)
class Sub:
    outbox: Outbox = field(default_factory=Outbox)


def _group(*lists: Any) -> tuple[dict[Sub, Any], list[Outbox]]:
    outboxes = [Outbox(pending) for pending in lists]
    return {Sub(box): box.pending for box in outboxes}, outboxes


@pytest.fixture
def pair() -> Iterator[Pair]:
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    yield a, b
    a.close()
    b.close()


def _drain(sock: socket.socket) -> bytes:
    received = b""
    while True:
        try:
            chunk = sock.recv(1 << 20)
        except BlockingIOError:
            return received
        received += chunk


def test_the_extension_is_built() -> None:
    # `pip install -e .` builds it on this kind of machine; a missing build
    # would make every other test here meaningless.
    assert native is not None


@pytest.mark.parametrize("kind", ["compiled", "python"])
def test_the_frame_list_keeps_frames_and_pushed_bytes(kind: str) -> None:
    assert native is not None
    pending = (native if kind == "compiled" else PYTHON_WRITES).pending()
    assert pending.fd == -1 and len(pending) == 0
    pending(b"sunk")
    assert pending.push(b"pushed") == 6
    assert pending.push(b"again") == 11
    # Past the inline slots of the compiled list, and back.
    for i in range(200):
        pending(b"%d" % i)
    assert len(pending) == 203
    assert list(pending)[:3] == [b"sunk", b"pushed", b"again"]
    assert pending[202] == b"199"
    pending.clear()
    assert len(pending) == 0 and list(pending) == [] and pending.push(b"x") == 1


def test_the_compiled_list_takes_bytes_only() -> None:
    # Bytes refer to nothing: the list needs no garbage-collector support.
    pending = _pending(-1, [])
    for wrong in ("text", bytearray(b"x"), memoryview(b"x"), 1):
        with pytest.raises(TypeError):
            pending(wrong)  # type: ignore[arg-type]
        with pytest.raises(TypeError):
            pending.push(wrong)  # type: ignore[arg-type]
    assert len(pending) == 0


def test_fan_out_gives_every_sink_but_the_origins_as_the_python_loop_does() -> None:
    assert native is not None
    for loop in (native.fan_out, PYTHON_WRITES.fan_out):
        lists: dict[str, Any] = {"a": native.pending(), "b": [], "c": Pending()}
        group = {
            name: frames.append if isinstance(frames, list) and name == "b" else frames
            for name, frames in lists.items()
        }
        assert loop(group, b"f1", None) == 3
        assert loop(group, b"f2", "b") == 2
        assert loop(group, b"f3", "nobody") == 3
        got = {name: list(frames) for name, frames in lists.items()}
        assert got == {"a": [b"f1", b"f2", b"f3"], "b": [b"f1", b"f3"], "c": [b"f1", b"f2", b"f3"]}


def test_pending_frames_go_to_the_socket_in_order(pair: Pair) -> None:
    assert write is not None
    a, b = pair
    pending = _pending(a.fileno(), [b"first"])
    assert pending.push(b"-second") == 7
    group, (box,) = _group(pending)
    assert write(group) == (2, 12)
    assert b.recv(100) == b"first-second"
    # Emptied, pushed bytes counted from zero again, no flush needed.
    assert len(pending) == 0 and pending.push(b"") == 0 and box.flushed == 0


@pytest.mark.parametrize(
    "make",
    [
        lambda fd: _pending(-1, [b"frame"]),
        lambda fd: _pending(fd, [b"x"] * 1025),
        lambda fd: Pending(),
        lambda fd: [].append,
    ],
    # No fd also stands for a closed outbox, a close frame sent, the end of
    # the stream, and a transport holding unsent bytes (HubSocket takes it
    # away from pause_writing() to resume_writing()).
    ids=["no-fd", "too-many-frames", "python-list", "other-sink"],
)
def test_every_other_case_is_the_outboxs_own_flush(pair: Pair, make: Any) -> None:
    assert write is not None
    a, b = pair
    sink = make(a.fileno())
    before = list(sink) if hasattr(sink, "__len__") else None
    group, (box,) = _group(sink)
    assert write(group) == (0, 0)
    assert box.flushed == 1
    if before is not None:
        assert list(sink) == before
    with pytest.raises(BlockingIOError):
        b.recv(100)


def test_nothing_pending_is_no_flush(pair: Pair) -> None:
    assert write is not None
    group, boxes = _group(_pending(pair[0].fileno(), []), _pending(-1, []))
    assert write(group) == (0, 0)
    assert [box.flushed for box in boxes] == [0, 0]


def test_what_the_kernel_does_not_take_stays_pending(pair: Pair) -> None:
    assert write is not None
    a, b = pair
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    frames = [bytes([65 + i]) * 100_000 for i in range(3)]
    pending = _pending(a.fileno(), frames)
    group, (box,) = _group(pending)
    done, sent = write(group)
    assert 0 < sent < 300_000
    assert box.flushed == 1  # the rest is the transport's
    # Written and pending add up to the frames, byte for byte, in order.
    received = _drain(b)
    assert len(received) == sent
    assert received + b"".join(pending) == b"".join(frames)
    # The frames sent whole are counted; the one cut, with what follows it,
    # is counted by the flush that writes the rest.
    assert done == sum(1 for end in itertools.accumulate(map(len, frames)) if end <= sent)


def test_partial_writes_of_any_frame_size_keep_the_stream_whole(pair: Pair) -> None:
    # The kernel stops where its buffer is full: inside a frame, or at a
    # boundary.  Either way what was sent, then what is pending, is the
    # stream, whatever the frames' sizes.
    assert write is not None
    a, b = pair
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    for size in (1, 7, 4096, 65_536):
        frames = [bytes([48 + i % 10]) * size for i in range(40)]
        pending = _pending(a.fileno(), frames)
        group, _ = _group(pending)
        _, sent = write(group)
        received = b""
        while len(received) < sent:
            received += b.recv(1 << 20)
        assert received + b"".join(pending) == b"".join(frames)
        pending.clear()


def test_a_failed_send_leaves_everything_to_the_flush(pair: Pair) -> None:
    assert write is not None
    a, b = pair
    b.close()  # the peer is gone: EPIPE
    pending = _pending(a.fileno(), [b"lost?"])
    group, (box,) = _group(pending)
    assert write(group) == (0, 0)
    assert box.flushed == 1 and list(pending) == [b"lost?"]


def test_one_loop_over_many_subscriptions() -> None:
    assert write is not None
    pairs = [socket.socketpair() for _ in range(50)]
    try:
        lists = [_pending(a.fileno(), [b"m%d" % i]) for i, (a, _) in enumerate(pairs)]
        quiet = _pending(-1, [b"slow path"])
        group, outboxes = _group(*lists, quiet)
        assert write(group) == (50, sum(len(b"m%d" % i) for i in range(50)))
        assert [b.recv(10) for _, b in pairs] == [b"m%d" % i for i in range(50)]
        assert [box.flushed for box in outboxes] == [0] * 50 + [1]
    finally:
        for a, b in pairs:
            a.close()
            b.close()


def test_a_flush_that_unsubscribes_others_does_not_break_the_loop(pair: Pair) -> None:
    # The outboxes' flushes run Python, which may close a socket and so take
    # subscriptions out of the topic; the loop flushes what is still there.
    assert write is not None
    group, outboxes = _group(*(_pending(-1, [b"x"]) for _ in range(10)))
    subs = list(group)

    def leave() -> None:
        for sub in subs[5:]:
            group.pop(sub, None)

    outboxes[0].on_flush = leave
    assert write(group) == (0, 0)
    assert [box.flushed for box in outboxes] == [1] * 5 + [0] * 5


def test_subscribers_holding_the_same_frames_get_them_whole_and_in_order() -> None:
    # From the second subscriber in a row with the same frames, they go as
    # one joined buffer; every socket still gets exactly its own frames.
    assert write is not None
    frames = [b"frame-%d;" % i for i in range(40)]
    pairs = [socket.socketpair() for _ in range(6)]
    try:
        for _, b in pairs:
            b.setblocking(False)
        held = [list(frames) for _ in pairs]
        held[3] = frames[:-1]  # one that differs, between runs of the same
        lists = [_pending(a.fileno(), mine) for (a, _), mine in zip(pairs, held, strict=True)]
        refs = [sys.getrefcount(f) for f in frames]
        group, outboxes = _group(*lists)
        assert write(group) == (sum(map(len, held)), sum(len(b"".join(m)) for m in held))
        assert [_drain(b) for _, b in pairs] == [b"".join(mine) for mine in held]
        assert [box.flushed for box in outboxes] == [0] * 6
        # Every reference the lists and the joined run took is given back.
        holders = [sum(1 for mine in held if f in mine) for f in frames]
        assert [sys.getrefcount(f) for f in frames] == [
            r - n for r, n in zip(refs, holders, strict=True)
        ]
    finally:
        for a, b in pairs:
            a.close()
            b.close()


def test_a_joined_buffer_cut_by_the_kernel_leaves_exactly_the_rest_pending() -> None:
    assert write is not None
    frames = [bytes([65 + i]) * 50_000 for i in range(8)]
    pairs = [socket.socketpair() for _ in range(3)]
    try:
        for a, b in pairs:
            a.setblocking(False)
            b.setblocking(False)
            a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        lists = [_pending(a.fileno(), frames) for a, _ in pairs]
        group, outboxes = _group(*lists)
        _, sent = write(group)
        assert 0 < sent < 3 * 400_000
        for (_, b), pending, box in zip(pairs, lists, outboxes, strict=True):
            assert box.flushed == 1
            assert _drain(b) + b"".join(pending) == b"".join(frames)
    finally:
        for a, b in pairs:
            a.close()
            b.close()


@pytest.mark.parametrize("kind", ["compiled", "python"])
def test_fan_out_later_gives_what_fan_out_would_in_the_order_of_the_calls(kind: str) -> None:
    # The compiled loop keeps consecutive broadcasts to one topic and gives
    # them together; whatever comes between (another topic, a push, a
    # fan-out with a sender, a read) sees every list as if each had been
    # given at once.
    assert native is not None
    writes = native if kind == "compiled" else PYTHON_WRITES
    a, b, c, d = (writes.pending() for _ in range(4))
    called: list[bytes] = []  # a sink that is not a frame list
    t1_v2: dict[Any, Any] = {"a": a, "b": b, "py": called.append}
    t1_v1: dict[Any, Any] = {"d": d}
    t2_v2: dict[Any, Any] = {"b again": b, "c": c}
    assert writes.fan_out_later(t1_v2, b"m1", t1_v1, b"m1 v1") == 4
    assert writes.fan_out_later(t1_v2, b"m2", t1_v1, None) == 3
    assert len(a) == 2  # read before any settle(): it settles
    assert writes.fan_out_later(t1_v2, b"m3", t1_v1, None) == 3
    assert writes.fan_out_later(t2_v2, b"m4", {}, b"no v1 subscriber") == 2
    assert b.push(b"reply") == 5
    assert writes.fan_out_later(t1_v2, b"m5", t1_v1, b"m5 v1") == 4
    assert writes.fan_out(t1_v2, b"m6", "a") == 2
    assert writes.fan_out_later(t1_v2, b"m7", t1_v1, None) == 3
    writes.settle()
    assert list(a) == [b"m1", b"m2", b"m3", b"m5", b"m7"]
    assert list(b) == [b"m1", b"m2", b"m3", b"m4", b"reply", b"m5", b"m6", b"m7"]
    assert list(c) == [b"m4"]
    assert list(d) == [b"m1 v1", b"m5 v1"]
    assert called == [b"m1", b"m2", b"m3", b"m5", b"m6", b"m7"]


def test_fan_out_later_takes_one_reference_per_list_and_they_are_all_given_back() -> None:
    assert native is not None
    frames = [b"frame-%d" % i for i in range(300)]  # past a run's first growth
    refs = [sys.getrefcount(f) for f in frames]
    lists = [native.pending() for _ in range(5)]
    group = dict(enumerate(lists))
    no_v1: dict[Any, Any] = {}  # the same groups each time: one run of 300
    for frame in frames:
        native.fan_out_later(group, frame, no_v1, None)
    del frame
    assert [sys.getrefcount(f) for f in frames] == [r + 1 for r in refs]  # the run's
    native.settle()
    # (Counted without zip(), whose reused tuple would hold one more.)
    assert [sys.getrefcount(f) for f in frames] == [r + 5 for r in refs]
    assert all(list(pending) == frames for pending in lists)
    for pending in lists:
        pending.clear()
    assert [sys.getrefcount(f) for f in frames] == refs


def test_lists_that_send_a_shared_run_whole_give_its_references_back(pair: Pair) -> None:
    # Two lists with the same frames: the second sends the joined run and
    # leaves its references to it; all come back when the flush ends.
    assert native is not None and write is not None
    frames = [b"frame-%d;" % i for i in range(40)]
    refs = [sys.getrefcount(f) for f in frames]
    other = socket.socketpair()
    try:
        lists = [_pending(pair[0].fileno(), frames), _pending(other[0].fileno(), frames)]
        group, _ = _group(*lists)
        assert write(group) == (80, 2 * len(b"".join(frames)))
        assert [sys.getrefcount(f) for f in frames] == refs
        assert _drain(pair[1]) == b"".join(frames)
    finally:
        other[0].close()
        other[1].close()


def test_a_sink_that_runs_python_finds_the_lists_references_taken() -> None:
    # A sink that is not a frame list runs Python, which may release what a
    # list already given the run's frames holds; those lists' references
    # must be counted before it runs, or a frame held by nothing else
    # would be freed while a list still refers to it.
    assert native is not None
    frames = [b"frame-%d" % i for i in range(3)]
    base = sys.getrefcount(frames[0])
    first, last = native.pending(), native.pending()
    seen: list[int] = []

    def clearing_sink(wire: bytes) -> None:
        if not seen:
            first.clear()  # the first list had all three; it lets them go
            seen.append(sys.getrefcount(frames[0]) - base)

    group: dict[Any, Any] = {"first": first, "python": clearing_sink, "last": last}
    no_v1: dict[Any, Any] = {}
    for frame in frames:
        native.fan_out_later(group, frame, no_v1, None)
    del frame
    native.settle()
    # While the sink ran: the run's own reference and the sink's argument
    # (the first list's was taken, then released by clear()).
    assert seen == [2]
    held = sys.getrefcount(frames[0]) - base  # before an assert keeps a list of them
    assert held == 1  # the last list's
    assert list(last) == frames
