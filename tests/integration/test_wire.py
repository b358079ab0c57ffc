"""Raw wire-protocol tests against a real `hub serve`.

Both serializers are spoken by hand with the ``websockets`` client (and, for
the slow consumer, a raw TCP socket) and every answer is checked frame by
frame.  Bad input must get its defined answer (a close code or an error
reply) and must never stop the hub from serving other connections.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from hub.client.realtime import (
    AsyncClient,
    Disconnected,
    encode,
    encode_kind3,
    join_payload,
    socket_url,
    split_kind4,
)
from tests.support.hubs import HubProcess
from tests.support.rawframes import client_frame

#: Default timeout for every single wait in this file.
T = 5.0
V1 = "1.0.0"
V2 = "2.0.0"


# -- helpers -------------------------------------------------------------------


def new_org() -> str:
    """A fresh org id, so tests sharing the session hub never share topics."""
    return "w" + uuid.uuid4().hex[:12]


def url(hub: HubProcess, token: str | None, vsn: str | None = V1) -> str:
    return socket_url(hub.ws_url, token, vsn)


class Wire:
    """One raw connection speaking vsn 1.0.0 or 2.0.0 by hand, through the
    shared raw client; frames are read one at a time, in order."""

    def __init__(self, client: AsyncClient, vsn: str) -> None:
        self.client = client
        self.vsn = vsn
        self.push = client.push

    def expect(
        self, topic: str, event: str, payload: Any, ref: str | None, join_ref: str | None
    ) -> Any:
        """The exact decoded frame the hub sends (vsn 1 omits a null join_ref)."""
        if self.vsn == V1:
            frame = {"topic": topic, "event": event, "payload": payload, "ref": ref}
            if join_ref is not None:
                frame["join_ref"] = join_ref
            return frame
        return [join_ref, ref, topic, event, payload]

    def reply(
        self,
        topic: str,
        ref: str | None,
        join_ref: str | None,
        response: Any = None,
        status: str = "ok",
    ) -> Any:
        payload = {"status": status, "response": {} if response is None else response}
        return self.expect(topic, "phx_reply", payload, ref, join_ref)

    async def send(self, data: str | bytes) -> None:
        await self.client.send_raw(data)

    async def recv_raw(self, within: float = T) -> str | bytes:
        """The next frame as received."""
        return (await self.client.recv(within)).raw

    async def recv(self, within: float = T) -> Any:
        """The next frame: decoded JSON for text, bytes for binary."""
        data = await self.recv_raw(within)
        return json.loads(data) if isinstance(data, str) else data

    async def nothing(self, wait: float = 0.3) -> None:
        """Assert that no frame arrives within ``wait`` seconds."""
        try:
            frame = await self.recv_raw(wait)
        except TimeoutError:
            return
        raise AssertionError(f"unexpected frame {frame!r}")

    async def heartbeat(self, ref: str = "hb") -> None:
        await self.push("phoenix", "heartbeat", {}, ref=ref)
        assert await self.recv() == self.reply("phoenix", ref, None)

    async def join(
        self,
        topic: str,
        ref: str,
        config: dict[str, Any] | None = None,
        access_token: str | None = None,
        presence: Any = None,
    ) -> None:
        """Join and check the ok reply and the presence_state push."""
        payload = join_payload(config, access_token)
        await self.push(topic, "phx_join", payload, ref=ref, join_ref=ref)
        assert await self.recv() == self.reply(topic, ref, ref, {"postgres_changes": []})
        state = await self.recv()
        expected = self.expect(topic, "presence_state", {}, None, ref)
        if presence is None:
            assert state == expected
        else:
            presence(state)

    async def close(self) -> None:
        await self.client.close()


#: Connections opened by the running test; closed whatever the outcome.
_OPEN: list[AsyncClient] = []
_RAW: list[socket.socket] = []


@pytest.fixture(autouse=True)
async def _close_connections() -> AsyncIterator[None]:
    yield
    while _RAW:
        _RAW.pop().close()
    while _OPEN:
        await _OPEN.pop().close()


async def open_wire(hub: HubProcess, token: str, vsn: str | None = V1, **kwargs: Any) -> Wire:
    """``vsn`` None leaves it out of the URL (the hub then speaks 1.0.0)."""
    client = await AsyncClient.connect(hub.ws_url, token, vsn, within=T, **kwargs)
    _OPEN.append(client)
    return Wire(client, vsn or V1)


async def expect_close(wire: Wire, code: int, within: float = T) -> None:
    """Wait until the hub closes the socket; check the close code it sent."""
    await asyncio.wait_for(wire.client.closed.wait(), within)
    received = wire.client.close_code
    assert received is not None, "the hub cut the socket without a close frame"
    assert received == code, f"close code {received} ({wire.client.close_reason!r})"


async def check_alive(hub: HubProcess, *others: Wire) -> None:
    """The hub process runs, existing connections answer, new ones work."""
    assert hub.process.poll() is None, hub.log()
    for other in others:
        await other.heartbeat("alive")
    fresh = await open_wire(hub, hub.token(sub="fresh", orgs=[new_org()]))
    await fresh.heartbeat("fresh")
    await fresh.close()


@pytest.fixture
def hub(hub_server: HubProcess) -> Iterator[HubProcess]:
    """The session hub; fails the test if it logged a traceback meanwhile."""
    start = len(hub_server.log())
    yield hub_server
    new = hub_server.log()[start:]
    assert "Traceback" not in new, new


@pytest.fixture
async def bystander(hub: HubProcess) -> AsyncIterator[Wire]:
    """A joined connection that must keep working whatever a test does."""
    org = new_org()
    wire = await open_wire(hub, hub.token(sub="bystander", orgs=[org]))
    await wire.join(f"realtime:org:{org}", "1")
    yield wire
    await wire.close()


# -- handshake -------------------------------------------------------------------


async def denial(target: str) -> tuple[int, Any]:
    with pytest.raises(InvalidStatus) as info:
        await asyncio.wait_for(connect(target, open_timeout=T), T)
    response = info.value.response
    return response.status_code, json.loads(response.body)


async def test_handshake_without_apikey_is_401(hub: HubProcess) -> None:
    status, body = await denial(url(hub, None))
    assert status == 401
    assert isinstance(body, dict) and list(body) == ["error"] and body["error"]


async def test_handshake_with_bad_token_is_401(hub: HubProcess) -> None:
    status, body = await denial(url(hub, "not-a-jwt"))
    assert (status, body) == (401, {"error": "The token provided is not a valid JWT"})
    # Signed with another secret.
    from hub.auth.tokens import issue_token

    forged = issue_token("x" * 40, sub="u1", orgs=["acme"])
    status, body = await denial(url(hub, forged))
    assert (status, body) == (401, {"error": "Failed to validate JWT signature"})


async def test_handshake_with_expired_token_is_401(hub: HubProcess) -> None:
    status, body = await denial(url(hub, hub.token(orgs=["acme"], ttl=-30)))
    assert status == 401
    assert body["error"].startswith("Token has expired")


async def test_handshake_with_unknown_vsn_is_400(hub: HubProcess) -> None:
    status, body = await denial(url(hub, hub.token(orgs=["acme"]), "3.0.0"))
    assert status == 400
    assert list(body) == ["error"] and body["error"]


async def test_tokens_are_not_logged(hub: HubProcess) -> None:
    token = hub.token(sub="secret-holder", orgs=[new_org()])
    wire = await open_wire(hub, token)
    await wire.heartbeat()
    await wire.close()
    await denial(url(hub, token, "9.9.9"))
    signature = token.rsplit(".", 1)[1]
    assert signature not in hub.log()


async def test_missing_vsn_means_vsn1(hub: HubProcess) -> None:
    wire = await open_wire(hub, hub.token(orgs=["acme"]), None)
    await wire.heartbeat("1")
    await wire.close()


# -- heartbeat, join, leave ------------------------------------------------------


@pytest.mark.parametrize("vsn", [V1, V2])
async def test_heartbeat_reply(hub: HubProcess, vsn: str) -> None:
    wire = await open_wire(hub, hub.token(orgs=["acme"]), vsn)
    # Python sends heartbeats with join_ref null; the reply never has one.
    await wire.push("phoenix", "heartbeat", {}, ref="7", join_ref=None)
    raw = await wire.recv_raw()
    assert isinstance(raw, str)
    if vsn == V1:
        assert json.loads(raw) == {
            "topic": "phoenix",
            "event": "phx_reply",
            "payload": {"status": "ok", "response": {}},
            "ref": "7",
        }
    else:
        assert json.loads(raw) == [
            None,
            "7",
            "phoenix",
            "phx_reply",
            {"status": "ok", "response": {}},
        ]
    # A Python heartbeat with ref null is answered with ref null.
    await wire.push("phoenix", "heartbeat", {}, ref=None)
    assert await wire.recv() == wire.reply("phoenix", None, None)
    await wire.close()


@pytest.mark.parametrize("vsn", [V1, V2])
async def test_join_reply_shape_with_postgres_changes(hub: HubProcess, vsn: str) -> None:
    org = new_org()
    topic = f"realtime:org:{org}"
    wire = await open_wire(hub, hub.token(orgs=[org]), vsn)
    bindings = [
        {"event": "INSERT", "schema": "public", "table": "messages", "filter": "org_id=eq.5"},
        {"event": "*", "schema": "public", "table": "events"},
        {"event": "DELETE", "schema": "audit", "table": "log"},
    ]
    config = {
        "broadcast": {"self": False, "ack": False},
        "presence": {"key": "", "enabled": True},
        "postgres_changes": bindings,
        "private": False,
    }
    await wire.push(topic, "phx_join", {"config": config}, ref="3", join_ref="3")
    reply = await wire.recv()
    head = (
        reply
        if vsn == V1
        else dict(zip(["join_ref", "ref", "topic", "event"], reply, strict=False))
    )
    assert head["topic"] == topic and head["event"] == "phx_reply"
    assert head["ref"] == "3" and head["join_ref"] == "3"
    payload = reply["payload"] if vsn == V1 else reply[4]
    assert payload["status"] == "ok"
    echoed = payload["response"]["postgres_changes"]
    assert len(echoed) == len(bindings)
    for sent, got in zip(bindings, echoed, strict=True):
        ident = got.pop("id")
        assert isinstance(ident, int) and not isinstance(ident, bool) and ident != 0
        assert got == sent  # same keys in the same order: no added "filter"
        assert list(got) == list(sent)
    assert list(payload["response"]) == ["postgres_changes"]
    # Then presence_state, carrying the join_ref, then the postgres system push.
    assert await wire.recv() == wire.expect(topic, "presence_state", {}, None, "3")
    system = {
        "channel": f"org:{org}",
        "extension": "postgres_changes",
        "message": "Subscribed to PostgreSQL",
        "status": "ok",
    }
    assert await wire.recv() == wire.expect(topic, "system", system, None, "3")
    await wire.heartbeat()
    await wire.close()


async def test_join_without_bindings_sends_no_system(hub: HubProcess) -> None:
    org = new_org()
    topic = f"realtime:org:{org}"
    wire = await open_wire(hub, hub.token(orgs=[org]))
    await wire.join(topic, "1")
    await wire.heartbeat()  # the next frame is the heartbeat reply, no system push
    await wire.close()


async def test_join_falls_back_to_apikey_and_accepts_access_token(hub: HubProcess) -> None:
    org, other = new_org(), new_org()
    wire = await open_wire(hub, hub.token(orgs=[org]), V2)
    await wire.join(f"realtime:org:{org}", "1")  # no access_token: the apikey
    # The channel's own token decides: it may name an org the apikey lacks.
    await wire.join(f"realtime:org:{other}", "2", access_token=hub.token(orgs=[other]))
    await wire.close()


@pytest.mark.parametrize("vsn", [V1, V2])
async def test_leave_replies_then_closes(hub: HubProcess, vsn: str) -> None:
    org = new_org()
    topic = f"realtime:org:{org}"
    wire = await open_wire(hub, hub.token(orgs=[org]), vsn)
    await wire.join(topic, "1")
    await wire.push(topic, "phx_leave", {}, ref="2", join_ref="1")
    assert await wire.recv() == wire.reply(topic, "2", "1")
    assert await wire.recv() == wire.expect(topic, "phx_close", {}, "1", "1")
    # The channel is gone: a broadcast to it is now an unmatched topic.
    body = {"type": "broadcast", "event": "e", "payload": {}}
    await wire.push(topic, "broadcast", body, ref="3", join_ref="1")
    expected = wire.reply(topic, "3", "1", {"reason": "unmatched topic"}, status="error")
    assert await wire.recv() == expected
    await wire.close()


async def test_second_join_closes_the_first(hub: HubProcess) -> None:
    org = new_org()
    topic = f"realtime:org:{org}"
    wire = await open_wire(hub, hub.token(orgs=[org]), V2)
    await wire.join(topic, "1")
    await wire.push(topic, "phx_join", {"config": {}}, ref="5", join_ref="5")
    assert await wire.recv() == wire.expect(topic, "phx_close", {}, "1", "1")
    assert await wire.recv() == wire.reply(topic, "5", "5", {"postgres_changes": []})
    assert await wire.recv() == wire.expect(topic, "presence_state", {}, None, "5")
    await wire.close()


async def test_presence_over_the_wire(hub: HubProcess) -> None:
    org = new_org()
    topic = f"realtime:org:{org}"
    token = hub.token(orgs=[org])
    a = await open_wire(hub, token, V1)
    b = await open_wire(hub, token, V2)
    await a.join(topic, "1", {"presence": {"key": "alice"}})
    await a.push(topic, "presence", {"event": "track", "payload": {"n": 1}}, ref="2", join_ref="1")
    assert await a.recv() == a.reply(topic, "2", "1")
    diff = await a.recv()
    assert diff["event"] == "presence_diff" and diff["ref"] is None
    metas = diff["payload"]["joins"]["alice"]["metas"]
    assert diff["payload"]["leaves"] == {} and len(metas) == 1
    assert metas[0]["n"] == 1 and isinstance(metas[0]["phx_ref"], str)

    def state_has_alice(frame: Any) -> None:
        assert frame[:4] == ["1", None, topic, "presence_state"]
        assert frame[4] == {"alice": {"metas": metas}}

    await b.join(topic, "1", {"presence": {"key": "bob"}}, presence=state_has_alice)
    await a.close()  # leaving the socket untracks alice
    leave = await b.recv()
    assert leave[:4] == [None, None, topic, "presence_diff"]
    assert leave[4] == {"joins": {}, "leaves": {"alice": {"metas": metas}}}
    await b.close()


# -- broadcast across serializers -------------------------------------------------


async def test_binary_broadcast_reaches_vsn1_as_json(hub: HubProcess) -> None:
    org = new_org()
    topic = f"realtime:org:{org}"
    token = hub.token(orgs=[org])
    v1 = await open_wire(hub, token, V1)
    v2 = await open_wire(hub, token, V2)
    await v1.join(topic, "1")
    await v2.join(topic, "6", {"broadcast": {"self": False, "ack": True}})
    frame = encode_kind3("6", "10", topic, "client_ping", b'{"hello":"world"}')
    assert frame[:7].hex() == f"030102{len(topic):02x}0b0001"
    await v2.send(frame)
    assert await v2.recv() == v2.reply(topic, "10", "6")  # ack
    assert await v1.recv() == {
        "topic": topic,
        "event": "broadcast",
        "payload": {"type": "broadcast", "event": "client_ping", "payload": {"hello": "world"}},
        "ref": None,
    }
    await v2.nothing()  # self: false
    await v1.close()
    await v2.close()


async def test_vsn1_broadcast_reaches_vsn2_as_kind4(hub: HubProcess) -> None:
    org = new_org()
    topic = f"realtime:org:{org}"
    token = hub.token(orgs=[org])
    v1 = await open_wire(hub, token, V1)
    v2 = await open_wire(hub, token, V2)
    await v1.join(topic, "1", {"broadcast": {"self": True, "ack": False}})
    await v2.join(topic, "1")
    body = {"type": "broadcast", "event": "ev", "payload": {"n": 1, "s": "é"}}
    await v1.push(topic, "broadcast", body, ref="2", join_ref="1")
    data = await v2.recv()
    assert isinstance(data, bytes)
    assert data[:5] == bytes([4, len(topic), 2, 0, 1])
    got_topic, event, meta, enc, payload = split_kind4(data)
    assert (got_topic, event, meta, enc) == (topic, "ev", b"", 1)
    assert json.loads(payload) == {"n": 1, "s": "é"}
    # self: true echoes to the sender, as JSON; ack: false means no reply.
    assert await v1.recv() == {
        "topic": topic,
        "event": "broadcast",
        "payload": body,
        "ref": None,
    }
    await v1.nothing()
    await v1.close()
    await v2.close()


async def test_raw_binary_payload_reaches_vsn2_only(hub: HubProcess) -> None:
    org = new_org()
    topic = f"realtime:org:{org}"
    token = hub.token(orgs=[org])
    v1 = await open_wire(hub, token, V1)
    v2 = await open_wire(hub, token, V2)
    sender = await open_wire(hub, token, V2)
    await v1.join(topic, "1")
    await v2.join(topic, "1")
    await sender.join(topic, "1", {"broadcast": {"ack": True}})
    raw = bytes(range(256)) + b"\x00\xff"
    await sender.send(encode_kind3("1", "2", topic, "blob", raw, enc=0))
    assert await sender.recv() == sender.reply(topic, "2", "1")
    got_topic, event, meta, enc, payload = split_kind4(await v2.recv())
    assert (got_topic, event, meta, enc, payload) == (topic, "blob", b"", 0, raw)
    # vsn 1 has no form for it: the next frame v1 sees is the JSON one after.
    await sender.send(encode_kind3("1", "3", topic, "after", b'{"k":1}'))
    assert await sender.recv() == sender.reply(topic, "3", "1")
    frame = await v1.recv()
    assert frame["payload"] == {"type": "broadcast", "event": "after", "payload": {"k": 1}}
    assert split_kind4(await v2.recv())[1] == "after"
    for wire in (v1, v2, sender):
        await wire.close()


async def test_ack_only_when_asked(hub: HubProcess) -> None:
    org = new_org()
    topic = f"realtime:org:{org}"
    wire = await open_wire(hub, hub.token(orgs=[org]))
    await wire.join(topic, "1", {"broadcast": {"ack": False}})
    body = {"type": "broadcast", "event": "e", "payload": {}}
    await wire.push(topic, "broadcast", body, ref="2", join_ref="1")
    await wire.heartbeat("3")  # no ack came before the heartbeat reply
    await wire.close()


# -- bad input: close codes ------------------------------------------------------


@pytest.mark.parametrize(
    ("vsn", "frame"),
    [
        pytest.param(V1, "{not json", id="v1-malformed-json"),
        pytest.param(V2, '["1", "1", "t", "e"', id="v2-malformed-json"),
        pytest.param(V1, "", id="v1-empty"),
        pytest.param(V1, '["1", "1", "realtime:org:a", "phx_join", {}]', id="v1-array-frame"),
        pytest.param(V1, '"just a string"', id="v1-string-frame"),
        pytest.param(
            V2,
            '{"topic": "phoenix", "event": "heartbeat", "payload": {}, "ref": "1"}',
            id="v2-object-frame",
        ),
        pytest.param(V2, '[null, "1", "phoenix", "heartbeat"]', id="v2-four-elements"),
        pytest.param(
            V1,
            '{"topic": "phoenix", "event": "heartbeat", "payload": {}, "ref": 5}',
            id="v1-int-ref",
        ),
        pytest.param(V2, '[null, 5, "phoenix", "heartbeat", {}]', id="v2-int-ref"),
        pytest.param(
            V1,
            '{"topic": "phoenix", "event": "heartbeat", "payload": {}, "ref": ["1"]}',
            id="v1-list-ref",
        ),
        pytest.param(
            V1,
            '{"topic": "realtime:org:a", "event": "phx_join", "payload": {},'
            ' "ref": "1", "join_ref": 1}',
            id="v1-int-join-ref",
        ),
        pytest.param(V2, '[null, "1", 42, "heartbeat", {}]', id="v2-int-topic"),
        pytest.param(V1, '{"topic": "phoenix", "payload": {}, "ref": "1"}', id="v1-no-event"),
        pytest.param(V1, "[" * 5000 + "]" * 5000, id="v1-deep-nesting"),
    ],
)
async def test_bad_text_frame_closes_1007(
    hub: HubProcess, bystander: Wire, vsn: str, frame: str
) -> None:
    wire = await open_wire(hub, hub.token(orgs=["acme"]), vsn)
    await wire.send(frame)
    await expect_close(wire, 1007)
    await check_alive(hub, bystander)


@pytest.mark.parametrize(
    "frame",
    [
        # topic length says 200, the frame is far shorter
        pytest.param(bytes([3, 1, 1, 200, 1, 0, 1]) + b"11realtime:org:ae{}", id="lying-length"),
        pytest.param(bytes([3, 1, 1, 255, 255, 255, 1]) + b"11", id="lengths-past-end"),
        pytest.param(bytes([3, 1, 1]), id="short-header"),
        pytest.param(b"", id="empty"),
        pytest.param(bytes([9, 0, 0, 0, 0, 0, 1]) + b"{}", id="kind-9"),
        pytest.param(bytes([0, 0, 0, 0, 0, 0, 1]) + b"{}", id="kind-0-push"),
        pytest.param(bytes([4, 1, 1, 0, 1]) + b"te{}", id="kind-4-server-only"),
        pytest.param(bytes([255]) * 16, id="kind-255"),
        pytest.param(
            encode_kind3("1", "2", "realtime:org:a", "e", b"{not json"), id="enc-json-bad"
        ),
        pytest.param(encode_kind3("1", "2", "realtime:org:a", "e", b"{}", enc=7), id="unknown-enc"),
        pytest.param(bytes([3, 1, 1, 2, 1, 0, 1]) + b"12\xff\xfee{}", id="non-utf8-topic"),
    ],
)
async def test_bad_binary_frame_closes_1007(hub: HubProcess, bystander: Wire, frame: bytes) -> None:
    org = new_org()
    wire = await open_wire(hub, hub.token(orgs=[org]), V2)
    await wire.join(f"realtime:org:{org}", "1")
    await wire.send(frame)
    await expect_close(wire, 1007)
    await check_alive(hub, bystander)


async def test_binary_frame_on_vsn1_closes_1007(hub: HubProcess, bystander: Wire) -> None:
    org = new_org()
    topic = f"realtime:org:{org}"
    wire = await open_wire(hub, hub.token(orgs=[org]), V1)
    await wire.join(topic, "1")
    await wire.send(encode_kind3("1", "2", topic, "e", b"{}"))
    await expect_close(wire, 1007)
    await check_alive(hub, bystander)


async def test_oversized_frame_closes_1009(make_hub: Any) -> None:
    hub = make_hub({"HUB_MAX_FRAME_BYTES": "65536", "HUB_MAX_PAYLOAD_BYTES": "32768"})
    org = new_org()
    topic = f"realtime:org:{org}"
    token = hub.token(orgs=[org])
    other = await open_wire(hub, token)
    await other.join(topic, "1")
    # Under the frame limit but over the payload limit: refused, socket kept.
    wire = await open_wire(hub, token, max_size=None)
    await wire.join(topic, "1", {"broadcast": {"ack": True}})
    body = {"type": "broadcast", "event": "big", "payload": {"x": "a" * 40_000}}
    await wire.push(topic, "broadcast", body, ref="2", join_ref="1")
    reply = await wire.recv()
    assert reply["event"] == "phx_reply" and reply["ref"] == "2"
    assert reply["payload"]["status"] == "error"
    assert reply["payload"]["response"]["reason"].startswith("PayloadTooLarge")
    await other.nothing()
    # Over the frame limit: the WebSocket layer closes with 1009.
    body = {"type": "broadcast", "event": "big", "payload": {"x": "a" * 70_000}}
    await wire.push(topic, "broadcast", body, ref="3", join_ref="1")
    await expect_close(wire, 1009)
    await other.nothing()
    await check_alive(hub, other)
    assert "Traceback" not in hub.log()


# -- bad input: error replies ------------------------------------------------------


@pytest.mark.parametrize("vsn", [V1, V2])
async def test_unknown_event_on_joined_topic(hub: HubProcess, bystander: Wire, vsn: str) -> None:
    org = new_org()
    topic = f"realtime:org:{org}"
    wire = await open_wire(hub, hub.token(orgs=[org]), vsn)
    await wire.join(topic, "1")
    await wire.push(topic, "frobnicate", {}, ref="2", join_ref="1")
    reply = await wire.recv()
    reason = (reply["payload"] if vsn == V1 else reply[4])["response"]["reason"]
    assert "unknown event" in reason
    assert reply == wire.reply(topic, "2", "1", {"reason": reason}, status="error")
    # An unknown event on the phoenix topic is refused the same way.
    await wire.push("phoenix", "frobnicate", {}, ref="3")
    reply = await wire.recv()
    reason = (reply["payload"] if vsn == V1 else reply[4])["response"]["reason"]
    assert reply == wire.reply("phoenix", "3", None, {"reason": reason}, status="error")
    await wire.heartbeat()
    await check_alive(hub, bystander)
    await wire.close()


@pytest.mark.parametrize("vsn", [V1, V2])
async def test_frame_for_topic_not_joined(hub: HubProcess, bystander: Wire, vsn: str) -> None:
    org = new_org()
    topic = f"realtime:org:{org}"
    wire = await open_wire(hub, hub.token(orgs=[org]), vsn)
    unmatched = {"reason": "unmatched topic"}
    body = {"type": "broadcast", "event": "e", "payload": {}}
    await wire.push(topic, "broadcast", body, ref="2", join_ref="1")
    assert await wire.recv() == wire.reply(topic, "2", "1", unmatched, status="error")
    await wire.push(topic, "phx_leave", {}, ref="3")
    assert await wire.recv() == wire.reply(topic, "3", None, unmatched, status="error")
    # Joined, but with a stale join_ref.
    await wire.join(topic, "4")
    await wire.push(topic, "broadcast", body, ref="5", join_ref="1")
    assert await wire.recv() == wire.reply(topic, "5", "1", unmatched, status="error")
    if vsn == V2:
        await wire.send(encode_kind3("1", "6", topic, "e", b"{}"))
        assert await wire.recv() == wire.reply(topic, "6", "1", unmatched, status="error")
        other = f"realtime:org:{new_org()}"
        await wire.send(encode_kind3("4", "7", other, "e", b"{}"))
        assert await wire.recv() == wire.reply(other, "7", "4", unmatched, status="error")
    await wire.heartbeat()
    await check_alive(hub, bystander)
    await wire.close()


BAD_TOPICS = [
    pytest.param("org:acme", id="no-realtime-prefix"),
    pytest.param("mother", id="mother-no-prefix"),
    pytest.param("foo", id="foo-no-prefix"),
    pytest.param("realtime:mother", id="mother"),
    pytest.param("realtime:mother:acme", id="mother-sub"),
    pytest.param("realtime:user:", id="user-empty"),
    pytest.param("realtime:org:ACME", id="case-variant-upper"),
    pytest.param("realtime:org:Acme", id="case-variant-title"),
    pytest.param("realtime:org:acme ", id="trailing-space"),
    pytest.param("realtime:org: acme", id="leading-space"),
    pytest.param("realtime:org:acme\n", id="trailing-newline"),
    pytest.param("realtime:org:\u0430cme", id="cyrillic-a"),
    pytest.param("realtime:org:acm\u0435", id="cyrillic-e"),
    pytest.param("realtime:org:\uff41cme", id="fullwidth-a"),
    pytest.param("realtime:org:acme\u200b", id="zero-width-space"),
    pytest.param("realtime:org:*", id="org-star"),
    pytest.param("realtime:org:acme*", id="org-suffix-star"),
    pytest.param("realtime:org:%", id="org-percent"),
    pytest.param("realtime:org:", id="org-empty"),
    pytest.param("realtime:org:acme:", id="org-empty-name"),
    pytest.param("realtime:org:acme:*", id="org-name-star"),
    pytest.param("realtime:org:acme:a:b", id="org-too-deep"),
    pytest.param("realtime:org:acme2", id="other-org-prefix-match"),
    pytest.param("realtime:org:acm", id="other-org-prefix"),
    pytest.param("realtime:user:someone-else", id="other-user"),
    pytest.param("realtime:user:*", id="user-star"),
    pytest.param("Realtime:org:acme", id="upper-prefix"),
]


@pytest.mark.parametrize("vsn", [V1, V2])
async def test_refused_joins_are_unauthorized(hub: HubProcess, bystander: Wire, vsn: str) -> None:
    wire = await open_wire(hub, hub.token(sub="me", orgs=["acme"]), vsn)
    for i, param in enumerate(BAD_TOPICS):
        topic = param.values[0]
        ref = str(10 + i)
        await wire.push(topic, "phx_join", {"config": {}}, ref=ref, join_ref=ref)
        reply = await wire.recv()
        payload = reply["payload"] if vsn == V1 else reply[4]
        assert payload["status"] == "error", (topic, reply)
        reason = payload["response"]["reason"]
        assert reason.startswith("Unauthorized:"), (topic, reason)
        assert reply == wire.reply(topic, ref, ref, {"reason": reason}, status="error")
        if i % 10 == 9:
            await asyncio.sleep(1.1)  # stay clear of the join rate limit
    # Refusals are not remembered, and the socket keeps working.
    await wire.join("realtime:org:acme", "100")
    await wire.join("realtime:org:acme:room-1.x", "101")
    await wire.join("realtime:user:me", "102")
    await wire.heartbeat()
    await check_alive(hub, bystander)
    await wire.close()


#: Free names: ordinary Supabase channels, each its own channel; the
#: look-alikes of reserved names among them reach nothing of the org.
FREE_NAMES = ["realtime:foo", "realtime:ORG:acme", "realtime:org\uff1aacme", "realtime:room:lobby"]


@pytest.mark.parametrize("vsn", [V1, V2])
async def test_free_names_are_channels_of_their_own(
    hub: HubProcess, bystander: Wire, vsn: str
) -> None:
    org = new_org()
    member = await open_wire(hub, hub.token(sub="m", orgs=[org]), vsn)
    await member.join(f"realtime:org:{org}", "1")
    wire = await open_wire(hub, hub.token(sub="me", orgs=[]), vsn)
    for i, topic in enumerate([*FREE_NAMES, f"realtime:ORG:{org}"]):
        await wire.join(topic, str(10 + i))
        await wire.push(
            topic,
            "broadcast",
            {"type": "broadcast", "event": "x", "payload": {}},
            ref=None,
            join_ref=str(10 + i),
        )
    await wire.push("realtime:", "phx_join", {"config": {}}, ref="99", join_ref="99")
    assert await wire.recv() == wire.reply(
        "realtime:",
        "99",
        "99",
        {"reason": "TopicNameRequired: You must provide a topic name"},
        status="error",
    )
    # Nothing of it reached the org: the member's next frame is its heartbeat reply.
    await member.heartbeat()
    await check_alive(hub, bystander)
    await wire.close()
    await member.close()


async def test_case_variant_org_member_cannot_join_lowercase(hub: HubProcess) -> None:
    wire = await open_wire(hub, hub.token(orgs=["ACME"]))
    await wire.push("realtime:org:acme", "phx_join", {"config": {}}, ref="1", join_ref="1")
    reply = await wire.recv()
    assert reply["payload"]["status"] == "error"
    assert reply["payload"]["response"]["reason"].startswith("Unauthorized:")
    await wire.join("realtime:org:ACME", "2")
    await wire.close()


async def test_join_flood_is_rate_limited(hub: HubProcess, bystander: Wire) -> None:
    org = new_org()
    wire = await open_wire(hub, hub.token(orgs=[org]), V2)
    n = 60
    for i in range(n):
        topic = f"realtime:org:{org}:c{i}"
        await wire.push(topic, "phx_join", {"config": {}}, ref=f"r{i}", join_ref=f"r{i}")
    replies: dict[str, str] = {}
    while len(replies) < n:
        frame = await wire.recv()
        if frame[3] == "phx_reply":
            payload = frame[4]
            replies[frame[1]] = "ok" if payload["status"] == "ok" else payload["response"]["reason"]
        else:
            assert frame[3] == "presence_state"
    ok = [ref for ref, r in replies.items() if r == "ok"]
    limited = [r for r in replies.values() if r != "ok"]
    assert len(ok) >= 20, len(ok)  # the burst is honoured
    assert limited and all(r.startswith("ClientJoinRateLimitReached") for r in limited)
    await wire.heartbeat()
    await check_alive(hub, bystander)
    await wire.close()


async def test_too_many_channels(make_hub: Any) -> None:
    hub = make_hub({"HUB_MAX_CHANNELS": "3"})
    org = new_org()
    wire = await open_wire(hub, hub.token(orgs=[org]))
    for i in range(3):
        await wire.join(f"realtime:org:{org}:c{i}", str(i))
    topic = f"realtime:org:{org}:c3"
    await wire.push(topic, "phx_join", {"config": {}}, ref="9", join_ref="9")
    reply = await wire.recv()
    assert reply["payload"]["status"] == "error"
    assert reply["payload"]["response"]["reason"].startswith("ChannelRateLimitReached")
    # Re-joining a joined topic replaces it and does not count twice.
    first = f"realtime:org:{org}:c0"
    await wire.push(first, "phx_join", {"config": {}}, ref="10", join_ref="10")
    assert await wire.recv() == wire.expect(first, "phx_close", {}, "0", "0")
    assert await wire.recv() == wire.reply(first, "10", "10", {"postgres_changes": []})
    assert (await wire.recv())["event"] == "presence_state"
    # Leaving frees a slot.
    await wire.push(first, "phx_leave", {}, ref="11", join_ref="10")
    assert await wire.recv() == wire.reply(first, "11", "10")
    assert await wire.recv() == wire.expect(first, "phx_close", {}, "10", "10")
    await wire.join(topic, "12")
    await check_alive(hub)
    await wire.close()
    assert "Traceback" not in hub.log()


# -- slow consumers and idle sockets ------------------------------------------------


def _split_frame(buf: bytes) -> tuple[int, bytes, bytes] | None:
    """Split one unmasked server frame off ``buf``: (opcode, payload, rest)."""
    if len(buf) < 2:
        return None
    opcode, n, pos = buf[0] & 0x0F, buf[1] & 0x7F, 2
    if n == 126:
        n, pos = int.from_bytes(buf[2:4], "big"), 4
    elif n == 127:
        n, pos = int.from_bytes(buf[2:10], "big"), 10
    if len(buf) < pos + n:
        return None
    return opcode, buf[pos : pos + n], buf[pos + n :]


class RawSocket:
    """A WebSocket client written by hand on a non-blocking socket, with a
    tiny receive buffer, that can simply stop reading."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.loop = asyncio.get_running_loop()
        self.buf = b""

    @classmethod
    async def open(cls, hub: HubProcess, path: str) -> RawSocket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        _RAW.append(sock)
        raw = cls(sock)
        await asyncio.wait_for(raw.loop.sock_connect(sock, ("127.0.0.1", hub.port)), T)
        key = base64.b64encode(os.urandom(16)).decode()
        request = (
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{hub.port}\r\n"
            "Upgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        await raw.loop.sock_sendall(sock, request.encode())
        while b"\r\n\r\n" not in raw.buf:
            chunk = await asyncio.wait_for(raw.loop.sock_recv(sock, 4096), T)
            assert chunk, "closed during the handshake"
            raw.buf += chunk
        head, _, raw.buf = raw.buf.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101"), head
        return raw

    async def send_text(self, text: str) -> None:
        await self.loop.sock_sendall(self.sock, client_frame(1, text.encode()))

    async def recv_json(self) -> Any:
        while (split := _split_frame(self.buf)) is None:
            chunk = await asyncio.wait_for(self.loop.sock_recv(self.sock, 65536), T)
            assert chunk, "closed"
            self.buf += chunk
        opcode, payload, self.buf = split
        assert opcode == 1, (opcode, payload[:80])
        return json.loads(payload)

    async def read_until_closed(self, within: float) -> int:
        """Drain the socket until EOF or reset; returns the bytes read."""
        total = 0

        async def drain() -> None:
            nonlocal total
            while True:
                try:
                    chunk = await self.loop.sock_recv(self.sock, 1 << 16)
                except (ConnectionResetError, BrokenPipeError):
                    return
                if not chunk:
                    return
                total += len(chunk)

        await asyncio.wait_for(drain(), within)
        return total

    def close(self) -> None:
        self.sock.close()


async def publish_numbered(hub: HubProcess, org: str, event: str, count: int, blob: str) -> None:
    """``count`` broadcasts to ``org:<org>``, one REST request each, payload
    ``{"i": n, "b": blob}``."""
    admin = {"Authorization": f"Bearer {hub.admin_token()}"}
    async with httpx.AsyncClient(base_url=hub.http_url, timeout=T) as http:
        for i in range(count):
            message = {"topic": f"org:{org}", "event": event, "payload": {"i": i, "b": blob}}
            response = await http.post(
                "/realtime/v1/api/broadcast", json={"messages": [message]}, headers=admin
            )
            assert response.status_code == 202, response.text


@pytest.mark.parametrize("native", ["true", "false"], ids=["compiled-writes", "python-writes"])
async def test_slow_consumer_is_cut_and_others_get_everything(make_hub: Any, native: str) -> None:
    # Both write paths: the compiled loop's partial sends hand the rest to
    # the transport, where the bound applies as on the Python path.
    hub = make_hub(
        {
            "HUB_NATIVE_WRITES": native,
            "HUB_MAX_OUTBOX_BYTES": "1048576",
            "HUB_MAX_FRAME_BYTES": "262144",
            "HUB_MAX_PAYLOAD_BYTES": "131072",
        }
    )
    org = new_org()
    topic = f"realtime:org:{org}"
    token = hub.token(orgs=[org])

    slow = await RawSocket.open(hub, f"/realtime/v1/websocket?apikey={token}&vsn=1.0.0")
    await slow.send_text(encode(V1, "1", "1", topic, "phx_join", {}))
    reply = await slow.recv_json()
    assert reply["event"] == "phx_reply" and reply["payload"]["status"] == "ok"
    # From here on the slow socket never reads (until the very end).

    fast = await open_wire(hub, token, V2, max_size=None)
    await fast.join(topic, "1")
    count, blob = 120, "x" * 100_000
    received: list[int] = []

    async def consume() -> None:
        while len(received) < count:
            _, event, _, _, payload = split_kind4(await fast.recv(within=20))
            assert event == "big"
            received.append(json.loads(payload)["i"])

    consumer = asyncio.create_task(consume())
    try:
        await publish_numbered(hub, org, "big", count, blob)
        await asyncio.wait_for(consumer, 30)
    finally:
        consumer.cancel()
    assert received == list(range(count))

    # The hub gave up on the slow socket: reading it now ends in EOF or a
    # reset, after far less than everything that was published.
    published = count * len(blob)
    got = await slow.read_until_closed(10)
    assert got < published // 2, got
    await fast.heartbeat()
    await check_alive(hub, fast)
    await fast.close()
    assert "Traceback" not in hub.log()


@pytest.mark.parametrize("native", ["true", "false"], ids=["compiled-writes", "python-writes"])
async def test_a_slow_reader_gets_every_frame_whole_and_in_order(
    make_hub: Any, native: str
) -> None:
    """A reader slower than the publisher: the kernel's buffer fills, the
    transport queues the rest, and frames keep coming meanwhile.  The
    compiled loop writes to the socket itself only while the transport
    holds nothing (a direct write would cut into queued bytes: the stream
    would no longer parse)."""
    hub = make_hub({"HUB_NATIVE_WRITES": native, "HUB_MAX_OUTBOX_BYTES": str(64 << 20)})
    org = new_org()
    topic = f"realtime:org:{org}"
    token = hub.token(orgs=[org])
    reader = await RawSocket.open(hub, f"/realtime/v1/websocket?apikey={token}&vsn=1.0.0")
    await reader.send_text(encode(V1, "1", "1", topic, "phx_join", {}))
    assert (await reader.recv_json())["payload"]["status"] == "ok"

    count, blob = 150, "y" * 40_000
    got: list[int] = []

    async def read_slowly() -> None:
        while len(got) < count:
            message = await reader.recv_json()
            if message["event"] == "presence_state":
                continue
            assert message["event"] == "broadcast", message
            got.append(message["payload"]["payload"]["i"])
            await asyncio.sleep(0.004)

    reading = asyncio.create_task(read_slowly())
    try:
        await publish_numbered(hub, org, "m", count, blob)
        await asyncio.wait_for(reading, 60)
    finally:
        reading.cancel()
    assert got == list(range(count))
    assert "Traceback" not in hub.log()


async def test_one_rest_request_within_limits_does_not_cut_a_reader(hub: HubProcess) -> None:
    """A reader that keeps up is not a slow consumer.  One REST request within
    the documented limits (100 messages of up to HUB_MAX_PAYLOAD_BYTES) must
    either reach it in full or be refused; it must not get a 202 and then
    disconnect every subscriber of the topic with 4001."""
    org = new_org()
    topic = f"realtime:org:{org}"
    reader = await open_wire(hub, hub.token(orgs=[org]), V2, max_size=None)
    await reader.join(topic, "1")
    count, blob = 20, "x" * 250_000  # 5 MB; the default payload limit is 256 KiB each
    messages = [
        {"topic": f"org:{org}", "event": "big", "payload": {"i": i, "b": blob}}
        for i in range(count)
    ]
    async with httpx.AsyncClient(base_url=hub.http_url, timeout=T) as http:
        response = await http.post(
            "/realtime/v1/api/broadcast",
            json={"messages": messages},
            headers={"Authorization": f"Bearer {hub.admin_token()}"},
        )
    if response.status_code == 202:
        received = []
        try:
            while len(received) < count:
                _, _, _, _, payload = split_kind4(await reader.recv())
                received.append(json.loads(payload)["i"])
        except Disconnected:
            close = (reader.client.close_code, reader.client.close_reason)
            raise AssertionError(
                f"202, then the reader was closed ({close}) after {len(received)} of {count}"
            ) from None
        assert received == list(range(count))
    else:
        assert 400 <= response.status_code < 500, response.status_code
    await reader.heartbeat()


async def test_idle_socket_is_closed_4000(make_hub: Any) -> None:
    hub = make_hub({"HUB_IDLE_TIMEOUT": "2"})
    org = new_org()
    token = hub.token(orgs=[org])
    idle = await open_wire(hub, token)
    lively = await open_wire(hub, token, V2)
    start = time.monotonic()

    async def keep_beating() -> None:
        for i in range(10):
            await lively.heartbeat(str(i))
            await asyncio.sleep(0.5)

    beating = asyncio.create_task(keep_beating())
    await expect_close(idle, 4000, within=6)
    elapsed = time.monotonic() - start
    assert 1.5 <= elapsed <= 4.5, elapsed
    assert idle.client.close_code is not None
    await asyncio.wait_for(beating, 10)  # 5 s of heartbeats: never closed
    await check_alive(hub, lively)
    await lively.close()
    assert "Traceback" not in hub.log()
