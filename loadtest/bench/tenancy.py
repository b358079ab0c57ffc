"""The ``tenancy`` scenario: database per org (issue 13).

Three measurements, each on fresh databases made for it (dropped after):

1. **Shared vs tenants.** The ``many_orgs`` load: 200 orgs x 50
   subscribers, durable inserts at 2,000/s spread over the orgs, first with
   every org in one database, then with the orgs spread over 20 tenant
   databases (``hub orgs add``), same hub, same total load.  Delivery
   throughput (deliveries per hub CPU-second) and insert-to-receive
   latency.  The publisher inserts with ``hub.append_event`` into each
   org's own database, one connection per database, one statement per
   database per 10 ms tick, with ``synchronous_commit = off`` (20
   databases on one server would otherwise make the disk's flushes the
   limit: 20 commits per tick instead of one).
2. **Cost of a tenant database.** With the hub idle: its RSS and its
   PostgreSQL connections with no tenant database and with 20, per tenant.
3. **A move under writes.** An org with ``move_events`` events (1,000,000
   by default) moves from the control database to a tenant database with
   ``hub orgs move`` while a writer publishes to it through the hub's REST
   API every 10 ms: how long writes were blocked (the command's report,
   and the slowest publish the writer saw), and the whole move's time.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import subprocess
import sys
import time
from typing import Any

import orjson

from loadtest.bench.loadgen import BODY, Publisher, percentiles
from loadtest.bench.scenarios import (
    Config,
    Meter,
    _delivery_phase,
    _joined_ok,
    _pool,
    _rate,
    _settle,
)
from loadtest.bench.servers import ROOT, deploy

#: Tenant databases of the spread phase.
TENANTS = 20
#: Events of the org that moves (--quick: a tenth).
MOVE_EVENTS = 1_000_000


class RoutedPgPublisher(Publisher):
    """Durable inserts into each org's own database, one statement per
    database per tick (as :class:`~loadtest.bench.loadgen.PgPublisher`
    does for one database), one connection per database."""

    SQL = (
        "SELECT count(hub.append_event(o, 'event', 'm', p::jsonb)) "
        "FROM unnest($1::text[], $2::text[]) AS x(o, p)"
    )

    def __init__(self, dsn_of: dict[str, str], default: str) -> None:
        self.dsn_of = dsn_of
        self.default = default
        self.conns: dict[str, Any] = {}
        self.locks: dict[str, asyncio.Lock] = {}
        self.inflight: set[asyncio.Task[None]] = set()
        self.body = "x" * BODY
        self.error: BaseException | None = None

    async def connect(self) -> None:
        import asyncpg

        for dsn in {*self.dsn_of.values(), self.default}:
            # No WAL flush wait: with 20 databases on one server every tick
            # is 20 commits instead of one, and this disk, not the hub, would
            # set the pace (both phases run alike).
            self.conns[dsn] = await asyncpg.connect(
                dsn, server_settings={"synchronous_commit": "off"}
            )
            self.locks[dsn] = asyncio.Lock()

    async def _insert(self, dsn: str, orgs: list[str], payloads: list[str]) -> None:
        # One statement at a time per connection; ticks queue behind it.
        async with self.locks[dsn]:
            await self.conns[dsn].fetchval(self.SQL, orgs, payloads)

    async def publish(self, count: int, start: int, nrooms: int) -> None:
        if self.error is not None:
            raise RuntimeError(f"insert failed: {self.error!r}")
        by_db: dict[str, list[tuple[str, str]]] = {}
        for j in range(count):
            org = f"o{(start + j) % nrooms}"
            payload = orjson.dumps({"t": time.time_ns(), "i": start + j, "body": self.body})
            by_db.setdefault(self.dsn_of.get(org, self.default), []).append((org, payload.decode()))
        for dsn, rows in by_db.items():
            rows.sort(key=lambda row: row[0])  # seq rows locked in one order
            self._spawn(self._insert(dsn, [o for o, _ in rows], [p for _, p in rows]))

    def _spawn(self, insert: Any) -> None:
        task = asyncio.create_task(insert)
        self.inflight.add(task)  # the reference that keeps it alive
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self.inflight.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self.error = task.exception()

    async def drain(self) -> None:
        while self.inflight:
            await asyncio.wait(self.inflight)

    async def close(self) -> None:
        await self.drain()
        for conn in self.conns.values():
            await conn.close()


async def _create(admin: str, count: int) -> list[str]:
    """``count`` migrated databases; their DSNs."""
    import asyncpg

    conn = await asyncpg.connect(admin)
    names = [f"hub_bench_t_{secrets.token_hex(4)}" for _ in range(count)]
    try:
        for name in names:
            await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    urls = [admin.rsplit("/", 1)[0] + "/" + name for name in names]
    for url in urls:
        await _hub("migrate", env={"HUB_DATABASE_URL": url})
    return urls


async def _drop(admin: str, urls: list[str]) -> None:
    import asyncpg

    conn = await asyncpg.connect(admin)
    try:
        for url in urls:
            await conn.execute(f'DROP DATABASE IF EXISTS "{url.rsplit("/", 1)[1]}" WITH (FORCE)')
    finally:
        await conn.close()


async def _hub(*args: str, env: dict[str, str]) -> str:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "hub",
        *args,
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        cwd=ROOT,
    )
    out, _ = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"hub {' '.join(args)} failed: {out.decode()[-500:]}")
    return out.decode()


async def _connections(admin: str, databases: list[str]) -> int:
    import asyncpg

    conn = await asyncpg.connect(admin)
    try:
        return int(
            await conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = ANY($1::text[]) "
                "AND application_name LIKE 'hub%'",
                [url.rsplit("/", 1)[1] for url in databases],
            )
        )
    finally:
        await conn.close()


async def _orgs_phase(
    name: str, cfg: Config, control: str, dsn_of: dict[str, str]
) -> dict[str, Any]:
    """The many_orgs load with each org's events inserted into its database."""
    dep = await deploy(
        name, database_url=control, durable=False, hub_extra={"HUB_PROJECTIONS": "false"}
    )
    publisher = RoutedPgPublisher(dsn_of, control)
    pool = _pool(cfg, dep)
    n = cfg.orgs * cfg.org_subs
    out: dict[str, Any] = {"databases": len(set(dsn_of.values())) or 1}
    try:
        # The tenant stores' start-up connections idle out first: 20 tenant
        # databases, the publisher's 21 connections and the hub's share one
        # server's 100 connections here.
        await asyncio.sleep(8)
        await publisher.connect()
        replaced, dep.publisher = dep.publisher, publisher
        await replaced.close()
        ready = await pool.start(
            dep.connections(n, cfg.orgs), sample=4, concurrency=cfg.connect_concurrency
        )
        _joined_ok(ready, n)
        await publisher.publish(cfg.orgs, 0, cfg.orgs)  # warm-up: one per org
        await _settle(pool, n, quiet=1.0, cap=15.0)
        await pool.reset(sample=4)
        meter = Meter(dep, None)
        t: dict[str, float] = {}

        async def run() -> int:
            from loadtest.bench.loadgen import paced

            t0 = time.perf_counter()
            k = await paced(publisher, rate=cfg.org_rate, seconds=cfg.org_seconds, nrooms=cfg.orgs)
            await publisher.drain()
            t["publish_s"] = time.perf_counter() - t0
            await _settle(pool, k * cfg.org_subs, quiet=2.0, cap=15.0)
            return k

        m, (k, st) = await _delivery_phase(dep, pool, meter, run(), n)
        out.update(
            {
                "events": k,
                "achieved_events_per_s": _rate(k, t["publish_s"]),
                "expected": k * cfg.org_subs,
                **m,
                "deliveries_per_server_cpu_s": _rate(m["delivered"], m["server_cpu_s"]),
                "latency_ms": percentiles(st["lat"]),
            }
        )
    finally:
        await pool.close()
        await publisher.close()
        await dep.stop()
    return out


