"""Hostile-input tests: tokens, topics and REST.

Every test runs inside an :class:`Arena`: a *victim* org with a subscriber
joined to ``org:<victim>`` and ``org:<victim>:inbox`` and a publisher that
keeps broadcasting a victim marker on both, plus one durable victim event in
the store.  Attackers are members of another org.  When a test ends the arena
checks, whatever the test did, that

* the victim subscriber received its own traffic (the channels were live),
* nothing carrying the attacker's marker reached any victim connection, and
* nothing carrying the victim's marker reached any attacker connection or
  any HTTP response an attacker got.

Shared by the three modules of tests/security.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from hub.client.realtime import AsyncClient, Disconnected, Message, join_payload, socket_url
from tests.support.hubs import HubProcess

#: Every single wait in the suite.
T = 5.0
V1 = "1.0.0"
V2 = "2.0.0"


def new_id(prefix: str) -> str:
    return prefix + uuid.uuid4().hex[:10]


# -- tokens -------------------------------------------------------------------------


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forge(header: dict[str, Any], claims: dict[str, Any], signature: bytes = b"") -> str:
    """A JWT with exactly this header and these claims and the given raw
    signature bytes (PyJWT refuses to build most hostile tokens)."""
    head = b64url(json.dumps(header).encode())
    body = b64url(json.dumps(claims).encode())
    return f"{head}.{body}.{b64url(signature)}"


def hs256(header: dict[str, Any], claims: dict[str, Any], key: bytes) -> str:
    """Sign with HMAC-SHA256 and ``key``, whatever the key looks like (PyJWT
    refuses PEM-looking HMAC keys, which is exactly what an attacker uses)."""
    head = b64url(json.dumps(header).encode())
    body = b64url(json.dumps(claims).encode())
    mac = hmac.new(key, f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{b64url(mac)}"


def claims_for(
    orgs: Any = None, *, sub: str = "mallory", role: str = "authenticated", ttl: float = 3600
) -> dict[str, Any]:
    now = int(time.time())
    claims: dict[str, Any] = {
        "sub": sub,
        "role": role,
        "aud": "authenticated",
        "iat": now,
        "exp": now + int(ttl),
    }
    if orgs is not None:
        claims["app_metadata"] = {"orgs": orgs}
    return claims


# -- a raw connection that records everything -----------------------------------------


class Conn:
    """A raw client (:class:`hub.client.realtime.AsyncClient`) that records
    every frame it receives, for the marker searches."""

    def __init__(self, client: AsyncClient, label: str) -> None:
        self.client = client
        self.vsn = client.vsn
        self.label = label
        #: What this connection's payloads carry (the arena sets the attacker's).
        self.marker = "ATTACKER"
        self.raw: list[str | bytes] = []
        client.on_message = self._record

    @classmethod
    async def open(cls, hub: HubProcess, token: str, vsn: str = V1, label: str = "") -> Conn:
        client = await AsyncClient.connect(
            hub.ws_url, token, vsn, ref_prefix=label, within=T, max_size=None
        )
        return cls(client, label)

    @property
    def messages(self) -> list[Message]:
        return self.client.messages

    def _record(self, msg: Message) -> None:
        self.raw.append(msg.raw)
        if msg.binary and isinstance(msg.payload["payload"], bytes):
            # Raw payloads as hex, so that every payload dumps as JSON.
            msg.payload["payload"] = msg.payload["payload"].hex()

    def text(self) -> str:
        """Everything received, as one string, for marker searches."""
        return "\n".join(
            item if isinstance(item, str) else item.decode(errors="replace") for item in self.raw
        )

    async def send(
        self, topic: str, event: str, payload: Any, ref: str | None, join_ref: str | None
    ) -> None:
        await self.client.push(topic, event, payload, ref=ref, join_ref=join_ref)

    async def request(
        self, topic: str, event: str, payload: Any, join_ref: str | None = None, ref: str = ""
    ) -> dict[str, Any]:
        """Send and return the reply's payload ``{"status", "response"}``."""
        ref = ref or self.client.next_ref()
        sent = self.client.message(topic, event, payload, ref=ref, join_ref=join_ref)
        reply = await self.client.call(sent)
        assert isinstance(reply.payload, dict), reply
        return reply.payload

    async def join(
        self, topic: str, config: dict[str, Any] | None = None, access_token: str | None = None
    ) -> tuple[str, dict[str, Any]]:
        """Join; returns (join_ref, reply payload)."""
        ref = self.client.next_ref()
        payload = join_payload(config or {"broadcast": {"self": False}}, access_token)
        return ref, await self.request(topic, "phx_join", payload, join_ref=ref, ref=ref)

    async def heartbeat(self) -> None:
        reply = await self.request("phoenix", "heartbeat", {})
        assert reply == {"status": "ok", "response": {}}, reply

    async def broadcast(self, topic: str, join_ref: str | None, payload: Any) -> None:
        await self.client.broadcast(topic, "msg", payload, join_ref=join_ref)

    async def wait_for(self, predicate: Any, within: float = T) -> Message:
        """The first message (already received or coming) matching ``predicate``."""
        try:
            return await self.client.wait_for(predicate, within=within)
        except (TimeoutError, Disconnected):
            messages = self.messages
            raise AssertionError(f"{self.label}: no matching message in {messages!r}") from None

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.client.close()


