"""End-to-end: a real `hub serve` and the real, unmodified Supabase clients.

supabase-js (vsn 2.0.0: broadcasts go out as binary kind-3 frames) runs
under node through ``tests/support/js/driver.mjs`` (see
``tests/support/jsclient.py``), which records
every WebSocket frame; the Python ``realtime`` client (vsn 1.0.0) runs in
the test's own event loop, concurrently with the node process.

Each test uses its own org id, so tests sharing the session's hub never see
each other's messages.  "Nothing was received" is checked with a sentinel
wherever one fits: a later message on the same path that *is* received, so
the test does not have to sleep and hope.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm
from realtime import AsyncRealtimeClient
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import InvalidStatus

from tests.support.hubs import HubProcess, start_hub, stop_hub
from tests.support.jsclient import (
    JsClientUnavailable,
    JsDriver,
    install_js_client,
    kind3_refs,
    package_version,
)
from tests.support.policies import ALICE, BOB

pytestmark = pytest.mark.e2e

StartDriver = Callable[..., Awaitable[JsDriver]]

#: The client's own time limit for joins, acks and pushes (ms), kept short
#: so that a missing reply fails a test in seconds, not in 10 s.
CLIENT_TIMEOUT_MS = 5000


@pytest.fixture(scope="session")
def js_scripts() -> Path:
    """supabase-js and ws installed under .cache/js.  Fails, never skips,
    when node or npm are missing."""
    try:
        scripts = install_js_client()
    except JsClientUnavailable as exc:
        pytest.fail(str(exc))
    major = int(package_version("@supabase/supabase-js").split(".")[0])
    assert major == 2, "these tests speak to supabase-js 2.x"
    return scripts


@pytest.fixture
async def node(js_scripts: Path) -> AsyncIterator[StartDriver]:
    """Start node drivers; all are stopped after the test."""
    drivers: list[JsDriver] = []

    async def start(name: str = "js") -> JsDriver:
        driver = await JsDriver.start(js_scripts, name)
        drivers.append(driver)
        return driver

    yield start
    for driver in drivers:
        await driver.close()
    for driver in drivers:
        broken = driver.select(ev="uncaught") + driver.select(ev="garbage")
        assert not broken, f"the driver reported errors:\n{driver.describe()}"


def new_org() -> str:
    return "e2e" + uuid.uuid4().hex[:12]


async def rest_broadcast(
    hub: HubProcess, token: str, topic: str, event: str, payload: dict[str, Any]
) -> httpx.Response:
    async with httpx.AsyncClient(timeout=10) as http:
        return await http.post(
            f"{hub.http_url}/realtime/v1/api/broadcast",
            headers={"Authorization": f"Bearer {token}"},
            json={"messages": [{"topic": topic, "event": event, "payload": payload}]},
        )


def text_frames(js: JsDriver, client: str, direction: str) -> list[list[Any]]:
    """The vsn 2.0.0 text frames ``[join_ref, ref, topic, event, payload]``."""
    return [json.loads(f["text"]) for f in js.frames(client, direction) if not f["binary"]]


def replies_to(js: JsDriver, client: str, ref: str) -> list[list[Any]]:
    return [f for f in text_frames(js, client, "in") if f[3] == "phx_reply" and f[1] == ref]


def broadcasts(js: JsDriver, client: str, event: str | None = None) -> list[dict[str, Any]]:
    return [
        e for e in js.select(ev="broadcast", client=client) if event is None or e["event"] == event
    ]


async def wait_until(condition: Callable[[], bool], within: float, what: Callable[[], str]) -> None:
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what()}"
        await asyncio.sleep(0.02)


def socket_opens(js: JsDriver, client: str) -> int:
    return len(js.select(ev="socket_open", client=client))


async def refused_at_handshake(
    js: JsDriver, hub: HubProcess, client: str, token: str, topic: str, what: str
) -> None:
    """supabase-js client ``client`` with ``token`` opens a channel: the
    hub answers its handshake with 401 and no socket opens."""
    await js.client(client, hub.http_url, token, timeout=CLIENT_TIMEOUT_MS)
    await js.command("channel", client=client, chan="c", topic=topic, config={})
    await js.wait_for(
        lambda e: e["ev"] == "socket_error" and e["client"] == client and "401" in e["message"],
        10,
        what,
    )
    assert socket_opens(js, client) == 0


# -- 1. broadcast between two supabase-js clients -------------------------------


async def test_broadcast_between_two_js_clients(hub_server: HubProcess, node: StartDriver) -> None:
    org = new_org()
    topic = f"org:{org}"
    js = await node()
    opts = {"timeout": CLIENT_TIMEOUT_MS}
    await js.client("a", hub_server.http_url, hub_server.token(sub="alice", orgs=[org]), **opts)
    await js.client("b", hub_server.http_url, hub_server.token(sub="bob", orgs=[org]), **opts)
    await js.subscribe("a", "c", topic, {"broadcast": {"self": True, "ack": True}})
    await js.subscribe("b", "c", topic)  # self: false, ack: false (the defaults)

    # A sends with ack: the promise resolves to 'ok' only on the hub's reply.
    sent = js.mark()
    result = await js.command("send", client="a", chan="c", event="from_a", payload={"n": 1})
    assert result == "ok", js.describe()
    out = js.frames("a", "out", since=sent)
    assert [f["kind"] for f in out if f["binary"]] == [3], "supabase-js sends kind 3"
    assert not [f for f in out if not f["binary"]], "no text broadcast frame expected"
    join_ref, ref, wire_topic, event = kind3_refs(out[0]["hex"])
    assert (wire_topic, event) == (f"realtime:{topic}", "from_a")
    ack = replies_to(js, "a", ref)
    assert len(ack) == 1 and ack[0][0] == join_ref, ack
    assert ack[0][4]["status"] == "ok"

    # B gets event and payload, as a binary kind-4 frame.
    got = await js.wait_event(ev="broadcast", client="b", event="from_a")
    assert got["payload"] == {"n": 1}
    assert any(f["binary"] and f["kind"] == 4 for f in js.frames("b", "in", since=sent))
    # self: true -> A gets its own message too.
    own = await js.wait_event(ev="broadcast", client="a", event="from_a")
    assert own["payload"] == {"n": 1}

    # B sends without ack: A gets it, B (self: false) does not, and the hub
    # does not reply to an un-acked broadcast.
    sent = js.mark()
    result = await js.command("send", client="b", chan="c", event="from_b", payload={"n": 2})
    assert result == "ok"
    got = await js.wait_event(ev="broadcast", client="a", event="from_b", since=sent)
    assert got["payload"] == {"n": 2}
    b_out = [f for f in js.frames("b", "out", since=sent) if f["binary"]]
    assert [f["kind"] for f in b_out] == [3]
    b_ref = kind3_refs(b_out[0]["hex"])[1]
    # Sentinel: once B has A's next message, B would have had its own.
    await js.command("send", client="a", chan="c", event="sentinel", payload={})
    await js.wait_event(ev="broadcast", client="b", event="sentinel", since=sent)
    assert broadcasts(js, "b", "from_b") == [], "self: false must not echo to the sender"
    assert replies_to(js, "b", b_ref) == [], "no phx_reply without ack"
    assert socket_opens(js, "a") == socket_opens(js, "b") == 1


# -- 2. supabase-js (vsn 2, binary) <-> Python realtime (vsn 1, text) ------------


@pytest.mark.parametrize("kind", ["org", "free"])
async def test_broadcast_between_supabase_js_and_python_realtime(
    hub_server: HubProcess, node: StartDriver, kind: str
) -> None:
    """On an org topic, and on a public free name, where the Python client
    holds an ``anon`` token (any valid token may use a public channel)."""
    org = new_org()
    topic = f"org:{org}" if kind == "org" else f"room:{org}"
    loop = asyncio.get_running_loop()

    py = AsyncRealtimeClient(
        f"{hub_server.http_url.replace('http', 'ws')}/realtime/v1",
        hub_server.token(sub="py-user", orgs=[org])
        if kind == "org"
        else hub_server.token(sub=None, role="anon"),
    )
    py_received: list[dict[str, Any]] = []
    py_subscribed: asyncio.Future[str] = loop.create_future()

    def on_status(status: Any, err: Exception | None) -> None:
        if not py_subscribed.done():
            py_subscribed.set_result(f"{status} {err}")

    def on_broadcast(message: Any) -> None:
        py_received.append(dict(message))

    await asyncio.wait_for(py.connect(), 10)
    try:
        channel = py.channel(topic, {"config": {"broadcast": {"self": False, "ack": True}}})
        channel.on_broadcast("*", on_broadcast)
        await asyncio.wait_for(channel.subscribe(on_status), 10)
        status = await asyncio.wait_for(py_subscribed, 10)
        assert "SUBSCRIBED" in status, status

        js = await node()
        await js.client(
            "a",
            hub_server.http_url,
            hub_server.token(sub="js-user", orgs=[org]),
            timeout=CLIENT_TIMEOUT_MS,
        )
        await js.subscribe("a", "c", topic)
        await js.client(
            "b",
            hub_server.http_url,
            hub_server.token(sub="js-user-2", orgs=[org]),
            timeout=CLIENT_TIMEOUT_MS,
        )
        await js.subscribe("b", "c", topic)

        # Python -> JS: text frame in, reaches the vsn 2 subscriber.
        await asyncio.wait_for(channel.send_broadcast("from_py", {"text": "héllo", "n": 1}), 10)
        got = await js.wait_event(ev="broadcast", client="a", event="from_py")
        assert got["payload"] == {"text": "héllo", "n": 1}

        # JS -> Python: binary kind 3 in, a vsn 1 text broadcast out.
        sent = js.mark()
        result = await js.command(
            "send", client="a", chan="c", event="from_js", payload={"list": [1, 2], "n": 2}
        )
        assert result == "ok"
        assert [f["kind"] for f in js.frames("a", "out", since=sent) if f["binary"]] == [3]
        await wait_until(
            lambda: any(m.get("event") == "from_js" for m in py_received),
            10,
            lambda: f"python to receive from_js; it got {py_received}\n{js.describe()}",
        )
        [message] = [m for m in py_received if m.get("event") == "from_js"]
        assert message["payload"] == {"list": [1, 2], "n": 2}
        # Python's own message was not echoed to it (self: false).
        assert not [m for m in py_received if m.get("event") == "from_py"]

        # A raw (ArrayBuffer) payload: kind 3 with encoding 0, delivered to
        # the other vsn 2 client as bytes, dropped for the vsn 1 client.
        sent = js.mark()
        raw = {"$bytes": "00ff10fe"}
        assert await js.command("send", client="a", chan="c", event="raw", payload=raw) == "ok"
        [frame] = [f for f in js.frames("a", "out", since=sent) if f["binary"]]
        assert frame["kind"] == 3 and frame["hex"][12:14] == "00", frame
        got = await js.wait_event(ev="broadcast", client="b", event="raw", since=sent)
        assert got["payload"] == raw
        await js.command("send", client="a", chan="c", event="sentinel", payload={})
        await wait_until(
            lambda: any(m.get("event") == "sentinel" for m in py_received),
            10,
            lambda: f"python to receive the sentinel; it got {py_received}",
        )
        assert not [m for m in py_received if m.get("event") == "raw"], py_received
    finally:
        await asyncio.wait_for(py.close(), 10)


# -- 3. presence ---------------------------------------------------------------


def synced_keys(js: JsDriver, client: str, since: int = 0) -> list[list[str]]:
    return [e["keys"] for e in js.select(since, ev="presence_sync", client=client)]


@pytest.mark.parametrize("kind", ["org", "free"])
async def test_presence_between_two_js_clients(
    hub_server: HubProcess, node: StartDriver, kind: str
) -> None:
    """On an org topic, and on a public free name (an ordinary Supabase
    channel, joined with a token of no org)."""
    org = new_org()
    topic = f"org:{org}" if kind == "org" else f"room:lobby:{org}"
    js = await node()
    for client, key in (("a", "alice"), ("b", "bob")):
        token = hub_server.token(sub=key, orgs=[org] if kind == "org" else [])
        await js.client(client, hub_server.http_url, token, timeout=CLIENT_TIMEOUT_MS)
        await js.subscribe(client, "c", topic, {"presence": {"key": key}}, presence=True)

    assert await js.command("track", client="a", chan="c", payload={"name": "Alice"}) == "ok"
    assert await js.command("track", client="b", chan="c", payload={"name": "Bob"}) == "ok"
    both = ["alice", "bob"]
    for client in ("a", "b"):
        await js.wait_for(
            lambda e, c=client: (
                e["ev"] == "presence_sync" and e["client"] == c and e["keys"] == both
            ),
            10,
            f"{client} to see both presences",
        )
    state = await js.command("presence_state", client="b", chan="c")
    [alice] = state["alice"]
    assert alice["name"] == "Alice" and alice["presence_ref"], state

    # A untracks: B sees alice leave.
    since = js.mark()
    assert await js.command("untrack", client="a", chan="c") == "ok"
    left = await js.wait_event(ev="presence_leave", client="b", key="alice", since=since)
    assert left["presences"][0]["name"] == "Alice"
    await js.wait_for(
        lambda e: e["ev"] == "presence_sync" and e["client"] == "b" and e["keys"] == ["bob"],
        10,
        "b's presence to lose alice",
        since,
    )

    # A tracks again (B sees the join), then B's socket goes away: A sees bob leave.
    since = js.mark()
    assert await js.command("track", client="a", chan="c", payload={"name": "Alice 2"}) == "ok"
    joined = await js.wait_event(ev="presence_join", client="b", key="alice", since=since)
    assert joined["presences"][0]["name"] == "Alice 2"
    since = js.mark()
    await js.command("disconnect", client="b")
    await js.wait_event(ev="presence_leave", client="a", key="bob", since=since)
    await js.wait_for(
        lambda e: e["ev"] == "presence_sync" and e["client"] == "a" and e["keys"] == ["alice"],
        10,
        "a's presence to lose bob",
        since,
    )


# -- 4. REST broadcast ---------------------------------------------------------


async def test_rest_broadcast_reaches_js_subscriber(
    hub_server: HubProcess, node: StartDriver
) -> None:
    org, other_org = new_org(), new_org()
    topic = f"org:{org}"
    js = await node()
    token = hub_server.token(sub="sub-user", orgs=[org])
    await js.client("a", hub_server.http_url, token, timeout=CLIENT_TIMEOUT_MS)
    await js.subscribe("a", "c", topic)

    admin = await rest_broadcast(hub_server, hub_server.admin_token(), topic, "e", {"by": "admin"})
    assert admin.status_code == 202, admin.text
    got = await js.wait_event(ev="broadcast", client="a", event="e")
    assert got["payload"] == {"by": "admin"}

    member = hub_server.token(sub="member", orgs=[org])
    response = await rest_broadcast(hub_server, member, topic, "e2", {"by": "member"})
    assert response.status_code == 202, response.text
    got = await js.wait_event(ev="broadcast", client="a", event="e2")
    assert got["payload"] == {"by": "member"}

    stranger = hub_server.token(sub="stranger", orgs=[other_org])
    refused = await rest_broadcast(hub_server, stranger, topic, "intruder", {"by": "stranger"})
    assert refused.status_code == 403, refused.text
    unauthenticated = await rest_broadcast(hub_server, "not-a-jwt", topic, "intruder", {})
    assert unauthenticated.status_code == 401, unauthenticated.text

    sentinel = await rest_broadcast(hub_server, member, topic, "sentinel", {})
    assert sentinel.status_code == 202
    await js.wait_event(ev="broadcast", client="a", event="sentinel")
    assert broadcasts(js, "a", "intruder") == []


# -- 5. a refused join ---------------------------------------------------------


async def test_refused_join_keeps_socket_and_other_channels(
    hub_server: HubProcess, node: StartDriver
) -> None:
    mine, theirs = new_org(), new_org()
    js = await node()
    token = hub_server.token(sub="member-a", orgs=[mine])
    await js.client("a", hub_server.http_url, token, timeout=CLIENT_TIMEOUT_MS)

    status = await js.subscribe("a", "bad", f"org:{theirs}", expect="CHANNEL_ERROR")
    assert status["error"].startswith("Unauthorized:"), status
    assert theirs in status["error"]

    await js.subscribe("a", "good", f"org:{mine}")
    response = await rest_broadcast(hub_server, hub_server.admin_token(), f"org:{mine}", "e", {})
    assert response.status_code == 202
    await js.wait_event(ev="broadcast", client="a", chan="good", event="e")
    # One socket all along: the refusal did not close it.
    assert socket_opens(js, "a") == 1
    assert js.select(ev="socket_close", client="a") == []
    assert js.select(ev="broadcast", chan="bad") == []


# -- 6. token expiry -----------------------------------------------------------


async def test_channel_ends_when_token_expires(hub_server: HubProcess, node: StartDriver) -> None:
    org = new_org()
    topic = f"org:{org}"
    js = await node()
    ttl = 3
    short = hub_server.token(sub="short-lived", orgs=[org], ttl=ttl)
    exp = jwt.decode(short, options={"verify_signature": False})["exp"]
    await js.client("x", hub_server.http_url, short, timeout=CLIENT_TIMEOUT_MS)
    await js.client(
        "ctl", hub_server.http_url, hub_server.token(sub="ctl", orgs=[org]), timeout=5000
    )
    await js.subscribe("x", "c", topic)
    await js.subscribe("ctl", "c", topic)

    # Still alive before expiry.
    response = await rest_broadcast(hub_server, hub_server.admin_token(), topic, "before", {})
    assert response.status_code == 202
    await js.wait_event(ev="broadcast", client="x", event="before")

    # The hub ends the channel within a few seconds after expiry.
    ended = await js.wait_for(
        lambda e: (
            e["ev"] == "status"
            and e["client"] == "x"
            and e["status"] in ("CLOSED", "CHANNEL_ERROR")
        ),
        ttl + 6,
        "the hub to end the channel of the expired token",
    )
    assert exp <= ended["wall"] <= exp + 4, f"ended at {ended['wall']}, token exp {exp}"
    closes = [f for f in text_frames(js, "x", "in") if f[3] == "phx_close"]
    assert closes and closes[0][2] == f"realtime:{topic}", text_frames(js, "x", "in")
    systems = [f[4] for f in text_frames(js, "x", "in") if f[3] == "system"]
    assert systems and systems[0]["status"] == "error"
    assert "expired" in systems[0]["message"], systems

    # Published after expiry: the control client gets it, x does not.
    since = js.mark()
    response = await rest_broadcast(hub_server, hub_server.admin_token(), topic, "after", {})
    assert response.status_code == 202
    await js.wait_event(ev="broadcast", client="ctl", event="after", since=since)
    await asyncio.sleep(0.5)
    assert broadcasts(js, "x", "after") == []
    assert not [f for f in js.frames("x", "in", since=since) if f["binary"]]


async def test_expired_token_is_refused_at_handshake(
    hub_server: HubProcess, node: StartDriver
) -> None:
    org = new_org()
    expired = hub_server.token(sub="late", orgs=[org], ttl=-30)

    # What the hub answers, seen from a plain WebSocket client.
    with pytest.raises(InvalidStatus) as refused:
        async with ws_connect(f"{hub_server.ws_url}?apikey={expired}&vsn=2.0.0"):
            pass
    assert refused.value.response.status_code == 401
    assert b"expired" in refused.value.response.body

    js = await node()
    await refused_at_handshake(
        js, hub_server, "x", expired, f"org:{org}", "the handshake to be refused with 401"
    )
    # supabase-js retries after 1 s; it must not get in then either.
    await asyncio.sleep(2)
    assert socket_opens(js, "x") == 0
    assert js.select(ev="status", client="x", status="SUBSCRIBED") == []


async def test_anon_apikey_with_access_token_callback(
    hub_server: HubProcess, node: StartDriver
) -> None:
    """The usual browser setup: the anon key as apikey, the user's token
    from supabase-js's accessToken callback.  The anon key alone may not
    join the org topic; the user's token may."""
    org = new_org()
    topic = f"org:{org}"
    anon = hub_server.token(sub=None, role="anon")
    user = hub_server.token(sub="cb-user", orgs=[org])
    js = await node()
    await js.client("a", hub_server.http_url, anon, accessToken=user, timeout=CLIENT_TIMEOUT_MS)
    await js.command("channel", client="a", chan="c", topic=topic, config={})
    # A first join without the user's token may be refused and retried.
    await js.wait_event(within=15, ev="status", client="a", chan="c", status="SUBSCRIBED")
    response = await rest_broadcast(hub_server, hub_server.admin_token(), topic, "e", {"x": 1})
    assert response.status_code == 202
    got = await js.wait_event(ev="broadcast", client="a", event="e")
    assert got["payload"] == {"x": 1}
    assert socket_opens(js, "a") == 1


