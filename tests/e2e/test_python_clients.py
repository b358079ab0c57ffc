"""The real Python clients (`realtime`, `supabase`), unmodified, against a
real `hub serve`."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import pytest
from realtime import AsyncRealtimeChannel, AsyncRealtimeClient, RealtimeSubscribeStates
from realtime.exceptions import RealtimeHTTPError
from realtime.types import ChannelEvents, RealtimeAcknowledgementStatus
from supabase import acreate_client

from tests.support.hubs import HubProcess

pytestmark = pytest.mark.e2e

#: Default timeout for every single wait in this file.
T = 5.0
SUBSCRIBED = RealtimeSubscribeStates.SUBSCRIBED
CHANNEL_ERROR = RealtimeSubscribeStates.CHANNEL_ERROR
CLOSED = RealtimeSubscribeStates.CLOSED

MakeClient = Callable[[str], Awaitable[AsyncRealtimeClient]]


def new_org() -> str:
    """A fresh org id, so tests sharing the session hub never share topics."""
    return "p" + uuid.uuid4().hex[:12]


class Recorder:
    """A callback that queues what it is called with."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[Any] = asyncio.Queue()

    def __call__(self, *args: Any) -> None:
        self.queue.put_nowait(args[0] if len(args) == 1 else args)

    async def next(self, within: float = T) -> Any:
        return await asyncio.wait_for(self.queue.get(), within)

    async def nothing(self, wait: float = 0.3) -> None:
        try:
            item = await asyncio.wait_for(self.queue.get(), wait)
        except TimeoutError:
            return
        raise AssertionError(f"unexpected callback {item!r}")


def config(
    *, self_: bool = False, ack: bool = False, key: str = "", presence: bool = False
) -> dict[str, Any]:
    return {
        "config": {
            "broadcast": {"self": self_, "ack": ack},
            "presence": {"key": key, "enabled": presence},
        }
    }


async def subscribe(channel: AsyncRealtimeChannel) -> Recorder:
    """Subscribe and expect SUBSCRIBED; returns the state recorder."""
    states = Recorder()
    await asyncio.wait_for(channel.subscribe(states), T)
    state, error = await states.next()
    assert state == SUBSCRIBED, error
    return states


async def shutdown(client: AsyncRealtimeClient) -> None:
    try:
        await asyncio.wait_for(client.remove_all_channels(), T)
    finally:
        await asyncio.wait_for(client.close(), T)


@pytest.fixture
async def make_client(hub_server: HubProcess) -> AsyncIterator[MakeClient]:
    """Connected realtime-py clients, closed at the end of the test."""
    made: list[AsyncRealtimeClient] = []
    log_start = len(hub_server.log())

    async def make(token: str) -> AsyncRealtimeClient:
        client = AsyncRealtimeClient(f"ws://127.0.0.1:{hub_server.port}/realtime/v1", token)
        made.append(client)
        await asyncio.wait_for(client.connect(), T)
        return client

    yield make
    for client in made:
        await shutdown(client)
    assert "Traceback" not in hub_server.log()[log_start:]


async def rest_broadcast(
    hub: HubProcess, token: str | None, topic: str, event: str, payload: Any
) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    body = {"messages": [{"topic": topic, "event": event, "payload": payload}]}
    async with httpx.AsyncClient(base_url=hub.http_url, timeout=T) as http:
        return await http.post("/realtime/v1/api/broadcast", json=body, headers=headers)


# -- broadcast -------------------------------------------------------------------


async def test_join_and_broadcast_between_two_clients(
    hub_server: HubProcess, make_client: MakeClient
) -> None:
    org = new_org()
    token = hub_server.token(orgs=[org])
    a, b = await make_client(token), await make_client(token)
    got_a, got_b = Recorder(), Recorder()
    ch_a = a.channel(f"org:{org}", config()).on_broadcast("*", got_a)
    ch_b = b.channel(f"org:{org}", config()).on_broadcast("*", got_b)
    await subscribe(ch_a)
    await subscribe(ch_b)

    await ch_a.send_broadcast("ping", {"n": 1})
    message = await got_b.next()
    assert message["event"] == "ping" and message["payload"] == {"n": 1}
    await ch_b.send_broadcast("pong", {"n": 2, "nested": {"list": [1, "two", None]}})
    message = await got_a.next()
    assert message["event"] == "pong"
    assert message["payload"] == {"n": 2, "nested": {"list": [1, "two", None]}}
    # self: false (the default): neither saw its own message.
    await got_a.nothing()
    await got_b.nothing()


