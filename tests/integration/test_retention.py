"""Retention of the event log against a real database: migration 0010
turns hub.events into daily partitions without losing rows, handlers or
views; maintenance creates the coming days, archives and drops what is past
HUB_RETENTION unless a projection still needs it; `hub archive` does it by
hand; a replay that reaches past the oldest event kept gets ReplayGap."""

from __future__ import annotations

import asyncio
import datetime as dt
import gzip
import json
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from hub.store import retention
from hub.store.migrate import migrate, migrations
from hub.store.postgres import PostgresStore
from tests.support.hubs import run_cli
from tests.support.mother import fresh_database
from tests.support.pg import new_org

DAY = 86_400.0


@pytest.fixture
async def dsn() -> AsyncIterator[str]:
    """A database of this test alone (partitions are per database), not
    migrated: each test migrates it as far as it needs."""
    async with fresh_database(migrated=False) as dsn:
        yield dsn


async def migrate_until(conn: asyncpg.Connection, last: str) -> None:
    """Apply the migrations up to ``last`` as `hub migrate` would have."""
    await conn.execute(
        "CREATE SCHEMA IF NOT EXISTS hub; CREATE TABLE IF NOT EXISTS hub.schema_migrations "
        "(version text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
    )
    for version, sql in migrations():
        if version > last:
            break
        async with conn.transaction():
            await conn.execute(sql)
            await conn.execute("INSERT INTO hub.schema_migrations (version) VALUES ($1)", version)


async def append(conn: asyncpg.Connection, org: str, n: int, at: dt.datetime | None = None) -> None:
    """``n`` events for ``org``; with ``at``, stamped at that time (the
    partition they land in)."""
    for i in range(n):
        await conn.execute("SELECT hub.append_event($1, 'event', 't', $2::jsonb)", org, str(i))
    if at is not None:
        await conn.execute(
            "UPDATE hub.events SET created_at = $2 WHERE org = $1 AND created_at > $2", org, at
        )


async def partitions(conn: asyncpg.Connection) -> list[str]:
    rows = await conn.fetch(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
        "WHERE i.inhparent = 'hub.events'::regclass ORDER BY 1"
    )
    return [r["relname"] for r in rows]


