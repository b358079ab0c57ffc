"""Schema per org against a real database: ``track_schemas`` captures a
table in every schema matching a pattern, with the org from the schema's
name, including schemas created later (by the event trigger in the DDL's
transaction, or by a running store's poll without it), puts back a dropped
trigger, stops at ``untrack_schemas`` and refuses bad input."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest

from hub.store.postgres import PostgresStore
from hub.store.tracking import (
    EVENT_TRIGGER,
    TrackingError,
    track,
    track_schemas,
    tracked,
    untrack_schemas,
)
from tests.support.pg import Announced, pg_dsn  # noqa: F401 - fixture


@pytest.fixture
async def store(pg_dsn: str) -> AsyncIterator[PostgresStore]:  # noqa: F811
    """A started store that polls every 0.1 s; ``store._on_event`` records."""
    store = PostgresStore(pg_dsn, publication_interval=0.1)
    store.listen(Announced())
    await store.start()
    try:
        yield store
    finally:
        await store.stop()


@pytest.fixture
async def conn(pg_dsn: str) -> AsyncIterator[asyncpg.Connection]:  # noqa: F811
    conn = await asyncpg.connect(pg_dsn)
    try:
        yield conn
    finally:
        await conn.close()


def layout() -> tuple[str, str]:
    """A pattern and a table name of this test only (the database is shared)."""
    tag = uuid.uuid4().hex[:6]
    return f"t{tag}_{{org}}", f"posts_{tag}"


async def make_schema(conn: asyncpg.Connection, schema: str, table: str) -> None:
    await conn.execute(
        f'CREATE SCHEMA "{schema}"; CREATE TABLE "{schema}"."{table}" '
        "(id bigserial PRIMARY KEY, title text NOT NULL)"
    )


async def changes(conn: asyncpg.Connection, org: str) -> list[tuple[str, str, str]]:
    rows = await conn.fetch(
        "SELECT type, payload->>'schema' AS schema, "
        "coalesce(payload->'record'->>'title', payload->'old_record'->>'title') AS title "
        "FROM hub.events WHERE org = $1 AND kind = 'change' ORDER BY seq",
        org,
    )
    return [(r["type"], r["schema"], r["title"]) for r in rows]


async def wait_for(predicate: object, what: str, within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not await predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def test_every_matching_schema_now_and_later(
    store: PostgresStore,
    pg_dsn: str,  # noqa: F811
    conn: asyncpg.Connection,
) -> None:
    pattern, table = layout()
    prefix = pattern.removesuffix("{org}")
    acme, globex = "acme" + prefix, "globex" + prefix
    await make_schema(conn, prefix + acme, table)
    await make_schema(conn, prefix + globex, table)
    # Not the pattern: never tracked.  Neither is a schema with an empty org.
    await make_schema(conn, f"x{prefix}{acme}", table)
    await make_schema(conn, prefix, table)

    done = await track_schemas(pg_dsn, pattern, table)
    assert done.tables == sorted(
        [(f"{prefix}{acme}.{table}", acme), (f"{prefix}{globex}.{table}", globex)]
    )
    assert done.event_trigger and done.skipped == []
    assert await track_schemas(pg_dsn, pattern, table) == done  # idempotent
    assert (f"{prefix}{acme}.{table}", f"schema:{pattern}") in await tracked(pg_dsn)

    await conn.execute(f'INSERT INTO "{prefix}{acme}"."{table}" (title) VALUES (\'a1\')')
    await conn.execute(f'INSERT INTO "{prefix}{globex}"."{table}" (title) VALUES (\'g1\')')
    await conn.execute(f'UPDATE "{prefix}{acme}"."{table}" SET title = \'a2\'')
    await conn.execute(f'DELETE FROM "{prefix}{acme}"."{table}"')
    await conn.execute(f'INSERT INTO "x{prefix}{acme}"."{table}" (title) VALUES (\'no\')')
    await conn.execute(f'INSERT INTO "{prefix}"."{table}" (title) VALUES (\'no\')')
    assert await changes(conn, acme) == [
        ("INSERT", prefix + acme, "a1"),
        ("UPDATE", prefix + acme, "a2"),
        ("DELETE", prefix + acme, "a2"),
    ]
    assert await changes(conn, globex) == [("INSERT", prefix + globex, "g1")]
    announced = store._on_event
    assert isinstance(announced, Announced)
    got = await announced.wait_for(acme, 3)
    assert [e.payload["table"] for e in got] == [table] * 3

    # A schema created later: the event trigger tracks its table in the
    # DDL's transaction, so the first row written in it is captured.
    initech = "initech" + prefix
    async with conn.transaction():
        await make_schema(conn, prefix + initech, table)
        await conn.execute(f'INSERT INTO "{prefix}{initech}"."{table}" (title) VALUES (\'i1\')')
    assert await changes(conn, initech) == [("INSERT", prefix + initech, "i1")]

    # Without the event trigger (a role that is not a superuser): the
    # store's poll tracks a new table within its interval.
    await conn.execute(f"ALTER EVENT TRIGGER {EVENT_TRIGGER} DISABLE")
    try:
        hooli = "hooli" + prefix
        await make_schema(conn, prefix + hooli, table)

        async def hooli_tracked() -> bool:
            return (f"{prefix}{hooli}.{table}", f"schema:{pattern}") in await tracked(pg_dsn)

        await wait_for(hooli_tracked, "the poll to track a new schema's table")
        await conn.execute(f'INSERT INTO "{prefix}{hooli}"."{table}" (title) VALUES (\'h1\')')
        assert await changes(conn, hooli) == [("INSERT", prefix + hooli, "h1")]

        # A dropped capture trigger is put back by the poll.
        await conn.execute(f'DROP TRIGGER hub_capture_change ON "{prefix}{hooli}"."{table}"')
        await wait_for(hooli_tracked, "the poll to put the trigger back")

        # A schema renamed out of the pattern is no longer tracked.
        await conn.execute(f'ALTER SCHEMA "{prefix}{hooli}" RENAME TO "gone_{hooli}"')

        async def renamed_untracked() -> bool:
            names = [name for name, _ in await tracked(pg_dsn)]
            return f"gone_{hooli}.{table}" not in names

        await wait_for(renamed_untracked, "the poll to untrack a renamed schema")
    finally:
        await conn.execute(f"ALTER EVENT TRIGGER {EVENT_TRIGGER} ENABLE")

    # A table tracked with an org column is left as it is.
    await conn.execute(f'ALTER TABLE "{prefix}{globex}"."{table}" ADD COLUMN org_id text')
    await track(pg_dsn, f'"{prefix}{globex}"."{table}"', "org_id")
    again = await track_schemas(pg_dsn, pattern, table)
    assert again.skipped == [f"{prefix}{globex}.{table}"]
    assert (f"{prefix}{globex}.{table}", "org_id") in await tracked(pg_dsn)

    lines = await untrack_schemas(pg_dsn, pattern, table)
    assert sorted(lines) == sorted(
        f"no longer tracking {prefix}{org}.{table} (schema pattern {pattern})"
        for org in (acme, initech)
    )
    await conn.execute(f'INSERT INTO "{prefix}{acme}"."{table}" (title) VALUES (\'late\')')
    assert len(await changes(conn, acme)) == 3
    await make_schema(conn, prefix + "late" + prefix, table)
    names = [name for name, _ in await tracked(pg_dsn)]
    assert not any(name.startswith(f"{prefix}late") for name in names)


async def test_bad_patterns_and_names_are_refused(pg_dsn: str) -> None:  # noqa: F811
    pattern, table = layout()
    with pytest.raises(TrackingError, match="exactly once"):
        await track_schemas(pg_dsn, "org_", table)
    with pytest.raises(TrackingError, match="exactly once"):
        await track_schemas(pg_dsn, "{org}_{org}", table)
    with pytest.raises(TrackingError, match="bare name"):
        await track_schemas(pg_dsn, pattern, f"public.{table}")
    with pytest.raises(TrackingError, match="is not tracked"):
        await untrack_schemas(pg_dsn, pattern, table)
    # A pattern no schema matches yet is kept for schemas created later.
    done = await track_schemas(pg_dsn, pattern, table)
    assert done.tables == [] and done.skipped == []
    await untrack_schemas(pg_dsn, pattern, table)
