"""postgres_changes for tables tracked without an org column (issue 12,
item 5), against a real `hub serve`, a real PostgreSQL database migrated by
`hub migrate`, raw clients and realtime-py:

* ``hub track TABLE --no-org``: rows reach bindings on free-name channels,
  never an ``org:`` topic, and never enter an org's event log;
* Supabase's switch: ``alter publication supabase_realtime add table``
  tracks a table, ``drop table`` untracks it, with the hub running;
* RLS: each user gets exactly the rows the table's policies let them
  select, without the columns their role may not read; DELETE goes to all
  with ``old_record`` cut to the primary key; a policy that raises drops
  the row and is logged.

One database and one hub serve the module; each test has tables of its own.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import asyncpg
import pytest
from realtime import AsyncRealtimeClient, RealtimeSubscribeStates

from hub.client.realtime import AsyncClient, Message
from hub.store.migrate import migrate
from tests.support.hubs import HubProcess, run_cli, start_hub, stop_hub
from tests.support.pg import create_database, drop_database, new_database_name, run_sync
from tests.support.rawclients import (
    close_raw_clients,  # noqa: F401 - autouse
    connect,
)

T = 10.0
V1, V2 = "1.0.0", "2.0.0"
ALICE, BOB = str(uuid.uuid4()), str(uuid.uuid4())


@pytest.fixture(scope="module")
def dsn() -> Iterator[str]:
    name = new_database_name()

    async def create() -> str:
        url = await create_database(name)
        await migrate(url)
        return url

    url = run_sync(create)
    try:
        yield url
    finally:
        run_sync(lambda: drop_database(name))


@pytest.fixture(scope="module")
def hub(dsn: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubProcess]:
    started = start_hub(tmp_path_factory.mktemp("orgless"), {"HUB_DATABASE_URL": dsn})
    try:
        yield started
    finally:
        stop_hub(started)


@pytest.fixture
async def db(dsn: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(dsn)
    try:
        yield conn
    finally:
        await conn.close()


async def connect_slow(hub: HubProcess, token: str, vsn: str = V2) -> AsyncClient:
    return await connect(hub, token, vsn, within=T)


def changes_config(table: str, *, private: bool = False, event: str = "*") -> dict[str, Any]:
    return {
        "broadcast": {"self": False},
        "presence": {"enabled": False},
        "private": private,
        "postgres_changes": [{"event": event, "schema": "public", "table": table}],
    }


def rows(client: AsyncClient, topic: str) -> list[dict[str, Any]]:
    """The ``data`` of every postgres_changes message ``client`` got on ``topic``."""
    return [
        m.payload["data"]
        for m in client.messages
        if m.event == "postgres_changes" and m.topic == topic and isinstance(m.payload, dict)
    ]


async def wait_rows(client: AsyncClient, topic: str, count: int) -> list[dict[str, Any]]:
    def enough(_: Message) -> bool:
        return len(rows(client, topic)) >= count

    if not enough(Message(topic, "", None)):
        await client.wait_for(enough, within=T)
    return rows(client, topic)


async def hub_cli(*args: str, dsn: str) -> None:
    code, out, err = await run_cli(*args, env={"HUB_DATABASE_URL": dsn})
    assert code == 0, (out, err)


async def publication_trigger(db: asyncpg.Connection, table: str, *, present: bool) -> None:
    """Wait until the hub has (or no longer has) tracked ``table`` through
    the publication: the hub follows it about once a second."""
    deadline = time.monotonic() + T
    while True:
        found = await db.fetchval(
            "SELECT EXISTS (SELECT 1 FROM pg_trigger WHERE tgrelid = $1::regclass "
            "AND tgname = 'hub_capture_publication')",
            f"public.{table}",
        )
        if found == present:
            return
        assert time.monotonic() < deadline, f"publication trigger on {table} present={present}"
        await asyncio.sleep(0.1)


def new_table() -> str:
    return "t_" + uuid.uuid4().hex[:10]


async def test_orgless_rows_reach_free_names_and_never_org_topics(
    hub: HubProcess, dsn: str, db: asyncpg.Connection
) -> None:
    table, org = new_table(), "o" + uuid.uuid4().hex[:8]
    # An org_id column, but tracked without one: its value must not route.
    await db.execute(
        f"CREATE TABLE public.{table} (id bigserial PRIMARY KEY, org_id text, body text)"
    )
    await hub_cli("track", f"public.{table}", "--no-org", dsn=dsn)

    member = hub.token(sub="m", orgs=[org])
    free_v2 = await connect_slow(hub, member, V2)
    free_v1 = await connect_slow(hub, hub.token(sub="n", orgs=[]), V1)
    on_org = await connect_slow(hub, member, V1)
    admin_org = await connect_slow(hub, hub.admin_token(), V2)
    await free_v2.join("realtime:schema-db-changes", changes_config(table))
    await free_v1.join("realtime:room:x", changes_config(table, event="INSERT"))
    await on_org.join(f"realtime:org:{org}", changes_config(table))
    await admin_org.join(f"realtime:org:{org}", changes_config(table))

    row_id = await db.fetchval(
        f"INSERT INTO public.{table} (org_id, body) VALUES ($1, 'hello') RETURNING id", org
    )
    await db.execute(f"UPDATE public.{table} SET body = 'bye' WHERE id = $1", row_id)
    got = await wait_rows(free_v2, "realtime:schema-db-changes", 2)
    assert [(d["type"], d["record"]["body"]) for d in got] == [
        ("INSERT", "hello"),
        ("UPDATE", "bye"),
    ]
    assert got[0]["record"] == {"id": row_id, "org_id": org, "body": "hello"}
    assert got[0]["schema"] == "public" and got[0]["table"] == table
    assert [c["name"] for c in got[0]["columns"]] == ["id", "org_id", "body"]
    assert got[1]["old_record"]["body"] == "hello"  # no RLS: the whole old row
    (only_insert,) = await wait_rows(free_v1, "realtime:room:x", 1)
    assert only_insert["type"] == "INSERT"

    await asyncio.sleep(0.5)
    assert rows(on_org, f"realtime:org:{org}") == []
    assert rows(admin_org, f"realtime:org:{org}") == []
    assert await db.fetchval("SELECT count(*) FROM hub.events WHERE org = $1", org) == 0
    assert hub.metric("hub_row_changes_total") >= 2
    assert hub.metric("hub_rows_delivered_total") >= 2
    assert "Traceback" not in hub.log()


async def test_supabase_realtime_publication_add_and_remove_without_restart(
    hub: HubProcess, db: asyncpg.Connection
) -> None:
    """realtime-py, as a Supabase app uses it: the table joins the
    publication (an app's migration), the app subscribes and gets Supabase's
    ok, rows flow; the table leaves it, rows stop.  (Subscribed before the
    table is in the publication, realtime-py gets the system error and its
    rejoin is closed as a duplicate join, as with Supabase: see
    test_realtime_py_reports_the_system_error_of_an_untracked_table.)"""
    table = new_table()
    await db.execute(f"CREATE TABLE public.{table} (id bigserial PRIMARY KEY, title text)")
    await db.execute(f"INSERT INTO public.{table} (title) VALUES ('before')")
    await db.execute(f"ALTER PUBLICATION supabase_realtime ADD TABLE public.{table}")
    await publication_trigger(db, table, present=True)
    client = AsyncRealtimeClient(f"ws://127.0.0.1:{hub.port}/realtime/v1", hub.token(sub="py"))
    await asyncio.wait_for(client.connect(), T)
    try:
        got: list[Any] = []
        subscribed: list[Any] = []
        channel = client.channel("schema-db-changes", {"config": {}})
        channel.on_postgres_changes("*", got.append, table=table, schema="public")
        channel.on_system(subscribed.append)
        states: asyncio.Queue[Any] = asyncio.Queue()
        await asyncio.wait_for(channel.subscribe(lambda s, e: states.put_nowait((s, e))), T)
        state, error = await asyncio.wait_for(states.get(), T)
        assert state == RealtimeSubscribeStates.SUBSCRIBED, error
        deadline = time.monotonic() + T
        while not subscribed:
            assert time.monotonic() < deadline, "realtime-py never got Subscribed to PostgreSQL"
            await asyncio.sleep(0.05)
        assert states.empty()  # no CHANNEL_ERROR
        await db.execute(f"INSERT INTO public.{table} (title) VALUES ('in')")
        deadline = time.monotonic() + T
        while not got:
            assert time.monotonic() < deadline, "no row after the table joined the publication"
            await asyncio.sleep(0.05)

        await db.execute(f"ALTER PUBLICATION supabase_realtime DROP TABLE public.{table}")
        await publication_trigger(db, table, present=False)
        await db.execute(f"INSERT INTO public.{table} (title) VALUES ('after')")
        await asyncio.sleep(0.5)
        assert [p["data"]["record"]["title"] for p in got] == ["in"]
        assert got[0]["data"]["type"] == "INSERT"
    finally:
        await client.close()
    assert "tracking public." in hub.log() and "Traceback" not in hub.log()


async def test_tracking_with_an_org_column_wins_over_the_publication(
    hub: HubProcess, dsn: str, db: asyncpg.Connection
) -> None:
    """A tenant-column table in the publication keeps its org tracking: its
    rows never go to every subscriber of a free name."""
    table, org = new_table(), "o" + uuid.uuid4().hex[:8]
    await db.execute(f"CREATE TABLE public.{table} (id bigserial PRIMARY KEY, org_id text)")
    await hub_cli("track", f"public.{table}", dsn=dsn)
    await db.execute(f"ALTER PUBLICATION supabase_realtime ADD TABLE public.{table}")
    outsider = await connect_slow(hub, hub.token(sub="x", orgs=["elsewhere"]))
    member = await connect_slow(hub, hub.token(sub="y", orgs=[org]))
    await outsider.join("realtime:schema-db-changes", changes_config(table))
    await member.join("realtime:schema-db-changes", changes_config(table))
    await asyncio.sleep(1.5)  # a publication sync or more
    await db.execute(f"INSERT INTO public.{table} (org_id) VALUES ($1)", org)
    assert len(await wait_rows(member, "realtime:schema-db-changes", 1)) == 1
    await asyncio.sleep(0.5)
    assert rows(outsider, "realtime:schema-db-changes") == []
    assert len(rows(member, "realtime:schema-db-changes")) == 1
    triggers = await db.fetch(
        "SELECT tgname FROM pg_trigger WHERE tgrelid = $1::regclass AND NOT tgisinternal",
        f"public.{table}",
    )
    assert [r["tgname"] for r in triggers] == ["hub_capture_change"]
    await db.execute(f"ALTER PUBLICATION supabase_realtime DROP TABLE public.{table}")


async def rls_table(db: asyncpg.Connection, *, policy: str) -> str:
    table = new_table()
    await db.execute(
        f"""
        CREATE TABLE public.{table} (id bigserial PRIMARY KEY, user_id uuid NOT NULL,
                                     title text, secret text);
        ALTER TABLE public.{table} ENABLE ROW LEVEL SECURITY;
        GRANT SELECT (id, user_id, title) ON public.{table} TO authenticated;
        CREATE POLICY own ON public.{table} FOR SELECT TO authenticated USING ({policy});
        ALTER PUBLICATION supabase_realtime ADD TABLE public.{table};
        """
    )
    await publication_trigger(db, table, present=True)
    return table


async def test_rls_each_user_gets_exactly_their_rows_and_readable_columns(
    hub: HubProcess, db: asyncpg.Connection
) -> None:
    table = await rls_table(db, policy="user_id = auth.uid()")
    topic = "realtime:schema-db-changes"
    alice = await connect_slow(hub, hub.token(sub=ALICE, orgs=[]), V2)
    alice_tab = await connect_slow(hub, hub.token(sub=ALICE, orgs=[]), V1)
    bob = await connect_slow(hub, hub.token(sub=BOB, orgs=[]), V1)
    anon = await connect_slow(hub, hub.token(sub=None, role="anon"), V2)
    for client in (alice, alice_tab, bob, anon):
        await client.join(topic, changes_config(table))

    ids = []
    for owner, title in ((ALICE, "a1"), (BOB, "b1"), (ALICE, "a2")):
        ids.append(
            await db.fetchval(
                f"INSERT INTO public.{table} (user_id, title, secret) VALUES ($1, $2, 'pw') "
                "RETURNING id",
                uuid.UUID(owner),
                title,
            )
        )
    got_alice = await wait_rows(alice, topic, 2)
    assert [d["record"]["title"] for d in got_alice] == ["a1", "a2"]
    assert got_alice[0]["record"] == {"id": ids[0], "user_id": ALICE, "title": "a1"}
    assert [c["name"] for c in got_alice[0]["columns"]] == ["id", "user_id", "title"]
    assert [d["record"]["title"] for d in await wait_rows(alice_tab, topic, 2)] == ["a1", "a2"]
    assert [d["record"]["title"] for d in await wait_rows(bob, topic, 1)] == ["b1"]

    # Alice's first row becomes Bob's: only Bob sees the UPDATE; old_record
    # is cut to the primary key.
    await db.execute(
        f"UPDATE public.{table} SET user_id = $1 WHERE id = $2", uuid.UUID(BOB), ids[0]
    )
    update = (await wait_rows(bob, topic, 2))[1]
    assert update["type"] == "UPDATE" and update["record"]["user_id"] == BOB
    assert update["old_record"] == {"id": ids[0]}
    # DELETE reaches every matching subscriber, with the primary key only.
    await db.execute(f"DELETE FROM public.{table} WHERE id = $1", ids[2])
    for client, count in ((alice, 3), (bob, 3), (anon, 1)):
        delete = (await wait_rows(client, topic, count))[-1]
        assert delete["type"] == "DELETE" and delete["old_record"] == {"id": ids[2]}
        assert "record" not in delete
    await asyncio.sleep(0.3)
    assert [d["type"] for d in rows(alice, topic)] == ["INSERT", "INSERT", "DELETE"]
    assert [d["type"] for d in rows(bob, topic)] == ["INSERT", "UPDATE", "DELETE"]
    assert [d["type"] for d in rows(anon, topic)] == ["DELETE"]  # anon may select nothing
    assert not any("secret" in str(d) for c in (alice, bob) for d in rows(c, topic))
    await db.execute(f"ALTER PUBLICATION supabase_realtime DROP TABLE public.{table}")
    assert "Traceback" not in hub.log()


async def test_a_policy_that_raises_drops_the_row_and_is_logged(
    hub: HubProcess, db: asyncpg.Connection
) -> None:
    table = await rls_table(db, policy="user_id = auth.uid() AND 1 / (length(title) - 4) <> 0")
    topic = "realtime:boom"
    alice = await connect_slow(hub, hub.token(sub=ALICE, orgs=[]))
    await alice.join(topic, changes_config(table))
    await db.execute(
        f"INSERT INTO public.{table} (user_id, title) VALUES ($1, 'four')", uuid.UUID(ALICE)
    )
    await db.execute(
        f"INSERT INTO public.{table} (user_id, title) VALUES ($1, 'fine!')", uuid.UUID(ALICE)
    )
    got = await wait_rows(alice, topic, 1)
    await asyncio.sleep(0.3)
    assert [d["record"]["title"] for d in rows(alice, topic)] == ["fine!"]
    assert got and "row check failed" in hub.log()
    await db.execute(f"ALTER PUBLICATION supabase_realtime DROP TABLE public.{table}")


async def system_message(client: AsyncClient, topic: str) -> dict[str, Any]:
    def found(m: Message) -> bool:
        return m.event == "system" and m.topic == topic

    message = await client.wait_for(found, within=T)
    assert isinstance(message.payload, dict)
    return message.payload


async def test_a_binding_on_no_tracked_table_gets_supabases_system_error(
    hub: HubProcess, dsn: str, db: asyncpg.Connection
) -> None:
    """Supabase's answer to bindings, after the join reply: an error for a
    table nothing tracks, ok for one tracked a moment before the join (the
    hub reads the tables again rather than trust its last read)."""
    table, untracked = new_table(), new_table()
    await db.execute(f"CREATE TABLE public.{table} (id bigserial PRIMARY KEY, body text)")
    await db.execute(f"CREATE TABLE public.{untracked} (id bigserial PRIMARY KEY)")
    client = await connect_slow(hub, hub.token(sub="s"))
    await client.join("realtime:room:bad", changes_config(untracked))
    bad = await system_message(client, "realtime:room:bad")
    assert bad == {
        "channel": "room:bad",
        "extension": "postgres_changes",
        "message": "Unable to subscribe to changes with given parameters. Please check Realtime "
        "is enabled for the given connect parameters: "
        f"[event: *, schema: public, table: {untracked}]",
        "status": "error",
    }

    await hub_cli("track", f"public.{table}", "--no-org", dsn=dsn)
    await client.join("realtime:room:good", changes_config(table))
    good = await system_message(client, "realtime:room:good")
    assert (good["status"], good["message"]) == ("ok", "Subscribed to PostgreSQL")
    await db.execute(f"INSERT INTO public.{table} (body) VALUES ('x')")
    (row,) = await wait_rows(client, "realtime:room:good", 1)
    assert row["record"]["body"] == "x"


async def test_realtime_py_reports_the_system_error_of_an_untracked_table(
    hub: HubProcess, db: asyncpg.Connection
) -> None:
    untracked = new_table()
    await db.execute(f"CREATE TABLE public.{untracked} (id bigserial PRIMARY KEY)")
    client = AsyncRealtimeClient(f"ws://127.0.0.1:{hub.port}/realtime/v1", hub.token(sub="py"))
    await asyncio.wait_for(client.connect(), T)
    try:
        states: list[Any] = []
        channel = client.channel("nothing-here", {"config": {}})
        channel.on_postgres_changes("*", lambda _: None, table=untracked)
        await channel.subscribe(lambda state, error: states.append((state, error)))
        deadline = time.monotonic() + T
        while not any(state == RealtimeSubscribeStates.CHANNEL_ERROR for state, _ in states):
            assert time.monotonic() < deadline, states
            await asyncio.sleep(0.05)
        errors = [str(error) for state, error in states if error is not None]
        assert any("Unable to subscribe to changes" in error for error in errors), states
    finally:
        await client.close()


async def test_rls_lookup_plans_per_role_when_roles_alternate(db: asyncpg.Connection) -> None:
    """hub.rls_visible() plans its lookup once and reuses it (a prepared
    statement); contexts of different roles, alternating in one call, must
    each get their own role's policies, not the plan of the role before."""
    table = new_table()
    await db.execute(
        f"""
        CREATE TABLE public.{table} (id bigserial PRIMARY KEY, user_id uuid, title text);
        ALTER TABLE public.{table} ENABLE ROW LEVEL SECURITY;
        GRANT SELECT ON public.{table} TO authenticated, anon;
        CREATE POLICY own ON public.{table} FOR SELECT TO authenticated
          USING (user_id = auth.uid());
        CREATE POLICY open ON public.{table} FOR SELECT TO anon USING (title = 'public');
        """
    )
    shared = await db.fetchval(
        f"INSERT INTO public.{table} (user_id, title) VALUES ($1, 'public') RETURNING id",
        uuid.UUID(ALICE),
    )
    private = await db.fetchval(
        f"INSERT INTO public.{table} (user_id, title) VALUES ($1, 'x') RETURNING id",
        uuid.UUID(BOB),
    )

    def context(role: str, sub: str | None) -> list[Any]:
        claims = {"role": role, **({"sub": sub} if sub else {})}
        return [role, json.dumps(claims), sub]

    groups = json.dumps(
        [context("authenticated", ALICE), context("anon", None)] * 3
        + [context("authenticated", BOB), context("anon", None)]
    )
    oid = await db.fetchval("SELECT $1::regclass::oid", f"public.{table}")
    seen = {}
    for row_id in (shared, private, shared):  # the second call reuses the statement
        async with db.transaction():
            rows = await db.fetch(
                "SELECT idx, visible FROM hub.rls_visible($1, $2::jsonb, $3::jsonb)",
                oid,
                json.dumps({"id": row_id}),
                groups,
            )
            seen[row_id] = [row["visible"] for row in sorted(rows, key=lambda r: r["idx"])]
    assert seen[shared] == [True, True] * 3 + [False, True]
    assert seen[private] == [False, False] * 3 + [True, False]
