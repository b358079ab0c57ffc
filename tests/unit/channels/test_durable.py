"""DurableFeed: live delivery, tenancy of changes, and the replay seam."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from hub.auth.principal import Principal
from hub.channels.changes import parse_bindings
from hub.channels.durable import DurableFeed, ReplayRequest, parse_replay
from hub.channels.fanout import Channels
from hub.channels.subscription import Subscription
from hub.channels.topics import parse_topic
from hub.outbox import ListOutbox
from hub.store.memory import MemoryStore
from tests.support.channels import local_channels

MEMBER = Principal(role="authenticated", exp=2e9, sub="u", orgs={"a": "member", "b": "member"})


def make_sub(
    channels: Channels,
    topic: str,
    *,
    vsn: Any = "1.0.0",
    bindings: Any = None,
    principal: Principal = MEMBER,
    **kw: Any,
) -> Subscription:
    sub = Subscription(
        topic=parse_topic(topic),
        join_ref="1",
        vsn=vsn,
        outbox=ListOutbox(),
        principal=principal,
        conn_id="c",
        bindings=parse_bindings(bindings),
        **kw,
    )
    channels.subscribe(sub)
    return sub


def received(sub: Subscription) -> list[dict[str, Any]]:
    assert isinstance(sub.outbox, ListOutbox)
    return [orjson.loads(frame.payload) for frame in sub.outbox.frames]


def seqs(sub: Subscription) -> list[int]:
    return [m["payload"]["meta"]["seq"] for m in received(sub) if m["event"] == "broadcast"]


@pytest.fixture
def setup() -> tuple[Channels, MemoryStore, DurableFeed]:
    channels = local_channels()
    store = MemoryStore(max_events_per_org=50)
    feed = DurableFeed(channels, store, replay_max=20)
    store.listen(feed.on_event)  # as hub/node.py wires them
    return channels, store, feed


async def test_events_reach_only_their_org_topic(setup: Any) -> None:
    channels, store, _ = setup
    a, b, named = (
        make_sub(channels, "org:a"),
        make_sub(channels, "org:b"),
        make_sub(channels, "org:a:chat"),
    )
    await store.append("a", [("x", {"n": 1})])
    [message] = received(a)
    assert message["payload"] == {
        "type": "broadcast",
        "event": "x",
        "payload": {"n": 1},
        "meta": {"id": message["payload"]["meta"]["id"], "seq": 1},
    }
    assert received(b) == [] and received(named) == []


async def test_changes_go_to_matching_bindings_of_the_same_org_only(setup: Any) -> None:
    channels, store, _ = setup
    binding = [{"event": "INSERT", "schema": "public", "table": "items", "filter": "n=gt.5"}]
    mine = make_sub(channels, "org:a:feed", bindings=binding)
    other_org = make_sub(channels, "org:b", bindings=binding)
    change = {
        "schema": "public",
        "table": "items",
        "type": "INSERT",
        "record": {"n": 7},
        "columns": [{"name": "n", "type": "int4"}],
        "commit_timestamp": "2026-01-01T00:00:00.000Z",
    }
    await store.append("a", [("INSERT", change)], kind="change")
    await store.append("a", [("INSERT", {**change, "record": {"n": 3}})], kind="change")
    [message] = received(mine)
    assert message["event"] == "postgres_changes"
    assert message["payload"]["ids"] == [mine.bindings[0].id]
    data = message["payload"]["data"]
    assert data["record"] == {"n": 7} and data["errors"] is None
    assert {"columns", "commit_timestamp", "errors", "schema", "table", "type"} <= set(data)
    assert received(other_org) == []


CHANGE = {
    "schema": "public",
    "table": "items",
    "type": "INSERT",
    "record": {"n": 7},
    "columns": [{"name": "n", "type": "int4"}],
    "commit_timestamp": "2026-01-01T00:00:00.000Z",
}
BINDING = [{"event": "*", "schema": "public", "table": "items"}]


async def test_free_names_get_the_rows_of_their_subscribers_orgs_only(setup: Any) -> None:
    """A binding on any channel name (Supabase's ``schema-db-changes``) gets
    the rows of the subscriber's own orgs, in each org's order, whatever the
    name and the filter; service_role gets every org's."""
    channels, store, _ = setup
    member_of_a = make_sub(channels, "schema-db-changes", bindings=BINDING)  # orgs a and b
    only_c = Principal(role="authenticated", exp=2e9, sub="c", orgs={"c": "member"})
    outsider = make_sub(channels, "schema-db-changes", bindings=BINDING, principal=only_c)
    service = Principal(role="service_role", exp=2e9, sub="svc")
    admin = make_sub(channels, "db", bindings=BINDING, principal=service)
    for org, n in (("a", 1), ("b", 2), ("a", 3), ("z", 4)):
        await store.append(org, [("INSERT", {**CHANGE, "record": {"n": n}})], kind="change")
    rows = [m["payload"]["data"]["record"]["n"] for m in received(member_of_a)]
    assert rows == [1, 2, 3]  # a's seq 2 after b's seq 1: each org's own stream
    assert received(outsider) == []
    assert [m["payload"]["data"]["record"]["n"] for m in received(admin)] == [1, 2, 3, 4]


async def test_a_new_principal_moves_a_free_channels_rows(setup: Any) -> None:
    channels, store, _ = setup
    sub = make_sub(channels, "todos", bindings=BINDING)
    sub.principal = Principal(role="authenticated", exp=2e9, sub="u", orgs={"c": "member"})
    channels.rebind(sub)
    await store.append("a", [("INSERT", CHANGE)], kind="change")
    await store.append("c", [("INSERT", CHANGE)], kind="change")
    assert len(received(sub)) == 1
    channels.unsubscribe(sub)
    await store.append("c", [("INSERT", CHANGE)], kind="change")
    assert len(received(sub)) == 1


async def test_replay_after_then_live_without_gap_or_duplicate(setup: Any) -> None:
    channels, store, feed = setup
    await store.append("a", [("x", {"i": i}) for i in range(5)])
    sub = make_sub(channels, "org:a", replay_buffer=[])
    # Live events arrive while the replay has not run yet: they wait.
    await store.append("a", [("x", {"i": 5})])
    assert received(sub) == []
    await feed.replay(sub, ReplayRequest(after=2))
    await store.append("a", [("x", {"i": 6})])
    assert seqs(sub) == [3, 4, 5, 6, 7]
    # Seq 6 was stored before the replay read the store, so it is replayed
    # (and its buffered live copy dropped); seq 7 came live afterwards.
    flags = [m["payload"]["meta"].get("replayed") for m in received(sub)]
    assert flags == [True, True, True, True, None]


async def test_replay_truncated_tells_the_client_and_pauses(setup: Any) -> None:
    channels, store, feed = setup
    await store.append("a", [("x", {"i": i}) for i in range(30)])
    sub = make_sub(channels, "org:a", replay_buffer=[])
    await feed.replay(sub, ReplayRequest(after=0, limit=10))
    assert seqs(sub) == list(range(1, 11))
    system = received(sub)[-1]
    assert system["event"] == "system"
    assert system["payload"]["message"].startswith("ReplayTruncated")
    assert system["payload"]["resume_after"] == 10
    await store.append("a", [("x", {})])
    assert seqs(sub) == list(range(1, 11)), "no live event may follow a gap"


async def test_replay_of_forgotten_events_is_reported_then_continues(setup: Any) -> None:
    channels, store, feed = setup
    await store.append("a", [("x", {"i": i}) for i in range(60)])  # keeps 11..60
    sub = make_sub(channels, "org:a", replay_buffer=[])
    await feed.replay(sub, ReplayRequest(after=5, limit=20))
    system = received(sub)[0]
    assert system["event"] == "system"
    assert system["payload"]["message"] == "ReplayGap: events 6..10 are no longer held"
    assert system["payload"]["resume_after"] == 10
    assert seqs(sub) == list(range(11, 31)), "what is held follows, up to the limit"


async def test_replay_since_reaching_forgotten_events_says_so(setup: Any) -> None:
    channels, store, feed = setup
    await store.append("a", [("x", {"i": i}) for i in range(60)])  # keeps 11..60
    sub = make_sub(channels, "org:a", replay_buffer=[])
    await feed.replay(sub, ReplayRequest(since=0, limit=10))
    system = received(sub)[0]
    assert system["payload"]["message"].startswith("ReplayGap: events before seq 11")
    assert seqs(sub) == list(range(11, 21))


async def test_replay_since_uses_created_at(setup: Any) -> None:
    channels, store, feed = setup
    old = await store.append("a", [("x", {})])
    new = await store.append("a", [("x", {})])
    sub = make_sub(channels, "org:a", replay_buffer=[])
    await feed.replay(sub, ReplayRequest(since=new[0].created_at))
    assert seqs(sub) == [2]
    assert old[0].seq == 1


async def test_replay_after_id_resumes_after_that_event(setup: Any) -> None:
    channels, store, feed = setup
    stored = await store.append("a", [("x", {"i": i}) for i in range(5)])
    sub = make_sub(channels, "org:a", replay_buffer=[])
    await feed.replay(sub, ReplayRequest(after_id=stored[2].id))
    assert seqs(sub) == [4, 5]
    unknown = make_sub(channels, "org:a:x", replay_buffer=[])
    await feed.replay(unknown, ReplayRequest(after_id="nope"))
    [system] = received(unknown)
    assert system["payload"]["message"].startswith("ReplayUnknownId")


@pytest.fixture
def asked(monkeypatch: pytest.MonkeyPatch) -> list[Subscription]:
    """Every subscription asked to take a durable event, in order."""
    calls: list[Subscription] = []
    take = Subscription.take_durable

    def counted(sub: Subscription, seq: int, event: object, *, own: bool = True) -> bool:
        calls.append(sub)
        return take(sub, seq, event, own=own)

    monkeypatch.setattr(Subscription, "take_durable", counted)
    return calls


async def test_settled_subscribers_get_durable_events_without_being_asked(
    setup: Any, asked: list[Subscription]
) -> None:
    channels, store, _ = setup
    subs = [make_sub(channels, "org:a", vsn=vsn) for vsn in ("1.0.0", "2.0.0", "1.0.0")]
    await store.append("a", [("x", {"i": i}) for i in range(3)])
    assert [seqs(sub) for sub in subs if sub.vsn == "1.0.0"] == [[1, 2, 3], [1, 2, 3]]
    assert len(subs[1].outbox.frames) == 3  # type: ignore[attr-defined]
    assert asked == []


async def test_a_replay_that_read_ahead_of_the_listener_skips_what_it_replayed(
    asked: list[Subscription],
) -> None:
    """The listener lags the table: a replay can read events the listener
    has not announced yet.  Their live copies are dropped for the one that
    replayed them, not for the others, and once it has taken a live event
    the topic is back to broadcasting."""
    channels = local_channels()
    store = MemoryStore()  # not wired: the test plays the lagging listener
    feed = DurableFeed(channels, store, replay_max=20)
    live = make_sub(channels, "org:a")
    events = await store.append("a", [("x", {"i": i}) for i in range(4)])
    replayed = make_sub(channels, "org:a", replay_buffer=[])
    feed.on_event(events[0])  # announced while the replay waits: buffered
    await feed.replay(replayed, ReplayRequest(after=0))
    assert seqs(replayed) == [1, 2, 3, 4]
    for event in events[1:]:  # the listener catches up
        feed.on_event(event)
    assert seqs(replayed) == [1, 2, 3, 4] and seqs(live) == [1, 2, 3, 4]
    # Seq 1 live (buffered), the four replayed, seq 1's buffered copy, and
    # seqs 2 to 4 live: each refused but the replayed ones.
    assert asked.count(replayed) == 1 + 4 + 1 + 3
    [newer] = await store.append("a", [("x", {})])
    feed.on_event(newer)
    assert seqs(replayed)[-1] == seqs(live)[-1] == 5
    asked.clear()
    [newest] = await store.append("a", [("x", {})])
    feed.on_event(newest)
    assert seqs(replayed)[-1] == seqs(live)[-1] == 6
    assert asked == [], "settled once it took a live event"


async def test_a_paused_subscription_is_asked_until_it_leaves(
    setup: Any, asked: list[Subscription]
) -> None:
    channels, store, feed = setup
    await store.append("a", [("x", {"i": i}) for i in range(30)])
    live = make_sub(channels, "org:a")
    paused = make_sub(channels, "org:a", replay_buffer=[])
    await feed.replay(paused, ReplayRequest(after=0, limit=10))
    await store.append("a", [("x", {})])
    assert seqs(paused) == list(range(1, 11)) and seqs(live) == [31]
    assert paused in asked
    channels.unsubscribe(paused)
    asked.clear()
    await store.append("a", [("x", {})])
    assert seqs(live) == [31, 32] and asked == []


def test_parse_replay() -> None:
    assert parse_replay({"after": 3}) == ReplayRequest(after=3)
    assert parse_replay({"since": 1500, "limit": 5}) == ReplayRequest(since=1.5, limit=5)
    assert parse_replay({"after_id": "e1"}) == ReplayRequest(after_id="e1")
    for bad in (
        {},
        {"after": -1},
        {"after": "3"},
        {"after": 1, "since": 2},
        {"after": 1, "after_id": "e"},
        {"after_id": 5},
        {"since": 1, "limit": 0},
    ):
        with pytest.raises(ValueError):
            parse_replay(bad)
