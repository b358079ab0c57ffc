"""End-to-end: durable org events through real `hub serve` processes.

Most tests run against a hub whose event store is the session's fresh
PostgreSQL database (``HUB_DATABASE_URL``, see ``tests/support/pg.py``);
the embedded default (no database, in-memory store) is checked too.  The
clients are the real ones: raw WebSocket frames (vsn 1.0.0), the Python
``realtime`` client (vsn 1.0.0) and supabase-js (vsn 2.0.0, driven under
node by ``tests/support/js/driver.mjs``, with postgres_changes bindings).

What is checked: publishing over REST, ``HubClient`` and ``hub publish``;
live delivery of durable events and of captured table changes
(``hub track``) with Supabase's message shape, filters and tenant scoping;
gap-free resume (``replay.after``, ``replay.since``) while a publisher keeps
publishing; the ReplayTruncated system message; resume across a hub
restart.  Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import asyncpg
import httpx
import pytest
from realtime import AsyncRealtimeChannel, AsyncRealtimeClient, RealtimeSubscribeStates
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from hub.client.rest import HubClient, HubClientError
from tests.support.hubs import HubProcess, run_cli, start_hub, stop_hub
from tests.support.jsclient import JsClientUnavailable, JsDriver, install_js_client
from tests.support.mother import fresh_database, fresh_dsn  # noqa: F401 - fixture
from tests.support.pg import pg_dsn  # noqa: F401 - fixture
from tests.support.projections import caught_up

pytestmark = pytest.mark.e2e

#: Bound of every single wait in this file (seconds).
T = 10.0
UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
COMMIT_TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


def new_org() -> str:
    return "d" + uuid.uuid4().hex[:12]


# -- hubs ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pg_hub(pg_dsn: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubProcess]:  # noqa: F811
    """One `hub serve` on the session's PostgreSQL event store."""
    hub = start_hub(tmp_path_factory.mktemp("pg-hub"), {"HUB_DATABASE_URL": pg_dsn})
    yield hub
    stop_hub(hub)


@pytest.fixture(scope="module")
def mem_hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubProcess]:
    """One `hub serve` on the embedded default: no database, in-memory store."""
    hub = start_hub(tmp_path_factory.mktemp("mem-hub"), {"HUB_DATABASE_URL": ""})
    yield hub
    stop_hub(hub)


@pytest.fixture
async def fresh_hub(tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[HubProcess]]]:
    """Start hubs with extra environment (off the event loop); all stopped after."""
    started: list[HubProcess] = []

    async def start(env: dict[str, str], secret: str | None = None) -> HubProcess:
        hub = await asyncio.to_thread(start_hub, tmp_path, env, secret)
        started.append(hub)
        return hub

    yield start
    for hub in started:
        await asyncio.to_thread(stop_hub, hub)
    for hub in started:
        assert "Traceback" not in hub.log(), hub.log()[-4000:]


def assert_clean_log(hub: HubProcess, since: int) -> None:
    text = hub.log()[since:]
    assert "Traceback" not in text, text[-4000:]


# -- the CLI -------------------------------------------------------------------


# -- a raw vsn 1.0.0 client ------------------------------------------------------


class Wire:
    """One raw WebSocket speaking vsn 1.0.0; a task records every frame."""

    def __init__(self, conn: ClientConnection) -> None:
        self.conn = conn
        self.frames: list[dict[str, Any]] = []
        self.closed = False
        self._changed = asyncio.Event()
        self._refs = itertools.count(1)
        self._task = asyncio.create_task(self._read())

    @classmethod
    async def open(cls, hub: HubProcess, token: str) -> Wire:
        conn = await asyncio.wait_for(
            connect(f"{hub.ws_url}?apikey={token}&vsn=1.0.0", ping_interval=None, open_timeout=T),
            T,
        )
        return cls(conn)

    async def _read(self) -> None:
        with contextlib.suppress(ConnectionClosed):
            async for data in self.conn:
                self.frames.append(json.loads(data))
                self._changed.set()
        self.closed = True
        self._changed.set()

    def mark(self) -> int:
        return len(self.frames)

    async def wait_for(
        self,
        predicate: Callable[[dict[str, Any]], bool],
        what: str,
        since: int = 0,
        within: float = T,
    ) -> dict[str, Any]:
        deadline = time.monotonic() + within
        checked = since
        while True:
            while checked < len(self.frames):
                frame = self.frames[checked]
                checked += 1
                if predicate(frame):
                    return frame
            remaining = deadline - time.monotonic()
            if self.closed or remaining <= 0:
                why = "the socket closed" if self.closed else f"{within} s passed"
                raise AssertionError(
                    f"waited for {what}, but {why}; last frames: {self.frames[-5:]}"
                )
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)

    async def join(self, topic: str, config: dict[str, Any]) -> dict[str, Any]:
        """Send phx_join and return the reply's payload (ok or error)."""
        ref = str(next(self._refs))
        since = self.mark()
        message = {
            "topic": f"realtime:{topic}",
            "event": "phx_join",
            "payload": {"config": config},
            "ref": ref,
            "join_ref": ref,
        }
        await asyncio.wait_for(self.conn.send(json.dumps(message)), T)
        reply = await self.wait_for(
            lambda f: f["event"] == "phx_reply" and f.get("ref") == ref,
            f"the reply to joining {topic}",
            since,
        )
        payload: dict[str, Any] = reply["payload"]
        return payload

    async def joined(self, topic: str, config: dict[str, Any]) -> dict[str, Any]:
        payload = await self.join(topic, config)
        assert payload["status"] == "ok", payload
        return payload

    def broadcasts(self, topic: str, since: int = 0) -> list[dict[str, Any]]:
        """The inner payloads ``{"type", "event", "payload", "meta"}``."""
        return [
            f["payload"]
            for f in self.frames[since:]
            if f["event"] == "broadcast" and f["topic"] == f"realtime:{topic}"
        ]

    def seqs(self, topic: str, since: int = 0) -> list[int]:
        return [b["meta"]["seq"] for b in self.broadcasts(topic, since)]

    def system(self, topic: str, since: int = 0) -> list[dict[str, Any]]:
        return [
            f["payload"]
            for f in self.frames[since:]
            if f["event"] == "system" and f["topic"] == f"realtime:{topic}"
        ]

    async def wait_seq(self, topic: str, seq: int, since: int = 0, within: float = T) -> None:
        await self.wait_for(
            lambda f: (
                f["event"] == "broadcast"
                and f["topic"] == f"realtime:{topic}"
                and f["payload"].get("meta", {}).get("seq", 0) >= seq
            ),
            f"seq {seq} on {topic}",
            since,
            within,
        )

    async def wait_system(self, topic: str, since: int = 0) -> dict[str, Any]:
        frame = await self.wait_for(
            lambda f: f["event"] == "system" and f["topic"] == f"realtime:{topic}",
            f"a system message on {topic}",
            since,
        )
        payload: dict[str, Any] = frame["payload"]
        return payload

    async def close(self) -> None:
        try:
            await asyncio.wait_for(self.conn.close(), T)
        except TimeoutError:
            self.conn.transport.abort()
        await asyncio.wait_for(self._task, T)

    async def drop(self) -> None:
        """Cut the TCP connection without a close handshake."""
        self.conn.transport.abort()
        await asyncio.wait_for(self._task, T)


@pytest.fixture
async def wires() -> AsyncIterator[Callable[[HubProcess, str], Awaitable[Wire]]]:
    opened: list[Wire] = []

    async def open_wire(hub: HubProcess, token: str) -> Wire:
        wire = await Wire.open(hub, token)
        opened.append(wire)
        return wire

    yield open_wire
    for wire in opened:
        if not wire.closed:
            await wire.close()


def replay_config(**replay: Any) -> dict[str, Any]:
    return {"broadcast": {"replay": replay}, "private": True}


def assert_replayed_prefix(broadcasts: list[dict[str, Any]]) -> tuple[int, int]:
    """Replayed events come first, then live ones; return both counts."""
    flags = [bool(b["meta"].get("replayed")) for b in broadcasts]
    assert flags == sorted(flags, reverse=True), f"replayed after live: {flags}"
    replayed = sum(flags)
    return replayed, len(flags) - replayed


# -- the Python realtime client ------------------------------------------------


class Collector:
    """A callback that keeps what it is called with."""

    def __init__(self) -> None:
        self.items: list[Any] = []

    def __call__(self, item: Any) -> None:
        self.items.append(item)

    async def wait(self, predicate: Callable[[list[Any]], bool], what: str) -> None:
        deadline = time.monotonic() + T
        while not predicate(self.items):
            assert time.monotonic() < deadline, f"timed out waiting for {what}: {self.items}"
            await asyncio.sleep(0.01)


