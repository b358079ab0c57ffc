"""PostgresStore against a real database: ordering under concurrent writers,
large events, a listener that dies loudly or silently, migrations, and change
capture from tracked tables."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import random
import re
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from hub.store.base import StoredEvent, StoreError
from hub.store.listener import CHANNEL
from hub.store.migrate import applied_versions, migrate
from hub.store.postgres import PostgresStore
from hub.store.tracking import TrackingError, track, tracked, untrack
from tests.support.pg import (
    Announced,
    create_database,
    drop_database,
    new_database_name,
    new_org,
    pg_dsn,  # noqa: F401 - fixture
)

VERSIONS = [
    "0001_events",
    "0002_capture_change",
    "0003_event_id_index",
    "0004_realtime_authorization",
    "0005_database_broadcast",
    "0006_orgless_changes",
    "0007_rls_prepared_lookup",
    "0008_projections",
    "0009_schema_per_org",
    "0010_event_partitions",
    "0011_org_databases",
]


@pytest.fixture
async def store(pg_dsn: str) -> AsyncIterator[PostgresStore]:  # noqa: F811
    """A started store with fast liveness checks; ``store.announced`` records."""
    store = PostgresStore(pg_dsn, liveness_interval=0.5, liveness_timeout=1.0)
    store.listen(Announced())
    await store.start()
    try:
        yield store
    finally:
        await store.stop()


def announced(store: PostgresStore) -> Announced:
    assert isinstance(store._on_event, Announced)
    return store._on_event


async def wait_until(predicate: Any, within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail("condition not reached in time")
        await asyncio.sleep(0.01)


def assert_exactly_once_in_order(events: list[StoredEvent], count: int) -> None:
    assert [e.seq for e in events] == list(range(1, count + 1))
    assert len({e.id for e in events}) == count


async def append_raw(conn: asyncpg.Connection, org: str, type_: str, payload: Any) -> int:
    """Append like an app or a trigger would: straight through the SQL function."""
    row = await conn.fetchrow(
        "SELECT seq FROM hub.append_event($1, 'event', $2, $3::jsonb)",
        org,
        type_,
        json.dumps(payload),
    )
    return int(row["seq"])


# -- ordering --------------------------------------------------------------------


async def test_concurrent_writer_connections_stay_ordered(
    store: PostgresStore,
    pg_dsn: str,  # noqa: F811
) -> None:
    """8 connections x 50 transactions into one org, each transaction holding
    its seq for a random moment: seqs are gap-free and announced in order."""
    org = new_org()
    writers, per_writer = 8, 50

    async def writer(w: int) -> list[int]:
        conn = await asyncpg.connect(pg_dsn)
        seqs = []
        try:
            for i in range(per_writer):
                async with conn.transaction():
                    await asyncio.sleep(random.uniform(0, 0.002))
                    seqs.append(await append_raw(conn, org, "w", {"w": w, "i": i}))
                    # Commit late while others queue on the org's seq.
                    await asyncio.sleep(random.uniform(0, 0.002))
        finally:
            await conn.close()
        return seqs

    results = await asyncio.gather(*(writer(w) for w in range(writers)))
    total = writers * per_writer
    assert sorted(s for seqs in results for s in seqs) == list(range(1, total + 1))
    got = await announced(store).wait_for(org, total)
    await asyncio.sleep(0.2)
    assert_exactly_once_in_order(announced(store).of(org), total)
    for w, seqs in enumerate(results):
        assert seqs == sorted(seqs)
        mine = [e.payload["i"] for e in got if e.payload["w"] == w]
        assert mine == list(range(per_writer))
    assert store.ready


async def test_large_events_are_fetched_by_key(store: PostgresStore) -> None:
    org = new_org()
    small = {"text": "x" * 100}
    large = {"text": "ü" * 5000, "list": list(range(500))}  # > 8000 bytes as JSON
    huge = {"blob": "y" * 200_000}
    stored = await store.append(org, [("small", small), ("large", large)])
    stored += await store.append(org, [("huge", huge)])
    got = await announced(store).wait_for(org, 3)
    assert [e.payload for e in got] == [small, large, huge]
    assert [e.id for e in got] == [e.id for e in stored]
    assert store.fetched_by_key == 2
    assert store.recovered == 0


async def test_a_lost_notification_is_recovered_from_the_table(
    store: PostgresStore,
    pg_dsn: str,  # noqa: F811
) -> None:
    org = new_org()
    conn = await asyncpg.connect(pg_dsn)
    try:
        # seq 1 is written without its NOTIFY, as if the notification was lost.
        async with conn.transaction():
            await conn.execute("INSERT INTO hub.org_seq (org, seq) VALUES ($1, 1)", org)
            await conn.execute(
                "INSERT INTO hub.events (org, seq, type, payload) VALUES ($1, 1, 'n', '1')", org
            )
        await append_raw(conn, org, "n", 2)
        got = await announced(store).wait_for(org, 2)
        assert [(e.seq, e.payload) for e in got] == [(1, 1), (2, 2)]
        assert store.recovered == 1
        # A repeated notification is dropped, a malformed one ignored.
        for note in [json.dumps({"org": org, "seq": 1, "ref": True}), "not json", '{"org": 1}']:
            await conn.execute("SELECT pg_notify($1, $2)", CHANNEL, note)
        await append_raw(conn, org, "n", 3)
        await announced(store).wait_for(org, 3)
        await asyncio.sleep(0.2)
        assert_exactly_once_in_order(announced(store).of(org), 3)
    finally:
        await conn.close()


async def test_queue_overflow_is_repaired_by_a_catch_up(pg_dsn: str) -> None:  # noqa: F811
    store = PostgresStore(pg_dsn, queue_size=4)
    store.listen(Announced())
    await store.start()
    try:
        org = new_org()
        await store.append(org, [("n", i) for i in range(200)])
        got = await announced(store).wait_for(org, 200)
        await asyncio.sleep(0.2)
        assert_exactly_once_in_order(announced(store).of(org), 200)
        assert [e.payload for e in got] == list(range(200))
        assert store.recovered > 0
        assert store.ready
    finally:
        await store.stop()


# -- listener faults ---------------------------------------------------------------


async def test_terminated_listener_reconnects_without_loss(
    store: PostgresStore,
    pg_dsn: str,  # noqa: F811
) -> None:
    org = new_org()
    admin = await asyncpg.connect(pg_dsn)
    pid = store.listener_pid
    assert pid is not None
    name = await admin.fetchval("SELECT application_name FROM pg_stat_activity WHERE pid = $1", pid)
    assert "listen" in name
    writers, per_writer = 4, 100

    async def writer(w: int) -> None:
        conn = await asyncpg.connect(pg_dsn)
        try:
            for i in range(per_writer):
                await append_raw(conn, org, "w", {"w": w, "i": i})
                await asyncio.sleep(random.uniform(0, 0.004))
        finally:
            await conn.close()

    seen_not_ready = False

    async def kill_mid_burst() -> None:
        nonlocal seen_not_ready
        await wait_until(lambda: len(announced(store).of(org)) >= 60)
        assert await admin.fetchval("SELECT pg_terminate_backend($1)", pid)
        for _ in range(5000):
            if not store.ready:
                seen_not_ready = True
                break
            await asyncio.sleep(0.001)

    try:
        await asyncio.gather(kill_mid_burst(), *(writer(w) for w in range(writers)))
        total = writers * per_writer
        await announced(store).wait_for(org, total)
        await wait_until(lambda: store.ready)
        await asyncio.sleep(0.2)
        assert_exactly_once_in_order(announced(store).of(org), total)
        assert seen_not_ready
        assert store.listener_reconnects == 1
        assert store.listener_pid not in (None, pid)
        # The new connection still hears new events.
        await store.append(org, [("after", None)])
        await announced(store).wait_for(org, total + 1)
    finally:
        await admin.close()


class FreezableProxy:
    """A TCP proxy to PostgreSQL.  ``freeze()`` stops every byte of the
    connections open at that moment while their sockets stay open: the
    silent death of a NAT or a cable, which no TCP error reports."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.frozen: list[asyncio.Event] = []
        self.closing = asyncio.Event()
        self.writers: list[asyncio.StreamWriter] = []
        self.connections = 0

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    def freeze(self) -> None:
        for event in self.frozen:
            event.set()

    async def close(self) -> None:
        self.closing.set()
        self.server.close()
        for writer in self.writers:
            writer.close()
        await self.server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        frozen = asyncio.Event()
        self.frozen.append(frozen)
        up_reader, up_writer = await asyncio.open_connection(self.host, self.port)
        self.writers += [writer, up_writer]

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError):
                while data := await src.read(65536):
                    if frozen.is_set():
                        await self.closing.wait()
                        break
                    dst.write(data)
                    await dst.drain()
            # One side hung up: hang up the other (PostgreSQL closes first
            # after a Terminate message, and the client waits for that).
            dst.close()

        await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))


