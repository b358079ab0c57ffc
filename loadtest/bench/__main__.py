"""``python -m loadtest.bench``: run the benchmark scenarios, print a table and JSON.

    python -m loadtest.bench [--scenarios fanout,many_orgs,capacity,multinode,private_joins,
                                          rls_changes,projections,drain,tenancy]
                             [--servers hub,hub-inproc,limit,bun,floor,socketio,channels,
                                        broadcaster]
                             [--client native|python] [--quick] [--runs N] [--json out.json]
                             [--profile] [--perf] [--no-docs]

See docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import secrets
import subprocess
import sys
import time
import traceback
from typing import Any

import orjson
import uvloop

from loadtest.bench import envs, procs, report, scenarios, servers, tenancy
from loadtest.commands import repeatable_command

SCENARIOS = [
    "fanout",
    "many_orgs",
    "capacity",
    "multinode",
    "private_joins",
    "rls_changes",
    "projections",
    "drain",
    "tenancy",
]
#: Scenarios that need the hub's database (a fresh one unless --database-url).
DATABASE_SCENARIOS = ("many_orgs", "private_joins", "rls_changes", "projections")
HUB_KINDS = ("hub", "hub-inproc")
#: Measured --runs times; the Python peers, 10 to 500 times slower and
#: minutes per run, once.
REPEATED = ("hub", "hub-inproc", "limit", "bun", "floor")
#: drain measures the load clients, against the one server that is surely
#: faster than they are.
DRAIN_SERVERS = ("floor",)
PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


async def _create_db(admin: str) -> str:
    import asyncpg

    name = f"hub_bench_{secrets.token_hex(4)}"
    conn = await asyncpg.connect(admin)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    url = admin.rsplit("/", 1)[0] + "/" + name
    env = {**os.environ, "HUB_DATABASE_URL": url}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "hub",
        "migrate",
        env=env,
        stdout=subprocess.DEVNULL,
        cwd=servers.ROOT,
    )
    if await proc.wait() != 0:
        raise RuntimeError("hub migrate failed")
    return url


async def _pin_postgres(dsn: str) -> procs.PinnedTree | str:
    """The PostgreSQL server of ``dsn`` (the database the scenarios use)
    off the server's core, as PERFORMANCE.md's many-orgs target says: its
    processes get the load generator's core.  Or why not."""
    import asyncpg

    try:
        conn = await asyncpg.connect(dsn)
    except (OSError, asyncpg.PostgresError) as exc:
        return f"cannot connect to it ({type(exc).__name__})"
    try:
        # While the backend lives: its parent is the postmaster.
        return procs.pin_postgres(int(await conn.fetchval("SELECT pg_backend_pid()")))
    finally:
        await conn.close()


