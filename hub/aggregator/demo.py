"""Demo traffic: synthetic orgs and members driving a running hub.

``run_demo`` makes the command center come alive on a fresh hub:

* every org publishes durable events through the REST API
  (``POST /api/orgs/{org}/events``) at its own rate, which drifts slowly
  (a sine wave) and now and then bursts;
* every org has a few members: real WebSocket clients (vsn 1.0.0 JSON)
  that join ``org:<id>``, track their presence, broadcast now and then,
  heartbeat, and leave and come back after a while.

It signs its own tokens with the hub's HS256 secret (a ``service_role``
token to publish, member tokens for the members), so it needs
``HUB_JWT_SECRET`` or dev mode.  Everything retries with backoff, so a
restarting hub only pauses it.  ``start_in_thread`` runs it beside
``hub serve`` (``hub serve --demo``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import json
import logging
import math
import random
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Final

import httpx
from websockets.asyncio.client import connect
from websockets.exceptions import WebSocketException

from hub.auth.principal import SERVICE_ROLE
from hub.auth.tokens import issue_token

log = logging.getLogger(__name__)

ORG_NAMES: Final = (
    "acme",
    "globex",
    "initech",
    "umbrella",
    "hooli",
    "stark",
    "wayne",
    "wonka",
    "tyrell",
    "cyberdyne",
    "soylent",
    "aperture",
    "monarch",
    "oscorp",
    "vandelay",
    "dunder",
)
EVENT_TYPES: Final = (
    "order.created",
    "order.paid",
    "order.shipped",
    "invoice.sent",
    "invoice.paid",
    "user.signed_up",
    "user.logged_in",
    "ticket.opened",
    "ticket.closed",
    "deploy.started",
    "deploy.finished",
    "message.posted",
    "file.uploaded",
    "alert.raised",
)
FIRST_NAMES: Final = (
    "ada",
    "alan",
    "grace",
    "linus",
    "margaret",
    "ken",
    "barbara",
    "dennis",
    "frances",
    "guido",
    "radia",
    "edsger",
)
#: Seconds a token the demo signs stays valid; it signs new ones well before.
TOKEN_TTL: Final = 6 * 3600
HEARTBEAT_SECONDS: Final = 25.0


@dataclass
class _Org:
    name: str
    rate: float  # mean events per second
    types: list[str]
    weights: list[float]
    period: float  # seconds of one rate wave
    phase: float
    burst_until: float = 0.0
    members: list[str] = field(default_factory=list)

    def rate_at(self, now: float) -> float:
        wave = 1 + 0.7 * math.sin(2 * math.pi * now / self.period + self.phase)
        burst = 6.0 if now < self.burst_until else 1.0
        return max(0.02, self.rate * wave * burst)


def _org_names(count: int) -> list[str]:
    names = list(ORG_NAMES[:count])
    for i in itertools.count(2):
        if len(names) >= count:
            break
        names.extend(f"{name}-{i}" for name in ORG_NAMES[: count - len(names)])
    return names


def _payload(rng: random.Random, org: _Org, type_: str) -> dict[str, Any]:
    payload: dict[str, Any] = {"id": rng.randrange(10_000, 99_999)}
    if type_.startswith(("order", "invoice")):
        payload["amount"] = round(rng.lognormvariate(3.5, 0.9), 2)
        payload["currency"] = rng.choice(("EUR", "USD", "GBP"))
    if org.members:
        payload["by"] = rng.choice(org.members)
    if type_ == "alert.raised":
        payload["severity"] = rng.choice(("info", "warning", "critical"))
    return payload


class _Tokens:
    """Signs tokens, again before they expire."""

    def __init__(self, secret: str, orgs_claim: tuple[str, ...]) -> None:
        self.secret = secret
        self.orgs_claim = orgs_claim
        self._admin: tuple[str, float] | None = None

    def admin(self) -> str:
        now = time.monotonic()
        if self._admin is None or now - self._admin[1] > TOKEN_TTL / 2:
            token = issue_token(self.secret, sub="demo-publisher", role=SERVICE_ROLE, ttl=TOKEN_TTL)
            self._admin = (token, now)
        return self._admin[0]

    def member(self, user: str, org: str) -> str:
        return issue_token(
            self.secret, sub=user, orgs=[org], ttl=TOKEN_TTL, orgs_claim=self.orgs_claim
        )


async def _wait_healthy(http: httpx.AsyncClient) -> None:
    delay = 0.2
    while True:
        with contextlib.suppress(httpx.HTTPError):
            if (await http.get("/healthz")).status_code == 200:
                return
        await asyncio.sleep(delay)
        delay = min(delay * 2, 5.0)


async def _publisher(
    http: httpx.AsyncClient, tokens: _Tokens, org: _Org, rng: random.Random, scale: float
) -> None:
    failures = 0
    while True:
        now = time.time()
        if org.burst_until < now and rng.random() < 0.004:
            org.burst_until = now + rng.uniform(4, 12)
        rate = org.rate_at(now) * scale
        await asyncio.sleep(min(rng.expovariate(rate), 5.0))
        count = 1 if now >= org.burst_until else rng.randint(1, 4)
        batch = []
        for _ in range(count):
            type_ = rng.choices(org.types, org.weights)[0]
            batch.append({"type": type_, "payload": _payload(rng, org, type_)})
        try:
            response = await http.post(
                f"/api/orgs/{org.name}/events",
                json=batch,
                headers={"Authorization": f"Bearer {tokens.admin()}"},
            )
            if response.status_code >= 400:
                log.warning("demo: publish to %s refused: %s", org.name, response.text[:200])
            failures = 0
        except httpx.HTTPError as exc:
            failures += 1
            log.debug("demo: publish to %s failed: %r", org.name, exc)
            await asyncio.sleep(min(0.5 * 2**failures, 10.0))


async def _member(
    ws_url: str, tokens: _Tokens, org: _Org, user: str, rng: random.Random, stay: float
) -> None:
    """One member: join, track presence, chat a little, leave, come back."""
    topic = f"realtime:org:{org.name}"
    refs = itertools.count(1)
    failures = 0
    while True:
        await asyncio.sleep(rng.uniform(0.2, 3.0))
        token = tokens.member(user, org.name)
        try:
            async with connect(
                f"{ws_url}?apikey={token}&vsn=1.0.0", open_timeout=10, close_timeout=2
            ) as ws:

                async def send(topic_: str, event: str, payload: Any, join_ref: str | None) -> None:
                    ref = str(next(refs))
                    frame = {"topic": topic_, "event": event, "payload": payload, "ref": ref}
                    if join_ref is not None:
                        frame["join_ref"] = join_ref
                    await ws.send(json.dumps(frame))

                async def drain() -> None:
                    # Read everything: an unread socket would be cut as a
                    # slow consumer.
                    async for _ in ws:
                        pass

                reader = asyncio.create_task(drain())
                try:
                    join_ref = str(next(refs))
                    config = {
                        "broadcast": {"self": False, "ack": False},
                        "presence": {"key": user},
                    }
                    await ws.send(
                        json.dumps(
                            {
                                "topic": topic,
                                "event": "phx_join",
                                "payload": {"config": config, "access_token": token},
                                "ref": join_ref,
                                "join_ref": join_ref,
                            }
                        )
                    )
                    presence = {"type": "presence", "event": "track"}
                    status = {"user": user, "status": "online", "online_at": time.time()}
                    await send(topic, "presence", {**presence, "payload": status}, join_ref)
                    failures = 0
                    leave_at = time.monotonic() + stay * rng.uniform(0.5, 1.5)
                    beat_at = time.monotonic() + HEARTBEAT_SECONDS
                    while time.monotonic() < leave_at and not reader.done():
                        await asyncio.sleep(rng.uniform(1.0, 6.0))
                        event = rng.choice(("cursor", "typing", "reaction"))
                        body = {"user": user, "x": rng.randrange(1200), "y": rng.randrange(800)}
                        message = {"type": "broadcast", "event": event, "payload": body}
                        await send(topic, "broadcast", message, join_ref)
                        if time.monotonic() >= beat_at:
                            await send("phoenix", "heartbeat", {}, None)
                            beat_at = time.monotonic() + HEARTBEAT_SECONDS
                    await send(topic, "phx_leave", {}, join_ref)
                finally:
                    reader.cancel()
                    with contextlib.suppress(asyncio.CancelledError, WebSocketException):
                        await reader
        except (OSError, WebSocketException, TimeoutError) as exc:
            failures += 1
            log.debug("demo: member %s of %s: %r", user, org.name, exc)
            await asyncio.sleep(min(0.5 * 2**failures, 10.0))
            continue
        # Away for a while, then back.
        await asyncio.sleep(rng.uniform(2.0, 10.0))


async def _supervised(name: str, factory: Callable[[], Awaitable[None]]) -> None:
    """Run ``factory()`` again whenever it fails unexpectedly."""
    while True:
        try:
            await factory()
            return
        except Exception:
            log.exception("demo: %s failed; restarting it", name)
            await asyncio.sleep(2.0)


def make_orgs(count: int, members: int, rng: random.Random) -> list[_Org]:
    """``count`` orgs with varied rates and event types, and their members."""
    orgs = []
    for name in _org_names(count):
        types = rng.sample(EVENT_TYPES, rng.randint(3, 6))
        org = _Org(
            name=name,
            rate=rng.lognormvariate(-0.2, 0.8),
            types=types,
            weights=[1 / (i + 1) for i in range(len(types))],
            period=rng.uniform(60, 300),
            phase=rng.uniform(0, 2 * math.pi),
        )
        users = rng.sample(FIRST_NAMES, min(len(FIRST_NAMES), rng.randint(1, max(1, members))))
        org.members = [f"{user}@{name}" for user in users]
        orgs.append(org)
    return orgs


async def run_demo(
    base_url: str,
    secret: str,
    *,
    orgs: int = 8,
    members: int = 3,
    scale: float = 1.0,
    orgs_claim: tuple[str, ...] = ("app_metadata", "orgs"),
    duration: float | None = None,
    seed: int | None = None,
) -> None:
    """Drive ``orgs`` synthetic orgs (up to ``members`` members each)
    against the hub at ``base_url`` (``http://host:port``), signing tokens
    with ``secret``.  ``scale`` multiplies every org's event rate (about 1
    event per second per org on average).  Runs for ``duration`` seconds,
    or until cancelled."""
    if orgs < 1:
        raise ValueError("orgs must be at least 1")
    rng = random.Random(seed)
    base_url = base_url.rstrip("/")
    ws_url = base_url.replace("http", "ws", 1) + "/realtime/v1/websocket"
    tokens = _Tokens(secret, orgs_claim)
    demo_orgs = make_orgs(orgs, members, rng)
    async with httpx.AsyncClient(base_url=base_url, timeout=10) as http:
        await _wait_healthy(http)
        log.info(
            "demo: %d orgs (%s) with %d members are publishing to %s",
            len(demo_orgs),
            ", ".join(org.name for org in demo_orgs),
            sum(len(org.members) for org in demo_orgs),
            base_url,
        )
        tasks: list[asyncio.Task[None]] = []
        for org in demo_orgs:
            org_rng = random.Random(rng.random())
            tasks.append(
                asyncio.create_task(
                    _supervised(
                        f"publisher of {org.name}",
                        functools.partial(_publisher, http, tokens, org, org_rng, scale),
                    )
                )
            )
            for user in org.members:
                member_rng = random.Random(rng.random())
                stay = member_rng.uniform(30, 180)
                member = functools.partial(_member, ws_url, tokens, org, user, member_rng, stay)
                tasks.append(asyncio.create_task(_supervised(f"member {user}", member)))
        try:
            if duration is None:
                await asyncio.gather(*tasks)
            else:
                await asyncio.wait(tasks, timeout=duration)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


def start_in_thread(base_url: str, secret: str, **options: Any) -> threading.Thread:
    """Run :func:`run_demo` on its own event loop in a daemon thread (it
    ends with the process); ``options`` go to ``run_demo``."""

    def main() -> None:
        try:
            asyncio.run(run_demo(base_url, secret, **options))
        except Exception:
            log.exception("demo traffic stopped")

    thread = threading.Thread(target=main, name="hub-demo", daemon=True)
    thread.start()
    return thread
