"""The hub's CPU per REST broadcast request, alone.

    python -m loadtest.bench.rest_cost [--requests N] [--gap-ms MS]

Starts ``hub serve`` as the benchmark does (pinned to the server core) and
sends it ``N`` requests of one message each through the harness's REST
publisher, ``MS`` apart, to a topic nobody joined, so nothing is fanned
out: what is left is the request (its read, parse, token check, publish,
the 202's write) and the wakeups between requests, as at one message per
10 ms.  Prints the hub's CPU per request, and its idle CPU for scale.
"""

from __future__ import annotations

import argparse
import asyncio
import time

from loadtest.bench import procs
from loadtest.bench.servers import deploy


async def measure(requests: int, gap: float) -> dict[str, float]:
    procs.pin_self()
    dep = await deploy("hub")
    try:
        publisher = dep.publisher
        for i in range(500):  # warm-up: connections, caches
            await publisher.publish(1, i, 1)
            await asyncio.sleep(gap)
        await asyncio.sleep(0.5)
        idle0 = sum(dep.cpu())
        await asyncio.sleep(5.0)
        idle = (sum(dep.cpu()) - idle0) / 5.0
        cpu0, t0 = sum(dep.cpu()), time.perf_counter()
        for i in range(requests):
            await publisher.publish(1, i, 1)
            await asyncio.sleep(gap)
        await asyncio.sleep(0.5)
        cpu = sum(dep.cpu()) - cpu0
        wall = time.perf_counter() - t0
        return {
            "requests": requests,
            "wall_s": round(wall, 2),
            "hub_cpu_s": round(cpu, 3),
            "us_per_request": round(1e6 * cpu / requests, 1),
            "idle_cpu_pct": round(100 * idle, 2),
        }
    finally:
        await dep.stop()


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m loadtest.bench.rest_cost", description=__doc__)
    ap.add_argument("--requests", type=int, default=8000)
    ap.add_argument("--gap-ms", type=float, default=0.5)
    args = ap.parse_args()
    print(asyncio.run(measure(args.requests, args.gap_ms / 1000)))


if __name__ == "__main__":
    main()