async def test_set_auth_swaps_the_token_in_place(hub_server: HubProcess, node: StartDriver) -> None:
    org = new_org()
    topic = f"org:{org}"
    js = await node()
    short = hub_server.token(sub="swapper", orgs=[org], ttl=3)
    exp = jwt.decode(short, options={"verify_signature": False})["exp"]
    await js.client("a", hub_server.http_url, short, timeout=CLIENT_TIMEOUT_MS)
    await js.subscribe("a", "c", topic)

    # A fresh token before expiry (access_token push): the channel lives on.
    since = js.mark()
    await js.command("set_auth", client="a", token=hub_server.token(sub="swapper", orgs=[org]))
    pushed = [f for f in text_frames(js, "a", "out") if f[3] == "access_token"]
    assert pushed, js.describe()
    await asyncio.sleep(max(0.0, exp - time.time()) + 2.0)
    response = await rest_broadcast(hub_server, hub_server.admin_token(), topic, "later", {})
    assert response.status_code == 202
    await js.wait_event(ev="broadcast", client="a", event="later", since=since)
    assert js.select(ev="status", client="a", status="CLOSED") == []

    # A token without the membership: the hub ends the channel.
    since = js.mark()
    await js.command("set_auth", client="a", token=hub_server.token(sub="swapper", orgs=[]))
    system = await js.wait_event(ev="system", client="a", chan="c", since=since)
    assert system["payload"]["status"] == "error"
    assert "no longer have permission" in system["payload"]["message"], system
    await js.wait_event(ev="status", client="a", chan="c", status="CLOSED", since=since)