async def test_silently_dead_listener_is_noticed_and_replaced(
    pg_dsn: str,  # noqa: F811
) -> None:
    proxy = FreezableProxy("127.0.0.1", 5432)
    port = await proxy.start()
    listen_dsn = re.sub(r"@[^/]+/", f"@127.0.0.1:{port}/", pg_dsn)
    store = PostgresStore(
        pg_dsn, listen_dsn=listen_dsn, liveness_interval=0.2, liveness_timeout=0.3
    )
    store.listen(Announced())
    await store.start()
    try:
        org = new_org()
        await store.append(org, [("n", 1), ("n", 2)])
        await announced(store).wait_for(org, 2)
        proxy.freeze()
        await store.append(org, [("n", 3)])
        await store.append(org, [("n", 4)])
        await wait_until(lambda: store.listener_reconnects == 1)
        await store.append(org, [("n", 5)])
        got = await announced(store).wait_for(org, 5)
        await wait_until(lambda: store.ready)
        await asyncio.sleep(0.2)
        assert_exactly_once_in_order(announced(store).of(org), 5)
        assert [e.payload for e in got] == [1, 2, 3, 4, 5]
        assert proxy.connections >= 2
    finally:
        await store.stop()
        await proxy.close()


# -- migrations ------------------------------------------------------------------------