@pytest.fixture
async def py_clients() -> AsyncIterator[
    Callable[[HubProcess, str], Awaitable[AsyncRealtimeClient]]
]:
    made: list[AsyncRealtimeClient] = []

    async def make(hub: HubProcess, token: str) -> AsyncRealtimeClient:
        client = AsyncRealtimeClient(f"ws://127.0.0.1:{hub.port}/realtime/v1", token)
        made.append(client)
        await asyncio.wait_for(client.connect(), T)
        return client

    yield make
    for client in made:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(client.remove_all_channels(), T)
        await asyncio.wait_for(client.close(), T)


async def py_subscribe(channel: AsyncRealtimeChannel) -> None:
    states: asyncio.Queue[Any] = asyncio.Queue()
    await asyncio.wait_for(channel.subscribe(lambda s, e: states.put_nowait((s, e))), T)
    state, error = await asyncio.wait_for(states.get(), T)
    assert state == RealtimeSubscribeStates.SUBSCRIBED, error


# -- supabase-js ---------------------------------------------------------------


@pytest.fixture(scope="session")
def js_scripts() -> Path:
    try:
        return install_js_client()
    except JsClientUnavailable as exc:
        pytest.fail(str(exc))


@pytest.fixture
async def js(js_scripts: Path) -> AsyncIterator[JsDriver]:
    """One node process running supabase-js (``tests/support/js/driver.mjs``)."""
    driver = await JsDriver.start(js_scripts, "supabase-js", max_seconds=90)
    try:
        yield driver
    finally:
        await driver.close()
    broken = driver.select(ev="uncaught") + driver.select(ev="garbage")
    assert not broken, driver.describe()


async def js_subscribe(
    js: JsDriver,
    client: str,
    chan: str,
    topic: str,
    config: dict[str, Any] | None = None,
    changes: list[dict[str, Any]] | None = None,
) -> None:
    since = js.mark()
    await js.command(
        "channel", client=client, chan=chan, topic=topic, config=config or {}, changes=changes or []
    )
    status = await js.wait_event(T, since, ev="status", client=client, chan=chan)
    assert status["status"] == "SUBSCRIBED", f"{status}\n{js.describe()}"


def js_broadcasts(js: JsDriver, client: str, since: int = 0) -> list[dict[str, Any]]:
    return js.select(since, ev="broadcast", client=client)


async def js_wait_seq(js: JsDriver, client: str, seq: int, since: int = 0) -> None:
    await js.wait_for(
        lambda e: (
            e["ev"] == "broadcast"
            and e["client"] == client
            and (e.get("meta") or {}).get("seq", 0) >= seq
        ),
        T,
        f"seq {seq} at {client}",
        since,
    )


# -- publishing helpers --------------------------------------------------------


async def publish_range(client: HubClient, org: str, first: int, last: int) -> None:
    """Publish ``tick`` events with payload ``{"i": n}`` for n in first..last
    (in a fresh org, ``i`` equals the seq)."""
    for start in range(first, last + 1, 100):
        batch = [("tick", {"i": i}) for i in range(start, min(start + 100, last + 1))]
        stored = await client.publish_many(org, batch)
        assert [s["seq"] for s in stored] == [payload["i"] for _, payload in batch]


async def steady_publisher(
    client: HubClient,
    org: str,
    stop: asyncio.Event,
    progress: list[int],
    *,
    rate: float = 400.0,
    lanes: int = 4,
    batch: int = 2,
) -> None:
    """Publish ``tick`` events (payload ``{"i": n}``, n unique) at a steady
    ``rate`` per second until ``stop`` is set, from ``lanes`` concurrent
    request loops so that commits (and so live notifications) come every few
    milliseconds.  ``progress[0]`` counts the events published so far."""
    counter = itertools.count(1)
    interval = lanes * batch / rate
    loop = asyncio.get_running_loop()

    async def lane(offset: float) -> None:
        due = loop.time() + offset
        while not stop.is_set():
            items = list(itertools.islice(counter, batch))
            stored = await client.publish_many(org, [("tick", {"i": n}) for n in items])
            assert len(stored) == len(items)
            progress[0] += len(items)
            due += interval
            await asyncio.sleep(max(0.0, due - loop.time()))

    await asyncio.gather(*(lane(k * interval / lanes) for k in range(lanes)))


@dataclass
class Got:
    """One durable broadcast as a client received it."""

    seq: int
    replayed: bool
    event: str
    payload: Any
    id: str | None


class Resumer(Protocol):
    """One client that joins ``org:<id>``, optionally resuming."""

    async def join(self, after: int | None) -> None: ...
    async def wait_seq(self, seq: int) -> None: ...
    async def leave(self, clean: bool) -> None: ...
    def got(self) -> list[Got]: ...
    def describe(self) -> str: ...


async def resume_scenario(hub: HubProcess, org: str, client: Resumer) -> None:
    """A client reads, goes away (cleanly, then by a cut connection,
    alternately), and rejoins with ``replay.after`` = the last seq it saw,
    three times, while a publisher keeps publishing (at least 1000 events,
    and until the client has read live events after its last rejoin).  Each
    rejoin must deliver exactly last+1.. with the replayed ones first, and
    the whole must match the stored history."""
    stop = asyncio.Event()
    progress = [0]
    segments: list[list[Got]] = []
    async with HubClient(hub.http_url, hub.admin_token()) as publisher_client:
        await client.join(None)
        publisher = asyncio.create_task(steady_publisher(publisher_client, org, stop, progress))
        try:
            await client.wait_seq(200)
            for rejoin in range(3):
                await client.leave(clean=rejoin % 2 == 0)
                segments.append(client.got())
                last = segments[-1][-1].seq
                await asyncio.sleep(0.2)  # away while events keep coming
                await client.join(last)
                await client.wait_seq(max(last + 300, 1000 if rejoin == 2 else 0))
            stop.set()
            await asyncio.wait_for(publisher, T)
            total = progress[0]
            # A sentinel: once it is here, any duplicate would be too.
            await publisher_client.publish(org, "tick", {"i": total + 1})
            await client.wait_seq(total + 1)
            segments.append(client.got())
        finally:
            stop.set()
            publisher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await publisher
        stored: list[dict[str, Any]] = []
        while len(stored) <= total:
            page = await publisher_client.history(org, after=len(stored), limit=1000)
            assert page, f"history ends at {len(stored)} of {total + 1}"
            stored += page
    assert [e["seq"] for e in stored] == list(range(1, total + 2))
    assert sorted(e["payload"]["i"] for e in stored) == list(range(1, total + 2))

    first = segments[0]
    assert [g.seq for g in first] == list(range(1, len(first) + 1)), client.describe()
    assert not any(g.replayed for g in first)
    start = first[-1].seq
    for segment in segments[1:]:
        seqs = [g.seq for g in segment]
        assert seqs == list(range(start + 1, start + len(seqs) + 1)), (
            f"gap or duplicate after seq {start}: {seqs[:5]}...{seqs[-5:]}"
        )
        flags = [g.replayed for g in segment]
        assert flags == sorted(flags, reverse=True), f"replayed after live: {flags}"
        assert 0 < sum(flags) < len(flags), "each rejoin gets replayed and then live events"
        start = seqs[-1]
    assert start == total + 1
    for segment in segments:
        for g in segment:
            event = stored[g.seq - 1]
            assert (g.event, g.payload) == ("tick", event["payload"]), g
            assert g.id is None or g.id == event["id"], g


class RawResumer:
    """Raw vsn 1.0.0 frames; each (re)join on a new socket."""

    def __init__(self, hub: HubProcess, org: str, open_wire: Any) -> None:
        self.hub = hub
        self.topic = f"org:{org}"
        self.token = hub.token(sub="raw-resumer", orgs=[org])
        self.open_wire = open_wire
        self.wire: Wire | None = None

    async def join(self, after: int | None) -> None:
        self.wire = await self.open_wire(self.hub, self.token)
        config = {"broadcast": {}} if after is None else replay_config(after=after)
        await self.wire.joined(self.topic, config)

    async def wait_seq(self, seq: int) -> None:
        assert self.wire is not None
        await self.wire.wait_seq(self.topic, seq)

    async def leave(self, clean: bool) -> None:
        assert self.wire is not None
        await (self.wire.close() if clean else self.wire.drop())

    def got(self) -> list[Got]:
        assert self.wire is not None
        return [
            Got(b["meta"]["seq"], bool(b["meta"].get("replayed")), b["event"], b["payload"], None)
            for b in self.wire.broadcasts(self.topic)
        ]

    def describe(self) -> str:
        return "" if self.wire is None else json.dumps(self.wire.frames[:20])


