"""The Redis engine: broadcasts and presence between hub nodes.

Redis adds no durability here: durable org events reach every node from
PostgreSQL (each node listens itself) and never pass through this engine,
so they cannot arrive twice.  What travels through Redis pub/sub:

* ``B``: a broadcast (header JSON, newline, payload bytes as published);
* ``P``: a presence diff made on the sending node;
* ``S`` / ``T``: "send me your presence on this topic" and the answer, a
  snapshot of one node's entries (a joining node, or one that reconnected,
  re-syncs this way);
* ``H`` / ``G``: node heartbeats and goodbyes on ``<prefix>:nodes``.  A node
  silent for ``node_timeout`` seconds is declared gone and its presence
  entries leave on every other node.

A node subscribes only to topics it has local subscribers for.  A publish
is delivered to local subscribers at once (in the caller's stack) and queued
for one publisher task that pipelines everything queued since its last turn
over a single connection, so one node's messages reach every other node in
the order they were published.  Messages from this node coming back from
Redis are dropped.

The subscription connection is dedicated and watched: a failed read, a
``CLIENT KILL``, a Redis restart or an unanswered PING (``health_timeout``)
makes the node log it, count it (``reconnects``), report not ready
(``/readyz``), and reconnect with backoff, resubscribe every topic and
re-sync presence.  Broadcasts published while the link is down reach local
subscribers only; that is the price of an engine without durability.

With ``sharded=True`` topics use ``SSUBSCRIBE`` / ``SPUBLISH`` (Redis 7+):
on a Redis Cluster that spreads pub/sub traffic over the shards instead of
copying every message to every node of the cluster.

With ``cluster=True`` (implies ``sharded``) the URL names one node of a Redis
Cluster; redis-py's ``RedisCluster`` discovers the others and keeps the slot
map, and publishes go to the primary owning each channel's slot.  A sharded
channel must be read on the primary serving its slot, so the subscription is
one connection per primary (:class:`_Links`), each read by its own task and
watched by its own PING; the heartbeats channel is sharded too.  When one
of them fails (its primary killed, a slot moved away) only that shard's
channels are lost: the failure is logged and counted (``reconnects``), the
node reports not ready, and every 0.25 s it re-reads the slot map and
subscribes them on their current owner once that answers, which after a
failover is the promoted replica; then it re-syncs presence on those
topics.  The other shards keep delivering meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable
from typing import Any, Final

import orjson
import redis.asyncio as aioredis
from redis.asyncio.client import PubSub
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import parse_url
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisClusterException, RedisError, ResponseError

from hub.channels.presence import PresenceDiff
from hub.engine.base import Engine, NodeGone, PresenceSnapshot
from hub.errors import ConfigError
from hub.protocol import Broadcast
from hub.quotas import Quotas

log = logging.getLogger(__name__)


async def _close_pubsub(pubsub: PubSub) -> None:
    """``PubSub.aclose()``, untyped before redis-py 8.2 and typed since:
    called through a typed name, so neither needs a type: ignore."""
    close: Callable[[], Awaitable[None]] = pubsub.aclose
    await close()


#: Messages waiting for the publisher; beyond this the oldest are dropped
#: (and counted) rather than letting a dead Redis eat the node's memory.
MAX_OUTGOING: Final = 100_000
PIPELINE_BATCH: Final = 512
#: Longest wait between two attempts of the whole subscription.  On a
#: cluster a failed shard is repaired inside the attempt (every REPAIR_POLL);
#: the attempt itself only starts over when no node could be reached, and
#: then retries at least every second, as the cluster is likely mid-failover.
MAX_BACKOFF: Final = 5.0
MAX_BACKOFF_CLUSTER: Final = 1.0
#: How often a cluster node with orphaned channels re-reads the slot map.
REPAIR_POLL: Final = 0.25


class RedisEngine(Engine):
    def __init__(
        self,
        url: str,
        *,
        node_id: str,
        prefix: str = "hub",
        sharded: bool = False,
        cluster: bool = False,
        heartbeat: float = 1.0,
        node_timeout: float = 10.0,
        health_timeout: float = 5.0,
        quotas: Quotas | None = None,
    ) -> None:
        super().__init__(quotas=quotas)
        self.url = url
        self.node_id = node_id
        self.prefix = prefix
        # Only sharded channels spread over a cluster's shards; classic
        # pub/sub would copy every message to every node of it.
        self.sharded = sharded or cluster
        self.cluster = cluster
        self.heartbeat = heartbeat
        self.node_timeout = node_timeout
        self.health_timeout = health_timeout
        self._nodes_channel = f"{prefix}:nodes"
        self._topic_prefix = f"{prefix}:t:"
        self._wanted: set[str] = set()
        self._control: asyncio.Queue[tuple[bool, str]] = asyncio.Queue()
        self._outgoing: deque[tuple[str, bytes, bool]] = deque(maxlen=MAX_OUTGOING)
        self._wake = asyncio.Event()
        self._ready = False
        self._broken = False
        #: Set the first time the subscription is up.
        self._up = asyncio.Event()
        self._reconnects = 0
        self._tasks: list[asyncio.Task[None]] = []
        self._nodes: dict[str, float] = {}
        self._client: aioredis.Redis | RedisCluster | None = None
        self._links: _Links | None = None
        self.published = 0
        self.received = 0
        self.dropped = 0

    # -- interface ----------------------------------------------------------

    @property
    def ready(self) -> bool:
        links = self._links
        return self._ready and not self._broken and (links is None or not links.orphans)

    def _task_ended(self, task: asyncio.Task[None]) -> None:
        # These tasks only end when cancelled at shutdown; anything else is
        # a bug, and the node must report it rather than go quietly mute.
        if not task.cancelled():
            self._broken = True
            log.error("redis engine task %s ended", task.get_name(), exc_info=task.exception())

    @property
    def reconnects(self) -> int:
        return self._reconnects

    def publish(self, envelope: Broadcast | PresenceDiff) -> None:
        assert self._listener is not None, "engine used before bind()"
        self._listener.deliver(envelope)
        if isinstance(envelope, Broadcast):
            header = {
                "n": self.node_id,
                "t": envelope.topic,
                "e": envelope.event,
                "j": envelope.is_json,
                "m": envelope.meta,
                "s": envelope.sent_at,
            }
            data = b"B" + orjson.dumps(header) + b"\n" + envelope.payload
        else:
            body = {"n": self.node_id, "t": envelope.topic}
            data = b"P" + orjson.dumps({**body, "j": envelope.joins, "l": envelope.leaves})
        self._send(self._channel(envelope.topic), data, self.sharded)

    def subscribe(self, topic: str) -> None:
        self._wanted.add(topic)
        self._control.put_nowait((True, topic))

    def unsubscribe(self, topic: str) -> None:
        self._wanted.discard(topic)
        self._control.put_nowait((False, topic))

    # -- lifecycle ----------------------------------------------------------

    async def start(self) -> None:
        self._client = await connect(self.url, cluster=self.cluster, within=self.health_timeout)
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._subscriber(), name="redis-subscriber"),
            loop.create_task(self._publisher(), name="redis-publisher"),
            loop.create_task(self._pulse(), name="redis-heartbeat"),
        ]
        for task in self._tasks:
            task.add_done_callback(self._task_ended)
        # Accepting connections before the subscription is up would make the
        # first joins deaf to other nodes; wait (bounded) for it.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._up.wait(), self.health_timeout)

    async def stop(self) -> None:
        if self._client is not None and self._ready:
            try:
                goodbye = b"G" + orjson.dumps({"n": self.node_id})
                if self.cluster:
                    sent = self._client.spublish(self._nodes_channel, goodbye)
                else:
                    sent = self._client.publish(self._nodes_channel, goodbye)
                await asyncio.wait_for(sent, 1.0)
            except (TimeoutError, RedisError, OSError):
                pass
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        if self._client is not None:
            await self._client.aclose()

    # -- outgoing -----------------------------------------------------------

    def _channel(self, topic: str) -> str:
        return self._topic_prefix + topic

    def _send(self, channel: str, data: bytes, sharded: bool) -> None:
        if len(self._outgoing) == MAX_OUTGOING:
            self.dropped += 1
        self._outgoing.append((channel, data, sharded))
        self._wake.set()

    async def _publisher(self) -> None:
        assert self._client is not None
        backoff = 0.1
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._outgoing:
                count = min(len(self._outgoing), PIPELINE_BATCH)
                batch = [self._outgoing.popleft() for _ in range(count)]
                try:
                    async with self._client.pipeline(transaction=False) as pipe:
                        for channel, data, sharded in batch:
                            if sharded:
                                pipe.spublish(channel, data)
                            else:
                                pipe.publish(channel, data)
                        await pipe.execute()
                    self.published += count
                    backoff = 0.1
                except Exception as exc:
                    # Any failure of the link (redis-py raises RuntimeError
                    # under uvloop for a closed transport): the loop must
                    # not die.  Redis adds no durability: these messages
                    # reached local subscribers only.  Count and carry on.
                    self.dropped += count
                    log.warning("redis publish failed (%d messages dropped): %s", count, exc)
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 5.0)

    # -- incoming -----------------------------------------------------------

    async def _subscriber(self) -> None:
        backoff = 0.1
        max_backoff = MAX_BACKOFF_CLUSTER if self.cluster else MAX_BACKOFF
        while True:
            links = self._links = _Links(self)
            control: asyncio.Task[None] | None = None
            try:
                if isinstance(self._client, RedisCluster):
                    # After a failover the primary that served a slot is
                    # gone: ask a live node who serves it now.
                    await self._client.nodes_manager.initialize()
                await links.subscribe([self._nodes_channel], self.cluster)
                await links.subscribe([self._channel(t) for t in self._wanted], self.sharded)
                # Drain stale control entries: _wanted is the truth now.
                while not self._control.empty():
                    self._control.get_nowait()
                control = asyncio.get_running_loop().create_task(self._apply_control(links))
                self._nodes = dict.fromkeys(self._nodes, time.monotonic())
                self._ready = True
                self._up.set()
                backoff = 0.1
                log.info(
                    "redis subscription up (%d topics, %d connections)",
                    len(self._wanted),
                    links.count,
                )
                self._announce()
                await links.read()
            except Exception as exc:
                # Whatever broke the link (RedisError, OSError, a PING
                # timeout, uvloop's RuntimeError on a closed transport):
                # reconnect; never leave the node deaf.
                if self._ready:
                    self._reconnects += 1
                log.warning(
                    "redis subscription lost, reconnecting: %s: %s", type(exc).__name__, exc
                )
            finally:
                self._ready = False
                if control is not None:
                    control.cancel()
                await links.aclose()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, max_backoff)

    async def _apply_control(self, links: _Links) -> None:
        while True:
            add, topic = await self._control.get()
            channel = self._channel(topic)
            try:
                if add:
                    await links.subscribe([channel], self.sharded)
                    self._send(
                        channel, b"S" + orjson.dumps({"n": self.node_id, "t": topic}), self.sharded
                    )
                else:
                    await links.unsubscribe(channel, self.sharded)
            except Exception as exc:
                # (On a cluster a shard's failure is handled inside _Links
                # and does not come here.)  The reader will notice the
                # broken link; make sure, and let the attempt start over.
                links.fail(exc)
                return

    def _on_message(self, data: bytes) -> None:
        listener = self._listener
        assert listener is not None
        self.received += 1
        kind = data[:1]
        try:
            if kind == b"B":
                raw_header, _, payload = data[1:].partition(b"\n")
                header = orjson.loads(raw_header)
                if header["n"] == self.node_id:
                    return
                broadcast = Broadcast(
                    header["t"],
                    header["e"],
                    payload,
                    is_json=header["j"],
                    meta=header["m"],
                    sent_at=header["s"],
                )
                listener.deliver(broadcast)
                return
            body = orjson.loads(data[1:])
            node = body["n"]
            if node == self.node_id:
                return
            if kind != b"G":
                # Any message proves the node alive.  A node heard for the
                # first time (new, or back after being declared gone) gets
                # our presence, and is asked for its own, so neither side
                # keeps a stale view; its entries then expire with it.
                unknown = node not in self._nodes
                self._nodes[node] = time.monotonic()
                if unknown:
                    self._announce()
            if kind == b"P":
                listener.deliver(PresenceDiff(body["t"], body["j"], body["l"], node=node))
            elif kind == b"S":
                self._send_snapshot(body["t"])
            elif kind == b"T":
                listener.deliver(PresenceSnapshot(body["t"], node, body["s"]))
            elif kind == b"H":
                if self.quotas is not None:
                    self.quotas.set_remote(node, body.get("q"))
            elif kind == b"G":
                self._gone(node)
        except (KeyError, TypeError, ValueError, orjson.JSONDecodeError):
            log.warning("dropped a malformed message from redis")

    def _send_snapshot(self, topic: str) -> None:
        assert self._listener is not None
        state = self._listener.local_presence(topic)
        if state:
            body = {"n": self.node_id, "t": topic, "s": state}
            self._send(self._channel(topic), b"T" + orjson.dumps(body), self.sharded)

    def _announce(self, only: set[str] | None = None) -> None:
        """After (re)connecting: publish our presence, ask for everyone's
        (on the topics in ``only``, if given)."""
        assert self._listener is not None
        for topic in self._listener.topics():
            if only is not None and topic not in only:
                continue
            self._send_snapshot(topic)
            request = b"S" + orjson.dumps({"n": self.node_id, "t": topic})
            self._send(self._channel(topic), request, self.sharded)

    def _resubscribed(self, channels: list[str]) -> None:
        """A cluster shard's channels are subscribed again, on its new owner."""
        log.info("redis shard channels resubscribed (%d)", len(channels))
        if self._nodes_channel in channels:
            # Heartbeats could not be heard meanwhile: nobody is late for it.
            self._nodes = dict.fromkeys(self._nodes, time.monotonic())
        start = len(self._topic_prefix)
        self._announce({c[start:] for c in channels if c.startswith(self._topic_prefix)})

    def _gone(self, node: str) -> None:
        self._nodes.pop(node, None)
        if self.quotas is not None:
            self.quotas.drop_node(node)
        assert self._listener is not None
        self._listener.deliver(NodeGone(node))

    async def _pulse(self) -> None:
        while True:
            if self._ready:
                usage = self.quotas.local_usage() if self.quotas is not None else {}
                beat = b"H" + orjson.dumps({"n": self.node_id, "q": usage})
                self._send(self._nodes_channel, beat, self.cluster)
                now = time.monotonic()
                for node, seen in list(self._nodes.items()):
                    if now - seen > self.node_timeout:
                        log.warning(
                            "node %s silent for %.0f s: dropping its presence", node, now - seen
                        )
                        self._gone(node)
            await asyncio.sleep(self.heartbeat)


