"""Helpers for the multi-node tests: several real `hub serve` processes
sharing a Redis prefix (and optionally a PostgreSQL event store), real nginx
in front of them, a raw WebSocket client, a TCP proxy that can break the link
to Redis, and /metrics parsing.

* :class:`Cluster` starts nodes with the conftest's ``make_hub`` (one JWT
  secret for all, a unique ``HUB_REDIS_PREFIX`` per test), tracks every
  client, proxy and nginx it made, and tears all of it down.
* :class:`Nginx` runs nginx with ``deploy/nginx/hub.conf`` itself as the
  configuration: only the upstream servers, the listen address and the log
  paths are replaced, so the tests prove that the shipped file works.  nginx
  is installed from the distribution's packages when it is missing; if that
  is impossible the tests fail (they never skip).
* :class:`Conn` speaks the wire protocol by hand (vsn 1.0.0 text, vsn 2.0.0
  text plus binary kinds 3 and 4) through :mod:`hub.client.realtime`, keeps
  every message it received and the presence each channel shows.
* :class:`RedisProxy` sits between one node and Redis and can cut the link
  (``down``: connections reset, new ones refused) or stall it (``freeze``:
  bytes are held, nothing flows), without touching the shared Redis server.

Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import re
import secrets
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import asyncpg
import httpx
import redis.asyncio as aioredis
from prometheus_client.parser import text_string_to_metric_families
from realtime import AsyncRealtimeChannel, AsyncRealtimeClient, RealtimeSubscribeStates

from hub.client.realtime import AsyncClient, Disconnected, Message, Refused, wire_topic
from tests.support.hubs import ROOT, HubProcess, free_port

REDIS_URL: Final = os.environ.get("HUB_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
POSTGRES_ADMIN_DSN: Final = os.environ.get(
    "HUB_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
NGINX_TEMPLATE: Final = ROOT / "deploy" / "nginx" / "hub.conf"
#: Default bound of every single wait.
T: Final = 5.0
V1: Final = "1.0.0"
V2: Final = "2.0.0"

MakeHub = Callable[..., HubProcess]


def new_org() -> str:
    return "c" + secrets.token_hex(6)


def new_prefix() -> str:
    """A Redis key and channel prefix nobody else uses."""
    return f"test-{secrets.token_hex(6)}"


async def wait_until(
    check: Callable[[], Awaitable[Any]], within: float, what: str, every: float = 0.05
) -> Any:
    """Poll ``check`` until it returns something truthy; fail after
    ``within`` seconds, saying what was awaited and what was last seen."""
    deadline = time.monotonic() + within
    last: Any = None
    while True:
        last = await check()
        if last:
            return last
        if time.monotonic() > deadline:
            raise AssertionError(f"waited {within} s for {what}; last: {last!r}")
        await asyncio.sleep(every)


# -- metrics -----------------------------------------------------------------------


@dataclass
class Metrics:
    """One scrape of ``/metrics``: sample name + labels -> value."""

    samples: list[tuple[str, dict[str, str], float]]

    @classmethod
    def parse(cls, text: str) -> Metrics:
        samples = [
            (sample.name, dict(sample.labels), float(sample.value))
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        ]
        return cls(samples)

    def value(self, name: str, **labels: str) -> float:
        """The sum of ``name``'s samples whose labels include ``labels``;
        0 when there is none (a labelled counter with no sample yet)."""
        return sum(
            value
            for sample, have, value in self.samples
            if sample == name and all(have.get(k) == v for k, v in labels.items())
        )

    def names(self) -> set[str]:
        return {name for name, _, _ in self.samples}


async def scrape(base_url: str) -> Metrics:
    async with httpx.AsyncClient(base_url=base_url, timeout=T) as http:
        response = await http.get("/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain"), response.headers
    return Metrics.parse(response.text)


async def readyz(base_url: str) -> int:
    async with httpx.AsyncClient(base_url=base_url, timeout=T) as http:
        return (await http.get("/readyz")).status_code


# -- raw WebSocket client -------------------------------------------------------------

#: One message from the hub, whatever its wire format (the shared client's).
Msg = Message


class Conn:
    """A raw client (:class:`hub.client.realtime.AsyncClient`, vsn 1.0.0 or
    2.0.0), keeping every message it received, plus the presence each
    channel shows (``presence_state`` then ``presence_diff``, as the real
    clients apply them).  Heartbeats go out every 20 s.
    """

    def __init__(self, client: AsyncClient, name: str) -> None:
        self.client = client
        self.vsn = client.vsn
        self.name = name
        self.push = client.push
        #: topic -> phx_ref -> (key, meta)
        self.presence: dict[str, dict[str, tuple[str, dict[str, Any]]]] = {}
        client.on_message = self._apply_presence

    @classmethod
    async def open(cls, base_ws_url: str, token: str, vsn: str = V2, name: str = "") -> Conn:
        """``base_ws_url`` is ``ws://HOST:PORT/realtime/v1/websocket``."""
        client = await AsyncClient.connect(
            base_ws_url, token, vsn, within=T, heartbeat=20, max_size=None
        )
        return cls(client, name or f"conn-{vsn}")

    @property
    def messages(self) -> list[Msg]:
        return self.client.messages

    @property
    def join_refs(self) -> dict[str, str]:
        return self.client.join_refs

    @property
    def closed(self) -> asyncio.Event:
        return self.client.closed

    @property
    def close_code(self) -> int | None:
        return self.client.close_code

    def next_ref(self) -> str:
        return self.client.next_ref()

    # -- reading ---------------------------------------------------------

    def _apply_presence(self, msg: Msg) -> None:
        if msg.event == "presence_state":
            table = self.presence[msg.topic] = {}
            for key, entry in msg.payload.items():
                for meta in entry["metas"]:
                    table[meta["phx_ref"]] = (key, meta)
        elif msg.event == "presence_diff":
            table = self.presence.setdefault(msg.topic, {})
            for entry in msg.payload["leaves"].values():
                for meta in entry["metas"]:
                    table.pop(meta["phx_ref"], None)
            for key, entry in msg.payload["joins"].items():
                for meta in entry["metas"]:
                    table[meta["phx_ref"]] = (key, meta)

    def mark(self) -> int:
        return len(self.messages)

    def select(self, predicate: Callable[[Msg], bool], since: int = 0) -> list[Msg]:
        return [m for m in self.messages[since:] if predicate(m)]

    def broadcasts(self, event: str | None = None, since: int = 0) -> list[Msg]:
        return self.select(
            lambda m: m.event == "broadcast" and (event is None or m.user_event == event), since
        )

    async def wait(
        self, predicate: Callable[[Msg], bool], within: float = T, what: str = "", since: int = 0
    ) -> Msg:
        """The first message from ``since`` on matching ``predicate``."""
        try:
            return await self.client.wait_for(predicate, within=within, since=since)
        except (TimeoutError, Disconnected):
            why = f"closed with {self.close_code}" if self.closed.is_set() else "timed out"
            raise AssertionError(
                f"{self.name}: waited for {what or predicate} ({why}); "
                f"last messages: {self.messages[-5:]!r}"
            ) from None

    async def wait_count(
        self, predicate: Callable[[Msg], bool], count: int, within: float, what: str
    ) -> list[Msg]:
        deadline = time.monotonic() + within
        while len(got := self.select(predicate)) < count:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self.closed.is_set():
                raise AssertionError(
                    f"{self.name}: {len(got)} of {count} {what} after {within} s "
                    f"(closed: {self.close_code})"
                )
            await self.client.wait_changed(remaining)
        return got

    def presence_keys(self, topic: str) -> set[str]:
        return {key for key, _ in self.presence.get(topic, {}).values()}

    async def wait_presence(
        self, topic: str, keys: set[str], within: float = T, what: str = ""
    ) -> float:
        """Wait until the channel's presence shows exactly ``keys``; returns
        the monotonic time it did."""
        deadline = time.monotonic() + within
        while self.presence_keys(topic) != keys:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self.closed.is_set():
                raise AssertionError(
                    f"{self.name}: presence of {topic} is {sorted(self.presence_keys(topic))}, "
                    f"expected {sorted(keys)} {what} (waited {within} s, "
                    f"closed: {self.close_code})"
                )
            await self.client.wait_changed(remaining)
        return time.monotonic()

    # -- sending ---------------------------------------------------------

    async def join(
        self,
        topic: str,
        config: dict[str, Any] | None = None,
        *,
        expect: str = "ok",
        within: float = T,
    ) -> Msg:
        """Join ``realtime:<topic>`` (or ``topic`` when it has the prefix);
        returns the reply, after checking its status."""
        try:
            reply = await self.client.join(wire_topic(topic), config, within=within)
        except Refused as refused:
            reply = refused.reply
        assert reply.payload["status"] == expect, reply.payload
        return reply

    async def broadcast(self, topic: str, event: str, payload: Any) -> None:
        """A client broadcast: text on vsn 1.0.0, binary kind 3 on vsn 2.0.0
        (what realtime-js sends)."""
        ref = self.next_ref()
        await self.client.broadcast(wire_topic(topic), event, payload, ref=ref, binary=True)

    async def track(self, topic: str, fields: dict[str, Any]) -> None:
        try:
            reply = await self.client.track(wire_topic(topic), fields)
        except Refused as refused:
            reply = refused.reply
        assert reply.payload["status"] == "ok", reply.payload

    async def close(self) -> None:
        await self.client.close()


