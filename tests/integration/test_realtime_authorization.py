"""Private channels on free names, authorized by the app's own policies on
``realtime.messages`` (Realtime Authorization), against a real `hub serve`,
a real PostgreSQL database migrated by `hub migrate`, and raw clients.

The policies (tests/support/policies.py) are written as in Supabase's
documentation.  Each test gets a database of its own.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from hub.client.realtime import AsyncClient, Message, Refused
from tests.support.hubs import HubProcess, start_hub, stop_hub
from tests.support.policies import ALICE, BOB
from tests.support.rawclients import (
    close_raw_clients,  # noqa: F401 - autouse
    connect,
)

T = 5.0
V1, V2 = "1.0.0", "2.0.0"


@pytest.fixture
def hub(policies_dsn: str, tmp_path: Path) -> Iterator[HubProcess]:
    started = start_hub(tmp_path, {"HUB_DATABASE_URL": policies_dsn})
    try:
        yield started
    finally:
        stop_hub(started)
    assert "Traceback" not in started.log(), started.log()


def private(presence: bool = True, ack: bool = False, key: str = "") -> dict[str, Any]:
    return {
        "broadcast": {"self": False, "ack": ack},
        "presence": {"enabled": presence, "key": key},
        "private": True,
    }


def user(hub: HubProcess, sub: str, **claims: Any) -> str:
    return hub.token(sub=sub, orgs=[], **claims)


async def refused(client: AsyncClient, topic: str, config: dict[str, Any]) -> str:
    with pytest.raises(Refused) as info:
        await client.join(topic, config)
    return str(info.value.reason)


async def heard(client: AsyncClient, event: str, within: float = T) -> Message:
    return await client.wait_for(lambda m: m.user_event == event, within=within)


async def not_heard(client: AsyncClient, event: str) -> None:
    await asyncio.sleep(0.3)
    assert not [m for m in client.messages if m.user_event == event]


async def test_a_reader_who_may_not_send_has_its_broadcasts_dropped(hub: HubProcess) -> None:
    alice = await connect(hub, user(hub, ALICE), V2)
    bob = await connect(hub, user(hub, BOB), V1)
    await alice.join("realtime:room:a", private())
    await bob.join("realtime:room:a", private(ack=True))
    # Bob may read (any signed-in user) but is no member of room:a: his
    # broadcast is dropped silently, even with ack, as Supabase drops it.
    await bob.broadcast("realtime:room:a", "from-bob", {"n": 1}, ref=bob.next_ref())
    await alice.broadcast("realtime:room:a", "from-alice", {"n": 2}, binary=True)
    assert (await heard(bob, "from-alice")).body == {"n": 2}
    await not_heard(alice, "from-bob")
    assert not [m for m in bob.messages if m.event == "phx_reply" and m.ref == "2"]


async def test_a_user_with_no_policy_is_refused(hub: HubProcess) -> None:
    bob = await connect(hub, user(hub, BOB))
    reason = await refused(bob, "realtime:other", private())
    assert (
        reason == "Unauthorized: You do not have permissions to read from this Channel topic: other"
    )
    anon = await connect(hub, hub.token(sub=None, role="anon"))
    assert (await refused(anon, "realtime:room:a", private())).startswith("Unauthorized:")
    # The socket stays open, and the public channel of that name is open to all.
    await bob.join("realtime:other", {"private": False})


async def test_a_policy_on_the_claims(hub: HubProcess) -> None:
    staff = await connect(hub, user(hub, ALICE, email="ann@acme.com"))
    outsider = await connect(hub, user(hub, BOB, email="bob@evil.com"))
    await staff.join("realtime:staff", private())
    assert (await refused(outsider, "realtime:staff", private())).startswith("Unauthorized:")


async def test_presence_read_without_write(hub: HubProcess) -> None:
    a = await connect(hub, user(hub, ALICE))
    reply = await a.join("realtime:lobby", private(key="alice"))
    assert reply.status == "ok"
    with pytest.raises(Refused) as info:
        await a.track("realtime:lobby", {"here": True})
    assert info.value.reason.startswith("Unauthorized: ")
    # Presence read only: the presence_state came with the join.
    assert any(m.event == "presence_state" for m in a.messages)


async def test_public_and_private_of_one_name_do_not_share(hub: HubProcess) -> None:
    alice = await connect(hub, user(hub, ALICE))
    public = await connect(hub, user(hub, BOB))
    await alice.join("realtime:room:a", private())
    await public.join("realtime:room:a", {"private": False})
    await alice.broadcast("realtime:room:a", "secret", {}, binary=True)
    await public.broadcast("realtime:room:a", "open", {})
    await not_heard(public, "secret")
    await not_heard(alice, "open")


async def test_a_new_token_that_loses_read_ends_the_channel(hub: HubProcess) -> None:
    staff = await connect(hub, user(hub, ALICE, email="ann@acme.com"))
    await staff.join("realtime:staff", private())
    await staff.push(
        "realtime:staff",
        "access_token",
        {"access_token": user(hub, ALICE, email="ann@evil.com")},
        join_ref=staff.join_refs["realtime:staff"],
    )
    system = await staff.wait_for(lambda m: m.event == "system", within=T)
    assert system.payload["message"] == (
        "You no longer have permission to read from this Channel topic: staff"
    )
    await staff.wait_for(lambda m: m.event == "phx_close", within=T)


async def test_rest_broadcast_to_a_private_topic_needs_write(hub: HubProcess) -> None:
    listener = await connect(hub, user(hub, BOB))
    await listener.join("realtime:room:a", private())

    async def send(token: str) -> httpx.Response:
        body = {"messages": [{"topic": "room:a", "event": "rest", "payload": {}, "private": True}]}
        async with httpx.AsyncClient(base_url=hub.http_url, timeout=T) as http:
            return await http.post(
                "/realtime/v1/api/broadcast",
                json=body,
                headers={"Authorization": f"Bearer {token}"},
            )

    assert (await send(user(hub, BOB))).status_code == 403
    assert (await send(user(hub, ALICE))).status_code == 202
    await heard(listener, "rest")


async def test_replay_of_a_private_channel_from_realtime_messages(
    hub: HubProcess, policies_dsn: str
) -> None:
    """Supabase's replay of a private channel: the kept broadcasts since a
    time, oldest first, at most ``limit``, with ``meta.replayed``."""
    conn = await asyncpg.connect(policies_dsn)
    try:
        for i in range(3):
            await conn.execute(
                "select realtime.send($1::jsonb, 'old', 'room:a', true)", f'{{"i": {i}}}'
            )
        await conn.execute("select realtime.send('{\"x\": 1}'::jsonb, 'public', 'room:a', false)")
    finally:
        await conn.close()
    alice = await connect(hub, user(hub, ALICE), V1)
    config = {**private(), "broadcast": {"replay": {"since": 0, "limit": 2}}}
    await alice.join("realtime:room:a", config)
    first = await heard(alice, "old")
    await asyncio.sleep(0.3)
    replayed = [m for m in alice.messages if m.user_event == "old"]
    assert [m.body["i"] for m in replayed] == [0, 1]  # oldest first, limit 2
    assert first.meta["replayed"] is True and first.meta["id"] == first.body["id"]
    await not_heard(alice, "public")  # the public channel's messages are not this channel's
    bob = await connect(hub, user(hub, BOB), V1)
    reason = await refused(
        bob, "realtime:room:a", {"private": False, "broadcast": {"replay": {"since": 0}}}
    )
    assert reason == "UnableToReplayMessages: Replay is not allowed for public channels"
