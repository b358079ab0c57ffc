"""Topics to subscribers, and the fan-out.

Fan-out is the hot path of the hub.  For each message it:

* encodes the frame at most once per wire format (vsn 1 text, vsn 2
  binary), and only for formats that have subscribers;
* walks the topic's subscribers and appends the same frame bytes to each
  one's outbox through its ``sink`` (for a socket, the pending list's own
  ``append``), which never blocks;
* does nothing else per subscriber: no awaits, no JSON, no Python call; the
  topic is marked once per loop iteration, and its subscribers' outboxes
  are written then, each with everything it got in that iteration.

No I/O happens here; sockets are behind :class:`~hub.frames.Outbox`.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from hub.auth.principal import Principal
from hub.channels.changes import Binding
from hub.channels.observer import Observer
from hub.channels.presence import PresenceDiff, PresenceMap, PresenceTable
from hub.channels.topics import Topic
from hub.engine.base import Engine, Envelope, NodeGone, PresenceSnapshot
from hub.frames import Flushable, Frame, Outbox, Sink
from hub.protocol import TOPIC_PREFIX, VSN1, VSN2, Broadcast, Vsn, encode
from hub.stats import Stats

log = logging.getLogger(__name__)


@dataclass(eq=False, slots=True)
class Subscription:
    """One channel joined by one socket.  Identity is the object itself."""

    topic: Topic
    join_ref: str | None
    vsn: Vsn
    outbox: Outbox
    principal: Principal
    conn_id: str
    echo_self: bool = False
    ack: bool = False
    presence_key: str = ""
    presence_enabled: bool = True
    bindings: list[Binding] = field(default_factory=list)
    #: False once unsubscribed; async work (a replay) checks it on resume.
    active: bool = True
    #: The highest durable seq delivered; lower or equal ones are duplicates.
    durable_seq: int = 0
    #: While a replay runs, live durable events wait here (see durable.py).
    replay_buffer: list[Any] | None = None
    #: Set when a replay was truncated: live durable events would leave a
    #: gap, so none are delivered until the client rejoins.
    durable_paused: bool = False

    @property
    def wire_topic(self) -> str:
        return TOPIC_PREFIX + self.topic.text


#: Called with a topic's subscribers after the fan-out wrote to their
#: outboxes; must get ``flush()`` called on it before the loop sleeps.
Scheduler = Callable[[Flushable], None]


def _flush_now(item: Flushable) -> None:
    item.flush()


class _TopicSubscribers:
    """The local subscribers of one topic, split by wire format so the loop
    over them does not branch on the format.  Each maps the subscription to
    its outbox's sink."""

    __slots__ = ("v1", "v2", "scheduled")

    def __init__(self) -> None:
        self.v1: dict[Subscription, Sink] = {}
        self.v2: dict[Subscription, Sink] = {}
        #: True from the first fan-out of a loop iteration to the flush.
        self.scheduled = False

    def of(self, vsn: Vsn) -> dict[Subscription, Sink]:
        return self.v2 if vsn == VSN2 else self.v1

    def flush(self) -> None:
        """Write what the fan-out gave each subscriber's outbox."""
        self.scheduled = False
        for group in (self.v2, self.v1):
            for sub in list(group):
                sub.outbox.flush()

    def __len__(self) -> int:
        return len(self.v1) + len(self.v2)


