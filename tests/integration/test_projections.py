"""Projections (issue 14) against a real PostgreSQL: the runner folds each
org's log exactly once and in order, a leader that dies mid-batch is
replaced with nothing doubled or skipped, a handler that raises or hangs
stops one org, rebuilds switch in atomically or replay to a past time, and
the mother's rollups count exactly the events of the log.

Each test has a database of its own (projections span every org of it)."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import random
import signal
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from hub.projections import catalog
from hub.projections.catalog import ProjectionError
from hub.projections.runner import ProjectionRunner
from hub.store.migrate import migrate
from tests.support.hubs import ROOT, HubProcess, run_cli, start_hub, stop_hub
from tests.support.pg import create_database, drop_database, new_database_name
from tests.support.projections import caught_up as wait_projection

T = 30.0

#: The example of docs/projections.md: an org's open tickets.  The chain
#: table makes any double or skipped event, or any out of order, raise.
TICKETS = """
CREATE SCHEMA app;
CREATE SCHEMA app_rm;
CREATE TABLE app_rm.open_tickets (
    org text NOT NULL, id text NOT NULL, title text, PRIMARY KEY (org, id)
);
CREATE TABLE app_rm.chain (org text PRIMARY KEY, last_seq bigint NOT NULL, events bigint NOT NULL);
-- The bug of the error tests; "fixed" by replacing it.
CREATE FUNCTION app.on_boom(e hub.events) RETURNS void LANGUAGE plpgsql AS $$
BEGIN RAISE EXCEPTION 'boom at seq %', e.seq; END $$;
CREATE FUNCTION app.open_tickets(e hub.events) RETURNS void LANGUAGE plpgsql AS $$
DECLARE previous bigint;
BEGIN
    SELECT last_seq INTO previous FROM chain WHERE org = e.org;
    IF coalesce(previous, 0) <> e.seq - 1 THEN
        RAISE EXCEPTION 'out of order: seq % after %', e.seq, coalesce(previous, 0);
    END IF;
    INSERT INTO chain AS c VALUES (e.org, e.seq, 1)
    ON CONFLICT (org) DO UPDATE SET last_seq = excluded.last_seq, events = c.events + 1;
    IF e.type = 'ticket.opened' THEN
        INSERT INTO open_tickets VALUES (e.org, e.payload ->> 'id', e.payload ->> 'title');
    ELSIF e.type = 'ticket.closed' THEN
        DELETE FROM open_tickets WHERE org = e.org AND id = e.payload ->> 'id';
    ELSIF e.type = 'slow' THEN
        PERFORM pg_sleep((e.payload ->> 'seconds')::float);
    ELSIF e.type = 'boom' THEN
        PERFORM app.on_boom(e);
    END IF;
