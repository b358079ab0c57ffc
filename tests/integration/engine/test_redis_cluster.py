"""The Redis engine on a real Redis Cluster (``HUB_REDIS_CLUSTER=1``).

Six ``redis-server`` processes (three primaries, one replica each, started
by :mod:`tests.support.rediscluster`) and two real `hub serve` nodes.  Topic
channels are picked so that they hash to slots of every primary: each node
must subscribe on the shard serving the channel, and messages must cross
nodes on all of them.  Then the primary serving a channel is SIGKILLed
while a node publishes on it, its replica is promoted by the cluster, and
the nodes resubscribe on the new owner.  Also: a slot moved to another
primary (a reshard), presence and heartbeats across the cluster, and the
start-up check of the mode.

What crosses a failover: Redis pub/sub is at-most-once and the engine adds
no durability, so broadcasts published between the kill and the moment
both nodes have resubscribed may be lost; those that arrive come once and
in order; every broadcast published once both nodes are ready again is
delivered.  (Durable org events never pass through Redis: each node reads
them from PostgreSQL.)  The tests assert exactly that.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tests.support.cluster import (
    REDIS_URL,
    V2,
    Cluster,
    Conn,
    MakeHub,
    T,
    new_org,
    readyz,
    scrape,
    wait_until,
)
from tests.support.hubs import ROOT
from tests.support.rediscluster import RedisCluster, RedisNode


def is_event(event: str) -> Any:
    return lambda m: m.event == "broadcast" and m.user_event == event


def org_topics(cluster: Cluster, redis: RedisCluster) -> dict[int, str]:
    """One ``org:`` topic per primary (by port), whose channel it serves."""
    topics: dict[int, str] = {}
    primaries = {n.port for n in redis.primaries()}
    while set(topics) != primaries:
        topic = f"org:{new_org()}"
        topics.setdefault(redis.owner(channel(cluster, topic)).port, topic)
    return topics


def channel(cluster: Cluster, topic: str) -> str:
    return f"{cluster.prefix}:t:{topic}"


def shard_numsub(node: RedisNode, name: str) -> int:
    with node.client() as client:
        reply = client.execute_command("PUBSUB", "SHARDNUMSUB", name)
    return int(reply[1])


def mother_nodes(redis: RedisCluster, prefix: str) -> list[str]:
    """Nodes whose mother share is live in the cluster."""
    with redis.client() as client:
        names = sorted(n.decode() for n in client.smembers(f"{prefix}:mother:nodes"))
        return [n for n in names if client.exists(f"{prefix}:mother:node:{n}")]


async def on_cluster(make_hub: MakeHub, tmp_path: Path, redis: RedisCluster) -> Cluster:
    return Cluster(make_hub, tmp_path, HUB_REDIS_URL=redis.url, HUB_REDIS_CLUSTER="1")


async def joined(cluster: Cluster, node: Any, token: str, topics: list[str], name: str) -> Conn:
    conn = await cluster.conn(node, token, V2, name)
    for topic in topics:
        await conn.join(topic)
    return conn


async def test_broadcasts_cross_nodes_on_every_shard(
    make_hub: MakeHub, tmp_path: Path, redis_cluster: RedisCluster
) -> None:
    cluster = await on_cluster(make_hub, tmp_path, redis_cluster)
    try:
        a, b = await cluster.start(2)
        topics = org_topics(cluster, redis_cluster)
        token = cluster.token("member", [t.removeprefix("org:") for t in topics.values()])
        at_a = await joined(cluster, a, token, list(topics.values()), "A")
        at_b = await joined(cluster, b, token, list(topics.values()), "B")

        # Each node holds one subscription per channel, on the primary that
        # serves the channel's slot (any other node would answer MOVED).
        for port, topic in topics.items():
            owner = redis_cluster.node(port)
            await wait_until(
                lambda o=owner, t=topic: _true(shard_numsub(o, channel(cluster, t)) == 2),
                T,
                f"both nodes subscribed to {topic} on {owner.name}",
            )

        for port, topic in topics.items():
            await at_a.broadcast(topic, "from_a", {"shard": port})
            got = await at_b.wait(
                lambda m, t=topic: is_event("from_a")(m) and m.topic.endswith(t), T, f"{topic}@B"
            )
            assert got.body == {"shard": port}
            await at_b.broadcast(topic, "from_b", {"shard": port})
            got = await at_a.wait(
                lambda m, t=topic: is_event("from_b")(m) and m.topic.endswith(t), T, f"{topic}@A"
            )
            assert got.body == {"shard": port}

        # Nothing came twice.
        await asyncio.sleep(0.3)
        assert len(at_b.broadcasts("from_a")) == len(topics)
        assert len(at_a.broadcasts("from_b")) == len(topics)

        # The mother's shares (plain keys, on their slots' primaries) are
        # written and read back across the cluster too.
        await wait_until(
            lambda: _true(set(mother_nodes(redis_cluster, cluster.prefix)) == {"n1", "n2"}),
            T,
            "both nodes' mother shares in the cluster",
        )
        # (Logged once a whole round, writes and reads, has succeeded.)
        await wait_until(
            lambda: _true(cluster.logs().count("mother: sharing through redis") == 2),
            T,
            "each node's mother to share through the cluster",
        )
        assert "mother: redis failed" not in cluster.logs()
        assert "Traceback" not in cluster.logs()
    finally:
        await cluster.aclose()


async def test_presence_and_heartbeats_cross_the_cluster(
    make_hub: MakeHub, tmp_path: Path, redis_cluster: RedisCluster
) -> None:
    """Presence diffs travel on the topic's shard, heartbeats on the
    heartbeats channel's: two live nodes keep each other's members past
    HUB_NODE_TIMEOUT, and a SIGKILLed node's members leave after it."""
    timeout = 3.0
    cluster = await on_cluster(make_hub, tmp_path, redis_cluster)
    try:
        a, b = await cluster.start(2, HUB_NODE_TIMEOUT=str(timeout))
        org = new_org()
        topic, wire = f"org:{org}", f"realtime:org:{org}"
        alice = await cluster.conn(a, cluster.token("alice", [org]), V2, "alice@A")
        bob = await cluster.conn(b, cluster.token("bob", [org]), V2, "bob@B")
        for conn, key in ((alice, "alice"), (bob, "bob")):
            await conn.join(topic, {"presence": {"key": key, "enabled": True}})
            await conn.track(topic, {"name": key})
        await alice.wait_presence(wire, {"alice", "bob"}, T, "(alice on A sees bob on B)")
        await bob.wait_presence(wire, {"alice", "bob"}, T, "(bob on B sees alice on A)")

        # Heard through their heartbeats, neither node expires the other.
        await asyncio.sleep(timeout + 2)
        assert alice.presence_keys(wire) == bob.presence_keys(wire) == {"alice", "bob"}

        b.process.kill()  # SIGKILL: no goodbye
        await alice.wait_presence(wire, {"alice"}, timeout + 3, "(B killed: bob leaves)")
        assert "Traceback" not in cluster.logs()
    finally:
        await cluster.aclose()