# -- 7. ES256 tokens from a JWKS -----------------------------------------------


class _JwksHandler(BaseHTTPRequestHandler):
    document: bytes = b"{}"

    @classmethod
    def publish(cls, keys: dict[str, ec.EllipticCurvePrivateKey]) -> None:
        """Serve these public keys (kid -> key) from now on."""
        jwks = []
        for kid, key in keys.items():
            jwk = ECAlgorithm.to_jwk(key.public_key(), as_dict=True)
            jwk.update({"kid": kid, "alg": "ES256", "use": "sig"})
            jwks.append(jwk)
        cls.document = json.dumps({"keys": jwks}).encode()

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(self.document)))
        self.end_headers()
        self.wfile.write(self.document)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextlib.contextmanager
def jwks_on_http(
    keys: dict[str, ec.EllipticCurvePrivateKey],
) -> Iterator[tuple[str, type[_JwksHandler]]]:
    """An auth server's JWKS endpoint on a free port; ``publish`` rotates."""
    handler = type("Handler", (_JwksHandler,), {})
    handler.publish(keys)
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/jwks.json", handler
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.fixture
def jwks_server() -> Iterator[tuple[str, ec.EllipticCurvePrivateKey]]:
    """A JWKS with one ES256 key, kid k1, served over HTTP on a free port."""
    key = ec.generate_private_key(ec.SECP256R1())
    with jwks_on_http({"k1": key}) as (url, _):
        yield url, key


