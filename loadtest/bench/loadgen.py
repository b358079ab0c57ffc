"""The load generator's harness side: client processes and publishers.

:class:`ClientPool` spreads connections over several client processes
(each stays far below the 20,000 open-files limit per process), pinned to
the load generator's core, and keeps the sum of their delivered-frame
counts.  The processes are either ``loadtest.bench.client`` (Python, about
1M frames/s on its core; every protocol, two-step joins) or the native
client ``loadtest/bench/native/client.c`` (built on first use; several
times faster, so that a fast server does not measure the client; ``phx``
and ``plain`` only).  Both speak the same line protocol on stdin/stdout.

Publishers put messages into a server:

* :class:`RestPublisher`: the hub's ``POST /realtime/v1/api/broadcast``,
  at most 100 messages per request, over ten keep-alive connections with a
  ``service_role`` token;
* :class:`ControlPublisher`: the control socket of the peer servers (and of
  ``hub-inproc``), which publish in-process through their own API;
* :class:`PgPublisher`: durable events inserted into PostgreSQL with
  ``SELECT hub.append_event(org, 'event', 'm', payload)``.

Every message is ``{"t": <time_ns>, "i": j, "body": "x" * BODY}``; message
``j`` of a call goes to room ``o{(start + j) % nrooms}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson

from loadtest.bench import build, procs

ROOT = Path(__file__).resolve().parents[2]
#: Connections per client process.
PER_PROCESS = 4800
#: The native client holds one small record per connection: one process
#: serves a whole scenario (each one is a core's worth of epoll).
NATIVE_PER_PROCESS = 16_000
#: What the native client speaks.
NATIVE_PROTOS = frozenset({"phx", "plain"})
BODY = 100


class ClientPool:
    def __init__(self, native: bool = False) -> None:
        self.native = native
        self.procs: list[asyncio.subprocess.Process] = []
        self.counts: list[int] = []
        self.actives: list[int] = []
        self.queues: list[asyncio.Queue[dict[str, Any]]] = []
        self.moved = asyncio.Event()
        self._readers: list[asyncio.Task[None]] = []
        self._tmp = tempfile.TemporaryDirectory(prefix="bench-clients-")
        self.ready: dict[str, Any] = {}
        self._join_timeout = 60.0

    @property
    def count(self) -> int:
        return sum(self.counts)

    @property
    def active(self) -> int:
        """Connections that have received something since the last reset."""
        return sum(self.actives)

    async def start(
        self,
        conns: list[dict[str, Any]],
        *,
        sample: int = 16,
        concurrency: int = 100,
        join_token: bool = True,
        join_timeout: float = 60.0,
        processes: int | None = None,
        private: bool = False,
        defer_join: bool = False,
    ) -> dict[str, Any]:
        """Open ``conns`` (dicts of url, proto, room, token) and join them all.

        Returns what the processes reported: joined, failures, wall seconds
        of the connect phase (the slowest process), client CPU seconds.
        ``private``: join with ``config.private = true`` (phx).  ``defer_join``:
        only connect (upgrade) now and return ``connected`` instead of
        ``joined``; :meth:`join` then joins them all, ``concurrency`` in flight.
        """
        if self.native and (defer_join or private or not join_token):
            raise ValueError("the native client joins in one step, public, with the token")
        per = NATIVE_PER_PROCESS if self.native else PER_PROCESS
        nproc = processes or max(1, math.ceil(len(conns) / per))
        chunks = [conns[i::nproc] for i in range(nproc)]
        t0 = time.perf_counter()
        for i, chunk in enumerate(chunks):
            if self.native:
                path = Path(self._tmp.name) / f"spec-{i}.txt"
                path.write_text(
                    native_spec(chunk, sample, max(1, concurrency // nproc), join_timeout)
                )
                cmd = procs.pinned([str(build.native("client")), str(path)], procs.CLIENT_CORES)
                await self._spawn(i, cmd)
                continue
            targets: dict[tuple[str, str], dict[str, Any]] = {}
            for c in chunk:
                t = targets.setdefault(
                    (c["url"], c["proto"]),
                    {"url": c["url"], "proto": c["proto"], "rooms": [], "tokens": [], "count": 0},
                )
                t["rooms"].append(c["room"])
                t["tokens"].append(c.get("token"))
                t["count"] += 1
            spec = {
                "targets": list(targets.values()),
                "sample": sample,
                "concurrency": max(1, concurrency // nproc),
                "join_token": join_token,
                "join_timeout": join_timeout,
                "private": private,
                "defer_join": defer_join,
            }
            path = Path(self._tmp.name) / f"spec-{i}.json"
            path.write_bytes(orjson.dumps(spec))
            cmd = procs.pinned(
                [sys.executable, "-m", "loadtest.bench.client", str(path)], procs.CLIENT_CORES
            )
            await self._spawn(i, cmd)
        ev = "connected" if defer_join else "ready"
        readies = [await self._expect(i, ev, join_timeout * 3 + 60) for i in range(nproc)]
        self.ready = self._sum(readies, ev if defer_join else "joined", t0)
        self._join_timeout = join_timeout
        return self.ready

    async def _spawn(self, i: int, cmd: list[str]) -> None:
        p = await asyncio.create_subprocess_exec(
            *cmd,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            cwd=ROOT,
            limit=64 * 1024 * 1024,
        )
        self.procs.append(p)
        self.counts.append(0)
        self.actives.append(0)
        self.queues.append(asyncio.Queue())
        self._readers.append(asyncio.create_task(self._read(i, p)))

    async def join(self) -> dict[str, Any]:
        """Join the connections of a ``defer_join`` start; what :meth:`start`
        returns otherwise, ``secs`` being the join phase's wall time (until
        the slowest process has every answer)."""
        t0 = time.perf_counter()
        for p in self.procs:
            assert p.stdin is not None
            p.stdin.write(b"join\n")
        within = self._join_timeout * 3 + 60
        readies = [await self._expect(i, "ready", within) for i in range(len(self.procs))]
        self.ready = self._sum(readies, "joined", t0)
        return self.ready

    def _sum(self, readies: list[dict[str, Any]], key: str, t0: float) -> dict[str, Any]:
        failed: dict[str, int] = {}
        for r in readies:
            for k, v in r["failed"].items():
                failed[k] = failed.get(k, 0) + v
        return {
            key: sum(r[key] for r in readies),
            "join_ms": [x for r in readies for x in r.get("join_ms", ())],
            "failed": failed,
            "secs": time.perf_counter() - t0,
            "client_cpu": sum(r["cpu"] for r in readies),
            "processes": len(readies),
        }

    async def _read(self, i: int, p: asyncio.subprocess.Process) -> None:
        assert p.stdout is not None
        while True:
            line = await p.stdout.readline()
            if not line:
                await self.queues[i].put({"ev": "eof"})
                return
            msg = orjson.loads(line)
            if msg["ev"] == "n":
                self.counts[i] = msg["n"]
                self.actives[i] = msg["a"]
                self.moved.set()
            else:
                await self.queues[i].put(msg)

    async def _expect(self, i: int, ev: str, within: float) -> dict[str, Any]:
        msg = await asyncio.wait_for(self.queues[i].get(), within)
        if msg["ev"] != ev:
            raise RuntimeError(f"client {i}: expected {ev}, got {msg}")
        return msg

    async def command(self, cmd: str, ev: str) -> list[dict[str, Any]]:
        for p in self.procs:
            assert p.stdin is not None
            p.stdin.write(cmd.encode() + b"\n")
        out = [await self._expect(i, ev, 60) for i in range(len(self.procs))]
        if cmd == "reset":
            self.counts = [0] * len(self.procs)
            self.actives = [0] * len(self.procs)
        return out

    async def reset(self, sample: int | None = None) -> None:
        if sample is not None:
            await self.command(f"sample {sample}", "sample")
        await self.command("reset", "reset")

    async def stats(self) -> dict[str, Any]:
        parts = await self.command("stats", "stats")
        lat: list[float] = []
        codes: dict[str, int] = {}
        per_url: dict[str, int] = {}
        for s in parts:
            lat.extend(s["lat"])
            for k, v in s["per_url"].items():
                per_url[k] = per_url.get(k, 0) + v
            for k, v in s["close_codes"].items():
                codes[k] = codes.get(k, 0) + v
        return {
            "count": sum(s["count"] for s in parts),
            "lat": lat,
            "client_cpu": sum(s["cpu"] for s in parts),
            "open": sum(s["open"] for s in parts),
            "closed": sum(s["closed"] for s in parts),
            "close_codes": codes,
            "min_per_conn": min(s["min_per_conn"] for s in parts),
            "zero_conns": sum(s["zero_conns"] for s in parts),
            "per_url": per_url,
        }

    async def wait_moved(self, within: float) -> None:
        self.moved.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.moved.wait(), within)

    async def close(self) -> None:
        for p in self.procs:
            if p.returncode is None and p.stdin is not None:
                try:
                    p.stdin.write(b"quit\n")
                    await p.stdin.drain()
                except (ConnectionError, RuntimeError):
                    pass
        for p in self.procs:
            try:
                await asyncio.wait_for(p.wait(), 10)
            except TimeoutError:
                p.kill()
                await p.wait()
        for t in self._readers:
            t.cancel()
        self._tmp.cleanup()


def native_spec(
    conns: list[dict[str, Any]], sample: int, concurrency: int, join_timeout: float
) -> str:
    """The native client's spec (see the head of native/client.c): one line
    per item, the URL's placeholders already filled in per connection."""
    lines = [f"sample {sample}", f"concurrency {concurrency}", f"join_timeout {join_timeout}"]
    targets: dict[tuple[str, str], int] = {}
    for c in conns:
        if c["proto"] not in NATIVE_PROTOS:
            raise ValueError(f"the native client does not speak {c['proto']!r}")
        key = (c["url"], c["proto"])
        if key not in targets:
            targets[key] = len(targets)
            hostport = c["url"].split("//", 1)[1].partition("/")[0]
            host, port = hostport.rsplit(":", 1)
            lines.append(f"target {targets[key]} {c['proto']} {host} {port} {c['url']}")
        rest = c["url"].split("//", 1)[1].partition("/")[2]
        token = c.get("token")
        path = "/" + rest.replace("{room}", c["room"]).replace("{token}", token or "")
        lines.append(f"conn {targets[key]} {path} {c['room']} {token or '-'}")
    return "\n".join(lines) + "\n"


