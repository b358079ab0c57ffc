"""A real Redis Cluster for the tests: six ``redis-server`` processes (three
primaries, one replica each) started from the installed binaries in a temp
dir, joined with ``redis-cli --cluster create``, torn down after the test.

* :func:`redis_cluster` is the fixture (one fresh cluster per test: the
  failover tests kill nodes, so nothing is shared).
* :class:`RedisCluster` knows which node owns a channel's slot, can SIGKILL
  it, and waits for its replica to be promoted.

``redis-server`` and ``redis-cli`` are required: a machine without them
fails these tests (they never skip).  Once formed, ``cluster-node-timeout`` is short
(1 s) so an automatic failover takes seconds, not the default 15 s or more.

Ports are taken below the kernel's ephemeral range (where no outgoing
connection can take one between the pick and the server's bind) and are
distinct within a cluster; a start whose nodes are not all our own
processes (a port taken after all) is retried on new ports.  Every wait is
bounded, and a cluster that does not form says what each node reported.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final, TypeVar

import pytest
import redis
import redis.cluster
from redis.cluster import key_slot

T = TypeVar("T")

#: ``cluster-node-timeout`` (ms): a primary silent this long is failing.
NODE_TIMEOUT_MS: Final = 1000
#: ``cluster-node-timeout`` (ms) while the cluster forms: a machine busy
#: with other tests must not fail a primary over before it is in use.
FORMING_TIMEOUT_MS: Final = 5000
#: Bound of the start-up waits (cluster formed, replicas in sync).
START_WITHIN: Final = 30.0
#: Starts tried when a node's port turns out to be taken.
START_ATTEMPTS: Final = 3


@dataclass
class RedisNode:
    port: int
    bus_port: int
    process: subprocess.Popen[bytes]
    workdir: Path

    @property
    def name(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=2, socket_connect_timeout=2)

    def info(self, section: str) -> dict[str, str]:
        with self.client() as client:
            info = client.info(section)
        return {key: str(value) for key, value in info.items()}

    def cluster_state(self) -> str:
        with self.client() as client:
            raw = client.execute_command("CLUSTER", "INFO")
        text = raw.decode() if isinstance(raw, bytes) else str(raw)
        for line in text.splitlines():
            if line.startswith("cluster_state:"):
                return line.partition(":")[2].strip()
        return "unknown"

    def log(self) -> str:
        path = self.workdir / "redis.log"
        return path.read_text(errors="replace") if path.exists() else ""


def _binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise RuntimeError(
            f"{name} is required for the Redis Cluster tests (apt-get install redis-server)"
        )
    return path


class RedisCluster:
    """Six ``redis-server`` processes in cluster mode, 3 primaries + 3 replicas."""

    def __init__(self, workdir: Path, size: int = 6) -> None:
        self.workdir = workdir
        self.size = size
        self.nodes: list[RedisNode] = []

    @property
    def url(self) -> str:
        """The URL a hub is given: one node; the client discovers the rest."""
        return f"redis://{self.nodes[0].name}/0"

    # -- life cycle ------------------------------------------------------

    def start(self) -> None:
        server, cli = _binary("redis-server"), _binary("redis-cli")
        for attempt in range(1, START_ATTEMPTS + 1):
            self._spawn(server, attempt)
            strays = self._strays()
            if not strays:
                break
            self.stop()
            if attempt == START_ATTEMPTS:
                raise RuntimeError(f"redis-server nodes did not start: {strays}")
            self.nodes = []
        names = [n.name for n in self.nodes]
        created = subprocess.run(
            [cli, "--cluster", "create", *names, "--cluster-replicas", "1", "--cluster-yes"],
            capture_output=True,
            timeout=START_WITHIN,
        )
        if created.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed:\n{created.stdout.decode()}")
        try:
            self._wait(self._formed, START_WITHIN, "cluster_state:ok with 3 synced replicas")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.diagnosis()}") from None
        for node in self.nodes:
            with node.client() as client:
                client.config_set("cluster-node-timeout", NODE_TIMEOUT_MS)

    def _spawn(self, server: str, attempt: int) -> None:
        ports = _ports(2 * self.size)
        for index in range(self.size):
            # The cluster bus port is given explicitly: the default (port +
            # 10000) can be taken, or beyond 65535 for an ephemeral port.
            port, bus_port = ports[2 * index], ports[2 * index + 1]
            workdir = self.workdir / f"try-{attempt}" / f"node-{index}"
            workdir.mkdir(parents=True)
            args = [
                server,
                "--bind", "127.0.0.1",
                "--port", str(port),
                "--cluster-enabled", "yes",
                "--cluster-port", str(bus_port),
                "--cluster-config-file", "nodes.conf",
                "--cluster-node-timeout", str(FORMING_TIMEOUT_MS),
                # A replica may always take over, however long it was cut off.
                "--cluster-replica-validity-factor", "0",
                # Replicas sync at once (the default waits 5 s for others).
                "--repl-diskless-sync-delay", "0",
                "--dir", str(workdir),
                "--logfile", "redis.log",
                "--save", "",
                "--appendonly", "no",
            ]  # fmt: skip
            process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            self.nodes.append(RedisNode(port, bus_port, process, workdir))

    def _strays(self) -> list[str]:
        """Nodes that are not answering as our own process (empty: all are)."""
        strays = []
        for node in self.nodes:
            try:
                self._wait(lambda node=node: _ours(node), 10, f"{node.name} to answer PING")
            except AssertionError:
                strays.append(f"{node.name} (exit {node.process.poll()}): {node.log()[-500:]}")
        return strays

    def diagnosis(self) -> str:
        """What each node says of itself, and the end of its log."""
        lines = []
        for node in self.nodes:
            try:
                replication = node.info("replication")
                state = (
                    f"state={node.cluster_state()} role={replication.get('role')} "
                    f"link={replication.get('master_link_status', '-')}"
                )
            except redis.RedisError as exc:
                state = f"unreachable ({exc})"
            tail = "\n    ".join(node.log().splitlines()[-8:])
            lines.append(f"{node.name} alive={node.alive} {state}\n    {tail}")
        return "\n".join(lines)

    def stop(self) -> None:
        for node in self.nodes:
            if node.alive:
                node.process.kill()
        for node in self.nodes:
            node.process.wait(10)
            if node.process.stderr is not None:
                node.process.stderr.close()

    def _formed(self) -> bool:
        if not all(_answers(n) and n.cluster_state() == "ok" for n in self):
            return False
        replicas = [n for n in self if n.info("replication").get("role") == "slave"]
        synced = [n for n in replicas if n.info("replication").get("master_link_status") == "up"]
        return len(replicas) == self.size // 2 and len(synced) == len(replicas)

    def __iter__(self) -> Iterator[RedisNode]:
        return iter(self.nodes)

    def client(self) -> redis.cluster.RedisCluster:
        """redis-py's cluster client, through any live node."""
        node = next(n for n in self.nodes if n.alive)
        return redis.cluster.RedisCluster(host="127.0.0.1", port=node.port, socket_timeout=2)

    # -- topology --------------------------------------------------------

    def node(self, port: int) -> RedisNode:
        return next(n for n in self.nodes if n.port == port)

    def owner(self, channel: str) -> RedisNode:
        """The primary serving ``channel``'s slot, as a live node sees it."""
        slot = key_slot(channel.encode())
        for node in self.nodes:
            if not node.alive:
                continue
            with node.client() as client:
                ranges = client.execute_command("CLUSTER", "SLOTS")
            for first, last, primary, *_ in ranges:
                if first <= slot <= last:
                    return self.node(int(primary[1]))
        raise AssertionError(f"no live node knows the owner of slot {slot}")

    def primaries(self) -> list[RedisNode]:
        return [n for n in self if n.alive and n.info("replication").get("role") == "master"]

    def move_slot(self, channel: str, to: RedisNode) -> None:
        """Move ``channel``'s slot (holding no keys) to the primary ``to``,
        as ``redis-cli --cluster reshard`` does for one slot."""
        source = self.owner(channel)
        slot = key_slot(channel.encode())

        def node_id(node: RedisNode) -> str:
            with node.client() as client:
                return str(client.execute_command("CLUSTER", "MYID").decode())

        with to.client() as client:
            client.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", node_id(source))
        with source.client() as client:
            client.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", node_id(to))
        for primary in [to, source, *(n for n in self.primaries() if n not in (to, source))]:
            with primary.client() as client:
                client.execute_command("CLUSTER", "SETSLOT", slot, "NODE", node_id(to))
        self._wait(lambda: self.owner(channel) is to, 10, f"{to.name} to own slot {slot}")

    def kill(self, node: RedisNode) -> None:
        """SIGKILL: no goodbye to clients or to the cluster."""
        os.kill(node.process.pid, signal.SIGKILL)
        node.process.wait(5)

    def wait_promoted(self, dead: RedisNode, channel: str, within: float) -> RedisNode:
        """Wait until a live node owns ``channel``'s slot and the cluster is
        ok again (the replica of ``dead`` was elected); return the new owner."""

        def promoted() -> RedisNode | None:
            owner = self.owner(channel)
            if owner is dead or not owner.alive:
                return None
            live = [n for n in self if n.alive]
            if any(n.cluster_state() != "ok" for n in live):
                return None
            return owner

        return self._wait(promoted, within, f"a replica of {dead.name} to be promoted")

    @staticmethod
    def _wait(check: Callable[[], T | None], within: float, what: str) -> T:
        deadline = time.monotonic() + within
        while True:
            try:
                result = check()
            except redis.RedisError:
                result = None
            if result:
                return result
            if time.monotonic() > deadline:
                raise AssertionError(f"waited {within} s for {what}")
            time.sleep(0.05)


def _ours(node: RedisNode) -> bool:
    """``node`` answers, and it is the process we started on its port."""
    if not node.alive:
        raise AssertionError(f"{node.name} exited")
    try:
        return node.info("server").get("process_id") == str(node.process.pid)
    except redis.RedisError:
        return False


def _answers(node: RedisNode) -> bool:
    try:
        with node.client() as client:
            return bool(client.ping())
    except redis.RedisError:
        return False


def _ports(count: int) -> list[int]:
    """``count`` distinct free ports below the ephemeral range.

    A port picked by binding port 0 lies in the ephemeral range, where an
    outgoing connection (a test's client, ``redis-cli``) may take it as its
    local port before ``redis-server`` binds it.
    """
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    # A machine whose ephemeral range starts low has no such room: any port.
    first, last = (20000, low) if low > 21000 else (1024, 65536)
    picked: list[int] = []
    while len(picked) < count:
        port = random.randrange(first, last)
        if port in picked:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        picked.append(port)
    return picked


@pytest.fixture
def redis_cluster(tmp_path: Path) -> Iterator[RedisCluster]:
    cluster = RedisCluster(tmp_path / "redis-cluster")
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
