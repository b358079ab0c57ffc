"""The mother's window arithmetic, driven by a fake clock (plain numbers).

Every result is checked against a brute-force count over the events, so
"exact" means exact: an event at ``t`` is in a window of ``w`` buckets of
``width`` seconds at ``now`` iff ``floor(now / width) - w < floor(t / width)
<= floor(now / width)``.
"""

from __future__ import annotations

import math
import random
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hub.aggregator.mother import Mother
from hub.aggregator.windows import (
    MAX_TYPES_PER_ORG,
    OTHER_TYPE,
    EventAggregate,
    EventWindows,
    Recent,
    Ring,
    SlidingCount,
    TypeCounts,
    merge_shares,
)
from hub.store.base import StoredEvent
from hub.store.memory import MemoryStore
from tests.support.channels import local_channels

T0 = 1_699_999_980.0  # a whole minute


def brute(events: list[tuple[float, int]], now: float, width: int, buckets: int) -> int:
    head = math.floor(now / width)
    return sum(n for t, n in events if head - buckets < math.floor(t / width) <= head)


def event(org: str, seq: int, at: float, type_: str = "t") -> StoredEvent:
    return StoredEvent(org=org, seq=seq, id=f"{org}-{seq}", type=type_, payload={}, created_at=at)


# -- Ring -------------------------------------------------------------------------


def test_ring_counts_within_a_bucket_and_across_its_boundary() -> None:
    ring = Ring(1, 10, (3,))
    ring.add(T0 + 0.0)
    ring.add(T0 + 0.999)
    ring.add(T0 + 1.0)  # the next bucket
    assert ring.series(T0 + 1.5, 3) == [0, 2, 1]
    assert ring.window(T0 + 1.5, 3) == 3
    assert ring.window(T0 + 1.5, 1) == 1
    # At T0+3.0 the bucket of T0 is the 4th newest: out of a 3-bucket window.
    assert ring.window(T0 + 2.999, 3) == 3
    assert ring.window(T0 + 3.0, 3) == 1
    assert ring.window(T0 + 4.0, 3) == 0
    assert ring.total(T0 + 4.0) == 3


def test_ring_decays_to_zero_when_quiet() -> None:
    ring = Ring(1, 300, (60, 300))
    for i in range(100):
        ring.add(T0 + i * 0.5)  # 100 events over 50 s
    assert ring.window(T0 + 49.9, 60) == 100
    assert ring.window(T0 + 100, 60) == brute(
        [(T0 + i * 0.5, 1) for i in range(100)], T0 + 100, 1, 60
    )
    assert ring.window(T0 + 110, 60) == 0
    assert ring.window(T0 + 110, 300) == 100
    assert ring.window(T0 + 350, 300) == 0
    assert ring.series(T0 + 350) == [0] * 300


def test_ring_a_long_gap_clears_everything_at_once() -> None:
    ring = Ring(1, 60, (10,))
    ring.add(T0, 5)
    ring.add(T0 + 10_000, 2)  # far beyond the ring: everything else is gone
    assert ring.total(T0 + 10_000) == 2
    assert ring.window(T0 + 10_000, 10) == 2
    assert ring.series(T0 + 10_000, 3) == [0, 0, 2]


def test_ring_a_burst_in_one_bucket() -> None:
    ring = Ring(1, 60, (60,))
    ring.add(T0 + 0.5, 100_000)
    for i in range(1000):
        ring.add(T0 + 0.5 + i / 10_000)
    assert ring.series(T0 + 0.9, 2) == [0, 101_000]
    assert ring.window(T0 + 59.9, 60) == 101_000
    assert ring.window(T0 + 60.0, 60) == 0


def test_ring_late_events_land_in_their_own_bucket_or_are_dropped() -> None:
    ring = Ring(1, 10, (5,))
    ring.add(T0 + 20)
    assert ring.add(T0 + 15.5)  # late, but within the ring and outside the 5-window
    assert ring.add(T0 + 17)  # late, inside the 5-window
    assert not ring.add(T0 + 10.9)  # older than the ring
    assert ring.window(T0 + 20, 5) == 2
    assert ring.total(T0 + 20) == 3
    assert ring.series(T0 + 20, 6) == [1, 0, 1, 0, 0, 1]