def es256_token(
    key: ec.EllipticCurvePrivateKey, org: str, sub: str, ttl: int = 600, kid: str = "k1"
) -> str:
    now = int(time.time())
    claims = {
        "sub": sub,
        "role": "authenticated",
        "aud": "authenticated",
        "iat": now,
        "exp": now + ttl,
        "app_metadata": {"orgs": [org]},
    }
    return jwt.encode(claims, key, algorithm="ES256", headers={"kid": kid})


async def test_es256_tokens_from_jwks(
    make_hub: Callable[..., HubProcess],
    node: StartDriver,
    jwks_server: tuple[str, ec.EllipticCurvePrivateKey],
) -> None:
    url, key = jwks_server
    hub = make_hub({"HUB_JWKS_URL": url})
    org = new_org()
    topic = f"org:{org}"
    token = es256_token(key, org, "es-user")
    forged = es256_token(ec.generate_private_key(ec.SECP256R1()), org, "forger")

    js = await node()
    await js.client("a", hub.http_url, token, timeout=CLIENT_TIMEOUT_MS)
    await js.subscribe("a", "c", topic, {"broadcast": {"self": True, "ack": True}})
    assert await js.command("send", client="a", chan="c", event="es", payload={"k": 1}) == "ok"
    got = await js.wait_event(ev="broadcast", client="a", event="es")
    assert got["payload"] == {"k": 1}
    response = await rest_broadcast(hub, token, topic, "rest", {"k": 2})
    assert response.status_code == 202, response.text
    got = await js.wait_event(ev="broadcast", client="a", event="rest")
    assert got["payload"] == {"k": 2}

    # Same kid, another key: refused at the handshake and over REST.
    assert (await rest_broadcast(hub, forged, topic, "forged", {})).status_code == 401
    await refused_at_handshake(
        js, hub, "f", forged, topic, "the forged token to be refused with 401"
    )
    assert js.select(ev="status", client="f", status="SUBSCRIBED") == []
    assert broadcasts(js, "a", "forged") == []


