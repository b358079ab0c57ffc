"""Database per org against real PostgreSQL: the registry and its bad
input, a FederatedStore routing each org to its own database and learning
registry changes while it runs, a tenant database terminated or stopped (a
second PostgreSQL server) while the other orgs flow, and moving an org
between databases under continuous writes, killed half way and resumed,
or rolled back."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import asyncpg
import pytest

from hub.config import Settings
from hub.node import _make_store
from hub.projections.catalog import PROJECTION_LOCK
from hub.store import moves, registry
from hub.store.base import StoredEvent, StoreUnavailable
from hub.store.federation import FederatedStore
from hub.store.migrate import migrate
from hub.store.registry import RegistryError
from tests.support.mother import fresh_database
from tests.support.pg import create_database, drop_database, new_database_name, new_org
from tests.support.pgserver import PgServer

T = 15.0


@pytest.fixture
async def network() -> AsyncIterator[tuple[str, str, str]]:
    """A control database and two tenant databases, migrated, of this test."""
    async with fresh_database() as control, fresh_database() as t1, fresh_database() as t2:
        yield control, t1, t2


class Seen:
    """The store's announcements, per org."""

    def __init__(self) -> None:
        self.events: dict[str, list[StoredEvent]] = {}

    def __call__(self, event: StoredEvent) -> None:
        self.events.setdefault(event.org, []).append(event)

    def seqs(self, org: str) -> list[int]:
        return [e.seq for e in self.events.get(org, [])]

    async def wait(self, org: str, count: int, within: float = T) -> None:
        deadline = time.monotonic() + within
        while len(self.events.get(org, [])) < count:
            assert time.monotonic() < deadline, f"{org}: {self.seqs(org)}"
            await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def federated(control: str) -> AsyncIterator[tuple[FederatedStore, Seen]]:
    store = _make_store(Settings(database_url=control, projections=False, node_id="t"))
    assert isinstance(store, FederatedStore)
    seen = Seen()
    store.listen(seen)
    await store.start()
    try:
        yield store, seen
    finally:
        await store.stop()