def test_ring_clock_going_back_changes_nothing() -> None:
    ring = Ring(1, 10, (5,))
    ring.add(T0 + 5)
    assert ring.window(T0 + 3, 5) == 1  # now before the newest bucket: as of the newest
    assert ring.series(T0 + 3, 2) == [0, 1]


def test_ring_undeclared_windows_are_summed_and_bad_ones_refused() -> None:
    ring = Ring(60, 60, (60,))
    ring.add(T0 + 30)
    ring.add(T0 + 90)
    assert ring.window(T0 + 90, 2) == 2
    assert ring.window(T0 + 90, 1) == 1
    with pytest.raises(ValueError):
        ring.window(T0, 61)
    with pytest.raises(ValueError):
        Ring(1, 10, (11,))
    with pytest.raises(ValueError):
        Ring(0, 10)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(st.floats(0, 400, allow_nan=False), st.integers(1, 5)),
        max_size=60,
    ),
    st.floats(0, 500, allow_nan=False),
)
def test_ring_is_exact_for_any_arrival_order(steps: list[tuple[float, int]], extra: float) -> None:
    """Events arrive with times that mostly move forward but jump back and
    forth; every window matches a brute-force count over what was kept."""
    ring = Ring(1, 120, (7, 60, 120))
    kept: list[tuple[float, int]] = []
    newest = -math.inf
    for offset, n in steps:
        t = T0 + offset
        newest = max(newest, math.floor(t))
        if math.floor(t) > newest - 120:
            kept.append((t, n))
        ring.add(t, n)
        for w in (1, 7, 60, 120):
            assert ring.window(t, w) == brute(kept, max(t, newest), 1, w)
    now = T0 + extra
    head = max(now, newest) if math.isfinite(newest) else now
    for w in (7, 60, 120):
        assert ring.window(now, w) == brute(kept, head, 1, w)


# -- SlidingCount -------------------------------------------------------------------


def test_sliding_count_windows_and_series() -> None:
    count = SlidingCount()
    times = [T0 - 3500, T0 - 1000, T0 - 300, T0 - 298.5, T0 - 120, T0 - 59, T0 - 1, T0]
    for t in times:
        count.add(t)
    now = T0 + 0.5
    # T0 - 300 is in the bucket just before the 5-minute window.
    assert count.windows(now) == {"1m": 3, "5m": 5, "1h": 8}
    assert sum(count.per_second(now)) == 5
    assert sum(count.per_second(now, 60)) == 3
    assert len(count.per_second(now)) == 300
    per_minute = count.per_minute(now)
    assert len(per_minute) == 60 and sum(per_minute) == 8
    assert per_minute[-1] == 1  # T0 is a whole minute: only T0 itself is in this minute
    assert not count.idle(now)
    # An hour of quiet later: nothing left, in any window.
    later = T0 + 3600
    assert count.windows(later) == {"1m": 0, "5m": 0, "1h": 0}
    assert count.idle(later)


def test_sliding_count_drops_events_older_than_the_hour() -> None:
    count = SlidingCount()
    count.add(T0 + 30)
    # The hour is this minute and the 59 before it.
    assert not count.add(T0 - 3541)
    assert count.add(T0 - 3540)
    assert count.windows(T0 + 30) == {"1m": 1, "5m": 1, "1h": 2}


# -- types, recent, event windows -----------------------------------------------------


def test_type_counts_over_the_hour_are_capped_and_forgotten() -> None:
    types = TypeCounts(limit=3)
    for i, type_ in enumerate(["a", "a", "b", "c", "d", "e", "a"]):
        types.add(type_, T0 + i)
    assert types.counts(T0 + 10) == {"a": 3, OTHER_TYPE: 2, "b": 1, "c": 1}
    assert types.counts(T0 + 3600 + 60) == {}
    assert len(types) == 0  # forgotten: new types get their own count again
    types.add("z", T0 + 4000)
    assert types.counts(T0 + 4000) == {"z": 1}


def test_recent_keeps_the_newest_in_order_whatever_the_arrival_order() -> None:
    recent = Recent(3)
    for seq, at in [(5, 5.0), (6, 6.0), (1, 1.0), (7, 7.0), (4, 4.0), (8, 8.0), (2, 2.0)]:
        recent.add(event("o", seq, T0 + at))
    assert [e.seq for e in recent.newest()] == [8, 7, 6]
    for seq in range(9, 100):
        recent.add(event("o", seq, T0 + seq))
    assert [e.seq for e in recent.newest(2)] == [99, 98]
    assert len(recent) == 3


