"""Broadcast from the database: ``realtime.send()`` and
``realtime.broadcast_changes()`` (migration 0005) reaching subscribers of a
real `hub serve`, against a real PostgreSQL database migrated by
`hub migrate`, with raw vsn 1 and vsn 2 clients (and realtime-py).

Each test gets a database of its own.  Nothing is mocked: a missing
PostgreSQL or Redis fails the tests loudly.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from realtime import AsyncRealtimeClient, RealtimeSubscribeStates

from hub.client.realtime import AsyncClient, Message
from hub.store.migrate import migrate
from tests.support.hubs import HubProcess, start_hub, stop_hub
from tests.support.mother import fresh_database
from tests.support.pg import create_database, drop_database, new_database_name
from tests.support.rawclients import (
    close_raw_clients,  # noqa: F401 - autouse
    connect,
)

T = 5.0
V1, V2 = "1.0.0", "2.0.0"
ALICE = str(uuid.uuid4())
REDIS_URL = os.environ.get("HUB_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")

# As Supabase's documentation writes them: a read policy for the private
# channels, and a trigger on an app table that broadcasts its changes.
APP = """
create policy "authenticated read rooms" on realtime.messages
  for select to authenticated
  using (realtime.topic() like 'room:%' or realtime.topic() like 'todos:%');

create table public.todos (
  id bigint primary key,
  list_id bigint not null,
  title text not null,
  done boolean not null default false
);

create or replace function public.todos_changes()
returns trigger
security definer
language plpgsql
as $$
begin
  perform realtime.broadcast_changes(
    'todos:' || coalesce(NEW.list_id, OLD.list_id)::text,
    TG_OP,
    TG_OP,
    TG_TABLE_NAME,
    TG_TABLE_SCHEMA,
    NEW,
    OLD,
    TG_LEVEL
  );
  return null;
end;
$$;

create trigger handle_todos_changes
  after insert or update or delete on public.todos
  for each row execute function public.todos_changes();