async def test_a_key_rotated_in_after_start_is_fetched_during_the_handshake(
    make_hub: Callable[..., HubProcess], node: StartDriver
) -> None:
    """The auth server publishes a new key after the hub started: the first
    handshake naming it waits for the JWKS refresh and is accepted.  A key
    nobody published is refused with 401, and neither case logs an error
    (the ASGI route used to log "returned without completing handshake"
    after its refusal)."""
    old, new = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    with jwks_on_http({"k1": old}) as (url, jwks):
        hub = make_hub({"HUB_JWKS_URL": url, "HUB_JWKS_MIN_REFRESH": "0.1"})
        jwks.publish({"k1": old, "k2": new})
        org = new_org()
        topic = f"org:{org}"
        js = await node()
        await js.client("a", hub.http_url, es256_token(new, org, "rotated", kid="k2"))
        await js.subscribe("a", "c", topic, {"broadcast": {"self": True, "ack": True}})
        assert await js.command("send", client="a", chan="c", event="r", payload={"k": 1}) == "ok"
        got = await js.wait_event(ev="broadcast", client="a", event="r")
        assert got["payload"] == {"k": 1}

        await asyncio.sleep(0.2)  # past the refresh bound: the next one may fetch
        unknown = es256_token(ec.generate_private_key(ec.SECP256R1()), org, "nobody", kid="k9")
        await refused_at_handshake(
            js, hub, "u", unknown, topic, "the unknown key to be refused with 401"
        )
    log = hub.log()
    assert "without completing handshake" not in log, log
    assert "Traceback" not in log, log