async def test_migration_keeps_rows_handlers_grants_and_views(dsn: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await migrate_until(conn, "0009_schema_per_org")
        org = new_org()
        await append(conn, org, 5)
        # What names hub.events: an event-mode handler, a grant on it, a view.
        await conn.execute(
            "CREATE TABLE public.counted (org text PRIMARY KEY, n int NOT NULL);"
            "CREATE SCHEMA app; "
            "CREATE FUNCTION app.count_event(e hub.events) RETURNS void LANGUAGE sql AS "
            "$$ INSERT INTO counted VALUES (e.org, 1) "
            "ON CONFLICT (org) DO UPDATE SET n = counted.n + 1 $$;"
            "REVOKE ALL ON FUNCTION app.count_event(hub.events) FROM PUBLIC;"
            "CREATE VIEW public.event_types AS SELECT org, type FROM hub.events;"
            "SELECT hub.register_projection('counter', 'app.count_event(hub.events)'::"
            "regprocedure, NULL, 'public')"
        )
        assert (await migrate(dsn))[0] == "0010_event_partitions"

        today = dt.datetime.now(dt.UTC).date()
        names = await partitions(conn)
        upto = f"events_upto_{(today + dt.timedelta(days=1)):%Y%m%d}"
        assert upto in names and "events_default" in names
        assert [f"events_{(today + dt.timedelta(days=d)):%Y%m%d}" for d in (1, 2, 3)] == [
            n for n in names if n not in (upto, "events_default")
        ]
        assert await conn.fetchval("SELECT count(*) FROM hub.events WHERE org = $1", org) == 5
        await append(conn, org, 2)
        seqs = await conn.fetch("SELECT seq FROM hub.events WHERE org = $1 ORDER BY seq", org)
        assert [r["seq"] for r in seqs] == list(range(1, 8))
        assert await conn.fetchval("SELECT count(*) FROM public.event_types") == 7
        # The handler takes the new row type, keeps its grants, and runs.
        assert (
            await conn.fetchval("SELECT handler::text FROM hub.projections WHERE name = 'counter'")
            == "app.count_event(hub.events)"
        )
        assert not await conn.fetchval(
            "SELECT has_function_privilege('public', 'app.count_event(hub.events)', 'EXECUTE')"
        )
        assert not await conn.fetchval(
            "SELECT has_function_privilege('public', "
            "'hub.append_event(text, text, text, jsonb)', 'EXECUTE')"
        )
        rows = await conn.fetch("SELECT * FROM hub.project('counter', 'public', $1, 100)", [org])
        assert [(r["seq"], r["error"]) for r in rows] == [(7, None)]
        assert await conn.fetchval("SELECT n FROM public.counted WHERE org = $1", org) == 7
    finally:
        await conn.close()


async def test_a_past_day_asked_for_while_a_node_makes_partitions_is_made(dsn: str) -> None:
    """A move's target asks for the days it is about to copy; a node's
    maintenance holding the partition lock at that moment must delay the
    request, not skip it (the rows would land in the default partition)."""
    await migrate(dsn)
    holder, caller = await asyncpg.connect(dsn), await asyncpg.connect(dsn)
    try:
        day = dt.datetime.now(dt.UTC).date() - dt.timedelta(days=12)
        async with holder.transaction():
            await holder.execute("SELECT hub.ensure_event_partitions()")
            asked = asyncio.create_task(
                caller.fetch("SELECT hub.ensure_event_partitions(0, $1::date[]) AS p", [day])
            )
            await asyncio.sleep(0.3)
            assert not asked.done()
        made = [r["p"] for r in await asked]
        assert made == [f"hub.events_{day:%Y%m%d}"]
    finally:
        await holder.close()
        await caller.close()


async def test_maintenance_archives_and_drops_what_is_past_the_retention(
    dsn: str, tmp_path: Path
) -> None:
    await migrate(dsn)
    conn = await asyncpg.connect(dsn)
    try:
        today = dt.datetime.now(dt.UTC).replace(hour=12, minute=0, second=0, microsecond=0)
        old, stray, recent = new_org(), new_org(), new_org()
        # Events of 40 days ago, in the partition a node made for their day.
        long_ago = today - dt.timedelta(days=40)
        await conn.fetch("SELECT hub.ensure_event_partitions(0, $1::date[])", [long_ago.date()])
        await append(conn, old, 3, at=long_ago)
        day = f"events_{long_ago:%Y%m%d}"
        assert await conn.fetchval(f"SELECT count(*) FROM hub.{day}") == 3
        # Events of 35 days ago, when no node made partitions: in the
        # default partition, where they stay (never moved into a new day).
        await append(conn, stray, 2, at=today - dt.timedelta(days=35))
        await append(conn, recent, 2)
        assert await conn.fetchval("SELECT count(*) FROM hub.events_default") == 2
        assert await retention.maintain(conn, None) == []
        assert await conn.fetchval("SELECT count(*) FROM hub.events_default") == 2

        # A projection that has not applied them holds them back.
        await conn.execute(
            "CREATE SCHEMA app; CREATE FUNCTION app.noop(e hub.events) RETURNS void "
            "LANGUAGE sql AS $$ $$; "
            "SELECT hub.register_projection('keeper', 'app.noop(hub.events)'::regprocedure)"
        )
        first, second = await retention.maintain(conn, 30 * DAY, tmp_path)
        assert first == (
            f"kept hub.{day} past the retention: projection keeper (org {old}) "
            "has not applied all of its events"
        )
        assert second.startswith("kept 2 events of hub.events_default before ")
        assert second.endswith(f"projection keeper (org {stray}) has not applied all of its events")
        await conn.fetch("SELECT * FROM hub.project('keeper', 'public', $1, 100)", [old, stray])
        # ... and so does the built-in mother until it has them.
        lines = await retention.maintain(conn, 30 * DAY, tmp_path)
        assert [line.split(": projection ")[1] for line in lines] == [
            f"mother (org {old}) has not applied all of its events",
            f"mother (org {stray}) has not applied all of its events",
        ]
        await conn.fetch("SELECT * FROM hub.project('mother', 'mother', $1, 100)", [old, stray])
        first, second = await retention.maintain(conn, 30 * DAY, tmp_path, dry_run=True)
        assert first.startswith(f"would drop hub.{day} "), first
        assert second.startswith("would delete 2 events of hub.events_default"), second
        # Not past a longer retention.
        assert await retention.maintain(conn, 41 * DAY, tmp_path) == []

        lines = await retention.maintain(conn, 30 * DAY, tmp_path)
        database = await conn.fetchval("SELECT current_database()")
        archived = tmp_path / f"{database}-{day}.jsonl.gz"
        assert lines[0] == f"archived hub.{day} to {archived}"
        assert lines[1].startswith(f"dropped hub.{day} ")
        assert lines[2].startswith("archived 2 events of hub.events_default before ")
        assert lines[3].startswith("deleted 2 events of hub.events_default before ")
        with gzip.open(archived, "rt") as f:
            kept = [json.loads(line) for line in f]
        assert [(e["org"], e["seq"], e["payload"]) for e in kept] == [
            (old, 1, 0),
            (old, 2, 1),
            (old, 3, 2),
        ]
        [stray_file] = [p for p in tmp_path.iterdir() if "events_default" in p.name]  # noqa: ASYNC240
        with gzip.open(stray_file, "rt") as f:
            assert [(e["org"], e["seq"]) for e in map(json.loads, f)] == [(stray, 1), (stray, 2)]
        assert day not in await partitions(conn)
        assert not list(tmp_path.glob("*.partial"))  # noqa: ASYNC240
        assert await conn.fetchval("SELECT count(*) FROM hub.events_default") == 0
        # The org's seq goes on from where it was.
        await append(conn, old, 1)
        assert await conn.fetchval("SELECT min(seq) FROM hub.events WHERE org = $1", old) == 4
        assert await conn.fetchval("SELECT count(*) FROM hub.events WHERE org = $1", recent) == 2
    finally:
        await conn.close()


async def test_hub_archive_command_and_replay_gap_from_the_store(dsn: str, tmp_path: Path) -> None:
    await migrate(dsn)
    env = {"HUB_DATABASE_URL": dsn}
    code, _, err = await run_cli("archive", "--dir", str(tmp_path), "--retention", "5h", env=env)
    assert code == 2 and "is not a retention" in err, err
    code, out, err = await run_cli("archive", "--dir", str(tmp_path), "--dry-run", env=env)
    assert code == 0, err
    assert out.strip() == "nothing is past the retention", out

    conn = await asyncpg.connect(dsn)
    store = PostgresStore(dsn)
    await store.start()
    try:
        org = new_org()
        long_ago = dt.datetime.now(dt.UTC) - dt.timedelta(days=10)
        await conn.fetch("SELECT hub.ensure_event_partitions(0, $1::date[])", [long_ago.date()])
        await append(conn, org, 4, at=long_ago)
        name = f"events_{long_ago:%Y%m%d}"
        await conn.execute("DELETE FROM hub.projections WHERE name = 'mother'")
        code, out, err = await run_cli(
            "archive", "--dir", str(tmp_path), "--retention", "7d", env=env
        )
        assert code == 0, err
        assert f"dropped hub.{name}" in out, out
        assert (tmp_path / f"{dsn.rsplit('/', 1)[1]}-{name}.jsonl.gz").exists()
        await append(conn, org, 1)
        assert await store.first_seq(org) == 5
        assert [e.seq for e in await store.read(org, after=2)] == [5]
        assert await store.last_seq(org) == 5
    finally:
        await store.stop()
        await conn.close()
