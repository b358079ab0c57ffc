"""The soak run: sustained load for a long time, reported by the run itself.

One command (10 minutes by default; at least 10 for a real soak)::

    python -m loadtest.soak --duration 600

starts one ``hub serve`` on a fresh PostgreSQL database (created, migrated,
given the Realtime Authorization policies of ``loadtest/policies.py`` and
dropped by the run; ``--no-database`` uses the in-memory store and no
private room users), drives it with the locust scenarios of
``loadtest/locustfile.py`` (members that publish and track presence, REST
publishers of durable events, ``mother`` watchers, connection churn, users
of public and of private free-name rooms, ``postgres_changes`` listeners of
a table with RLS, fed 20 rows/s by the run) and samples the hub every ``--sample`` seconds
(RSS, CPU, connections, channels, frames out, closes by code, from
``/metrics`` and ``/proc``).  At the end it writes ``docs/reliability.md``
(``--report``): the configuration, errors, latency over time (per minute,
from locust's history) and memory over time, plus the verdict.

The exit code is 0 when locust saw no failure and the hub's RSS in the last
minute is within ``--rss-growth-mb`` of its RSS after the first minute (the
warm-up); 1 otherwise.  The locust CSV/HTML reports stay in ``--workdir``.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import platform
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import psutil

from hub.store.migrate import migrate
from loadtest import policies
from loadtest.commands import repeatable_command

ROOT = Path(__file__).resolve().parent.parent
ADMIN_DSN = os.environ.get("HUB_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
#: locust request names shown in the latency table, in this order.
LATENCY_NAMES = (
    ("WS", "broadcast latency"),
    ("WS", "durable latency"),
    ("WS", "publish (ack)"),
    ("WS", "join"),
    ("WS", "public broadcast latency"),
    ("WS", "private broadcast latency"),
    ("WS", "private join"),
    ("POST", "POST /api/orgs/[org]/events"),
)
_METRIC = re.compile(r"^(hub_[a-z_]+)\{([^}]*)\} ([0-9.e+-]+)$", re.MULTILINE)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Sample:
    elapsed: float
    rss: int
    cpu: float
    connections: float
    channels: float
    frames_out: float
    closes: dict[str, float] = field(default_factory=dict)


def parse_metrics(text: str) -> tuple[dict[str, float], dict[str, float]]:
    """Plain values by name, and ``hub_closes_total`` by code."""
    values: dict[str, float] = {}
    closes: dict[str, float] = {}
    for name, labels, value in _METRIC.findall(text):
        if name == "hub_closes_total":
            code = re.search(r'code="([^"]+)"', labels)
            if code:
                closes[code.group(1)] = float(value)
        else:
            values[name] = float(value)
    return values, closes


async def sample_forever(
    url: str, pid: int, every: float, samples: list[Sample], started: float
) -> None:
    process = psutil.Process(pid)
    process.cpu_percent(None)
    async with httpx.AsyncClient(timeout=5) as http:
        while True:
            await asyncio.sleep(every)
            try:
                text = (await http.get(f"{url}/metrics")).text
                rss = process.memory_info().rss
                cpu = process.cpu_percent(None)
            except (httpx.HTTPError, psutil.Error):
                continue
            values, closes = parse_metrics(text)
            samples.append(
                Sample(
                    elapsed=time.monotonic() - started,
                    rss=rss,
                    cpu=cpu,
                    connections=values.get("hub_connections", 0.0),
                    channels=values.get("hub_channels", 0.0),
                    frames_out=values.get("hub_messages_out_total", 0.0),
                    closes=closes,
                )
            )


def read_csv(path: Path) -> list[dict[str, str]]:
    if not path.exists():
        return []
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def _num(value: str | None) -> float | None:
    try:
        return float(value) if value not in (None, "", "N/A") else None
    except ValueError:
        return None


def latency_by_minute(
    history: list[dict[str, str]], start: float
) -> dict[tuple[str, str], dict[int, dict[str, float]]]:
    """Per request name and minute: requests in the minute and the worst of
    locust's rolling (10 s) p50/p95/p99 within it."""
    table: dict[tuple[str, str], dict[int, dict[str, float]]] = defaultdict(dict)
    last_total: dict[tuple[str, str], float] = {}
    for row in history:
        key = (row.get("Type", ""), row.get("Name", ""))
        if key not in LATENCY_NAMES:
            continue
        stamp = _num(row.get("Timestamp"))
        total = _num(row.get("Total Request Count")) or 0.0
        if stamp is None:
            continue
        minute = int((stamp - start) // 60)
        cell = table[key].setdefault(minute, {"requests": 0.0, "p50": 0.0, "p95": 0.0, "p99": 0.0})
        cell["requests"] += max(0.0, total - last_total.get(key, 0.0))
        last_total[key] = total
        for column in ("50%", "95%", "99%"):
            value = _num(row.get(column))
            if value is not None:
                name = "p" + column.rstrip("%")
                cell[name] = max(cell[name], value)
    return table


def write_report(
    path: Path,
    args: argparse.Namespace,
    command: str,
    started_at: float,
    stats: list[dict[str, str]],
    failures: list[dict[str, str]],
    history: list[dict[str, str]],
    samples: list[Sample],
    verdict: dict[str, Any],
) -> None:
    lines: list[str] = []
    add = lines.append
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(started_at))
    add("# Reliability: the soak run")
    add("")
    add(
        "This file is written by `python -m loadtest.soak` at the end of each run; "
        "do not edit it by hand. Run it again to refresh it."
    )
    add("")
    add(f"- run: {when}, {args.duration:.0f} s of load, exit {'0' if verdict['ok'] else '1'}")
    add(f"- command: `{command}`")
    add(
        f"- load: locust, {args.users} users (spawn rate {args.spawn_rate}/s) over "
        f"{args.orgs} orgs: members publishing {args.publish_rate}/s each with presence, "
        f"REST publishers at {args.rest_rate} requests/s each, `mother` watchers, "
        "connection churn (weights 10/1/1/2)"
    )
    store = "PostgreSQL (a fresh database)" if not args.no_database else "in-memory"
    add(f"- hub: one `hub serve` node, {store} event store, default limits")
    add(
        f"- machine: {platform.machine()}, {os.cpu_count()} CPUs, Python "
        f"{platform.python_version()}; load generator and hub share it"
    )
    add("")
    add("## Verdict")
    add("")
    for name, (ok, detail) in verdict["checks"].items():
        add(f"- {'PASS' if ok else 'FAIL'} {name}: {detail}")
    add("")
    add("## Errors")
    add("")
    total = next((r for r in stats if r.get("Name") == "Aggregated"), None)
    if total:
        add(
            f"{int(float(total['Request Count'])):,} requests and messages, "
            f"{int(float(total['Failure Count'])):,} failures."
        )
        add("")
    if failures:
        add("| type | name | error | occurrences |")
        add("|---|---|---|---|")
        for row in failures:
            error = row.get("Error", "").replace("|", "\\|")[:160]
            add(f"| {row.get('Method')} | {row.get('Name')} | {error} | {row.get('Occurrences')} |")
    else:
        add("No failures: no refused join, unanswered request, unexpected close or HTTP error.")
    add("")
    add("| type | name | count | failures | median ms | p95 ms | p99 ms | max ms |")
    add("|---|---|---:|---:|---:|---:|---:|---:|")
    for row in stats:
        if row.get("Name") == "Aggregated":
            continue
        add(
            f"| {row['Type']} | {row['Name']} | {int(float(row['Request Count'])):,} | "
            f"{int(float(row['Failure Count']))} | {row.get('50%', '')} | {row.get('95%', '')} | "
            f"{row.get('99%', '')} | {float(row.get('Max Response Time') or 0):.0f} |"
        )
    add("")
    add("Latencies are milliseconds. `broadcast latency` is publish to receipt at every")
    add("other member (the payload carries the send time); `durable latency` is a REST")
    add("append to receipt by every member of the org; the other rows are round trips.")
    add("")
    add("## Latency over time")
    add("")
    add("Per minute: messages (or requests) in the minute, and the worst p50 / p95 / p99")
    add("of locust's rolling 10-second window within that minute, in ms.")
    add("")
    table = latency_by_minute(history, started_at)
    minutes = sorted({m for cells in table.values() for m in cells})
    header = "| minute | " + " | ".join(name for _, name in LATENCY_NAMES) + " |"
    add(header)
    add("|---:|" + "---|" * len(LATENCY_NAMES))
    for minute in minutes:
        cells = []
        for key in LATENCY_NAMES:
            cell = table.get(key, {}).get(minute)
            if cell is None or not cell["requests"]:
                cells.append("-")
            else:
                cells.append(
                    f"{int(cell['requests']):,}: {cell['p50']:.0f} / {cell['p95']:.0f} / "
                    f"{cell['p99']:.0f}"
                )
        add(f"| {minute + 1} | " + " | ".join(cells) + " |")
    add("")
    add("## Memory and connections over time")
    add("")
    add("The hub process, sampled every few seconds; one row per minute (last sample).")
    add("")
    add("| minute | RSS MiB | CPU % | connections | channels | frames out/s | closes so far |")
    add("|---:|---:|---:|---:|---:|---:|---|")
    by_minute: dict[int, Sample] = {}
    previous: dict[int, Sample] = {}
    for sample in samples:
        minute = int(sample.elapsed // 60)
        previous.setdefault(minute, sample)
        by_minute[minute] = sample
    for minute in sorted(by_minute):
        last, first = by_minute[minute], previous[minute]
        span = max(1e-9, last.elapsed - first.elapsed)
        rate = (last.frames_out - first.frames_out) / span if span > 1 else 0.0
        closes = ", ".join(f"{code}: {int(n)}" for code, n in sorted(last.closes.items()))
        add(
            f"| {minute + 1} | {last.rss / 2**20:.1f} | {last.cpu:.0f} | {int(last.connections)} "
            f"| {int(last.channels)} | {rate:,.0f} | {closes or '-'} |"
        )
    add("")
    add("## Bounds the test suite checks (for comparison)")
    add("")
    add(
        "- Slow consumer (`tests/load/test_slow_consumer_bound.py`): with one client that "
        "stops reading, the other subscribers' p99 latency stays within "
        "max(3 x p99 alone, p99 alone + 50 ms) and under 250 ms, the slow one is closed with "
        "4001, and the hub's RSS stays within 48 MiB of where it was."
    )
    add(
        "- Chaos (`python -m loadtest.chaos`, short version in "
        "`tests/load/test_chaos_short.py`): while nodes are SIGKILLed and SIGTERMed, LISTEN "
        "backends terminated, Redis pub/sub connections killed and subscribers cut, every "
        "subscriber gets every durable event of its org exactly once in seq order; "
        "connections return to 0 and RSS to within max(48 MiB, 50%) of the warm-up baseline."
    )
    add(
        "- Redis Cluster failover (`tests/integration/engine/test_redis_cluster.py`): with "
        "six local `redis-server` processes (3 primaries, 3 replicas, `cluster-node-timeout "
        "1000`), the primary serving a channel is SIGKILLed while a node broadcasts on it "
        "every 20 ms; both hub nodes resubscribe on the promoted replica, every broadcast "
        "published after that is delivered, none twice or out of order, and a stream on "
        "another shard loses nothing."
    )
    add("")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))


