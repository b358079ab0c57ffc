"""Real nginx, configured with deploy/nginx/hub.conf, in front of several
real hub nodes joined by Redis (and, for the drain, one PostgreSQL event
store).  Clients connect only through nginx."""

from __future__ import annotations

import asyncio
import re
import signal
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import httpx
import pytest

from tests.support.cluster import (
    NGINX_TEMPLATE,
    V1,
    V2,
    Cluster,
    Msg,
    T,
    new_org,
    publish_event,
    rest_broadcast,
    scrape,
    seqs,
    wait_until,
)
from tests.support.hubs import HubProcess

C = TypeVar("C")


def is_event(event: str) -> Callable[[Msg], bool]:
    return lambda m: m.event == "broadcast" and m.user_event == event


def presence_config(key: str, **broadcast: Any) -> dict[str, Any]:
    return {"broadcast": {"self": False, **broadcast}, "presence": {"key": key, "enabled": True}}


async def connections(nodes: list[HubProcess]) -> list[float]:
    return [(await scrape(node.http_url)).value("hub_connections") for node in nodes]


async def connect_on(
    target: HubProcess, nodes: list[HubProcess], open_one: Callable[[], Awaitable[C]]
) -> C:
    """Open clients through nginx until one lands on ``target`` (judged by
    the nodes' hub_connections); the ones that landed elsewhere stay open."""
    index = nodes.index(target)
    for _ in range(6):
        before = await connections(nodes)
        client = await open_one()
        after = await wait_until(
            lambda before=before: _changed(nodes, before), T, "the new connection on /metrics"
        )
        if after[index] > before[index]:
            return client
    raise AssertionError(f"6 connections through nginx, none on node {target.port}")


async def _changed(nodes: list[HubProcess], before: list[float]) -> list[float] | None:
    now = await connections(nodes)
    return now if sum(now) > sum(before) else None


# -- the configuration file itself ----------------------------------------------------


def _block(conf: str, header: str) -> str:
    start = conf.index(header)
    return conf[start : conf.index("}", start)]


def test_nginx_conf_keeps_sockets_longer_than_the_heartbeat() -> None:
    conf = re.sub(r"#.*", "", NGINX_TEMPLATE.read_text())
    socket_block = _block(conf, "location = /realtime/v1/websocket")
    for directive in ("proxy_read_timeout", "proxy_send_timeout"):
        match = re.search(rf"{directive}\s+(\d+)s;", socket_block)
        assert match, f"{directive} missing from the WebSocket location"
        # Clients heartbeat every 25 s; the hub's own idle timeout is 60 s.
        assert int(match.group(1)) >= 120, match.group(0)
    assert "proxy_http_version 1.1;" in socket_block
    assert "proxy_set_header Upgrade $http_upgrade;" in socket_block
    assert "proxy_set_header Connection $connection_upgrade;" in socket_block
    assert "proxy_buffering off;" in socket_block
    assert re.search(r"map \$http_upgrade \$connection_upgrade", conf)
    upstream = _block(conf, "upstream hub_nodes")
    servers = re.findall(r"server\s+\S+\s+max_fails=\d+\s+fail_timeout=\d+s;", upstream)
    assert len(servers) >= 2, upstream
    for route in ("/realtime/v1/api/", "/api/", "/dashboard", "= /healthz", "= /metrics"):
        assert f"location {route} " in conf, route
    metrics = _block(conf, "location = /metrics")
    assert "deny all;" in metrics and "allow 127.0.0.1;" in metrics


# -- two clients on two nodes, through nginx ------------------------------------------------


