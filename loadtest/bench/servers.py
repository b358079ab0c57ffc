"""The servers under test and how each one is started, joined and fed.

=============  ================================================================
``hub``        ``hub serve`` (the CLI, as users run it); published to through
               REST ``POST /realtime/v1/api/broadcast``, 100 messages a request
``hub-inproc`` the same app and uvicorn configuration, published to in-process
               with ``hub.channels.publish`` (peers/hub_inproc.py)
``limit``      the raw limit probe (peers/limit_server.py)
``bun``        Bun's built-in pub/sub, uWebSockets (peers/bun_server.js), run
               by the ``bun`` binary of its npm package (build.bun)
``floor``      the native floor: C, epoll, frames built once, one writev per
               connection per loop turn (native/floor.c, built by build.native)
``socketio``   python-socketio, ASGI, rooms (peers/socketio_server.py)
``channels``   Django Channels + channels-redis pub/sub layer (peers/channels_server.py)
``broadcaster`` encode/broadcaster behind Starlette (peers/broadcaster_server.py);
               memory backend on one node, Redis backend on two
=============  ================================================================

Every server is one process per node, pinned to the server core; the
hub's per-connection and per-org limits are raised so that they do not
refuse the benchmark's own load (they are not what is measured).
"""

from __future__ import annotations

import secrets
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loadtest.bench import build, envs, procs
from loadtest.bench.loadgen import ControlPublisher, PgPublisher, Publisher, RestPublisher

ROOT = Path(__file__).resolve().parents[2]
PEERS = Path(__file__).resolve().parent / "peers"
LOGS = envs.CACHE / "logs"
REDIS_URL = "redis://127.0.0.1:6379/0"

ALL = ["hub", "hub-inproc", "limit", "bun", "floor", "socketio", "channels", "broadcaster"]
#: Servers that can run on two nodes (they need a shared broker).
MULTINODE = {"hub", "hub-inproc", "socketio", "channels", "broadcaster"}
VENV = {
    "limit": "limit",
    "socketio": "socketio",
    "channels": "channels",
    "broadcaster": "broadcaster",
}


def hub_env(secret: str, port: int, extra: dict[str, str]) -> dict[str, str]:
    import os

    env = dict(os.environ)
    env.update(
        {
            "HUB_JWT_SECRET": secret,
            "HUB_HOST": "127.0.0.1",
            "HUB_PORT": str(port),
            "HUB_LOG_LEVEL": "warning",
            # Benchmark load comes from one place; these guard real tenants.
            "HUB_ORG_MAX_CONNECTIONS": "1000000",
            "HUB_ORG_JOINS_PER_SECOND": "1000000",
            "HUB_ORG_MESSAGES_PER_SECOND": "1000000",
            "HUB_IDLE_TIMEOUT": "600",
        }
    )
    env.update(extra)
    return env


@dataclass
class Deployment:
    """Running server process(es) of one kind, and how to use them."""

    name: str
    nodes: list[procs.Server]
    urls: list[str]
    proto: str
    publisher: Publisher
    uses_redis: bool = False
    secret: str | None = None
    control: ControlPublisher | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def room(self, i: int) -> str:
        return f"realtime:org:o{i}" if self.proto == "phx" else f"o{i}"

    def token(self, org: str) -> str | None:
        if self.secret is None:
            return None
        from hub.auth.tokens import issue_token

        return issue_token(self.secret, sub=f"bench-{secrets.token_hex(4)}", orgs=[org], ttl=7200)

    def connections(self, count: int, nrooms: int, node_split: bool = True) -> list[dict]:
        """``count`` connections, room ``i % nrooms``, spread over the nodes."""
        out = []
        for i in range(count):
            r = i % nrooms
            url = self.urls[i % len(self.urls)] if node_split else self.urls[0]
            out.append(
                {
                    "url": url,
                    "proto": self.proto,
                    "room": self.room(r),
                    "token": self.token(f"o{r}"),
                }
            )
        return out

    def cpu(self) -> list[float]:
        return [n.cpu() for n in self.nodes]

    def cpu_split(self) -> list[tuple[float, float]]:
        """(user, kernel) CPU seconds of each node, one read each."""
        return [n.cpu_split() for n in self.nodes]

    def rss_kb(self) -> list[int]:
        return [n.rss_kb() for n in self.nodes]

    async def stop(self) -> None:
        await self.publisher.close()
        if self.control is not None and self.control is not self.publisher:
            await self.control.close()
        for n in self.nodes:
            n.stop()


