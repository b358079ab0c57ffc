"""The four scenarios of issue 6 (and ``private_joins`` and ``rls_changes``,
issue 12; the fan-out's regimes and ``drain``, issue 15), each run against
one server kind.

Each function deploys the server, opens and joins the connections, runs the
measured phase(s) and returns a flat dict of results.  CPU seconds come from
/proc (server processes, Redis) and getrusage (client processes, this
harness); the load generator's CPU is clients + harness.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loadtest.bench import envs, procs
from loadtest.bench.loadgen import NATIVE_PROTOS, ClientPool, paced, percentiles, saturate
from loadtest.bench.servers import Deployment, deploy
from loadtest.policies import POLICIES_SQL

PROFILE_DIR = envs.CACHE / "profiles"


@dataclass(frozen=True)
class Config:
    quick: bool
    #: The load client of the delivery scenarios (fanout, multinode,
    #: many_orgs): "native" (native/client.c) wherever the server's protocol
    #: allows, else the Python one.  capacity and private_joins always use
    #: the Python client (two-step joins, 19,000 sockets over 4 processes).
    client: str = "native"
    fanout_subs: int = 1000
    fanout_messages: int = 5000  # x 1000 subscribers = 5,000,000 deliveries
    fanout_window: int = 300  # messages in flight at most
    fanout_timeout: float = 120.0
    latency_rate: float = 100.0  # messages/s x 1000 subscribers = 100,000 deliveries/s
    latency_seconds: float = 20.0
    #: The burst regime: this many messages published at once, the next
    #: burst once every subscriber has the last one.
    burst_messages: int = 1000
    bursts: int = 5
    #: The paced regime: 30 messages every 10 ms (3,000/s, 3M deliveries/s
    #: offered to 1,000 subscribers) for this long, open loop.
    paced_per_tick: int = 30
    paced_seconds: float = 2.0
    #: Servers that deliver fewer per wall second in the saturated phase
    #: skip the burst and paced regimes (the Python peers: 5k-90k/s).
    regimes_min_rate: float = 250_000.0
    #: drain: messages to the floor's 1,000 subscribers per client.
    drain_messages: int = 20_000
    orgs: int = 200
    org_subs: int = 50
    org_rate: float = 2000.0
    org_seconds: float = 20.0
    capacity: int = 19_000
    capacity_warm: int = 100
    #: Longer than the clients' 25 s heartbeat, so every socket sends one.
    capacity_idle_s: float = 30.0
    connect_concurrency: int = 256
    #: private_joins: connections joined per phase (public, then private),
    #: rows (users) in the app table, free-name rooms, joins in flight.
    join_conns: int = 10_000
    join_users: int = 10_000
    join_rooms: int = 100
    join_concurrency: int = 64
    #: rls_changes: free-name channels with a binding on the RLS table,
    #: their sockets, the INSERTs of a phase, and the distinct users of
    #: each phase (every subscriber a different user, then 10 tabs each).
    rls_subscribers: int = 1000
    rls_sockets: int = 20
    rls_changes: int = 300
    rls_users: tuple[int, ...] = (1000, 100)
    #: projections: seconds of 2,000 inserts/s over the 200 orgs per phase.
    projection_seconds: float = 20.0

    @classmethod
    def make(cls, quick: bool, capacity: int | None = None, client: str = "native") -> Config:
        if quick:
            return cls(
                quick=True,
                client=client,
                bursts=2,
                paced_seconds=1.0,
                drain_messages=3000,
                fanout_messages=500,
                fanout_timeout=30.0,
                latency_seconds=3.0,
                org_seconds=3.0,
                capacity=capacity or 5_000,
                capacity_idle_s=3.0,
                join_conns=1000,
                rls_changes=60,
                projection_seconds=3.0,
            )
        return cls(quick=False, client=client, capacity=capacity or 19_000)


def _rate(n: float, d: float) -> float | None:
    return round(n / d, 1) if d > 0 else None


class Meter:
    """CPU of the server nodes, Redis (when used), clients and this harness
    between :meth:`start` and :meth:`stop`."""

    def __init__(self, dep: Deployment, redis_pid: int | None) -> None:
        self.dep = dep
        self.redis_pid = redis_pid if dep.uses_redis else None

    def start(self) -> None:
        self.t0 = time.perf_counter()
        self.cpu0 = self.dep.cpu_split()
        self.h0 = procs.self_cpu()
        self.r0 = procs.cpu_seconds_exact(self.redis_pid) if self.redis_pid else 0.0

    def stop(self) -> dict[str, Any]:
        wall = time.perf_counter() - self.t0
        split = [
            (u1 - u0, k1 - k0)
            for (u0, k0), (u1, k1) in zip(self.cpu0, self.dep.cpu_split(), strict=True)
        ]
        cpu = [user + kernel for user, kernel in split]
        out: dict[str, Any] = {
            "wall_s": round(wall, 3),
            "server_cpu_s": round(sum(cpu), 3),
            # The part spent in the kernel: what a server's own code can
            # not save by being faster.
            "server_kernel_cpu_s": round(sum(kernel for _, kernel in split), 3),
            "harness_cpu_s": round(procs.self_cpu() - self.h0, 3),
        }
        if len(cpu) > 1:
            out["node_cpu_s"] = [round(c, 3) for c in cpu]
        if self.redis_pid:
            out["redis_cpu_s"] = round(procs.cpu_seconds_exact(self.redis_pid) - self.r0, 4)
        return out


def _pool(cfg: Config, dep: Deployment) -> ClientPool:
    """The delivery scenarios' client pool: native where it speaks the protocol."""
    native = cfg.client == "native" and dep.proto in NATIVE_PROTOS
    return ClientPool(native=native)


