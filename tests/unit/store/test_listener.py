"""The store listener's announcements: each event once and in order per org,
also when two listeners share what was announced (an org moving between
databases).  No database: the reads are the test's."""

from __future__ import annotations

from typing import Any

from hub.store.base import StoredEvent
from hub.store.listener import Listener


def event(seq: int) -> StoredEvent:
    return StoredEvent("a", seq, f"e{seq}", "t", {}, 0.0)


def listener(announced: dict[str, int], delivered: list[int], read: Any = None) -> Listener:
    async def no_seqs() -> dict[str, int]:
        return {}

    return Listener(
        "",
        application_name="test",
        liveness_interval=1.0,
        liveness_timeout=1.0,
        reconnect_min=0.1,
        reconnect_max=1.0,
        queue_size=10,
        read=read,
        org_seqs=no_seqs,
        deliver=lambda e: delivered.append(e.seq),
        announced=announced,
    )


async def test_what_another_listener_announced_during_a_read_is_not_announced_again() -> None:
    """The old database's listener announces seq 3 while the new one's gap
    read (for the notification of seq 5) is in flight and returns 3 and 4."""
    announced = {"a": 2}
    delivered: list[int] = []
    old = listener(announced, delivered)

    async def read(org: str, *, after: int = 0, limit: int = 100) -> list[StoredEvent]:
        old._announce(event(3))
        return [event(seq) for seq in range(after + 1, after + 1 + limit)]

    new = listener(announced, delivered, read)
    await new._handle(event(5))
    assert delivered == [3, 4, 5]
    await new._handle(event(4))
    old._announce(event(5))
    assert delivered == [3, 4, 5]
    assert announced == {"a": 5}