async def test_broadcast_self_true_and_false(
    hub_server: HubProcess, make_client: MakeClient
) -> None:
    org = new_org()
    token = hub_server.token(orgs=[org])
    loud, quiet, other = [await make_client(token) for _ in range(3)]
    got_loud, got_quiet, got_other = Recorder(), Recorder(), Recorder()
    ch_loud = loud.channel(f"org:{org}", config(self_=True)).on_broadcast("*", got_loud)
    ch_quiet = quiet.channel(f"org:{org}", config(self_=False)).on_broadcast("*", got_quiet)
    ch_other = other.channel(f"org:{org}", config()).on_broadcast("*", got_other)
    for channel in (ch_loud, ch_quiet, ch_other):
        await subscribe(channel)

    await ch_loud.send_broadcast("from_loud", {"i": 1})
    for recorder in (got_loud, got_quiet, got_other):
        assert (await recorder.next())["event"] == "from_loud"

    await ch_quiet.send_broadcast("from_quiet", {"i": 2})
    assert (await got_other.next())["event"] == "from_quiet"
    assert (await got_loud.next())["event"] == "from_quiet"
    # Messages reach a socket in order: if the quiet client had been sent
    # its own message, it would come before this one.
    await ch_other.send_broadcast("from_other", {"i": 3})
    assert (await got_quiet.next())["event"] == "from_other"
    await got_quiet.nothing()


async def test_broadcast_ack(hub_server: HubProcess, make_client: MakeClient) -> None:
    org = new_org()
    token = hub_server.token(orgs=[org])
    acked, plain = await make_client(token), await make_client(token)
    ch_acked = acked.channel(f"org:{org}", config(ack=True))
    ch_plain = plain.channel(f"org:{org}", config(ack=False))
    await subscribe(ch_acked)
    await subscribe(ch_plain)
    body = {"type": "broadcast", "event": "e", "payload": {"x": 1}}

    ok, error = Recorder(), Recorder()
    push = await ch_acked.push(ChannelEvents.broadcast, body)
    push.receive(RealtimeAcknowledgementStatus.Ok, ok)  # runs now if already replied
    push.receive(RealtimeAcknowledgementStatus.Error, error)
    await ok.next()
    await error.nothing(0.1)

    silent = Recorder()
    push = await ch_plain.push(ChannelEvents.broadcast, body)
    push.receive(RealtimeAcknowledgementStatus.Ok, silent)
    push.receive(RealtimeAcknowledgementStatus.Error, silent)
    await silent.nothing(1.0)
    push.destroy()