def _bound(m: dict[str, Any]) -> str:
    """Which side was saturated: a hint for reading the numbers."""
    wall = m["wall_s"] or 1e-9
    server = m["server_cpu_s"] / wall
    loadgen = m["loadgen_cpu_s"] / wall
    if loadgen > 0.85 and server < 0.85:
        return "load generator"
    if server > 0.85:
        return "server"
    return "neither (flow-bound or machine busy)"


async def _delivery_phase(
    dep: Deployment, pool: ClientPool, meter: Meter, coro: Any, subscribers: int
) -> tuple[dict[str, Any], Any]:
    meter.start()
    res = await coro
    m = meter.stop()
    st = await pool.stats()
    m["loadgen_cpu_s"] = round(st["client_cpu"] + m["harness_cpu_s"], 3)
    m["delivered"] = st["count"]
    m["zero_conns"] = st["zero_conns"]
    if len(dep.urls) > 1:
        m["node_delivered"] = [st["per_url"].get(u, 0) for u in dep.urls]
    m["closed_conns"] = st["closed"]
    if st["close_codes"]:
        m["close_codes"] = st["close_codes"]
    m["bound"] = _bound(m)
    return m, (res, st)


async def _settle(pool: ClientPool, target: int, quiet: float = 3.0, cap: float = 30.0) -> None:
    loop = asyncio.get_running_loop()
    t0 = last_move = loop.time()
    last = pool.count
    while pool.count < target and loop.time() - t0 < cap:
        await pool.wait_moved(0.1)
        if pool.count != last:
            last, last_move = pool.count, loop.time()
        elif loop.time() - last_move > quiet:
            break


def _joined_ok(ready: dict[str, Any], want: int) -> None:
    if ready["joined"] < want:
        raise RuntimeError(f"only {ready['joined']} of {want} joined: {ready['failed']}")


# -- fan-out (and multi-node) -------------------------------------------------------


async def fanout(
    name: str,
    cfg: Config,
    *,
    nodes: int = 1,
    profile: bool = False,
    perf: bool = False,
    redis_pid: int | None = None,
) -> dict[str, Any]:
    dep = await deploy(name, nodes=nodes)
    pool = _pool(cfg, dep)
    result: dict[str, Any] = {
        "server": name,
        "nodes": nodes,
        "subscribers": cfg.fanout_subs,
        "client": "native" if pool.native else "python",
    }
    try:
        ready = await pool.start(
            dep.connections(cfg.fanout_subs, 1), sample=16, concurrency=cfg.connect_concurrency
        )
        result["joined"] = ready["joined"]
        _joined_ok(ready, cfg.fanout_subs)
        subs = ready["joined"]
        # Warm-up: code paths, caches, the REST connection.
        await dep.publisher.publish(10, 0, 1)
        await _settle(pool, 10 * subs, quiet=1.0, cap=10.0)
        await pool.reset(sample=16)
        spy = _start_profile(dep, name, "fanout") if profile else None
        meter = Meter(dep, redis_pid)
        batch = 100
        m, (res, st) = await _delivery_phase(
            dep,
            pool,
            meter,
            saturate(
                dep.publisher,
                pool,
                subscribers=subs,
                messages=cfg.fanout_messages,
                batch=batch,
                window=cfg.fanout_window,
                time_limit=cfg.fanout_timeout,
            ),
            subs,
        )
        if spy is not None:
            result["profile"] = _stop_profile(*spy)
        expected = res["published"] * subs
        sat = {
            "messages": res["published"],
            "expected": expected,
            "target": cfg.fanout_messages * subs,
            **m,
            "deliveries_per_server_cpu_s": _rate(m["delivered"], m["server_cpu_s"]),
            "deliveries_per_wall_s": _rate(m["delivered"], m["wall_s"]),
            "latency_ms": percentiles(st["lat"]),
        }
        if nodes > 1:
            # Each node's deliveries (to its own subscribers) per its CPU-second.
            sat["deliveries_per_node_cpu_s"] = [
                _rate(d, c) for d, c in zip(m["node_delivered"], m["node_cpu_s"], strict=True)
            ]
            if "redis_cpu_s" in m:
                sat["deliveries_per_cpu_s_incl_redis"] = _rate(
                    m["delivered"], m["server_cpu_s"] + m["redis_cpu_s"]
                )
        result["saturated"] = sat
        await _settle(pool, expected, quiet=1.0, cap=10.0)
        wall_rate = sat["deliveries_per_wall_s"] or 0.0
        if nodes == 1 and wall_rate < cfg.regimes_min_rate:
            # A burst is a million deliveries and the paced phase offers 3M
            # a second: a server this slow would hold minutes of backlog
            # (gigabytes of queued frames), and the next phase would measure
            # that backlog instead of its own regime.
            why = (
                f"not run: the saturated phase delivered {wall_rate:,.0f}/s, under "
                f"{cfg.regimes_min_rate:,.0f}/s"
            )
            result["burst"] = result["paced"] = {"skipped": why}
        elif nodes == 1:
            result["burst"] = await _burst(dep, pool, cfg, subs, redis_pid)
            result["paced"] = await _paced(dep, pool, cfg, subs, redis_pid)
        # Latency at a fixed, moderate rate: one message per 10 ms.
        await pool.reset(sample=4)
        meter = Meter(dep, redis_pid)

        t: dict[str, float] = {}

        async def fixed() -> int:
            t0 = time.perf_counter()
            n = await paced(dep.publisher, rate=cfg.latency_rate, seconds=cfg.latency_seconds)
            t["publish_s"] = time.perf_counter() - t0
            await _settle(pool, n * subs, quiet=2.0, cap=15.0)
            return n

        sampler = _start_perf(dep, name, "fixed_rate") if perf else None
        m, (n, st) = await _delivery_phase(dep, pool, meter, fixed(), subs)
        if sampler is not None:
            result["perf"] = _stop_profile(*sampler, summarize=summarize_perf)
        result["fixed_rate"] = {
            "target_deliveries_per_s": int(cfg.latency_rate * subs),
            "achieved_messages_per_s": _rate(n, t["publish_s"]),
            "messages": n,
            "expected": n * subs,
            "target": int(cfg.latency_rate * cfg.latency_seconds) * subs,
            **m,
            "deliveries_per_server_cpu_s": _rate(m["delivered"], m["server_cpu_s"]),
            "latency_ms": percentiles(st["lat"]),
        }
        result["server_rss_kb"] = dep.rss_kb()
    finally:
        await pool.close()
        await dep.stop()
    return result