def test_event_windows_track_types_last_event_and_seq() -> None:
    windows = EventWindows(max_types=MAX_TYPES_PER_ORG, recent=5)
    windows.add(event("o", 1, T0 + 1, "x"))
    windows.add(event("o", 2, T0 + 2, "y"))
    windows.add(event("o", 3, T0 + 2.5, "x"))
    now = T0 + 10
    assert windows.count.windows(now) == {"1m": 3, "5m": 3, "1h": 3}
    assert windows.types.counts(now) == {"x": 2, "y": 1}
    assert windows.seq == 3
    assert windows.since_last(now) == pytest.approx(7.5)
    assert [e.seq for e in windows.recent.newest()] == [3, 2, 1]


# -- live stream and history, counted once --------------------------------------------


def test_history_then_live_counts_each_event_once() -> None:
    agg = EventAggregate()
    history = [event("o", seq, T0 + seq) for seq in range(1, 11)]
    for e in history[:6]:
        assert agg.history(e)
    # Live announcements start at 5 (they overlap what was read).
    for e in history[4:]:
        agg.live(e)
    for e in history[6:]:
        assert not agg.history(e)  # already counted live
    windows = agg.get("o")
    assert windows is not None
    assert windows.count.windows(T0 + 20)["1h"] == 10
    assert agg.network.count.windows(T0 + 20)["1h"] == 10


def test_live_before_history_counts_each_event_once() -> None:
    agg = EventAggregate()
    events = [event("o", seq, T0 + seq) for seq in range(1, 21)]
    # Live starts at seq 15; history reads 1..20 (16..20 committed, their
    # announcements not handled yet).
    for e in events[14:16]:
        assert agg.live(e)
    counted = [agg.history(e) for e in events]
    assert counted == [True] * 14 + [False, False] + [True] * 4
    for e in events[16:]:
        assert not agg.live(e)  # announced after the history counted them
    assert not agg.history(events[3])  # a re-read is never counted twice
    windows = agg.get("o")
    assert windows is not None
    assert windows.count.windows(T0 + 30)["1h"] == 20
    assert windows.seq == 20


def test_orgs_without_events_in_the_hour_are_pruned() -> None:
    agg = EventAggregate()
    agg.live(event("old", 1, T0))
    agg.live(event("new", 1, T0 + 3000))
    assert agg.prune(T0 + 3600) == ["old"]
    assert set(agg.orgs) == {"new"}
    assert agg.network.count.windows(T0 + 3600)["1h"] == 1


# -- merging the nodes' shares -------------------------------------------------------


def test_merge_shares_sums_counts_unions_users_and_takes_presence_per_topic() -> None:
    a = {
        "clients": 2,
        "users_count": 2,
        "users": ["u1", "u2"],
        "delivered_1m": 10,
        "refused_1h": 1,
        "orgs": {
            "x": {
                "clients": 2,
                "users_count": 2,
                "users": ["u1", "u2"],
                "presence": {"org:x": 3, "org:x:room": 1},
                "delivered_1m": 10,
                "refused_1h": 1,
            }
        },
    }
    b = {
        "clients": 1,
        "users_count": 1,
        "users": ["u1"],
        "delivered_1m": 4,
        "refused_1h": 0,
        "orgs": {
            "x": {
                "clients": 1,
                "users_count": 1,
                "users": ["u1"],
                "presence": {"org:x": 3},
                "delivered_1m": 4,
                "refused_1h": 0,
            },
            "y": {"clients": 1, "users_count": 1, "users": ["u9"], "presence": {"org:y": 1}},
        },
    }
    network, orgs = merge_shares([a, b])
    assert (network.clients, network.users, network.delivered_1m, network.refused_1h) == (
        3,
        2,
        14,
        1,
    )
    assert network.user_ids == ["u1", "u2"]
    assert orgs["x"].clients == 3
    assert orgs["x"].users == 2 and orgs["x"].user_ids == ["u1", "u2"]
    assert orgs["x"].presence == 4  # max(3, 3) on org:x, plus 1 on the room
    assert orgs["x"].delivered_1m == 14
    assert orgs["y"].presence == 1 and orgs["y"].delivered_1m == 0
    assert network.presence == 5


