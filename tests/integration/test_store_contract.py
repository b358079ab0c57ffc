"""The event store contract, run against every store: MemoryStore and
PostgresStore (on a real database) must be indistinguishable to the hub."""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest

from hub.store.base import MAX_READ, EventStore, StoredEvent, StoreError
from hub.store.memory import MemoryStore
from hub.store.postgres import PostgresStore
from tests.support.pg import Announced, new_org, pg_dsn  # noqa: F401 - fixture


@dataclass
class Harness:
    store: EventStore
    announced: Announced
    #: The database of a PostgresStore.
    dsn: str | None = None

    async def settle(self) -> None:
        """Give a networked store time to announce anything unexpected."""
        if isinstance(self.store, PostgresStore):
            await asyncio.sleep(0.2)


@pytest.fixture(params=["memory", "postgres"])
async def harness(request: pytest.FixtureRequest) -> AsyncIterator[Harness]:
    store: EventStore
    dsn: str | None = None
    if request.param == "memory":
        store = MemoryStore()
    else:
        dsn = request.getfixturevalue("pg_dsn")
        store = PostgresStore(dsn, pool_max=20)
    announced = Announced()
    store.listen(announced)
    await store.start()
    try:
        assert store.ready or isinstance(store, PostgresStore)
        yield Harness(store, announced, dsn)
    finally:
        await store.stop()


def assert_same(a: StoredEvent, b: StoredEvent) -> None:
    """Equal events: created_at may differ by float rounding of the wire."""
    assert (a.org, a.seq, a.id, a.type, a.payload, a.kind) == (
        b.org,
        b.seq,
        b.id,
        b.type,
        b.payload,
        b.kind,
    )
    assert a.created_at == pytest.approx(b.created_at, abs=1e-5)


async def test_append_one_event(harness: Harness) -> None:
    store, org = harness.store, new_org()
    before = time.time()
    [event] = await store.append(org, [("greeting", {"text": "hello", "n": 1})])
    assert event.org == org
    assert event.seq == 1
    assert event.type == "greeting"
    assert event.payload == {"text": "hello", "n": 1}
    assert event.kind == "event"
    assert uuid.UUID(event.id).version == 4
    assert before - 1 <= event.created_at <= time.time() + 1
    assert event.meta() == {"id": event.id, "seq": 1}
    [second] = await store.append(org, [("greeting", None)])
    assert second.seq == 2
    assert second.payload is None
    assert second.id != event.id


async def test_append_batch_is_consecutive(harness: Harness) -> None:
    store, org = harness.store, new_org()
    first = await store.append(org, [("a", 1), ("b", [1, 2]), ("c", "three")])
    assert [e.seq for e in first] == [1, 2, 3]
    assert [e.type for e in first] == ["a", "b", "c"]
    assert [e.payload for e in first] == [1, [1, 2], "three"]
    assert len({e.id for e in first}) == 3
    assert [e.created_at for e in first] == sorted(e.created_at for e in first)
    assert await store.append(org, []) == []
    more = await store.append(org, [("d", {}), ("e", {})], kind="change")
    assert [(e.seq, e.kind) for e in more] == [(4, "change"), (5, "change")]
    stored = await store.read(org)
    for a, b in zip(stored, first + more, strict=True):
        assert_same(a, b)


async def test_payloads_round_trip(harness: Harness) -> None:
    store, org = harness.store, new_org()
    payloads: list[Any] = [
        {"nested": {"list": [1, 2.5, True, False, None], "empty": {}}},
        "ünïcødé ✓ 🚀",
        -12345678901234,
        0.1,
        [],
        {"quote": "\"'\\", "newline": "a\nb"},
    ]
    stored = await store.append(org, [("p", p) for p in payloads])
    assert [e.payload for e in stored] == payloads
    assert [e.payload for e in await store.read(org)] == payloads
    announced = await harness.announced.wait_for(org, len(payloads))
    assert [e.payload for e in announced] == payloads


async def test_orgs_are_independent(harness: Harness) -> None:
    store, a, b = harness.store, new_org(), new_org()
    await store.append(a, [("x", 1)])
    await store.append(b, [("x", 1), ("x", 2)])
    await store.append(a, [("x", 2)])
    assert [e.seq for e in await store.read(a)] == [1, 2]
    assert [e.seq for e in await store.read(b)] == [1, 2]
    assert await store.last_seq(a) == 2
    assert [e.payload for e in await harness.announced.wait_for(b, 2)] == [1, 2]