async def test_migrate_is_versioned_idempotent_and_safe_to_race(
    pg_dsn: str,  # noqa: F811
) -> None:
    assert await migrate(pg_dsn) == []
    assert await applied_versions(pg_dsn) == VERSIONS

    name = new_database_name()
    dsn = await create_database(name)
    try:
        assert await applied_versions(dsn) == []
        with pytest.raises(StoreError, match="hub migrate"):
            await PostgresStore(dsn).start()
        results = await asyncio.gather(migrate(dsn), migrate(dsn), migrate(dsn))
        assert sorted(results) == [[], [], VERSIONS]
        assert await applied_versions(dsn) == VERSIONS
    finally:
        await drop_database(name)


# -- change capture ----------------------------------------------------------------------

COMMIT_TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


@pytest.fixture
async def app_table(pg_dsn: str) -> AsyncIterator[tuple[asyncpg.Connection, str]]:  # noqa: F811
    """A fresh app table ``public.items_<random>`` and a connection to it."""
    table = f"items_{uuid.uuid4().hex[:8]}"
    conn = await asyncpg.connect(pg_dsn)
    await conn.execute(
        f"CREATE TABLE public.{table} (id bigserial PRIMARY KEY, org_id text, "
        "name text NOT NULL, meta jsonb, created_at timestamptz NOT NULL DEFAULT now())"
    )
    try:
        yield conn, table
    finally:
        await conn.execute(f"DROP TABLE public.{table}")
        await conn.close()


def change(event: StoredEvent) -> dict[str, Any]:
    assert event.kind == "change"
    payload: dict[str, Any] = copy.deepcopy(event.payload)
    assert COMMIT_TIMESTAMP.fullmatch(payload.pop("commit_timestamp"))
    for key in ("record", "old_record"):
        if payload[key] is not None:
            assert isinstance(payload[key].pop("created_at"), str)
    return payload