async def _burst(
    dep: Deployment, pool: ClientPool, cfg: Config, subs: int, redis_pid: int | None
) -> dict[str, Any]:
    """The burst regime: ``burst_messages`` published at once (one control
    command, or REST requests of 100 sent together: RestPublisher), the
    next burst once every subscriber has the last one.  Each socket has
    many frames due per loop turn: what batching its writes is worth."""
    await pool.reset(sample=64)
    meter = Meter(dep, redis_pid)
    n = cfg.burst_messages

    async def bursts() -> int:
        sent = 0
        for _ in range(cfg.bursts):
            await dep.publisher.publish(n, sent, 1)
            sent += n
            await _settle(pool, sent * subs, quiet=2.0, cap=30.0)
        return sent

    m, (sent, st) = await _delivery_phase(dep, pool, meter, bursts(), subs)
    return {
        "messages_per_burst": n,
        "messages": sent,
        "expected": sent * subs,
        **m,
        "deliveries_per_server_cpu_s": _rate(m["delivered"], m["server_cpu_s"]),
        "deliveries_per_wall_s": _rate(m["delivered"], m["wall_s"]),
        "latency_ms": percentiles(st["lat"]),
    }


async def _paced(
    dep: Deployment, pool: ClientPool, cfg: Config, subs: int, redis_pid: int | None
) -> dict[str, Any]:
    """The paced regime: ``paced_per_tick`` messages every 10 ms, open loop
    (as the fixed-rate phase).  A socket has a few frames due per loop turn.
    A server slower than the offered rate falls behind: its deliveries then
    batch more, and its latency shows the queue."""
    await pool.reset(sample=64)
    meter = Meter(dep, redis_pid)
    t: dict[str, float] = {}
    rate = cfg.paced_per_tick * 100.0

    async def run() -> int:
        t0 = time.perf_counter()
        k = await paced(dep.publisher, rate=rate, seconds=cfg.paced_seconds)
        t["publish_s"] = time.perf_counter() - t0
        await _settle(pool, k * subs, quiet=2.0, cap=30.0)
        return k

    m, (k, st) = await _delivery_phase(dep, pool, meter, run(), subs)
    return {
        "messages_per_tick": cfg.paced_per_tick,
        "achieved_messages_per_s": _rate(k, t["publish_s"]),
        "messages": k,
        "expected": k * subs,
        "target": int(rate * cfg.paced_seconds) * subs,
        **m,
        "deliveries_per_server_cpu_s": _rate(m["delivered"], m["server_cpu_s"]),
        "latency_ms": percentiles(st["lat"]),
    }


# -- the load client's own drain rate ---------------------------------------------


async def drain(name: str, cfg: Config) -> dict[str, Any]:
    """How many frames per second each load client takes in on its one
    core: ``drain_messages`` to 1,000 subscribers of a server that is not
    the bottleneck (the floor), published a burst of 1,000 at a time with
    at most four bursts in flight (enough that the client never waits for
    the publisher, few enough that the floor's backlog stays small).
    Frames per client CPU-second, and per wall second while the client's
    core is busy (*client busy %* near 100 means the client, not the
    server, set the pace)."""
    dep = await deploy(name)
    subs = cfg.fanout_subs
    result: dict[str, Any] = {"server": name, "subscribers": subs}
    try:
        for client in ("native", "python"):
            if client == "native" and dep.proto not in NATIVE_PROTOS:
                continue
            pool = ClientPool(native=client == "native")
            try:
                ready = await pool.start(
                    dep.connections(subs, 1), sample=16, concurrency=cfg.connect_concurrency
                )
                _joined_ok(ready, subs)
                await pool.reset()
                t0, cpu0 = time.perf_counter(), sum(dep.cpu())
                published, burst = 0, 1000
                while published < cfg.drain_messages:
                    if (published - 3 * burst) * subs <= pool.count:
                        await dep.publisher.publish(burst, published, 1)
                        published += burst
                    else:
                        await pool.wait_moved(0.05)
                await _settle(pool, published * subs, quiet=2.0, cap=60.0)
                wall = time.perf_counter() - t0
                server_cpu = sum(dep.cpu()) - cpu0
                st = await pool.stats()
                result[client] = {
                    "frames": st["count"],
                    "expected": published * subs,
                    "wall_s": round(wall, 3),
                    "client_cpu_s": round(st["client_cpu"], 3),
                    "server_cpu_s": round(server_cpu, 3),
                    "client_busy_pct": round(100 * st["client_cpu"] / wall, 1),
                    "frames_per_client_cpu_s": _rate(st["count"], st["client_cpu"]),
                    "frames_per_wall_s": _rate(st["count"], wall),
                    "latency_ms": percentiles(st["lat"]),
                }
            finally:
                await pool.close()
    finally:
        await dep.stop()
    return result


# -- many orgs ----------------------------------------------------------------------