# -- presence ---------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["org", "free"])
async def test_presence_between_two_clients(
    hub_server: HubProcess, make_client: MakeClient, kind: str
) -> None:
    """On an org topic, and on a public free name with ``anon`` tokens."""
    org = new_org()
    if kind == "org":
        topic, token = f"org:{org}", hub_server.token(orgs=[org])
    else:
        topic, token = f"room:{org}", hub_server.token(sub=None, role="anon")
    alice, bob = await make_client(token), await make_client(token)

    def presence_channel(
        client: AsyncRealtimeClient, key: str
    ) -> tuple[AsyncRealtimeChannel, Recorder, Recorder, Recorder]:
        joins, leaves, syncs = Recorder(), Recorder(), Recorder()
        channel = client.channel(topic, config(key=key, presence=True))
        channel.on_presence_join(joins).on_presence_leave(leaves).on_presence_sync(syncs)
        return channel, joins, leaves, syncs

    ch_a, joins_a, _leaves_a, syncs_a = presence_channel(alice, "alice")
    ch_b, joins_b, leaves_b, syncs_b = presence_channel(bob, "bob")
    await subscribe(ch_a)
    await subscribe(ch_b)
    await syncs_a.next()  # the presence_state after each join
    await syncs_b.next()

    async def joined(joins: Recorder, key: str) -> list[dict[str, Any]]:
        while True:
            got_key, _current, new = await joins.next()
            if got_key == key:
                return list(new)

    async def left(leaves: Recorder, key: str) -> list[dict[str, Any]]:
        while True:
            got_key, _current, gone = await leaves.next()
            if got_key == key:
                return list(gone)

    await ch_a.track({"name": "Alice", "status": "online"})
    new = await joined(joins_b, "alice")
    assert len(new) == 1 and new[0]["name"] == "Alice" and new[0]["presence_ref"]
    assert [p["name"] for p in ch_b.presence_state()["alice"]] == ["Alice"]
    await joined(joins_a, "alice")  # alice sees herself too

    await ch_b.track({"name": "Bob"})
    assert (await joined(joins_a, "bob"))[0]["name"] == "Bob"
    assert set(ch_a.presence_state()) == {"alice", "bob"}
    await syncs_a.next()

    # A re-track replaces the meta (a leave and a join for the same key).
    await ch_a.track({"name": "Alice", "status": "away"})
    assert (await joined(joins_b, "alice"))[0]["status"] == "away"
    assert (await left(leaves_b, "alice"))[0]["status"] == "online"
    state = ch_b.presence_state()
    assert [p["status"] for p in state["alice"]] == ["away"]

    await ch_a.untrack()
    gone = await left(leaves_b, "alice")
    assert (gone[0]["name"], gone[0]["status"]) == ("Alice", "away")
    assert set(ch_b.presence_state()) == {"bob"}

    # A client that disconnects leaves every channel it was present on.
    await ch_a.track({"name": "Alice again"})
    await joined(joins_b, "alice")
    await alice.close()
    gone = await left(leaves_b, "alice")
    assert gone[0]["name"] == "Alice again"
    assert set(ch_b.presence_state()) == {"bob"}


# -- REST broadcast ----------------------------------------------------------------


async def test_rest_broadcast(hub_server: HubProcess, make_client: MakeClient) -> None:
    org = new_org()
    member = hub_server.token(orgs=[org])
    foreign = hub_server.token(orgs=[new_org()])
    client = await make_client(member)
    got = Recorder()
    channel = client.channel(f"org:{org}", config()).on_broadcast("*", got)
    await subscribe(channel)
    topic = f"org:{org}"

    response = await rest_broadcast(hub_server, hub_server.admin_token(), topic, "admin", {"a": 1})
    assert (response.status_code, response.content) == (202, b"")
    message = await got.next()
    assert (message["event"], message["payload"]) == ("admin", {"a": 1})

    response = await rest_broadcast(hub_server, member, topic, "member", {"m": 1})
    assert response.status_code == 202
    assert (await got.next())["event"] == "member"

    response = await rest_broadcast(hub_server, foreign, topic, "foreign", {"f": 1})
    assert response.status_code == 403
    response = await rest_broadcast(hub_server, None, topic, "anonymous", {"f": 1})
    assert response.status_code == 401
    assert response.json() == {"message": "Unauthorized"}
    response = await rest_broadcast(hub_server, "garbage", topic, "garbage", {"f": 1})
    assert response.status_code == 401
    # Nothing refused was delivered: the next message is the next good one.
    async with httpx.AsyncClient(base_url=hub_server.http_url, timeout=T) as http:
        response = await http.post(
            "/realtime/v1/api/broadcast",
            json={"messages": [{"topic": topic, "event": "apikey", "payload": {}}]},
            headers={"apikey": member},
        )
    assert response.status_code == 202
    assert (await got.next())["event"] == "apikey"

    # realtime-py's http_send (POST .../api/broadcast/{topic}/events/{event}).
    await channel.http_send("via_http_send", {"h": 1})
    message = await got.next()
    assert (message["event"], message["payload"]) == ("via_http_send", {"h": 1})

    outsider = await make_client(foreign)
    stranger = outsider.channel(f"org:{org}", config())
    with pytest.raises(RealtimeHTTPError) as info:
        await stranger.http_send("nope", {"x": 1})
    assert info.value.status == 403
    await got.nothing()


