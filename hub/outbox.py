"""Where a connection's outbound frames go: the :class:`Outbox` interface.

The session and the fan-out see only this interface; the socket-backed
outbox is :class:`hub.transport.outbox.SocketOutbox`.  :class:`ListOutbox`
keeps what it is given (tests, tools).  No I/O happens here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from hub.frames import Frame

#: Appends one frame, given as its ``wire`` bytes, to an outbox without
#: scheduling a write.
Sink = Callable[[bytes], None]


class Flushable(Protocol):
    """Something with frames to write at the next flush (:mod:`hub.flusher`)."""

    def flush(self) -> None: ...


class FrameList(Protocol):
    """The frames due on one socket, in order (:class:`Pending`, or the
    compiled ``hub._writes.Pending``).  Calling it appends a frame: it is
    the socket outbox's sink, and what the compiled loops read and write."""

    #: The socket the compiled loop may write to itself, or -1.
    fd: int

    def __call__(self, wire: bytes, /) -> None: ...

    def __len__(self) -> int: ...

    def __getitem__(self, index: int, /) -> bytes: ...

    def __iter__(self) -> Iterator[bytes]: ...

    def push(self, wire: bytes, /) -> int: ...

    def clear(self) -> None: ...


class Pending(list[bytes]):
    """:class:`FrameList` in Python, for where ``hub._writes`` is not built.

    ``pushed`` counts the bytes added by :meth:`push` (frames meant for this
    connection alone) since the list was last emptied."""

    __slots__ = ("fd", "pushed")

    def __init__(self) -> None:
        super().__init__()
        self.fd = -1
        self.pushed = 0

    # A bound list.append without a Python frame per call.
    __call__ = list.append

    def push(self, wire: bytes) -> int:
        self.append(wire)
        self.pushed += len(wire)
        return self.pushed

    def clear(self) -> None:
        super().clear()
        self.pushed = 0


#: Writes the frames of a topic's subscribers (a dict of subscriptions to
#: sinks; a subscription has an ``outbox``); returns the frames and bytes it
#: wrote itself (outboxes count what their own flush writes).
FlushSubscribers = Callable[[dict[Any, Sink]], tuple[int, int]]
#: Gives a frame (its wire bytes) to every sink of a topic's subscribers but
#: the sender's (``origin``); returns how many got it.
FanOut = Callable[[dict[Any, Sink], bytes, object], int]
#: Gives a broadcast without a sender to a topic's two groups (v2 and its
#: wire, v1 and its wire; a wire of None: that group gets nothing), possibly
#: later, but before anything else uses a frame list; returns how many get it.
FanOutLater = Callable[[dict[Any, Sink], bytes | None, dict[Any, Sink], bytes | None], int]


def flush_subscribers(group: dict[Any, Sink]) -> tuple[int, int]:
    """The pure-Python path: each outbox's own :meth:`Outbox.flush`."""
    for sub in list(group):  # a copy: a flush may close
        sub.outbox.flush()
    return 0, 0


def fan_out(group: dict[Any, Sink], wire: bytes, origin: object) -> int:
    """The pure-Python path: every sink in ``group`` but ``origin``'s."""
    if origin is None or origin not in group:
        for sink in group.values():
            sink(wire)
        return len(group)
    for sub, sink in group.items():
        if sub is not origin:
            sink(wire)
    return len(group) - 1


def fan_out_later(
    v2: dict[Any, Sink],
    wire2: bytes | None,
    v1: dict[Any, Sink],
    wire1: bytes | None,
) -> int:
    """The pure-Python path gives the frames at once."""
    count = 0
    if wire2 is not None:
        count += fan_out(v2, wire2, None)
    if wire1 is not None:
        count += fan_out(v1, wire1, None)
    return count


def settle() -> None:
    """The pure-Python path keeps nothing for later."""


@dataclass(frozen=True, slots=True)
class Writes:
    """The fan-out's inner loops (frames to sinks, outboxes to sockets),
    and the frame list of a socket's outbox they work on.

    ``fan_out_later`` may keep consecutive broadcasts to one topic and give
    them to its sinks together (the compiled loop does); ``settle`` gives
    them now, and must be called before a topic's groups change, so that a
    subscriber gets exactly what was published while it was subscribed."""

    fan_out: FanOut
    flush: FlushSubscribers
    pending: Callable[[], FrameList]
    fan_out_later: FanOutLater
    settle: Callable[[], None]


PYTHON_WRITES = Writes(fan_out, flush_subscribers, Pending, fan_out_later, settle)


def native_writes() -> Writes | None:
    """The same loops and list in C (hub/_writes.c): the flush writes a
    socket's frames itself when its list offers a file descriptor (``fd``);
    None where the extension was not built."""
    try:
        from hub import _writes
    except ImportError:
        return None
    return Writes(
        _writes.fan_out,
        _writes.flush_subscribers,
        _writes.Pending,
        _writes.fan_out_later,
        _writes.settle,
    )


class Outbox:
    """Where a connection's outbound frames go.  The interface the session
    and the fan-out see; :mod:`hub.transport.outbox` holds the socket-backed one.

    ``push`` never blocks and never awaits: a connection that cannot keep up
    is closed, not waited for.

    ``sink`` is the fan-out's way in, and takes a frame's ``wire`` bytes:
    for a socket it is its :class:`FrameList`, which the compiled loops
    fill and write without a call per subscriber.  A sink does not schedule
    a write; whoever uses it must get :meth:`flush` called before the loop
    sleeps (the registry does this once per topic per flush) or
    call :meth:`schedule`.  Outboxes that are not sockets take the slow
    way: the frame is rebuilt and pushed.
    """

    __slots__ = ("closed", "sink")

    def __init__(self) -> None:
        self.closed = False
        self.sink: Sink = self._push_wire

    def _push_wire(self, wire: bytes) -> None:
        self.push(Frame.from_wire(wire))

    def push(self, frame: Frame) -> None:
        raise NotImplementedError

    def schedule(self) -> None:
        """Make sure frames added through ``sink`` are written soon."""

    def flush(self) -> None:
        """Write what is waiting now (outboxes that write at once: no-op)."""

    def close(self, code: int, reason: str = "") -> None:
        raise NotImplementedError


class ListOutbox(Outbox):
    """An outbox that keeps what it is given: for tests and for tools."""

    def __init__(self) -> None:
        super().__init__()
        self.frames: list[Frame] = []
        self.close_code: int | None = None
        self.close_reason = ""

    def push(self, frame: Frame) -> None:
        if not self.closed:
            self.frames.append(frame)

    def close(self, code: int, reason: str = "") -> None:
        if not self.closed:
            self.closed = True
            self.close_code = code
            self.close_reason = reason
