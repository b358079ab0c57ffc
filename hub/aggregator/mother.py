"""The mother aggregator: rolling counters over every org, and their feed.

The mother is an :class:`~hub.channels.observer.Observer` of the node.  Its
hooks run on hot paths, so each one only updates counters in O(1):

* ``durable``: every durable event of every org (each node sees all of
  them) goes into the event windows (:mod:`hub.aggregator.windows`);
* ``connected`` / ``disconnected`` / ``joined`` / ``left`` / ``refused`` /
  ``broadcast``: this node's connections, users, subscriptions, deliveries
  and refused joins.

Two kinds of numbers, two ways to agree across nodes:

* **Event-derived** numbers (windows, series, types, last event) are
  computed by every node from the same stream, bucketed by the events'
  ``created_at``, so every node computes the same ones.  After a restart the
  windows are rebuilt from the store (the last hour of each org) before the
  node's own stream is trusted alone; events that arrive both ways are
  counted once (see :class:`~hub.aggregator.windows.EventAggregate`).
* **Connection-derived** numbers exist per node.  With Redis, each node
  writes its share every :data:`SHARE_INTERVAL` seconds to
  ``<prefix>:mother:node:<node>`` with a TTL of :data:`SHARE_TTL` seconds and
  reads the others' (their names are in the set ``<prefix>:mother:nodes``).
  A node that dies stops refreshing its key, so its share disappears from
  every snapshot within ``SHARE_TTL + SHARE_INTERVAL`` seconds (4 s); one
  that stops cleanly deletes it at once.

The feed: a subscriber of the ``mother`` topic gets a full snapshot as soon
as it has joined, then one every ``1 / rate`` seconds, as a broadcast with
event ``snapshot`` on ``realtime:mother``, delivered by this node only (each
node feeds its own subscribers; publishing through the engine would give
every subscriber one copy per node).  ``GET /api/mother/stats`` returns the
same snapshot.  The schema is documented in ``docs/mother.md``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

import anyio
import orjson

from hub import __version__
from hub.aggregator.windows import (
    HISTORY_SECONDS,
    RECENT_NETWORK,
    EventAggregate,
    EventWindows,
    OrgConnections,
    Ring,
    merge_shares,
)
from hub.channels.fanout import Channels
from hub.channels.observer import Observer
from hub.channels.topics import MOTHER, ORG_ID_RE
from hub.protocol import Broadcast
from hub.store.base import MAX_READ, EventStore, StoredEvent

if TYPE_CHECKING:
    from hub.auth.principal import Principal
    from hub.channels.subscription import Subscription

log = logging.getLogger(__name__)

#: Version of the snapshot's schema (docs/mother.md); bumped on breaking changes.
SCHEMA_VERSION: Final = 1
#: Event of the broadcasts on ``realtime:mother``.
SNAPSHOT_EVENT: Final = "snapshot"
#: Seconds between two writes of this node's share to Redis.
SHARE_INTERVAL: Final = 1.0
#: Seconds a share lives in Redis unless refreshed.
SHARE_TTL: Final = 3
#: Users listed per org (and network-wide) in a share; beyond, only counts.
SHARE_USERS_PER_ORG: Final = 100
SHARE_USERS_NETWORK: Final = 1000
#: Orgs in a snapshot, the most active first; the rest are counted only.
MAX_SNAPSHOT_ORGS: Final = 500
#: Per-second points per org in a snapshot (the sparkline).
ORG_SECONDS: Final = 60
#: Recent events per org in a snapshot.
ORG_RECENT: Final = 5
#: Characters of an event's payload shown in a snapshot.
PREVIEW_CHARS: Final = 120
#: Seconds between prunes of quiet orgs.
PRUNE_INTERVAL: Final = 30.0


#: The event windows of an org without events (shared, never added to).
_NO_EVENTS: Final = EventWindows(max_types=1, recent=1)


class _OrgLocal:
    """This node's connection-derived numbers for one org."""

    __slots__ = ("conns", "users", "topics", "delivered", "refused")

    def __init__(self) -> None:
        #: conn id -> subscriptions of this org on that connection.
        self.conns: dict[str, int] = {}
        #: user (``sub``) -> subscriptions of this org by that user.
        self.users: dict[str, int] = {}
        #: topic -> local subscriptions (their presence is read per share).
        self.topics: dict[str, int] = {}
        self.delivered = Ring(1, 60)
        self.refused = Ring(60, 60)

    def empty(self, now: float) -> bool:
        return not self.conns and self.delivered.total(now) == 0 and self.refused.total(now) == 0


