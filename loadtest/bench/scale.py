"""The scale model: what more cores and more nodes would carry, computed
from one benchmark run's measured figures (issue 15).

    python -m loadtest.bench.scale RESULTS.json [--cores 16] [--nodes 10] [--redis-shards 3]

RESULTS.json is what ``python -m loadtest.bench`` wrote (``--json``, or
``.cache/bench/results/``) with at least ``fanout``, ``capacity`` and
``multinode`` of ``hub``.  The model, and what it assumes:

* **One process is one core.**  The hub's event loop runs on one core; a
  machine runs one process per core (``hub serve`` per core behind nginx,
  or several nodes on a port), all joined through Redis.  A process's
  deliveries per CPU-second are the single-process figures of ``fanout``,
  regime by regime; ``multinode`` says how close two processes with Redis
  come to them (the *per process* ratio below).
* **Connections per process** are bounded by the open-file limit (one
  descriptor per socket, a reserve for the rest), not by memory: RSS per
  joined idle connection from ``capacity``.
* **Redis** pays per message and per process that has a subscriber of its
  topic (pub/sub sends one copy per subscribed connection): its CPU per
  message per node from ``multinode``.  One Redis core carries
  ``1 / that`` message-deliveries to processes per second; sharded pub/sub
  on a Redis Cluster (``HUB_REDIS_CLUSTER``) spreads topics over shards,
  one core each.
* Not modelled: PostgreSQL (durable events: every node LISTENs itself, see
  ``many_orgs`` and ``tenancy``), the network between machines, nginx.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import orjson

#: Descriptors a process keeps for everything but client sockets
#: (listeners, Redis, PostgreSQL pools, logs), as ``capacity`` leaves them.
FD_RESERVE = 1_000


def _hub(results: dict[str, Any], scenario: str) -> dict[str, Any]:
    run = results["scenarios"].get(scenario, {}).get("hub")
    if not run or "error" in run:
        raise SystemExit(f"the run has no {scenario} figures of hub")
    return dict(run)


def _regime(run: dict[str, Any], key: str) -> float:
    phase = run.get("regime_medians", {}).get(key) or run[key]
    return float(phase["deliveries_per_server_cpu_s"])


def model(
    results: dict[str, Any], cores: int, nodes: int, shards: int, open_files: int
) -> dict[str, Any]:
    fan, cap, multi = _hub(results, "fanout"), _hub(results, "capacity"), _hub(results, "multinode")
    per_core = {
        "burst": _regime(fan, "burst"),
        "paced": _regime(fan, "paced"),
        "one per 10 ms": _regime(fan, "fixed_rate"),
    }
    sat, fixed = multi["saturated"], multi["fixed_rate"]
    redis_us = sat["redis_cpu_s"] / sat["messages"] / multi["nodes"] * 1e6
    redis_us_alone = fixed["redis_cpu_s"] / fixed["messages"] / multi["nodes"] * 1e6
    alone = fan["saturated"]["deliveries_per_server_cpu_s"]
    multi_ratio = sat["deliveries_per_server_cpu_s"] / alone
    conns = open_files - FD_RESERVE
    processes = max(1, cores - 1)  # one core left to Redis
    return {
        "per_core": per_core,
        "multinode_ratio": multi_ratio,
        "redis_us_per_message_node": redis_us,
        "redis_us_per_message_node_alone": redis_us_alone,
        "kb_per_conn": cap["kb_per_conn"],
        "connects_per_cpu_s": cap["connects_joins_per_server_cpu_s"],
        "conns_per_process": conns,
        "cores": cores,
        "nodes": nodes,
        "shards": shards,
        "processes_per_machine": processes,
    }


def render(m: dict[str, Any], source: str) -> str:
    p, n = m["processes_per_machine"], m["nodes"]
    conns = m["conns_per_process"]
    kb = m["kb_per_conn"]
    redis = m["redis_us_per_message_node"]
    lines = [
        f"From {source}: hub, medians of its runs.",
        "",
        "| measured | value |",
        "|---|---|",
        *[f"| deliveries per core-second, {k} | {v:,.0f} |" for k, v in m["per_core"].items()],
        f"| two processes + Redis, per process, against one alone (saturated) | "
        f"{m['multinode_ratio']:.2f}x |",
        f"| Redis CPU per message per process it reaches, busy (saturated phase) | "
        f"{redis:.1f} us |",
        f"| the same at one message per 10 ms (each message alone, Redis' idle work "
        f"included) | {m['redis_us_per_message_node_alone']:.1f} us |",
        f"| RSS per joined idle connection | {kb:.2f} KB |",
        f"| connects+joins per core-second (JWT checked) | {m['connects_per_cpu_s']:,.0f} |",
        f"| connections per process (open-file limit - {FD_RESERVE:,}) | {conns:,} |",
        "",
        f"| carried by | one process (core) | {m['cores']} cores ({p} processes + Redis) | "
        f"{n} such nodes ({n * p} processes) |",
        "|---|---|---|---|",
        f"| joined connections | {conns:,} | {p * conns:,} | {n * p * conns:,} |",
        f"| their RSS | {conns * kb / 1024:,.0f} MB | {p * conns * kb / 1024**2:,.1f} GB | "
        f"{n * p * conns * kb / 1024**2:,.0f} GB |",
        f"| connects+joins per second (all cores busy) | {m['connects_per_cpu_s']:,.0f} | "
        f"{p * m['connects_per_cpu_s']:,.0f} | {n * p * m['connects_per_cpu_s']:,.0f} |",
    ]
    for k, v in m["per_core"].items():
        lines.append(
            f"| deliveries per second, {k} | {v:,.0f} | {p * v * m['multinode_ratio']:,.0f} | "
            f"{n * p * v * m['multinode_ratio']:,.0f} |"
        )
    # Redis: a message reaches every process with a subscriber of its topic.
    one_core = 1e6 / redis
    lines += [
        "",
        "Redis' share: each message costs it about "
        f"{redis:.1f} us per process it reaches, so one Redis core carries about "
        f"{one_core:,.0f} message-process pairs per second:",
        "",
        "| a topic's subscribers are on | messages/s through one Redis core | "
        f"with {m['shards']} shards (Redis Cluster, sharded pub/sub) |",
        "|---|---|---|",
    ]
    for reach, label in (
        (1, "one process (an org's members behind one node: nginx by org)"),
        (p, f"every process of one machine ({p})"),
        (n * p, f"every process of {n} nodes ({n * p})"),
    ):
        lines.append(
            f"| {label} | {one_core / reach:,.0f} | {m['shards'] * one_core / reach:,.0f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m loadtest.bench.scale", description=__doc__)
    ap.add_argument("results", type=Path)
    ap.add_argument("--cores", type=int, default=16)
    ap.add_argument("--nodes", type=int, default=10)
    ap.add_argument("--redis-shards", type=int, default=3)
    ap.add_argument(
        "--open-files", type=int, default=20_000, help="per-process limit [20000, as here]"
    )
    args = ap.parse_args()
    results = orjson.loads(args.results.read_bytes())
    m = model(results, args.cores, args.nodes, args.redis_shards, args.open_files)
    print(render(m, f"the run of {results['machine']['date']}"))


if __name__ == "__main__":
    main()