async def connect(url: str, *, cluster: bool, within: float) -> aioredis.Redis | RedisCluster:
    """A client of the Redis (or, with ``cluster``, the Redis Cluster) at
    ``url``, checked to answer; ConfigError says what is wrong."""
    return await (_connect_cluster(url, within) if cluster else _connect_single(url, within))


async def _connect_single(url: str, within: float) -> aioredis.Redis:
    client = aioredis.from_url(url)
    try:
        await asyncio.wait_for(client.ping(), within)
    except (TimeoutError, RedisError, OSError) as exc:
        await client.aclose()
        raise ConfigError(f"HUB_REDIS_URL: cannot reach Redis at {url}: {exc}") from exc
    try:
        info = await asyncio.wait_for(client.info("cluster"), within)
    except ResponseError:
        info = {}  # INFO refused (an ACL): nothing to check
    except (TimeoutError, RedisError, OSError) as exc:
        await client.aclose()
        raise ConfigError(f"HUB_REDIS_URL: cannot reach Redis at {url}: {exc}") from exc
    if info.get("cluster_enabled"):
        # Bound to one node, the hub would lose its subscriptions at that
        # node's failover, and sharded channels of other slots would be
        # refused (MOVED): say so now rather than then.
        await client.aclose()
        raise ConfigError(f"HUB_REDIS_URL: {url} is a Redis Cluster node; set HUB_REDIS_CLUSTER=1")
    return client