async def many_orgs(
    name: str,
    cfg: Config,
    *,
    database_url: str | None,
    redis_pid: int | None = None,
    profile: bool = False,
) -> dict[str, Any]:
    hub_kind = name in ("hub", "hub-inproc")
    durable = hub_kind and database_url is not None
    dep = await deploy(name, database_url=database_url if hub_kind else None, durable=durable)
    pool = _pool(cfg, dep)
    n = cfg.orgs * cfg.org_subs
    result: dict[str, Any] = {
        "server": name,
        "orgs": cfg.orgs,
        "subscribers_per_org": cfg.org_subs,
        "source": "postgres insert (hub.append_event)"
        if durable
        else "in-process publish (no database)",
        "client": "native" if pool.native else "python",
    }
    try:
        ready = await pool.start(
            dep.connections(n, cfg.orgs), sample=4, concurrency=cfg.connect_concurrency
        )
        result["joined"] = ready["joined"]
        result["join_secs"] = round(ready["secs"], 2)
        _joined_ok(ready, n)
        await dep.publisher.publish(cfg.orgs, 0, cfg.orgs)  # warm-up: one per org
        await _settle(pool, n, quiet=1.0, cap=15.0)
        await pool.reset(sample=4)
        spy = _start_profile(dep, name, "many_orgs") if profile else None
        meter = Meter(dep, redis_pid)
        t = {}

        async def run() -> int:
            t0 = time.perf_counter()
            k = await paced(
                dep.publisher, rate=cfg.org_rate, seconds=cfg.org_seconds, nrooms=cfg.orgs
            )
            t["publish_s"] = time.perf_counter() - t0
            await _settle(pool, k * cfg.org_subs, quiet=2.0, cap=15.0)
            return k

        m, (k, st) = await _delivery_phase(dep, pool, meter, run(), n)
        if spy is not None:
            result["profile"] = _stop_profile(*spy)
        result.update(
            {
                "events": k,
                "achieved_events_per_s": _rate(k, t["publish_s"]),
                "expected": k * cfg.org_subs,
                "target": int(cfg.org_rate * cfg.org_seconds) * cfg.org_subs,
                **m,
                "deliveries_per_server_cpu_s": _rate(m["delivered"], m["server_cpu_s"]),
                "latency_ms": percentiles(st["lat"]),
            }
        )
    finally:
        await pool.close()
        await dep.stop()
    return result


# -- capacity -----------------------------------------------------------------------


async def capacity(name: str, cfg: Config, *, profile: bool = False) -> dict[str, Any]:
    dep = await deploy(name)
    warm, rest = ClientPool(), ClientPool()
    n = cfg.capacity
    rooms = 100
    result: dict[str, Any] = {"server": name, "target": n}
    try:
        ready = await warm.start(dep.connections(cfg.capacity_warm, rooms), concurrency=64)
        _joined_ok(ready, cfg.capacity_warm)
        await asyncio.sleep(1.0)
        base = sum(dep.rss_kb())
        conns = dep.connections(n, rooms)[cfg.capacity_warm :]
        spy = _start_profile(dep, name, "capacity") if profile else None
        cpu0, h0 = sum(dep.cpu()), procs.self_cpu()
        ready = await rest.start(conns, concurrency=cfg.connect_concurrency, join_timeout=120.0)
        server_cpu = sum(dep.cpu()) - cpu0
        if spy is not None:
            result["profile"] = _stop_profile(*spy)
        joined = ready["joined"]
        await asyncio.sleep(2.0)
        after = sum(dep.rss_kb())
        # What holding them costs: server CPU while nothing happens but the
        # clients' heartbeats (every 25 s each) and the server's timers.
        idle0, t0 = sum(dep.cpu()), time.monotonic()
        await asyncio.sleep(cfg.capacity_idle_s)
        idle_pct = 100 * (sum(dep.cpu()) - idle0) / (time.monotonic() - t0)
        result.update(
            {
                "joined": joined + cfg.capacity_warm,
                "failed": ready["failed"],
                "client_processes": ready["processes"] + 1,
                "connect_wall_s": round(ready["secs"], 2),
                "connects_joins_per_wall_s": _rate(joined, ready["secs"]),
                "server_cpu_s": round(server_cpu, 3),
                "connects_joins_per_server_cpu_s": _rate(joined, server_cpu),
                "loadgen_cpu_s": round(ready["client_cpu"] + procs.self_cpu() - h0, 3),
                "rss_base_kb": base,
                "rss_after_kb": after,
                "kb_per_conn": round((after - base) / joined, 2) if joined else None,
                "idle_cpu_pct": round(idle_pct, 2),
            }
        )
        st = await rest.stats()
        result["open_after"] = st["open"] + cfg.capacity_warm
    finally:
        await rest.close()
        await warm.close()
        await dep.stop()
    return result


# -- private joins (Realtime Authorization) ------------------------------------------

ROOM_PREFIX = "bench-room:"


async def _policy_setup(database_url: str, users: list[str], rooms: int) -> None:
    """The table, the policy, and one row per user (user i in room i % rooms);
    the bench's rows of an earlier run are replaced."""
    import asyncpg

    conn = await asyncpg.connect(database_url)
    try:
        # The app's side (loadtest/policies.py): a membership table and
        # policies on realtime.messages that join it (a join reads).
        await conn.execute(POLICIES_SQL)
        async with conn.transaction():
            await conn.execute(
                "delete from public.rooms_users where room_topic like $1", ROOM_PREFIX + "%"
            )
            await conn.copy_records_to_table(
                "rooms_users",
                schema_name="public",
                records=[(uuid.UUID(u), f"{ROOM_PREFIX}{i % rooms}") for i, u in enumerate(users)],
            )
        await conn.execute("analyze public.rooms_users")
    finally:
        await conn.close()