def _incr(counts: dict[str, int], key: str) -> None:
    counts[key] = counts.get(key, 0) + 1


def _decr(counts: dict[str, int], key: str) -> None:
    left = counts.get(key, 0) - 1
    if left > 0:
        counts[key] = left
    else:
        counts.pop(key, None)


def _org_of(topic: str) -> str | None:
    """The org of an ``org:<id>[:<name>]`` topic text, else None."""
    if not topic.startswith("org:"):
        return None
    org = topic[4:].partition(":")[0]
    return org if ORG_ID_RE.fullmatch(org) else None


def _preview(payload: Any) -> str:
    try:
        text = orjson.dumps(payload).decode()
    except TypeError:
        text = repr(payload)
    return text if len(text) <= PREVIEW_CHARS else text[: PREVIEW_CHARS - 1] + "…"


def _event_json(event: StoredEvent, *, with_org: bool) -> dict[str, Any]:
    item: dict[str, Any] = {"org": event.org} if with_org else {}
    item.update(
        seq=event.seq,
        id=event.id,
        type=event.type,
        kind=event.kind,
        at=event.created_at,
        preview=_preview(event.payload),
    )
    return item


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class Mother(Observer):
    """Rolling counters over every org; see the module's docstring."""

    def __init__(
        self,
        *,
        channels: Channels,
        store: EventStore,
        node_id: str,
        redis_url: str | None = None,
        redis_prefix: str = "hub",
        redis_cluster: bool = False,
        rate: float = 1.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not rate > 0:
            raise ValueError("rate must be greater than 0")
        self.channels = channels
        self.store = store
        self.node_id = node_id
        self.redis_url = redis_url
        self.redis_prefix = redis_prefix
        self.redis_cluster = redis_cluster
        self.rate = rate
        self.clock = clock
        self.started_at = clock()
        self.events = EventAggregate()
        #: False until the windows were rebuilt from the store.
        self.rebuilt = False
        # Connection-derived, this node only.
        self._conns: dict[str, str | None] = {}
        self._users: dict[str, int] = {}
        #: Every live subscription -> (org, user) it was counted under.
        #: Counted subscriptions, each with the user it was counted for (its
        #: principal may change later); None for a topic that is not an
        #: org's, or a principal with no user.
        self._subs: dict[Subscription, str | None] = {}
        self._orgs: dict[str, _OrgLocal] = {}
        self._delivered = Ring(1, 60)
        self._refused = Ring(60, 60)
        # Other nodes' shares, as last read from Redis, and when.
        self._remote: dict[str, dict[str, Any]] = {}
        self._remote_read_at = 0.0
        self._redis_ok: bool | None = None if redis_url is None else False
        self._loop_lag = 0.0
        #: The last snapshot broadcast and the monotonic time it was built.
        self._last: tuple[Broadcast, float] | None = None

    # -- observer hooks (hot paths: O(1), no awaits) -------------------------

    def connected(self, conn_id: str, principal: Principal) -> None:
        self._conns[conn_id] = principal.sub
        if principal.sub is not None:
            _incr(self._users, principal.sub)

    def disconnected(self, conn_id: str, principal: Principal) -> None:
        if conn_id in self._conns:
            user = self._conns.pop(conn_id)
            if user is not None:
                _decr(self._users, user)

    def joined(self, sub: Subscription) -> None:
        topic = sub.topic
        if topic.kind == "mother":
            self._subs[sub] = None
            self._send_snapshot(sub)
            return
        if topic.kind != "org":
            self._subs[sub] = None
            return
        org, user = topic.owner, sub.principal.sub
        self._subs[sub] = user
        local = self._orgs.get(org)
        if local is None:
            local = self._orgs[org] = _OrgLocal()
        _incr(local.conns, sub.conn_id)
        _incr(local.topics, topic.text)
        if user is not None:
            _incr(local.users, user)

    def left(self, sub: Subscription) -> None:
        if sub not in self._subs:
            return
        user = self._subs.pop(sub)
        local = self._orgs.get(sub.topic.owner) if sub.topic.kind == "org" else None
        if local is None:
            return
        _decr(local.conns, sub.conn_id)
        _decr(local.topics, sub.topic.text)
        if user is not None:
            _decr(local.users, user)

    def refused(self, topic: str, reason: str) -> None:
        now = self.clock()
        self._refused.add(now)
        org = _org_of(topic)
        # Only orgs already known: refused joins to made-up org ids must not
        # grow the mother's memory.
        if org is not None:
            local = self._orgs.get(org)
            if local is None and org in self.events.orgs:
                local = self._orgs[org] = _OrgLocal()
            if local is not None:
                local.refused.add(now)

    def broadcast(self, broadcast: Broadcast, delivered: int) -> None:
        if not delivered or broadcast.topic == MOTHER:
            return
        self._count_delivered(broadcast.topic, delivered)

    def durable(self, event: StoredEvent) -> None:
        self.events.live(event)
        if event.kind == "event":
            # Durable events reach the subscribers of org:<id> (see
            # hub.channels.durable); count them as they are now.
            topic = "org:" + event.org
            subscribers = self.channels.subscriber_count(topic)
            if subscribers:
                self._count_delivered(topic, subscribers)

    def _count_delivered(self, topic: str, delivered: int) -> None:
        now = self.clock()
        self._delivered.add(now, delivered)
        org = _org_of(topic)
        if org is not None:
            local = self._orgs.get(org)
            if local is not None:
                local.delivered.add(now, delivered)

    # -- this node's share ---------------------------------------------------

    def local_share(self, now: float | None = None) -> dict[str, Any]:
        """This node's connection-derived numbers and health, as written to
        Redis (JSON-compatible)."""
        now = self.clock() if now is None else now
        orgs: dict[str, Any] = {}
        for org, local in list(self._orgs.items()):
            if local.empty(now):
                del self._orgs[org]
                continue
            users = list(local.users)
            orgs[org] = {
                "clients": len(local.conns),
                "users_count": len(users),
                "users": users[:SHARE_USERS_PER_ORG],
                "presence": {topic: self.channels.presence_size(topic) for topic in local.topics},
                "delivered_1m": local.delivered.total(now),
                "refused_1h": local.refused.total(now),
            }
        users = list(self._users)
        return {
            "node": self.node_id,
            "at": now,
            "started_at": self.started_at,
            "version": __version__,
            "clients": len(self._conns),
            "users_count": len(users),
            "users": users[:SHARE_USERS_NETWORK],
            "subscriptions": len(self._subs),
            "topics": self.channels.topic_count,
            "mother_subscribers": self.channels.subscriber_count(MOTHER),
            "delivered_1m": self._delivered.total(now),
            "refused_1h": self._refused.total(now),
            "engine_ready": self.channels.engine.ready,
            "store_ready": self.store.ready,
            # Tenant databases this node cannot use (their orgs only).
            "databases_down": [d.name for d in self.store.databases() if not d.ready],
            "redis": self._redis_ok,
            "rebuilt": self.rebuilt,
            "loop_lag_ms": round(self._loop_lag * 1000, 1),
            "rss_bytes": _rss_bytes(),
            "orgs": orgs,
        }

    def _shares(self, now: float) -> list[dict[str, Any]]:
        shares = [self.local_share(now)]
        # Without a successful read for a TTL, the others' shares are too
        # old to trust (this node lost Redis).
        if time.monotonic() - self._remote_read_at <= SHARE_TTL:
            shares.extend(self._remote.values())
        return shares

    # -- the snapshot --------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """The full state as JSON-compatible data (docs/mother.md)."""
        now = self.clock()
        shares = self._shares(now)
        network_conns, org_conns = merge_shares(shares)
        orgs: list[dict[str, Any]] = []
        active = 0
        for org in sorted({*self.events.orgs, *org_conns}):
            windows = self.events.get(org)
            conns = org_conns.get(org, OrgConnections())
            item = self._org_json(org, windows, conns, now)
            # Shown while it had events in the hour or has any connection
            # number: the same rule on every node, whenever it last pruned.
            if not item["events"]["1h"] and not any(
                (conns.clients, conns.presence, conns.delivered_1m, conns.refused_1h)
            ):
                continue
            if item["events"]["5m"]:
                active += 1
            orgs.append(item)
        total = len(orgs)
        if total > MAX_SNAPSHOT_ORGS:
            orgs.sort(key=lambda o: (-o["events"]["1h"], -o["clients"], o["org"]))
            orgs = sorted(orgs[:MAX_SNAPSHOT_ORGS], key=lambda o: o["org"])
        network = self.events.network
        return {
            "version": SCHEMA_VERSION,
            "node": self.node_id,
            "time": now,
            "rate": self.rate,
            "rebuilding": not self.rebuilt,
            "network": {
                "events": network.count.windows(now),
                "per_second": network.count.per_second(now),
                "per_minute": network.count.per_minute(now),
                "types": network.types.counts(now),
                "last_event_at": network.last_at,
                "since_last_event": network.since_last(now),
                "orgs": total,
                "active_orgs": active,
                **network_conns.as_dict(),
            },
            "orgs": orgs,
            "orgs_omitted": total - len(orgs),
            "recent": [
                _event_json(event, with_org=True) for event in network.recent.newest(RECENT_NETWORK)
            ],
            "nodes": [self._node_json(share, now) for share in shares],
        }

    def _org_json(
        self, org: str, windows: EventWindows | None, conns: OrgConnections, now: float
    ) -> dict[str, Any]:
        if windows is None:
            # An org known only from its connections: never counts anything.
            windows = _NO_EVENTS
        return {
            "org": org,
            # Where its log lives (None: a store of one database).
            "database": self.store.database_of(org),
            "seq": windows.seq,
            "events": windows.count.windows(now),
            "per_second": windows.count.per_second(now, ORG_SECONDS),
            "per_minute": windows.count.per_minute(now),
            "types": windows.types.counts(now),
            "last_event_at": windows.last_at,
            "since_last_event": windows.since_last(now),
            **conns.as_dict(),
            "recent": [
                _event_json(event, with_org=False) for event in windows.recent.newest(ORG_RECENT)
            ],
        }

    def _node_json(self, share: dict[str, Any], now: float) -> dict[str, Any]:
        keys = (
            "node",
            "version",
            "clients",
            "users_count",
            "subscriptions",
            "topics",
            "mother_subscribers",
            "delivered_1m",
            "refused_1h",
            "engine_ready",
            "store_ready",
            "databases_down",
            "redis",
            "rebuilt",
            "loop_lag_ms",
            "rss_bytes",
        )
        node = {key: share.get(key) for key in keys}
        node["users"] = node.pop("users_count")
        at = share.get("at")
        started = share.get("started_at")
        node["self"] = share.get("node") == self.node_id
        node["age"] = round(max(0.0, now - at), 3) if isinstance(at, int | float) else None
        node["uptime"] = (
            round(max(0.0, now - started), 1) if isinstance(started, int | float) else None
        )
        return node

    # -- the feed ------------------------------------------------------------

    def _snapshot_broadcast(self) -> Broadcast:
        broadcast = Broadcast.from_value(MOTHER, SNAPSHOT_EVENT, self.snapshot())
        self._last = (broadcast, time.monotonic())
        return broadcast

    def _send_snapshot(self, sub: Subscription) -> None:
        # Reuse the last snapshot while it is fresh: admins joining at once
        # cost one snapshot, not one each.
        last = self._last
        if last is not None and time.monotonic() - last[1] < 1 / self.rate:
            broadcast = last[0]
        else:
            broadcast = self._snapshot_broadcast()
        frame = broadcast.frame_for(sub.vsn)
        if frame is not None:
            sub.outbox.push(frame)

    def publish_snapshot(self) -> None:
        """Send a fresh snapshot to this node's ``mother`` subscribers."""
        if self.channels.subscriber_count(MOTHER):
            # Local delivery only: every node feeds its own subscribers.
            self.channels.deliver(self._snapshot_broadcast())
        else:
            self._last = None

    async def _feed_forever(self) -> None:
        period = 1 / self.rate
        next_at = time.monotonic()
        last_prune = next_at
        while True:
            next_at += period
            await anyio.sleep(max(0.0, next_at - time.monotonic()))
            now = time.monotonic()
            self._loop_lag = max(0.0, now - next_at)
            if now - next_at > period:
                # Far behind (a stalled loop): skip the missed updates.
                next_at = now
            self.publish_snapshot()
            if self.rebuilt and now - last_prune >= PRUNE_INTERVAL:
                last_prune = now
                self.events.prune(self.clock())

    # -- rebuild -------------------------------------------------------------

    async def rebuild(self) -> None:
        """Count the last hour of every org from the store (once)."""
        since = self.clock() - HISTORY_SECONDS
        counted = 0
        orgs = await self.store.orgs()
        for org in orgs:
            events = await self.store.read_since(org, since=since, limit=MAX_READ)
            while events:
                for event in events:
                    counted += self.events.history(event)
                if len(events) < MAX_READ:
                    break
                events = await self.store.read(org, after=events[-1].seq, limit=MAX_READ)
        self.rebuilt = True
        log.info("mother: %d events of %d orgs read back from the store", counted, len(orgs))

    async def _rebuild_until_done(self) -> None:
        delay = 0.5
        while True:
            try:
                await self.rebuild()
                return
            except Exception as exc:
                log.warning(
                    "mother: cannot read the store back (%r); retrying in %.1fs", exc, delay
                )
            await anyio.sleep(delay)
            delay = min(delay * 2, 10.0)

    # -- Redis -------------------------------------------------------------

    async def _share_forever(self) -> None:
        import redis.asyncio as aioredis
        from redis.asyncio.cluster import RedisCluster

        assert self.redis_url is not None
        base = f"{self.redis_prefix}:mother"
        nodes_key, own_key = f"{base}:nodes", f"{base}:node:{self.node_id}"
        client: aioredis.Redis | RedisCluster
        if self.redis_cluster:
            # Each key goes to the primary serving its slot (the pipeline
            # is split by node, MGET by slot).
            client = RedisCluster.from_url(self.redis_url)
        else:
            client = aioredis.from_url(self.redis_url)
        try:
            while True:
                try:
                    share = orjson.dumps(self.local_share())
                    async with client.pipeline(transaction=False) as pipe:
                        pipe.set(own_key, share, ex=SHARE_TTL)
                        pipe.sadd(nodes_key, self.node_id)
                        pipe.smembers(nodes_key)
                        _, _, members = await pipe.execute()
                    names = sorted(
                        name for raw in members if (name := raw.decode()) != self.node_id
                    )
                    keys = [f"{base}:node:{n}" for n in names]
                    values: list[Any] = []
                    if isinstance(client, RedisCluster) and keys:
                        # One MGET may not span slots (CROSSSLOT).
                        values = await client.mget_nonatomic(keys)
                    elif keys:
                        values = await client.mget(keys)
                    remote: dict[str, dict[str, Any]] = {}
                    gone: list[str] = []
                    for name, value in zip(names, values, strict=True):
                        if value is None:
                            gone.append(name)
                            continue
                        with contextlib.suppress(orjson.JSONDecodeError):
                            data = orjson.loads(value)
                            if isinstance(data, dict):
                                remote[name] = data
                    if gone:
                        await client.srem(nodes_key, *gone)
                    self._remote = remote
                    self._remote_read_at = time.monotonic()
                    if not self._redis_ok:
                        log.info("mother: sharing through redis (%d other nodes)", len(remote))
                    self._redis_ok = True
                except Exception as exc:
                    # Any link failure (uvloop raises RuntimeError on a
                    # closed transport) must not end the lifespan.
                    if self._redis_ok:
                        log.warning("mother: redis failed, showing this node only: %s", exc)
                    self._redis_ok = False
                await anyio.sleep(SHARE_INTERVAL)
        finally:
            # Leave at once rather than after the TTL; bounded, and shielded
            # from the cancellation that got us here.
            with anyio.move_on_after(1.0, shield=True):
                with contextlib.suppress(Exception):
                    await client.delete(own_key)
                    await client.srem(nodes_key, self.node_id)
                with contextlib.suppress(Exception):
                    await client.aclose()

    # -- lifecycle -----------------------------------------------------------

    async def run(self) -> None:
        """Long-lived: rebuild the windows, share through Redis, feed
        ``mother``.  Cancel to stop."""
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._rebuild_until_done)
            tg.start_soon(self._feed_forever)
            if self.redis_url:
                tg.start_soon(self._share_forever)