async def handshake_status(hub: HubProcess, token: str, vsn: str = V1) -> int:
    """The HTTP status of a refused handshake; fails if it was accepted."""
    try:
        ws = await asyncio.wait_for(connect(socket_url(hub.ws_url, token, vsn), open_timeout=T), T)
    except InvalidStatus as exc:
        return int(exc.response.status_code)
    await ws.close()
    raise AssertionError("the handshake was accepted")


# -- the arena ----------------------------------------------------------------------------


@dataclass
class Arena:
    """A victim org under observation, and the attackers of one test."""

    hub: HubProcess
    #: Extra claims every token of the arena carries (e.g. ``aud``).
    extra: dict[str, Any] = field(default_factory=dict)
    victim_org: str = field(default_factory=lambda: new_id("v"))
    attacker_org: str = field(default_factory=lambda: new_id("a"))
    victim_sub: str = field(default_factory=lambda: new_id("victim-"))
    mark: str = field(default_factory=lambda: secrets.token_hex(6))
    attackers: list[Conn] = field(default_factory=list)
    responses: list[httpx.Response] = field(default_factory=list)

    @property
    def victim_marker(self) -> str:
        return f"VICTIM-{self.mark}"

    @property
    def attacker_marker(self) -> str:
        return f"ATTACKER-{self.mark}"

    @property
    def victim_topics(self) -> tuple[str, str]:
        return f"realtime:org:{self.victim_org}", f"realtime:org:{self.victim_org}:inbox"

    def token(self, orgs: Any = None, *, sub: str = "mallory", **claims: Any) -> str:
        role = claims.pop("role", "authenticated")
        ttl = claims.pop("ttl", 3600)
        return self.hub.token(sub=sub, orgs=orgs, role=role, ttl=ttl, **{**self.extra, **claims})

    def victim_token(self, **claims: Any) -> str:
        return self.token([self.victim_org], sub=self.victim_sub, **claims)

    def attacker_token(self, **claims: Any) -> str:
        return self.token([self.attacker_org], **claims)

    def admin_token(self, **claims: Any) -> str:
        return self.token(sub="admin", role="service_role", **claims)

    async def start(self) -> None:
        token = self.victim_token()
        self.victim = await Conn.open(self.hub, token, V2, "victim")
        self.publisher = await Conn.open(self.hub, token, V1, "vpub")
        self.publish_refs: list[str] = []
        for topic in self.victim_topics:
            _, reply = await self.victim.join(topic)
            assert reply["status"] == "ok", reply
            join_ref, reply = await self.publisher.join(topic)
            assert reply["status"] == "ok", reply
            self.publish_refs.append(join_ref)
        async with httpx.AsyncClient(base_url=self.hub.http_url, timeout=T) as http:
            response = await http.post(
                f"/api/orgs/{self.victim_org}/events",
                json={"type": "secret", "payload": {"m": self.victim_marker}},
                headers={"Authorization": f"Bearer {token}"},
            )
            assert response.status_code == 201, response.text
        self._stopping = False
        self._publishing = asyncio.create_task(self._publish())
        # The victim hears its own traffic before any attack starts.
        await self.victim.wait_for(lambda m: self.victim_marker in json.dumps(m.payload))

    async def _publish(self) -> None:
        # Stopped by a flag, not by cancel(): Python 3.11's wait_for can
        # swallow a cancellation that lands while its inner send completes.
        n = 0
        while not self._stopping:
            for topic, join_ref in zip(self.victim_topics, self.publish_refs, strict=True):
                n += 1
                await self.publisher.broadcast(topic, join_ref, {"m": self.victim_marker, "n": n})
            await asyncio.sleep(0.05)

    async def stop_publishing(self) -> None:
        self._stopping = True
        await asyncio.wait_for(self._publishing, T)

    async def attacker(self, token: str | None = None, vsn: str = V1) -> Conn:
        conn = await Conn.open(
            self.hub, token or self.attacker_token(), vsn, f"atk{len(self.attackers)}-"
        )
        conn.marker = self.attacker_marker
        self.attackers.append(conn)
        return conn

    async def http(
        self,
        method: str,
        path: str,
        *,
        token: str | None = None,
        headers: dict[str, str] | None = None,
        **kwargs: Any,
    ) -> httpx.Response:
        """An attacker's HTTP request; the response is checked for victim data."""
        all_headers = dict(headers or {})
        if token is not None:
            all_headers["Authorization"] = f"Bearer {token}"
        async with httpx.AsyncClient(
            base_url=self.hub.http_url, timeout=T, follow_redirects=True
        ) as http:
            response = await http.request(method, path, headers=all_headers, **kwargs)
        self.responses.append(response)
        return response

    async def victim_history(self) -> list[dict[str, Any]]:
        async with httpx.AsyncClient(base_url=self.hub.http_url, timeout=T) as http:
            response = await http.get(
                f"/api/orgs/{self.victim_org}/events",
                params={"limit": 1000},
                headers={"Authorization": f"Bearer {self.victim_token()}"},
            )
        assert response.status_code == 200, response.text
        events: list[dict[str, Any]] = response.json()["events"]
        return events

    async def finish(self) -> None:
        """The isolation checks every test ends with."""
        await asyncio.sleep(0.15)  # let in-flight frames land
        await self.stop_publishing()
        assert self.hub.process.poll() is None, "the hub died"
        # The victim's channels were live throughout.
        for topic in self.victim_topics:
            assert any(
                m.topic == topic and self.victim_marker in json.dumps(m.payload)
                for m in self.victim.messages
            ), f"the victim heard nothing on {topic}"
        await self.victim.heartbeat()
        for victim in (self.victim, self.publisher):
            assert self.attacker_marker not in victim.text(), (
                f"attacker traffic reached the victim: {victim.messages[-5:]!r}"
            )
        for conn in self.attackers:
            assert self.victim_marker not in conn.text(), (
                f"victim traffic reached attacker {conn.label}: {conn.messages!r}"
            )
        for response in self.responses:
            assert self.victim_marker not in response.text, (
                f"{response.request.method} {response.request.url} revealed victim data: "
                f"{response.status_code} {response.text[:300]}"
            )
        history = await self.victim_history()
        assert [e["payload"] for e in history] == [{"m": self.victim_marker}], history
        await asyncio.gather(*(c.close() for c in [self.victim, self.publisher, *self.attackers]))


