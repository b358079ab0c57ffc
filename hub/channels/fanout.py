"""Topics to subscribers (the registry of this node's subscriptions), and the fan-out.

Fan-out is the hot path of the hub.  For each message it:

* encodes the frame at most once per wire format (vsn 1 text, vsn 2
  binary), and only for formats that have subscribers;
* walks the topic's subscribers and appends the same frame bytes to each
  one's outbox through its ``sink`` (for a socket, the pending list's own
  ``append``), which never blocks;
* does nothing else per subscriber: no awaits, no JSON, and for broadcasts
  no Python call; the topic is marked once per flush (:mod:`hub.flusher`),
  and its subscribers' outboxes are written then, each with everything it
  got meanwhile.

Durable events take the same path.  While a topic has a subscription that
may refuse one (a replay waiting or running, a truncated replay, or caught
up by its replay ahead of the live stream), each subscriber is asked with
:meth:`~hub.channels.subscription.Subscription.take_durable`, the one place
their acceptance rule lives; otherwise (nearly always) the event goes out
as a broadcast.  ``postgres_changes`` rows are matched and asked per
subscriber: a cost paid at row-change rates, not at broadcast rates.

No I/O happens here; sockets are behind :class:`~hub.outbox.Outbox`.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Iterable
from typing import Any

from hub.channels.changes import matches
from hub.channels.observer import Observers
from hub.channels.presence import PresenceDiff, PresenceMap, PresenceTable
from hub.channels.subscription import Subscription
from hub.counters import Counters
from hub.engine.base import Engine, Envelope, NodeGone, PresenceSnapshot
from hub.frames import Frame
from hub.outbox import PYTHON_WRITES, Flushable, FlushSubscribers, Sink, Writes
from hub.protocol import VSN2, Broadcast, Vsn, encode, wire_topic

log = logging.getLogger(__name__)


#: Called with a topic's subscribers after the fan-out wrote to their
#: outboxes; must get ``flush()`` called on it before the loop sleeps.
Scheduler = Callable[[Flushable], None]


def _flush_now(item: Flushable) -> None:
    item.flush()


class _TopicSubscribers:
    """The local subscribers of one topic, split by wire format so the loop
    over them does not branch on the format.  Each maps the subscription to
    its outbox's sink.  Subscriptions that may not read broadcasts (a
    private channel whose policies allow presence only) are kept apart in
    ``quiet``, so the broadcast loop never asks."""

    __slots__ = ("v1", "v2", "quiet", "unsettled", "scheduled", "write", "stats")

    def __init__(self, write: FlushSubscribers, stats: Counters) -> None:
        self.v1: dict[Subscription, Sink] = {}
        self.v2: dict[Subscription, Sink] = {}
        self.quiet: dict[Subscription, Sink] = {}
        #: How many subscriptions in v1 and v2 are not
        #: :attr:`~hub.channels.subscription.Subscription.durable_settled`.
        self.unsettled = 0
        #: True from the first fan-out after a flush to the next flush.
        self.scheduled = False
        self.write = write
        self.stats = stats

    def of(self, sub: Subscription) -> dict[Subscription, Sink]:
        if not sub.read_broadcast:
            return self.quiet
        return self.v2 if sub.vsn == VSN2 else self.v1

    def add(self, sub: Subscription) -> None:
        group = self.of(sub)
        if sub not in group and group is not self.quiet and not sub.durable_settled:
            self.unsettled += 1
        group[sub] = sub.outbox.sink

    def remove(self, sub: Subscription) -> None:
        group = self.of(sub)
        removed = group.pop(sub, None) is not None
        if removed and group is not self.quiet and not sub.durable_settled:
            self.unsettled -= 1

    def flush(self) -> None:
        """Write what the fan-out gave each subscriber's outbox."""
        self.scheduled = False
        frames = sent = 0
        for group in (self.v2, self.v1):
            if group:
                f, b = self.write(group)
                frames += f
                sent += b
        if frames:
            # What the compiled loop wrote itself (outboxes count their own).
            self.stats.frames_out += frames
            self.stats.bytes_out += sent

    def __len__(self) -> int:
        return len(self.v1) + len(self.v2) + len(self.quiet)