class PgBackends:
    """CPU seconds of the PostgreSQL backends of one database (the hub's
    policy pool, its store and listener), read from /proc around a phase.
    A backend that exits during the phase takes its CPU with it."""

    def __init__(self, database_url: str) -> None:
        self.url = database_url

    async def __aenter__(self) -> PgBackends:
        import asyncpg

        self.conn = await asyncpg.connect(self.url)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.conn.close()

    async def cpu(self) -> dict[int, float]:
        rows = await self.conn.fetch(
            "select pid from pg_stat_activity "
            "where datname = current_database() and pid <> pg_backend_pid()"
        )
        out = {}
        for r in rows:
            with contextlib.suppress(OSError):
                out[r["pid"]] = procs.cpu_seconds(r["pid"])
        return out

    @staticmethod
    def spent(before: dict[int, float], after: dict[int, float]) -> float:
        return sum(c - before.get(pid, 0.0) for pid, c in after.items())


async def private_joins(
    name: str, cfg: Config, *, database_url: str, profile: bool = False
) -> dict[str, Any]:
    """Joins of free-name channels, public then private (authorized by a
    policy joining an app table), by the same users on the same names."""
    from hub.auth.tokens import issue_token

    users = [str(uuid.uuid4()) for _ in range(cfg.join_users)]
    await _policy_setup(database_url, users, cfg.join_rooms)
    dep = await deploy(name, database_url=database_url)
    assert dep.secret is not None
    n = cfg.join_conns
    conns = [
        {
            "url": dep.urls[0],
            "proto": "phx",
            "room": f"realtime:{ROOM_PREFIX}{i % cfg.join_rooms}",
            "token": issue_token(dep.secret, sub=users[i], ttl=7200),
        }
        for i in range(n)
    ]
    result: dict[str, Any] = {
        "server": name,
        "connections": n,
        "app_table_rows": cfg.join_users,
        "rooms": cfg.join_rooms,
        "join_concurrency": cfg.join_concurrency,
        "policy": "exists (select 1 from rooms_users where user_id = auth.uid() "
        "and room_topic = realtime.topic())",
    }
    try:
        # Warm-up: code paths, the policy pool's connections, their
        # prepared statements and the table's pages.
        for private in (False, True):
            warm = ClientPool()
            try:
                ready = await warm.start(
                    conns[: cfg.capacity_warm], private=private, concurrency=32
                )
                _joined_ok(ready, cfg.capacity_warm)
            finally:
                await warm.close()
        await asyncio.sleep(1.0)
        async with PgBackends(database_url) as pg:
            for kind in ("public", "private"):
                pool = ClientPool()
                try:
                    ready = await pool.start(
                        conns,
                        private=kind == "private",
                        defer_join=True,
                        concurrency=cfg.join_concurrency,
                        join_timeout=60.0,
                    )
                    if ready["connected"] < n:
                        raise RuntimeError(
                            f"{kind}: only {ready['connected']} of {n} connected: {ready['failed']}"
                        )
                    await asyncio.sleep(0.5)
                    spy = (
                        _start_profile(dep, name, "private_joins")
                        if profile and kind == "private"
                        else None
                    )
                    cpu0, h0, pg0 = sum(dep.cpu()), procs.self_cpu(), await pg.cpu()
                    ready = await pool.join()
                    server_cpu = sum(dep.cpu()) - cpu0
                    pg_cpu = PgBackends.spent(pg0, await pg.cpu())
                    loadgen = ready["client_cpu"] + procs.self_cpu() - h0
                    if spy is not None:
                        result["profile"] = _stop_profile(*spy)
                    joined, secs = ready["joined"], ready["secs"]
                    result[kind] = {
                        "joined": joined,
                        "target": n,
                        "failed": ready["failed"],
                        "wall_s": round(secs, 3),
                        "joins_per_wall_s": _rate(joined, secs),
                        "server_cpu_s": round(server_cpu, 3),
                        "joins_per_server_cpu_s": _rate(joined, server_cpu),
                        "server_cpu_us_per_join": round(1e6 * server_cpu / joined, 1)
                        if joined
                        else None,
                        "pg_cpu_s": round(pg_cpu, 3),
                        "pg_cpu_us_per_join": round(1e6 * pg_cpu / joined, 1) if joined else None,
                        "joins_per_cpu_s_incl_pg": _rate(joined, server_cpu + pg_cpu),
                        "server_busy_pct": round(100 * server_cpu / secs, 1) if secs else None,
                        "pg_busy_pct": round(100 * pg_cpu / secs, 1) if secs else None,
                        "loadgen_cpu_s": round(loadgen, 3),
                        "join_ms": percentiles(ready["join_ms"]),
                    }
                finally:
                    await pool.close()
                # Let the hub close the phase's sockets before the next one.
                await asyncio.sleep(2.0)
        pub, priv = result["public"], result["private"]
        if pub["server_cpu_us_per_join"] and priv["server_cpu_us_per_join"]:
            result["policy_cost"] = {
                "server_cpu_us_per_join": round(
                    priv["server_cpu_us_per_join"] - pub["server_cpu_us_per_join"], 1
                ),
                "pg_cpu_us_per_join": round(
                    priv["pg_cpu_us_per_join"] - pub["pg_cpu_us_per_join"], 1
                ),
                "server_cpu_ratio": round(
                    priv["server_cpu_us_per_join"] / pub["server_cpu_us_per_join"], 2
                ),
                "wall_ratio": round(pub["joins_per_wall_s"] / priv["joins_per_wall_s"], 2)
                if priv["joins_per_wall_s"]
                else None,
            }
    finally:
        await dep.stop()
    return result


# -- postgres_changes over RLS ---------------------------------------------------------