def test_merge_shares_sums_user_counts_when_a_list_is_incomplete() -> None:
    a = {"clients": 500, "users_count": 300, "users": ["u1"]}
    b = {"clients": 1, "users_count": 1, "users": ["u1"]}
    network, _ = merge_shares([a, b])
    assert network.users == 301


def test_merge_shares_ignores_malformed_fields() -> None:
    network, orgs = merge_shares(
        [{"clients": "many", "orgs": {"x": "bad", 5: {}}, "users": None}, {"clients": True}]
    )
    assert network.clients == 0 and orgs == {}


def test_random_traffic_matches_brute_force() -> None:
    rng = random.Random(7)
    count = SlidingCount()
    events: list[tuple[float, int]] = []
    now = T0
    for _ in range(5000):
        now += rng.expovariate(2.0) if rng.random() < 0.98 else rng.uniform(60, 900)
        t = now - rng.uniform(0, 3) if rng.random() < 0.1 else now
        events.append((t, 1))
        count.add(t)
        if rng.random() < 0.05:
            windows = count.windows(now)
            assert windows["1m"] == brute(events, now, 1, 60)
            assert windows["5m"] == brute(events, now, 1, 300)
            assert windows["1h"] == brute(events, now, 60, 60)


# -- the aggregator on a fake clock (no sockets, no server) ---------------------------


class FakeClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def make_mother(clock: FakeClock, store: Any = None) -> Mother:
    channels = local_channels()
    mother = Mother(channels=channels, store=store or MemoryStore(), node_id="n1", clock=clock)
    channels.observers.add(mother)
    return mother


def test_mother_snapshot_decays_as_the_clock_moves() -> None:
    clock = FakeClock(T0 + 0.5)
    mother = make_mother(clock)
    mother.rebuilt = True
    for seq in range(1, 6):
        mother.durable(event("acme", seq, T0 + seq * 0.1, "order"))
    mother.durable(event("globex", 1, T0 + 0.2, "deploy"))

    snap = mother.snapshot()
    acme = next(o for o in snap["orgs"] if o["org"] == "acme")
    assert acme["events"] == {"1m": 5, "5m": 5, "1h": 5}
    assert acme["types"] == {"order": 5} and acme["seq"] == 5
    assert snap["network"]["events"]["1h"] == 6
    assert snap["network"]["orgs"] == snap["network"]["active_orgs"] == 2

    clock.now = T0 + 61  # a minute later: out of the 1-minute window only
    acme = next(o for o in mother.snapshot()["orgs"] if o["org"] == "acme")
    assert acme["events"] == {"1m": 0, "5m": 5, "1h": 5}
    assert acme["since_last_event"] == pytest.approx(60.5)

    clock.now = T0 + 301
    snap = mother.snapshot()
    assert snap["network"]["events"] == {"1m": 0, "5m": 0, "1h": 6}
    assert snap["network"]["active_orgs"] == 0

    clock.now = T0 + 3600  # an hour of quiet: the orgs leave the snapshot
    snap = mother.snapshot()
    assert snap["orgs"] == [] and snap["network"]["events"]["1h"] == 0
    # The latest events seen stay listed, newest first.
    assert [(e["org"], e["seq"]) for e in snap["recent"]] == [
        ("acme", 5),
        ("acme", 4),
        ("acme", 3),
        ("globex", 1),
        ("acme", 2),
        ("acme", 1),
    ]


async def test_mother_rebuilds_from_the_store_and_counts_each_event_once() -> None:
    store = MemoryStore()
    stored = await store.append("acme", [("a", {}), ("b", {}), ("a", {})])
    clock = FakeClock(stored[-1].created_at + 1)
    mother = make_mother(clock, store)
    store.listen(mother.durable)
    # A live event arrives before the history is read: counted once.
    [late] = await store.append("acme", [("c", {})])
    await mother.rebuild()
    assert mother.rebuilt
    acme = next(o for o in mother.snapshot()["orgs"] if o["org"] == "acme")
    assert acme["events"]["1h"] == 4 and acme["seq"] == late.seq == 4
    assert acme["types"] == {"a": 2, "b": 1, "c": 1}
    assert not mother.snapshot()["rebuilding"]
