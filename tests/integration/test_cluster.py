"""Several real `hub serve` processes joined by a real Redis.

Each test runs its own nodes under a fresh ``HUB_REDIS_PREFIX``.  Clients
are the real Python client (``realtime``, vsn 1.0.0) and raw vsn 1.0.0 /
2.0.0 connections (binary kinds 3 and 4, as realtime-js speaks), so every
check is made across nodes and across wire formats.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import time
from typing import Any

import asyncpg
import httpx
import pytest

from tests.support.cluster import (
    POSTGRES_ADMIN_DSN,
    V1,
    V2,
    Cluster,
    Conn,
    T,
    kill_pubsub,
    new_org,
    pubsub_addrs,
    readyz,
    redis_client,
    rest_broadcast,
    scrape,
    wait_until,
)
from tests.support.hubs import HubProcess


def is_event(event: str) -> Any:
    return lambda m: m.event == "broadcast" and m.user_event == event


async def numsub(channel: str, sharded: bool) -> int:
    client = await redis_client()
    try:
        command = "SHARDNUMSUB" if sharded else "NUMSUB"
        reply = await client.execute_command("PUBSUB", command, channel)
    finally:
        await client.aclose()
    return int(reply[1])


# -- 1. broadcasts cross nodes, both ways, in order --------------------------------------


@pytest.mark.parametrize("sharded", [False, True], ids=["pubsub", "sharded"])
async def test_broadcast_crosses_nodes_both_ways_in_order(cluster: Cluster, sharded: bool) -> None:
    a, b = await cluster.start(2, HUB_REDIS_SHARDED="1" if sharded else "0")
    org = new_org()
    topic = f"org:{org}"
    token = cluster.token("member", [org])

    # Nobody subscribes yet: no node listens to the topic in Redis.
    channel = f"{cluster.prefix}:t:{topic}"
    assert await numsub(channel, sharded) == 0

    py_a = await cluster.py_channel(a, token, topic)  # vsn 1.0.0, node A
    assert await wait_until(lambda: _eq(numsub(channel, sharded), 1), T, "A's subscription")
    raw_b = await cluster.conn(b, token, V2, "raw-v2@B")
    await raw_b.join(topic)
    py_b = await cluster.py_channel(b, token, topic)  # vsn 1.0.0, node B
    raw_a = await cluster.conn(a, token, V2, "raw-v2@A")
    await raw_a.join(topic)
    # Each node subscribes once per topic, however many local subscribers.
    assert await wait_until(lambda: _eq(numsub(channel, sharded), 2), T, "one per node")

    # vsn 1 on A -> vsn 2 (binary kind 4) and vsn 1 on B.
    await py_a.channel.send_broadcast("hello", {"from": "py@A"})
    got = await raw_b.wait(is_event("hello"), T, "hello at B")
    assert got.binary and got.body == {"from": "py@A"}
    await py_b.messages.wait_for(lambda m: m["event"] == "hello", T, "hello at py@B")
    await raw_a.wait(is_event("hello"), T, "hello at raw@A")

    # vsn 2 binary kind 3 on B -> vsn 1 and vsn 2 on A.
    await raw_b.broadcast(topic, "reply", {"from": "raw@B"})
    message = await py_a.messages.wait_for(lambda m: m["event"] == "reply", T, "reply at py@A")
    assert message["payload"] == {"from": "raw@B"}
    assert (await raw_a.wait(is_event("reply"), T, "reply at raw@A")).body == {"from": "raw@B"}

    # REST broadcasts published on one node reach the other one.
    admin = cluster.admin_token()
    response = await rest_broadcast(b.http_url, admin, topic, "rest_b", {"via": "B"})
    assert response.status_code == 202, response.text
    await py_a.messages.wait_for(lambda m: m["event"] == "rest_b", T, "REST from B at A")
    response = await rest_broadcast(a.http_url, admin, topic, "rest_a", {"via": "A"})
    assert response.status_code == 202, response.text
    assert (await raw_b.wait(is_event("rest_a"), T, "REST from A at B")).body == {"via": "A"}

    # Order: 200 numbered messages from one publisher on each side.
    count = 200
    for i in range(count):
        await py_a.channel.send_broadcast("n_a", {"i": i})
    for i in range(count):
        await raw_b.broadcast(topic, "n_b", {"i": i})
    at_b = await raw_b.wait_count(is_event("n_a"), count, 10, "n_a at raw@B")
    assert [m.body["i"] for m in at_b] == list(range(count))
    at_py_b = await py_b.messages.wait_count(
        count, 10, "n_a at py@B", lambda m: m["event"] == "n_a"
    )
    assert [m["payload"]["i"] for m in at_py_b] == list(range(count))
    at_a = await py_a.messages.wait_count(count, 10, "n_b at py@A", lambda m: m["event"] == "n_b")
    assert [m["payload"]["i"] for m in at_a] == list(range(count))
    at_raw_a = await raw_a.wait_count(is_event("n_b"), count, 10, "n_b at raw@A")
    assert [m.body["i"] for m in at_raw_a] == list(range(count))

    # Nothing twice, and no echo to the sender (self: false) from the other node.
    await asyncio.sleep(0.3)
    assert len(raw_b.broadcasts("n_a")) == count and len(raw_a.broadcasts("n_b")) == count
    assert not raw_b.broadcasts("n_b") and not py_a.events("n_a")

    # The last local subscriber gone, the node stops listening to the topic.
    await raw_a.close()
    await py_a.client.close()
    assert await wait_until(lambda: _eq(numsub(channel, sharded), 1), T, "A to unsubscribe")
    assert "Traceback" not in cluster.logs()


async def _eq(value: Any, expected: Any) -> bool:
    return bool(await value == expected)


async def test_public_and_private_channels_of_one_name_never_meet_across_nodes(
    cluster: Cluster,
) -> None:
    """``room`` public and ``room`` private are two channels on every node:
    each node routes them by different keys, and Redis carries them apart."""
    a, b = await cluster.start(2)
    name = f"room:{new_org()}"
    anon, admin = cluster.token("anon-user", []), cluster.admin_token()
    public = {"broadcast": {"self": False}, "private": False}
    private = {"broadcast": {"self": False}, "private": True}
    pub_a = await cluster.conn(a, anon, V2, "public@A")
    pub_b = await cluster.conn(b, anon, V1, "public@B")
    priv_a = await cluster.conn(a, admin, V1, "private@A")
    priv_b = await cluster.conn(b, admin, V2, "private@B")
    for conn, config in ((pub_a, public), (pub_b, public), (priv_a, private), (priv_b, private)):
        await conn.join(name, config)
    await asyncio.sleep(0.3)  # both nodes subscribed in Redis
    await pub_a.broadcast(name, "open", {"n": 1})
    await priv_a.broadcast(name, "secret", {"n": 2})
    await pub_b.wait(is_event("open"), T, "the public message on B")
    await priv_b.wait(is_event("secret"), T, "the private message on B")
    # A sentinel on each channel after the first messages: once it arrived,
    # anything crossing over would have arrived too.
    await pub_a.broadcast(name, "sentinel", {})
    await priv_a.broadcast(name, "sentinel", {})
    await pub_b.wait(is_event("sentinel"), T, "the public sentinel")
    await priv_b.wait(is_event("sentinel"), T, "the private sentinel")
    assert not pub_b.broadcasts("secret") and not priv_b.broadcasts("open")
    assert not pub_a.broadcasts("secret") and not priv_a.broadcasts("open")
    assert "Traceback" not in cluster.logs()


# -- 2. presence across nodes, and a killed node ---------------------------------------------


def presence_config(key: str) -> dict[str, Any]:
    return {"broadcast": {"self": False}, "presence": {"key": key, "enabled": True}}


async def alice_and_bob_present(
    cluster: Cluster, a: HubProcess, b: HubProcess, alice_vsn: str, bob_vsn: str
) -> tuple[str, str, str, Conn, Conn]:
    """alice on node ``a`` and bob on node ``b`` join a new org's topic and
    track themselves; returns (org, topic, wire topic, alice, bob) once each
    sees both."""
    org = new_org()
    topic = f"org:{org}"
    wire = f"realtime:{topic}"
    alice = await cluster.conn(a, cluster.token("alice", [org]), alice_vsn, "alice@A")
    bob = await cluster.conn(b, cluster.token("bob", [org]), bob_vsn, "bob@B")
    await alice.join(topic, presence_config("alice"))
    await bob.join(topic, presence_config("bob"))
    await alice.track(topic, {"name": "Alice"})
    await bob.track(topic, {"name": "Bob"})
    await alice.wait_presence(wire, {"alice", "bob"}, T, "(alice on A sees bob on B)")
    await bob.wait_presence(wire, {"alice", "bob"}, T, "(bob on B sees alice on A)")
    return org, topic, wire, alice, bob


async def test_presence_across_nodes_and_a_killed_node(cluster: Cluster) -> None:
    timeout = 3.0
    a, b = await cluster.start(2, HUB_NODE_TIMEOUT=str(timeout))
    org, topic, wire, alice, bob = await alice_and_bob_present(cluster, a, b, V1, V2)
    # bob learnt about alice from a presence_diff that crossed the nodes.
    diffs = bob.select(lambda m: m.event == "presence_diff" and "alice" in m.payload["joins"])
    assert diffs and diffs[0].payload["joins"]["alice"]["metas"][0]["name"] == "Alice"

    # A node started later gets the whole state for its first subscriber.
    watch = await cluster.watch_nodes()
    (c,) = await cluster.start(1, HUB_NODE_TIMEOUT=str(timeout))
    c_ready = time.monotonic()
    carol = await cluster.conn(c, cluster.token("carol", [org]), V2, "carol@C")
    await carol.join(topic, presence_config("carol"))
    await carol.wait_presence(wire, {"alice", "bob"}, T, "(carol on C, before tracking)")
    await carol.track(topic, {"name": "Carol"})
    everyone = {"alice", "bob", "carol"}
    for conn in (alice, bob, carol):
        await conn.wait_presence(wire, everyone, T, f"({conn.name})")
    names = {meta["name"] for _, meta in carol.presence[wire].values()}
    assert names == {"Alice", "Bob", "Carol"}
    # C has heard B's heartbeat (published after C subscribed): the kill below
    # is the ordinary case (test_presence_of_a_node_never_heard_from_expires
    # covers the other one).
    await watch.wait_heartbeat(cluster.node_id(b), after=c_ready, within=3)

    # SIGKILL: no goodbye.  bob leaves everyone else's presence within the
    # documented time (the README says HUB_NODE_TIMEOUT + 1 s; 2 s of slack).
    b.process.send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    b.process.wait(T)
    await bob.closed.wait()
    budget = timeout + 3
    left_a = await alice.wait_presence(wire, {"alice", "carol"}, budget, "after SIGKILL of B")
    left_c = await carol.wait_presence(wire, {"alice", "carol"}, budget, "after SIGKILL of B")
    assert max(left_a, left_c) - killed_at <= budget
    leave = alice.select(lambda m: m.event == "presence_diff" and "bob" in m.payload["leaves"])
    assert leave, "alice saw no presence_diff leave for bob"
    assert "silent for" in a.log(), a.log()[-3000:]

    # The survivors still talk to each other.
    await alice.broadcast(topic, "still_here", {"x": 1})
    await carol.wait(is_event("still_here"), T, "a broadcast after the kill")


async def test_presence_of_a_node_never_heard_from_expires(cluster: Cluster) -> None:
    """A node that published presence and died before any other node heard
    one of its heartbeats (it crashed right after starting, or right after
    answering a new node's snapshot request) must not leave its members
    present forever.  The dead node is simulated deterministically: the test
    publishes, exactly as a node does, one presence diff of node ``ghost``,
    which never sends a heartbeat."""
    timeout = 3.0
    (a,) = await cluster.start(1, HUB_NODE_TIMEOUT=str(timeout))
    org = new_org()
    topic = f"org:{org}"
    wire = f"realtime:{topic}"
    alice = await cluster.conn(a, cluster.token("alice", [org]), V2, "alice@A")
    await alice.join(topic, presence_config("alice"))
    await alice.track(topic, {"name": "Alice"})
    await alice.wait_presence(wire, {"alice"}, T)

    meta = {"name": "Ghost", "phx_ref": "ghost.1"}
    diff = {"n": "ghost", "t": topic, "j": {"ghost": {"metas": [meta]}}, "l": {}}
    client = await redis_client()
    try:
        receivers = await client.publish(
            f"{cluster.prefix}:t:{topic}", b"P" + json.dumps(diff).encode()
        )
    finally:
        await client.aclose()
    assert receivers == 1
    await alice.wait_presence(wire, {"alice", "ghost"}, T, "(the ghost's join)")
    published = time.monotonic()
    await alice.wait_presence(
        wire, {"alice"}, timeout + 3, "(a node never heard from must expire too)"
    )
    assert time.monotonic() - published <= timeout + 3


async def test_presence_heals_after_a_node_stalls(cluster: Cluster) -> None:
    """A node that stops for longer than HUB_NODE_TIMEOUT (a long GC pause, a
    frozen VM, SIGSTOP) is declared gone and its members leave; when it comes
    back, its members (still connected to it all along) must reappear on the
    other nodes, and the other nodes' members on it."""
    timeout = 3.0
    a, b = await cluster.start(2, HUB_NODE_TIMEOUT=str(timeout))
    _, _, wire, alice, bob = await alice_and_bob_present(cluster, a, b, V2, V2)
    # A has heard B's heartbeat, so it knows B (see the test above otherwise).
    watch = await cluster.watch_nodes()
    await watch.wait_heartbeat(cluster.node_id(b), after=time.monotonic(), within=3)

    os.kill(b.process.pid, signal.SIGSTOP)
    try:
        await alice.wait_presence(wire, {"alice"}, timeout + 3, "(B stopped)")
    finally:
        os.kill(b.process.pid, signal.SIGCONT)
    assert not bob.closed.is_set()
    await alice.wait_presence(wire, {"alice", "bob"}, 8, "(B resumed: bob must come back)")
    await bob.wait_presence(wire, {"alice", "bob"}, 8, "(B resumed: alice must be back)")


# -- 3. Redis faults ------------------------------------------------------------------


async def test_redis_faults_reconnect_and_resubscribe(cluster: Cluster) -> None:
    """Node A reaches Redis through a proxy the test controls; node B directly."""
    proxy = await cluster.proxy()
    (a,) = await cluster.start(1, HUB_REDIS_URL=proxy.url, HUB_NODE_TIMEOUT="3")
    (b,) = await cluster.start(1, HUB_NODE_TIMEOUT="3")
    _, topic, wire, alice, bob = await alice_and_bob_present(cluster, a, b, V2, V1)
    assert (await scrape(a.http_url)).value("hub_engine_reconnects_total") == 0

    async def crosses(label: str, within: float = 10) -> None:
        """A fresh broadcast goes each way (retried: the engine has no
        durability, so one sent while the link is being rebuilt may be lost)."""
        for sender, receiver in ((alice, bob), (bob, alice)):
            deadline = time.monotonic() + within
            n = 0
            while True:
                n += 1
                event = f"{label}_{sender.name[:3]}_{n}"
                since = receiver.mark()
                await sender.broadcast(topic, event, {"n": n})
                try:
                    await receiver.wait(is_event(event), 0.5, event, since)
                    break
                except AssertionError:
                    if time.monotonic() > deadline:
                        raise AssertionError(
                            f"{label}: {sender.name} -> {receiver.name} does not cross "
                            f"after {within} s\n{cluster.logs()}"
                        ) from None

    # Traffic both ways while the subscription connection is killed.
    stop = asyncio.Event()

    async def chatter(conn: Conn, event: str) -> None:
        i = 0
        while not stop.is_set():
            await conn.broadcast(topic, event, {"i": i})
            i += 1
            await asyncio.sleep(0.01)

    traffic = [
        asyncio.create_task(chatter(alice, "tock")),
        asyncio.create_task(chatter(bob, "tick")),
    ]
    try:
        await alice.wait_count(is_event("tick"), 20, T, "ticks before the kill")
        # CLIENT KILL TYPE pubsub, aimed at node A's connection only (Redis is
        # shared with other test runs).
        mine = proxy.upstream_addrs & await pubsub_addrs()
        assert len(mine) == 1, (mine, proxy.upstream_addrs)
        assert await kill_pubsub(mine) == 1
        await wait_until(
            lambda: _metric(a.http_url, "hub_engine_reconnects_total", 1),
            T,
            "hub_engine_reconnects_total to count the killed subscription",
        )
        await wait_until(lambda: _is(readyz(a.http_url), 200), T, "A ready again")
        # Resubscribed: traffic still flows both ways after the kill.
        ticks, tocks = alice.mark(), bob.mark()
        await alice.wait(is_event("tick"), T, "ticks after the kill", ticks)
        await bob.wait(is_event("tock"), T, "tocks after the kill", tocks)
    finally:
        stop.set()
        await asyncio.gather(*traffic)
    assert "redis subscription lost" in a.log()
    assert mine.isdisjoint(await pubsub_addrs()), "the killed connection came back?"

    # Redis unreachable (restart, network): /readyz fails while it lasts.
    await proxy.down()
    await wait_until(lambda: _is(readyz(a.http_url), 503), 3, "A to report not ready")
    assert (await scrape(a.http_url)).value("hub_engine_ready") == 0
    await asyncio.sleep(2)
    assert await readyz(a.http_url) == 503, "ready while Redis is unreachable"
    await proxy.up()
    await wait_until(lambda: _is(readyz(a.http_url), 200), 8, "A ready after Redis is back")
    assert (await scrape(a.http_url)).value("hub_engine_reconnects_total") == 2
    await crosses("after_down")
    # B dropped alice when A's heartbeats stopped; A re-announced her.
    await bob.wait_presence(wire, {"alice", "bob"}, T, "(after Redis came back)")
    await alice.wait_presence(wire, {"alice", "bob"}, T, "(after Redis came back)")

    # Redis stalls (bytes stop, connections stay open): the health PING
    # times out and /readyz fails; when bytes flow again the node recovers.
    proxy.freeze()
    try:
        await wait_until(lambda: _is(readyz(a.http_url), 503), 12, "A to notice the stall")
    finally:
        proxy.thaw()
    await wait_until(lambda: _is(readyz(a.http_url), 200), 10, "A ready after the stall")
    assert (await scrape(a.http_url)).value("hub_engine_reconnects_total") == 3
    assert "did not answer PING" in a.log()
    await crosses("after_stall")
    await bob.wait_presence(wire, {"alice", "bob"}, T, "(after the stall)")
    await alice.wait_presence(wire, {"alice", "bob"}, T, "(after the stall)")
    assert "Traceback" not in cluster.logs()


async def _is(value: Any, expected: Any) -> bool:
    try:
        return bool(await value == expected)
    except httpx.HTTPError:
        return False


async def _metric(url: str, name: str, at_least: float, **labels: str) -> float | None:
    value = (await scrape(url)).value(name, **labels)
    return value if value >= at_least else None


# -- 5. every counter on /metrics moves -------------------------------------------------


class SlowReader:
    """A WebSocket that joins a channel and then never reads again."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    @classmethod
    async def open(cls, port: int, token: str, topic: str) -> SlowReader:
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        await asyncio.wait_for(loop.sock_connect(sock, ("127.0.0.1", port)), T)
        request = (
            f"GET /realtime/v1/websocket?apikey={token}&vsn=1.0.0 HTTP/1.1\r\n"
            f"Host: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        await loop.sock_sendall(sock, request.encode())
        # Like every client, wait for the 101 before the first frame.
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = await asyncio.wait_for(loop.sock_recv(sock, 4096), T)
            assert chunk, "closed during the handshake"
            buf += chunk
        assert buf.startswith(b"HTTP/1.1 101"), buf[:300]
        buf = buf.partition(b"\r\n\r\n")[2]
        join = (
            f'{{"topic":"realtime:{topic}","event":"phx_join","payload":{{}},'
            '"ref":"1","join_ref":"1"}'
        ).encode()
        mask = b"\x00\x00\x00\x00"  # a zero mask leaves the payload as is
        await loop.sock_sendall(sock, bytes([0x81, 0x80 | len(join)]) + mask + join)
        while b"phx_reply" not in buf:
            chunk = await asyncio.wait_for(loop.sock_recv(sock, 4096), T)
            assert chunk, "closed before the join reply"
            buf += chunk
        assert b'"ok"' in buf, buf[:300]
        return cls(sock)

    def close(self) -> None:
        self.sock.close()


async def _listen_pids(dsn_database: str) -> list[int]:
    conn = await asyncpg.connect(POSTGRES_ADMIN_DSN, timeout=10)
    try:
        rows = await conn.fetch(
            "SELECT pid FROM pg_stat_activity"
            " WHERE datname = $1 AND application_name LIKE '%listen'",
            dsn_database,
        )
    finally:
        await conn.close()
    return [row["pid"] for row in rows]


async def test_every_metrics_counter_moves(cluster: Cluster) -> None:
    await cluster.use_event_store()
    proxy = await cluster.proxy()
    small = {
        "HUB_MAX_OUTBOX_BYTES": "1048576",
        "HUB_MAX_FRAME_BYTES": "262144",
        "HUB_MAX_PAYLOAD_BYTES": "131072",
    }
    (a,) = await cluster.start(1, **small)
    (b,) = await cluster.start(1, HUB_REDIS_URL=proxy.url, **small)
    org = new_org()
    topic = f"org:{org}"
    before_a = await scrape(a.http_url)
    for name in ("hub_connections", "hub_channels", "hub_joins_total", "hub_messages_in_total"):
        assert before_a.value(name) == 0, name
    assert "hub_fanout_latency_seconds_count" in before_a.names()

    alice = await cluster.conn(a, cluster.token("alice", [org]), V2, "alice@A")
    bob = await cluster.conn(b, cluster.token("bob", [org]), V1, "bob@B")
    await alice.join(topic)
    await bob.join(topic)
    # A refused join (not a member of that org) is counted by reason.
    reply = await alice.join(f"org:{new_org()}", expect="error")
    assert reply.payload["response"]["reason"].startswith("Unauthorized")

    count = 10
    for i in range(count):
        await bob.broadcast(topic, "m", {"i": i})
    await alice.wait_count(is_event("m"), count, T, "broadcasts from B")

    m_a, m_b = await scrape(a.http_url), await scrape(b.http_url)
    assert m_a.value("hub_connections") == 1 and m_b.value("hub_connections") == 1
    assert m_a.value("hub_channels") == 1 and m_b.value("hub_channels") == 1
    assert m_a.value("hub_joins_total") == 1 and m_b.value("hub_joins_total") == 1
    assert m_a.value("hub_joins_refused_total", reason="Unauthorized") == 1
    assert m_b.value("hub_joins_refused_total") == 0
    # bob's node read his join and broadcasts; alice's node wrote them out.
    assert m_b.value("hub_messages_in_total") >= count + 1
    assert m_b.value("hub_bytes_in_total") > m_b.value("hub_messages_in_total") * 20
    assert m_a.value("hub_messages_out_total") >= count + 2  # + replies, presence_state
    assert m_a.value("hub_bytes_out_total") > count * 20
    # Fan-out latency is observed on both nodes: bob's (local) and alice's (remote).
    assert m_a.value("hub_fanout_latency_seconds_count") == count
    assert m_b.value("hub_fanout_latency_seconds_count") == count
    assert m_a.value("hub_slow_consumer_closes_total") == 0

    # A slow consumer on B, fed from A through Redis, is cut with 4001.
    slow = await SlowReader.open(b.port, cluster.token("slow", [org]), topic)
    try:
        admin = {"Authorization": f"Bearer {cluster.admin_token()}"}
        blob = "x" * 100_000
        async with httpx.AsyncClient(base_url=a.http_url, timeout=T) as http:
            for i in range(100):
                message = {"topic": topic, "event": "big", "payload": {"i": i, "b": blob}}
                response = await http.post(
                    "/realtime/v1/api/broadcast", json={"messages": [message]}, headers=admin
                )
                assert response.status_code == 202, response.text
        await wait_until(
            lambda: _metric(b.http_url, "hub_slow_consumer_closes_total", 1),
            10,
            "the slow consumer on B to be cut",
        )
    finally:
        slow.close()
    m_b = await scrape(b.http_url)
    assert m_b.value("hub_closes_total", code="4001") == 1
    # The prompt readers got every big message.
    await alice.wait_count(is_event("big"), 100, 10, "big messages at alice")
    await bob.wait_count(is_event("big"), 100, 10, "big messages at bob")

    # Engine reconnects: B's subscription is killed.
    assert m_b.value("hub_engine_reconnects_total") == 0
    mine = proxy.upstream_addrs & await pubsub_addrs()
    assert await kill_pubsub(mine) == 1
    await wait_until(
        lambda: _metric(b.http_url, "hub_engine_reconnects_total", 1), T, "engine reconnect on B"
    )

    # Listener reconnects: the event store's LISTEN connections are cut.
    assert cluster.database is not None
    pids = await _listen_pids(cluster.database)
    assert len(pids) == 2, pids
    conn = await asyncpg.connect(POSTGRES_ADMIN_DSN, timeout=10)
    try:
        for pid in pids:
            await conn.execute("SELECT pg_terminate_backend($1)", pid)
    finally:
        await conn.close()
    for node in (a, b):
        await wait_until(
            lambda node=node: _metric(node.http_url, "hub_listener_reconnects_total", 1),
            10,
            f"listener reconnect on {cluster.node_id(node)}",
        )

    # Gauges come back down when clients leave.
    await alice.close()
    await bob.close()
    for node in (a, b):
        await wait_until(
            lambda node=node: _zero_gauges(node.http_url), T, "connections and channels at 0"
        )
    assert "Traceback" not in cluster.logs()


async def _zero_gauges(url: str) -> bool:
    metrics = await scrape(url)
    return metrics.value("hub_connections") == 0 and metrics.value("hub_channels") == 0


async def test_org_quotas_hold_across_nodes(cluster: Cluster) -> None:
    """Per-org limits count every node's share (through the heartbeat) and
    refuse only the org over its quota."""
    a, b = await cluster.start(2, HUB_ORG_MAX_CONNECTIONS="2", HUB_ORG_MESSAGES_PER_SECOND="1000")
    org, other = new_org(), new_org()
    on_a = await cluster.conn(a, cluster.token("u1", [org, other]), V2, "u1@A")
    await on_a.join(f"org:{org}")
    on_b = await cluster.conn(b, cluster.token("u2", [org, other]), V2, "u2@B")
    await on_b.join(f"org:{org}")
    third = await cluster.conn(a, cluster.token("u3", [org, other]), V2, "u3@A")
    # Node A knows of B's connection once B's next heartbeat (1 s) arrived.
    deadline = time.monotonic() + 5
    while not await _refused(third, org):
        assert time.monotonic() < deadline, "node A never counted node B's connection"
        await asyncio.sleep(0.3)
    # Another org is unaffected, and the org's admitted members still talk.
    await third.join(f"org:{other}")
    await on_a.broadcast(f"org:{org}", "still", {"ok": True})
    await on_b.wait(is_event("still"), T, "a broadcast inside the quota")
    # A slot frees when a member leaves (after B's next heartbeat).
    await on_b.close()
    deadline = time.monotonic() + 5
    while await _refused(third, org):
        assert time.monotonic() < deadline, "the freed slot never became usable"
        await asyncio.sleep(0.3)


async def _refused(conn: Conn, org: str) -> bool:
    """Try to join ``org:<org>``; True when refused for the connection quota
    (a successful join is left again, so the next try starts clean)."""
    topic = f"realtime:org:{org}"
    ref = conn.next_ref()
    since = conn.mark()
    await conn.push(topic, "phx_join", {"config": {}}, ref=ref, join_ref=ref)
    reply = await conn.wait(lambda m: m.event == "phx_reply" and m.ref == ref, T, "join", since)
    if reply.payload["status"] == "error":
        reason = reply.payload["response"]["reason"]
        assert reason == "ConnectionRateLimitReached: Too many connected users", reason
        return True
    leave = conn.next_ref()
    await conn.push(topic, "phx_leave", {}, ref=leave, join_ref=ref)
    await conn.wait(lambda m: m.event == "phx_close", T, "leave", since)
    return False