async def _drop_db(admin: str, url: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(admin)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{url.rsplit("/", 1)[1]}" WITH (FORCE)')
    finally:
        await conn.close()


def _say(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _brief(r: dict[str, Any]) -> str:
    if "error" in r:
        return "ERROR " + r["error"][:200]
    keys = (
        "deliveries_per_server_cpu_s",
        "delivered",
        "expected",
        "latency_ms",
        "bound",
        "kb_per_conn",
        "connects_joins_per_wall_s",
        "connects_joins_per_server_cpu_s",
        "joined",
    )
    out = {}
    for src in (r, r.get("saturated", {})):
        out.update({k: src[k] for k in keys if k in src})
    for kind in ("public", "private"):
        if kind in r:
            out[kind] = {
                k: r[kind][k]
                for k in ("joined", "joins_per_server_cpu_s", "joins_per_wall_s", "pg_cpu_s")
            }
    if "policy_cost" in r:
        out["policy_cost"] = r["policy_cost"]
    if "cost" in r:
        out["projections"] = {
            "catch_up": r["with"].get("catch_up"),
            "lag": {k: v for k, v in r["with"].items() if k.startswith("lag_")},
            "cost": r["cost"],
        }
    for key in (k for k in r if k.startswith("users_")):
        out[key] = {k: r[key][k] for k in ("delivered", "expected", "changes_per_s")}
    if "fixed_rate" in r:
        out["fixed_latency_ms"] = r["fixed_rate"]["latency_ms"]
    for regime in ("burst", "paced", "fixed_rate"):
        if regime in r and "latency_ms" in r[regime]:
            out[regime] = [
                r[regime].get("deliveries_per_server_cpu_s"),
                r[regime]["latency_ms"]["p99"],
            ]
    for client in ("native", "python"):
        if client in r and "frames_per_wall_s" in r[client]:
            out[client] = {
                k: r[client][k]
                for k in ("frames_per_wall_s", "frames_per_client_cpu_s", "client_busy_pct")
            }
    return orjson.dumps(out).decode()


async def _measure(
    scen: str,
    name: str,
    cfg: scenarios.Config,
    db_url: str | None,
    redis_pid: int | None,
    profile: bool,
    pg_admin: str = PG_ADMIN,
    perf: bool = False,
) -> dict[str, Any]:
    """One run of one scenario against one server; an error becomes the result."""
    try:
        if scen == "fanout":
            return await scenarios.fanout(
                name, cfg, profile=profile, perf=perf, redis_pid=redis_pid
            )
        if scen == "multinode":
            return await scenarios.fanout(name, cfg, nodes=2, redis_pid=redis_pid)
        if scen == "many_orgs":
            return await scenarios.many_orgs(
                name, cfg, database_url=db_url, redis_pid=redis_pid, profile=profile
            )
        if scen == "private_joins":
            assert db_url is not None
            return await scenarios.private_joins(name, cfg, database_url=db_url, profile=profile)
        if scen == "rls_changes":
            assert db_url is not None
            return await scenarios.rls_changes(name, cfg, database_url=db_url)
        if scen == "projections":
            assert db_url is not None
            return await scenarios.projections(name, cfg, database_url=db_url)
        if scen == "drain":
            return await scenarios.drain(name, cfg)
        if scen == "tenancy":
            return await tenancy.tenancy(name, cfg, admin=pg_admin)
        return await scenarios.capacity(name, cfg, profile=profile)
    except Exception as exc:
        traceback.print_exc()
        return {"error": f"{type(exc).__name__}: {exc}".splitlines()[0][:300]}


async def run(args: argparse.Namespace) -> dict[str, Any]:
    procs.pin_self()
    cfg = scenarios.Config.make(args.quick, args.capacity, args.client)
    chosen = [s for s in args.scenarios.split(",") if s]
    names = [s for s in args.servers.split(",") if s]
    for s in chosen:
        if s not in SCENARIOS:
            raise SystemExit(f"unknown scenario {s!r}; choose from {', '.join(SCENARIOS)}")
    for n in names:
        if n not in servers.ALL:
            raise SystemExit(f"unknown server {n!r}; choose from {', '.join(servers.ALL)}")
    for n in names:
        if n in servers.VENV:
            envs.ensure(servers.VENV[n])
    redis_pid = procs.redis_pid()
    results: dict[str, Any] = {
        "machine": {
            "cores": os.cpu_count(),
            "date": time.strftime("%Y-%m-%d %H:%M %Z"),
            "cpu_model": _cpu_model(),
            "python": platform.python_version(),
            "kernel": platform.release(),
        },
        "quick": args.quick,
        "runs": args.runs,
        "command": repeatable_command(
            "python -m loadtest.bench", sys.argv[1:], ("--json", "--database-url", "--pg-admin")
        ),
        "config": cfg.__dict__,
        "scenarios": {},
    }
    db_url = None
    pinned_pg: procs.PinnedTree | None = None
    try:
        for scen in chosen:
            out: dict[str, Any] = {}
            results["scenarios"][scen] = out
            if scen in DATABASE_SCENARIOS and db_url is None and any(n in HUB_KINDS for n in names):
                db_url = args.database_url or await _create_db(args.pg_admin)
                pin = await _pin_postgres(db_url)
                if isinstance(pin, str):
                    results["postgres"] = f"not pinned: {pin}"
                    _say(f"PostgreSQL {results['postgres']}")
                else:
                    pinned_pg = pin
                    results["postgres"] = f"pinned to core {procs.CLIENT_CORES}"
            measured: dict[str, list[dict[str, Any]]] = {}
            # Rounds go over every server in turn, so a change in the
            # machine's state over time hits them all alike.
            for rnd in range(args.runs):
                for name in names:
                    if rnd and name not in REPEATED:
                        continue
                    if scen == "multinode" and name not in servers.MULTINODE:
                        out[name] = {"error": "single process only (no broker to share rooms)"}
                        continue
                    if scen == "tenancy" and name != "hub":
                        out[name] = {"error": "no equivalent (no database per org)"}
                        continue
                    if scen == "drain" and name not in DRAIN_SERVERS:
                        out[name] = {"error": "drain measures the clients against the floor only"}
                        continue
                    if scen == "projections" and name not in HUB_KINDS:
                        out[name] = {"error": "no equivalent (no read models from a log)"}
                        continue
                    if scen == "rls_changes" and name not in HUB_KINDS:
                        out[name] = {
                            "error": "no equivalent (no postgres_changes with row security)"
                        }
                        continue
                    if scen == "private_joins" and name not in HUB_KINDS:
                        out[name] = {
                            "error": "no equivalent (no private channels authorized by "
                            "database policies)"
                        }
                        continue
                    label = f"{scen} / {name}" + (f" (run {rnd + 1})" if args.runs > 1 else "")
                    _say(f"{label} ...")
                    # py-spy slows what it samples: only the first run.
                    profile = args.profile and rnd == 0 and name in HUB_KINDS
                    # perf costs the sampled process little, but only the
                    # first run is sampled all the same.
                    perf = args.perf and rnd == 0
                    r = await _measure(
                        scen, name, cfg, db_url, redis_pid, profile, args.pg_admin, perf
                    )
                    if "profile" in r:
                        results.setdefault("profiles", {})[f"{scen}/{name}"] = r.pop("profile")
                    if "perf" in r:
                        results.setdefault("perf", {})[name] = r.pop("perf")
                    measured.setdefault(name, []).append(r)
                    _say(f"{label}: {_brief(r)}")
                    await asyncio.sleep(1.0)
            for name, runs in measured.items():
                out[name] = report.median_run(scen, runs)
    finally:
        if pinned_pg is not None:
            pinned_pg.restore()
        if db_url is not None and args.database_url is None:
            await _drop_db(args.pg_admin, db_url)
    return results


def main() -> None:
    ap = argparse.ArgumentParser(
        prog="python -m loadtest.bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--scenarios", default=",".join(SCENARIOS))
    ap.add_argument("--servers", default=",".join(servers.ALL))
    ap.add_argument(
        "--quick",
        action="store_true",
        help="short smoke run: fewer messages, 3 s latency phases, 5,000 idle conns",
    )
    ap.add_argument("--capacity", type=int, help="idle connections [19000; quick 5000]")
    ap.add_argument(
        "--client",
        choices=("native", "python"),
        default="native",
        help="load client of fanout, multinode and many_orgs (Socket.IO is always "
        "Python's) [native]",
    )
    ap.add_argument(
        "--runs",
        type=int,
        default=1,
        help="measure hub, hub-inproc, limit, bun and floor this many times; report the "
        "median run [1]",
    )
    ap.add_argument("--json", help="also write the results as JSON here")
    ap.add_argument(
        "--profile",
        action="store_true",
        help="py-spy hub and hub-inproc during fan-out saturation, many_orgs and connects",
    )
    ap.add_argument(
        "--perf",
        action="store_true",
        help="Linux perf on every server (kernel included) at one message per 10 ms in "
        "fanout, first run only",
    )
    ap.add_argument(
        "--no-docs",
        action="store_true",
        help="do not rewrite the results section of docs/benchmarks.md",
    )
    ap.add_argument("--database-url", help="existing migrated database (default: a fresh one)")
    ap.add_argument(
        "--pg-admin", default=PG_ADMIN, help=f"where to create the fresh database [{PG_ADMIN}]"
    )
    args = ap.parse_args()
    if args.runs < 1:
        ap.error("--runs must be at least 1")
    results = uvloop.run(run(args))
    text = report.render(results)
    print(text)
    blob = orjson.dumps(results, option=orjson.OPT_INDENT_2)
    out_dir = envs.CACHE / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{time.strftime('%Y%m%d-%H%M%S')}.json").write_bytes(blob)
    if args.json:
        with open(args.json, "wb") as f:
            f.write(blob)
    if not args.no_docs:
        report.write_doc(text)
        _say(f"results table written to {report.DOC}")


if __name__ == "__main__":
    main()