async def held_by(dsn: str, org: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        return int(await conn.fetchval("SELECT count(*) FROM hub.events WHERE org = $1", org))
    finally:
        await conn.close()


async def eventually(check: Callable[[], Any], what: str, within: float = T) -> None:
    deadline = time.monotonic() + within
    while not await check():
        assert time.monotonic() < deadline, f"timed out: {what}"
        await asyncio.sleep(0.05)


def test_the_move_lock_is_the_projections_lock() -> None:
    assert moves.PROJECTION_LOCK == PROJECTION_LOCK


async def test_registry_routes_each_org_to_its_own_database(
    network: tuple[str, str, str],
) -> None:
    control, t1, t2 = network
    a, b, c, d = (new_org() for _ in range(4))
    await registry.add(control, a, t1)
    await registry.add(control, b, t2)

    # Bad input, each with its own message, and nothing registered.
    with pytest.raises(RegistryError, match="already registered in"):
        await registry.add(control, a, t2)
    with pytest.raises(RegistryError, match="that is the control database"):
        await registry.add(control, d, control)
    with pytest.raises(RegistryError, match="cannot reach"):
        await registry.add(control, d, "postgresql://postgres@127.0.0.1:1/nowhere")
    bare_name = new_database_name()
    bare = await create_database(bare_name)
    try:
        with pytest.raises(RegistryError, match="is not migrated"):
            await registry.add(control, d, bare)
    finally:
        await drop_database(bare_name)
    assert {e.org for e in await registry.entries(control)} == {a, b}

    async with federated(control) as (store, seen):
        for org in (a, b, c):
            await store.append(org, [("t", {"n": i}) for i in range(3)])
            await seen.wait(org, 3)
            assert seen.seqs(org) == [1, 2, 3]
        # Each org's events are in its own database only.
        assert [await held_by(db, a) for db in (control, t1, t2)] == [0, 3, 0]
        assert [await held_by(db, b) for db in (control, t1, t2)] == [0, 0, 3]
        assert [await held_by(db, c) for db in (control, t1, t2)] == [3, 0, 0]
        assert [e.seq for e in await store.read(a, after=1)] == [2, 3]
        assert await store.last_seq(b) == 3
        assert set(await store.orgs()) >= {a, b, c}
        assert store.database_of(a) == registry.display_name(t1)
        assert store.database_of(c) == "control"
        assert [d_.ready for d_ in store.databases()] == [True, True, True]

        # An org with events in the control database cannot just be placed.
        with pytest.raises(RegistryError, match="has 3 events in the control database"):
            await registry.add(control, c, t1)
        # A change to the registry reaches the running store within a second.
        await registry.add(control, d, t1)

        async def d_routed() -> bool:
            return store.database_of(d) == registry.display_name(t1)

        await eventually(d_routed, "the new registration")
        await store.append(d, [("t", {})])
        assert await held_by(t1, d) == 1 and await held_by(control, d) == 0
        with pytest.raises(RegistryError, match="has 1 events in"):
            await registry.remove(control, d)
        with pytest.raises(RegistryError, match="is not registered"):
            await registry.remove(control, c)


async def test_a_broken_tenant_database_harms_only_its_orgs() -> None:
    server = await asyncio.to_thread(PgServer.create)
    try:
        await asyncio.to_thread(server.start)
        admin = await asyncpg.connect(server.admin_dsn)
        await admin.execute('CREATE DATABASE "tenant"')
        await admin.close()
        tenant = server.dsn("tenant")
        await migrate(tenant)
        async with fresh_database() as control:
            far, near = new_org(), new_org()
            await registry.add(control, far, tenant)
            async with federated(control) as (store, seen):

                async def all_ready() -> bool:
                    return all(d.ready for d in store.databases())

                await eventually(all_ready, "the tenant database to start")
                await store.append(far, [("t", {})])
                await seen.wait(far, 1)

                # Its backends terminated: events written meanwhile, straight
                # into its log, are announced once the listener is back.
                conn = await asyncpg.connect(tenant)
                await conn.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = 'tenant' AND pid <> pg_backend_pid()"
                )
                for i in range(5):
                    await conn.fetch("SELECT hub.append_event($1, 'event', 't', $2)", far, str(i))
                    await store.append(near, [("t", {"i": i})])
                await conn.close()
                await seen.wait(far, 6)
                assert seen.seqs(far) == list(range(1, 7))
                await seen.wait(near, 5)

                # Stopped: its orgs get StoreUnavailable, the others go on.
                await asyncio.to_thread(server.stop)
                with pytest.raises(StoreUnavailable):
                    await store.append(far, [("t", {})])
                started = time.monotonic()
                for i in range(20):
                    await store.append(near, [("t", {"i": i})])
                await seen.wait(near, 25)
                assert time.monotonic() - started < 5
                assert store.ready, "a tenant database down must not make the node unready"

                async def tenant_unwell() -> bool:
                    return [d.ready for d in store.databases()] == [True, False]

                await eventually(tenant_unwell, "the tenant database to be named unwell")
                # Back: writes and announcements resume, nothing lost.
                await asyncio.to_thread(server.start)

                async def tenant_back() -> bool:
                    try:
                        await store.append(far, [("t", {"back": True})])
                    except StoreUnavailable:
                        return False
                    return True

                await eventually(tenant_back, "the tenant database to take writes again", 30)
                await seen.wait(far, 7, 30)
                assert seen.seqs(far) == list(range(1, 8))
    finally:
        await asyncio.to_thread(server.destroy)


async def _write_forever(
    store: FederatedStore, org: str, stop: asyncio.Event, written: list[int]
) -> None:
    """Publish through the store until told to stop; every call must work."""
    while not stop.is_set():
        [event] = await store.append(org, [("tick", {"n": len(written) + 1})])
        written.append(event.seq)
        await asyncio.sleep(0.002)