async def deploy(
    name: str,
    *,
    nodes: int = 1,
    database_url: str | None = None,
    durable: bool = False,
    hub_extra: dict[str, str] | None = None,
) -> Deployment:
    """Start ``name`` on ``nodes`` processes.  ``durable``: publish by
    inserting into PostgreSQL (hub kinds only; needs ``database_url``);
    ``hub_extra``: more environment for the hub kinds."""
    tag = secrets.token_hex(3)
    prefix = f"bench-{tag}"
    redis = REDIS_URL if nodes > 1 else None
    ports = [procs.free_port() for _ in range(nodes)]
    ctl_ports = [procs.free_port() for _ in range(nodes)]
    servers: list[procs.Server] = []
    try:
        if name in ("hub", "hub-inproc"):
            secret = secrets.token_urlsafe(32)
            for i, port in enumerate(ports):
                extra = {"HUB_NODE_ID": f"bench{i}"}
                if redis:
                    extra.update({"HUB_REDIS_URL": redis, "HUB_REDIS_PREFIX": prefix})
                if database_url:
                    extra["HUB_DATABASE_URL"] = database_url
                extra.update(hub_extra or {})
                env = hub_env(secret, port, extra)
                if name == "hub":
                    cmd = [sys.executable, "-m", "hub", "serve"]
                else:
                    cmd = [sys.executable, str(PEERS / "hub_inproc.py"), str(ctl_ports[i])]
                servers.append(
                    procs.Server(f"{name}{i}", cmd, env, LOGS / f"{name}-{tag}-{i}.log", cwd=ROOT)
                )
            for s, port in zip(servers, ports, strict=True):
                await s.wait_port(port)
            urls = [
                f"ws://127.0.0.1:{p}/realtime/v1/websocket?apikey={{token}}&vsn=2.0.0"
                for p in ports
            ]
            from hub.auth.tokens import issue_token

            control = None
            pub: Publisher
            if name == "hub-inproc":
                control = ControlPublisher(ctl_ports[0])
                await _connect_control(control, servers[0])
            if durable:
                assert database_url is not None
                pub = PgPublisher(database_url)
                await pub.connect()
            elif name == "hub":
                pub = RestPublisher(
                    ports[0],
                    issue_token(secret, sub="bench-publisher", role="service_role", ttl=7200),
                )
                await pub.connect()
            else:
                assert control is not None
                pub = control
            return Deployment(
                name,
                servers,
                urls,
                "phx",
                pub,
                uses_redis=bool(redis),
                secret=secret,
                control=control,
            )

        if name in ("limit", "bun", "floor") and nodes > 1:
            raise ValueError(f"{name} has no broker: single node only")
        if name == "bun":
            head = [str(build.bun()), str(PEERS / "bun_server.js")]
        elif name == "floor":
            head = [str(build.native("floor"))]
        else:
            head = [str(envs.ensure(VENV[name])), str(PEERS / f"{name}_server.py")]
        for i, (port, ctl) in enumerate(zip(ports, ctl_ports, strict=True)):
            cmd = [*head, str(port), str(ctl)]
            if name == "socketio" and redis:
                cmd += ["--redis", redis, "--prefix", prefix]
            elif name == "channels":
                cmd += ["--redis", REDIS_URL, "--prefix", prefix]
            elif name == "broadcaster":
                cmd += ["--backend", redis or "memory://", "--prefix", prefix]
            import os

            servers.append(
                procs.Server(
                    f"{name}{i}", cmd, dict(os.environ), LOGS / f"{name}-{tag}-{i}.log", cwd=PEERS
                )
            )
        for s, port in zip(servers, ports, strict=True):
            await s.wait_port(port)
        control = ControlPublisher(ctl_ports[0])
        await _connect_control(control, servers[0])
        if name == "socketio":
            urls = [f"ws://127.0.0.1:{p}/socket.io/?EIO=4&transport=websocket" for p in ports]
            proto = "sio"
        else:
            urls = [f"ws://127.0.0.1:{p}/ws/{{room}}" for p in ports]
            proto = "plain"
        return Deployment(
            name,
            servers,
            urls,
            proto,
            control,
            uses_redis=name == "channels" or bool(redis),
            control=control,
        )
    except BaseException:
        for s in servers:
            s.stop()
        raise


async def _connect_control(control: ControlPublisher, server: procs.Server) -> None:
    import asyncio

    for _ in range(300):
        try:
            await control.connect()
            return
        except OSError:
            if not server.alive():
                break
            await asyncio.sleep(0.1)
    raise RuntimeError(f"{server.name}: control socket did not open:\n{server.tail()}")