async def test_read_after_and_limit(harness: Harness) -> None:
    store, org = harness.store, new_org()
    await store.append(org, [("n", i) for i in range(1, 11)])
    assert [e.seq for e in await store.read(org, after=0, limit=3)] == [1, 2, 3]
    assert [e.seq for e in await store.read(org, after=7)] == [8, 9, 10]
    assert [e.seq for e in await store.read(org, after=4, limit=2)] == [5, 6]
    assert await store.read(org, after=10) == []
    assert await store.read(org, after=99) == []
    assert await store.read(org, limit=0) == []
    assert await store.read(new_org()) == []
    # Never more than MAX_READ, whatever the caller asks for.
    await store.append(org, [("n", i) for i in range(MAX_READ)])
    page = await store.read(org, after=0, limit=MAX_READ * 5)
    assert [e.seq for e in page] == list(range(1, MAX_READ + 1))


async def test_read_since(harness: Harness) -> None:
    store, org = harness.store, new_org()
    first = await store.append(org, [("n", 1), ("n", 2)])
    await asyncio.sleep(0.02)
    later = await store.append(org, [("n", 3), ("n", 4), ("n", 5)])
    since = later[0].created_at
    assert first[-1].created_at < since
    got = await store.read_since(org, since=since)
    assert [e.seq for e in got] == [3, 4, 5]
    assert [e.seq for e in await store.read_since(org, since=since, limit=2)] == [3, 4]
    assert [e.seq for e in await store.read_since(org, since=0)] == [1, 2, 3, 4, 5]
    assert await store.read_since(org, since=time.time() + 60) == []
    assert await store.read_since(new_org(), since=0) == []


async def test_last_and_first_seq(harness: Harness) -> None:
    store, org = harness.store, new_org()
    assert await store.last_seq(org) == 0
    assert await store.first_seq(org) == 0
    await store.append(org, [("n", 1), ("n", 2), ("n", 3)])
    assert await store.last_seq(org) == 3
    assert await store.first_seq(org) == 1


async def test_seq_of_finds_an_event_by_id_within_its_org(harness: Harness) -> None:
    store, org = harness.store, new_org()
    stored = await store.append(org, [("n", 1), ("n", 2)])
    assert await store.seq_of(org, stored[1].id) == 2
    assert await store.seq_of(new_org(), stored[1].id) is None, "another org's id"
    assert await store.seq_of(org, "00000000-0000-4000-8000-000000000000") is None
    assert await store.seq_of(org, "not-a-uuid") is None


async def test_bad_org_is_refused(harness: Harness) -> None:
    with pytest.raises(StoreError):
        await harness.store.append("", [("n", 1)])
    with pytest.raises(StoreError):
        await harness.store.append("x" * 201, [("n", 1)])
    # The longest accepted org still fits a NOTIFY reference.
    longest = "é" * 100
    [event] = await harness.store.append(longest, [("n", "x" * 9000)])
    [announced] = await harness.announced.wait_for(longest, 1)
    assert_same(announced, event)


async def test_bad_events_are_refused_whole(harness: Harness) -> None:
    store, org = harness.store, new_org()
    await store.append(org, [("ok", 1)])
    bad: list[tuple[str, Any]] = [
        ("nul\x00type", 1),
        ("\ud800", 1),
        ("t", {"text": "nul \x00 inside"}),
    ]
    for event in bad:
        with pytest.raises(StoreError):
            await store.append(org, [("fine", 2), event])
    with pytest.raises(StoreError):
        await store.append("org\x00", [("t", 1)])
    with pytest.raises(StoreError):
        await store.append(org, [("t", 1)], kind="other")  # type: ignore[arg-type]
    for payload in ({1, 2}, {1: "int key"}, object(), ["\ud800"]):
        with pytest.raises(TypeError):
            await store.append(org, [("fine", 2), ("t", payload)])
    # Nothing of a refused batch was stored or announced.
    assert await store.last_seq(org) == 1
    await harness.settle()
    assert [e.seq for e in harness.announced.of(org)] == [1]
    # Text that only looks like an escaped NUL is fine.
    [event] = await store.append(org, [("t", "\\u0000 and \\\\u0000")])
    assert event.seq == 2
    assert (await store.read(org, after=1))[0].payload == "\\u0000 and \\\\u0000"


async def test_stored_payloads_do_not_alias_the_callers(harness: Harness) -> None:
    store, org = harness.store, new_org()
    payload: dict[str, Any] = {"list": [1]}
    [event] = await store.append(org, [("t", payload)])
    payload["list"].append(2)
    assert event.payload == {"list": [1]}
    assert (await store.read(org))[0].payload == {"list": [1]}