class Channels:
    """The registry of this node's subscriptions and the fan-out to them."""

    def __init__(self, engine: Engine, *, node_id: str = "", stats: Stats | None = None) -> None:
        self.engine = engine
        self.stats = stats or Stats()
        self.observers: list[Observer] = []
        self.node_id = node_id
        engine.bind(self)
        self._topics: dict[str, _TopicSubscribers] = {}
        #: org id -> subscriptions (any topic of that org) with
        #: postgres_changes bindings.
        self._bindings: dict[str, dict[Subscription, None]] = {}
        self._presence: dict[str, PresenceTable] = {}
        self.delivered = 0
        #: How a topic's outboxes get flushed after a fan-out; the hub sets
        #: its write flusher here (once per loop iteration).  The default
        #: flushes at once, for outboxes that are not sockets.
        self.schedule: Scheduler = _flush_now

    # -- subscriptions -------------------------------------------------------

    def subscribe(self, sub: Subscription) -> None:
        key = sub.topic.text
        subscribers = self._topics.get(key)
        if subscribers is None:
            subscribers = self._topics[key] = _TopicSubscribers()
            self.engine.subscribe(key)
        subscribers.of(sub.vsn)[sub] = sub.outbox.sink
        if sub.bindings and sub.topic.kind == "org":
            self._bindings.setdefault(sub.topic.owner, {})[sub] = None

    def unsubscribe(self, sub: Subscription) -> None:
        """Remove ``sub`` and its presence.  Idempotent."""
        key = sub.topic.text
        if sub.active:
            self.observe("left", sub)
        sub.active = False
        bound = self._bindings.get(sub.topic.owner)
        if bound is not None:
            bound.pop(sub, None)
            if not bound:
                del self._bindings[sub.topic.owner]
        subscribers = self._topics.get(key)
        if subscribers is not None:
            subscribers.of(sub.vsn).pop(sub, None)
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

    def observe(self, hook: str, *args: Any) -> None:
        """Call ``hook`` on every observer.  An observer's bug is logged and
        never stops delivery."""
        for observer in self.observers:
            try:
                getattr(observer, hook)(*args)
            except Exception:
                log.exception("observer %r failed in %s", observer, hook)

    def joined(self, sub: Subscription) -> None:
        """Called by the session once the join reply is queued."""
        self.observe("joined", sub)

    def refused(self, topic: str, reason: str) -> None:
        self.stats.refused(reason)
        self.observe("refused", topic, reason)

    def subscribers(self, topic: str) -> list[Subscription]:
        """This node's subscriptions of ``topic`` (a copy)."""
        subscribers = self._topics.get(topic)
        if subscribers is None:
            return []
        return [*subscribers.v2, *subscribers.v1]

    def bound_subscribers(self, org: str) -> list[Subscription]:
        """Subscriptions of ``org``'s topics with postgres_changes bindings."""
        return list(self._bindings.get(org, ()))

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
        self.engine.publish(self._table(sub.topic.text).track(sub, sub.presence_key, fields))

    def untrack(self, sub: Subscription) -> None:
        table = self._presence.get(sub.topic.text)
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
        origin = broadcast.origin
        count = 0
        if subscribers.v2:
            count += _fan_out(subscribers.v2, broadcast.frame_v2().wire, origin)
        if subscribers.v1:
            frame_v1 = broadcast.frame_v1()
            # Opaque binary payloads have no vsn 1 form; Supabase drops them.
            if frame_v1 is not None:
                count += _fan_out(subscribers.v1, frame_v1.wire, origin)
        if count and not subscribers.scheduled:
            subscribers.scheduled = True
            self.schedule(subscribers)
        self.delivered += count
        if self.observers:
            self.observe("broadcast", broadcast, count)
        self.stats.fanout_latency.observe(max(0.0, time.time() - broadcast.sent_at))

    def deliver_durable(self, broadcast: Broadcast, seq: int, event: object) -> int:
        """Fan out the broadcast of durable event ``seq`` (``event`` is what
        a replay buffer holds).  As a broadcast, through the sinks, but each
        subscription takes it at most once (``seq`` above its
        ``durable_seq``), keeps it in its ``replay_buffer`` while a replay
        reads the store, and takes none while paused.  The checks are
        inline: this runs once per subscriber per durable event.  Returns
        how many subscriptions got the frame now."""
        subscribers = self._topics.get(broadcast.topic)
        if subscribers is None:
            return 0
        count = 0
        for group in (subscribers.v2, subscribers.v1):
            if not group:
                continue
            frame = broadcast.frame_v2() if group is subscribers.v2 else broadcast.frame_v1()
            if frame is None:
                continue
            wire = frame.wire
            for sub, sink in group.items():
                if sub.durable_paused or seq <= sub.durable_seq:
                    continue
                if sub.replay_buffer is not None:
                    sub.replay_buffer.append(event)
                    continue
                sub.durable_seq = seq
                sink(wire)
                count += 1
        if count and not subscribers.scheduled:
            subscribers.scheduled = True
            self.schedule(subscribers)
        return count

    def _deliver_presence(self, diff: PresenceDiff) -> None:
        # Rare next to broadcasts: plain pushes, each outbox scheduled.
        subscribers = self._topics.get(diff.topic)
        if subscribers is None or not diff:
            return
        wire_topic = TOPIC_PREFIX + diff.topic
        payload = diff.payload()
        groups: tuple[tuple[Vsn, dict[Subscription, Sink]], ...] = (
            (VSN2, subscribers.v2),
            (VSN1, subscribers.v1),
        )
        for vsn, group in groups:
            frame: Frame | None = None
            for sub in group:
                if sub.presence_enabled:
                    if frame is None:
                        frame = encode(vsn, None, None, wire_topic, "presence_diff", payload)
                    sub.outbox.push(frame)


def _fan_out(group: dict[Subscription, Sink], wire: bytes, origin: object) -> int:
    """Give the frame ``wire`` to every subscriber in ``group`` but ``origin``."""
    if origin is None or origin not in group:
        for sink in group.values():
            sink(wire)
        return len(group)
    for sub, sink in group.items():
        if sub is not origin:
            sink(wire)
    return len(group) - 1