class JsResumer:
    """supabase-js: each (re)join is a new client (a new page), private:
    true, the replay nested in ``broadcast`` as supabase-js requires."""

    def __init__(self, hub: HubProcess, org: str, js: JsDriver) -> None:
        self.hub = hub
        self.org = org
        self.js = js
        self.count = 0
        self.since = 0

    @property
    def name(self) -> str:
        return f"c{self.count}"

    async def join(self, after: int | None) -> None:
        self.count += 1
        self.since = self.js.mark()
        token = self.hub.token(sub=self.name, orgs=[self.org])
        await self.js.client(self.name, self.hub.http_url, token)
        config: dict[str, Any] = {"private": True}
        if after is not None:
            config["broadcast"] = {"replay": {"after": after}}
        await js_subscribe(self.js, self.name, "c", f"org:{self.org}", config)

    async def wait_seq(self, seq: int) -> None:
        await js_wait_seq(self.js, self.name, seq, self.since)

    async def leave(self, clean: bool) -> None:
        if clean:
            await self.js.command("remove_channel", client=self.name, chan="c")
        await self.js.command("disconnect", client=self.name)

    def got(self) -> list[Got]:
        return [
            Got(e["meta"]["seq"], bool(e["meta"].get("replayed")), e["event"], e["payload"],
                e["meta"]["id"])
            for e in js_broadcasts(self.js, self.name, self.since)
        ]  # fmt: skip

    def describe(self) -> str:
        first = [
            {k: v for k, v in e.items() if k != "hex"}
            for e in self.js.events
            if e.get("client") == "c1" or e["ev"] in ("done", "failed")
        ]
        return "\n".join(json.dumps(e)[:300] for e in first[:40])


# ==============================================================================
# 1. publishing
# ==============================================================================


@pytest.fixture(params=["postgres", "memory"])
def any_hub(request: pytest.FixtureRequest) -> HubProcess:
    hub: HubProcess = request.getfixturevalue(
        "pg_hub" if request.param == "postgres" else "mem_hub"
    )
    return hub