async def test_tracked_table_changes_become_events(
    store: PostgresStore,
    pg_dsn: str,  # noqa: F811
    app_table: tuple[asyncpg.Connection, str],
) -> None:
    conn, table = app_table
    org = new_org()
    assert await track(pg_dsn, table) == f"public.{table}"
    assert await track(pg_dsn, f"public.{table}", "org_id") == f"public.{table}"  # idempotent
    assert (f"public.{table}", "org_id") in await tracked(pg_dsn)

    await conn.execute(
        f"INSERT INTO {table} (org_id, name, meta) VALUES ($1, 'a', '{{\"k\": 1}}')", org
    )
    await conn.execute(f"UPDATE {table} SET name = 'b' WHERE org_id = $1", org)
    await conn.execute(f"DELETE FROM {table} WHERE org_id = $1", org)

    events = await store.read(org)
    assert [(e.seq, e.type) for e in events] == [(1, "INSERT"), (2, "UPDATE"), (3, "DELETE")]
    columns = [
        {"name": "id", "type": "int8"},
        {"name": "org_id", "type": "text"},
        {"name": "name", "type": "text"},
        {"name": "meta", "type": "jsonb"},
        {"name": "created_at", "type": "timestamptz"},
    ]
    row_a = {"id": 1, "org_id": org, "name": "a", "meta": {"k": 1}}
    row_b = {**row_a, "name": "b"}
    base = {"schema": "public", "table": table, "columns": columns}
    assert [change(e) for e in events] == [
        {**base, "type": "INSERT", "record": row_a, "old_record": None},
        {**base, "type": "UPDATE", "record": row_b, "old_record": row_a},
        {**base, "type": "DELETE", "record": None, "old_record": row_b},
    ]
    got = await announced(store).wait_for(org, 3)
    assert [(e.id, e.payload) for e in got] == [(e.id, e.payload) for e in events]

    # One transaction, one commit_timestamp; a rollback leaves no gap.
    async with conn.transaction():
        await conn.execute(f"INSERT INTO {table} (org_id, name) VALUES ($1, 'c'), ($1, 'd')", org)
    with contextlib.suppress(RuntimeError):
        async with conn.transaction():
            await conn.execute(f"INSERT INTO {table} (org_id, name) VALUES ($1, 'x')", org)
            raise RuntimeError("roll back")
    await conn.execute(f"INSERT INTO {table} (org_id, name) VALUES ($1, 'e')", org)
    later = await store.read(org, after=3)
    assert [(e.seq, e.payload["record"]["name"]) for e in later] == [(4, "c"), (5, "d"), (6, "e")]
    assert later[0].payload["commit_timestamp"] == later[1].payload["commit_timestamp"]

    # A dropped column leaves the column list.
    await conn.execute(f"ALTER TABLE {table} DROP COLUMN meta")
    await conn.execute(f"INSERT INTO {table} (org_id, name) VALUES ($1, 'f')", org)
    [last] = await store.read(org, after=6)
    assert [c["name"] for c in last.payload["columns"]] == ["id", "org_id", "name", "created_at"]

    assert await untrack(pg_dsn, table) == f"public.{table}"
    assert await untrack(pg_dsn, table) == f"public.{table}"  # idempotent
    await conn.execute(f"INSERT INTO {table} (org_id, name) VALUES ($1, 'g')", org)
    assert await store.last_seq(org) == 7
    assert (f"public.{table}", "org_id") not in await tracked(pg_dsn)


async def test_rows_without_org_are_ignored_and_moves_do_not_leak(
    pg_dsn: str,  # noqa: F811
    app_table: tuple[asyncpg.Connection, str],
) -> None:
    conn, table = app_table
    a, b = new_org(), new_org()
    await track(pg_dsn, table)
    store = PostgresStore(pg_dsn)
    await store.start()
    try:
        before = await conn.fetchval("SELECT count(*) FROM hub.events")
        await conn.execute(f"INSERT INTO {table} (org_id, name) VALUES (NULL, 'orphan')")
        await conn.execute(f"UPDATE {table} SET name = 'still orphan' WHERE org_id IS NULL")
        await conn.execute(f"DELETE FROM {table} WHERE org_id IS NULL")
        assert await conn.fetchval("SELECT count(*) FROM hub.events") == before

        row_id = await conn.fetchval(
            f"INSERT INTO {table} (org_id, name) VALUES ($1, 'r') RETURNING id", a
        )
        await conn.execute(f"UPDATE {table} SET org_id = $1, name = 's' WHERE id = $2", b, row_id)
        await conn.execute(f"UPDATE {table} SET org_id = NULL WHERE id = $1", row_id)
        await conn.execute(f"UPDATE {table} SET org_id = $1 WHERE id = $2", a, row_id)

        in_a = [change(e) for e in await store.read(a)]
        in_b = [change(e) for e in await store.read(b)]
        assert [(c["type"], c["record"], c["old_record"]) for c in in_a] == [
            ("INSERT", {"id": row_id, "org_id": a, "name": "r", "meta": None}, None),
            ("DELETE", None, {"id": row_id, "org_id": a, "name": "r", "meta": None}),
            ("INSERT", {"id": row_id, "org_id": a, "name": "s", "meta": None}, None),
        ]
        assert [(c["type"], c["record"], c["old_record"]) for c in in_b] == [
            ("INSERT", {"id": row_id, "org_id": b, "name": "s", "meta": None}, None),
            ("DELETE", None, {"id": row_id, "org_id": b, "name": "s", "meta": None}),
        ]
    finally:
        await store.stop()


