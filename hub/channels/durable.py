"""Durable org events: from the event store to subscribers, with replay.

Each node hears every appended event from its own store listener (never
through the engine, so an event cannot arrive twice via two paths) and
offers it to this node's subscriptions:

* kind ``event`` goes to subscribers of ``org:<id>`` as a broadcast whose
  ``meta`` carries ``{"id", "seq"}``;
* kind ``change`` goes, as ``postgres_changes``, to subscriptions of any
  topic of that org whose bindings match.  The org comes from the stored
  event, never from the client's filter.

A join may ask for a replay (``config.broadcast.replay``):

* ``{"after": SEQ, "limit"?: N}``: every event with ``seq > SEQ`` (exact; the
  hub's own form, for a client that remembers the last ``meta.seq`` it saw);
* ``{"after_id": ID, "limit"?: N}``: the same, after the event whose
  ``meta.id`` is ID (realtime-py keeps only ``meta.id``);
* ``{"since": MS, "limit"?: N}``: Supabase's form, events created at or after
  ``MS`` (Unix milliseconds).

Replayed broadcasts carry ``meta.replayed: true``.  While a replay reads the
store, live events for that subscription wait in its buffer; afterwards the
buffer is drained skipping every ``seq`` already delivered, so the seam has
no gap and no duplicate.  When more events match than the replay may return
(``limit``, capped by ``HUB_REPLAY_MAX``), or the store no longer holds them,
the hub delivers the oldest page, then a ``system`` message
(``extension: "replay"``, ``message`` starting with ``ReplayTruncated``) with
``resume_after``; durable delivery on that subscription then stops (a gap
would follow) until the client rejoins with ``replay.after = resume_after``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import orjson

from hub.channels.changes import matches
from hub.channels.fanout import Channels, change_data
from hub.channels.observer import Observers
from hub.channels.subscription import Subscription
from hub.frames import Frame
from hub.protocol import Broadcast, encode
from hub.store.base import MAX_READ, EventStore, StoredEvent

log = logging.getLogger(__name__)

#: Most messages one replay of a private channel delivers (Supabase's cap).
MAX_MESSAGE_REPLAY = 25


@dataclass(frozen=True, slots=True)
class ReplayRequest:
    after: int | None = None
    #: Unix seconds.
    since: float | None = None
    limit: int | None = None
    #: An event id (meta.id): resume after that event.
    after_id: str | None = None


def parse_replay(raw: Any) -> ReplayRequest:
    """Validate ``config.broadcast.replay``; raise ValueError when malformed."""
    if not isinstance(raw, dict):
        raise ValueError("replay must be an object")
    after, since, limit = raw.get("after"), raw.get("since"), raw.get("limit")
    after_id = raw.get("after_id")
    if sum(value is not None for value in (after, since, after_id)) != 1:
        raise ValueError(
            "replay needs exactly one of after (a seq), after_id (an event id) or since (ms)"
        )
    if after_id is not None and (not isinstance(after_id, str) or not 0 < len(after_id) <= 64):
        raise ValueError("replay.after_id must be an event id")
    if after is not None and (not isinstance(after, int) or isinstance(after, bool) or after < 0):
        raise ValueError("replay.after must be a non-negative integer")
    if since is not None and (
        not isinstance(since, int | float) or isinstance(since, bool) or since < 0
    ):
        raise ValueError("replay.since must be a non-negative number of milliseconds")
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        raise ValueError("replay.limit must be a positive integer")
    return ReplayRequest(after, None if since is None else since / 1000.0, limit, after_id)


class DurableFeed:
    """Offers stored events to this node's subscriptions; runs replays.

    The node hands :meth:`on_event` to the store as its listener callback.
    Live events go through the registry's fan-out
    (:meth:`~hub.channels.fanout.Channels.deliver_durable` and
    :meth:`~hub.channels.fanout.Channels.deliver_change`); a replay pushes
    to its one subscription.  Both accept an event by the one rule,
    :meth:`~hub.channels.subscription.Subscription.take_durable`.
    """

    def __init__(
        self,
        channels: Channels,
        store: EventStore,
        *,
        replay_max: int,
        observers: Observers | None = None,
    ) -> None:
        self.channels = channels
        self.store = store
        self.observers = observers if observers is not None else channels.observers
        self.replay_max = replay_max
        self.delivered = 0

    # -- live ---------------------------------------------------------------

    def on_event(self, event: StoredEvent) -> None:
        """The store's callback: one event, in seq order per org."""
        self.observers.notify("durable", event)
        if event.kind == "event":
            broadcast = Broadcast(
                f"org:{event.org}",
                event.type,
                orjson.dumps(event.payload),
                meta=event.meta(),
            )
            self.delivered += self.channels.deliver_durable(broadcast, event.seq, event)
        elif isinstance(event.payload, dict):
            self.delivered += self.channels.deliver_change(
                event.org, event.seq, event.payload, event
            )

    def _offer_any(self, sub: Subscription, event: StoredEvent, *, replayed: bool) -> None:
        """Offer one event to one subscription (replay and buffer drain)."""
        frame: Frame | None
        if event.kind == "event":
            if sub.topic.name is not None:
                return
            meta = event.meta()
            if replayed:
                meta["replayed"] = True
            broadcast = Broadcast(
                sub.topic.text, event.type, orjson.dumps(event.payload), meta=meta
            )
            if not sub.take_durable(event.seq, event):
                return
            frame = broadcast.frame_for(sub.vsn)
        elif isinstance(event.payload, dict):
            ids = tuple(b.id for b in sub.bindings if matches(b, event.payload))
            if not ids or not sub.take_durable(event.seq, event):
                return
            payload = {"ids": list(ids), "data": change_data(event.payload)}
            frame = encode(sub.vsn, None, None, sub.wire_topic, "postgres_changes", payload)
        else:
            return
        if frame is not None:
            sub.outbox.push(frame)
            self.delivered += 1

    # -- replay -------------------------------------------------------------

    async def _read(self, org: str, request: ReplayRequest, wanted: int) -> list[StoredEvent]:
        """Up to ``wanted`` events, oldest first, read in pages of MAX_READ."""
        events: list[StoredEvent] = []
        cursor = request.after or 0
        if request.since is not None:
            want = min(wanted, MAX_READ)
            events = await self.store.read_since(org, since=request.since, limit=want)
            if len(events) < want:
                return events
            cursor = events[-1].seq
        while len(events) < wanted:
            want = min(wanted - len(events), MAX_READ)
            page = await self.store.read(org, after=cursor, limit=want)
            events.extend(page)
            if len(page) < want:
                break
            cursor = page[-1].seq
        return events

    async def replay(self, sub: Subscription, request: ReplayRequest) -> None:
        """Deliver what ``sub`` missed, then switch it to the live stream."""
        if sub.topic.kind == "free":
            await self._replay_messages(sub, request)
            return
        org = sub.topic.owner
        limit = min(request.limit or self.replay_max, self.replay_max)
        first_held = head = 0
        try:
            if request.after_id is not None:
                seq = await self.store.seq_of(org, request.after_id)
                if seq is None:
                    if sub.active:
                        self._stop(
                            sub,
                            f"ReplayUnknownId: no event {request.after_id[:64]!r} is held; "
                            "rejoin with replay.after or since",
                            0,
                        )
                    return
                request = ReplayRequest(after=seq, limit=request.limit)
            # The head before the read: if the read finds nothing after
            # `after` although the head was past it, those events are gone
            # (retention dropped them), not yet to come.
            head = await self.store.last_seq(org) if request.after is not None else 0
            events = await self._read(org, request, limit + 1)
            if request.since is not None and events:
                first_held = await self.store.first_seq(org)
        except Exception:
            log.exception("replay of org %s failed", org)
            events = None
        if not sub.active:
            return
        if events is None:
            self._stop(
                sub,
                "ReplayFailed: the event store could not be read; rejoin to retry",
                request.after or 0,
            )
            return
        truncated = len(events) > limit
        events = events[:limit]
        start = request.after
        # From here on nothing awaits, so no live event can slip in between
        # the replayed ones and the buffered ones.
        buffered, sub.replay_buffer = sub.replay_buffer or [], None
        if events and start is not None and events[0].seq != start + 1:
            # A bounded store forgot the oldest missed events: say which are
            # lost for good, then go on from the oldest one still held.
            gap_end = events[0].seq - 1
            self._notice(
                sub,
                f"ReplayGap: events {start + 1}..{gap_end} are no longer held",
                gap_end,
            )
        elif not events and start is not None and head > start:
            self._notice(sub, f"ReplayGap: events {start + 1}..{head} are no longer held", head)
        elif events and events[0].seq == first_held > 1:
            # `since` reached back to the oldest event held: older ones in
            # the requested range may have been forgotten.
            self._notice(
                sub,
                f"ReplayGap: events before seq {first_held} are no longer held; "
                "some may fall in the requested range",
                first_held - 1,
            )
        for event in events:
            self._offer_any(sub, event, replayed=True)
        if truncated:
            last = events[-1].seq if events else (start or 0)
            self._stop(
                sub,
                f"ReplayTruncated: more than {limit} events were missed; "
                f"rejoin with replay.after={last} for the rest",
                last,
            )
            return
        for event in buffered:
            self._offer_any(sub, event, replayed=False)

    async def _replay_messages(self, sub: Subscription, request: ReplayRequest) -> None:
        """Supabase's replay of a private channel: the broadcasts kept in
        ``realtime.messages`` since ``since``, oldest first, at most
        ``limit`` (at most :data:`MAX_MESSAGE_REPLAY`, Supabase's cap), each
        with ``meta: {"id", "replayed": true}``.  They have no seq: a message
        sent while the rows are read may arrive live and again replayed,
        as in Supabase."""
        assert request.since is not None  # the session asks for nothing else
        limit = min(request.limit or MAX_MESSAGE_REPLAY, MAX_MESSAGE_REPLAY)
        try:
            messages = await self.store.read_messages(
                sub.topic.text, private=sub.topic.private, since=request.since, limit=limit
            )
        except Exception:
            log.exception("replay of %s failed", sub.topic.text)
            if sub.active:
                self._notice(
                    sub, "ReplayFailed: the messages could not be read; rejoin to retry", 0
                )
            return
        for message in messages:
            if not sub.active:
                return
            meta = {"id": message.id, "replayed": True}
            frame = Broadcast(sub.topic.key, message.event, message.payload, meta=meta).frame_for(
                sub.vsn
            )
            if frame is not None:
                sub.outbox.push(frame)

    def _stop(self, sub: Subscription, message: str, resume_after: int) -> None:
        """Tell the client, and stop durable delivery until it rejoins."""
        sub.replay_buffer = None
        sub.durable_paused = True
        self._notice(sub, message, resume_after)

    def _notice(self, sub: Subscription, message: str, resume_after: int) -> None:
        sub.outbox.push(
            encode(
                sub.vsn,
                sub.join_ref,
                None,
                sub.wire_topic,
                "system",
                {
                    "channel": sub.topic.text,
                    "extension": "replay",
                    # "ok", not "error": realtime-py rejoins on a system
                    # error with the same replay, which would loop.
                    "status": "ok",
                    "message": message,
                    "resume_after": resume_after,
                },
            )
        )