def _wires(
    subscribers: _TopicSubscribers, broadcast: Broadcast
) -> tuple[bytes | None, bytes | None]:
    """``broadcast``'s frames for the topic's vsn 2 and vsn 1 readers, each
    None when there is none to read it (encoded only when someone will)."""
    wire2 = broadcast.frame_v2().wire if subscribers.v2 else None
    wire1 = None
    if subscribers.v1:
        frame_v1 = broadcast.frame_v1()
        # Opaque binary payloads have no vsn 1 form; Supabase drops them.
        if frame_v1 is not None:
            wire1 = frame_v1.wire
    return wire2, wire1


class Channels:
    """The registry of this node's subscriptions and the fan-out to them."""

    def __init__(
        self,
        engine: Engine,
        *,
        node_id: str = "",
        stats: Counters | None = None,
        observers: Observers | None = None,
        schedule: Scheduler = _flush_now,
        writes: Writes = PYTHON_WRITES,
    ) -> None:
        """``engine`` carries what this node publishes to every node (the
        node binds the engine's deliveries back to :meth:`deliver`).
        ``schedule`` is how a topic's outboxes get flushed after a fan-out:
        the node's write flusher (once, after the loop's next poll); the default
        flushes at once, for outboxes that are not sockets.  ``writes`` are
        the inner loops (frames to sinks, outboxes to sockets): the
        pure-Python ones, or the compiled ones (:func:`hub.outbox.native_writes`)."""
        self.engine = engine
        self.stats = stats or Counters()
        self.observers = observers if observers is not None else Observers()
        self.node_id = node_id
        self.schedule = schedule
        self.writes = writes
        self._topics: dict[str, _TopicSubscribers] = {}
        #: org id -> subscriptions with postgres_changes bindings that get
        #: that org's rows: any topic of the org, and free-name channels of
        #: its members.
        self._bindings: dict[str, dict[Subscription, None]] = {}
        #: Free-name channels of service_role with bindings: every org's rows.
        self._all_bindings: dict[Subscription, None] = {}
        #: Every free-name channel with bindings (public or private): the
        #: rows of tables tracked without an org column go to these only.
        self._free_bindings: dict[Subscription, None] = {}
        self._presence: dict[str, PresenceTable] = {}
        self.delivered = 0

    # -- subscriptions -------------------------------------------------------

    def subscribe(self, sub: Subscription) -> None:
        key = sub.topic.key
        subscribers = self._topics.get(key)
        if subscribers is None:
            subscribers = self._topics[key] = _TopicSubscribers(self.writes.flush, self.stats)
            self.engine.subscribe(key)
        # Broadcasts published before it joined are not for it.
        self.writes.settle()
        subscribers.add(sub)
        if sub.bindings:
            self._bind(sub)

    def unsubscribe(self, sub: Subscription) -> None:
        """Remove ``sub`` and its presence.  Idempotent."""
        key = sub.topic.key
        if sub.active:
            self.observers.notify("left", sub)
        sub.active = False
        if sub.bindings:
            self._unbind(sub)
        subscribers = self._topics.get(key)
        if subscribers is not None:
            # Broadcasts published while it was subscribed are still owed.
            self.writes.settle()
            subscribers.remove(sub)
        # Frames the fan-out gave it this iteration are still owed, and the
        # topic's flush no longer reaches it.
        sub.outbox.schedule()
        # Untrack after leaving the topic: the leave diff goes to everyone
        # else (here and on other nodes), not back to the one leaving.
        self.untrack(sub)
        if subscribers is not None and not subscribers:
            del self._topics[key]
            # Mirrors of other nodes' presence are only kept for topics
            # with local subscribers; a later subscribe re-syncs them.
            self._presence.pop(key, None)
            self.engine.unsubscribe(key)

    def _bind(self, sub: Subscription) -> None:
        """Index a subscription with bindings under the orgs whose rows it
        gets: its topic's org; for a free name, its principal's orgs (all of
        them for service_role).  Never the orgs a client names itself.  A
        free name also gets the rows of tables without an org column."""
        if sub.topic.kind == "free":
            self._free_bindings[sub] = None
        if sub.topic.kind == "org":
            sub.bound_orgs = (sub.topic.owner,)
        elif sub.topic.kind == "free":
            sub.bound_orgs = None if sub.principal.is_service else tuple(sub.principal.orgs)
        else:
            sub.bound_orgs = ()
        if sub.bound_orgs is None:
            self._all_bindings[sub] = None
            return
        for org in sub.bound_orgs:
            self._bindings.setdefault(org, {})[sub] = None

    def _unbind(self, sub: Subscription) -> None:
        self._all_bindings.pop(sub, None)
        self._free_bindings.pop(sub, None)
        for org in sub.bound_orgs or ():
            bound = self._bindings.get(org)
            if bound is not None:
                bound.pop(sub, None)
                if not bound:
                    del self._bindings[org]

    def rebind(self, sub: Subscription) -> None:
        """The subscription's principal changed (a new token): its rows
        follow the new principal's orgs."""
        if sub.bindings and sub.active:
            self._unbind(sub)
            self._bind(sub)

    def joined(self, sub: Subscription) -> None:
        """Called by the session once the join reply is queued."""
        self.observers.notify("joined", sub)

    def refused(self, topic: str, reason: str) -> None:
        self.stats.refused(reason)
        self.observers.notify("refused", topic, reason)

    def subscribers(self, topic: str) -> list[Subscription]:
        """This node's subscriptions of ``topic`` (a copy)."""
        subscribers = self._topics.get(topic)
        if subscribers is None:
            return []
        return [*subscribers.v2, *subscribers.v1, *subscribers.quiet]

    def subscriber_count(self, topic: str) -> int:
        subscribers = self._topics.get(topic)
        return len(subscribers) if subscribers is not None else 0

    @property
    def topic_count(self) -> int:
        return len(self._topics)

    # -- publishing ------------------------------------------------------------

    def publish(self, broadcast: Broadcast) -> None:
        """Send a broadcast to every subscriber of its topic on every node."""
        self.engine.publish(broadcast)

    def track(self, sub: Subscription, fields: dict[str, Any]) -> None:
        if not sub.presence_key:
            sub.presence_key = str(uuid.uuid4())
        self.engine.publish(self._table(sub.topic.key).track(sub, sub.presence_key, fields))

    def untrack(self, sub: Subscription) -> None:
        table = self._presence.get(sub.topic.key)
        if table is None:
            return
        diff = table.untrack(sub)
        if diff:
            self.engine.publish(diff)

    def _table(self, topic: str) -> PresenceTable:
        table = self._presence.get(topic)
        if table is None:
            table = self._presence[topic] = PresenceTable(topic, ref_prefix=self.node_id)
        return table

    def local_presence(self, topic: str) -> PresenceMap:
        table = self._presence.get(topic)
        return table.local_state() if table is not None else {}

    def topics(self) -> list[str]:
        return list(self._topics)

    def presence_state(self, topic: str) -> PresenceMap:
        table = self._presence.get(topic)
        return table.state() if table is not None else {}

    def presence_size(self, topic: str) -> int:
        table = self._presence.get(topic)
        return len(table) if table is not None else 0

    # -- delivery (called by the engine) ------------------------------------

    def deliver(self, envelope: Envelope) -> None:
        if isinstance(envelope, Broadcast):
            self._deliver_broadcast(envelope)
        elif isinstance(envelope, PresenceDiff):
            if envelope.node is not None:
                if envelope.topic not in self._topics:
                    return
                envelope = self._table(envelope.topic).apply_remote(envelope.node, envelope)
            self._deliver_presence(envelope)
        elif isinstance(envelope, PresenceSnapshot):
            if envelope.topic in self._topics:
                table = self._table(envelope.topic)
                self._deliver_presence(table.replace_node(envelope.node, envelope.state))
        else:
            self._node_gone(envelope)

    def _node_gone(self, gone: NodeGone) -> None:
        for table in list(self._presence.values()):
            self._deliver_presence(table.drop_node(gone.node))

    def _deliver_broadcast(self, broadcast: Broadcast) -> None:
        subscribers = self._topics.get(broadcast.topic)
        if subscribers is None:
            return
        count = self._fan_out(subscribers, broadcast)
        self.delivered += count
        if self.observers:
            self.observers.notify("broadcast", broadcast, count)
        self.stats.fanout_latency.observe(max(0.0, time.time() - broadcast.sent_at))

    def _fan_out(self, subscribers: _TopicSubscribers, broadcast: Broadcast) -> int:
        """Give ``broadcast`` to every reader of its topic but its sender;
        how many got it."""
        origin = broadcast.origin
        v2, v1 = subscribers.v2, subscribers.v1
        wire2, wire1 = _wires(subscribers, broadcast)
        if origin is None:
            # Consecutive broadcasts to this topic (a REST request, a burst)
            # reach the sinks together: one pass over them for all.
            count = self.writes.fan_out_later(v2, wire2, v1, wire1)
        else:
            count = 0
            fan_out = self.writes.fan_out
            if wire2 is not None:
                count += fan_out(v2, wire2, origin)
            if wire1 is not None:
                count += fan_out(v1, wire1, origin)
        if count:
            self._due(subscribers)
        return count

    def _due(self, subscribers: _TopicSubscribers) -> None:
        """The fan-out gave ``subscribers`` frames: their flush is scheduled
        (once until it runs)."""
        if not subscribers.scheduled:
            subscribers.scheduled = True
            self.schedule(subscribers)

    def deliver_durable(self, broadcast: Broadcast, seq: int, event: object) -> int:
        """Fan out the broadcast of live durable event ``seq`` (``event`` is
        what a replay buffer holds); the store's listener gives each once and
        in order per org.  When every subscription of the topic is settled
        it is a broadcast; otherwise each decides with
        :meth:`Subscription.take_durable`, and one that takes it is settled
        from then on.  Returns how many subscriptions got the frame now."""
        subscribers = self._topics.get(broadcast.topic)
        if subscribers is None:
            return 0
        if not subscribers.unsettled:
            return self._fan_out(subscribers, broadcast)
        count = 0
        wire2, wire1 = _wires(subscribers, broadcast)
        for group, wire in ((subscribers.v2, wire2), (subscribers.v1, wire1)):
            if wire is None:
                continue
            for sub, sink in group.items():
                if sub.take_durable(seq, event):
                    sink(wire)
                    count += 1
                    if not sub.durable_settled:
                        sub.durable_settled = True
                        subscribers.unsettled -= 1
        if count:
            self._due(subscribers)
        return count

    def deliver_change(self, org: str, seq: int, change: dict[str, Any], event: object) -> int:
        """Fan out captured row change ``seq`` of ``org`` (the payload of a
        ``change`` event) as ``postgres_changes`` to the org's subscriptions
        whose bindings match.  The same mechanism as :meth:`deliver_durable`:
        one frame per (wire format, topic, matching binding ids), appended
        through the sinks, one flush per topic; the same acceptance rule.
        The org comes from the stored event, never from a client's filter.
        Returns how many subscriptions got a frame now."""
        bound = self._bindings.get(org)
        if not bound and not self._all_bindings:
            return 0
        if self._all_bindings:
            bound = {**(bound or {}), **self._all_bindings}
        assert bound is not None
        data = change_data(change)
        own = (
            (sub, ids, data)
            for sub in bound
            if (ids := tuple(b.id for b in sub.bindings if matches(b, change)))
            and sub.take_durable(seq, event, own=sub.topic.kind == "org")
        )
        return self._send_changes(own)

    def free_matches(self, change: dict[str, Any]) -> list[tuple[Subscription, tuple[int, ...]]]:
        """The subscriptions a row change of a table without an org column
        may go to, with the ids of their matching bindings: free-name
        channels only (public or private), never an ``org:`` topic."""
        found = []
        for sub in self._free_bindings:
            ids = tuple(b.id for b in sub.bindings if matches(b, change))
            if ids:
                found.append((sub, ids))
        return found

    def deliver_rows(self, rows: list[tuple[Subscription, tuple[int, ...], dict[str, Any]]]) -> int:
        """Fan out ``postgres_changes`` messages of a row change of a table
        without an org column: to each subscription, its binding ids and the
        ``data`` it may see (subscriptions that may read the same columns
        share one ``data`` object).  One frame per (wire format, topic, ids,
        data), appended through the sinks, one flush per topic; a
        subscription that left meanwhile, or whose durable delivery is
        paused, gets nothing.  Returns how many subscriptions got a frame."""
        return self._send_changes(
            (sub, ids, data)
            for sub, ids, data in rows
            if sub.active and sub.take_durable(0, None, own=False)
        )

    def _send_changes(
        self, rows: Iterable[tuple[Subscription, tuple[int, ...], dict[str, Any]]]
    ) -> int:
        """Send ``postgres_changes`` messages to accepted subscriptions: one
        frame per (wire format, topic, binding ids, data object), appended
        through the sinks, one flush per topic.  Returns how many got one."""
        frames: dict[tuple[str, str, tuple[int, ...], int], bytes] = {}
        touched: dict[str, _TopicSubscribers] = {}
        count = 0
        for sub, ids, data in rows:
            frame_key = (sub.vsn, sub.topic.key, ids, id(data))
            wire = frames.get(frame_key)
            if wire is None:
                payload = {"ids": list(ids), "data": data}
                frame = encode(sub.vsn, None, None, sub.wire_topic, "postgres_changes", payload)
                wire = frames[frame_key] = frame.wire
            sub.outbox.sink(wire)
            count += 1
            if sub.topic.key not in touched:
                subscribers = self._topics.get(sub.topic.key)
                if subscribers is not None:
                    touched[sub.topic.key] = subscribers
                else:  # not expected: bindings are indexed only while subscribed
                    sub.outbox.schedule()
        for subscribers in touched.values():
            self._due(subscribers)
        return count

    def _deliver_presence(self, diff: PresenceDiff) -> None:
        # Rare next to broadcasts: plain pushes, each outbox scheduled.
        subscribers = self._topics.get(diff.topic)
        if subscribers is None or not diff:
            return
        topic = wire_topic(diff.topic)
        payload = diff.payload()
        frames: dict[Vsn, Frame] = {}
        for group in (subscribers.v2, subscribers.v1, subscribers.quiet):
            for sub in group:
                if sub.presence_enabled:
                    frame = frames.get(sub.vsn)
                    if frame is None:
                        frame = frames[sub.vsn] = encode(
                            sub.vsn, None, None, topic, "presence_diff", payload
                        )
                    sub.outbox.push(frame)


def change_data(payload: dict[str, Any]) -> dict[str, Any]:
    """The ``data`` of a ``postgres_changes`` message for a captured change.

    Every one of columns, commit_timestamp and errors must be present: a
    missing one crashes supabase-js or makes realtime-py drop the message."""
    data = {
        "schema": payload.get("schema"),
        "table": payload.get("table"),
        "commit_timestamp": payload.get("commit_timestamp"),
        "type": payload.get("type"),
        "columns": payload.get("columns") or [],
        "errors": None,
    }
    for key in ("record", "old_record"):
        if payload.get(key) is not None:
            data[key] = payload[key]
    return data
