"""Broadcasts sent from the database (``realtime.send``), delivered to this
node's subscribers.

Every node hears them itself from its store's listener, so each delivers
them to its own subscribers only (through the engine every subscriber would
get one copy per node).  No I/O here.
"""

from __future__ import annotations

import logging

from hub.channels.fanout import Channels
from hub.channels.topics import InvalidTopic, parse_topic
from hub.protocol import MAX_BINARY_FIELD, Broadcast, is_event_name
from hub.store.base import DatabaseBroadcast

log = logging.getLogger(__name__)


def deliver_database_broadcast(channels: Channels, message: DatabaseBroadcast) -> None:
    """Deliver a broadcast sent from the database to this node's subscribers
    of its channel, as Supabase sends it: the event, the payload, and
    ``meta: {"id": <realtime.messages.id>}``.  A private one reaches only
    the private channel of a free name (whose subscribers passed the read
    check at join), a public one only the public channel.  A topic the hub
    cannot route is logged and dropped."""
    try:
        topic = parse_topic(message.topic, private=message.private)
    except InvalidTopic as exc:
        log.warning("dropping a database broadcast to %.100r: %s", message.topic, exc)
        return
    if topic.kind == "org" and topic.name is None:
        # The database makes these durable events (never a NOTIFY); an
        # org channel only carries its durable feed.
        log.warning("dropping a database broadcast to %s: not a durable event", topic.text)
        return
    if not is_event_name(message.event):
        log.warning(
            "dropping a database broadcast to %.100r: its event name is empty or longer "
            "than %d bytes",
            message.topic,
            MAX_BINARY_FIELD,
        )
        return
    channels.deliver(Broadcast(topic.key, message.event, message.payload, meta={"id": message.id}))