async def test_a_killed_primary_fails_over_and_the_nodes_resubscribe_on_its_replica(
    make_hub: MakeHub, tmp_path: Path, redis_cluster: RedisCluster
) -> None:
    cluster = await on_cluster(make_hub, tmp_path, redis_cluster)
    try:
        a, b = await cluster.start(2)
        topics = org_topics(cluster, redis_cluster)
        # The victim serves `doomed` but not the heartbeats channel (whose
        # shard every publisher uses); `other` lives on another shard.
        heartbeats = redis_cluster.owner(f"{cluster.prefix}:nodes").port
        victim_port = next(port for port in topics if port != heartbeats)
        victim = redis_cluster.node(victim_port)
        doomed = topics[victim_port]
        other = next(topic for port, topic in topics.items() if port != victim_port)
        token = cluster.token("member", [doomed.removeprefix("org:"), other.removeprefix("org:")])
        at_a = await joined(cluster, a, token, [doomed, other], "A")
        at_b = await joined(cluster, b, token, [doomed, other], "B")
        await wait_until(
            lambda: _true(shard_numsub(victim, channel(cluster, doomed)) == 2), T, "subscriptions"
        )

        # Numbered streams, every 20 ms for the whole test: A -> B on
        # `doomed`, B -> A on `other`.
        sent: dict[str, list[int]] = {"doomed": [], "other": []}
        stop = asyncio.Event()

        async def stream(conn: Conn, topic: str, event: str) -> None:
            i = 0
            while not stop.is_set():
                sent[event].append(i)
                await conn.broadcast(topic, event, {"i": i})
                i += 1
                await asyncio.sleep(0.02)

        loop = asyncio.get_running_loop()
        streams = [
            loop.create_task(stream(at_a, doomed, "doomed")),
            loop.create_task(stream(at_b, other, "other")),
        ]
        try:
            await at_b.wait_count(is_event("doomed"), 25, T, "the stream at B before the kill")
            seen_before_kill = max(m.body["i"] for m in at_b.broadcasts("doomed"))
            killed_at = time.monotonic()
            redis_cluster.kill(victim)
            last_sent_before_kill = sent["doomed"][-1]
            promoted = await asyncio.to_thread(
                redis_cluster.wait_promoted, victim, channel(cluster, doomed), 20
            )
            promoted_at = time.monotonic()

            # Delivery resumes: a message published after the kill reaches B.
            def resumed(m: Any) -> bool:
                return bool(is_event("doomed")(m) and m.body["i"] > last_sent_before_kill)

            await at_b.wait(resumed, 20, "the stream at B after the failover")
            resumed_at = time.monotonic()
            for node in (a, b):
                await wait_until(lambda n=node: _ready(n.http_url), 20, f"{node.port} ready")
            # Both nodes subscribed again, on the promoted replica.
            await wait_until(
                lambda: _true(shard_numsub(promoted, channel(cluster, doomed)) == 2),
                T,
                f"both nodes resubscribed on {promoted.name}",
            )
            ready_mark = sent["doomed"][-1]
            await asyncio.sleep(1.0)
        finally:
            stop.set()
            await asyncio.gather(*streams)

        # Everything published on `doomed` once both nodes were ready again
        # arrived.
        last = sent["doomed"][-1]
        await at_b.wait_count(
            lambda m: is_event("doomed")(m) and m.body["i"] > ready_mark,
            last - ready_mark,
            T,
            "every message sent after the failover",
        )
        got = [m.body["i"] for m in at_b.broadcasts("doomed")]
        # At most once, in order: across the failover some may be missing,
        # none twice, none out of order, ...
        assert got == sorted(set(got)), got
        lost = sorted(set(range(last + 1)) - set(got))
        # ... and only those in flight at the kill or sent during the failover.
        assert all(seen_before_kill < i <= ready_mark for i in lost), lost

        # The other shard never stopped: everything B sent on it reached A,
        # once, in order, the failover window included.
        count = len(sent["other"])
        at_a_other = await at_a.wait_count(is_event("other"), count, T, "the other shard at A")
        assert [m.body["i"] for m in at_a_other] == list(range(count))

        # Each node lost its link to the victim (one shard), and counted it.
        for node in (a, b):
            assert (await scrape(node.http_url)).value("hub_engine_reconnects_total") == 1
        print(
            f"\nfailover: promoted {promoted_at - killed_at:.2f} s after the kill, "
            f"delivery resumed {resumed_at - killed_at:.2f} s after the kill; "
            f"{len(lost)} of {last + 1} messages lost on the failed shard (one every 20 ms), "
            f"0 of {count} on the other shard"
        )
        assert "Traceback" not in cluster.logs()
    finally:
        await cluster.aclose()