async def test_track_quoted_names_and_other_org_types(pg_dsn: str) -> None:  # noqa: F811
    conn = await asyncpg.connect(pg_dsn)
    schema, table = f"Hub Test {uuid.uuid4().hex[:6]}", "Mixed Items"
    name = f'"{schema}"."{table}"'
    try:
        await conn.execute(f"CREATE SCHEMA {name.split('.')[0]}")
        await conn.execute(f'CREATE TABLE {name} (id int PRIMARY KEY, "OrgId" uuid)')
        assert await track(pg_dsn, name, "OrgId") == name
        org = uuid.uuid4()
        await conn.execute(f'INSERT INTO {name} (id, "OrgId") VALUES (1, $1)', org)
        store = PostgresStore(pg_dsn)
        await store.start()
        try:
            [event] = await store.read(str(org))
        finally:
            await store.stop()
        assert event.payload["schema"] == schema
        assert event.payload["table"] == table
        assert event.payload["record"] == {"id": 1, "OrgId": str(org)}
        assert event.payload["columns"] == [
            {"name": "id", "type": "int4"},
            {"name": "OrgId", "type": "uuid"},
        ]
    finally:
        await conn.execute(f"DROP SCHEMA {name.split('.')[0]} CASCADE")
        await conn.close()


async def test_unprivileged_writers_are_captured(
    pg_dsn: str,  # noqa: F811
    app_table: tuple[asyncpg.Connection, str],
) -> None:
    """The app's roles need no privilege on the hub schema, and cannot call
    its functions themselves."""
    conn, table = app_table
    await track(pg_dsn, table)
    role, org = f"hub_test_writer_{uuid.uuid4().hex[:8]}", new_org()
    await conn.execute(f"CREATE ROLE {role} NOLOGIN")
    try:
        await conn.execute(f"GRANT INSERT, SELECT ON {table} TO {role}")
        await conn.execute(f"GRANT USAGE ON SEQUENCE {table}_id_seq TO {role}")
        async with conn.transaction():
            await conn.execute(f"SET LOCAL ROLE {role}")
            await conn.execute(f"INSERT INTO {table} (org_id, name) VALUES ($1, 'w')", org)
        async with conn.transaction():
            await conn.execute(f"SET LOCAL ROLE {role}")
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await append_raw(conn, org, "forged", None)
        rows = await conn.fetch("SELECT type, kind FROM hub.events WHERE org = $1", org)
        assert [(r["type"], r["kind"]) for r in rows] == [("INSERT", "change")]
    finally:
        await conn.execute(f"DROP OWNED BY {role}")
        await conn.execute(f"DROP ROLE {role}")


async def test_track_refuses_what_it_cannot_track(
    pg_dsn: str,  # noqa: F811
    app_table: tuple[asyncpg.Connection, str],
) -> None:
    conn, table = app_table
    with pytest.raises(TrackingError, match="does not exist"):
        await track(pg_dsn, "public.no_such_table")
    with pytest.raises(TrackingError, match="no column 'tenant'"):
        await track(pg_dsn, table, "tenant")
    with pytest.raises(TrackingError, match="invalid table name"):
        await track(pg_dsn, "a.b.c.d")
    await conn.execute(f"CREATE VIEW {table}_view AS SELECT * FROM {table}")
    try:
        with pytest.raises(TrackingError, match="not a table"):
            await track(pg_dsn, f"{table}_view")
    finally:
        await conn.execute(f"DROP VIEW {table}_view")
    with pytest.raises(TrackingError, match="does not exist"):
        await untrack(pg_dsn, "public.no_such_table")
    assert not any(t == f"public.{table}" for t, _ in await tracked(pg_dsn))
