"""`hub serve --workers N`: worker processes accepting on one port, each a
node of its own, joined through a real Redis and a real PostgreSQL event
store as the nodes of a cluster are."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

from tests.integration.test_cluster import is_event
from tests.support.cluster import Cluster, Conn, T, new_org, rest_broadcast, scrape, wait_until


def _parent(pid: int) -> int:
    """The parent of ``pid``, from /proc (the fourth field of its stat)."""
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def _running(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


async def test_workers_share_the_port_and_broadcasts_reach_every_worker(
    cluster: Cluster,
) -> None:
    await cluster.use_event_store()
    (hub,) = await cluster.start(1, HUB_WORKERS="2")
    org = new_org()
    topic = f"org:{org}"
    token = cluster.token("member", [org])

    # The kernel chooses the worker of each connection: connect until
    # /metrics, answered by one worker or the other, shows both holding
    # some (every scrape is a new connection, to either worker).
    conns: list[Conn] = []
    held: dict[str, float] = {}

    async def both_hold_connections() -> bool:
        if len(conns) < 60:
            conns.append(await cluster.conn(hub, token))
        metrics = await scrape(hub.http_url)
        for name, labels, value in metrics.samples:
            if name == "hub_connections":
                held[labels["node"]] = value
        return len([node for node, count in held.items() if count > 0]) == 2

    await wait_until(both_hold_connections, 30, "connections on both workers", every=0.05)

    # Each worker is a node named <HUB_NODE_ID>-<pid>, a child of the
    # supervisor that `hub serve` runs.
    base = cluster.node_id(hub)
    assert all(node.startswith(f"{base}-") for node in held), held
    pids = sorted(int(node.removeprefix(f"{base}-")) for node in held)
    assert [_parent(pid) for pid in pids] == [hub.process.pid] * 2

    for conn in conns:
        await conn.join(topic)
    # Published through whichever worker takes the request: every
    # subscriber gets each message once, in order, wherever it is.
    admin = cluster.admin_token()
    for i in range(20):
        response = await rest_broadcast(hub.http_url, admin, topic, "n", {"i": i})
        assert response.status_code == 202, response.text
    for conn in conns:
        got = await conn.wait_count(is_event("n"), 20, T, f"20 broadcasts at {conn.name}")
        assert [m.body["i"] for m in got] == list(range(20))
    await asyncio.sleep(0.2)
    assert all(len(conn.broadcasts("n")) == 20 for conn in conns)

    # SIGTERM reaches every worker; each drains (1012) and the supervisor
    # exits when they have.
    hub.process.send_signal(signal.SIGTERM)
    for conn in conns:
        await asyncio.wait_for(conn.closed.wait(), 15)
        assert conn.close_code == 1012, conn.close_code
    assert await asyncio.to_thread(hub.process.wait, 15) == 0
    assert not any(_running(pid) for pid in pids)
    assert "Traceback" not in cluster.logs()