async def test_a_moved_slot_is_resubscribed_on_its_new_owner(
    make_hub: MakeHub, tmp_path: Path, redis_cluster: RedisCluster
) -> None:
    """Redis drops the shard subscriptions of a slot that leaves a node
    (``sunsubscribe`` nobody asked for); the nodes subscribe on the new owner."""
    cluster = await on_cluster(make_hub, tmp_path, redis_cluster)
    try:
        a, b = await cluster.start(2)
        topic = f"org:{new_org()}"
        name = channel(cluster, topic)
        token = cluster.token("member", [topic.removeprefix("org:")])
        at_a = await joined(cluster, a, token, [topic], "A")
        at_b = await joined(cluster, b, token, [topic], "B")
        source = redis_cluster.owner(name)
        await wait_until(lambda: _true(shard_numsub(source, name) == 2), T, "subscriptions")

        target = next(n for n in redis_cluster.primaries() if n is not source)
        await asyncio.to_thread(redis_cluster.move_slot, name, target)
        await wait_until(
            lambda: _true(shard_numsub(target, name) == 2), T, f"resubscribed on {target.name}"
        )
        assert shard_numsub(source, name) == 0

        await at_a.broadcast(topic, "moved", {"to": target.port})
        assert (await at_b.wait(is_event("moved"), T, "a broadcast after the move")).body == {
            "to": target.port
        }
        # A migration is not a lost link.
        for node in (a, b):
            assert (await scrape(node.http_url)).value("hub_engine_reconnects_total") == 0
        assert "Traceback" not in cluster.logs()
    finally:
        await cluster.aclose()


async def _true(value: bool) -> bool:
    return value


async def _ready(url: str) -> bool:
    try:
        return await readyz(url) == 200
    except Exception:
        return False


# -- start-up: the wrong mode is one clear line ------------------------------------------


def serve(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "hub", "serve", "--port", "1"],
        env={**os.environ, "HUB_JWT_SECRET": "s" * 40, **env},
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
    )


def test_a_cluster_without_the_setting_stops_the_hub(redis_cluster: RedisCluster) -> None:
    result = serve({"HUB_REDIS_URL": redis_cluster.url, "HUB_REDIS_SHARDED": "1"})
    assert result.returncode == 2, result.stderr
    assert (
        f"HUB_REDIS_URL: {redis_cluster.url} is a Redis Cluster node; set HUB_REDIS_CLUSTER=1"
        in (result.stderr)
    )
    assert "Traceback" not in result.stderr


def test_the_setting_without_a_cluster_stops_the_hub() -> None:
    result = serve({"HUB_REDIS_URL": REDIS_URL, "HUB_REDIS_CLUSTER": "1"})
    assert result.returncode == 2, result.stderr
    assert f"HUB_REDIS_CLUSTER: {REDIS_URL} is not a Redis Cluster node" in result.stderr
    assert "Traceback" not in result.stderr