async def test_two_clients_on_two_nodes_through_nginx(cluster: Cluster) -> None:
    nodes = await cluster.start(2)
    nginx = cluster.nginx(nodes)
    org = new_org()
    topic = f"org:{org}"
    wire = f"realtime:{topic}"

    alice = await cluster.conn(nginx, cluster.token("alice", [org]), V2, "alice")
    bob = await cluster.conn(nginx, cluster.token("bob", [org]), V1, "bob")
    # least_conn spreads the two sockets over the two nodes.
    assert await wait_until(
        lambda: _equals(connections(nodes), [1, 1]), T, "one connection on each node"
    )
    await alice.join(topic, presence_config("alice"))
    await bob.join(topic, presence_config("bob"))
    await alice.track(topic, {"name": "Alice"})
    await bob.track(topic, {"name": "Bob"})
    await alice.wait_presence(wire, {"alice", "bob"}, T)
    await bob.wait_presence(wire, {"alice", "bob"}, T)

    await alice.broadcast(topic, "hi", {"from": "alice"})
    assert (await bob.wait(is_event("hi"), T, "alice's message")).body == {"from": "alice"}
    await bob.broadcast(topic, "hello", {"from": "bob"})
    assert (await alice.wait(is_event("hello"), T, "bob's message")).body == {"from": "bob"}

    # REST through nginx: both routes, reaching both nodes' clients.
    admin = cluster.admin_token()
    response = await rest_broadcast(nginx.http_url, admin, topic, "rest", {"r": 1})
    assert response.status_code == 202, response.text
    await alice.wait(is_event("rest"), T, "REST broadcast")
    await bob.wait(is_event("rest"), T, "REST broadcast")
    async with httpx.AsyncClient(base_url=nginx.http_url, timeout=T) as http:
        response = await http.post(
            "/api/broadcast",
            json={"messages": [{"topic": topic, "event": "rest2", "payload": {}}]},
            headers={"Authorization": f"Bearer {admin}"},
        )
        assert response.status_code == 202, response.text
        event = await publish_event(http, admin, org, "durable", {"d": 1})
        history = await http.get(
            f"/api/orgs/{org}/events", headers={"Authorization": f"Bearer {admin}"}
        )
        # (no shared store in this test: each node keeps its own history)
        assert history.status_code == 200, history.text
        healthz = await http.get("/healthz")
        assert (healthz.status_code, healthz.text) == (200, "ok")
        metrics = await http.get("/metrics")
        assert metrics.status_code == 200 and "hub_connections" in metrics.text
        # /dashboard is passed to the nodes as it is (whatever they answer).
        direct = await http.get(f"{nodes[0].http_url}/dashboard")
        proxied = await http.get("/dashboard")
        assert (proxied.status_code, proxied.content) == (direct.status_code, direct.content)
        # Not the hub's: nginx answers 404 itself.
        assert (await http.get("/etc/passwd")).status_code == 404
    await bob.wait(is_event("rest2"), T, "REST broadcast on /api/broadcast")
    assert event["seq"] >= 1

    # /metrics is for internal addresses only: 127.0.0.2 is loopback, but not
    # one of the allowed ones.
    transport = httpx.AsyncHTTPTransport(local_address="127.0.0.2")
    async with httpx.AsyncClient(base_url=nginx.http_url, transport=transport) as outsider:
        assert (await outsider.get("/metrics")).status_code == 403
        assert (await outsider.get("/healthz")).status_code == 200

    # Tokens travel in the WebSocket URL; nginx's log must not keep them.
    # (nginx logs a WebSocket request when the socket closes.)
    await alice.close()
    await bob.close()
    await wait_until(
        lambda: _contains(nginx.access_log, "/realtime/v1/websocket"), T, "the sockets' log lines"
    )
    access = nginx.access_log()
    assert "/realtime/v1/websocket" in access, nginx.logs()
    assert "apikey" not in access and cluster.token("alice", [org])[:20] not in access
    assert "Traceback" not in cluster.logs()


async def _contains(read: Callable[[], str], text: str) -> bool:
    return text in read()


async def _equals(value: Awaitable[Any], expected: Any) -> bool:
    return bool(await value == expected)


# -- SIGTERM drain: clients move to the other node and resume -----------------------------


