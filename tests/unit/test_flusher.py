"""hub/flusher.py on real event loops (uvloop, the hub's, and asyncio's own),
fed real socket input: what arrives in the poll after a mark is written in
the same flush, and nothing waits longer than that one poll."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable, Iterator

import pytest
import uvloop

from hub.flusher import Flusher

LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "uvloop": uvloop.new_event_loop,
    "asyncio": asyncio.new_event_loop,
}


class Recorder:
    """A Flushable that notes each flush and what had been given to it;
    marked once until flushed, as an outbox is."""

    def __init__(self, flusher: Flusher, flushes: list[list[bytes]]) -> None:
        self.flusher = flusher
        self.flushes = flushes
        self.got: list[bytes] = []

    def give(self, data: bytes) -> None:
        if not self.got:
            self.flusher.mark(self)
        self.got.append(data)

    def flush(self) -> None:
        self.flushes.append(self.got)
        self.got = []


def _input_in_two_polls(loop: asyncio.AbstractEventLoop, flusher: Flusher) -> list[list[bytes]]:
    """The first message is read and marked; reading it makes the second
    one arrive, so the loop sees it in its next poll, as a REST request
    sent concurrently with the first arrives while the first is fanned
    out.  Returns what each flush wrote."""
    flushes: list[list[bytes]] = []
    recorder = Recorder(flusher, flushes)
    reader, writer = socket.socketpair()
    reader.setblocking(False)
    done = loop.create_future()

    def readable() -> None:
        data = reader.recv(64)
        recorder.give(data)
        if data == b"first":
            writer.send(b"second")
        else:
            loop.call_later(0.05, done.set_result, None)

    loop.add_reader(reader.fileno(), readable)
    writer.send(b"first")
    try:
        loop.run_until_complete(done)
    finally:
        loop.remove_reader(reader.fileno())
        reader.close()
        writer.close()
    return flushes


@pytest.fixture(params=list(LOOPS))
def loop(request: pytest.FixtureRequest) -> Iterator[asyncio.AbstractEventLoop]:
    loop = LOOPS[request.param]()
    yield loop
    loop.close()


@pytest.fixture
def flusher(loop: asyncio.AbstractEventLoop) -> Flusher:
    flusher = Flusher()
    flusher.start(loop)
    return flusher


def test_input_of_the_next_poll_is_written_in_the_same_flush(
    loop: asyncio.AbstractEventLoop, flusher: Flusher
) -> None:
    assert _input_in_two_polls(loop, flusher) == [[b"first", b"second"]]


def test_a_flush_waits_for_one_poll_and_no_more(
    loop: asyncio.AbstractEventLoop, flusher: Flusher
) -> None:
    flushes: list[list[bytes]] = []
    recorder = Recorder(flusher, flushes)

    async def mark_and_count_turns() -> int:
        recorder.give(b"x")
        turns = 0
        while not flushes:
            await asyncio.sleep(0)
            turns += 1
        return turns

    # Marked, then flushed after the next turn's poll: two turns, with no
    # input coming meanwhile (the loop never sleeps for it).
    assert loop.run_until_complete(mark_and_count_turns()) == 2
    assert flushes == [[b"x"]]