"""


@pytest.fixture
async def dsn() -> AsyncIterator[str]:
    async with fresh_database() as url:
        conn = await asyncpg.connect(url)
        try:
            await conn.execute(APP)
        finally:
            await conn.close()
        yield url


@pytest.fixture
def hub(dsn: str, tmp_path: Path) -> Iterator[HubProcess]:
    started = start_hub(tmp_path, {"HUB_DATABASE_URL": dsn})
    try:
        yield started
    finally:
        stop_hub(started)
    assert "Traceback" not in started.log(), started.log()


@pytest.fixture
async def db(dsn: str) -> AsyncIterator[asyncpg.Connection]:
    """A connection to the test's database, as the app's own SQL runs."""
    conn = await asyncpg.connect(dsn)
    try:
        yield conn
    finally:
        await conn.close()


def user(hub: HubProcess, sub: str = ALICE, **claims: Any) -> str:
    return hub.token(sub=sub, orgs=[], **claims)


def channel(private: bool) -> dict[str, Any]:
    return {
        "broadcast": {"self": False, "ack": False},
        "presence": {"enabled": False, "key": ""},
        "private": private,
    }


async def heard(client: AsyncClient, event: str, within: float = T) -> Message:
    return await client.wait_for(lambda m: m.user_event == event, within=within)


def copies(client: AsyncClient, event: str) -> list[Message]:
    return [m for m in client.messages if m.user_event == event]


async def not_heard(client: AsyncClient, event: str, wait: float = 0.5) -> None:
    await asyncio.sleep(wait)
    assert not copies(client, event)


async def send(
    db: asyncpg.Connection, payload: Any, event: str, topic: str | None, private: bool = True
) -> None:
    await db.execute(
        "select realtime.send($1::text::jsonb, $2, $3, $4)",
        json.dumps(payload),
        event,
        topic,
        private,
    )


async def row_ids(db: asyncpg.Connection, event: str) -> list[str]:
    rows = await db.fetch("select id::text from realtime.messages where event = $1", event)
    return [row["id"] for row in rows]


# -- realtime.send from SQL --------------------------------------------------------------


async def test_send_from_sql_reaches_vsn_1_and_vsn_2(
    hub: HubProcess, db: asyncpg.Connection
) -> None:
    v1 = await connect(hub, user(hub), V1)
    v2 = await connect(hub, user(hub), V2)
    for client in (v1, v2):
        await client.join("realtime:room:sql", channel(private=False))

    await send(db, {"text": "hello"}, "chat", "room:sql", private=False)

    [message_id] = await row_ids(db, "chat")
    for client, binary in ((v1, False), (v2, True)):
        message = await heard(client, "chat")
        assert message.topic == "realtime:room:sql"
        assert message.binary is binary
        # Supabase's shape: the payload with the id realtime.send added, and
        # meta.id, the realtime.messages row's id.
        assert message.body == {"text": "hello", "id": message_id}
        assert message.meta == {"id": message_id}
    # A payload with its own id keeps it; meta.id is still the row's.
    await send(db, {"id": "mine", "n": 2}, "own-id", "room:sql", private=False)
    [row_id] = await row_ids(db, "own-id")
    message = await heard(v2, "own-id")
    assert message.body == {"id": "mine", "n": 2}
    assert message.meta == {"id": row_id}
    await asyncio.sleep(0.3)
    assert len(copies(v1, "chat")) == len(copies(v2, "chat")) == 1
    assert hub.metric("hub_database_broadcasts_total") >= 2
    assert hub.metric("hub_database_broadcasts_dropped_total") == 0


async def test_public_and_private_database_broadcasts_stay_apart(
    hub: HubProcess, db: asyncpg.Connection
) -> None:
    # Alice may read room:* (the policy); the service role may read anything.
    private_v2 = await connect(hub, user(hub), V2)
    private_v1 = await connect(hub, hub.admin_token(), V1)
    public = await connect(hub, user(hub, str(uuid.uuid4())), V2)
    await private_v2.join("realtime:room:mixed", channel(private=True))
    await private_v1.join("realtime:room:mixed", channel(private=True))
    await public.join("realtime:room:mixed", channel(private=False))

    await send(db, {"secret": True}, "for-private", "room:mixed")  # private is the default
    await send(db, {"secret": False}, "for-public", "room:mixed", private=False)

    for client in (private_v1, private_v2):
        assert (await heard(client, "for-private")).body["secret"] is True
    assert (await heard(public, "for-public")).body["secret"] is False
    await not_heard(public, "for-private")
    await not_heard(private_v1, "for-public", wait=0)
    await not_heard(private_v2, "for-public", wait=0)


async def test_a_large_payload_is_read_from_the_table(
    hub: HubProcess, db: asyncpg.Connection, dsn: str
) -> None:
    listener = await asyncpg.connect(dsn)
    notes: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    await listener.add_listener(
        "hub_broadcasts", lambda *args: notes.put_nowait(json.loads(args[-1]))
    )
    try:
        v1 = await connect(hub, user(hub), V1)
        v2 = await connect(hub, user(hub), V2)
        for client in (v1, v2):
            await client.join("realtime:room:big", channel(private=True))
        big = {"blob": "x" * 12_000, "list": list(range(100))}
        await send(db, big, "big", "room:big")

        # Far past NOTIFY's 8000 bytes: the notification is a reference.
        note = await asyncio.wait_for(notes.get(), T)
        [message_id] = await row_ids(db, "big")
        assert note["ref"] is True and note["id"] == message_id
        for client in (v1, v2):
            message = await heard(client, "big")
            assert message.body == {**big, "id": message_id}
            assert message.meta == {"id": message_id}
    finally:
        await listener.close()


async def test_order_is_kept_around_a_large_payload(
    hub: HubProcess, db: asyncpg.Connection
) -> None:
    client = await connect(hub, user(hub), V2)
    await client.join("realtime:room:order", channel(private=False))
    async with db.transaction():
        await send(db, {"n": 1}, "seq", "room:order", private=False)
        await send(db, {"n": 2, "blob": "y" * 9000}, "seq", "room:order", private=False)
        await send(db, {"n": 3}, "seq", "room:order", private=False)
    await client.wait_for(lambda m: m.user_event == "seq" and m.body["n"] == 3, within=T)
    assert [m.body["n"] for m in copies(client, "seq")] == [1, 2, 3]


async def test_the_listener_relistens_after_a_reconnect(
    hub: HubProcess, db: asyncpg.Connection
) -> None:
    client = await connect(hub, user(hub), V1)
    await client.join("realtime:room:again", channel(private=False))
    await send(db, {"n": 0}, "before", "room:again", private=False)
    await heard(client, "before")
    killed = await db.fetchval(
        "select count(pg_terminate_backend(pid)) from pg_stat_activity "
        "where application_name = 'hub listen' and datname = current_database()"
    )
    assert killed == 1
    # Best effort: what is sent while nobody listens is lost; once the
    # listener is back, broadcasts flow again.
    for attempt in range(100):
        await send(db, {"n": attempt}, "after", "room:again", private=False)
        try:
            await heard(client, "after", within=0.2)
            break
        except TimeoutError:
            continue
    else:
        raise AssertionError("no database broadcast after the LISTEN connection came back")
    assert "sent while the LISTEN connection was down are lost" in hub.log()


# -- realtime.broadcast_changes from a trigger --------------------------------------------


async def test_broadcast_changes_from_a_row_trigger(
    hub: HubProcess, db: asyncpg.Connection
) -> None:
    v1 = await connect(hub, user(hub), V1)
    v2 = await connect(hub, user(hub), V2)
    for client in (v1, v2):
        await client.join("realtime:todos:7", channel(private=True))

    await db.execute("insert into public.todos values (1, 7, 'milk', false)")
    await db.execute("update public.todos set done = true where id = 1")
    await db.execute("delete from public.todos where id = 1")

    row = {"id": 1, "list_id": 7, "title": "milk", "done": False}
    done = {**row, "done": True}
    expected = {
        "INSERT": (None, row),
        "UPDATE": (row, done),
        "DELETE": (done, None),
    }
    for client in (v1, v2):
        for operation, (old, new) in expected.items():
            message = await heard(client, operation)
            body = message.body
            assert body == {
                "id": message.meta["id"],
                "old_record": old,
                "record": new,
                "operation": operation,
                "table": "todos",
                "schema": "public",
            }
    # Private (broadcast_changes always sends private): the public channel
    # of the same name hears nothing.
    public = await connect(hub, user(hub), V2)
    await public.join("realtime:todos:7", channel(private=False))
    await db.execute("insert into public.todos values (2, 7, 'eggs', false)")
    await heard(v2, "INSERT", within=T)
    await not_heard(public, "INSERT")


async def test_broadcast_changes_refuses_statement_level(db: asyncpg.Connection) -> None:
    with pytest.raises(asyncpg.RaiseError, match="for each row, not for each statement"):
        await db.execute(
            "select realtime.broadcast_changes('t', 'e', 'INSERT', 'todos', 'public', "
            "null::record, null::record, 'STATEMENT')"
        )


# -- org topics: durable events --------------------------------------------------------


async def test_an_org_topic_becomes_a_durable_event(
    hub: HubProcess, db: asyncpg.Connection
) -> None:
    org = "db" + uuid.uuid4().hex[:10]
    token = hub.token(sub=ALICE, orgs=[org])
    v1 = await connect(hub, token, V1)
    v2 = await connect(hub, token, V2)
    sub = await connect(hub, token, V2)
    for client in (v1, v2):
        await client.join(f"realtime:org:{org}", {})
    await sub.join(f"realtime:org:{org}:chat", {})

    await send(db, {"n": 1}, "order.created", f"org:{org}")
    # A sub-topic is not durable: a plain broadcast, as on any other topic.
    await send(db, {"n": 2}, "typing", f"org:{org}:chat", private=False)

    [payload_id] = [
        row["payload"]
        for row in await db.fetch(
            "select payload->>'id' as payload from realtime.messages where event = $1",
            "order.created",
        )
    ]
    for client in (v1, v2):
        message = await heard(client, "order.created")
        assert message.body == {"n": 1, "id": payload_id}
        assert message.meta["seq"] == 1
    chat = await heard(sub, "typing")
    assert set(chat.meta) == {"id"}

    async with httpx.AsyncClient(base_url=hub.http_url, timeout=T) as http:
        response = await http.get(
            f"/api/orgs/{org}/events",
            headers={"Authorization": f"Bearer {hub.admin_token()}"},
        )
    assert response.status_code == 200, response.text
    history = response.json()
    assert history["last_seq"] == 1
    [event] = history["events"]
    assert event["seq"] == 1 and event["type"] == "order.created"
    assert event["payload"] == {"n": 1, "id": payload_id}
    # Exactly once per subscriber (durable path only, never also a broadcast).
    await asyncio.sleep(0.5)
    assert len(copies(v1, "order.created")) == len(copies(v2, "order.created")) == 1
    assert not copies(v1, "typing")


# -- bad input and transactions -----------------------------------------------------------


async def test_send_never_raises(hub: HubProcess, db: asyncpg.Connection) -> None:
    warnings: list[str] = []
    db.add_log_listener(lambda _conn, message: warnings.append(message.message))
    client = await connect(hub, user(hub), V2)
    await client.join("realtime:room:bad", channel(private=False))

    await send(db, [1, 2, 3], "array", "room:bad", private=False)
    await send(db, "text", "scalar", "room:bad", private=False)
    await send(db, {"ok": False}, "no-topic", None, private=False)
    assert len(warnings) == 3, warnings
    assert all(w.startswith("ErrorSendingBroadcastMessage: ") for w in warnings)
    assert await db.fetchval("select count(*) from realtime.messages") == 0
    # The connection is fine and the next send works.
    await send(db, {"ok": True}, "fine", "room:bad", private=False)
    assert (await heard(client, "fine")).body["ok"] is True
    assert not copies(client, "array") and not copies(client, "scalar")


async def test_a_rolled_back_transaction_delivers_nothing(
    hub: HubProcess, db: asyncpg.Connection, dsn: str
) -> None:
    org = "rb" + uuid.uuid4().hex[:10]
    listener = await asyncpg.connect(dsn)
    notes: list[str] = []
    await listener.add_listener("hub_broadcasts", lambda *args: notes.append(args[-1]))
    await listener.add_listener("hub_events", lambda *args: notes.append(args[-1]))
    try:
        public = await connect(hub, user(hub), V1)
        member = await connect(hub, hub.token(sub=ALICE, orgs=[org]), V2)
        await public.join("realtime:room:rb", channel(private=False))
        await member.join(f"realtime:org:{org}", {})
        # Realtime Authorization probes (a private join, a first broadcast)
        # insert rows into realtime.messages and roll them back.
        prober = await connect(hub, user(hub), V2)
        await prober.join("realtime:room:rb", channel(private=True))
        await prober.broadcast("realtime:room:rb", "probe", {}, binary=True)

        class Rollback(Exception):
            pass

        with pytest.raises(Rollback):
            async with db.transaction():
                await send(db, {"n": 1}, "undone", "room:rb", private=False)
                await send(db, {"n": 2}, "undone", f"org:{org}")
                await db.execute(
                    "insert into realtime.messages (topic, extension, event, payload, private) "
                    "values ('room:rb', 'broadcast', 'undone', '{}', false)"
                )
                raise Rollback
        # The same, committed, is delivered (so the silence above means something).
        await send(db, {"n": 3}, "done", "room:rb", private=False)
        await heard(public, "done")
        await asyncio.sleep(0.3)
        assert not copies(public, "undone") and not copies(member, "undone")
        assert len(notes) == 1 and json.loads(notes[0])["event"] == "done", notes
        assert await db.fetchval("select count(*) from hub.events where org = $1", org) == 0
    finally:
        await listener.close()


# -- migration ------------------------------------------------------------------------


async def test_migrate_keeps_an_existing_realtime_send() -> None:
    name = new_database_name()
    dsn = await create_database(name)
    try:
        conn = await asyncpg.connect(dsn)
        try:
            # A Supabase-like database whose realtime.send is its own.
            await conn.execute(
                """
                create schema realtime;
                create function realtime.send(payload jsonb, event text, topic text,
                                              private boolean default true)
                returns void language plpgsql as $$
                begin
                  raise notice 'their send';
                end;
                $$;
                """
            )
            before = await conn.fetchval(
                "select prosrc from pg_proc where oid = "
                "'realtime.send(jsonb, text, text, boolean)'::regprocedure"
            )
            applied = await migrate(dsn)
            assert "0005_database_broadcast" in applied
            after = await conn.fetchval(
                "select prosrc from pg_proc where oid = "
                "'realtime.send(jsonb, text, text, boolean)'::regprocedure"
            )
            assert after == before and "their send" in after
            # broadcast_changes was missing: created; the relay trigger is there.
            assert await conn.fetchval(
                "select to_regprocedure("
                "'realtime.broadcast_changes(text, text, text, text, text, record, record, text)')"
                " is not null"
            )
            assert await conn.fetchval(
                "select count(*) from pg_trigger where tgname = 'hub_broadcast_relay' "
                "and tgrelid = 'realtime.messages'::regclass"
            )
            # Rows inserted by their own code are relayed too.
            notes: asyncio.Queue[str] = asyncio.Queue()
            await conn.add_listener("hub_broadcasts", lambda *args: notes.put_nowait(args[-1]))
            other = await asyncpg.connect(dsn)
            try:
                await other.execute(
                    "insert into realtime.messages (topic, extension, event, payload, private) "
                    "values ('room:theirs', 'broadcast', 'e', '{\"a\": 1}', true)"
                )
            finally:
                await other.close()
            note = json.loads(await asyncio.wait_for(notes.get(), T))
            assert note["topic"] == "room:theirs" and note["payload"] == {"a": 1}
            assert await migrate(dsn) == []
        finally:
            await conn.close()
    finally:
        await drop_database(name)


# -- across nodes ---------------------------------------------------------------------


async def test_each_node_delivers_once(dsn: str, db: asyncpg.Connection, tmp_path: Path) -> None:
    env = {
        "HUB_DATABASE_URL": dsn,
        "HUB_REDIS_URL": REDIS_URL,
        "HUB_REDIS_PREFIX": "dbb" + secrets.token_hex(4),
    }
    secret = secrets.token_urlsafe(32)
    hubs = [start_hub(tmp_path, env, secret), start_hub(tmp_path, env, secret)]
    try:
        clients = [await connect(h, user(h), vsn) for h, vsn in zip(hubs, (V1, V2), strict=True)]
        for client in clients:
            await client.join("realtime:room:nodes", channel(private=False))
        await send(db, {"n": 1}, "once", "room:nodes", private=False)
        for client in clients:
            await heard(client, "once")
        await asyncio.sleep(0.5)
        assert [len(copies(c, "once")) for c in clients] == [1, 1]
    finally:
        for h in hubs:
            stop_hub(h)
    for h in hubs:
        assert "Traceback" not in h.log(), h.log()


# -- realtime-py ------------------------------------------------------------------------


async def test_realtime_py_receives_a_database_broadcast(
    hub: HubProcess, db: asyncpg.Connection
) -> None:
    client = AsyncRealtimeClient(f"ws://127.0.0.1:{hub.port}/realtime/v1", user(hub))
    await asyncio.wait_for(client.connect(), T)
    try:
        got: asyncio.Queue[Any] = asyncio.Queue()
        states: asyncio.Queue[Any] = asyncio.Queue()
        ch = client.channel("room:py", {"config": {"broadcast": {"self": False}}})
        ch.on_broadcast("from-db", got.put_nowait)
        await asyncio.wait_for(ch.subscribe(lambda *args: states.put_nowait(args)), T)
        state, error = await asyncio.wait_for(states.get(), T)
        assert state == RealtimeSubscribeStates.SUBSCRIBED, error

        await send(db, {"hello": "py"}, "from-db", "room:py", private=False)
        message = await asyncio.wait_for(got.get(), T)
        [message_id] = await row_ids(db, "from-db")
        assert message["event"] == "from-db"
        assert message["payload"] == {"hello": "py", "id": message_id}
        assert message["meta"] == {"id": message_id}
    finally:
        await asyncio.wait_for(client.remove_all_channels(), T)
        await asyncio.wait_for(client.close(), T)