async def test_publish_rest_client_and_cli(any_hub: HubProcess) -> None:
    hub = any_hub
    log_start = len(hub.log())
    org, other = new_org(), new_org()
    member = hub.token(sub="member", orgs=[org])
    outsider = hub.token(sub="outsider", orgs=[other])
    admin = hub.admin_token()
    path = f"/api/orgs/{org}/events"

    def auth(token: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {token}"}

    async with httpx.AsyncClient(base_url=hub.http_url, timeout=T) as http:
        # One event, then a batch: consecutive seqs, fresh ids.
        r = await http.post(
            path, json={"type": "order.created", "payload": {"id": 1}}, headers=auth(member)
        )
        assert r.status_code == 201, r.text
        [first] = r.json()["events"]
        assert first["seq"] == 1 and UUID.fullmatch(first["id"]), first
        batch = [{"type": f"step.{i}", "payload": {"i": i, "list": [i, None]}} for i in (2, 3, 4)]
        r = await http.post(path, json=batch, headers=auth(member))
        assert r.status_code == 201, r.text
        stored = r.json()["events"]
        assert [e["seq"] for e in stored] == [2, 3, 4]
        ids = [first["id"], *(e["id"] for e in stored)]
        assert len(set(ids)) == 4
        # service_role may publish to any org.
        r = await http.post(
            path, json={"type": "admin.note", "payload": "text"}, headers=auth(admin)
        )
        assert r.status_code == 201, r.text
        assert [e["seq"] for e in r.json()["events"]] == [5]
        ids.append(r.json()["events"][0]["id"])

        # Nobody else; and refused requests write nothing.
        r = await http.post(path, json={"type": "x", "payload": {}}, headers=auth(outsider))
        assert r.status_code == 403, r.text
        r = await http.post(path, json={"type": "x", "payload": {}})
        assert r.status_code == 401, r.text
        r = await http.post(path, content=b"{not json", headers=auth(member))
        assert r.status_code == 422, r.text
        too_many = [{"type": "x", "payload": {}}] * 101
        r = await http.post(path, json=too_many, headers=auth(member))
        assert r.status_code == 422, r.text
        r = await http.post(path, json=[{"type": "ok"}, {"payload": 1}], headers=auth(member))
        assert r.status_code == 422, r.text
        r = await http.get(path, headers=auth(outsider))
        assert r.status_code == 403, r.text
        r = await http.get(path)
        assert r.status_code == 401, r.text

        # History pages.
        r = await http.get(path, params={"after": 0, "limit": 2}, headers=auth(member))
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["last_seq"] == 5
        assert [e["seq"] for e in body["events"]] == [1, 2]
        one = body["events"][0]
        assert (one["type"], one["payload"], one["kind"], one["id"]) == (
            "order.created",
            {"id": 1},
            "event",
            first["id"],
        )
        assert abs(one["created_at"] - time.time()) < 60
        r = await http.get(path, params={"after": 2, "limit": 2}, headers=auth(member))
        assert [(e["seq"], e["type"], e["payload"]) for e in r.json()["events"]] == [
            (3, "step.3", {"i": 3, "list": [3, None]}),
            (4, "step.4", {"i": 4, "list": [4, None]}),
        ]
        r = await http.get(path, params={"after": 4}, headers=auth(admin))
        assert [(e["seq"], e["payload"], e["id"]) for e in r.json()["events"]] == [
            (5, "text", ids[4])
        ]
        r = await http.get(path, params={"after": 5}, headers=auth(member))
        assert r.json() == {"events": [], "last_seq": 5}

    # The Python client.
    async with HubClient(hub.http_url, admin) as client:
        one = await client.publish(org, "py.one", {"n": 6})
        assert one["seq"] == 6 and UUID.fullmatch(one["id"])
        many = await client.publish_many(org, [("py.many", {"n": 7}), ("py.many", {"n": 8})])
        assert [m["seq"] for m in many] == [7, 8]
        history = await client.history(org, after=5, limit=10)
        assert [(e["seq"], e["type"], e["payload"]) for e in history] == [
            (6, "py.one", {"n": 6}),
            (7, "py.many", {"n": 7}),
            (8, "py.many", {"n": 8}),
        ]
        assert [e["seq"] for e in await client.history(org, after=0, limit=3)] == [1, 2, 3]
    async with HubClient(hub.http_url, outsider) as client:
        with pytest.raises(HubClientError) as refused:
            await client.publish(org, "x", {})
        assert refused.value.status == 403

    # The CLI: a service_role token signed with HUB_JWT_SECRET.
    code, out, err = await run_cli(
        "publish",
        "--org",
        org,
        "--type",
        "cli.event",
        '{"from": "cli", "n": [1, 2]}',
        "--url",
        hub.http_url,
        env={"HUB_JWT_SECRET": hub.secret},
    )
    assert code == 0, err
    printed = json.loads(out)
    assert printed["seq"] == 9 and UUID.fullmatch(printed["id"]), out
    async with HubClient(hub.http_url, member) as client:
        [event] = await client.history(org, after=8)
        assert (event["seq"], event["type"], event["payload"], event["id"]) == (
            9,
            "cli.event",
            {"from": "cli", "n": [1, 2]},
            printed["id"],
        )
    # A payload that is not JSON: refused before anything is sent.
    code, out, err = await run_cli(
        "publish",
        "--org",
        org,
        "--type",
        "t",
        "{bad",
        "--url",
        hub.http_url,
        env={"HUB_JWT_SECRET": hub.secret},
    )
    assert code == 2 and "not valid JSON" in err, (code, out, err)
    async with HubClient(hub.http_url, admin) as client:
        assert [e["seq"] for e in await client.history(org, after=8)] == [9]
    assert_clean_log(hub, log_start)


# ==============================================================================
# 2. live delivery to the real clients
# ==============================================================================


async def test_live_delivery_to_python_and_js_clients(
    pg_hub: HubProcess, py_clients: Any, js: JsDriver
) -> None:
    hub = pg_hub
    log_start = len(hub.log())
    org, other = new_org(), new_org()
    topic, other_topic = f"org:{org}", f"org:{other}"

    py_a = await py_clients(hub, hub.token(sub="py-a", orgs=[org]))
    py_b = await py_clients(hub, hub.token(sub="py-b", orgs=[other]))
    got_a, got_b = Collector(), Collector()
    channel_a = py_a.channel(topic, {"config": {"broadcast": {"self": False}}})
    channel_a.on_broadcast("*", got_a)
    await py_subscribe(channel_a)
    channel_b = py_b.channel(other_topic, {"config": {"broadcast": {"self": False}}})
    channel_b.on_broadcast("*", got_b)
    await py_subscribe(channel_b)
    await js.client("a", hub.http_url, hub.token(sub="js-a", orgs=[org]))
    await js.client("b", hub.http_url, hub.token(sub="js-b", orgs=[other]))
    await js_subscribe(js, "a", "c", topic)
    await js_subscribe(js, "b", "c", other_topic)

    big = {"blob": "x" * 12_000, "note": "over the 8000-byte NOTIFY limit"}
    sent = [
        ("order.created", {"id": 1}),
        ("order.paid", {"id": 1, "amount": 9.5}),
        ("note", {"text": "héllo ✓", "nested": [1, None, True]}),
        ("big", big),
    ]
    since = js.mark()
    async with HubClient(hub.http_url, hub.admin_token()) as client:
        stored = [await client.publish(org, *sent[0])]
        stored += await client.publish_many(org, sent[1:3])
        stored.append(await client.publish(org, *sent[3]))
        # The other org's sentinel is announced after every event above.
        sentinel = await client.publish(other, "b.only", {"ok": True})
    assert [s["seq"] for s in stored] == [1, 2, 3, 4]

    await got_a.wait(lambda items: len(items) >= 4, "python to receive 4 events")
    assert [(m["event"], m["payload"]) for m in got_a.items] == sent
    await js_wait_seq(js, "a", 4, since)
    got_js = js_broadcasts(js, "a", since)
    assert [(e["event"], e["payload"]) for e in got_js] == sent
    assert [e["meta"] for e in got_js] == [{"id": s["id"], "seq": s["seq"]} for s in stored]
    kinds = [f["kind"] for f in js.frames("a", "in", since) if f["binary"]]
    assert kinds == [4, 4, 4, 4], "vsn 2.0.0 broadcasts are binary kind 4 frames"

    # The other org's members saw their own event and nothing of org's.
    await got_b.wait(lambda items: len(items) >= 1, "the other org's event")
    await js.wait_event(T, since, ev="broadcast", client="b", event="b.only")
    await asyncio.sleep(0.2)
    assert [(m["event"], m["payload"]) for m in got_b.items] == [("b.only", {"ok": True})]
    [b_event] = js_broadcasts(js, "b", since)
    assert b_event["meta"] == {"id": sentinel["id"], "seq": 1}
    assert len(got_a.items) == 4 and len(js_broadcasts(js, "a", since)) == 4
    assert_clean_log(hub, log_start)


# ==============================================================================
# 3. change capture from an app table
# ==============================================================================

#: (label, event, filter, predicate on the row the filter is evaluated on).
ROW = dict[str, Any]
BINDINGS: list[tuple[str, str, str | None, Callable[[ROW], bool]]] = [
    ("all", "*", None, lambda row: True),
    ("gt", "*", "n=gt.5", lambda row: row["n"] > 5),
    ("eq", "*", "n=eq.7", lambda row: row["n"] == 7),
    ("neq", "*", "n=neq.7", lambda row: row["n"] != 7),
    ("lt", "*", "n=lt.5", lambda row: row["n"] < 5),
    ("lte", "*", "n=lte.5", lambda row: row["n"] <= 5),
    ("gte", "*", "n=gte.7", lambda row: row["n"] >= 7),
    ("in", "*", "n=in.(3,9)", lambda row: row["n"] in (3, 9)),
    ("title", "*", "title=eq.alpha", lambda row: row["title"] == "alpha"),
    ("inserts", "INSERT", None, lambda row: True),
    ("updates_gt", "UPDATE", "n=gt.5", lambda row: row["n"] > 5),
    ("deletes", "DELETE", None, lambda row: True),
]
COLUMNS = [
    {"name": "id", "type": "int8"},
    {"name": "org_id", "type": "text"},
    {"name": "title", "type": "text"},
    {"name": "n", "type": "int4"},
    {"name": "meta", "type": "jsonb"},
]


def expected_for(
    changes: list[tuple[str, ROW | None, ROW | None]], event: str, predicate: Callable[[ROW], bool]
) -> list[tuple[str, int]]:
    """The (type, row id) a binding must receive, in order.  Filters are
    evaluated on the new row, on the old row for a DELETE."""
    out = []
    for kind, record, old in changes:
        row = old if kind == "DELETE" else record
        assert row is not None
        if (event == "*" or event == kind) and predicate(row):
            out.append((kind, row["id"]))
    return out


def py_change_key(payload: dict[str, Any]) -> tuple[str, int]:
    data = payload["data"]
    row = data["old_record"] if data["type"] == "DELETE" else data["record"]
    return data["type"], row["id"]


def js_change_key(event: dict[str, Any]) -> tuple[str, int]:
    payload = event["payload"]
    row = payload["old"] if payload["eventType"] == "DELETE" else payload["new"]
    return payload["eventType"], row["id"]


async def test_postgres_changes_to_python_and_js_with_filters_and_tenancy(
    pg_hub: HubProcess,
    pg_dsn: str,  # noqa: F811
    py_clients: Any,
    js: JsDriver,
    wires: Any,
) -> None:
    hub = pg_hub
    log_start = len(hub.log())
    org, other = new_org(), new_org()
    table = "items_" + uuid.uuid4().hex[:8]
    env = {"HUB_DATABASE_URL": pg_dsn}
    conn = await asyncpg.connect(pg_dsn)
    try:
        await conn.execute(
            f"CREATE TABLE public.{table} (id bigserial PRIMARY KEY, org_id text, "
            "title text, n int, meta jsonb)"
        )
        await conn.execute(f"CREATE TABLE public.{table}_noorg (id int)")

        # Tracking a table without an org column fails clearly.
        code, out, err = await run_cli("track", f"public.{table}_noorg", env=env)
        assert code == 1 and "has no column 'org_id'" in err, (code, out, err)
        code, out, err = await run_cli("track", f"public.{table}", env=env)
        assert code == 0, err
        assert out.strip() == f"tracking public.{table} (org column org_id)"

        def binding(event: str, flt: str | None) -> dict[str, Any]:
            raw = {"event": event, "schema": "public", "table": table}
            return {**raw, "filter": flt} if flt else raw

        # A filter that does not parse: the join is refused.
        wire = await wires(hub, hub.token(sub="raw", orgs=[org]))
        reply = await wire.join(f"org:{org}", {"postgres_changes": [binding("*", "n=like.5")]})
        assert reply["status"] == "error", reply
        assert reply["response"]["reason"].startswith("InvalidJoinPayload"), reply

        # Python (member of org): one callback per binding, plus one binding
        # that names the other org's rows.
        py_a = await py_clients(hub, hub.token(sub="py-a", orgs=[org]))
        channel = py_a.channel(f"org:{org}", {"config": {}})
        py_got: dict[str, Collector] = {}
        for label, event, flt, _ in BINDINGS:
            py_got[label] = Collector()
            channel.on_postgres_changes(
                event, py_got[label], table=table, schema="public", filter=flt
            )
        py_got["cross"] = Collector()
        channel.on_postgres_changes(
            "*", py_got["cross"], table=table, schema="public", filter=f"org_id=eq.{other}"
        )
        py_broadcasts = Collector()
        channel.on_broadcast("*", py_broadcasts)
        await py_subscribe(channel)
        # Python (member of the other org): everything of its own org.
        py_b = await py_clients(hub, hub.token(sub="py-b", orgs=[other]))
        channel_b = py_b.channel(f"org:{other}", {"config": {}})
        py_other = Collector()
        channel_b.on_postgres_changes("*", py_other, table=table, schema="public")
        await py_subscribe(channel_b)

        # supabase-js: the same bindings.
        js_bindings = [{"label": label, **binding(event, flt)} for label, event, flt, _ in BINDINGS]
        js_bindings.append({"label": "cross", **binding("*", f"org_id=eq.{other}")})
        await js.client("a", hub.http_url, hub.token(sub="js-a", orgs=[org]))
        await js.client("b", hub.http_url, hub.token(sub="js-b", orgs=[other]))
        js_since = js.mark()
        await js_subscribe(js, "a", "c", f"org:{org}", {}, js_bindings)
        await js_subscribe(
            js, "b", "c", f"org:{other}", {}, [{"label": "all", **binding("*", None)}]
        )

        # The writes: two orgs, every kind of change, each in its own transaction.
        changes: dict[str, list[tuple[str, ROW | None, ROW | None]]] = {org: [], other: []}
        rows: dict[int, ROW] = {}
        meta = {"tags": ["a", "b"], "deep": {"x": 1}}

        async def insert(owner: str | None, title: str, n: int) -> int:
            row_id = await conn.fetchval(
                f"INSERT INTO public.{table} (org_id, title, n, meta) "
                "VALUES ($1, $2, $3, $4::jsonb) RETURNING id",
                owner,
                title,
                n,
                json.dumps(meta),
            )
            row = {"id": row_id, "org_id": owner, "title": title, "n": n, "meta": meta}
            rows[row_id] = row
            if owner is not None:
                changes[owner].append(("INSERT", dict(row), None))
            return int(row_id)

        async def update(row_id: int, **values: Any) -> None:
            old = dict(rows[row_id])
            sets = ", ".join(f"{k} = ${i}" for i, k in enumerate(values, 2))
            await conn.execute(
                f"UPDATE public.{table} SET {sets} WHERE id = $1", row_id, *values.values()
            )
            new = rows[row_id] = {**old, **values}
            if old["org_id"] == new["org_id"]:
                changes[new["org_id"]].append(("UPDATE", dict(new), old))
            else:  # moved: a DELETE for the old org, an INSERT for the new one
                changes[old["org_id"]].append(("DELETE", None, old))
                changes[new["org_id"]].append(("INSERT", dict(new), None))

        async def delete(row_id: int) -> None:
            await conn.execute(f"DELETE FROM public.{table} WHERE id = $1", row_id)
            old = rows.pop(row_id)
            changes[old["org_id"]].append(("DELETE", None, old))

        a = {t: await insert(org, t, n) for t, n in (("alpha", 3), ("beta", 5), ("gamma", 7))}
        b = {t: await insert(other, t, n) for t, n in (("alpha", 3), ("beta", 5), ("gamma", 7))}
        a["delta"] = await insert(org, "delta", 9)
        await insert(None, "nobody", 7)  # no org: not captured
        await update(a["alpha"], n=6)
        await update(a["gamma"], n=8, title="gamma2")
        await update(b["gamma"], n=9)
        await update(a["beta"], org_id=other)  # moves to the other org
        await delete(a["delta"])
        await delete(b["alpha"])
        async with conn.transaction():  # two changes in one transaction
            await update(a["alpha"], n=7)
            await delete(a["gamma"])
        end_a = await insert(org, "end", 100)
        committed = time.time()
        end_b = await insert(other, "end", 100)

        # Every change of the org reached the "all" binding, in order.
        await py_got["all"].wait(
            lambda items: any(py_change_key(p) == ("INSERT", end_a) for p in items), "org's end"
        )
        await py_other.wait(
            lambda items: any(py_change_key(p) == ("INSERT", end_b) for p in items), "other's end"
        )
        first_end = await js.wait_for(
            lambda e: (
                e["ev"] == "change"
                and e["client"] == "a"
                and e["label"] == "all"
                and js_change_key(e) == ("INSERT", end_a)
            ),
            T,
            "js to receive org's end",
            js_since,
        )
        latency = first_end["wall"] - committed
        assert latency < 1.0, f"an insert took {latency:.3f} s to reach supabase-js"
        await js.wait_for(
            lambda e: (
                e["ev"] == "change" and e["client"] == "b" and js_change_key(e) == ("INSERT", end_b)
            ),
            T,
            "js b to receive other's end",
            js_since,
        )

        for label, event, _, predicate in BINDINGS:
            want = expected_for(changes[org], event, predicate)
            got = [py_change_key(p) for p in py_got[label].items]
            assert got == want, f"python binding {label}"
            got_js = [
                js_change_key(e) for e in js.select(js_since, ev="change", client="a", label=label)
            ]
            assert got_js == want, f"js binding {label}"
        assert py_got["cross"].items == [], "a filter naming another org's rows got rows"
        assert js.select(js_since, ev="change", client="a", label="cross") == []
        want_other = expected_for(changes[other], "*", lambda row: True)
        assert [py_change_key(p) for p in py_other.items] == want_other
        assert [
            js_change_key(e) for e in js.select(js_since, ev="change", client="b")
        ] == want_other
        assert len(want_other) == 7 and len(changes[org]) == 11

        # The full Supabase shape, as the Python client got it.
        all_items = py_got["all"].items
        for payload, (kind, record, old) in zip(all_items, changes[org], strict=True):
            data = payload["data"]
            assert data["schema"] == "public" and data["table"] == table
            assert data["type"] == kind
            assert data["columns"] == COLUMNS
            assert COMMIT_TIMESTAMP.fullmatch(data["commit_timestamp"]), data
            assert data["errors"] is None
            assert data.get("record") == record
            assert data.get("old_record") == old
            assert ("record" in data) == (kind != "DELETE")
            assert ("old_record" in data) == (kind != "INSERT")
            assert isinstance(payload["ids"], list) and payload["ids"]
        # ... and on supabase-js's wire (vsn 2.0.0 text frames).
        wire_changes = [
            json.loads(f["text"])
            for f in js.frames("a", "in", js_since)
            if not f["binary"] and '"postgres_changes"' in f["text"]
        ]
        pushes = [f for f in wire_changes if f[3] == "postgres_changes"]
        assert len(pushes) == len(changes[org])
        update_push = next(f[4] for f in pushes if f[4]["data"]["type"] == "UPDATE")
        assert set(update_push) == {"ids", "data"}
        assert set(update_push["data"]) == {
            "schema",
            "table",
            "commit_timestamp",
            "type",
            "columns",
            "errors",
            "record",
            "old_record",
        }
        moved = next(
            e["payload"]
            for e in js.select(js_since, ev="change", client="b", label="all")
            if e["payload"]["eventType"] == "INSERT" and e["payload"]["new"]["id"] == a["beta"]
        )
        assert moved["new"]["org_id"] == other and moved["errors"] is None
        assert moved["new"]["meta"] == meta and moved["old"] == {}
        assert moved["schema"] == "public" and moved["table"] == table
        assert COMMIT_TIMESTAMP.fullmatch(moved["commit_timestamp"])

        # hub untrack: writes are no longer captured.
        code, out, err = await run_cli("untrack", f"public.{table}", env=env)
        assert code == 0, err
        assert out.strip() == f"no longer tracking public.{table}"
        changes_before = await conn.fetchval(
            "SELECT count(*) FROM hub.events WHERE org = $1 AND kind = 'change'", org
        )
        await conn.execute(
            f"INSERT INTO public.{table} (org_id, title, n) VALUES ($1, 'late', 50)", org
        )
        async with HubClient(hub.http_url, hub.admin_token()) as client:
            await client.publish(org, "after.untrack", {})
        await py_broadcasts.wait(lambda items: len(items) >= 1, "the sentinel broadcast")
        await js.wait_event(T, js_since, ev="broadcast", client="a", event="after.untrack")
        assert len(py_got["all"].items) == len(changes[org])
        assert len(js.select(js_since, ev="change", client="a", label="all")) == len(changes[org])
        changes_after = await conn.fetchval(
            "SELECT count(*) FROM hub.events WHERE org = $1 AND kind = 'change'", org
        )
        assert changes_after == changes_before == len(changes[org])
    finally:
        await conn.close()
    assert_clean_log(hub, log_start)


async def test_postgres_changes_from_per_org_schemas_to_python_and_js(
    pg_hub: HubProcess,
    pg_dsn: str,  # noqa: F811
    py_clients: Any,
    js: JsDriver,
) -> None:
    """The schema-per-org layout: `hub track --org-from-schema` on a table of
    every org's schema, one schema created after the command; realtime-py
    and supabase-js members get their own org's rows, in order, from a
    binding on their schema, and nothing from the other org's schema."""
    hub = pg_hub
    log_start = len(hub.log())
    tag = uuid.uuid4().hex[:6]
    pattern, table = f"s{tag}_{{org}}", "posts"
    org, other = new_org(), new_org()
    schema, other_schema = f"s{tag}_{org}", f"s{tag}_{other}"
    env = {"HUB_DATABASE_URL": pg_dsn}
    conn = await asyncpg.connect(pg_dsn)
    ddl = "(id bigserial PRIMARY KEY, title text NOT NULL)"
    try:
        await conn.execute(f'CREATE SCHEMA "{schema}"; CREATE TABLE "{schema}".posts {ddl}')
        code, out, err = await run_cli("track", table, "--org-from-schema", pattern, env=env)
        assert code == 0, err
        assert f"tracking {schema}.posts (org {org})" in out, out
        assert "1 tracked now" in out and "(event trigger)" in out, out
        code, _, err = await run_cli("track", "public.posts", "--org-from-schema", pattern, env=env)
        assert code == 1 and "bare name" in err, err
        # The other org's schema arrives after the command.
        await conn.execute(
            f'CREATE SCHEMA "{other_schema}"; CREATE TABLE "{other_schema}".posts {ddl}'
        )

        py = await py_clients(hub, hub.token(sub="py-a", orgs=[org]))
        channel = py.channel(f"org:{org}", {"config": {}})
        py_own, py_cross = Collector(), Collector()
        channel.on_postgres_changes("*", py_own, table=table, schema=schema)
        channel.on_postgres_changes("*", py_cross, table=table, schema=other_schema)
        await py_subscribe(channel)
        await js.client("b", hub.http_url, hub.token(sub="js-b", orgs=[other]))
        js_since = js.mark()
        await js_subscribe(
            js,
            "b",
            "c",
            f"org:{other}",
            {},
            [
                {"label": "own", "event": "*", "schema": other_schema, "table": table},
                {"label": "any", "event": "INSERT", "schema": "*", "table": table},
            ],
        )

        for n in range(5):
            await conn.execute(f'INSERT INTO "{schema}".posts (title) VALUES ($1)', f"a{n}")
            await conn.execute(f'INSERT INTO "{other_schema}".posts (title) VALUES ($1)', f"b{n}")
        await conn.execute(f"UPDATE \"{other_schema}\".posts SET title = 'b-last' WHERE id = 5")
        await conn.execute(f'DELETE FROM "{schema}".posts WHERE id = 1')

        await py_own.wait(lambda items: len(items) >= 6, "python's six changes")
        assert [py_change_key(p) for p in py_own.items] == [
            *(("INSERT", i) for i in range(1, 6)),
            ("DELETE", 1),
        ]
        assert {p["data"]["schema"] for p in py_own.items} == {schema}
        await js.wait_for(
            lambda e: (
                e["ev"] == "change" and e["label"] == "own" and js_change_key(e)[0] == "UPDATE"
            ),
            T,
            "supabase-js's update",
            js_since,
        )
        got = [js_change_key(e) for e in js.select(js_since, ev="change", client="b", label="own")]
        assert got == [*(("INSERT", i) for i in range(1, 6)), ("UPDATE", 5)]
        titles = [
            e["payload"]["new"]["title"]
            for e in js.select(js_since, ev="change", client="b", label="any")
        ]
        assert titles == [f"b{n}" for n in range(5)]
        assert py_cross.items == [], "a binding on another org's schema got rows"
    finally:
        await conn.close()
    assert_clean_log(hub, log_start)


@pytest.fixture
async def tenant_dsns() -> AsyncIterator[tuple[str, str]]:
    """Two migrated tenant databases of this test; request it before
    ``fresh_hub`` so the hubs stop before the databases are dropped."""
    async with fresh_database() as t1, fresh_database() as t2:
        yield t1, t2


async def test_three_layouts_and_a_live_move_through_hub_serve(
    fresh_dsn: str,  # noqa: F811
    tenant_dsns: tuple[str, str],
    fresh_hub: Any,
    py_clients: Any,
    js: JsDriver,
    wires: Any,
) -> None:
    """A network of a control database (shared tables), a tenant database
    holding one org, and a tenant database with a schema per org: realtime-py
    and supabase-js members get their own org's events in each; then the
    first org moves to the second database while a publisher goes on, and
    every subscriber gets every event once, in order, seqs without a gap; a
    client that was away resumes across the move."""
    control, (t1, t2) = fresh_dsn, tenant_dsns
    env = {"HUB_DATABASE_URL": control}
    shared, solo, schemed = new_org(), new_org(), new_org()
    for org, dsn in ((solo, t1), (schemed, t2)):
        code, out, err = await run_cli("orgs", "add", org, "--database", dsn, env=env)
        assert code == 0 and f"org {org} lives in" in out, (out, err)
    code, _, err = await run_cli("orgs", "add", solo, "--database", t2, env=env)
    assert code == 1 and "already registered" in err, err
    conn = await asyncpg.connect(t2)
    try:
        await conn.execute(
            f'CREATE SCHEMA "org_{schemed}"; CREATE TABLE "org_{schemed}".posts '
            "(id bigserial PRIMARY KEY, title text)"
        )
    finally:
        await conn.close()
    code, out, err = await run_cli(
        "track", "posts", "--org-from-schema", "org_{org}", "--database", t2, env=env
    )
    assert code == 0 and f"tracking org_{schemed}.posts (org {schemed})" in out, (out, err)

    hub = await fresh_hub(env)
    async with httpx.AsyncClient(base_url=hub.http_url, timeout=T) as http:
        readyz = (await http.get("/readyz")).json()
    assert list(readyz["databases"].values()) == [True, True, True], readyz

    # realtime-py: the schema-per-org table's rows in the second database.
    py = await py_clients(hub, hub.token(sub="py", orgs=[schemed]))
    channel = py.channel(f"org:{schemed}", {"config": {}})
    rows = Collector()
    channel.on_postgres_changes("INSERT", rows, table="posts", schema=f"org_{schemed}")
    await py_subscribe(channel)
    # supabase-js: the org of its own database, and the shared one.
    await js.client("solo", hub.http_url, hub.token(sub="js-solo", orgs=[solo]))
    await js.client("shared", hub.http_url, hub.token(sub="js-shared", orgs=[shared]))
    since = js.mark()
    await js_subscribe(js, "solo", "c", f"org:{solo}", {"private": True})
    await js_subscribe(js, "shared", "c", f"org:{shared}", {"private": True})
    wire = await wires(hub, hub.token(sub="raw", orgs=[solo]))
    mark = wire.mark()
    await wire.joined(f"org:{solo}", replay_config(after=0))

    admin = hub.admin_token()
    async with HubClient(hub.http_url, admin) as client:
        await publish_range(client, shared, 1, 3)
        await publish_range(client, solo, 1, 200)
        conn = await asyncpg.connect(t2)
        try:
            await conn.execute(f"INSERT INTO \"org_{schemed}\".posts (title) VALUES ('hello')")
        finally:
            await conn.close()
        await rows.wait(lambda items: len(items) == 1, "the schema-per-org row")
        assert rows.items[0]["data"]["record"]["title"] == "hello"
        await js_wait_seq(js, "shared", 3, since)
        await js_wait_seq(js, "solo", 200, since)

        # The move, while a publisher goes on through the hub.
        stop = asyncio.Event()
        published: list[int] = []

        async def publish() -> None:
            n = 200
            while not stop.is_set():
                n += 1
                event = await client.publish(solo, "tick", {"i": n})
                published.append(event["seq"])

        publisher = asyncio.create_task(publish())
        await asyncio.sleep(0.5)
        code, out, err = await run_cli("orgs", "move", solo, "--to", t2, env=env)
        assert code == 0 and "writes were blocked" in out, (out, err)
        moved_at = published[-1]
        await asyncio.sleep(0.5)
        stop.set()
        await publisher
        last = published[-1]
        assert last > moved_at + 1, "the publisher went on after the move"
        assert published == list(range(201, last + 1))

        await wire.wait_seq(f"org:{solo}", last, mark)
        assert wire.seqs(f"org:{solo}", mark) == list(range(1, last + 1))
        await js_wait_seq(js, "solo", last, since)
        got = [(e.get("meta") or {}).get("seq") for e in js_broadcasts(js, "solo", since)]
        assert got == list(range(1, last + 1))
        assert len(js_broadcasts(js, "shared", since)) == 3

        # A client that was away during the move resumes across it.
        away = await wires(hub, hub.token(sub="away", orgs=[solo]))
        away_mark = away.mark()
        await away.joined(f"org:{solo}", replay_config(after=150))
        await away.wait_seq(f"org:{solo}", last, away_mark)
        assert away.seqs(f"org:{solo}", away_mark) == list(range(151, last + 1))

        # The mother names where each org lives; the log left the first database.
        async with httpx.AsyncClient(base_url=hub.http_url, timeout=T) as http:
            response = await http.get(
                "/api/mother/stats", headers={"Authorization": f"Bearer {admin}"}
            )
        stats = response.json()
        where = {o["org"]: o["database"] for o in stats["orgs"]}
        assert where[shared] == "control" and where[solo].endswith(t2.rsplit("/", 1)[1])
    code, out, _ = await run_cli("orgs", "list", env=env)
    assert solo in out and t2.rsplit("/", 1)[1] in out
    conn = await asyncpg.connect(t1)
    try:
        assert await conn.fetchval("SELECT count(*) FROM hub.events") == 0
    finally:
        await conn.close()


# ==============================================================================
# 4. resume
# ==============================================================================


async def test_postgres_changes_on_a_free_channel_name_keep_to_the_subscribers_orgs(
    pg_hub: HubProcess,
    pg_dsn: str,  # noqa: F811
    py_clients: Any,
) -> None:
    """Supabase apps bind postgres_changes on any channel name
    (``schema-db-changes``).  On the hub such a channel gets the rows of the
    subscriber's own orgs only, whatever the binding names."""
    hub, org, other = pg_hub, new_org(), new_org()
    table = "todos_" + uuid.uuid4().hex[:8]
    conn = await asyncpg.connect(pg_dsn)
    try:
        await conn.execute(f"CREATE TABLE public.{table} (id bigserial PRIMARY KEY, org_id text)")
        code, _, err = await run_cli("track", f"public.{table}", env={"HUB_DATABASE_URL": pg_dsn})
        assert code == 0, err
        got: dict[str, Collector] = {}
        for name, orgs in (("mine", [org]), ("theirs", [other])):
            client = await py_clients(hub, hub.token(sub=name, orgs=orgs))
            channel = client.channel("schema-db-changes", {"config": {}})
            got[name] = Collector()
            channel.on_postgres_changes("INSERT", got[name], table=table, schema="public")
            await py_subscribe(channel)
        mine = [
            await conn.fetchval(f"INSERT INTO public.{table} (org_id) VALUES ($1) RETURNING id", o)
            for o in (org, other, org)
        ]
        await got["mine"].wait(lambda items: len(items) >= 2, "the member's two rows")
        await got["theirs"].wait(lambda items: len(items) >= 1, "the other member's row")
        await asyncio.sleep(0.3)
        assert [p["data"]["record"]["id"] for p in got["mine"].items] == [mine[0], mine[2]]
        assert [p["data"]["record"]["id"] for p in got["theirs"].items] == [mine[1]]
    finally:
        await conn.close()
    assert "Traceback" not in hub.log()


async def test_resume_raw_websocket_while_publishing(pg_hub: HubProcess, wires: Any) -> None:
    log_start = len(pg_hub.log())
    org = new_org()
    await resume_scenario(pg_hub, org, RawResumer(pg_hub, org, wires))
    assert_clean_log(pg_hub, log_start)


async def test_resume_supabase_js_private_replay_while_publishing(
    pg_hub: HubProcess, js: JsDriver
) -> None:
    log_start = len(pg_hub.log())
    org = new_org()
    await resume_scenario(pg_hub, org, JsResumer(pg_hub, org, js))
    assert_clean_log(pg_hub, log_start)


async def test_resume_since_and_limit(
    pg_hub: HubProcess, wires: Any, py_clients: Any, js: JsDriver
) -> None:
    """Supabase's form: ``{"since": MS}`` and ``{"since": MS, "limit": N}``."""
    hub = pg_hub
    org = new_org()
    topic = f"org:{org}"
    token = hub.token(sub="since", orgs=[org])
    async with HubClient(hub.http_url, hub.admin_token()) as client:
        for i in range(1, 6):
            await client.publish(org, "tick", {"i": i})
            await asyncio.sleep(0.03)
        history = await client.history(org)
        since_ms = int(history[2]["created_at"] * 1000)  # seq 3's millisecond
        assert history[1]["created_at"] * 1000 < since_ms

        # Raw: 3..5 replayed, then live.
        wire = await wires(hub, token)
        mark = wire.mark()
        await wire.joined(topic, replay_config(since=since_ms))
        await wire.wait_seq(topic, 5, mark)
        await client.publish(org, "tick", {"i": 6})
        await wire.wait_seq(topic, 6, mark)
        got = wire.broadcasts(topic, mark)
        assert [b["meta"]["seq"] for b in got] == [3, 4, 5, 6]
        assert assert_replayed_prefix(got) == (3, 1)

        # With a limit: the oldest page, then ReplayTruncated; after= continues.
        mark = wire.mark()
        await wire.joined(topic, replay_config(since=since_ms, limit=2))
        system = await wire.wait_system(topic, mark)
        assert wire.seqs(topic, mark) == [3, 4]
        assert system["extension"] == "replay" and system["status"] == "ok", system
        assert system["message"].startswith("ReplayTruncated"), system
        assert system["resume_after"] == 4
        mark = wire.mark()
        await wire.joined(topic, replay_config(after=4))
        await wire.wait_seq(topic, 6, mark)
        assert wire.seqs(topic, mark) == [5, 6]

        # realtime-py, which types the since form itself.
        py = await py_clients(hub, token)
        got_py = Collector()
        channel = py.channel(
            topic, {"config": {"broadcast": {"replay": {"since": since_ms}}, "private": True}}
        )
        channel.on_broadcast("*", got_py)
        await py_subscribe(channel)
        await got_py.wait(lambda items: len(items) >= 4, "python's replay")
        await client.publish(org, "tick", {"i": 7})
        await got_py.wait(lambda items: len(items) >= 5, "python's live event")
        assert [m["payload"]["i"] for m in got_py.items] == [3, 4, 5, 6, 7]
        assert [bool(m.get("meta", {}).get("replayed")) for m in got_py.items] == [
            True,
            True,
            True,
            True,
            False,
        ]

        # supabase-js with private: true.
        await js.client("s", hub.http_url, token)
        since = js.mark()
        await js_subscribe(js, "s", "c", topic, replay_config(since=since_ms))
        await js_wait_seq(js, "s", 7, since)
        await client.publish(org, "tick", {"i": 8})
        await js_wait_seq(js, "s", 8, since)
        got_js = js_broadcasts(js, "s", since)
        assert [e["meta"]["seq"] for e in got_js] == [3, 4, 5, 6, 7, 8]
        assert assert_replayed_prefix(got_js) == (5, 1)


async def test_replay_truncated_then_continue(
    pg_dsn: str,  # noqa: F811
    fresh_hub: Any,
    wires: Any,
    js: JsDriver,
) -> None:
    hub = await fresh_hub({"HUB_DATABASE_URL": pg_dsn, "HUB_REPLAY_MAX": "50"})
    org = new_org()
    topic = f"org:{org}"
    token = hub.token(sub="truncated", orgs=[org])
    async with HubClient(hub.http_url, hub.admin_token()) as client:
        wire = await wires(hub, token)
        await wire.joined(topic, {"broadcast": {}})
        await publish_range(client, org, 1, 10)
        await wire.wait_seq(topic, 10)
        assert wire.seqs(topic) == list(range(1, 11))
        await wire.close()
        await publish_range(client, org, 11, 130)  # 120 missed, 50 may be replayed

        # A live watcher, used as a sentinel below.
        watcher = await wires(hub, hub.token(sub="watcher", orgs=[org]))
        await watcher.joined(topic, {"broadcast": {}})

        wire = await wires(hub, token)
        mark = wire.mark()
        await wire.joined(topic, replay_config(after=10))
        system = await wire.wait_system(topic, mark)
        got = wire.broadcasts(topic, mark)
        assert [b["meta"]["seq"] for b in got] == list(range(11, 61))
        assert all(b["meta"].get("replayed") is True for b in got)
        assert system["extension"] == "replay" and system["status"] == "ok", system
        assert system["message"].startswith("ReplayTruncated"), system
        assert system["resume_after"] == 60

        # Durable delivery is paused on that channel (a gap would follow).
        await client.publish(org, "tick", {"i": 131})
        await watcher.wait_seq(topic, 131)
        await asyncio.sleep(0.3)
        assert wire.seqs(topic, mark)[-1] == 60

        cursor, seen = 60, list(range(11, 61))
        for _ in range(5):
            mark = wire.mark()
            await wire.joined(topic, replay_config(after=cursor))
            await wire.wait_for(
                lambda f: (
                    (f["event"] == "system" and f["topic"] == f"realtime:{topic}")
                    or f["payload"].get("meta", {}).get("seq") == 131
                ),
                "the rest of the replay",
                mark,
            )
            seqs = wire.seqs(topic, mark)
            seen += seqs
            systems = wire.system(topic, mark)
            if not systems:
                break
            assert systems[0]["resume_after"] == seqs[-1] > cursor, systems
            cursor = seqs[-1]
        assert seen == list(range(11, 132))
        await client.publish(org, "tick", {"i": 132})
        await wire.wait_seq(topic, 132, mark)
        live = wire.broadcasts(topic, mark)[-1]
        assert live["meta"]["seq"] == 132 and "replayed" not in live["meta"]

        # supabase-js gets the same system message on its channel.
        await js.client("t", hub.http_url, token)
        since = js.mark()
        await js_subscribe(js, "t", "c", topic, replay_config(after=0))
        told = await js.wait_event(T, since, ev="system", client="t")
        assert told["payload"]["message"].startswith("ReplayTruncated"), told
        assert told["payload"]["resume_after"] == 50
        assert [e["meta"]["seq"] for e in js_broadcasts(js, "t", since)] == list(range(1, 51))


# ==============================================================================
# 5. restart
# ==============================================================================


async def test_resume_across_hub_restart_with_events_written_while_down(
    pg_dsn: str,  # noqa: F811
    fresh_hub: Any,
    wires: Any,
) -> None:
    org = new_org()
    topic = f"org:{org}"
    table = "restart_" + uuid.uuid4().hex[:8]
    secret = "s" * 40
    env = {"HUB_DATABASE_URL": pg_dsn}
    conn = await asyncpg.connect(pg_dsn)
    try:
        await conn.execute(
            f"CREATE TABLE public.{table} (id bigserial PRIMARY KEY, org_id text, n int)"
        )
        code, _, err = await run_cli("track", f"public.{table}", env=env)
        assert code == 0, err
        changes = {"event": "*", "schema": "public", "table": table}

        first = await fresh_hub(env, secret)
        token = first.token(sub="restart", orgs=[org])
        wire = await wires(first, token)
        await wire.joined(topic, {"broadcast": {}, "postgres_changes": [changes]})
        async with HubClient(first.http_url, first.admin_token()) as client:
            await publish_range(client, org, 1, 20)
        await wire.wait_seq(topic, 20)
        assert wire.seqs(topic) == list(range(1, 21))
        await asyncio.to_thread(stop_hub, first)
        await asyncio.wait_for(wire._task, T)  # the hub closed the socket

        # While no hub runs: events and tracked-table writes, straight into SQL.
        async def append(i: int) -> None:
            await conn.execute(
                "SELECT hub.append_event($1, 'event', 'tick', $2::jsonb)",
                org,
                json.dumps({"i": i}),
            )

        async with conn.transaction():
            for i in range(21, 31):
                await append(i)
        row_ids = [
            await conn.fetchval(
                f"INSERT INTO public.{table} (org_id, n) VALUES ($1, $2) RETURNING id", org, n
            )
            for n in range(31, 36)
        ]
        for i in range(36, 46):
            await append(i)

        second = await fresh_hub(env, secret)
        wire = await wires(second, token)
        mark = wire.mark()
        await wire.joined(topic, {**replay_config(after=20), "postgres_changes": [changes]})
        await wire.wait_seq(topic, 45, mark)
        # Live after the replay: a published event and a table write.
        async with HubClient(second.http_url, second.admin_token()) as client:
            await client.publish(org, "tick", {"i": 46})
        live_row = await conn.fetchval(
            f"INSERT INTO public.{table} (org_id, n) VALUES ($1, 47) RETURNING id", org
        )
        await wire.wait_for(
            lambda f: (
                f["event"] == "postgres_changes"
                and f["payload"]["data"]["record"]["id"] == live_row
            ),
            "the live change",
            mark,
        )
        await asyncio.sleep(0.2)
    finally:
        await conn.close()

    received: list[tuple[str, Any, bool]] = []
    for f in wire.frames[mark:]:
        if f["topic"] != f"realtime:{topic}":
            continue
        if f["event"] == "broadcast":
            meta = f["payload"]["meta"]
            assert f["payload"]["payload"] == {"i": meta["seq"]}
            received.append(("event", meta["seq"], bool(meta.get("replayed"))))
        elif f["event"] == "postgres_changes":
            data = f["payload"]["data"]
            received.append(("change", data["record"]["id"], False))
    expected = (
        [("event", i, True) for i in range(21, 31)]
        + [("change", row_id, False) for row_id in row_ids]
        + [("event", i, True) for i in range(36, 46)]
        + [("event", 46, False), ("change", live_row, False)]
    )
    assert received == expected


# ==============================================================================
# 6. the embedded default: in-memory store
# ==============================================================================


async def test_embedded_store_publish_history_and_replay(mem_hub: HubProcess, wires: Any) -> None:
    hub = mem_hub
    log_start = len(hub.log())
    org = new_org()
    topic = f"org:{org}"
    token = hub.token(sub="mem", orgs=[org])
    async with HubClient(hub.http_url, token) as client:
        wire = await wires(hub, token)
        await wire.joined(topic, {"broadcast": {}})
        await publish_range(client, org, 1, 10)
        await wire.wait_seq(topic, 10)
        assert wire.seqs(topic) == list(range(1, 11))
        await wire.close()
        await publish_range(client, org, 11, 30)
        history = await client.history(org, after=8, limit=5)
        assert [(e["seq"], e["payload"]) for e in history] == [(i, {"i": i}) for i in range(9, 14)]

        wire = await wires(hub, token)
        mark = wire.mark()
        await wire.joined(topic, replay_config(after=10))
        await wire.wait_seq(topic, 30, mark)
        await client.publish(org, "tick", {"i": 31})
        await wire.wait_seq(topic, 31, mark)
        got = wire.broadcasts(topic, mark)
        assert [b["meta"]["seq"] for b in got] == list(range(11, 32))
        assert assert_replayed_prefix(got) == (20, 1)

        since_ms = int((await client.history(org, after=29, limit=1))[0]["created_at"] * 1000)
        mark = wire.mark()
        await wire.joined(topic, replay_config(since=since_ms))
        await wire.wait_seq(topic, 31, mark)
        assert wire.seqs(topic, mark)[-2:] == [30, 31]
        assert all(b["meta"]["replayed"] for b in wire.broadcasts(topic, mark))
    assert_clean_log(hub, log_start)


async def test_embedded_store_forgotten_events_can_be_resumed(fresh_hub: Any, wires: Any) -> None:
    """The in-memory store keeps 20 events per org here; a client that
    missed more is told which events are lost (ReplayGap), then gets what is
    still held and the live stream, in the same join."""
    hub = await fresh_hub({"HUB_DATABASE_URL": "", "HUB_MEMORY_EVENTS_PER_ORG": "20"})
    org = new_org()
    topic = f"org:{org}"
    token = hub.token(sub="forgotten", orgs=[org])
    async with HubClient(hub.http_url, token) as client:
        await publish_range(client, org, 1, 30)  # 1..10 are forgotten
        wire = await wires(hub, token)
        mark = wire.mark()
        await wire.joined(topic, replay_config(after=0))
        await wire.wait_seq(topic, 30, mark)
        systems = wire.system(topic, mark)
        assert systems, "the client was not told that events 1..10 are gone"
        assert systems[0]["message"] == "ReplayGap: events 1..10 are no longer held", systems
        assert systems[0]["resume_after"] == 10
        # What is still held follows in the same join, then the live stream.
        await client.publish(org, "t", {"n": 31})
        await wire.wait_seq(topic, 31, mark)
        seen = wire.seqs(topic, mark)
        assert seen == list(range(11, 32))


async def test_replay_past_the_retention_reports_the_gap(
    fresh_dsn: str,  # noqa: F811
    fresh_hub: Any,
    wires: Any,
    tmp_path: Path,
) -> None:
    """Events dropped by the retention (`hub archive`): a client resuming
    from before them is told which are gone (ReplayGap), then gets what is
    held and the live stream; the same when nothing after them is held."""
    hub = await fresh_hub({"HUB_DATABASE_URL": fresh_dsn})
    org, quiet = new_org(), new_org()
    token = hub.token(sub="retention", orgs=[org, quiet])
    async with HubClient(hub.http_url, token) as client:
        await publish_range(client, org, 1, 4)
        await publish_range(client, quiet, 1, 3)
        conn = await asyncpg.connect(fresh_dsn)
        try:
            await conn.execute(
                "UPDATE hub.events SET created_at = now() - interval '10 days' "
                "WHERE org = ANY($1::text[])",
                [org, quiet],
            )
            await caught_up(conn, "mother")  # the mother holds back what it has not applied
        finally:
            await conn.close()
        code, out, err = await run_cli(
            "archive",
            "--dir",
            str(tmp_path),
            "--retention",
            "7d",
            env={"HUB_DATABASE_URL": fresh_dsn},
        )
        # Stamped 10 days back after the fact, they sit in the default
        # partition (no node made partitions for those days then).
        assert code == 0 and "deleted 7 events of hub.events_default" in out, (code, out, err)
        await client.publish(org, "t", {"i": 5})

        wire = await wires(hub, token)
        mark = wire.mark()
        await wire.joined(f"org:{org}", replay_config(after=2))
        await wire.wait_seq(f"org:{org}", 5, mark)
        systems = wire.system(f"org:{org}", mark)
        assert systems[0]["message"] == "ReplayGap: events 3..4 are no longer held", systems
        assert systems[0]["resume_after"] == 4
        assert wire.seqs(f"org:{org}", mark) == [5]

        await wire.joined(f"org:{quiet}", replay_config(after=1))
        await client.publish(quiet, "t", {"i": 4})
        await wire.wait_seq(f"org:{quiet}", 4, mark)
        systems = wire.system(f"org:{quiet}", mark)
        assert systems[0]["message"] == "ReplayGap: events 2..3 are no longer held", systems
        assert wire.seqs(f"org:{quiet}", mark) == [4]


async def test_realtime_py_resumes_after_the_last_event_id(
    pg_hub: HubProcess, py_clients: Any
) -> None:
    """realtime-py keeps only meta.id: resuming with replay.after_id must
    deliver exactly what was missed, marked replayed, then the live stream."""
    org = new_org()
    token = pg_hub.token(sub="py-resume", orgs=[org])
    async with HubClient(pg_hub.http_url, token) as client:
        await publish_range(client, org, 1, 5)
        last_id = (await client.history(org, after=3, limit=1))[0]["id"]  # seq 4
        got: list[dict[str, Any]] = []
        one, three = asyncio.Event(), asyncio.Event()

        def on_tick(message: dict[str, Any]) -> None:
            got.append(message)
            one.set()
            if len(got) >= 3:
                three.set()

        py = await py_clients(pg_hub, token)
        channel = py.channel(
            f"org:{org}", {"config": {"broadcast": {"replay": {"after_id": last_id}}}}
        )
        channel.on_broadcast("tick", on_tick)
        await py_subscribe(channel)
        # The replay reads the store after the join reply: events appended
        # before that read are replayed too, rightly.  Publish once the
        # replay has delivered, so 6 and 7 can only come live.
        await asyncio.wait_for(one.wait(), 10)
        await publish_range(client, org, 6, 7)
        await asyncio.wait_for(three.wait(), 10)
    assert [m["payload"]["i"] for m in got] == [5, 6, 7]
    assert [m.get("meta", {}).get("replayed") for m in got] == [True, None, None]
