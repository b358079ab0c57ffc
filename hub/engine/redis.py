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
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from typing import Any, Final

import orjson
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from hub.channels.presence import PresenceDiff
from hub.engine.base import Engine, NodeGone, PresenceSnapshot
from hub.errors import ConfigError
from hub.protocol import Broadcast
from hub.quotas import Quotas

log = logging.getLogger(__name__)

#: Messages waiting for the publisher; beyond this the oldest are dropped
#: (and counted) rather than letting a dead Redis eat the node's memory.
MAX_OUTGOING: Final = 100_000
PIPELINE_BATCH: Final = 512


class RedisEngine(Engine):
    def __init__(
        self,
        url: str,
        *,
        node_id: str,
        prefix: str = "hub",
        sharded: bool = False,
        heartbeat: float = 1.0,
        node_timeout: float = 10.0,
        health_timeout: float = 5.0,
        quotas: Quotas | None = None,
    ) -> None:
        super().__init__(quotas=quotas)
        self.url = url
        self.node_id = node_id
        self.prefix = prefix
        self.sharded = sharded
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
        self._client: aioredis.Redis | None = None
        self.published = 0
        self.received = 0
        self.dropped = 0

    # -- interface ----------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self._ready and not self._broken

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
        self._client = aioredis.from_url(self.url)
        try:
            await asyncio.wait_for(self._client.ping(), self.health_timeout)
        except (TimeoutError, RedisError, OSError) as exc:
            await self._client.aclose()
            raise ConfigError(f"HUB_REDIS_URL: cannot reach Redis at {self.url}: {exc}") from exc
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
                await asyncio.wait_for(self._client.publish(self._nodes_channel, goodbye), 1.0)
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
        while True:
            # A dedicated connection with redis-py's own retries off: a dead
            # link must surface here, where it is counted and reported.
            client = aioredis.from_url(self.url, retry=Retry(NoBackoff(), 0))
            pubsub = client.pubsub()
            control: asyncio.Task[None] | None = None
            try:
                await pubsub.subscribe(self._nodes_channel)
                await self._subscribe_all(pubsub, self._wanted)
                # Drain stale control entries: _wanted is the truth now.
                while not self._control.empty():
                    self._control.get_nowait()
                control = asyncio.get_running_loop().create_task(self._apply_control(pubsub))
                self._nodes = dict.fromkeys(self._nodes, time.monotonic())
                self._ready = True
                self._up.set()
                backoff = 0.1
                log.info("redis subscription up (%d topics)", len(self._wanted))
                self._announce()
                await self._read(pubsub)
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
                with contextlib.suppress(Exception):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
                    await client.aclose()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 5.0)

    async def _subscribe_all(self, pubsub: Any, topics: set[str]) -> None:
        channels = [self._channel(topic) for topic in topics]
        for start in range(0, len(channels), 500):
            chunk = channels[start : start + 500]
            if self.sharded:
                await pubsub.ssubscribe(*chunk)
            else:
                await pubsub.subscribe(*chunk)

    async def _apply_control(self, pubsub: Any) -> None:
        while True:
            add, topic = await self._control.get()
            channel = self._channel(topic)
            try:
                if add:
                    if self.sharded:
                        await pubsub.ssubscribe(channel)
                    else:
                        await pubsub.subscribe(channel)
                    self._send(
                        channel, b"S" + orjson.dumps({"n": self.node_id, "t": topic}), self.sharded
                    )
                elif self.sharded:
                    await pubsub.sunsubscribe(channel)
                else:
                    await pubsub.unsubscribe(channel)
            except Exception as exc:
                # The reader will notice the broken link and resubscribe all.
                log.debug("redis (un)subscribe of %s failed: %s", topic, exc)
                return

    async def _read(self, pubsub: Any) -> None:
        last_seen = time.monotonic()
        ping_sent: float | None = None
        while True:
            message = await pubsub.get_message(timeout=min(1.0, self.health_timeout))
            now = time.monotonic()
            if message is not None:
                last_seen, ping_sent = now, None
                kind = message.get("type")
                if kind in ("message", "smessage"):
                    self._on_message(message["data"])
                continue
            if ping_sent is not None and now - ping_sent > self.health_timeout:
                raise TimeoutError("redis did not answer PING")
            if ping_sent is None and now - last_seen > self.health_timeout / 2:
                await pubsub.ping()
                ping_sent = now

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

    def _announce(self) -> None:
        """After (re)connecting: publish our presence, ask for everyone's."""
        assert self._listener is not None
        for topic in self._listener.topics():
            self._send_snapshot(topic)
            request = b"S" + orjson.dumps({"n": self.node_id, "t": topic})
            self._send(self._channel(topic), request, self.sharded)

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
                self._send(self._nodes_channel, beat, False)
                now = time.monotonic()
                for node, seen in list(self._nodes.items()):
                    if now - seen > self.node_timeout:
                        log.warning(
                            "node %s silent for %.0f s: dropping its presence", node, now - seen
                        )
                        self._gone(node)
            await asyncio.sleep(self.heartbeat)