# realtime-py reads ConnectionClosed.code and .reason, deprecated in
# websockets 15; under filterwarnings=error those warnings would kill the
# client's receive loop the moment the hub closes the socket, which is
# exactly what this test does.
@pytest.mark.filterwarnings(
    r"ignore:ConnectionClosed\.(code|reason) is deprecated:DeprecationWarning"
)
async def test_sigterm_drain_moves_clients_and_they_resume(cluster: Cluster) -> None:
    await cluster.use_event_store()
    drain = 3
    nodes = await cluster.start(2, HUB_DRAIN_TIMEOUT=str(drain))
    nginx = cluster.nginx(nodes)
    org = new_org()
    topic = f"org:{org}"
    token = cluster.token("member", [org])
    admin = cluster.admin_token()

    # The real Python client through nginx; the node it lands on is drained.
    py = await cluster.py_channel(nginx, token, topic)
    counts = await connections(nodes)
    target = nodes[counts.index(1)]
    other = nodes[1 - nodes.index(target)]
    # A raw vsn 2 client (it reads meta.seq) on the same node.
    raw = await connect_on(target, nodes, lambda: cluster.conn(nginx, token, V2, "raw-1@target"))
    await raw.join(topic)

    http = httpx.AsyncClient(base_url=nginx.http_url, timeout=T)
    cluster.closers.append(http.aclose)
    for i in range(5):
        await publish_event(http, admin, org, "ev", {"i": i})
    first = await raw.wait_count(is_event("ev"), 5, T, "durable events before the drain")
    assert seqs(first) == [1, 2, 3, 4, 5]
    await py.messages.wait_count(5, T, "durable events at py", lambda m: m["event"] == "ev")

    # Durable events keep coming (through nginx) during the drain.
    total = 60
    published: list[int] = []

    async def publisher() -> None:
        for i in range(5, total):
            event = await publish_event(http, admin, org, "ev", {"i": i})
            published.append(event["seq"])
            await asyncio.sleep(0.03)

    feeding = asyncio.create_task(publisher())
    try:
        await wait_until(lambda: _published(feeding, published, 10), T, "10 events during the run")
        target.process.send_signal(signal.SIGTERM)
        drained_at = time.monotonic()
        # The node tells its clients to go elsewhere.
        await asyncio.wait_for(raw.closed.wait(), T)
        assert raw.close_code == 1012, raw.close_code
        last_seen = seqs(raw.broadcasts("ev"))[-1]
        # A few events are published while this client is away...
        away = len(published)
        await wait_until(lambda: _published(feeding, published, away + 3), T, "events while away")
        missed_until = published[-1]
        # ...then it reconnects through nginx (which now reaches the other
        # node) and resumes from the last seq it saw.
        raw2 = await cluster.conn(nginx, token, V2, "raw-2@other")
        await raw2.join(topic, {"broadcast": {"replay": {"after": last_seen}}})
        await asyncio.wait_for(feeding, 20)
    finally:
        feeding.cancel()
    assert published == list(range(6, total + 1))

    # Every durable event exactly once, in order, across the two sockets.
    got = await raw2.wait_count(is_event("ev"), total - last_seen, 10, "events after resuming")
    await asyncio.sleep(0.3)
    got = raw2.broadcasts("ev")
    assert seqs(raw.broadcasts("ev")) + seqs(got) == list(range(1, total + 1))
    assert [m.body["i"] for m in raw.broadcasts("ev") + got] == list(range(total))
    # What it missed came first, as a replay; then the live stream.
    replayed = [bool(m.meta.get("replayed")) for m in got]
    assert replayed == sorted(replayed, reverse=True), replayed
    assert all(m.meta.get("replayed") for m in got if m.meta["seq"] <= missed_until)

    # The node exits within its drain time, after a clean shutdown (uvicorn
    # re-raises the SIGTERM it handled, so the status may say "terminated").
    await asyncio.to_thread(target.process.wait, drain + 5)
    assert target.process.returncode in (0, -signal.SIGTERM), target.log()[-3000:]
    assert "Application shutdown complete" in target.log(), target.log()[-3000:]
    assert time.monotonic() - drained_at <= drain + 5
    assert (await connections([other]))[0] >= 2  # py and raw2 (and any extra)

    # The Python client reconnected by itself (through nginx, so to the other
    # node), rejoined, and receives both kinds of messages again.
    await py.subscribed(count=2, within=10)
    await raw2.broadcast(topic, "after_drain", {"ok": True})
    await py.messages.wait_for(lambda m: m["event"] == "after_drain", T, "a broadcast at py")
    await publish_event(http, admin, org, "ev_after", {"ok": True})
    await py.messages.wait_for(lambda m: m["event"] == "ev_after", T, "a durable event at py")
    await raw2.wait(is_event("ev_after"), T, "the last durable event")
    assert seqs(raw2.broadcasts("ev_after")) == [total + 1]
    assert "Traceback" not in cluster.logs()


async def _published(feeding: asyncio.Task[None], published: list[int], count: int) -> bool:
    """At least ``count`` events published; a publisher that stopped on an
    error fails the wait with that error rather than with a timeout."""
    if feeding.done():
        feeding.result()
    return len(published) >= count