async def _idle_cost(name: str, control: str, admin: str, tenants: list[str]) -> dict[str, Any]:
    """RSS and PostgreSQL connections of an idle hub, per tenant database."""
    dep = await deploy(name, database_url=control, hub_extra={"HUB_PROJECTIONS": "false"})
    try:
        # Past a tenant pool's idle time: what stays open is what an idle
        # tenant costs (its projection runner, off here, adds one more).
        await asyncio.sleep(8)
        rss = sum(s.rss_kb() for s in dep.nodes)
        conns = await _connections(admin, tenants)
    finally:
        await dep.stop()
    return {"rss_kb": rss, "tenant_connections": conns}


async def _move(name: str, cfg: Config, control: str, target: str) -> dict[str, Any]:
    """An org with MOVE_EVENTS events moves while a writer publishes."""
    import asyncpg
    import httpx

    org = "big"
    move_events = MOVE_EVENTS // 10 if cfg.quick else MOVE_EVENTS
    conn = await asyncpg.connect(control)
    try:
        # Straight into the log (a million hub.append_event calls would take
        # minutes): the same rows, one statement.
        await conn.execute(
            "INSERT INTO hub.events (org, seq, kind, type, payload, created_at) "
            "SELECT $1, s, 'event', 'm', jsonb_build_object('i', s), "
            "now() - make_interval(secs => ($2 - s) / 1000.0) "
            "FROM generate_series(1, $2::bigint) AS s",
            org,
            move_events,
        )
        await conn.execute("INSERT INTO hub.org_seq (org, seq) VALUES ($1, $2)", org, move_events)
        await conn.fetch("SELECT hub.ensure_event_partitions()")
        await conn.execute("ANALYZE hub.events")
    finally:
        await conn.close()
    dep = await deploy(name, database_url=control, hub_extra={"HUB_PROJECTIONS": "false"})
    assert dep.secret is not None
    from hub.auth.tokens import issue_token

    token = issue_token(dep.secret, sub="bench-mover", role="service_role", ttl=7200)
    port = dep.urls[0].split(":")[2].split("/")[0]
    latencies: list[float] = []
    stop = asyncio.Event()

    async def write() -> None:
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{port}",
            headers={"Authorization": f"Bearer {token}"},
            timeout=60,
        ) as http:
            while not stop.is_set():
                t0 = time.perf_counter()
                r = await http.post(f"/api/orgs/{org}/events", json={"type": "w", "payload": {}})
                r.raise_for_status()
                latencies.append(time.perf_counter() - t0)
                await asyncio.sleep(0.01)

    writer = asyncio.create_task(write())
    try:
        await asyncio.sleep(1.0)
        t0 = time.perf_counter()
        report = await _hub("orgs", "move", org, "--to", target, env={"HUB_DATABASE_URL": control})
        move_s = time.perf_counter() - t0
        await asyncio.sleep(1.0)
    finally:
        stop.set()
        await asyncio.gather(writer, return_exceptions=True)
        await dep.stop()
    blocked = [line for line in report.splitlines() if "writes were blocked" in line]
    ordered = sorted(latencies)
    return {
        "events": move_events,
        "move_s": round(move_s, 2),
        "report": blocked[0] if blocked else report.strip().splitlines()[-1],
        "writes": len(latencies),
        "write_ms": {
            "p50": round(1000 * ordered[len(ordered) // 2], 1),
            "p99": round(1000 * ordered[int(len(ordered) * 0.99)], 1),
            "max": round(1000 * ordered[-1], 1),
        },
    }


async def tenancy(name: str, cfg: Config, *, admin: str) -> dict[str, Any]:
    databases: list[str] = []
    result: dict[str, Any] = {"server": name, "orgs": cfg.orgs, "tenants": TENANTS}
    try:
        [shared] = await _create(admin, 1)
        databases.append(shared)
        result["shared"] = await _orgs_phase(name, cfg, shared, {})

        [control] = await _create(admin, 1)
        databases.append(control)
        idle_alone = await _idle_cost(name, control, admin, [])
        tenants = await _create(admin, TENANTS)
        databases += tenants
        dsn_of = {f"o{i}": tenants[i % TENANTS] for i in range(cfg.orgs)}
        for org, dsn in dsn_of.items():
            await _hub("orgs", "add", org, "--database", dsn, env={"HUB_DATABASE_URL": control})
        idle = await _idle_cost(name, control, admin, tenants)
        result["per_tenant_database"] = {
            "rss_kb": round((idle["rss_kb"] - idle_alone["rss_kb"]) / TENANTS, 1),
            "hub_connections": round(idle["tenant_connections"] / TENANTS, 2),
        }
        result["tenants_phase"] = await _orgs_phase(name, cfg, control, dsn_of)
        result["move"] = await _move(name, cfg, control, tenants[0])
    finally:
        await _drop(admin, databases)
    return result