# -- refused joins and ended channels ---------------------------------------------


async def test_rest_broadcast_and_http_send_on_a_public_free_name(
    hub_server: HubProcess, make_client: MakeClient
) -> None:
    anon = hub_server.token(sub=None, role="anon")
    topic = f"room:{new_org()}"
    client = await make_client(anon)
    got = Recorder()
    channel = client.channel(topic, config()).on_broadcast("*", got)
    await subscribe(channel)
    response = await rest_broadcast(hub_server, anon, topic, "rest", {"r": 1})
    assert (response.status_code, response.content) == (202, b"")
    assert (await got.next())["event"] == "rest"
    await channel.http_send("via_http_send", {"h": 1})
    message = await got.next()
    assert (message["event"], message["payload"]) == ("via_http_send", {"h": 1})
    # The private channel of the same name is another channel: this hub has
    # no policies to authorize it, so the REST call is refused and nothing
    # reaches the public one.
    async with httpx.AsyncClient(base_url=hub_server.http_url, timeout=T) as http:
        response = await http.post(
            "/realtime/v1/api/broadcast",
            json={"messages": [{"topic": topic, "event": "p", "payload": {}, "private": True}]},
            headers={"Authorization": f"Bearer {anon}"},
        )
    assert response.status_code == 403 and "HUB_DATABASE_URL" in response.json()["message"]
    await got.nothing()


async def test_refused_join_keeps_socket(hub_server: HubProcess, make_client: MakeClient) -> None:
    org, other = new_org(), new_org()
    client = await make_client(hub_server.token(orgs=[org]))
    refused = client.channel(f"org:{other}", config())
    states = Recorder()
    await asyncio.wait_for(refused.subscribe(states), T)
    state, error = await states.next()
    assert state == CHANNEL_ERROR
    reason = json.loads(str(error))["reason"]
    assert reason.startswith("Unauthorized:"), reason

    got = Recorder()
    allowed = client.channel(f"org:{org}", config()).on_broadcast("*", got)
    await subscribe(allowed)
    await allowed.send_broadcast("still", {"ok": True})  # self: false, so via REST:
    response = await rest_broadcast(
        hub_server, hub_server.admin_token(), f"org:{org}", "works", {"ok": True}
    )
    assert response.status_code == 202
    assert (await got.next())["event"] == "works"
    assert client.is_connected
    # The client retries the refused join (after 1 s); it is refused again.
    state, error = await states.next(3)
    assert state == CHANNEL_ERROR
    assert json.loads(str(error))["reason"].startswith("Unauthorized:")


async def test_expiring_token_ends_channel(hub_server: HubProcess, make_client: MakeClient) -> None:
    org = new_org()
    topic = f"org:{org}"
    watcher = await make_client(hub_server.token(orgs=[org]))
    seen = Recorder()
    await subscribe(watcher.channel(topic, config()).on_broadcast("*", seen))

    client = await make_client(hub_server.token(orgs=[org], ttl=3))
    got = Recorder()
    channel = client.channel(topic, config()).on_broadcast("*", got)
    states = await subscribe(channel)
    response = await rest_broadcast(hub_server, hub_server.admin_token(), topic, "before", {})
    assert response.status_code == 202
    assert (await got.next())["event"] == "before"
    assert (await seen.next())["event"] == "before"

    # A system error, then phx_close: CHANNEL_ERROR then CLOSED.
    state, error = await states.next(6)
    assert state == CHANNEL_ERROR
    system = json.loads(str(error))
    assert system["status"] == "error"
    assert system["message"].startswith("Token has expired"), system
    state, error = await states.next()
    assert (state, error) == (CLOSED, None)
    assert f"realtime:{topic}" not in client.channels

    response = await rest_broadcast(hub_server, hub_server.admin_token(), topic, "after", {})
    assert response.status_code == 202
    assert (await seen.next())["event"] == "after"
    await got.nothing(1.5)  # nothing, and no rejoin either
    await states.nothing(0.1)
    assert client.is_connected


