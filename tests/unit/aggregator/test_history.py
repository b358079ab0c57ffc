"""The in-memory history (the embedded default's ranges), fed events and
driven by a fake clock, and the view it shares with the SQL history."""

from __future__ import annotations

import pytest

from hub.aggregator.history import (
    MEMORY_MAX_ORGS,
    RANGES,
    MemoryHistory,
    UnknownRange,
)
from hub.store.base import StoredEvent

DAY = 86_400.0
#: A Monday 00:00 UTC, so buckets of every width start on it.
T0 = 1_790_640_000.0


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def event(org: str, at: float, seq: int = 1, user: str | None = None) -> StoredEvent:
    payload = {"user_id": user} if user else {}
    return StoredEvent(org, seq, f"id-{org}-{seq}-{at}", "t", payload, at)


async def test_ranges_bucket_events_by_created_at_and_empty_ranges_are_zeros() -> None:
    now = T0 + 40 * DAY + 300  # 5 minutes into a 10-minute bucket
    clock = Clock(now)
    history = MemoryHistory(clock=clock)
    empty = await history.view("7d")
    assert empty.network == [0] * 168 and empty.orgs == []
    history.durable(event("c", now - 35 * DAY))  # past the month: never shown
    history.durable(event("b", now - 20 * DAY))  # twenty days ago
    history.durable(event("b", now - 2 * DAY))  # two days ago
    history.durable(event("a", now - 3 * 3600, user="u2"))  # 3 hours ago
    history.durable(event("a", now - 30, user="u1"))  # this 10 minutes, this hour

    day = await history.view("24h", "a")
    assert (day.bucket, len(day.network), sum(day.network)) == (600, 144, 2)
    assert day.network[-1] == 1 and day.network[-1 - 18] == 1  # 3 h = 18 x 10 min
    assert day.org_series == day.network
    assert [(o.org, o.events, o.users) for o in day.orgs] == [("a", 2, 2)]

    week = await history.view("7d")
    assert (week.bucket, sum(week.network)) == (3600, 3)
    assert [(o.org, o.events) for o in week.orgs] == [("a", 2), ("b", 1)]

    month = await history.view("30d", "b")
    assert (month.bucket, len(month.network), sum(month.network)) == (21_600, 120, 4)
    assert month.org_series is not None and sum(month.org_series) == 2
    assert month.start == month.end - (month.end % 21_600) - 119 * 21_600


async def test_unknown_ranges_are_refused() -> None:
    with pytest.raises(UnknownRange, match="24h, 7d, 30d"):
        await MemoryHistory().view("1y")
    assert list(RANGES) == ["24h", "7d", "30d"]


async def test_csv_is_the_table_of_the_view() -> None:
    clock = Clock(T0)
    history = MemoryHistory(clock=clock)
    history.durable(event("b,quoted", T0 - 60))
    history.durable(event("a", T0 - 10, user="x"))
    history.durable(event("a", T0 - 5, seq=2, user="x"))
    view = await history.view("24h")
    assert view.csv().splitlines() == [
        "org,events,users,last_event_at",
        f"a,2,1,{_iso(T0 - 5)}",
        f'"b,quoted",1,0,{_iso(T0 - 60)}',
    ]


async def test_memory_is_bounded_in_orgs_and_time() -> None:
    clock = Clock(T0)
    history = MemoryHistory(clock=clock)
    for n in range(MEMORY_MAX_ORGS + 5):
        history.durable(event(f"o{n}", T0 - 1))
    assert len((await history.view("24h")).orgs) == MEMORY_MAX_ORGS
    # An hour later everything older than the month goes, orgs with it.
    clock.now = T0 + 31 * DAY
    history.durable(event("late", clock.now))
    assert [o.org for o in (await history.view("30d")).orgs] == ["late"]


def _iso(at: float) -> str:
    import time

    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(at))