# -- the real Python client ----------------------------------------------------------


class Recorder:
    """A callback that keeps what it is called with, for waiting on."""

    def __init__(self) -> None:
        self.items: list[Any] = []
        self._changed = asyncio.Event()

    def __call__(self, *args: Any) -> None:
        self.items.append(args[0] if len(args) == 1 else args)
        self._changed.set()
        self._changed = asyncio.Event()

    async def wait_count(
        self, count: int, within: float, what: str, predicate: Callable[[Any], bool] | None = None
    ) -> list[Any]:
        deadline = time.monotonic() + within
        while len(got := [i for i in self.items if predicate is None or predicate(i)]) < count:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"{len(got)} of {count} {what} after {within} s: {got[-3:]}")
            changed = self._changed
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), remaining)
        return got

    async def wait_for(self, predicate: Callable[[Any], bool], within: float, what: str) -> Any:
        return (await self.wait_count(1, within, what, predicate))[0]


@dataclass
class PyChannel:
    """A realtime-py (vsn 1.0.0) client with one channel, recording its
    broadcasts (``messages``) and subscribe states (``states``)."""

    client: AsyncRealtimeClient
    channel: AsyncRealtimeChannel
    messages: Recorder
    states: Recorder

    def events(self, event: str) -> list[dict[str, Any]]:
        return [m for m in self.messages.items if m["event"] == event]

    async def subscribed(self, count: int = 1, within: float = T) -> None:
        """Wait for the ``count``-th SUBSCRIBED state."""
        await self.states.wait_count(
            count,
            within,
            "SUBSCRIBED states",
            lambda s: s[0] == RealtimeSubscribeStates.SUBSCRIBED,
        )


