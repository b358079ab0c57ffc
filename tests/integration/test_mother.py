"""The mother aggregator against real `hub serve` processes.

Known events are published through the REST API and ``GET
/api/mother/stats`` must show exactly them; a PostgreSQL-backed hub must
show the same numbers after a restart; two nodes joined by Redis must sum
their connections and agree on the events; non-admins are refused on the
API and on the ``mother`` topic; the feed reaches the realtime-py client.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
from realtime import AsyncRealtimeClient
from websockets.asyncio.client import ClientConnection, connect

from hub.aggregator.mother import SHARE_INTERVAL, SHARE_TTL
from tests.support.hubs import HubProcess, stop_hub
from tests.support.mother import (
    StartHub,
    new_org,
    publish,
)

#: Default bound of every wait in this file (seconds).
T = 10.0
REDIS_URL = os.environ.get("HUB_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


@pytest.fixture
async def redis_url() -> str:
    client = aioredis.from_url(REDIS_URL)
    try:
        await asyncio.wait_for(client.ping(), 5)
    except Exception as exc:
        pytest.fail(f"Redis is required for this test and is unreachable at {REDIS_URL}: {exc!r}")
    finally:
        await client.aclose()
    return REDIS_URL


# -- helpers ---------------------------------------------------------------------


async def stats(hub: HubProcess, token: str | None = None) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=hub.http_url, timeout=T) as http:
        response = await http.get(
            "/api/mother/stats", headers={"Authorization": f"Bearer {token or hub.admin_token()}"}
        )
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def until(
    hub: HubProcess,
    condition: Callable[[dict[str, Any]], bool],
    what: str,
    within: float = T,
) -> dict[str, Any]:
    """Poll the stats until ``condition`` holds; fail after ``within`` s."""
    deadline = time.monotonic() + within
    while True:
        snapshot = await stats(hub)
        if condition(snapshot):
            return snapshot
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}; last snapshot:\n{json.dumps(snapshot)}")
        await asyncio.sleep(0.1)


def org_of(snapshot: dict[str, Any], org: str) -> dict[str, Any]:
    found = [item for item in snapshot["orgs"] if item["org"] == org]
    assert found, f"{org} is not in the snapshot: {[o['org'] for o in snapshot['orgs']]}"
    return found[0]


async def history(hub: HubProcess, org: str) -> list[dict[str, Any]]:
    async with httpx.AsyncClient(base_url=hub.http_url, timeout=T) as http:
        response = await http.get(
            f"/api/orgs/{org}/events",
            params={"limit": 1000},
            headers={"Authorization": f"Bearer {hub.admin_token()}"},
        )
    assert response.status_code == 200, response.text
    events: list[dict[str, Any]] = response.json()["events"]
    return events


#: org -> the (type, payload) list published to it.
Plan = dict[str, list[tuple[str, Any]]]


def make_plan() -> Plan:
    a, b, c = new_org(), new_org(), new_org()
    return {
        a: [("order.created", {"n": i}) for i in range(7)] + [("order.paid", {"n": 1})] * 3,
        b: [("deploy", {"v": i}) for i in range(4)],
        c: [("x", {}), ("y", {"deep": {"list": [1, 2, 3]}}), ("x", {}), ("z", None)],
    }


async def publish_plan(hub: HubProcess, plan: Plan) -> None:
    for org, events in plan.items():
        await publish(hub, org, events)


def type_counts(events: list[tuple[str, Any]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for type_, _ in events:
        counts[type_] = counts.get(type_, 0) + 1
    return counts


async def check_events(hub: HubProcess, snapshot: dict[str, Any], plan: Plan) -> None:
    """Every event-derived number of ``plan``'s orgs is exactly right (the
    plan was published within the last minute)."""
    for org, events in plan.items():
        item = org_of(snapshot, org)
        n = len(events)
        stored = await history(hub, org)
        assert item["seq"] == n == len(stored)
        assert item["events"] == {"1m": n, "5m": n, "1h": n}, item
        assert sum(item["per_second"]) == n and len(item["per_second"]) == 60
        assert sum(item["per_minute"]) == n and len(item["per_minute"]) == 60
        assert item["types"] == type_counts(events)
        assert list(item["types"].values()) == sorted(item["types"].values(), reverse=True)
        assert item["last_event_at"] == pytest.approx(stored[-1]["created_at"], abs=1e-3)
        assert 0 <= item["since_last_event"] < 60
        newest = stored[::-1][:5]
        assert [(e["seq"], e["id"], e["type"]) for e in item["recent"]] == [
            (e["seq"], e["id"], e["type"]) for e in newest
        ]
        assert item["recent"][0]["preview"] == json.dumps(
            newest[0]["payload"], separators=(",", ":")
        )


def check_network(snapshot: dict[str, Any], plan: Plan) -> None:
    """The network totals are exactly the plan's (a hub that saw nothing else)."""
    everything = [event for events in plan.values() for event in events]
    net = snapshot["network"]
    total = len(everything)
    assert net["events"] == {"1m": total, "5m": total, "1h": total}
    assert sum(net["per_second"]) == total and len(net["per_second"]) == 300
    assert sum(net["per_minute"]) == total and len(net["per_minute"]) == 60
    assert net["types"] == type_counts(everything)
    assert net["orgs"] == len(plan) and net["active_orgs"] == len(plan)
    assert sorted(o["org"] for o in snapshot["orgs"]) == sorted(plan)
    assert len(snapshot["recent"]) == min(50, total)
    assert snapshot["recent"][0]["at"] == net["last_event_at"]
    ats = [event["at"] for event in snapshot["recent"]]
    assert ats == sorted(ats, reverse=True)