RLS_SCHEMA = """
CREATE TABLE public.{table} (id bigserial PRIMARY KEY, user_id uuid NOT NULL,
                             title text, secret text);
ALTER TABLE public.{table} ENABLE ROW LEVEL SECURITY;
GRANT SELECT (id, user_id, title) ON public.{table} TO authenticated;
CREATE POLICY own ON public.{table} FOR SELECT TO authenticated USING (user_id = auth.uid());
ALTER PUBLICATION supabase_realtime ADD TABLE public.{table};
"""


async def rls_changes(name: str, cfg: Config, *, database_url: str) -> dict[str, Any]:
    """postgres_changes over a table with RLS: changes per second when each
    change is checked for every subscriber's user (one ``hub.rls_visible()``
    call per change, one lookup per distinct role and claims)."""
    import asyncpg

    from hub.auth.tokens import issue_token
    from hub.client.realtime import AsyncClient

    # The bench joins many channels per socket at once.
    dep = await deploy(
        name,
        database_url=database_url,
        hub_extra={"HUB_JOINS_PER_SECOND": "10000", "HUB_JOIN_BURST": "10000"},
    )
    assert dep.secret is not None
    base = dep.urls[0].split("?")[0]
    result: dict[str, Any] = {
        "server": name,
        "subscribers": cfg.rls_subscribers,
        "sockets": cfg.rls_sockets,
        "changes": cfg.rls_changes,
        "policy": "user_id = auth.uid()",
    }
    db = await asyncpg.connect(database_url)
    try:
        async with PgBackends(database_url) as pg:
            for users_n in cfg.rls_users:
                table = f"bench_todos_{uuid.uuid4().hex[:8]}"
                await db.execute(RLS_SCHEMA.format(table=table))
                await _wait_published(db, table)
                users = [str(uuid.uuid4()) for _ in range(users_n)]
                tokens = [issue_token(dep.secret, sub=u, ttl=7200) for u in users]
                config = {
                    "postgres_changes": [{"event": "INSERT", "schema": "public", "table": table}]
                }
                clients: list[AsyncClient] = []
                per_channel: dict[str, int] = {}
                try:
                    per_socket = -(-cfg.rls_subscribers // cfg.rls_sockets)
                    for s in range(cfg.rls_sockets):
                        client = await AsyncClient.connect(base, tokens[0], within=30)
                        clients.append(client)
                        for c in range(per_socket):
                            i = s * per_socket + c
                            if i >= cfg.rls_subscribers:
                                break
                            await client.join(
                                f"realtime:bench-rls-{c}", config, access_token=tokens[i % users_n]
                            )
                            owner = users[i % users_n]
                            per_channel[owner] = per_channel.get(owner, 0) + 1
                    owners = [users[i % users_n] for i in range(cfg.rls_changes)]
                    expected = sum(per_channel.get(o, 0) for o in owners)

                    def received(clients: list[AsyncClient] = clients) -> int:
                        return sum(
                            1 for c in clients for m in c.messages if m.event == "postgres_changes"
                        )

                    await asyncio.sleep(0.5)
                    cpu0, pg0, t0 = sum(dep.cpu()), await pg.cpu(), time.monotonic()
                    await db.executemany(
                        f"INSERT INTO public.{table} (user_id, title, secret) "
                        "VALUES ($1, 'x', 'pw')",
                        [(uuid.UUID(o),) for o in owners],
                    )
                    got, deadline = 0, t0 + 300
                    while time.monotonic() < deadline:
                        got = received()
                        if got >= expected:
                            break
                        await asyncio.sleep(0.02)
                    secs = time.monotonic() - t0
                    server_cpu = sum(dep.cpu()) - cpu0
                    pg_cpu = PgBackends.spent(pg0, await pg.cpu())
                    result[f"users_{users_n}"] = {
                        "users": users_n,
                        "delivered": got,
                        "expected": expected,
                        "wall_s": round(secs, 2),
                        "changes_per_s": _rate(cfg.rls_changes, secs),
                        "server_cpu_s": round(server_cpu, 2),
                        "changes_per_server_cpu_s": _rate(cfg.rls_changes, server_cpu),
                        "pg_cpu_s": round(pg_cpu, 2),
                        "changes_per_cpu_s_incl_pg": _rate(cfg.rls_changes, server_cpu + pg_cpu),
                    }
                finally:
                    for client in clients:
                        await client.close()
                    await db.execute(f"DROP TABLE public.{table}")
                await asyncio.sleep(1.0)
    finally:
        await db.close()
        await dep.stop()
    return result


async def _wait_published(db: Any, table: str) -> None:
    """The hub follows the publication about once a second."""
    for _ in range(100):
        if await db.fetchval(
            "SELECT EXISTS (SELECT 1 FROM pg_trigger WHERE tgname = 'hub_capture_publication' "
            "AND tgrelid = $1::regclass)",
            f"public.{table}",
        ):
            return
        await asyncio.sleep(0.1)
    raise RuntimeError(f"the hub did not track public.{table} from the publication")


# -- projections ----------------------------------------------------------------

PROJECTION_SQL = """
CREATE SCHEMA IF NOT EXISTS bench_app;
CREATE SCHEMA IF NOT EXISTS bench_rm;
CREATE TABLE IF NOT EXISTS bench_rm.per_org (
    org text PRIMARY KEY, events bigint NOT NULL, last_seq bigint NOT NULL
);
CREATE OR REPLACE FUNCTION bench_app.count(e hub.events) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO per_org AS p VALUES (e.org, 1, e.seq)
    ON CONFLICT (org) DO UPDATE SET events = p.events + 1, last_seq = excluded.last_seq;
END $$;
DELETE FROM hub.projections WHERE name = 'bench_count';
TRUNCATE bench_rm.per_org;
"""
REGISTER_SQL = (
    "SELECT hub.register_projection('bench_count', 'bench_app.count(hub.events)', NULL, 'bench_rm')"
)


async def projections(name: str, cfg: Config, *, database_url: str) -> dict[str, Any]:
    """Projections at 2,000 inserts/s over 200 orgs, in three phases of the
    same paced inserts, each on a fresh hub:

    1. ``without``: HUB_PROJECTIONS=false, the durable path alone;
    2. ``mother``: the hub's own rollups (a batch projection) run; the
       runner first catches up with phase 1's events;
    3. ``with``: an app's event-mode projection (an upsert per event) is
       registered too, and first catches up with phases 1 and 2.

    Per phase: hub and PostgreSQL CPU per inserted event; in 2 and 3 the
    catch-up rate and the lag sampled every 250 ms.  The differences
    between the phases are what each projection adds."""
    import asyncpg

    db = await asyncpg.connect(database_url)
    result: dict[str, Any] = {
        "server": name,
        "orgs": cfg.orgs,
        "rate": cfg.org_rate,
        "seconds": cfg.projection_seconds,
        "projections": ["mother (batch rollups)", "bench_count (event, upsert per event)"],
    }
    try:
        await db.execute(PROJECTION_SQL)
        # Everything before now counts as done: only this run's events are
        # measured (an earlier scenario's events are in the same log).
        heads = await db.fetch("SELECT org, seq FROM hub.org_seq")
        await _checkpoints_at(db, "mother", heads)
        async with PgBackends(database_url) as pg:
            for phase, enabled in (("without", False), ("mother", True), ("with", True)):
                if phase == "with":
                    await db.execute(REGISTER_SQL)
                    await _checkpoints_at(db, "bench_count", heads)
                watched = {"without": [], "mother": ["mother"], "with": ["mother", "bench_count"]}
                dep = await deploy(
                    name,
                    database_url=database_url,
                    durable=True,
                    hub_extra={"HUB_PROJECTIONS": "true" if enabled else "false"},
                )
                try:
                    out: dict[str, Any] = {}
                    if enabled:
                        out["catch_up"] = await _catch_up(db, watched[phase])
                    cpu0, pg0, t0 = sum(dep.cpu()), await pg.cpu(), time.perf_counter()
                    samples: list[dict[str, int]] = []
                    sampler = asyncio.create_task(_sample_lag(db, samples)) if enabled else None
                    k = await paced(
                        dep.publisher,
                        rate=cfg.org_rate,
                        seconds=cfg.projection_seconds,
                        nrooms=cfg.orgs,
                    )
                    secs = time.perf_counter() - t0
                    if sampler is not None:
                        sampler.cancel()
                        await asyncio.gather(sampler, return_exceptions=True)
                        out["drain_s"] = await _drained(db)
                    server_cpu = sum(dep.cpu()) - cpu0
                    pg_cpu = PgBackends.spent(pg0, await pg.cpu())
                    out.update(
                        {
                            "events": k,
                            "events_per_s": _rate(k, secs),
                            "hub_cpu_us_per_event": round(1e6 * server_cpu / k, 1) if k else None,
                            "pg_cpu_us_per_event": round(1e6 * pg_cpu / k, 1) if k else None,
                        }
                    )
                    for projection in watched[phase]:
                        lags = sorted(s.get(projection, 0) for s in samples) or [0]
                        out[f"lag_{projection}"] = {"p50": lags[len(lags) // 2], "max": lags[-1]}
                    result[phase] = out
                finally:
                    await dep.stop()
        base = result["without"]["pg_cpu_us_per_event"]
        result["cost"] = {
            "mother_pg_cpu_us_per_event": round(result["mother"]["pg_cpu_us_per_event"] - base, 1),
            "bench_count_pg_cpu_us_per_event": round(
                result["with"]["pg_cpu_us_per_event"] - result["mother"]["pg_cpu_us_per_event"], 1
            ),
        }
    finally:
        await db.execute("DELETE FROM hub.projections WHERE name = 'bench_count'")
        await db.close()
    return result


async def _checkpoints_at(db: Any, projection: str, heads: list[Any]) -> None:
    await db.executemany(
        "INSERT INTO hub.projection_checkpoints (projection, target, org, seq) "
        "SELECT $1, target_schema, $2, $3 FROM hub.projections WHERE name = $1 "
        "ON CONFLICT (projection, target, org) DO UPDATE SET seq = excluded.seq, error = NULL",
        [(projection, r["org"], r["seq"]) for r in heads],
    )


_LAG_BY_PROJECTION = (
    "SELECT projection, sum(lag)::bigint AS lag FROM hub.projection_lag "
    "WHERE projection IN ('bench_count', 'mother') GROUP BY projection"
)


async def _catch_up(db: Any, watched: list[str]) -> dict[str, Any]:
    """Time each projection takes to apply the backlog it starts with (the
    hub has just started: a small backlog may be gone before the first
    look, which then says so)."""
    t0 = time.perf_counter()
    first = {r["projection"]: int(r["lag"]) for r in await db.fetch(_LAG_BY_PROJECTION)}
    done: dict[str, float] = {}
    while len(done) < len(watched) and time.perf_counter() - t0 < 600:
        for r in await db.fetch(_LAG_BY_PROJECTION):
            if int(r["lag"]) == 0 and r["projection"] not in done:
                done[r["projection"]] = time.perf_counter() - t0
        await asyncio.sleep(0.05)
    return {
        p: {
            "backlog": first.get(p, 0),
            "secs": round(done[p], 2) if p in done else None,
            "events_per_s": _rate(first.get(p, 0), done[p]) if first.get(p) and p in done else None,
        }
        for p in watched
    }


async def _sample_lag(db: Any, samples: list[dict[str, int]]) -> None:
    while True:
        samples.append({r["projection"]: int(r["lag"]) for r in await db.fetch(_LAG_BY_PROJECTION)})
        await asyncio.sleep(0.25)


async def _drained(db: Any) -> float | None:
    """Seconds after the last insert until the projections are caught up."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < 120:
        if all(int(r["lag"]) == 0 for r in await db.fetch(_LAG_BY_PROJECTION)):
            return round(time.perf_counter() - t0, 2)
        await asyncio.sleep(0.05)
    return None


# -- profiling ------------------------------------------------------------------------


def _start_profile(
    dep: Deployment, name: str, scenario: str
) -> tuple[subprocess.Popen[bytes], Path] | None:
    try:
        envs.ensure("tools")
    except Exception as exc:
        print(f"[bench] py-spy unavailable: {exc}", flush=True)
        return None
    spy = envs.CACHE / "tools" / "bin" / "py-spy"
    PROFILE_DIR.mkdir(parents=True, exist_ok=True)
    out = PROFILE_DIR / f"{name}-{scenario}-{time.strftime('%Y%m%d-%H%M%S')}.txt"
    proc = subprocess.Popen(
        procs.pinned(
            [
                str(spy),
                "record",
                "--format",
                "raw",
                "--rate",
                "250",
                "--nonblocking",
                "-p",
                str(dep.nodes[0].pid),
                "-o",
                str(out),
            ],
            procs.CLIENT_CORES,
        ),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    time.sleep(0.3)
    return proc, out


def _stop_profile(
    proc: subprocess.Popen[bytes],
    out: Path,
    summarize: Callable[[Path], dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Stop a sampler (py-spy, or perf with ``summarize_perf``) and read
    what it wrote."""
    proc.send_signal(signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
    if not out.exists():
        return {"error": err.decode(errors="replace")[-500:]}
    return {"file": os.path.relpath(out, envs.ROOT), **(summarize or summarize_profile)(out)}


def _start_perf(
    dep: Deployment, name: str, phase: str
) -> tuple[subprocess.Popen[bytes], Path] | None:
    """Linux perf sampling the server process (every thread, user space and
    kernel alike) on its CPU clock: where a native server spends its time
    too, which py-spy cannot see, and how much of it is the kernel's."""
    exe = shutil.which("perf")
    if exe is None:
        print("[bench] perf unavailable: not on PATH (Debian: linux-perf)", flush=True)
        return None
    PROFILE_DIR.mkdir(parents=True, exist_ok=True)
    out = PROFILE_DIR / f"{name}-{phase}-{time.strftime('%Y%m%d-%H%M%S')}.perf"
    pid = str(dep.nodes[0].pid)
    proc = subprocess.Popen(
        procs.pinned(
            [exe, "record", "-e", "cpu-clock", "-F", "999", "-p", pid, "-o", str(out)],
            procs.CLIENT_CORES,
        ),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    time.sleep(0.3)
    return proc, out


_PERF_LINE = re.compile(r"^\s*([\d.]+)%\s+(.*?)\s*$")


def summarize_perf(path: Path, top: int = 15) -> dict[str, Any]:
    """Shares of samples by binary (the kernel, the interpreter, libuv...)
    and by symbol, from ``perf report``."""

    def report(sort: str) -> list[list[Any]]:
        text = subprocess.run(
            ["perf", "report", "-i", str(path), "--stdio", "-q", "--sort", sort],
            capture_output=True,
            text=True,
            check=False,
        ).stdout
        rows = []
        for line in text.splitlines():
            match = _PERF_LINE.match(line)
            if match:
                rows.append([" ".join(match[2].split()), float(match[1])])
        return rows

    by_dso = report("dso")
    return {
        "kernel_pct": round(sum(p for d, p in by_dso if d.startswith("[kernel")), 1),
        "dso_pct": by_dso[:8],
        "symbol_pct": report("sym")[:top],
    }


def summarize_profile(path: Path, top: int = 20) -> dict[str, Any]:
    """Self and inclusive sample shares per function from py-spy's raw
    (collapsed stack) output."""
    own: dict[str, int] = {}
    incl: dict[str, int] = {}
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        c = int(count)
        total += c
        frames = [_short(f) for f in stack.split(";") if f]
        if not frames:
            continue
        own[frames[-1]] = own.get(frames[-1], 0) + c
        for f in set(frames):
            incl[f] = incl.get(f, 0) + c

    def rank(d: dict[str, int]) -> list[list[Any]]:
        return [
            [f, round(100 * v / total, 1)]
            for f, v in sorted(d.items(), key=lambda kv: -kv[1])[:top]
        ]

    # The frames every stack starts with (the interpreter, the CLI, the
    # event loop's run) say nothing about where the time goes.
    incl = {f: v for f, v in incl.items() if f.partition(" (")[0] not in _ROOTS}
    return {
        "samples": total,
        "self_pct": rank(own) if total else [],
        "inclusive_pct": rank(incl) if total else [],
    }


_ROOTS = {
    "_run_module_as_main",
    "_run_code",
    "<module>",
    "main",
    "serve",
    "Server.run",
    "Runner.run",
    "asyncio_run",
    "run",
    "Server.serve",
    "Server._serve",
}


def _short(frame: str) -> str:
    # py-spy: "function (path/to/file.py:LINE)" -> "function (file.py)"
    name, _, loc = frame.partition(" (")
    loc = loc.rstrip(")")
    path = loc.rsplit(":", 1)[0]
    parts = path.replace("\\", "/").split("/")
    if "site-packages" in parts:
        short = "/".join(parts[parts.index("site-packages") + 1 :])
    elif "hub" in parts:
        short = "/".join(parts[len(parts) - 1 - parts[::-1].index("hub") :])
    else:
        short = parts[-1]
    return f"{name} ({short})"