@contextlib.asynccontextmanager
async def arena_on(hub: HubProcess, **extra: Any) -> AsyncIterator[Arena]:
    arena = Arena(hub, extra)
    await arena.start()
    start = len(hub.log())
    try:
        yield arena
    except BaseException:
        with contextlib.suppress(Exception):
            await arena.stop_publishing()
        await asyncio.gather(
            *(c.close() for c in [arena.victim, arena.publisher, *arena.attackers])
        )
        raise
    await arena.finish()
    new_log = hub.log()[start:]
    assert "Traceback" not in new_log, new_log


async def expect_refused_join(
    conn: Conn, topic: str, *, reason_prefix: str = "Unauthorized", **kwargs: Any
) -> str:
    """Join ``topic`` expecting an error reply; returns the reason.  If the
    hub wrongly accepts, the attacker publishes its marker there at once, so
    the arena's isolation checks see the leak too."""
    join_ref, reply = await conn.join(topic, **kwargs)
    if reply["status"] == "ok":
        await conn.broadcast(topic, join_ref, {"m": conn.marker})
    assert reply["status"] == "error", f"join of {topic!r} was accepted: {reply}"
    reason = str(reply["response"].get("reason", ""))
    assert reason.startswith(reason_prefix), reason
    return reason


def free_name(wire: str) -> bool:
    """The README's rule, written out: after ``realtime:``, a non-empty name
    outside the reserved namespaces, of at most 246 bytes, without control
    characters."""
    if not wire.startswith("realtime:"):
        return False
    name = wire.removeprefix("realtime:")
    return (
        name != ""
        and name.partition(":")[0] not in ("org", "user", "mother")
        and len(name.encode()) <= 246
        and not any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in name)
    )