async def test_every_event_is_announced_once_in_order(harness: Harness) -> None:
    store, org, other = harness.store, new_org(), new_org()
    stored: list[StoredEvent] = []
    for i in range(5):
        stored += await store.append(org, [("n", i)])
        await store.append(other, [("n", i)])
    stored += await store.append(org, [("n", i) for i in range(5, 10)])
    announced = await harness.announced.wait_for(org, 10)
    await harness.settle()
    assert len(harness.announced.of(org)) == 10
    for a, b in zip(announced, stored, strict=True):
        assert_same(a, b)
    assert [e.seq for e in harness.announced.of(other)] == [1, 2, 3, 4, 5]


async def test_events_before_listen_are_not_replayed(harness: Harness) -> None:
    store, org = harness.store, new_org()
    await store.append(org, [("n", 1)])
    await harness.announced.wait_for(org, 1)
    # A second consumer of a fresh store of the same data hears only new events.
    if harness.dsn is not None:
        fresh: EventStore = PostgresStore(harness.dsn)
        heard = Announced()
        fresh.listen(heard)
        await fresh.start()
        try:
            await store.append(org, [("n", 2)])
            [event] = await heard.wait_for(org, 1)
            assert event.seq == 2
            await harness.settle()
            assert [e.seq for e in heard.of(org)] == [2]
        finally:
            await fresh.stop()


async def test_concurrent_appends_are_gap_free(harness: Harness) -> None:
    store, org = harness.store, new_org()

    async def writer(w: int) -> list[StoredEvent]:
        mine: list[StoredEvent] = []
        for i in range(10):
            size = random.choice([1, 1, 2, 3])
            mine += await store.append(org, [("w", {"w": w, "i": i, "k": k}) for k in range(size)])
            await asyncio.sleep(random.uniform(0, 0.002))
        return mine

    results = await asyncio.gather(*(writer(w) for w in range(20)))
    total = sum(len(r) for r in results)
    seqs = sorted(e.seq for r in results for e in r)
    assert seqs == list(range(1, total + 1))
    for mine in results:
        # Each writer's own events got ascending seqs, batches consecutive.
        assert [e.seq for e in mine] == sorted(e.seq for e in mine)
    announced = await harness.announced.wait_for(org, total)
    await harness.settle()
    assert [e.seq for e in harness.announced.of(org)] == list(range(1, total + 1))
    by_seq = {e.seq: e for r in results for e in r}
    for event in announced:
        assert_same(event, by_seq[event.seq])
    assert await store.last_seq(org) == total


async def test_callback_errors_do_not_break_the_store(harness: Harness) -> None:
    store, org = harness.store, new_org()
    good = harness.announced

    def flaky(event: StoredEvent) -> None:
        good(event)
        if event.seq == 1:
            raise RuntimeError("consumer bug")

    store.listen(flaky)
    await store.append(org, [("n", 1)])
    await store.append(org, [("n", 2)])
    assert [e.seq for e in await good.wait_for(org, 2)] == [1, 2]


# -- the memory store's bound ------------------------------------------------------


async def test_memory_store_forgets_the_oldest_events() -> None:
    store = MemoryStore(max_events_per_org=5)
    announced = Announced()
    store.listen(announced)
    org, other = new_org(), new_org()
    await store.append(org, [("n", i) for i in range(1, 9)])
    await store.append(other, [("n", 1)])
    assert await store.first_seq(org) == 4
    assert await store.last_seq(org) == 8
    assert [e.seq for e in await store.read(org)] == [4, 5, 6, 7, 8]
    assert [e.seq for e in await store.read(org, after=5)] == [6, 7, 8]
    assert [e.seq for e in await store.read(org, after=2, limit=2)] == [4, 5]
    assert [e.seq for e in await store.read_since(org, since=0)] == [4, 5, 6, 7, 8]
    # The bound is per org, and every event was announced once.
    assert await store.first_seq(other) == 1
    assert [e.seq for e in announced.of(org)] == list(range(1, 9))
    [ninth] = await store.append(org, [("n", 9)])
    assert ninth.seq == 9
    assert await store.first_seq(org) == 5


async def test_memory_store_announces_synchronously() -> None:
    store = MemoryStore()
    announced = Announced()
    store.listen(announced)
    org = new_org()
    stored = await store.append(org, [("n", 1), ("n", 2)])
    # Announced before append returned, in seq order.
    assert announced.of(org) == stored