async def test_set_auth_refresh(hub_server: HubProcess, make_client: MakeClient) -> None:
    org, other = new_org(), new_org()
    topic = f"org:{org}"
    client = await make_client(hub_server.token(sub="u1", orgs=[org]))
    got = Recorder()
    channel = client.channel(topic, config(self_=True, ack=True)).on_broadcast("*", got)
    states = await subscribe(channel)

    # A fresh token for the same org: the channel carries on.
    await client.set_auth(hub_server.token(sub="u1", orgs=[org, other], ttl=7200))
    await states.nothing(0.5)
    await channel.send_broadcast("after_refresh", {})
    assert (await got.next())["event"] == "after_refresh"

    # A token of another org: the hub ends the channel.
    await client.set_auth(hub_server.token(sub="u1", orgs=[other]))
    state, error = await states.next()
    assert state == CHANNEL_ERROR
    message = json.loads(str(error))["message"]
    assert message == f"You no longer have permission to read from this Channel topic: {topic}"
    state, _ = await states.next()
    assert state == CLOSED
    response = await rest_broadcast(hub_server, hub_server.admin_token(), topic, "gone", {})
    assert response.status_code == 202
    await got.nothing(0.5)
    assert client.is_connected


async def test_set_auth_with_invalid_token_ends_channel(
    hub_server: HubProcess, make_client: MakeClient
) -> None:
    org = new_org()
    client = await make_client(hub_server.token(orgs=[org]))
    channel = client.channel(f"org:{org}", config())
    states = await subscribe(channel)
    await client.set_auth("not-a-jwt")
    state, error = await states.next()
    assert state == CHANNEL_ERROR
    assert json.loads(str(error))["status"] == "error"
    assert (await states.next())[0] == CLOSED


# -- supabase ---------------------------------------------------------------------


async def test_supabase_client(hub_server: HubProcess, make_client: MakeClient) -> None:
    org = new_org()
    topic = f"org:{org}"
    token = hub_server.token(orgs=[org])
    supabase = await acreate_client(hub_server.http_url, token)
    try:
        realtime = supabase.realtime
        assert realtime.endpoint_url().startswith(f"{hub_server.ws_url}?")
        got = Recorder()
        channel = supabase.channel(topic, config(self_=True, key="sb", presence=True))
        channel.on_broadcast("*", got)
        joins = Recorder()
        channel.on_presence_join(joins)
        states = await subscribe(channel)

        peer = await make_client(token)
        peer_got = Recorder()
        peer_channel = peer.channel(topic, config()).on_broadcast("*", peer_got)
        await subscribe(peer_channel)

        await channel.send_broadcast("from_supabase", {"s": 1})
        assert (await got.next())["event"] == "from_supabase"  # self: true
        message = await peer_got.next()
        assert (message["event"], message["payload"]) == ("from_supabase", {"s": 1})
        await peer_channel.send_broadcast("from_peer", {"p": 1})
        assert (await got.next())["payload"] == {"p": 1}

        await channel.track({"who": "supabase"})
        key, _, new = await joins.next()
        assert key == "sb" and new[0]["who"] == "supabase"

        # What supabase does on an auth state change: realtime.set_auth.
        await realtime.set_auth(hub_server.token(orgs=[new_org()]))
        state, error = await states.next()
        assert state == CHANNEL_ERROR
        assert "no longer have permission" in json.loads(str(error))["message"]
        assert (await states.next())[0] == CLOSED
        await peer_channel.send_broadcast("too_late", {})
        await got.nothing(0.5)
    finally:
        await shutdown(supabase.realtime)