# -- Redis ---------------------------------------------------------------------------


class RedisProxy:
    """A TCP proxy from one hub node to Redis, to break that node's link alone.

    * :meth:`down`: every connection is reset and the port refuses new ones
      (Redis restarting, or unreachable);
    * :meth:`freeze`: connections stay open but no byte moves in either
      direction (Redis or the network stalled); :meth:`thaw` lets the held
      bytes through;
    * :meth:`up`: back to normal.
    """

    def __init__(self, target: tuple[str, int] = ("127.0.0.1", 6379)) -> None:
        self.target = target
        self.port = free_port()
        self._server: asyncio.Server | None = None
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._pairs: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        #: local addresses ("ip:port") of the proxy's connections to Redis,
        #: which is how Redis names them in CLIENT LIST.
        self.upstream_addrs: set[str] = set()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def up(self) -> None:
        self._flowing.set()
        if self._server is None:
            self._server = await asyncio.start_server(
                self._handle, "127.0.0.1", self.port, reuse_address=True
            )

    async def down(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for client, upstream in list(self._pairs):
            for writer in (client, upstream):
                with contextlib.suppress(OSError):
                    sock = writer.get_extra_info("socket")
                    if sock is not None:
                        # RST, not FIN: like a Redis that went away.
                        linger = struct.pack("ii", 1, 0)
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
                writer.close()
        self._pairs.clear()
        self.upstream_addrs.clear()
        if server is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(server.wait_closed(), T)

    def freeze(self) -> None:
        self._flowing.clear()

    def thaw(self) -> None:
        self._flowing.set()

    async def close(self) -> None:
        await self.down()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, OSError):
                await task

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.wait_for(asyncio.open_connection(*self.target), T)
        except (OSError, TimeoutError):
            writer.close()
            return
        host, port = up_writer.get_extra_info("sockname")[:2]
        addr = f"{host}:{port}"
        self.upstream_addrs.add(addr)
        pair = (writer, up_writer)
        self._pairs.add(pair)
        for source, sink in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pump(source, sink))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pump(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        try:
            while True:
                data = await source.read(65536)
                if not data:
                    break
                await self._flowing.wait()
                sink.write(data)
                await sink.drain()
        except (OSError, ConnectionError):
            pass
        finally:
            with contextlib.suppress(OSError, RuntimeError):
                sink.close()


async def redis_client() -> aioredis.Redis:
    client = aioredis.from_url(REDIS_URL, socket_timeout=T, socket_connect_timeout=T)
    try:
        await client.ping()
    except Exception as exc:
        await client.aclose()
        raise RuntimeError(f"Redis is required for these tests, at {REDIS_URL}: {exc!r}") from exc
    return client


class NodesWatch:
    """Listens to the nodes' heartbeat channel (``<prefix>:nodes``) like a
    node does, and records ``(monotonic time, kind, node)`` per message."""

    def __init__(self, prefix: str) -> None:
        self.channel = f"{prefix}:nodes"
        self.seen: list[tuple[float, str, str]] = []
        self._client: aioredis.Redis | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._client = await redis_client()
        pubsub = self._client.pubsub()
        await pubsub.subscribe(self.channel)
        self._task = asyncio.create_task(self._read(pubsub))

    async def _read(self, pubsub: Any) -> None:
        try:
            while True:
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                if message is not None:
                    data: bytes = message["data"]
                    node = json.loads(data[1:])["n"]
                    self.seen.append((time.monotonic(), data[:1].decode(), node))
        finally:
            await pubsub.aclose()

    def heartbeats(self, node: str, after: float) -> list[float]:
        return [at for at, kind, who in self.seen if kind == "H" and who == node and at > after]

    async def wait_heartbeat(self, node: str, after: float, within: float = T) -> float:
        """The time of ``node``'s first heartbeat seen after ``after``."""
        found = await wait_until(
            lambda: _first(self.heartbeats(node, after)), within, f"a heartbeat of {node}"
        )
        return float(found)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._client is not None:
            await self._client.aclose()


async def _first(values: list[float]) -> float | None:
    return values[0] if values else None


async def pubsub_addrs() -> set[str]:
    """``addr`` of every pub/sub connection Redis has right now."""
    client = await redis_client()
    try:
        clients = await client.client_list(_type="pubsub")
    finally:
        await client.aclose()
    return {entry["addr"] for entry in clients}


async def kill_pubsub(addrs: set[str]) -> int:
    """``CLIENT KILL TYPE pubsub ADDR a`` for each of ``addrs``: only this
    test's node, never the other users of the shared Redis."""
    client = await redis_client()
    killed = 0
    try:
        for addr in addrs:
            killed += int(
                await client.execute_command("CLIENT", "KILL", "TYPE", "pubsub", "ADDR", addr)
            )
    finally:
        await client.aclose()
    return killed


# -- PostgreSQL ---------------------------------------------------------------------


def _dsn_for(database: str) -> str:
    base, _, _ = POSTGRES_ADMIN_DSN.rpartition("/")
    return f"{base}/{database}"


async def create_event_store(within: float = 60.0) -> tuple[str, str]:
    """Create a fresh database and run ``hub migrate`` on it (retrying while
    the migration fails, for up to ``within`` seconds); ``(name, dsn)``."""
    name = f"hub_cluster_{secrets.token_hex(6)}"
    try:
        conn = await asyncpg.connect(POSTGRES_ADMIN_DSN, timeout=10)
    except (OSError, asyncpg.PostgresError) as exc:
        raise RuntimeError(
            f"PostgreSQL is required for these tests, at {POSTGRES_ADMIN_DSN}: {exc!r}"
        ) from exc
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    dsn = _dsn_for(name)
    deadline = time.monotonic() + within
    while True:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "hub",
            "migrate",
            env={**os.environ, "HUB_DATABASE_URL": dsn},
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            cwd=ROOT,
        )
        out, _ = await asyncio.wait_for(process.communicate(), 60)
        if process.returncode == 0:
            return name, dsn
        if time.monotonic() > deadline:
            await drop_event_store(name)
            raise RuntimeError(f"hub migrate failed ({process.returncode}):\n{out.decode()}")
        await asyncio.sleep(2)


