"""The chaos run: durable events must reach every subscriber exactly once, in
order, while the hub's dependencies and nodes fail around them.

Modelled on centrifuge's invariant-checking stress test.  One command::

    python -m loadtest.chaos --seed 7 --duration 60 --nodes 2

starts ``--nodes`` ``hub serve`` processes joined by Redis (a fresh
``HUB_REDIS_PREFIX``) over one fresh PostgreSQL database (created, migrated
and dropped by the run), then, for ``--duration`` seconds:

* publishers append durable events to ``--orgs`` orgs through
  ``POST /api/orgs/{org}/events`` on any live node (batches of 1-5);
* subscribers (raw WebSocket clients, vsn 1.0.0 and 2.0.0 alternately, several
  per org) join ``realtime:org:<org>`` and remember the last ``meta.seq``
  they saw; after *every* disconnect they reconnect to a random live node and
  rejoin with ``config.broadcast.replay = {"after": last_seq}``;
* ``--public-subscribers`` clients of a **public channel on a free name**
  (``realtime:room:chaos-public``, ``config.private = false``, as an
  ordinary Supabase app joins it) reconnect the same way (no replay: public
  channels have none), while a publisher sends REST broadcasts to it, each
  with its own number, through any live node;
* ``--rls-subscribers`` ``postgres_changes`` listeners of a table with row
  security (``public.load_todos`` of ``loadtest/policies.py``: a member
  selects their own rows, ``secret`` is not granted) on the free name
  ``realtime:chaos-todos``, each with the token of one of ``--rls-members``
  members, reconnect the same way, while a writer inserts rows of random
  members straight into the table (~10 a second);
* a seeded schedule of faults, every ``--fault-interval`` seconds on average,
  cycling through all kinds in a seeded order:

  - ``kill``: SIGKILL a hub node (never node 0, the *anchor*, so one node
    lives through the whole run) and restart it 0.5-2.5 s later;
  - ``term``: SIGTERM a node (graceful drain, clients get 1012), restart it;
  - ``listen``: ``pg_terminate_backend`` of every backend of the run's
    database whose ``application_name`` ends with ``listen`` (the nodes'
    LISTEN connections);
  - ``pubsub``: ``CLIENT KILL ID`` of every Redis pub/sub connection owned by
    the run's hub processes (found by matching their sockets against
    ``CLIENT LIST``, so other users of the same Redis are left alone;
    ``--pubsub-kill-all`` sends ``CLIENT KILL TYPE pubsub`` instead);
  - ``drop``: cut a random quarter of the subscribers' sockets;
  - with ``--tenants N`` (default 2) tenant databases, where the orgs start
    spread (``hub orgs add``): ``move``, ``hub orgs move`` of a random org
    to another of the run's databases while it is live, and ``tenant``,
    ``pg_terminate_backend`` of every backend of a random tenant database.

Then the publishers stop, killed nodes come back, and the run checks:

1. **history**: each org's history (``GET /api/orgs/{org}/events``) has
   seqs 1..N without a gap, and holds every event whose append was
   acknowledged (201), with the acknowledged seq and id;
2. **exactly once, in order**: every subscriber received exactly the seqs
   1..N of its org, each once, ascending, with the ids of the history, and
   nothing of any other org (within ``--settle`` seconds after the end);
3. **public free-name channel**: live messages of a public channel have no
   delivery guarantee through a fault, but none may arrive twice or carry a
   durable ``meta.seq``, none may come from another topic, and once every
   node is back a probe broadcast sent through *each* node reaches every
   public subscriber, whichever node it is on (within ``--settle``);
   **postgres_changes over RLS**: every row a listener gets is its
   member's, without ``secret``, and none twice (rows, as in Supabase, may
   be lost through a fault); once every node is back a probe row of each
   member reaches every listener of that member (within ``--settle``);
4. **nodes ready**: every node answers ``/readyz`` 200 (engine and store
   links are back);
5. **connections back to baseline**: after the subscribers close, every
   node's ``hub_connections`` and ``hub_channels`` (``/metrics``) return to
   their value before any client connected (0) within 10 s;
6. **memory back to baseline**: each node's RSS after the subscribers closed
   is at most its baseline plus ``max(--rss-slack-mb, --rss-slack-ratio x
   baseline)``.  The baseline is the RSS at the end of the warm-up (every
   subscriber connected and events flowing for ``--warmup`` seconds), taken
   for every node incarnation alive then; a node restarted later is held to
   the anchor's baseline;
7. **no tracebacks** in any node's log;
8. **database per org** (with tenants): no move is left open and each
   org's log is in the database the registry names, and only there.

It prints every fault as it happens and one line per invariant; the exit
code is 0 only when every invariant holds (1 otherwise, 2 on a setup error).
``--json PATH`` also writes the whole report.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import psutil
import redis.asyncio as aioredis
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from hub.auth.tokens import issue_token
from hub.client.realtime import decode, encode, socket_url
from hub.store import moves, registry
from hub.store.migrate import migrate
from loadtest import policies

ROOT = Path(__file__).resolve().parent.parent
ADMIN_DSN = os.environ.get("HUB_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
FAULTS = ("kill", "term", "listen", "pubsub", "drop")
#: The faults of a run with tenant databases, in addition.
TENANT_FAULTS = ("move", "tenant")
#: The public channel on a free name (a topic outside the reserved namespaces).
PUBLIC_TOPIC = "room:chaos-public"
#: The free name of the postgres_changes listeners of the RLS table.
RLS_TOPIC = "chaos-todos"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Log:
    """Timestamped lines, printed and kept for the report."""

    def __init__(self) -> None:
        self.start = time.monotonic()
        self.lines: list[str] = []

    def __call__(self, message: str) -> None:
        line = f"[{time.monotonic() - self.start:7.2f}s] {message}"
        self.lines.append(line)
        print(line, flush=True)


# -- hub nodes -------------------------------------------------------------------


@dataclass
class Node:
    index: int
    port: int
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    starts: int = 0
    #: RSS at the end of the warm-up, for the incarnation alive then.
    baseline_rss: int | None = None
    baseline_pid: int | None = None

    @property
    def name(self) -> str:
        return f"n{self.index}"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/realtime/v1/websocket"

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def rss(self) -> int | None:
        if not self.alive or self.pid is None:
            return None
        try:
            return int(psutil.Process(self.pid).memory_info().rss)
        except psutil.Error:
            return None


class Cluster:
    def __init__(self, count: int, env: dict[str, str], workdir: Path, log: Log) -> None:
        self.env = env
        self.log = log
        self.nodes = [Node(i, free_port(), workdir / f"node-{i}.log") for i in range(count)]
        #: Nodes that are started and answered /healthz (clients use these).
        self.up: set[int] = set()

    def live(self) -> list[Node]:
        return [node for node in self.nodes if node.index in self.up and node.alive]

    async def start(self, node: Node, http: httpx.AsyncClient) -> None:
        env = {**self.env, "HUB_NODE_ID": f"chaos-{node.name}"}
        with node.log_path.open("ab") as out:
            out.write(f"\n==== start {node.starts + 1} ====\n".encode())
            out.flush()
            command = [sys.executable, "-m", "hub", "serve", "--host", "127.0.0.1"]
            # Popen only forks and execs (it does not wait); the process is
            # watched with poll() and signals, which asyncio's wrapper lacks.
            node.process = subprocess.Popen(  # noqa: ASYNC220
                [*command, "--port", str(node.port)],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
            )
        node.starts += 1
        deadline = time.monotonic() + 20
        while True:
            if node.process.poll() is not None:
                lines = node.log_path.read_text(errors="replace").strip().splitlines()
                raise RuntimeError(
                    f"{node.name} exited with {node.process.returncode}: {lines[-1:] or ''}"
                )
            with contextlib.suppress(httpx.HTTPError):
                response = await http.get(f"{node.url}/healthz", timeout=1)
                if response.status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{node.name} did not become healthy")
            await asyncio.sleep(0.05)
        self.up.add(node.index)

    def signal(self, node: Node, sig: signal.Signals) -> None:
        self.up.discard(node.index)
        if node.process is not None and node.process.poll() is None:
            node.process.send_signal(sig)

    async def wait_exit(self, node: Node, within: float) -> None:
        deadline = time.monotonic() + within
        while node.process is not None and node.process.poll() is None:
            if time.monotonic() > deadline:
                node.process.kill()
            await asyncio.sleep(0.05)

    def stop_all(self) -> None:
        for node in self.nodes:
            if node.alive and node.process is not None:
                node.process.terminate()
        for node in self.nodes:
            if node.process is not None:
                try:
                    node.process.wait(15)
                except subprocess.TimeoutExpired:
                    node.process.kill()
                    node.process.wait()


_METRIC = re.compile(r'^(hub_[a-z_]+)\{node="[^"]*"\} ([0-9.e+-]+)$', re.MULTILINE)


async def metrics(http: httpx.AsyncClient, node: Node) -> dict[str, float]:
    response = await http.get(f"{node.url}/metrics", timeout=3)
    return {name: float(value) for name, value in _METRIC.findall(response.text)}


# -- subscribers -----------------------------------------------------------------


class Subscriber:
    """A client that must see every durable event of its org exactly once."""

    def __init__(self, index: int, org: str, token: str, vsn: str, seed: int) -> None:
        self.index = index
        self.org = org
        self.topic = f"realtime:org:{org}"
        self.token = token
        self.vsn = vsn
        self.rng = random.Random(seed)
        self.last_seq = 0
        self.seqs: list[int] = []
        self.ids: list[str] = []
        self.violations: list[str] = []
        self.replayed = 0
        self.connects = 0
        self.connect_failures = 0
        self.disconnects = 0
        self.refused_joins = 0
        self.truncations = 0
        self.closes: dict[str, int] = {}
        self.ws: ClientConnection | None = None
        self.stopping = False
        self.joined = asyncio.Event()
        self.progress = asyncio.Event()

    def drop(self) -> None:
        """Chaos: cut the socket without a close handshake."""
        ws = self.ws
        if ws is not None:
            ws.transport.abort()

    async def run(self, cluster: Cluster) -> None:
        backoff = 0.05
        while not self.stopping:
            live = cluster.live()
            if not live:
                await asyncio.sleep(0.1)
                continue
            node = self.rng.choice(live)
            try:
                ws = await connect(
                    socket_url(node.ws_url, self.token, self.vsn),
                    open_timeout=5,
                    close_timeout=1,
                    ping_interval=None,
                    max_size=None,
                )
            except (OSError, InvalidHandshake, TimeoutError):
                self.connect_failures += 1
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 1.0)
                continue
            self.ws = ws
            self.connects += 1
            backoff = 0.05
            try:
                await self._session(ws)
            except ConnectionClosed as exc:
                code = exc.rcvd.code if exc.rcvd is not None else None
                self.closes[str(code)] = self.closes.get(str(code), 0) + 1
            except (OSError, TimeoutError) as exc:
                self.closes[type(exc).__name__] = self.closes.get(type(exc).__name__, 0) + 1
            finally:
                self.ws = None
                self.joined.clear()
                if self.stopping:
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(ws.close(), 2)
                else:
                    ws.transport.abort()
            if not self.stopping:
                self.disconnects += 1
                await asyncio.sleep(self.rng.uniform(0.02, 0.3))

    def _frame(self, event: str, payload: Any, ref: str | None, join_ref: str | None) -> str:
        topic = self.topic if event != "heartbeat" else "phoenix"
        return encode(self.vsn, join_ref, ref, topic, event, payload)

    def _join_config(self) -> dict[str, Any]:
        """Rejoin the org topic resuming after the last seq seen."""
        return {
            "broadcast": {"self": False, "ack": False, "replay": {"after": self.last_seq}},
            "presence": {"key": "", "enabled": False},
            "postgres_changes": [],
            "private": True,
        }

    async def _session(self, ws: ClientConnection) -> None:
        join_ref = str(self.connects)
        await ws.send(self._frame("phx_join", {"config": self._join_config()}, join_ref, join_ref))
        beat = asyncio.get_running_loop().time() + 15
        while True:
            now = asyncio.get_running_loop().time()
            if now >= beat:
                await ws.send(self._frame("heartbeat", {}, f"hb{now:.0f}", None))
                beat = now + 15
            try:
                data = await asyncio.wait_for(ws.recv(), max(0.1, beat - now))
            except TimeoutError:
                continue
            msg = decode(data)
            if msg.event == "phx_reply" and msg.ref == join_ref:
                if msg.payload.get("status") != "ok":
                    # e.g. a rate limit during a reconnect storm: retry later.
                    self.refused_joins += 1
                    await asyncio.sleep(0.5)
                    return
                self.joined.set()
            elif msg.event == "phx_close" or not self._take(msg):
                return

    def _take(self, msg: Any) -> bool:
        """One message of the channel; False ends the session (the client
        reconnects and rejoins)."""
        if msg.binary:
            self._durable(msg.topic, msg.payload["event"], msg.payload.get("meta"))
        elif msg.event == "broadcast" and isinstance(msg.payload, dict):
            self._durable(msg.topic, str(msg.payload.get("event")), msg.payload.get("meta"))
        elif msg.event == "system" and isinstance(msg.payload, dict):
            if str(msg.payload.get("message", "")).startswith("ReplayTruncated"):
                # last_seq is resume_after by now: reconnecting resumes.
                self.truncations += 1
                return False
            if msg.payload.get("status") == "error":
                return False
        return True

    def _durable(self, topic: str, event: str, meta: dict[str, Any] | None) -> None:
        if topic != self.topic:
            self.violations.append(f"received a message of {topic} ({event})")
            return
        if not meta or "seq" not in meta:
            self.violations.append(f"broadcast {event!r} without meta.seq")
            return
        seq, event_id = int(meta["seq"]), str(meta.get("id"))
        if meta.get("replayed"):
            self.replayed += 1
        if seq <= self.last_seq:
            self.violations.append(f"duplicate or out of order: seq {seq} after {self.last_seq}")
            return
        if seq != self.last_seq + 1:
            self.violations.append(f"gap: seq {seq} after {self.last_seq}")
        self.last_seq = seq
        self.seqs.append(seq)
        self.ids.append(event_id)
        self.progress.set()


class PublicSubscriber(Subscriber):
    """A client of the public free-name channel :data:`PUBLIC_TOPIC`: it
    rejoins after every disconnect (no replay: public channels have none)
    and records every numbered message it gets, which must never repeat."""

    def __init__(self, index: int, token: str, vsn: str, seed: int) -> None:
        super().__init__(index, "", token, vsn, seed)
        self.topic = f"realtime:{PUBLIC_TOPIC}"
        self.received: set[str] = set()

    def _join_config(self) -> dict[str, Any]:
        return {
            "broadcast": {"self": False, "ack": False},
            "presence": {"key": "", "enabled": False},
            "postgres_changes": [],
            "private": False,
        }

    def _take(self, msg: Any) -> bool:
        if msg.event == "broadcast" and isinstance(msg.payload, dict):
            self._public(msg.topic, msg.payload)
        elif msg.event == "system" and isinstance(msg.payload, dict):
            return msg.payload.get("status") != "error"
        return True

    def _public(self, topic: str, payload: dict[str, Any]) -> None:
        event = str(payload.get("event"))
        if topic != self.topic:
            self.violations.append(f"received a message of {topic} ({event})")
            return
        meta = payload.get("meta")
        if isinstance(meta, dict) and "seq" in meta:
            self.violations.append(f"a public broadcast {event!r} with a durable meta.seq")
        body = payload.get("payload")
        key = str(body.get("k")) if isinstance(body, dict) else None
        if key is None:
            self.violations.append(f"a public broadcast {event!r} without its number")
            return
        if key in self.received:
            self.violations.append(f"public message {key} received twice")
            return
        self.received.add(key)
        self.progress.set()


class RlsSubscriber(PublicSubscriber):
    """A ``postgres_changes`` listener of ``public.load_todos`` (RLS: a
    member sees their own rows; ``secret`` is not granted) on a free name,
    with one member's token: every row it gets must be that member's,
    without ``secret``, and none twice.  Rows have no delivery guarantee
    through a fault (as in Supabase): lost ones are allowed."""

    def __init__(self, index: int, member: str, token: str, vsn: str, seed: int) -> None:
        super().__init__(index, token, vsn, seed)
        self.topic = f"realtime:{RLS_TOPIC}"
        self.member = member

    def _join_config(self) -> dict[str, Any]:
        return {
            "broadcast": {"self": False, "ack": False},
            "presence": {"key": "", "enabled": False},
            "postgres_changes": [{"event": "INSERT", "schema": "public", "table": "load_todos"}],
            "private": False,
        }

    def _take(self, msg: Any) -> bool:
        if msg.event == "postgres_changes" and isinstance(msg.payload, dict):
            self._row(msg.topic, msg.payload.get("data"))
        elif msg.event == "broadcast":
            self.violations.append(f"a broadcast on the postgres_changes channel {msg.topic}")
        elif msg.event == "system" and isinstance(msg.payload, dict):
            return msg.payload.get("status") != "error"
        return True

    def _row(self, topic: str, data: Any) -> None:
        record = data.get("record") if isinstance(data, dict) else None
        if topic != self.topic or not isinstance(record, dict):
            self.violations.append(f"a change of {topic} without a record")
            return
        if record.get("user_id") != self.member:
            self.violations.append(f"a row of {record.get('user_id')} (RLS leak)")
            return
        if "secret" in record:
            self.violations.append("a row with the ungranted column secret")
        title = str(record.get("title"))
        if title in self.received:
            self.violations.append(f"row {title} received twice")
            return
        self.received.add(title)
        self.progress.set()


# -- the run ---------------------------------------------------------------------


@dataclass
class Report:
    seed: int
    actions: dict[str, int] = field(default_factory=dict)
    invariants: list[dict[str, Any]] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)
    log: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.invariants) and all(item["ok"] for item in self.invariants)

    def check(self, log: Log, name: str, ok: bool, detail: str) -> None:
        self.invariants.append({"name": name, "ok": ok, "detail": detail})
        log(f"{'PASS' if ok else 'FAIL'}  {name}: {detail}")


class Chaos:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.rng = random.Random(args.seed)
        self.log = Log()
        self.report = Report(seed=args.seed)
        self.secret = secrets.token_urlsafe(32)
        self.prefix = f"chaos-{args.seed}-{secrets.token_hex(4)}"
        self.database = f"hub_chaos_{secrets.token_hex(6)}"
        self.workdir = Path(tempfile.mkdtemp(prefix="hub-chaos-"))
        self.orgs = [f"chaos{i}" for i in range(args.orgs)]
        self.service = issue_token(self.secret, sub="chaos", role="service_role", ttl=7200)
        self.acked: dict[str, dict[int, str]] = {org: {} for org in self.orgs}
        self.publish_failures = 0
        self.published_requests = 0
        self.publishing = True
        self.cluster: Cluster | None = None
        self.subscribers: list[Subscriber] = []
        self.public_subscribers: list[PublicSubscriber] = []
        self.rls_subscribers: list[RlsSubscriber] = []
        self.rls_written = 0
        self.rls_failures = 0
        self.dsn = ""
        self.public_sent = 0
        self.public_failures = 0
        self.restarts: list[asyncio.Task[None]] = []
        self.tenants = [f"{self.database}_t{i}" for i in range(args.tenants)]
        self.faults = FAULTS + (TENANT_FAULTS if self.tenants else ())
        self.moved = 0

    # -- setup and teardown --------------------------------------------------

    def _base(self, dsn: str) -> str:
        return ADMIN_DSN.rpartition("/")[0] + "/" + dsn

    async def setup(self, http: httpx.AsyncClient) -> Cluster:
        conn = await asyncpg.connect(ADMIN_DSN, timeout=10)
        try:
            await conn.execute(f'CREATE DATABASE "{self.database}"')
        finally:
            await conn.close()
        dsn = self.dsn = self._base(self.database)
        await migrate(dsn)
        # Database per org: the orgs start spread over the control database
        # and the tenant databases.
        for i, tenant in enumerate(self.tenants):
            conn = await asyncpg.connect(ADMIN_DSN, timeout=10)
            try:
                await conn.execute(f'CREATE DATABASE "{tenant}"')
            finally:
                await conn.close()
            await migrate(self._base(tenant))
            for org in self.orgs[i + 1 :: len(self.tenants) + 1]:
                await registry.add(dsn, org, self._base(tenant))
        # The RLS table (public.load_todos) and its members.
        await policies.install(dsn, users=max(1, self.args.rls_members))
        env = {
            **os.environ,
            "HUB_JWT_SECRET": self.secret,
            "HUB_DATABASE_URL": dsn,
            "HUB_REDIS_URL": self.args.redis_url,
            "HUB_REDIS_PREFIX": self.prefix,
            "HUB_LOG_LEVEL": "info",
            "HUB_NODE_TIMEOUT": "5",
            "HUB_DRAIN_TIMEOUT": "2",
            "HUB_ORG_MAX_CONNECTIONS": "100000",
            "HUB_ORG_JOINS_PER_SECOND": "100000",
            "HUB_ORG_MESSAGES_PER_SECOND": "100000",
        }
        cluster = Cluster(self.args.nodes, env, self.workdir, self.log)
        await asyncio.gather(*(cluster.start(node, http) for node in cluster.nodes))
        self.log(
            f"started {len(cluster.nodes)} nodes "
            f"({', '.join(f'{n.name}:{n.port}' for n in cluster.nodes)}), "
            f"database {self.database}, redis prefix {self.prefix}, logs in {self.workdir}"
        )
        return cluster

    async def teardown(self) -> None:
        if self.cluster is not None:
            self.cluster.stop_all()
        with contextlib.suppress(Exception):
            conn = await asyncpg.connect(ADMIN_DSN, timeout=10)
            try:
                for name in [self.database, *self.tenants]:
                    await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            finally:
                await conn.close()
        with contextlib.suppress(Exception):
            client = aioredis.from_url(self.args.redis_url)
            try:
                keys = [key async for key in client.scan_iter(match=f"{self.prefix}*")]
                if keys:
                    await client.delete(*keys)
            finally:
                await client.aclose()

    # -- load ------------------------------------------------------------------

    async def publisher(self, index: int, http: httpx.AsyncClient) -> None:
        assert self.cluster is not None
        rng = random.Random(self.args.seed * 7919 + index)
        per_task = self.args.rate / self.args.publishers
        headers = {"Authorization": f"Bearer {self.service}"}
        count = 0
        while self.publishing:
            live = self.cluster.live()
            if not live:
                await asyncio.sleep(0.05)
                continue
            node, org = rng.choice(live), rng.choice(self.orgs)
            size = rng.randint(1, 5)
            batch = []
            for _ in range(size):
                count += 1
                batch.append({"type": "chaos", "payload": {"p": index, "n": count}})
            try:
                response = await http.post(
                    f"{node.url}/api/orgs/{org}/events", json=batch, headers=headers, timeout=5
                )
            except httpx.HTTPError:
                self.publish_failures += 1
                await asyncio.sleep(0.05)
                continue
            self.published_requests += 1
            if response.status_code == 201:
                for item in response.json()["events"]:
                    self.acked[org][int(item["seq"])] = str(item["id"])
            else:
                self.publish_failures += 1
            await asyncio.sleep(rng.expovariate(per_task / 3.0))

    async def public_broadcast(
        self, http: httpx.AsyncClient, node: Node, key: str, event: str = "chaos"
    ) -> bool:
        """One REST broadcast to the public free-name channel through ``node``."""
        message = {"topic": PUBLIC_TOPIC, "event": event, "payload": {"k": key}, "private": False}
        response = await http.post(
            f"{node.url}/realtime/v1/api/broadcast",
            json={"messages": [message]},
            headers={"Authorization": f"Bearer {self.service}"},
            timeout=5,
        )
        return response.status_code == 202

    async def public_publisher(self, http: httpx.AsyncClient) -> None:
        """Numbered live messages to the public channel, ~10 a second, through
        any live node; lost ones are allowed (a public channel has no replay)."""
        assert self.cluster is not None
        rng = random.Random(self.args.seed * 31 + 5)
        while self.publishing:
            live = self.cluster.live()
            if live:
                self.public_sent += 1
                try:
                    if not await self.public_broadcast(
                        http, rng.choice(live), f"m{self.public_sent}"
                    ):
                        self.public_failures += 1
                except httpx.HTTPError:
                    self.public_failures += 1
            await asyncio.sleep(0.1)

    async def rls_write(self, conn: asyncpg.Connection, member: str, title: str) -> None:
        await conn.execute(
            "insert into public.load_todos (user_id, title, secret) values ($1, $2, 'pw')",
            member,
            title,
        )

    async def rls_writer(self) -> None:
        """Rows of random members, ~10 a second, straight into the table
        (as an app writes); a failed insert is counted, not retried."""
        rng = random.Random(self.args.seed * 131 + 7)
        members = [policies.member_id(slot) for slot in range(self.args.rls_members)]
        conn = await asyncpg.connect(self.dsn, timeout=10)
        try:
            while self.publishing:
                self.rls_written += 1
                try:
                    await self.rls_write(conn, rng.choice(members), f"r{self.rls_written}")
                except (asyncpg.PostgresError, OSError):
                    self.rls_failures += 1
                await asyncio.sleep(0.1)
        finally:
            await conn.close()

    # -- faults ----------------------------------------------------------------

    async def fault(self, kind: str, http: httpx.AsyncClient) -> bool:
        """Inject one fault; False when it cannot be done right now."""
        cluster = self.cluster
        assert cluster is not None
        if kind in ("kill", "term"):
            candidates = [n for n in cluster.live() if n.index != 0]
            if not candidates:
                return False
            node = self.rng.choice(candidates)
            delay = self.rng.uniform(0.5, 2.5)
            sig = signal.SIGKILL if kind == "kill" else signal.SIGTERM
            self.log(f"{kind}: {sig.name} {node.name} (pid {node.pid}), restart in {delay:.1f}s")
            cluster.signal(node, sig)
            self.restarts.append(asyncio.create_task(self._restart(node, delay, http)))
        elif kind == "listen":
            conn = await asyncpg.connect(ADMIN_DSN, timeout=10)
            try:
                rows = await conn.fetch(
                    "SELECT pid, pg_terminate_backend(pid) AS done FROM pg_stat_activity "
                    "WHERE datname = $1 AND application_name LIKE '%listen'",
                    self.database,
                )
            finally:
                await conn.close()
            self.log(f"listen: pg_terminate_backend of {len(rows)} LISTEN backends")
        elif kind == "pubsub":
            killed = await self._kill_pubsub(cluster)
            self.log(f"pubsub: CLIENT KILL of {killed} Redis pub/sub connections")
        elif kind == "move":
            org = self.rng.choice(self.orgs)
            here = await self._home(org)
            there = self.rng.choice(
                [d for d in [registry.CONTROL, *map(self._base, self.tenants)] if d != here]
            )
            started = time.monotonic()
            try:
                report = await moves.move(self.dsn, org, there, say=lambda _: None)
            except registry.RegistryError as exc:
                self.log(f"move: {org} not moved: {exc}")
                return False
            self.moved += 1
            self.log(
                f"move: {org} to {report.target}, {report.seq} events, writes blocked "
                f"{1000 * (report.frozen_for or 0):.0f} ms, "
                f"{time.monotonic() - started:.1f} s in all"
            )
        elif kind == "tenant":
            tenant = self.rng.choice(self.tenants)
            conn = await asyncpg.connect(ADMIN_DSN, timeout=10)
            try:
                rows = await conn.fetch(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = $1 AND pid <> pg_backend_pid()",
                    tenant,
                )
            finally:
                await conn.close()
            self.log(f"tenant: pg_terminate_backend of {len(rows)} backends of {tenant}")
        elif kind == "drop":
            connected = [
                s
                for s in [*self.subscribers, *self.public_subscribers, *self.rls_subscribers]
                if s.ws is not None
            ]
            count = max(1, len(connected) // 4) if connected else 0
            for sub in self.rng.sample(connected, count):
                sub.drop()
            self.log(f"drop: cut {count} subscriber sockets")
        self.report.actions[kind] = self.report.actions.get(kind, 0) + 1
        return True

    async def _home(self, org: str) -> str:
        """The DSN of the database ``org`` lives in (``control``: the control one)."""
        conn = await asyncpg.connect(self.dsn, timeout=10)
        try:
            dsn = await conn.fetchval("SELECT dsn FROM hub.org_databases WHERE org = $1", org)
        finally:
            await conn.close()
        return str(dsn) if dsn else registry.CONTROL

    async def verify_tenancy(self) -> None:
        """No move left open; each org's log is where the registry says, only."""
        if not self.tenants:
            return
        problems: list[str] = []
        conn = await asyncpg.connect(self.dsn, timeout=10)
        try:
            open_moves = await conn.fetch("SELECT org, step FROM hub.org_moves")
            problems += [f"move of {r['org']} left at {r['step']}" for r in open_moves]
        finally:
            await conn.close()
        databases = [self.dsn, *map(self._base, self.tenants)]
        for org in self.orgs:
            home = await self._home(org)
            home = self.dsn if home == registry.CONTROL else home
            for dsn in databases:
                conn = await asyncpg.connect(dsn, timeout=10)
                try:
                    held = await conn.fetchval(
                        "SELECT count(*) FROM hub.events WHERE org = $1", org
                    )
                finally:
                    await conn.close()
                if dsn != home and held:
                    problems.append(f"{org}: {held} events left in {registry.display_name(dsn)}")
        self.report.check(
            self.log,
            "database per org: no move left open, each org's log only in its database",
            not problems,
            "; ".join(problems[:5])
            or f"{len(self.tenants)} tenant databases, {self.moved} moves during the faults",
        )
        self.report.stats.update(moves=self.moved)

    async def _restart(self, node: Node, delay: float, http: httpx.AsyncClient) -> None:
        assert self.cluster is not None
        await self.cluster.wait_exit(node, 5)
        await asyncio.sleep(delay)
        await self.cluster.start(node, http)
        self.log(f"restart: {node.name} is back (pid {node.pid}, start {node.starts})")

    async def _kill_pubsub(self, cluster: Cluster) -> int:
        client = aioredis.from_url(self.args.redis_url)
        try:
            if self.args.pubsub_kill_all:
                return int(await client.execute_command("CLIENT", "KILL", "TYPE", "pubsub"))
            redis_port = int(self.args.redis_url.rsplit(":", 1)[-1].split("/")[0])
            ours: set[int] = set()
            for node in cluster.live():
                with contextlib.suppress(psutil.Error):
                    for conn in psutil.Process(node.pid).net_connections(kind="tcp"):
                        if conn.raddr and conn.raddr.port == redis_port:
                            ours.add(conn.laddr.port)
            killed = 0
            for entry in await client.client_list():
                port = int(str(entry.get("addr", ":0")).rsplit(":", 1)[-1])
                subs = sum(int(entry.get(key, 0) or 0) for key in ("sub", "psub", "ssub"))
                if port in ours and subs > 0:
                    killed += int(await client.execute_command("CLIENT", "KILL", "ID", entry["id"]))
            return killed
        finally:
            await client.aclose()

    async def chaos_loop(self, until: float, http: httpx.AsyncClient) -> None:
        cycle: list[str] = []
        interval = self.args.fault_interval
        while True:
            wait = self.rng.uniform(0.5 * interval, 1.5 * interval)
            if time.monotonic() + wait >= until:
                await asyncio.sleep(max(0.0, until - time.monotonic()))
                return
            await asyncio.sleep(wait)
            if not cycle:
                cycle = list(self.faults)
                self.rng.shuffle(cycle)
            try:
                kind = cycle.pop()
                if not await self.fault(kind, http):
                    # Every killable node is down: do another kind now and
                    # this one later in the cycle.
                    cycle.insert(0, kind)
                    if len(cycle) > 1:
                        await self.fault(cycle.pop(), http)
            except Exception as exc:  # a fault tool failing is reported, not fatal
                self.log(f"fault failed: {exc!r}")

    # -- checks ----------------------------------------------------------------

    async def history(self, http: httpx.AsyncClient, node: Node, org: str) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        after = 0
        headers = {"Authorization": f"Bearer {self.service}"}
        while True:
            response = await http.get(
                f"{node.url}/api/orgs/{org}/events",
                params={"after": after, "limit": 1000},
                headers=headers,
                timeout=10,
            )
            response.raise_for_status()
            page = response.json()["events"]
            events.extend(page)
            if len(page) < 1000:
                return events
            after = page[-1]["seq"]

    async def run(self) -> Report:
        args = self.args
        async with httpx.AsyncClient() as http:
            self.cluster = cluster = await self.setup(http)
            baseline_metrics = {n.name: await metrics(http, n) for n in cluster.nodes}
            tokens = {
                org: issue_token(self.secret, sub=f"sub-{org}", orgs=[org], ttl=7200)
                for org in self.orgs
            }
            for i in range(args.orgs * args.subscribers):
                org = self.orgs[i % args.orgs]
                vsn = "1.0.0" if i % 2 == 0 else "2.0.0"
                self.subscribers.append(
                    Subscriber(i, org, tokens[org], vsn, args.seed * 104729 + i)
                )
            anyone = issue_token(self.secret, sub="chaos-public", ttl=7200)
            for i in range(args.public_subscribers):
                vsn = "2.0.0" if i % 2 == 0 else "1.0.0"
                self.public_subscribers.append(
                    PublicSubscriber(i, anyone, vsn, args.seed * 7561 + i)
                )
            for i in range(args.rls_subscribers):
                member = policies.member_id(i % max(1, args.rls_members))
                token = issue_token(self.secret, sub=member, ttl=7200)
                vsn = "1.0.0" if i % 2 == 0 else "2.0.0"
                self.rls_subscribers.append(
                    RlsSubscriber(i, member, token, vsn, args.seed * 6151 + i)
                )
            everyone = [*self.subscribers, *self.public_subscribers, *self.rls_subscribers]
            tasks = [asyncio.create_task(s.run(cluster)) for s in everyone]
            await asyncio.wait_for(asyncio.gather(*(s.joined.wait() for s in everyone)), 30)
            self.log(
                f"{len(self.subscribers)} subscribers joined {args.orgs} orgs, "
                f"{len(self.public_subscribers)} the public channel {PUBLIC_TOPIC}, "
                f"{len(self.rls_subscribers)} postgres_changes of the RLS table on {RLS_TOPIC}"
            )
            publishers = [
                asyncio.create_task(self.publisher(i, http)) for i in range(args.publishers)
            ]
            publishers.append(asyncio.create_task(self.public_publisher(http)))
            publishers.append(asyncio.create_task(self.rls_writer()))
            await asyncio.sleep(args.warmup)
            for node in cluster.live():
                node.baseline_rss, node.baseline_pid = node.rss(), node.pid
            self.log(
                "warm-up done; RSS baseline "
                + ", ".join(f"{n.name}={(n.baseline_rss or 0) >> 20} MiB" for n in cluster.nodes)
            )
            until = time.monotonic() + args.duration
            await self.chaos_loop(until, http)
            self.publishing = False
            await asyncio.gather(*publishers)
            self.log(
                f"publishing stopped: {self.published_requests} requests acknowledged, "
                f"{self.publish_failures} failed (expected while nodes die)"
            )
            # Bring every node back.
            await asyncio.wait_for(asyncio.gather(*self.restarts), 40)
            for node in cluster.nodes:
                deadline = time.monotonic() + 30
                while not (node.alive and node.index in cluster.up):
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"{node.name} did not come back")
                    await asyncio.sleep(0.1)
            await self.verify(http, baseline_metrics)
            for sub in everyone:
                sub.stopping = True
            for sub in everyone:
                if sub.ws is not None:
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(sub.ws.close(), 2)
            await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 15)
            await self.verify_baseline(http, baseline_metrics)
        self.report.log = self.log.lines
        return self.report

    async def verify(self, http: httpx.AsyncClient, baseline: dict[str, dict[str, float]]) -> None:
        cluster = self.cluster
        assert cluster is not None
        report, log = self.report, self.log
        anchor = cluster.nodes[0]
        histories = {org: await self.history(http, anchor, org) for org in self.orgs}
        total = sum(len(h) for h in histories.values())

        problems = []
        for org, events in histories.items():
            seqs = [e["seq"] for e in events]
            if seqs != list(range(1, len(seqs) + 1)):
                problems.append(f"{org}: history seqs are not 1..{len(seqs)}")
            ids = {e["seq"]: e["id"] for e in events}
            for seq, event_id in self.acked[org].items():
                if ids.get(seq) != event_id:
                    problems.append(f"{org}: acknowledged seq {seq} ({event_id}) not in history")
        acked = sum(len(a) for a in self.acked.values())
        report.check(
            log,
            "history is gap-free and holds every acknowledged event",
            not problems,
            "; ".join(problems[:5]) or f"{total} events in {len(histories)} orgs, {acked} acked",
        )

        # Exactly once, in order: wait for every subscriber to catch up.
        final = {org: len(events) for org, events in histories.items()}
        deadline = time.monotonic() + self.args.settle
        while time.monotonic() < deadline:
            behind = [s for s in self.subscribers if s.last_seq < final[s.org]]
            if not behind:
                break
            await asyncio.sleep(0.2)
        problems = []
        for sub in self.subscribers:
            expected_ids = [e["id"] for e in histories[sub.org]]
            if sub.violations:
                problems.append(f"sub {sub.index} ({sub.org}): {sub.violations[:3]}")
            if sub.seqs != list(range(1, final[sub.org] + 1)):
                missing = final[sub.org] - len(sub.seqs)
                problems.append(
                    f"sub {sub.index} ({sub.org}, {sub.vsn}): got {len(sub.seqs)} of "
                    f"{final[sub.org]} (last {sub.last_seq}, missing {missing})"
                )
            elif sub.ids != expected_ids:
                problems.append(f"sub {sub.index} ({sub.org}): ids differ from the history")
        delivered = sum(len(s.seqs) for s in self.subscribers)
        replayed = sum(s.replayed for s in self.subscribers)
        report.check(
            log,
            "every subscriber got every event of its org exactly once, in seq order",
            not problems,
            "; ".join(problems[:5])
            or f"{len(self.subscribers)} subscribers, {delivered} deliveries "
            f"({replayed} by replay), checked against the history",
        )

        not_ready = []
        for node in cluster.nodes:
            deadline = time.monotonic() + 15
            while True:
                with contextlib.suppress(httpx.HTTPError):
                    response = await http.get(f"{node.url}/readyz", timeout=2)
                    if response.status_code == 200:
                        break
                if time.monotonic() > deadline:
                    not_ready.append(node.name)
                    break
                await asyncio.sleep(0.2)
        await self.verify_public(http)
        await self.verify_rls()
        await self.verify_tenancy()

        report.check(
            log,
            "every node is ready (engine and store links back)",
            not not_ready,
            f"not ready: {not_ready}" if not_ready else f"{len(cluster.nodes)} nodes ready",
        )
        report.stats.update(
            events=total,
            acknowledged=acked,
            deliveries=delivered,
            replayed=replayed,
            publish_requests=self.published_requests,
            publish_failures=self.publish_failures,
            reconnects=sum(s.connects - 1 for s in self.subscribers),
            refused_joins=sum(s.refused_joins for s in self.subscribers),
            truncations=sum(s.truncations for s in self.subscribers),
        )

    async def verify_public(self, http: httpx.AsyncClient) -> None:
        """No duplicate, foreign or durable message on the public channel, and
        a probe through each node reaches every public subscriber."""
        cluster = self.cluster
        assert cluster is not None
        subs = self.public_subscribers
        problems: list[str] = []
        deadline = time.monotonic() + self.args.settle
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(
                asyncio.gather(*(s.joined.wait() for s in subs)),
                max(0.1, deadline - time.monotonic()),
            )
        # A probe through each node, again every second until every public
        # subscriber has one of each node's (a subscriber that joined a
        # moment ago may miss the first); each probe has its own number, so
        # the no-duplicate rule still holds.
        missing: list[str] = []
        rounds = 0
        while True:
            rounds += 1
            for node in cluster.nodes:
                try:
                    ok = await self.public_broadcast(
                        http, node, f"probe-{node.name}-{rounds}", "probe"
                    )
                except httpx.HTTPError:
                    ok = False
                if not ok and rounds == 1:
                    problems.append(f"probe through {node.name} was not accepted")
            step = time.monotonic() + 1.0
            while True:
                missing = [
                    f"sub {s.index} got no probe through {n.name}"
                    for s in subs
                    for n in cluster.nodes
                    if not any(k.startswith(f"probe-{n.name}-") for k in s.received)
                ]
                if not missing or time.monotonic() > min(step, deadline):
                    break
                await asyncio.sleep(0.05)
            if not missing or time.monotonic() > deadline:
                break
        problems += missing
        problems += [f"sub {s.index}: {s.violations[:3]}" for s in subs if s.violations]
        received = sum(len(s.received) for s in subs)
        self.report.check(
            self.log,
            "public free-name channel: no duplicate or foreign message, probes reach everyone",
            not problems,
            "; ".join(problems[:5])
            or f"{len(subs)} subscribers, {self.public_sent} messages sent "
            f"({self.public_failures} refused while nodes died), {received} received, "
            f"probes through {len(cluster.nodes)} nodes reached all ({rounds} round(s))",
        )
        self.report.stats.update(
            public_sent=self.public_sent,
            public_received=received,
            public_reconnects=sum(s.connects - 1 for s in subs),
        )

    async def verify_rls(self) -> None:
        """No row of another member, no ungranted column, no duplicate; and
        once every node is back, a probe row of each member reaches every
        listener of that member, whichever node it is on."""
        subs = self.rls_subscribers
        if not subs:
            return
        problems: list[str] = []
        deadline = time.monotonic() + self.args.settle
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(
                asyncio.gather(*(s.joined.wait() for s in subs)),
                max(0.1, deadline - time.monotonic()),
            )
        members = sorted({s.member for s in subs})
        missing: list[str] = []
        rounds = 0
        conn = await asyncpg.connect(self.dsn, timeout=10)
        try:
            while True:
                rounds += 1
                for member in members:
                    await self.rls_write(conn, member, f"probe-{rounds}-{member}")
                step = time.monotonic() + 1.0
                while True:
                    missing = [
                        f"sub {s.index} got no probe row"
                        for s in subs
                        if not any(t.startswith("probe-") for t in s.received)
                    ]
                    if not missing or time.monotonic() > min(step, deadline):
                        break
                    await asyncio.sleep(0.05)
                if not missing or time.monotonic() > deadline:
                    break
        finally:
            await conn.close()
        problems += missing
        problems += [f"sub {s.index}: {s.violations[:3]}" for s in subs if s.violations]
        received = sum(len(s.received) for s in subs)
        self.report.check(
            self.log,
            "postgres_changes over RLS: own rows only, no ungranted column, no duplicate, "
            "probes reach every listener",
            not problems,
            "; ".join(problems[:5])
            or f"{len(subs)} listeners of {len(members)} members, {self.rls_written} rows "
            f"written ({self.rls_failures} failed), {received} received, probe rows reached "
            f"all ({rounds} round(s))",
        )
        self.report.stats.update(rls_written=self.rls_written, rls_received=received)

    async def verify_baseline(
        self, http: httpx.AsyncClient, baseline: dict[str, dict[str, float]]
    ) -> None:
        cluster = self.cluster
        assert cluster is not None
        report, log, args = self.report, self.log, self.args
        deadline = time.monotonic() + 10
        counts: dict[str, tuple[float, float]] = {}
        while True:
            counts = {}
            for node in cluster.nodes:
                values = await metrics(http, node)
                counts[node.name] = (values["hub_connections"], values["hub_channels"])
            expected = {
                name: (values["hub_connections"], values["hub_channels"])
                for name, values in baseline.items()
            }
            if counts == expected or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
        report.check(
            log,
            "connections and channels back to baseline on every node",
            counts == expected,
            ", ".join(
                f"{name}: {int(c)} connections, {int(ch)} channels (baseline "
                f"{int(expected[name][0])}/{int(expected[name][1])})"
                for name, (c, ch) in counts.items()
            ),
        )

        await asyncio.sleep(1.0)
        anchor_baseline = cluster.nodes[0].baseline_rss or 0
        slack_mb, ratio = args.rss_slack_mb, args.rss_slack_ratio
        details, ok = [], True
        rss_report = {}
        for node in cluster.nodes:
            rss = node.rss() or 0
            same = node.baseline_pid == node.pid and node.baseline_rss is not None
            base = node.baseline_rss if same and node.baseline_rss else anchor_baseline
            allowed = base + max(slack_mb << 20, int(ratio * base))
            ok = ok and rss <= allowed
            rss_report[node.name] = {"rss": rss, "baseline": base, "allowed": allowed}
            details.append(
                f"{node.name}: {rss >> 20} MiB (baseline {base >> 20} MiB"
                f"{'' if same else ' of n0, restarted node'}, allowed {allowed >> 20} MiB)"
            )
        report.stats["rss"] = rss_report
        report.check(log, "RSS back to baseline (within tolerance)", ok, "; ".join(details))

        tracebacks = [n.name for n in cluster.nodes if "Traceback" in n.log_path.read_text()]
        report.check(
            log,
            "no traceback in any node log",
            not tracebacks,
            f"tracebacks in {tracebacks}" if tracebacks else "clean",
        )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.chaos", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--seed", type=int, default=1, help="seeds the fault schedule")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of chaos")
    parser.add_argument("--nodes", type=int, default=2, help="hub nodes (at least 2)")
    parser.add_argument("--orgs", type=int, default=8)
    parser.add_argument("--subscribers", type=int, default=3, help="subscribers per org")
    parser.add_argument("--publishers", type=int, default=4, help="concurrent publishers")
    parser.add_argument(
        "--public-subscribers",
        type=int,
        default=4,
        help=f"subscribers of the public free-name channel {PUBLIC_TOPIC}",
    )
    parser.add_argument(
        "--rls-subscribers",
        type=int,
        default=4,
        help=f"postgres_changes listeners of the RLS table public.load_todos on {RLS_TOPIC}",
    )
    parser.add_argument(
        "--rls-members", type=int, default=2, help="members the RLS listeners' tokens cycle over"
    )
    parser.add_argument(
        "--tenants",
        type=int,
        default=2,
        help="tenant databases the orgs are spread over and moved between (0: none)",
    )
    parser.add_argument("--rate", type=float, default=60.0, help="target events per second")
    parser.add_argument("--fault-interval", type=float, default=3.0, help="mean seconds")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds before faults")
    parser.add_argument("--settle", type=float, default=30.0, help="seconds to catch up")
    parser.add_argument("--rss-slack-mb", type=int, default=48)
    parser.add_argument("--rss-slack-ratio", type=float, default=0.5)
    parser.add_argument(
        "--redis-url", default=os.environ.get("HUB_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
    )
    parser.add_argument(
        "--pubsub-kill-all",
        action="store_true",
        help="CLIENT KILL TYPE pubsub (every pub/sub client of the Redis, not only the run's)",
    )
    parser.add_argument("--json", type=Path, help="write the report here")
    parser.add_argument("--keep-logs", action="store_true", help="keep node logs even on success")
    args = parser.parse_args(argv)
    if args.nodes < 2:
        parser.error("--nodes must be at least 2 (node 0 is never killed)")
    return args


async def amain(args: argparse.Namespace) -> int:
    chaos = Chaos(args)
    print(
        f"chaos run: seed {args.seed}, {args.duration:.0f}s, {args.nodes} nodes, "
        f"{args.orgs} orgs x {args.subscribers} subscribers, ~{args.rate:.0f} events/s",
        flush=True,
    )
    error = False
    try:
        report = await chaos.run()
    except Exception as exc:
        error = True
        chaos.log(f"setup or run error: {exc!r}")
        chaos.report.check(chaos.log, "run completed", False, repr(exc))
        report = chaos.report
        report.log = chaos.log.lines
    finally:
        await chaos.teardown()
    print("\nfaults injected: " + ", ".join(f"{k}={v}" for k, v in sorted(report.actions.items())))
    print("stats: " + json.dumps(report.stats, default=str))
    print(f"\n{'ALL INVARIANTS HOLD' if report.ok else 'INVARIANT VIOLATED'}")
    if args.json is not None:
        args.json.write_text(
            json.dumps(
                {
                    "seed": report.seed,
                    "ok": report.ok,
                    "actions": report.actions,
                    "invariants": report.invariants,
                    "stats": report.stats,
                    "log": report.log,
                    "workdir": str(chaos.workdir),
                },
                indent=2,
                default=str,
            )
        )
    if report.ok and not args.keep_logs:
        shutil.rmtree(chaos.workdir, ignore_errors=True)
    else:
        print(f"node logs: {chaos.workdir}")
    return 0 if report.ok else (2 if error else 1)


def main(argv: list[str] | None = None) -> int:
    return asyncio.run(amain(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