class Wire:
    """A raw vsn 1.0.0 connection that records what it receives."""

    def __init__(self, conn: ClientConnection) -> None:
        self.conn = conn
        self.received: list[dict[str, Any]] = []
        self.changed = asyncio.Event()
        self.refs = 0
        self._reader = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        async for message in self.conn:
            self.received.append(json.loads(message))
            self.changed.set()

    async def send(self, topic: str, event: str, payload: Any, join_ref: str | None = None) -> str:
        self.refs += 1
        ref = str(self.refs)
        frame = {"topic": topic, "event": event, "payload": payload, "ref": ref}
        if join_ref is not None:
            frame["join_ref"] = join_ref
        await self.conn.send(json.dumps(frame))
        return ref

    async def wait_for(
        self, match: Callable[[dict[str, Any]], bool], within: float = T
    ) -> dict[str, Any]:
        deadline = time.monotonic() + within
        seen = 0
        while True:
            for message in self.received[seen:]:
                if match(message):
                    return message
            seen = len(self.received)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                pytest.fail(f"no matching message in {within}s; got {self.received[-5:]}")
            self.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), remaining)

    async def join(
        self, topic: str, *, presence_key: str = "", track: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """Join ``realtime:<topic>``; returns the reply."""
        wire_topic = f"realtime:{topic}"
        config = {"broadcast": {"self": False}, "presence": {"key": presence_key}}
        ref = await self.send(
            wire_topic, "phx_join", {"config": config}, join_ref=str(self.refs + 1)
        )
        reply = await self.wait_for(lambda m: m["event"] == "phx_reply" and m["ref"] == ref)
        if track is not None and reply["payload"]["status"] == "ok":
            tref = await self.send(
                wire_topic,
                "presence",
                {"type": "presence", "event": "track", "payload": track},
                ref,
            )
            await self.wait_for(lambda m: m["event"] == "phx_reply" and m["ref"] == tref)
        return reply

    async def close(self) -> None:
        self._reader.cancel()
        await self.conn.close()


@pytest.fixture
async def wires() -> AsyncIterator[Callable[[HubProcess, str], Awaitable[Wire]]]:
    opened: list[Wire] = []

    async def open_wire(hub: HubProcess, token: str) -> Wire:
        conn = await connect(f"{hub.ws_url}?apikey={token}&vsn=1.0.0", open_timeout=T)
        wire = Wire(conn)
        opened.append(wire)
        return wire

    yield open_wire
    for wire in opened:
        await wire.close()


def is_snapshot(message: dict[str, Any]) -> bool:
    return (
        message["topic"] == "realtime:mother"
        and message["event"] == "broadcast"
        and message["payload"]["event"] == "snapshot"
    )


# -- event numbers -----------------------------------------------------------------


async def test_stats_match_published_events_exactly(mother_hub: StartHub) -> None:
    hub = mother_hub()
    empty = await stats(hub)
    assert empty["version"] == 1 and empty["orgs"] == [] and empty["recent"] == []
    assert empty["network"]["events"] == {"1m": 0, "5m": 0, "1h": 0}
    plan = make_plan()
    await publish_plan(hub, plan)
    total = sum(len(events) for events in plan.values())
    snapshot = await until(hub, lambda s: s["network"]["events"]["1h"] == total, "every event")
    await check_events(hub, snapshot, plan)
    check_network(snapshot, plan)
    assert snapshot["rebuilding"] is False
    [node] = snapshot["nodes"]
    assert node["self"] is True and node["node"] == snapshot["node"]
    assert node["engine_ready"] and node["store_ready"] and node["redis"] is None


async def test_stats_survive_a_restart_with_postgres(fresh_dsn: str, mother_hub: StartHub) -> None:
    env = {"HUB_DATABASE_URL": fresh_dsn}
    hub = mother_hub(env)
    plan = make_plan()
    await publish_plan(hub, plan)
    total = sum(len(events) for events in plan.values())
    before = await until(hub, lambda s: s["network"]["events"]["1h"] == total, "every event")
    await check_events(hub, before, plan)
    check_network(before, plan)

    stop_hub(hub)
    again = mother_hub(env, secret=hub.secret, port=hub.port)
    after = await until(again, lambda s: not s["rebuilding"], "the rebuild")
    await check_events(again, after, plan)
    check_network(after, plan)
    for org in plan:
        old, new = org_of(before, org), org_of(after, org)
        assert (old["types"], old["seq"], old["recent"]) == (
            new["types"],
            new["seq"],
            new["recent"],
        )
    assert before["recent"] == after["recent"]

    # And it goes on counting from there, once each.
    org = next(iter(plan))
    plan[org] = plan[org] + [("late", {"n": 1})] * 2
    await publish(again, org, [("late", {"n": 1})] * 2)
    latest = await until(
        again, lambda s: s["network"]["events"]["1h"] == total + 2, "the two new events"
    )
    await check_events(again, latest, plan)
    check_network(latest, plan)


# -- the feed ----------------------------------------------------------------------


async def test_feed_snapshot_on_join_then_at_the_configured_rate(
    mother_hub: StartHub, wires: Callable[[HubProcess, str], Awaitable[Wire]]
) -> None:
    hub = mother_hub({"HUB_MOTHER_RATE": "5"})
    plan = make_plan()
    await publish_plan(hub, plan)
    admin = await wires(hub, hub.admin_token())
    reply = await admin.join("mother")
    assert reply["payload"]["status"] == "ok"
    first = await admin.wait_for(is_snapshot, within=2)
    # The join's own snapshot comes right after the reply and presence_state.
    events = [m["event"] for m in admin.received]
    assert events[:3] == ["phx_reply", "presence_state", "broadcast"], events
    snapshot = first["payload"]["payload"]
    assert snapshot["rate"] == 5.0
    await check_events(hub, snapshot, plan)
    check_network(snapshot, plan)
    assert snapshot["network"]["clients"] == 1
    assert snapshot["nodes"][0]["mother_subscribers"] == 1

    start = len([m for m in admin.received if is_snapshot(m)])
    await asyncio.sleep(2.0)
    got = len([m for m in admin.received if is_snapshot(m)]) - start
    assert 6 <= got <= 14, f"{got} snapshots in 2 s at rate 5"
    times = [m["payload"]["payload"]["time"] for m in admin.received if is_snapshot(m)]
    assert times == sorted(times)

    # The REST answer is the same snapshot (event-derived parts).
    rest = await stats(hub)
    latest = [m for m in admin.received if is_snapshot(m)][-1]["payload"]["payload"]
    for key in ("orgs", "recent"):
        strip = ("since_last_event", "per_second", "per_minute", "delivered_1m")
        assert [{k: v for k, v in o.items() if k not in strip} for o in rest[key]] == [
            {k: v for k, v in o.items() if k not in strip} for o in latest[key]
        ]


async def test_feed_reaches_the_realtime_python_client(mother_hub: StartHub) -> None:
    hub = mother_hub()
    plan = make_plan()
    await publish_plan(hub, plan)
    client = AsyncRealtimeClient(f"ws://127.0.0.1:{hub.port}/realtime/v1", hub.admin_token())
    await asyncio.wait_for(client.connect(), T)
    try:
        received: asyncio.Queue[Any] = asyncio.Queue()
        states: asyncio.Queue[Any] = asyncio.Queue()
        channel = client.channel("mother")
        channel.on_broadcast("snapshot", received.put_nowait)
        await asyncio.wait_for(channel.subscribe(lambda *args: states.put_nowait(args)), T)
        state, error = await asyncio.wait_for(states.get(), T)
        assert str(state).endswith("SUBSCRIBED"), (state, error)
        message = await asyncio.wait_for(received.get(), T)
        snapshot = message["payload"]
        await check_events(hub, snapshot, plan)
        second = await asyncio.wait_for(received.get(), 3)
        assert second["payload"]["time"] > snapshot["time"]
    finally:
        await asyncio.wait_for(client.close(), T)


# -- who may watch ------------------------------------------------------------------


async def test_non_admins_are_refused_on_the_api_and_the_topic(
    mother_hub: StartHub, wires: Callable[[HubProcess, str], Awaitable[Wire]]
) -> None:
    hub = mother_hub()
    org = new_org()
    member = hub.token(sub="member", orgs=[org])
    async with httpx.AsyncClient(base_url=hub.http_url, timeout=T) as http:
        url = "/api/mother/stats"
        assert (await http.get(url)).status_code == 401
        bad = await http.get(url, headers={"Authorization": "Bearer not-a-jwt"})
        assert bad.status_code == 401
        forbidden = await http.get(url, headers={"Authorization": f"Bearer {member}"})
        assert forbidden.status_code == 403
        assert "admin" in forbidden.json()["message"]
        # The admin claim (app_metadata.hub_admin: true) is enough.
        claimed = hub.token(sub="boss", app_metadata={"hub_admin": True})
        ok = await http.get(url, headers={"Authorization": f"Bearer {claimed}"})
        assert ok.status_code == 200 and ok.json()["version"] == 1

    wire = await wires(hub, member)
    reply = await wire.join("mother")
    assert reply["payload"]["status"] == "error"
    assert reply["payload"]["response"]["reason"].startswith("Unauthorized")
    await asyncio.sleep(0.5)
    assert not [m for m in wire.received if is_snapshot(m)]
    await until(hub, lambda s: s["network"]["refused_1h"] == 1, "the refused join")

    # A member with the admin claim may join it.
    boss = await wires(hub, hub.token(sub="boss", app_metadata={"hub_admin": True}))
    assert (await boss.join("mother"))["payload"]["status"] == "ok"
    await boss.wait_for(is_snapshot, within=3)


# -- connections ------------------------------------------------------------------


async def test_connection_numbers_on_one_node(
    mother_hub: StartHub, wires: Callable[[HubProcess, str], Awaitable[Wire]]
) -> None:
    hub = mother_hub()
    org = new_org()
    alice = await wires(hub, hub.token(sub="alice", orgs=[org]))
    bob = await wires(hub, hub.token(sub="bob", orgs=[org]))
    await alice.join(f"org:{org}", presence_key="alice", track={"status": "online"})
    await alice.join(f"org:{org}:room", presence_key="alice", track={"status": "here"})
    await bob.join(f"org:{org}")
    ref = await alice.send(
        f"realtime:org:{org}",
        "broadcast",
        {"type": "broadcast", "event": "hi", "payload": {}},
        join_ref="1",
    )
    await bob.wait_for(lambda m: m["event"] == "broadcast" and m["payload"]["event"] == "hi")
    assert ref

    def settled(s: dict[str, Any]) -> bool:
        items = [o for o in s["orgs"] if o["org"] == org]
        return bool(items) and items[0]["presence"] == 2 and items[0]["delivered_1m"] >= 1

    snapshot = await until(hub, settled, "presence and the broadcast")
    item = org_of(snapshot, org)
    assert (item["clients"], item["users"], item["user_ids"]) == (2, 2, ["alice", "bob"])
    assert item["delivered_1m"] == 1 and item["events"]["1h"] == 0
    assert snapshot["network"]["clients"] == 2 and snapshot["network"]["users"] == 2

    # A durable event counts as delivered to org:<id>'s two subscribers.
    await publish(hub, org, [("note", {})])
    snapshot = await until(
        hub, lambda s: org_of(s, org)["delivered_1m"] == 3, "the durable delivery"
    )
    assert org_of(snapshot, org)["events"]["1m"] == 1

    await alice.close()
    await bob.close()
    snapshot = await until(hub, lambda s: s["network"]["clients"] == 0, "the disconnects")
    item = org_of(snapshot, org)  # still there: it had an event
    assert (item["clients"], item["users"], item["presence"]) == (0, 0, 0)


# -- several nodes ------------------------------------------------------------------


async def test_two_nodes_sum_connections_and_agree_on_events(
    fresh_dsn: str,
    redis_url: str,
    mother_hub: StartHub,
    wires: Callable[[HubProcess, str], Awaitable[Wire]],
) -> None:
    prefix = f"test-{uuid.uuid4().hex[:8]}"
    common = {"HUB_DATABASE_URL": fresh_dsn, "HUB_REDIS_URL": redis_url, "HUB_REDIS_PREFIX": prefix}
    a = mother_hub({**common, "HUB_NODE_ID": "node-a"})
    b = mother_hub({**common, "HUB_NODE_ID": "node-b"}, secret=a.secret)
    x, y = new_org(), new_org()

    u1a = await wires(a, a.token(sub="u1", orgs=[x]))
    u2a = await wires(a, a.token(sub="u2", orgs=[x]))
    u1b = await wires(b, b.token(sub="u1", orgs=[x, y]))
    u3b = await wires(b, b.token(sub="u3", orgs=[y]))
    await u1a.join(f"org:{x}", presence_key="u1", track={"on": "a"})
    await u2a.join(f"org:{x}", presence_key="u2", track={"on": "a"})
    await u1b.join(f"org:{x}", presence_key="u1", track={"on": "b"})
    await u1b.join(f"org:{y}")
    await u3b.join(f"org:{y}", presence_key="u3", track={"on": "b"})

    def summed(s: dict[str, Any]) -> bool:
        # Presence travels at once; a node's share of the counts comes with
        # its next heartbeat: wait for the shares that hold the joins.
        orgs = {o["org"]: o for o in s["orgs"]}
        return (
            len(s["nodes"]) == 2
            and s["network"]["clients"] == 4
            and x in orgs
            and orgs[x]["presence"] == 3
            and orgs[x]["clients"] == 3
            and y in orgs
            and orgs[y]["presence"] == 1
            and orgs[y]["clients"] == 2
        )

    for hub in (a, b):
        snapshot = await until(hub, summed, f"both nodes' shares on {hub.env['HUB_NODE_ID']}")
        net = snapshot["network"]
        assert (net["clients"], net["users"], net["user_ids"]) == (4, 3, ["u1", "u2", "u3"])
        assert net["presence"] == 4
        ox, oy = org_of(snapshot, x), org_of(snapshot, y)
        assert (ox["clients"], ox["users"], ox["user_ids"]) == (3, 2, ["u1", "u2"])
        assert (oy["clients"], oy["users"], oy["user_ids"]) == (2, 2, ["u1", "u3"])
        assert sorted(n["node"] for n in snapshot["nodes"]) == ["node-a", "node-b"]
        assert all(n["redis"] is True for n in snapshot["nodes"])

    # Events published through either node: both compute the same numbers.
    plan = {x: [("t1", {})] * 3 + [("t2", {})], y: [("t3", {"k": 1})] * 2}
    await publish(a, x, plan[x])
    await publish(b, y, plan[y])
    seen = [
        await until(hub, lambda s: s["network"]["events"]["1h"] == 6, "the events")
        for hub in (a, b)
    ]
    for hub, snapshot in zip((a, b), seen, strict=True):
        await check_events(hub, snapshot, plan)
    event_keys = ("org", "seq", "events", "types", "last_event_at", "recent")
    assert [{k: o[k] for k in event_keys} for o in seen[0]["orgs"]] == [
        {k: o[k] for k in event_keys} for o in seen[1]["orgs"]
    ]
    assert seen[0]["recent"] == seen[1]["recent"]

    # A node that dies: its share leaves the other's snapshot within the TTL.
    b.process.kill()
    b.process.wait(5)
    died = time.monotonic()
    snapshot = await until(
        a,
        lambda s: len(s["nodes"]) == 1 and s["network"]["clients"] == 2,
        "node-b's share to expire",
        within=SHARE_TTL + SHARE_INTERVAL + 3,
    )
    assert time.monotonic() - died <= SHARE_TTL + SHARE_INTERVAL + 1.5
    assert org_of(snapshot, x)["clients"] == 2
    # The events stay: they are the store's, not the node's.
    assert snapshot["network"]["events"]["1h"] == 6