# -- private channels with the app's policies (Realtime Authorization) ----------------


async def test_private_channels_with_supabase_policies_js_and_python(
    policies_dsn: str, tmp_path: Path, node: StartDriver
) -> None:
    """An app's private channel, unchanged: supabase-js (vsn 2) and
    realtime-py (vsn 1) join ``room:a`` with ``private: true``; the policies
    let every signed-in user read, members of the room (an app table) send.
    Alice (a member) reaches Bob; Bob's broadcast is dropped; a user no
    policy lets read is refused."""
    hub = start_hub(tmp_path, {"HUB_DATABASE_URL": policies_dsn})
    py = AsyncRealtimeClient(
        f"{hub.http_url.replace('http', 'ws')}/realtime/v1", hub.token(sub=BOB, orgs=[])
    )
    try:
        js = await node()
        await js.client(
            "alice", hub.http_url, hub.token(sub=ALICE, orgs=[]), timeout=CLIENT_TIMEOUT_MS
        )
        await js.subscribe("alice", "c", "room:a", {"private": True, "broadcast": {"self": False}})
        got: list[dict[str, Any]] = []
        await asyncio.wait_for(py.connect(), 10)
        channel = py.channel("room:a", {"config": {"private": True}})
        channel.on_broadcast("*", lambda m: got.append(dict(m)))
        subscribed: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        await asyncio.wait_for(
            channel.subscribe(
                lambda status, err: subscribed.done() or subscribed.set_result(str(status))
            ),
            10,
        )
        assert "SUBSCRIBED" in await asyncio.wait_for(subscribed, 10)

        assert (
            await js.command("send", client="alice", chan="c", event="hi", payload={"n": 1}) == "ok"
        )
        await wait_until(lambda: any(m.get("event") == "hi" for m in got), 10, lambda: str(got))
        await asyncio.wait_for(channel.send_broadcast("from_bob", {"n": 2}), 10)
        await js.command("send", client="alice", chan="c", event="sentinel", payload={})
        await wait_until(
            lambda: any(m.get("event") == "sentinel" for m in got), 10, lambda: str(got)
        )
        await asyncio.sleep(0.3)
        assert not broadcasts(js, "alice", "from_bob")

        # httpSend on the private channel (POST ...?private=true) is
        # authorized by the write policy and reaches the private channel only.
        assert (
            await js.command(
                "http_send", client="alice", chan="c", event="via_http", payload={"h": 1}
            )
            == "ok"
        )
        await wait_until(
            lambda: any(m.get("event") == "via_http" for m in got), 10, lambda: str(got)
        )

        # A public channel of the same name, self and ack on: it hears itself,
        # never the private channel, and realtime.send reaches each side.
        await js.client(
            "pub", hub.http_url, hub.token(sub=None, role="anon"), timeout=CLIENT_TIMEOUT_MS
        )
        await js.subscribe("pub", "c", "room:a", {"broadcast": {"self": True, "ack": True}})
        assert await js.command("send", client="pub", chan="c", event="mine", payload={}) == "ok"
        await js.wait_event(ev="broadcast", client="pub", event="mine")
        conn = await asyncpg.connect(policies_dsn)
        try:
            await conn.execute(
                "select realtime.send('{\"s\": 1}'::jsonb, 'from_sql', 'room:a', true)"
            )
            await conn.execute(
                "select realtime.send('{\"s\": 2}'::jsonb, 'from_sql', 'room:a', false)"
            )
        finally:
            await conn.close()
        private_copy = await js.wait_event(ev="broadcast", client="alice", event="from_sql")
        public_copy = await js.wait_event(ev="broadcast", client="pub", event="from_sql")
        assert (private_copy["payload"]["s"], public_copy["payload"]["s"]) == (1, 2)
        await wait_until(
            lambda: any(m.get("event") == "from_sql" for m in got), 10, lambda: str(got)
        )
        await asyncio.sleep(0.3)
        assert not broadcasts(js, "pub", "hi") and not broadcasts(js, "pub", "via_http")
        assert [m["payload"]["s"] for m in got if m.get("event") == "from_sql"] == [1]

        # No policy lets anyone read `other`: supabase-js sees the refusal.
        await js.client(
            "carol", hub.http_url, hub.token(sub=BOB, orgs=[]), timeout=CLIENT_TIMEOUT_MS
        )
        status = await js.subscribe("carol", "c", "other", {"private": True}, expect=None)
        assert status["status"] == "CHANNEL_ERROR", status
    finally:
        await asyncio.wait_for(py.close(), 10)
        stop_hub(hub)
    assert "Traceback" not in hub.log(), hub.log()