def percentiles(lat: list[float]) -> dict[str, float | int | None]:
    if not lat:
        return {"p50": None, "p99": None, "max": None, "samples": 0}
    s = sorted(lat)

    def q(f: float) -> float:
        return round(s[min(len(s) - 1, int(f * len(s)))], 2)

    return {"p50": q(0.5), "p99": q(0.99), "max": round(s[-1], 2), "samples": len(s)}


# -- publishers ------------------------------------------------------------------


class Publisher:
    async def publish(self, count: int, start: int, nrooms: int) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        pass


class ControlPublisher(Publisher):
    """Commands are pipelined: a publish call returns once the command is
    written, stamped with the harness's clock, so a busy server queues them
    (open loop, as REST requests and database inserts are for the hub)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.r: asyncio.StreamReader | None = None
        self.w: asyncio.StreamWriter | None = None
        self.acks = 0
        self._drain: asyncio.Task[None] | None = None

    async def connect(self) -> None:
        self.r, self.w = await asyncio.open_connection("127.0.0.1", self.port)
        self._drain = asyncio.create_task(self._read_acks())

    async def _read_acks(self) -> None:
        assert self.r is not None
        while line := await self.r.readline():
            if line != b"K\n":
                raise RuntimeError(f"control publish failed: {line!r}")
            self.acks += 1

    async def publish(self, count: int, start: int, nrooms: int) -> None:
        assert self.w is not None
        self.w.write(f"P {count} {start} {nrooms} {BODY} {time.time_ns()}\n".encode())
        await self.w.drain()

    async def close(self) -> None:
        if self._drain is not None:
            self._drain.cancel()
        if self.w is not None:
            self.w.close()


class RestPublisher(Publisher):
    """A minimal HTTP/1.1 keep-alive client for the hub's REST broadcast.

    Requests go over several connections at once: a publish call returns as
    soon as its requests are sent, and waits only when every connection has
    one in flight, so a busy hub queues them (open loop).  Ten connections
    send a burst of 1,000 messages (ten requests of 100) at once, as an
    app's server sending them concurrently would, and as a peer gets its
    burst in one control command.  With four, the rest of a burst waited
    for answers, and the harness that sends it shares its core with the
    client draining the burst: the hub got it in about three pieces, one
    loop turn and one write per socket each (about 3 sends per socket per
    burst, against 1 with ten connections; counted with ``perf stat``).

    uvicorn closes a keep-alive connection idle for 5 s (its
    ``timeout_keep_alive``); a connection idle for ``STALE`` seconds is
    replaced before use rather than raced against that close.
    """

    MAX = 100
    STALE = 4.0

    def __init__(
        self, port: int, token: str, topic_prefix: str = "org:", connections: int = 10
    ) -> None:
        self.port = port
        self.token = token
        self.prefix = topic_prefix
        self.size = connections
        #: (reader, writer, when it was last answered)
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter, float]] = []
        self.all: list[asyncio.StreamWriter] = []
        self.inflight: set[asyncio.Task[None]] = set()
        self.error: BaseException | None = None
        self.body = "x" * BODY
        self.requests = 0

    async def connect(self) -> None:
        for _ in range(self.size):
            self.idle.append(await self._open())

    async def _open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, float]:
        r, w = await asyncio.open_connection("127.0.0.1", self.port)
        self.all.append(w)
        return r, w, time.monotonic()

    async def publish(self, count: int, start: int, nrooms: int) -> None:
        done = 0
        while done < count:
            n = min(self.MAX, count - done)
            now = time.time_ns
            messages = [
                {
                    "topic": f"{self.prefix}o{(start + done + j) % nrooms}",
                    "event": "m",
                    "payload": {"t": now(), "i": start + done + j, "body": self.body},
                }
                for j in range(n)
            ]
            body = orjson.dumps({"messages": messages})
            while not self.idle:
                await asyncio.wait(self.inflight, return_when=asyncio.FIRST_COMPLETED)
            if self.error is not None:
                raise RuntimeError(f"REST broadcast failed: {self.error!r}")
            conn = self.idle.pop()
            if time.monotonic() - conn[2] > self.STALE:
                conn[1].close()
                conn = await self._open()
            task = asyncio.create_task(self._post(conn, body))
            self.inflight.add(task)
            task.add_done_callback(self._done)
            done += n

    def _done(self, task: asyncio.Task[None]) -> None:
        self.inflight.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self.error = task.exception()

    async def _post(
        self, conn: tuple[asyncio.StreamReader, asyncio.StreamWriter, float], body: bytes
    ) -> None:
        r, w, _ = conn
        w.write(
            b"POST /realtime/v1/api/broadcast HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: application/json\r\nAuthorization: Bearer "
            + self.token.encode()
            + b"\r\nContent-Length: "
            + str(len(body)).encode()
            + b"\r\n\r\n"
            + body
        )
        head = await r.readuntil(b"\r\n\r\n")
        status = head[9:12]
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        if length:
            await r.readexactly(length)
        self.requests += 1
        self.idle.append((r, w, time.monotonic()))
        if status != b"202":
            raise RuntimeError(f"REST broadcast answered {head[:12]!r}")

    async def close(self) -> None:
        if self.inflight:
            await asyncio.wait(self.inflight)
        for w in self.all:
            w.close()


class PgPublisher(Publisher):
    """Durable events straight into PostgreSQL with ``hub.append_event``.

    One call (one 10 ms tick of the paced publisher) is one statement and
    one transaction appending all of its events, as an application that
    batches its writes would: one commit (one WAL flush) per tick instead of
    one per event, which a shared machine's disk could not do 2,000 times a
    second.  Each event still gets its own seq and its own NOTIFY.  Calls
    are pipelined over a small pool, so a slow commit does not stall the
    schedule.
    """

    SQL = (
        "SELECT count(hub.append_event(o, 'event', 'm', p::jsonb)) "
        "FROM unnest($1::text[], $2::text[]) AS x(o, p)"
    )

    def __init__(self, dsn: str, pool_size: int = 4) -> None:
        self.dsn = dsn
        self.pool_size = pool_size
        self.pool: Any = None
        self.body = "x" * BODY
        self.inflight: set[asyncio.Task[None]] = set()
        self.error: BaseException | None = None

    async def connect(self) -> None:
        import asyncpg

        self.pool = await asyncpg.create_pool(
            self.dsn, min_size=self.pool_size, max_size=self.pool_size
        )

    async def _insert(self, orgs: list[str], payloads: list[str]) -> None:
        await self.pool.fetchval(self.SQL, orgs, payloads)

    async def publish(self, count: int, start: int, nrooms: int) -> None:
        if self.error is not None:
            raise RuntimeError(f"insert failed: {self.error!r}")
        now = time.time_ns
        rows = [
            (
                f"o{(start + j) % nrooms}",
                orjson.dumps({"t": now(), "i": start + j, "body": self.body}),
            )
            for j in range(count)
        ]
        # Each org's seq row stays locked until commit, so transactions in
        # flight together must take them in one global order: the round
        # robin wraps around, and three calls each covering the wrap in a
        # different place deadlock (seen when PostgreSQL fell behind).
        # A stable sort keeps each org's own events in order.
        rows.sort(key=lambda row: row[0])
        orgs = [org for org, _ in rows]
        payloads = [payload.decode() for _, payload in rows]
        # Wait only when every pooled connection is busy.
        while len(self.inflight) >= self.pool_size:
            await asyncio.wait(self.inflight, return_when=asyncio.FIRST_COMPLETED)
        task = asyncio.create_task(self._insert(orgs, payloads))
        self.inflight.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self.inflight.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self.error = task.exception()

    async def close(self) -> None:
        if self.inflight:
            await asyncio.wait(self.inflight)
        if self.pool is not None:
            await self.pool.close()


# -- publishing patterns ------------------------------------------------------


async def saturate(
    pub: Publisher,
    pool: ClientPool,
    *,
    subscribers: int,
    messages: int,
    batch: int,
    window: int,
    time_limit: float,
    nrooms: int = 1,
    horizon: float = 0.5,
) -> dict[str, Any]:
    """Publish ``messages`` as fast as the server takes them, then wait for
    the deliveries.

    Closed loop: at most a window of messages is published but not yet
    delivered to every subscriber, so no server buffers without bound (and
    the hub's slow-consumer bound is never reached).  The window adapts to
    what the server delivered in ``horizon`` seconds at its best so far,
    between 2 messages and
    ``window``; publish calls carry up to ``batch`` messages (at most half
    the window), so a slow server is not handed minutes of work at once.
    """
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    published = 0
    expected = messages * subscribers
    win = min(window, 20)
    peak = 0.0
    mark_t, mark_n = t0, pool.count
    while published < messages and loop.time() - t0 < time_limit:
        now = loop.time()
        if now - mark_t >= 0.25:
            # The best rate seen so far: a stall (the machine is shared)
            # must not shrink the window and throttle the rest of the run.
            peak = max(peak, (pool.count - mark_n) / (now - mark_t))
            win = max(2, min(window, int(peak * horizon / subscribers) + 2))
            mark_t, mark_n = now, pool.count
        n = max(1, min(batch, win // 2, messages - published))
        # Subscribers that never receive anything (a server that lost their
        # subscription) must not stall the publisher: count the live ones.
        live = pool.active or subscribers
        if (published + n) * live - pool.count <= win * live:
            await pub.publish(n, published, nrooms)
            published += n
        else:
            await pool.wait_moved(0.05)
    drain = max(3.0, time_limit - (loop.time() - t0))
    last, last_move = pool.count, loop.time()
    while pool.count < published * (pool.active or subscribers) and (
        loop.time() - t0 < time_limit + drain
    ):
        await pool.wait_moved(0.1)
        if pool.count != last:
            last, last_move = pool.count, loop.time()
        elif loop.time() - last_move > 3.0:
            break
    return {
        "published": published,
        "expected": expected,
        "timed_out": loop.time() - t0 >= time_limit,
    }


async def paced(
    pub: Publisher, *, rate: float, seconds: float, nrooms: int = 1, tick: float = 0.01
) -> int:
    """Publish ``rate`` messages per second for ``seconds``, one batch per
    ``tick``, on an absolute schedule (a late tick publishes what it owes).
    A server that cannot take the rate is given at most 1.5x ``seconds``
    (+1 s) before publishing stops.  Returns the number published."""
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    published = 0
    total = int(rate * seconds)
    k = 0
    while published < total and loop.time() - t0 < seconds * 1.5 + 1.0:
        k += 1
        owed = min(total, int(rate * (loop.time() - t0)) + 1) - published
        if owed > 0:
            await pub.publish(owed, published, nrooms)
            published += owed
        delay = t0 + k * tick - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
    return published