async def drop_event_store(name: str) -> None:
    conn = await asyncpg.connect(POSTGRES_ADMIN_DSN, timeout=10)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


# -- nginx -----------------------------------------------------------------------------


def ensure_nginx() -> str:
    """The nginx binary; installs the distribution's package when missing.
    Raises (the test fails) when that is impossible."""

    def find() -> str | None:
        return shutil.which("nginx") or next(
            (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(p, os.X_OK)),
            None,
        )

    found = find()
    if found:
        return found
    lock_path = Path("/tmp/hub-tests-nginx-install.lock")
    with lock_path.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        found = find()
        if found:
            return found
        if shutil.which("apt-get") is None:
            raise RuntimeError("nginx is missing and there is no apt-get to install it")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        log = []
        install = ["apt-get", "install", "-y", "--no-install-recommends", "nginx"]
        for command in (install, ["apt-get", "update"], install):
            result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
            log.append(f"$ {' '.join(command)} -> {result.returncode}\n{result.stderr[-2000:]}")
            if command is install and result.returncode == 0:
                break
        found = find()
        if not found:
            raise RuntimeError("could not install nginx:\n" + "\n".join(log))
        return found


def render_nginx_conf(
    template: str, upstreams: list[int], listen: int, workdir: Path, nginx_user: str | None
) -> str:
    """A complete nginx.conf around ``template`` (deploy/nginx/hub.conf, an
    http-context file) whose upstream servers are ``127.0.0.1:<upstreams>``
    (keeping the template's server parameters), listening on
    ``127.0.0.1:<listen>``, logging into ``workdir``."""
    block = re.search(r"upstream\s+hub_nodes\s*\{(?P<body>.*?)\n\}", template, re.S)
    assert block, "deploy/nginx/hub.conf has no `upstream hub_nodes { ... }` block"
    body = block.group("body")
    servers = re.findall(r"^(\s*)server\s+\S+?(\s[^;]*)?;\s*$", body, re.M)
    assert len(servers) >= 2, "the upstream should list several servers"
    indent, params = servers[0][0], servers[0][1]
    lines = [
        line for line in body.splitlines() if not re.match(r"^\s*server\s", line) and line.strip()
    ]
    lines += [f"{indent}server 127.0.0.1:{port}{params};" for port in upstreams]
    conf = template[: block.start("body")] + "\n" + "\n".join(lines) + template[block.end("body") :]
    conf, listens = re.subn(
        r"^(\s*)listen\s+80;", rf"\1listen 127.0.0.1:{listen};", conf, flags=re.M
    )
    assert listens == 1, "deploy/nginx/hub.conf should have exactly one `listen 80;`"
    conf = conf.replace("/var/log/nginx/", f"{workdir}/")
    temp = "\n".join(
        f"    {kind}_temp_path {workdir}/{kind}_temp;"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    user = f"user {nginx_user};\n" if nginx_user else ""
    return (
        f"{user}daemon off;\nworker_processes 1;\npid {workdir}/nginx.pid;\n"
        f"error_log {workdir}/main_error.log info;\n"
        "events { worker_connections 1024; }\n"
        f"http {{\n    access_log {workdir}/default_access.log;\n{temp}\n{conf}\n}}\n"
    )


class Nginx:
    """A real nginx running deploy/nginx/hub.conf in front of some nodes."""

    def __init__(self, workdir: Path, upstreams: list[int]) -> None:
        self.binary = ensure_nginx()
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.upstreams = upstreams
        self.conf_path = workdir / "nginx.conf"
        user = "root" if os.geteuid() == 0 else None
        self.conf_path.write_text(
            render_nginx_conf(NGINX_TEMPLATE.read_text(), upstreams, self.port, workdir, user)
        )
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/realtime/v1/websocket"

    def check(self) -> None:
        result = subprocess.run(
            [self.binary, "-t", "-c", str(self.conf_path)],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert result.returncode == 0, f"nginx -t failed:\n{result.stderr}"

    def start(self) -> None:
        self.check()
        log = (self.workdir / "nginx.out").open("wb")
        self.process = subprocess.Popen(
            [self.binary, "-c", str(self.conf_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + 10
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"nginx exited with {self.process.returncode}:\n{self.logs()}")
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5),
            ):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"nginx did not listen:\n{self.logs()}")
            time.sleep(0.05)

    def logs(self) -> str:
        parts = []
        for path in [*sorted(self.workdir.glob("*.log")), self.workdir / "nginx.out"]:
            if path.exists():
                parts.append(f"--- {path.name}\n{path.read_text(errors='replace')[-4000:]}")
        return "\n".join(parts)

    def access_log(self) -> str:
        path = self.workdir / "hub_access.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        process = self.process
        if process is None or process.poll() is not None:
            return
        # SIGQUIT: graceful; SIGTERM: fast.  Tests want fast.
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


# -- the cluster ----------------------------------------------------------------------


class Cluster:
    """Hub nodes sharing one Redis prefix, one JWT secret and optionally one
    PostgreSQL event store, plus what the test opened against them."""

    def __init__(self, make_hub: MakeHub, tmp_path: Path, **env: str) -> None:
        self.make_hub = make_hub
        self.tmp_path = tmp_path
        self.prefix = new_prefix()
        self.secret = secrets.token_urlsafe(32)
        self.env = {
            "HUB_REDIS_URL": REDIS_URL,
            "HUB_REDIS_PREFIX": self.prefix,
            "HUB_DRAIN_TIMEOUT": "2",
            **env,
        }
        self.nodes: list[HubProcess] = []
        self.conns: list[Conn] = []
        self.proxies: list[RedisProxy] = []
        self.nginxes: list[Nginx] = []
        self.closers: list[Callable[[], Awaitable[Any]]] = []
        self.database: str | None = None
        self._count = 0

    # -- nodes -----------------------------------------------------------

    def _start_node(self, env: dict[str, str]) -> HubProcess:
        return self.make_hub(env, self.secret)

    async def start(self, count: int = 1, **env: str) -> list[HubProcess]:
        """Start ``count`` nodes at once; each waits for /healthz and /readyz."""
        envs = []
        for _ in range(count):
            self._count += 1
            envs.append({**self.env, "HUB_NODE_ID": f"n{self._count}", **env})
        nodes = await asyncio.gather(
            *(asyncio.to_thread(self._start_node, node_env) for node_env in envs)
        )
        for node in nodes:
            url = node.http_url
            await wait_until(
                lambda url=url: _is_ready(url), 10, f"{url}/readyz to answer 200", every=0.1
            )
        self.nodes.extend(nodes)
        return list(nodes)

    async def use_event_store(self) -> str:
        """Create and migrate a database; later nodes use it.  Returns its DSN."""
        name, dsn = await create_event_store()
        self.database = name
        self.env["HUB_DATABASE_URL"] = dsn
        return dsn

    @staticmethod
    def node_id(node: HubProcess) -> str:
        return node.env["HUB_NODE_ID"]

    def token(self, sub: str, orgs: list[str] | None = None, **extra: Any) -> str:
        from hub.auth.tokens import issue_token

        return issue_token(self.secret, sub=sub, orgs=orgs, extra=extra or None)

    def admin_token(self) -> str:
        from hub.auth.tokens import issue_token

        return issue_token(self.secret, sub="admin", role="service_role")

    # -- clients ---------------------------------------------------------

    async def conn(
        self, where: HubProcess | Nginx, token: str, vsn: str = V2, name: str = ""
    ) -> Conn:
        conn = await Conn.open(where.ws_url, token, vsn, name)
        self.conns.append(conn)
        return conn

    async def py_channel(
        self,
        where: HubProcess | Nginx,
        token: str,
        topic: str,
        config: dict[str, Any] | None = None,
    ) -> PyChannel:
        """A realtime-py client (``http://HOST/realtime/v1``, as supabase-py
        builds it) subscribed to ``topic``."""
        base = where.http_url.replace("http://", "ws://") + "/realtime/v1"
        client = AsyncRealtimeClient(base, token, max_retries=8, initial_backoff=0.5)
        self.closers.append(client.close)
        await asyncio.wait_for(client.connect(), T)
        messages, states = Recorder(), Recorder()
        options = {
            "config": {"broadcast": {"self": False}, "presence": {"key": ""}, **(config or {})}
        }
        channel = client.channel(topic, options).on_broadcast("*", messages)  # type: ignore[arg-type]
        await asyncio.wait_for(channel.subscribe(lambda state, error: states(state, error)), T)
        py = PyChannel(client, channel, messages, states)
        await py.subscribed()
        return py

    async def watch_nodes(self) -> NodesWatch:
        watch = NodesWatch(self.prefix)
        await watch.start()
        self.closers.append(watch.close)
        return watch

    async def proxy(self) -> RedisProxy:
        proxy = RedisProxy()
        await proxy.up()
        self.proxies.append(proxy)
        return proxy

    def nginx(self, nodes: list[HubProcess]) -> Nginx:
        self._count += 1
        server = Nginx(self.tmp_path / f"nginx-{self._count}", [n.port for n in nodes])
        self.nginxes.append(server)
        server.start()
        return server

    async def aclose(self) -> None:
        for conn in self.conns:
            with contextlib.suppress(Exception):
                await conn.close()
        for closer in self.closers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(closer(), T)
        for server in self.nginxes:
            server.stop()
        # Nodes first (make_hub stops them too, but their Redis link must go
        # before the proxies do, or they spend the teardown reconnecting).
        for node in self.nodes:
            if node.process.poll() is None:
                node.process.terminate()
        for node in self.nodes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                await asyncio.to_thread(node.process.wait, 10)
        for proxy in self.proxies:
            await proxy.close()
        await _forget_prefix(self.prefix)
        if self.database is not None:
            await drop_event_store(self.database)

    def logs(self) -> str:
        return "\n".join(
            f"--- node {self.node_id(n)} (port {n.port})\n{n.log()[-6000:]}" for n in self.nodes
        )


async def _is_ready(url: str) -> bool:
    try:
        return await readyz(url) == 200
    except httpx.HTTPError:
        return False


async def _forget_prefix(prefix: str) -> None:
    """Delete any key this run's nodes left in Redis."""
    client = await redis_client()
    try:
        keys = [key async for key in client.scan_iter(match=f"{prefix}:*", count=500)]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


async def rest_broadcast(
    base_url: str, token: str, topic: str, event: str, payload: Any
) -> httpx.Response:
    body = {"messages": [{"topic": topic, "event": event, "payload": payload}]}
    async with httpx.AsyncClient(base_url=base_url, timeout=T) as http:
        return await http.post(
            "/realtime/v1/api/broadcast", json=body, headers={"Authorization": f"Bearer {token}"}
        )


async def publish_event(
    http: httpx.AsyncClient, token: str, org: str, event_type: str, payload: Any
) -> dict[str, Any]:
    """``POST /api/orgs/{org}/events``; returns ``{"seq", "id"}``."""
    response = await http.post(
        f"/api/orgs/{org}/events",
        json={"type": event_type, "payload": payload},
        headers={"Authorization": f"Bearer {token}"},
    )
    assert response.status_code == 201, (response.status_code, response.text)
    event: dict[str, Any] = response.json()["events"][0]
    return event


def seqs(messages: list[Msg]) -> list[int]:
    return [m.meta["seq"] for m in messages]