async def _connect_cluster(url: str, within: float) -> RedisCluster:
    client = RedisCluster.from_url(url, socket_connect_timeout=within, socket_timeout=within)
    try:
        # Loads the slot map (CLUSTER SLOTS) from the node in the URL.
        await asyncio.wait_for(client.initialize(), within)
    except (TimeoutError, RedisError, RedisClusterException, OSError) as exc:
        await client.aclose()
        if "cluster mode is not enabled" in str(exc).lower():
            raise ConfigError(
                f"HUB_REDIS_CLUSTER: {url} is not a Redis Cluster node (cluster_enabled:0); "
                "unset HUB_REDIS_CLUSTER"
            ) from exc
        raise ConfigError(f"HUB_REDIS_URL: cannot reach the Redis Cluster at {url}: {exc}") from exc
    return client


class _Links:
    """The subscription connections of one attempt: one to the Redis, or on
    a cluster one per primary serving a wanted channel's slot, each read by
    its own task.

    On a single Redis the first failure fails the attempt (:meth:`read`
    raises it) and the engine starts over.  On a cluster a failed
    connection orphans only the channels it carried (``orphans``), and a
    repair task subscribes them again on their current owner.

    redis-py's ``ClusterPubSub`` also keeps a connection per node, but reads
    them one after the other (``get_sharded_message`` waits on each in
    turn, so a quiet shard delays the others by the poll timeout) and has no
    health check per shard; the slot map and the connections are still
    redis-py's (``RedisCluster``), only the per-shard reading is here.
    """

    def __init__(self, engine: RedisEngine) -> None:
        self._engine = engine
        client = engine._client
        self._cluster = client if isinstance(client, RedisCluster) else None
        #: owner ("host:port", or "" for a single Redis) -> its connection
        self._links: dict[str, tuple[aioredis.Redis, PubSub]] = {}
        self._readers: dict[str, asyncio.Task[None]] = {}
        #: channel -> the owner it is subscribed on
        self._where: dict[str, str] = {}
        #: cluster: wanted channels subscribed nowhere right now
        self.orphans: set[str] = set()
        #: sunsubscribe confirmations still due for our own requests: any
        #: other means the channel's slot left that node (a migration).
        self._leaving: Counter[str] = Counter()
        # subscribe, unsubscribe and the repair each take several awaits.
        self._lock = asyncio.Lock()
        self._repairing: asyncio.Task[None] | None = None
        self._failed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    @property
    def count(self) -> int:
        return len(self._links)

    def fail(self, exc: BaseException) -> None:
        if not self._failed.done():
            self._failed.set_exception(exc)

    async def read(self) -> None:
        await self._failed

    # -- subscriptions ----------------------------------------------------

    async def subscribe(self, channels: list[str], sharded: bool) -> None:
        async with self._lock:
            await self._subscribe(channels, sharded)

    async def _subscribe(self, channels: list[str], sharded: bool) -> None:
        by_owner: dict[str, list[str]] = {}
        for channel in channels:
            try:
                owner = self._owner(channel)
            except (RedisClusterException, RedisError) as exc:
                # The slot is not served (mid-failover): repair later.
                log.debug("redis: no owner for %s yet: %s", channel, exc)
                self.orphans.add(channel)
                continue
            by_owner.setdefault(owner, []).append(channel)
        for owner, owned in by_owner.items():
            new = owner not in self._links
            pubsub = self._pubsub(owner)
            try:
                for chunk in self._chunks(owned):
                    if sharded:
                        await pubsub.ssubscribe(*chunk)
                    else:
                        await pubsub.subscribe(*chunk)
            except Exception as exc:
                if self._cluster is None:
                    raise
                await self._lose(owner, pubsub, exc)
                self.orphans.update(owned)
                continue
            if self._links.get(owner, (None, None))[1] is not pubsub:
                # Lost while subscribing (its reader saw it fail).
                self.orphans.update(owned)
                continue
            self.orphans.difference_update(owned)
            for channel in owned:
                self._where[channel] = owner
            if new:
                # Read once subscribed: a pub/sub connection is made by its
                # first command.
                self._readers[owner] = asyncio.get_running_loop().create_task(
                    self._watch(owner, pubsub), name="redis-reader"
                )
        self._kick_repair()

    def _chunks(self, channels: list[str]) -> list[list[str]]:
        if self._cluster is None:
            return [channels[start : start + 500] for start in range(0, len(channels), 500)]
        # A cluster refuses one SSUBSCRIBE naming channels of different
        # slots (CROSSSLOT), even on the same node.
        slots: dict[int, list[str]] = {}
        for channel in channels:
            slots.setdefault(self._cluster.keyslot(channel), []).append(channel)
        return list(slots.values())

    async def unsubscribe(self, channel: str, sharded: bool) -> None:
        async with self._lock:
            self.orphans.discard(channel)
            owner = self._where.pop(channel, None)
            if owner is None or owner not in self._links:
                return
            pubsub = self._links[owner][1]
            try:
                if sharded:
                    if self._cluster is not None:
                        self._leaving[channel] += 1
                    await pubsub.sunsubscribe(channel)
                else:
                    await pubsub.unsubscribe(channel)
            except Exception as exc:
                if self._cluster is None:
                    raise
                await self._lose(owner, pubsub, exc)

    def _owner(self, channel: str) -> str:
        if self._cluster is None:
            return ""
        node = self._cluster.get_node_from_key(channel)
        if node is None:
            raise RedisClusterException(f"{channel}: no node serves its slot")
        return str(node.name)

    def _pubsub(self, owner: str) -> PubSub:
        link = self._links.get(owner)
        if link is not None:
            return link[1]
        engine = self._engine
        # Dedicated connections with redis-py's own retries off: a dead link
        # must surface here, where it is counted and reported.
        no_retry = Retry(NoBackoff(), 0)
        if self._cluster is None:
            client = aioredis.from_url(engine.url, retry=no_retry)
        else:
            client = aioredis.Redis(**self._node_options(owner), retry=no_retry)
        pubsub = client.pubsub()
        self._links[owner] = (client, pubsub)
        return pubsub

    # -- cluster: losing and repairing a shard ------------------------------

    async def _lose(self, owner: str, pubsub: PubSub, exc: BaseException) -> None:
        link = self._links.get(owner)
        if link is None or link[1] is not pubsub:
            return  # lost already
        del self._links[owner]
        reader = self._readers.pop(owner, None)
        lost = [channel for channel, where in self._where.items() if where == owner]
        for channel in lost:
            del self._where[channel]
        self.orphans.update(lost)
        if lost:
            self._engine._reconnects += 1
            log.warning(
                "redis shard %s lost (%d channels), resubscribing: %s: %s",
                owner,
                len(lost),
                type(exc).__name__,
                exc,
            )
        if reader is not None and reader is not asyncio.current_task():
            reader.cancel()
        self._kick_repair()
        with contextlib.suppress(Exception):
            await _close_pubsub(pubsub)
            await link[0].aclose()

    def _kick_repair(self) -> None:
        if self._cluster is None or not self.orphans:
            return
        if self._repairing is None or self._repairing.done():
            self._repairing = asyncio.get_running_loop().create_task(
                self._repair(self._cluster), name="redis-repair"
            )

    async def _repair(self, cluster: RedisCluster) -> None:
        try:
            while self.orphans:
                # The slot map is re-read often (one CLUSTER SLOTS) so the
                # node resubscribes soon after the replica's promotion;
                # connections are only tried on owners that answer.
                await asyncio.sleep(REPAIR_POLL)
                try:
                    await cluster.nodes_manager.initialize()
                except Exception as exc:
                    log.debug("redis cluster slot map not refreshed: %s", exc)
                    continue
                by_owner: dict[str, list[str]] = {}
                for channel in sorted(self.orphans):
                    with contextlib.suppress(RedisClusterException, RedisError):
                        by_owner.setdefault(self._owner(channel), []).append(channel)
                for owner, channels in by_owner.items():
                    # Outside the lock: a dead owner may take a connect
                    # timeout to say so, and joins on other shards must not
                    # wait for it.
                    if owner not in self._links and not await self._answers(owner):
                        continue
                    async with self._lock:
                        channels = [channel for channel in channels if channel in self.orphans]
                        await self._subscribe(channels, True)
                    back = [channel for channel in channels if channel in self._where]
                    if back:
                        self._engine._resubscribed(back)
        except Exception as exc:
            # A bug, not a Redis failure: let the attempt start over.
            self.fail(exc)

    def _node_options(self, owner: str) -> dict[str, Any]:
        """The URL's credentials and TLS, the cluster node's address."""
        host, _, port = owner.rpartition(":")
        options: dict[str, Any] = {**parse_url(self._engine.url), "host": host, "port": int(port)}
        options["socket_connect_timeout"] = self._engine.health_timeout
        return options

    async def _answers(self, owner: str) -> bool:
        client = aioredis.Redis(**self._node_options(owner), retry=Retry(NoBackoff(), 0))
        try:
            await asyncio.wait_for(client.ping(), self._engine.health_timeout)
            return True
        except Exception:
            return False
        finally:
            with contextlib.suppress(Exception):
                await client.aclose()

    # -- reading ----------------------------------------------------------

    async def _watch(self, owner: str, pubsub: PubSub) -> None:
        try:
            await self._read(owner, pubsub)
        except Exception as exc:
            if self._cluster is None:
                self.fail(exc)
            else:
                await self._lose(owner, pubsub, exc)

    async def _read(self, owner: str, pubsub: PubSub) -> None:
        engine = self._engine
        health_timeout = engine.health_timeout
        last_seen = time.monotonic()
        ping_sent: float | None = None
        while True:
            message = await pubsub.get_message(timeout=min(1.0, health_timeout))
            now = time.monotonic()
            if message is not None:
                last_seen, ping_sent = now, None
                kind = message.get("type")
                if kind in ("message", "smessage"):
                    engine._on_message(message["data"])
                elif kind == "sunsubscribe" and self._cluster is not None:
                    self._unsubscribed(owner, message["channel"].decode())
                continue
            if ping_sent is not None and now - ping_sent > health_timeout:
                raise TimeoutError("redis did not answer PING")
            if ping_sent is None and now - last_seen > health_timeout / 2:
                await pubsub.ping()
                ping_sent = now

    def _unsubscribed(self, owner: str, channel: str) -> None:
        if self._leaving[channel] > 0:
            self._leaving[channel] -= 1
            return
        # Redis drops a node's shard subscriptions of a slot it no longer
        # serves: subscribe it on the current owner.
        if self._where.get(channel) == owner:
            del self._where[channel]
            self.orphans.add(channel)
            log.warning("redis channel %s: its slot left %s, resubscribing", channel, owner)
            self._kick_repair()

    async def aclose(self) -> None:
        tasks = list(self._readers.values())
        if self._repairing is not None:
            tasks.append(self._repairing)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._failed.done() and not self._failed.cancelled():
            self._failed.exception()  # retrieved: asyncio must not warn
        for client, pubsub in self._links.values():
            with contextlib.suppress(Exception):
                await _close_pubsub(pubsub)
                await client.aclose()
        self._links.clear()