async def test_a_live_move_there_and_back_loses_and_repeats_nothing(
    network: tuple[str, str, str],
) -> None:
    control, t1, _ = network
    org = new_org()
    async with federated(control) as (store, seen):
        await store.append(org, [("tick", {"n": i}) for i in range(5000)])
        stop = asyncio.Event()
        written: list[int] = []
        writer = asyncio.create_task(_write_forever(store, org, stop, written))
        await asyncio.sleep(0.3)
        lines: list[str] = []
        report = await moves.move(control, org, t1, say=lines.append)
        assert report.frozen_for is not None and report.frozen_for < 2.0, report
        await asyncio.sleep(0.5)
        back = await moves.move(control, org, registry.CONTROL, say=lines.append)
        await asyncio.sleep(0.3)
        stop.set()
        await writer
        last = written[-1]
        await seen.wait(org, last)
        # Every event announced once, in order, seqs without a gap.
        assert seen.seqs(org) == list(range(1, last + 1))
        assert written == list(range(5001, last + 1))
        assert report.target == registry.display_name(t1) and back.target == "control"
        assert await held_by(control, org) == last and await held_by(t1, org) == 0
        assert [e.seq for e in await store.read(org, after=last - 2)] == [last - 1, last]
        assert await registry.entries(control) == []
        assert any("frozen at seq" in line for line in lines), lines

        # Bad input: a move to where it lives, an org without events.
        with pytest.raises(RegistryError, match="already lives in"):
            await moves.move(control, org, registry.CONTROL)
        with pytest.raises(RegistryError, match="has no events"):
            await moves.move(control, new_org(), t1)
        with pytest.raises(RegistryError, match="no move of org"):
            await moves.move(control, org, t1, resume=True)


async def kill_while_copying(org: str, target: str, env: dict[str, str]) -> None:
    """Start `hub orgs move`, SIGKILL it once it has copied a chunk."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "hub",
        "orgs",
        "move",
        org,
        "--to",
        target,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    assert proc.stdout is not None
    while b"copied" not in await asyncio.wait_for(proc.stdout.readline(), T):
        pass
    proc.send_signal(signal.SIGKILL)
    await proc.wait()


async def test_a_move_killed_half_way_is_resumed_or_rolled_back(
    network: tuple[str, str, str],
) -> None:
    control, t1, t2 = network
    org = new_org()
    async with federated(control) as (store, seen):
        await store.append(org, [("tick", {"n": i}) for i in range(1000)])
        for _ in range(60):
            await store.append(org, [("tick", {"n": i}) for i in range(1000)])
        env = {**os.environ, "HUB_DATABASE_URL": control, "PYTHONUNBUFFERED": "1"}
        # Killed while copying: the move stays recorded, half copied.
        await kill_while_copying(org, t1, env)
        [entry] = await registry.entries(control)
        assert entry.moving == "copying"
        partial = await held_by(t1, org)
        assert 0 < partial < 61_000
        # A second move of the same org is refused while this one is open.
        with pytest.raises(RegistryError, match="is in progress"):
            await moves.move(control, org, t2)

        # Rolled back: the org writes to its database again, the copy is gone.
        await moves.abort(control, org, say=lambda _: None)
        assert await held_by(t1, org) == 0
        await store.append(org, [("after-abort", {})])
        assert await store.last_seq(org) == 61_001

        # Killed again, then resumed: the copy goes on where it stopped.
        await kill_while_copying(org, t1, env)
        report = await moves.move(control, org, t1, resume=True, say=lambda _: None)
        assert report.seq == 61_001 and 0 < report.copied < 61_001
        assert await held_by(t1, org) == 61_001 and await held_by(control, org) == 0
        await store.append(org, [("moved", {})])
        await seen.wait(org, 61_002)
        assert seen.seqs(org) == list(range(1, 61_003))
