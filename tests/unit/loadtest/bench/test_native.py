"""The benchmark's native programs: built from source, and measuring right.

The native load client (loadtest/bench/native/client.c) is checked against
a real `hub serve`: it upgrades, joins ``realtime:org:<id>`` with vsn 2.0.0
and a JWT, counts exactly the binary broadcasts published, samples latency
from their payloads, and reports a refused join as a failure.  Against the
native floor (native/floor.c) it counts plain text frames, as the Python
client does.  Counts are exact; no timing is asserted.
"""

from __future__ import annotations

import asyncio
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from loadtest.bench import build, servers
from loadtest.bench.loadgen import ClientPool, RestPublisher
from tests.support.hubs import HubProcess

#: Every wait in this file.
T = 30.0


async def _until(pool: ClientPool, target: int) -> None:
    async def wait() -> None:
        while pool.count < target:
            await pool.wait_moved(0.1)

    await asyncio.wait_for(wait(), T)


def _hub_conns(hub: HubProcess, org: str, n: int, token: Callable[[], str]) -> list[dict[str, Any]]:
    url = f"ws://127.0.0.1:{hub.port}/realtime/v1/websocket?apikey={{token}}&vsn=2.0.0"
    return [
        {"url": url, "proto": "phx", "room": f"realtime:org:{org}", "token": token()}
        for _ in range(n)
    ]


def test_a_source_is_built_once_and_rebuilt_when_it_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(build, "SOURCES", tmp_path / "src")
    monkeypatch.setattr(build, "OUT", tmp_path / "out")
    (tmp_path / "src").mkdir()
    src = tmp_path / "src" / "probe.c"
    src.write_text("int main(void) { return 0; }\n")
    first = build.native("probe")
    assert first.exists()
    mtime = first.stat().st_mtime_ns
    assert build.native("probe") == first
    assert first.stat().st_mtime_ns == mtime
    src.write_text("int main(void) { return 1; }\n")
    second = build.native("probe")
    assert second != first and second.exists()
    assert not first.exists()  # the stale binary is gone


async def test_native_client_joins_the_hub_and_counts_its_broadcasts(
    hub_server: HubProcess,
) -> None:
    # The publisher sends message j to org:<prefix>o<j % rooms>.
    prefix = f"bench-{secrets.token_hex(4)}-"
    org = f"{prefix}o0"
    subs, messages = 20, 50
    pool = ClientPool(native=True)
    publisher = RestPublisher(hub_server.port, hub_server.admin_token(), f"org:{prefix}")
    try:
        ready = await pool.start(
            _hub_conns(hub_server, org, subs, lambda: hub_server.token(orgs=[org])), sample=1
        )
        assert ready["joined"] == subs, ready
        assert ready["failed"] == {}
        await publisher.connect()
        await publisher.publish(messages, 0, 1)
        await _until(pool, subs * messages)
        await asyncio.sleep(0.2)  # nothing more may arrive
        st = await pool.stats()
        assert st["count"] == subs * messages
        assert st["zero_conns"] == 0 and st["min_per_conn"] == messages
        assert st["open"] == subs and st["closed"] == 0
        # Every frame sampled (sample=1): each a plausible publish-to-receive time.
        assert len(st["lat"]) == subs * messages
        assert all(0 <= x < T * 1000 for x in st["lat"])
        assert st["per_url"] == {_hub_conns(hub_server, org, 1, str)[0]["url"]: subs * messages}
        await pool.reset()
        assert pool.count == 0
        assert (await pool.stats())["count"] == 0
    finally:
        await publisher.close()
        await pool.close()


async def test_native_client_reports_a_refused_join(hub_server: HubProcess) -> None:
    org = f"bench-{secrets.token_hex(4)}"
    pool = ClientPool(native=True)
    try:
        # A member of another org may not join this org's topic.
        conns = _hub_conns(hub_server, org, 3, lambda: hub_server.token(orgs=["elsewhere"]))
        ready = await pool.start(conns, join_timeout=10)
        assert ready["joined"] == 0
        assert sum(ready["failed"].values()) == 3
        assert all("join refused" in why for why in ready["failed"]), ready["failed"]
    finally:
        await pool.close()


@pytest.mark.parametrize("native", [True, False], ids=["native", "python"])
async def test_both_clients_count_the_floors_plain_frames(native: bool) -> None:
    dep = await servers.deploy("floor")
    pool = ClientPool(native=native)
    subs, messages = 30, 400
    try:
        ready = await pool.start(dep.connections(subs, 1))
        assert ready["joined"] == subs
        await dep.publisher.publish(messages, 0, 1)
        await _until(pool, subs * messages)
        await asyncio.sleep(0.2)
        st = await pool.stats()
        assert st["count"] == subs * messages
        assert st["min_per_conn"] == messages
    finally:
        await pool.close()
        await dep.stop()


@pytest.mark.skipif(shutil.which("npm") is None, reason="Bun is installed from npm")
async def test_bun_peer_delivers_to_every_room() -> None:
    dep = await servers.deploy("bun")
    pool = ClientPool(native=True)
    subs, rooms, messages = 40, 4, 200
    try:
        ready = await pool.start(dep.connections(subs, rooms))
        assert ready["joined"] == subs
        await dep.publisher.publish(messages, 0, rooms)
        # Each room gets messages / rooms; each socket is in one room.
        await _until(pool, subs * messages // rooms)
        await asyncio.sleep(0.2)
        st = await pool.stats()
        assert st["count"] == subs * messages // rooms
        assert st["min_per_conn"] == messages // rooms
    finally:
        await pool.close()
        await dep.stop()