async def run(args: argparse.Namespace) -> int:
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="hub-soak-"))
    workdir.mkdir(parents=True, exist_ok=True)
    secret = secrets.token_urlsafe(32)
    database = f"hub_soak_{secrets.token_hex(6)}"
    env = {
        **os.environ,
        "HUB_JWT_SECRET": secret,
        "HUB_LOG_LEVEL": "warning",
        "HUB_ORG_MAX_CONNECTIONS": "100000",
        "HUB_ORG_JOINS_PER_SECOND": "100000",
        "HUB_ORG_MESSAGES_PER_SECOND": "100000",
    }
    if not args.no_database:
        conn = await asyncpg.connect(ADMIN_DSN, timeout=10)
        try:
            await conn.execute(f'CREATE DATABASE "{database}"')
        finally:
            await conn.close()
        dsn = ADMIN_DSN.rpartition("/")[0] + "/" + database
        await migrate(dsn)
        # The private room users' policies and members (loadtest/policies.py).
        await policies.install(dsn)
        env["HUB_DATABASE_URL"] = dsn
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    hub_log = (workdir / "hub.log").open("wb")
    hub = subprocess.Popen(  # noqa: ASYNC220 - started once, watched with poll()
        [sys.executable, "-m", "hub", "serve", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=hub_log,
        stderr=subprocess.STDOUT,
        cwd=ROOT,
    )
    samples: list[Sample] = []
    locust_rc = None
    try:
        async with httpx.AsyncClient() as http:
            deadline = time.monotonic() + 20
            while True:
                try:
                    if (await http.get(f"{url}/healthz", timeout=1)).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if hub.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the hub did not start; see " + str(workdir / "hub.log"))
                await asyncio.sleep(0.1)
        locust = [
            str(Path(sys.executable).with_name("locust")),
            "-f",
            str(ROOT / "loadtest" / "locustfile.py"),
            "--headless",
            "-u",
            str(args.users),
            "-r",
            str(args.spawn_rate),
            "-t",
            f"{int(args.duration)}s",
            "--host",
            url,
            "--csv",
            str(workdir / "soak"),
            "--csv-full-history",
            "--html",
            str(workdir / "soak.html"),
            "--only-summary",
            "--orgs",
            str(args.orgs),
            "--publish-rate",
            str(args.publish_rate),
            "--rest-rate",
            str(args.rest_rate),
            # Private channels and the RLS table need the database.
            *(["--private-weight", "0", "--todo-weight", "0"] if args.no_database else []),
        ]
        print(f"soak: {args.duration:.0f}s against {url}; work files in {workdir}", flush=True)
        started_at, started = time.time(), time.monotonic()
        sampler = asyncio.create_task(sample_forever(url, hub.pid, args.sample, samples, started))
        # The todo users' rows (postgres_changes over RLS), for the whole run.
        writer = (
            None
            if args.no_database
            else asyncio.create_task(
                policies.write_todos(env["HUB_DATABASE_URL"], rate=20.0, seconds=args.duration)
            )
        )
        process = await asyncio.create_subprocess_exec(
            *locust,
            cwd=ROOT,
            env={**env, "PYTHONPATH": str(ROOT)},
            stdout=(workdir / "locust.out").open("wb"),
            stderr=subprocess.STDOUT,
        )
        try:
            locust_rc = await asyncio.wait_for(process.wait(), args.duration + 60)
        except TimeoutError:
            # Reported as a failed check; locust still writes its CSVs on SIGTERM.
            print("soak: locust did not stop in time; terminating it", flush=True)
            process.terminate()
            try:
                await asyncio.wait_for(process.wait(), 30)
            except TimeoutError:
                process.kill()
                await process.wait()
            locust_rc = None
        await asyncio.sleep(args.sample)  # one sample after the load ends
        sampler.cancel()
        if writer is not None:
            writer.cancel()
            await asyncio.gather(writer, return_exceptions=True)
    finally:
        hub.send_signal(signal.SIGTERM)
        try:
            hub.wait(20)
        except subprocess.TimeoutExpired:
            hub.kill()
        hub_log.close()
        if not args.no_database:
            conn = await asyncpg.connect(ADMIN_DSN, timeout=10)
            try:
                await conn.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
            finally:
                await conn.close()

    stats = read_csv(workdir / "soak_stats.csv")
    failures = read_csv(workdir / "soak_failures.csv")
    history = read_csv(workdir / "soak_stats_history.csv")
    total = next((r for r in stats if r.get("Name") == "Aggregated"), {})
    failed = int(float(total.get("Failure Count", "1") or 1))
    received = sum(
        int(float(r["Request Count"])) for r in stats if r.get("Name") == "broadcast latency"
    )
    warm = [s for s in samples if s.elapsed >= 60]
    base = warm[0].rss if warm else (samples[0].rss if samples else 0)
    load_samples = [s for s in samples if s.elapsed <= args.duration]
    last_minute = [s for s in load_samples if s.elapsed >= args.duration - 60] or load_samples
    end = max((s.rss for s in last_minute), default=0)
    growth = end - base
    tracebacks = "Traceback" in (workdir / "hub.log").read_text(errors="replace")
    checks = {
        "no failed request or message": (failed == 0, f"{failed} failures"),
        "messages flowed": (received > 0, f"{received:,} broadcasts received by members"),
        "memory stable": (
            growth <= args.rss_growth_mb << 20,
            f"RSS {base / 2**20:.1f} MiB after the first minute, at most "
            f"{end / 2**20:.1f} MiB in the last minute (growth {growth / 2**20:+.1f} MiB, "
            f"bound {args.rss_growth_mb} MiB)",
        ),
        "locust exited cleanly": (locust_rc == 0, f"exit code {locust_rc}"),
        "no traceback in the hub log": (not tracebacks, "clean" if not tracebacks else "see log"),
    }
    ok = all(value for value, _ in checks.values())
    command = repeatable_command("python -m loadtest.soak", args.argv, ("--report", "--workdir"))
    write_report(
        args.report,
        args,
        command,
        started_at,
        stats,
        failures,
        history,
        samples,
        {"ok": ok, "checks": checks},
    )
    print(json.dumps({name: ok for name, (ok, _) in checks.items()}, indent=1))
    print(f"report written to {args.report}; locust files in {workdir}")
    if args.workdir is None and ok and not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.soak", description=__doc__)
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of load")
    parser.add_argument("--users", type=int, default=100)
    parser.add_argument("--spawn-rate", type=float, default=10.0)
    parser.add_argument("--orgs", type=int, default=6)
    parser.add_argument("--publish-rate", type=float, default=2.0)
    parser.add_argument("--rest-rate", type=float, default=2.0)
    parser.add_argument("--sample", type=float, default=5.0, help="seconds between samples")
    parser.add_argument("--rss-growth-mb", type=int, default=32)
    parser.add_argument("--no-database", action="store_true", help="in-memory event store")
    parser.add_argument("--report", type=Path, default=ROOT / "docs" / "reliability.md")
    parser.add_argument("--workdir", type=Path, help="keep locust's CSV/HTML here")
    parser.add_argument("--keep", action="store_true", help="keep the work files")
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