END $$;
SELECT hub.register_projection('open_tickets', 'app.open_tickets(hub.events)', NULL, 'app_rm');
"""


@pytest.fixture
async def dsn() -> AsyncIterator[str]:
    name = new_database_name()
    url = await create_database(name)
    try:
        await migrate(url)
        conn = await asyncpg.connect(url)
        try:
            await conn.execute(TICKETS)
        finally:
            await conn.close()
        yield url
    finally:
        await drop_database(name)


@pytest.fixture
async def db(dsn: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(dsn)
    try:
        yield conn
    finally:
        await conn.close()


@pytest.fixture
async def runner(dsn: str) -> AsyncIterator[Callable[..., ProjectionRunner]]:
    tasks: list[asyncio.Task[None]] = []

    def start(**options: Any) -> ProjectionRunner:
        made = ProjectionRunner(dsn, **{"interval": 0.05, "takeover": 0.2, **options})
        tasks.append(asyncio.create_task(made.run()))
        return made

    yield start
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def append(db: asyncpg.Connection, org: str, type_: str, payload: dict[str, Any]) -> int:
    seq = await db.fetchval(
        "SELECT (hub.append_event($1, 'event', $2, $3::jsonb)).seq", org, type_, json.dumps(payload)
    )
    return int(seq)


async def caught_up(db: asyncpg.Connection, projection: str = "open_tickets") -> None:
    await wait_projection(db, projection, within=T)


def fold(events: list[asyncpg.Record]) -> set[tuple[str, str, str | None]]:
    """The read model as a sequential replay gives it."""
    state: dict[tuple[str, str], str | None] = {}
    for e in events:
        payload = json.loads(e["payload"]) if isinstance(e["payload"], str) else e["payload"]
        if e["type"] == "ticket.opened":
            state[(e["org"], payload["id"])] = payload.get("title")
        elif e["type"] == "ticket.closed":
            state.pop((e["org"], payload["id"]), None)
    return {(org, ticket, title) for (org, ticket), title in state.items()}


async def model(db: asyncpg.Connection, schema: str = "app_rm") -> set[tuple[str, str, str | None]]:
    rows = await db.fetch(f"SELECT org, id, title FROM {schema}.open_tickets")
    return {(r["org"], r["id"], r["title"]) for r in rows}


async def events(db: asyncpg.Connection, until: dt.datetime | None = None) -> list[asyncpg.Record]:
    return await db.fetch(
        "SELECT org, seq, type, payload::text AS payload FROM hub.events "
        "WHERE $1::timestamptz IS NULL OR created_at <= $1 ORDER BY org, seq",
        until,
    )


async def writers(dsn: str, orgs: list[str], per_org: int, seed: int) -> None:
    """Concurrent writers: one per org, tickets opened and closed."""

    async def write(org: str, rng: random.Random) -> None:
        conn = await asyncpg.connect(dsn)
        try:
            opened: list[str] = []
            for n in range(per_org):
                if opened and rng.random() < 0.4:
                    await append(conn, org, "ticket.closed", {"id": opened.pop(0)})
                else:
                    # Ids unique per call (seed): two calls may write one org.
                    opened.append(f"s{seed}t{n}")
                    await append(conn, org, "ticket.opened", {"id": opened[-1], "title": f"#{n}"})
        finally:
            await conn.close()

    await asyncio.gather(*(write(org, random.Random(seed + i)) for i, org in enumerate(orgs)))


async def test_concurrent_writers_end_in_the_state_of_a_sequential_replay(
    dsn: str, db: asyncpg.Connection, runner: Callable[..., ProjectionRunner]
) -> None:
    # Two runners: one leads, the other waits; neither may double an event.
    first, second = runner(batch=7), runner(batch=7)
    orgs = [f"org{i}" for i in range(6)]
    await writers(dsn, orgs, per_org=120, seed=1)
    await caught_up(db)
    assert await model(db) == fold(await events(db))
    chain = {
        r["org"]: (r["last_seq"], r["events"]) for r in await db.fetch("SELECT * FROM app_rm.chain")
    }
    assert chain == {org: (120, 120) for org in orgs}
    assert [first.state.leader, second.state.leader].count(True) == 1
    positions = await catalog.positions(dsn)
    assert {(p.projection, p.org, p.lag, p.error) for p in positions} == {
        (name, org, 0, None) for name in ("mother", "open_tickets") for org in orgs
    }


async def test_a_handler_that_raises_stops_that_org_only_and_resumes_once_fixed(
    dsn: str, db: asyncpg.Connection, runner: Callable[..., ProjectionRunner]
) -> None:
    started = runner(retry=0.5)
    await append(db, "good", "ticket.opened", {"id": "a"})
    await append(db, "bad", "ticket.opened", {"id": "a"})
    await append(db, "bad", "boom", {})
    await append(db, "bad", "ticket.opened", {"id": "b"})
    await append(db, "good", "ticket.opened", {"id": "b"})
    deadline = time.monotonic() + T
    while ("open_tickets", "bad") not in started.state.stopped:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    assert "boom at seq 2" in started.state.stopped[("open_tickets", "bad")]
    row = await db.fetchrow(
        "SELECT seq, error_seq FROM hub.projection_checkpoints "
        "WHERE projection = 'open_tickets' AND org = 'bad'"
    )
    assert (row["seq"], row["error_seq"]) == (1, 2)  # the event before it stays applied
    await caught_up_org(db, "good")
    assert await model(db) == {("good", "a", None), ("good", "b", None), ("bad", "a", None)}
    # Fixed: the handler no longer raises; the retry resumes at seq 2.
    await db.execute(
        "CREATE OR REPLACE FUNCTION app.on_boom(e hub.events) RETURNS void LANGUAGE sql AS 'SELECT'"
    )
    await caught_up(db)
    assert await model(db) == {
        ("good", "a", None),
        ("good", "b", None),
        ("bad", "a", None),
        ("bad", "b", None),
    }
    chain = await db.fetchval("SELECT last_seq FROM app_rm.chain WHERE org = 'bad'")
    assert chain == 3


async def caught_up_org(db: asyncpg.Connection, org: str) -> None:
    await wait_projection(db, "open_tickets", org=org, within=T)


async def test_a_handler_past_the_timeout_stops_its_org_and_others_go_on(
    dsn: str, db: asyncpg.Connection, runner: Callable[..., ProjectionRunner]
) -> None:
    started = runner(timeout=0.5, retry=3600)
    await append(db, "slow", "slow", {"seconds": 5})
    await append(db, "fast", "ticket.opened", {"id": "x"})
    deadline = time.monotonic() + T
    while ("open_tickets", "slow") not in started.state.stopped:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    assert "longer than 0.5 s" in started.state.stopped[("open_tickets", "slow")]
    await caught_up_org(db, "fast")
    assert await model(db) == {("fast", "x", None)}


async def test_the_leader_connection_terminated_mid_batch_doubles_and_skips_nothing(
    dsn: str, db: asyncpg.Connection, runner: Callable[..., ProjectionRunner]
) -> None:
    await sleepy_handler(db, 0.005)  # 600 events: 3 s of batches of 1 s (4 orgs x 50)
    runner(batch=50)
    orgs = [f"o{i}" for i in range(4)]
    await writers(dsn, orgs, per_org=150, seed=7)
    kills = 0
    deadline = time.monotonic() + T
    # Cut the leader's connection now and then while it works through the
    # backlog: some batches commit between the cuts, some are cut mid-way.
    while kills < 3 and await db.fetchval(
        "SELECT count(*) FROM hub.projection_lag WHERE projection = 'open_tickets' AND lag > 0"
    ):
        assert time.monotonic() < deadline
        await asyncio.sleep(random.uniform(0.3, 1.5))
        kills += await db.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE application_name LIKE '%projections' AND datname = current_database() "
            "AND state = 'active'"
        )
    assert kills >= 1
    await caught_up(db)
    assert await model(db) == fold(await events(db))
    chain = {
        r["org"]: (r["last_seq"], r["events"]) for r in await db.fetch("SELECT * FROM app_rm.chain")
    }
    assert chain == {org: (150, 150) for org in orgs}


async def sleepy_handler(db: asyncpg.Connection, seconds: float) -> None:
    """The tickets handler, slowed down by ``seconds`` per event."""
    await db.execute(
        "CREATE OR REPLACE FUNCTION app.sleepy(e hub.events) RETURNS void LANGUAGE plpgsql AS $$ "
        f"BEGIN PERFORM pg_sleep({seconds}); PERFORM app.open_tickets(e); END $$"
    )
    await db.execute(
        "UPDATE hub.projections SET handler = 'app.sleepy(hub.events)'::regprocedure "
        "WHERE name = 'open_tickets'"
    )


async def test_a_killed_leader_process_is_replaced_with_nothing_doubled_or_skipped(
    dsn: str, db: asyncpg.Connection, tmp_path: Path
) -> None:
    """Two `hub serve` nodes; the leader is SIGKILLed while its handler is
    busy (each event sleeps 20 ms); the other leads within seconds."""
    await sleepy_handler(db, 0.02)
    nodes: list[HubProcess] = []
    try:
        for i in range(2):
            nodes.append(
                await asyncio.to_thread(
                    start_hub,
                    tmp_path,
                    {"HUB_DATABASE_URL": dsn, "HUB_NODE_ID": f"n{i}", "HUB_LOG_LEVEL": "info"},
                )
            )
        orgs = [f"k{i}" for i in range(3)]
        await writers(dsn, orgs, per_org=100, seed=3)
        leader = await wait_leader(nodes)
        await asyncio.sleep(1.0)  # mid-stream: 300 events at 20 ms each take 6 s
        assert await db.fetchval(
            "SELECT count(*) FROM hub.projection_lag WHERE projection = 'open_tickets' AND lag > 0"
        )
        killed_at = time.monotonic()
        os.kill(leader.process.pid, signal.SIGKILL)
        leader.process.wait(10)
        follower = next(n for n in nodes if n is not leader)
        deadline = time.monotonic() + T
        while follower.metric("hub_projection_leader") != 1:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        takeover = time.monotonic() - killed_at
        assert takeover < 4.0, takeover  # takeover 1 s + connection check 1 s
        await caught_up(db)
        assert await model(db) == fold(await events(db))
        chain = {
            r["org"]: (r["last_seq"], r["events"])
            for r in await db.fetch("SELECT * FROM app_rm.chain")
        }
        assert chain == {org: (100, 100) for org in orgs}
        assert "Traceback" not in follower.log()
    finally:
        for node in nodes:
            stop_hub(node)


async def wait_leader(nodes: list[HubProcess]) -> HubProcess:
    deadline = time.monotonic() + T
    while True:
        for node in nodes:
            if node.process.poll() is None and node.metric("hub_projection_leader") == 1:
                return node
        assert time.monotonic() < deadline, "no node leads the projections"
        await asyncio.sleep(0.05)


async def test_rebuild_switches_in_a_fresh_fold_and_until_gives_the_state_of_that_time(
    dsn: str, db: asyncpg.Connection, runner: Callable[..., ProjectionRunner]
) -> None:
    runner()
    await writers(dsn, ["r1", "r2"], per_org=40, seed=5)
    await caught_up(db)
    middle = dt.datetime.now(dt.UTC)
    await asyncio.sleep(0.05)
    await writers(dsn, ["r1", "r3"], per_org=30, seed=9)
    await caught_up(db)
    # The live tables drift (a bug, a manual edit): a rebuild restores them.
    await db.execute("DELETE FROM app_rm.open_tickets WHERE org = 'r1'")
    await db.execute("INSERT INTO app_rm.open_tickets VALUES ('r9', 'ghost', NULL)")
    assert await catalog.rebuild(dsn, "open_tickets") == "app_rm"
    assert await model(db) == fold(await events(db))
    # Writes go on after the switch, on the same tables.
    await append(db, "r2", "ticket.opened", {"id": "after", "title": "switch"})
    await caught_up(db)
    assert ("r2", "after", "switch") in await model(db)
    assert not await db.fetchval("SELECT to_regnamespace('app_rm__rebuild') IS NOT NULL")

    schema = await catalog.rebuild(dsn, "open_tickets", until=middle)
    assert schema == f"app_rm_at_{middle:%Y%m%d_%H%M%S}"
    assert await model(db, schema) == fold(await events(db, until=middle))
    assert await model(db, schema) != await model(db)


async def test_a_second_rebuild_while_one_runs_is_refused(dsn: str, db: asyncpg.Connection) -> None:
    holder = await asyncpg.connect(dsn)
    try:
        await holder.execute(
            "SELECT pg_advisory_lock($1, hashtext('open_tickets'))", catalog.REBUILD_LOCK
        )
        with pytest.raises(ProjectionError, match="already running"):
            await catalog.rebuild(dsn, "open_tickets")
    finally:
        await holder.close()


async def test_a_rebuild_whose_handler_raises_leaves_the_live_model_alone(
    dsn: str, db: asyncpg.Connection, runner: Callable[..., ProjectionRunner]
) -> None:
    runner()
    await append(db, "x", "ticket.opened", {"id": "1"})
    await caught_up(db)
    await append(db, "y", "boom", {})
    await asyncio.sleep(0.3)
    before = await model(db)
    with pytest.raises(ProjectionError, match="boom at seq 1"):
        await catalog.rebuild(dsn, "open_tickets")
    assert await model(db) == before
    assert not await db.fetchval("SELECT to_regnamespace('app_rm__rebuild') IS NOT NULL")


async def test_registration_errors_are_clear(dsn: str, db: asyncpg.Connection) -> None:
    with pytest.raises(ProjectionError, match="already registered"):
        await catalog.register(dsn, "open_tickets", "app.open_tickets(hub.events)", schema="app_rm")
    await db.execute("CREATE FUNCTION app.wrong(x int) RETURNS void LANGUAGE sql AS 'SELECT'")
    with pytest.raises(ProjectionError, match=r"takes one hub\.events"):
        await catalog.register(dsn, "wrong", "app.wrong(int)", schema="app_rm")
    with pytest.raises(ProjectionError, match="must not live in its read model"):
        await catalog.register(dsn, "inside", "app.open_tickets(hub.events)", schema="app")
    with pytest.raises(ProjectionError, match="does not exist"):
        await catalog.register(dsn, "nothing", "app.nope(hub.events)", schema="app_rm")
    with pytest.raises(ProjectionError, match="no projection"):
        await catalog.remove(dsn, "nothing")


async def test_a_handler_run_as_a_role_cannot_write_outside_its_tables(
    dsn: str, db: asyncpg.Connection, runner: Callable[..., ProjectionRunner]
) -> None:
    role = "rm_writer_" + new_database_name()[-8:]
    await db.execute(
        f"""
        CREATE ROLE {role} NOLOGIN;
        CREATE SCHEMA sneaky_rm;
        CREATE TABLE sneaky_rm.counts (org text PRIMARY KEY, n bigint NOT NULL);
        GRANT USAGE ON SCHEMA sneaky_rm TO {role};
        GRANT ALL ON sneaky_rm.counts TO {role};
        CREATE TABLE app.victim (note text);
        CREATE FUNCTION app.sneaky(e hub.events) RETURNS void LANGUAGE plpgsql AS $$
        BEGIN
            INSERT INTO counts AS c VALUES (e.org, 1)
            ON CONFLICT (org) DO UPDATE SET n = c.n + 1;
            IF e.type = 'escape' THEN INSERT INTO app.victim VALUES ('written'); END IF;
        END $$;
        GRANT USAGE ON SCHEMA app TO {role};
        """
    )
    await catalog.register(dsn, "sneaky", "app.sneaky(hub.events)", schema="sneaky_rm", run_as=role)
    started = runner(retry=3600)
    await append(db, "s", "fine", {})
    await append(db, "s", "escape", {})
    deadline = time.monotonic() + T
    while ("sneaky", "s") not in started.state.stopped:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    assert "permission denied" in started.state.stopped[("sneaky", "s")]
    assert await db.fetchval("SELECT n FROM sneaky_rm.counts WHERE org = 's'") == 1
    assert await db.fetchval("SELECT count(*) FROM app.victim") == 0
    await db.execute(f"DROP OWNED BY {role}; DROP ROLE {role}")


async def test_the_mother_rollups_count_exactly_the_events_of_the_log(
    dsn: str, db: asyncpg.Connection, runner: Callable[..., ProjectionRunner]
) -> None:
    runner(batch=13)
    await writers(dsn, ["m1", "m2", "m3"], per_org=50, seed=2)
    for i in range(10):
        await append(db, "m1", "login", {"user_id": f"u{i % 4}"})
    await caught_up(db, "mother")
    expected = await db.fetch(
        "SELECT org, to_timestamp(floor(extract(epoch FROM created_at) / 60) * 60) AS minute, "
        "type, count(*) AS events FROM hub.events GROUP BY 1, 2, 3 ORDER BY 1, 2, 3"
    )
    got = await db.fetch(
        "SELECT org, minute, type, events FROM mother.org_activity ORDER BY 1, 2, 3"
    )
    assert [tuple(r) for r in got] == [tuple(r) for r in expected]
    network = await db.fetch("SELECT minute, events, orgs FROM mother.network_activity")
    assert sum(r["events"] for r in network) == 160
    assert max(r["orgs"] for r in network) <= 3
    users = await db.fetchval("SELECT sum(users) FROM mother.org_users WHERE org = 'm1'")
    assert users >= 4  # u0..u3, once per minute they appear in
    summary = {
        r["org"]: (r["events"], r["last_seq"])
        for r in await db.fetch("SELECT * FROM mother.org_summary")
    }
    assert summary == {"m1": (60, 60), "m2": (50, 50), "m3": (50, 50)}
    hourly = await db.fetchval("SELECT sum(events) FROM mother.org_activity_hourly")
    assert hourly == 160


async def hub_cli(dsn: str, *args: str) -> tuple[int, str]:
    """``hub projections ARGS``: (exit code, stdout and stderr)."""
    code, out, err = await run_cli("projections", *args, env={"HUB_DATABASE_URL": dsn})
    return code, out + err


async def test_the_projections_command(
    dsn: str, db: asyncpg.Connection, runner: Callable[..., ProjectionRunner]
) -> None:
    await db.execute(
        "CREATE SCHEMA counts_rm; CREATE TABLE counts_rm.per_type (type text PRIMARY KEY, n int);"
        "CREATE FUNCTION app.count(e hub.events) RETURNS void LANGUAGE plpgsql AS "
        "$$ BEGIN INSERT INTO per_type AS p VALUES (e.type, 1) "
        "ON CONFLICT (type) DO UPDATE SET n = p.n + 1; END $$"
    )
    code, out = await hub_cli(
        dsn,
        "add",
        "counts",
        "--handler",
        "app.count(hub.events)",
        "--schema",
        "counts_rm",
        "--types",
        "ticket.opened, boom",
    )
    assert (code, out.strip()) == (0, "projection counts registered")
    code, out = await hub_cli(dsn, "add", "counts", "--handler", "app.count(hub.events)")
    assert code == 1 and "already registered" in out
    runner()
    await append(db, "c", "ticket.opened", {"id": "1"})
    await append(db, "c", "ticket.closed", {"id": "1"})
    await append(db, "c", "boom", {})
    await caught_up(db, "counts")
    assert dict(await db.fetch("SELECT type, n FROM counts_rm.per_type")) == {
        "ticket.opened": 1,
        "boom": 1,
    }
    code, out = await hub_cli(dsn, "list")
    assert code == 0
    assert "counts: app.count(hub.events) (event, ticket.opened,boom) -> schema counts_rm" in out
    assert "  c: seq 3/3, lag 0, running" in out
    assert "stopped at seq 3: boom at seq 3" in out  # open_tickets, org c
    code, out = await hub_cli(dsn, "retry", "open_tickets", "--org", "c")
    assert (code, out.strip()) == (0, "retried 1 stopped org(s)")
    code, out = await hub_cli(dsn, "rebuild", "nothing")
    assert code == 1 and "no projection 'nothing'" in out
    code, out = await hub_cli(dsn, "remove", "counts")
    assert (code, out.strip()) == (0, "projection counts removed")


async def test_the_documented_example_works_as_written(
    dsn: str, db: asyncpg.Connection, runner: Callable[..., ProjectionRunner]
) -> None:
    """docs/projections.md's open tickets, its SQL run as written (the
    role renamed per run: roles are shared by every database)."""
    doc = (ROOT / "docs" / "projections.md").read_text()
    blocks = doc.split("```sql\n")[1:]
    setup, query = blocks[0].split("```")[0], blocks[1].split("```")[0]
    role = "tickets_writer_" + new_database_name()[-8:]
    # This module's own example lives in the schemas the doc uses.
    await db.execute("DELETE FROM hub.projections WHERE name = 'open_tickets'")
    await db.execute("DROP SCHEMA app CASCADE")
    await db.execute(setup.replace("tickets_writer", role))
    code, out = await hub_cli(
        dsn,
        "add",
        "open_tickets_doc",
        "--handler",
        "app.open_tickets(hub.events)",
        "--schema",
        "tickets_rm",
        "--types",
        "ticket.opened,ticket.closed",
        "--run-as",
        role,
    )
    assert code == 0, out
    runner()
    await append(db, "acme", "ticket.opened", {"id": "1", "title": "printer"})
    await append(db, "acme", "ticket.opened", {"id": "2", "title": "coffee"})
    await append(db, "acme", "ticket.closed", {"id": "1"})
    await append(db, "acme", "note", {})
    await caught_up(db, "open_tickets_doc")
    rows = await db.fetch(query)
    assert [(r["id"], r["title"]) for r in rows] == [("2", "coffee")]
    await db.execute(f"DROP OWNED BY {role}; DROP ROLE {role}")
