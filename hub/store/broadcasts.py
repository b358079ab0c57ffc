"""Broadcast from the database: the NOTIFYs of ``hub_broadcasts`` turned
into :class:`~hub.store.base.DatabaseBroadcast` values, in order.

``hub.realtime_broadcast_relay()``, the trigger on ``realtime.messages``
(see ``migrations/0005_database_broadcast.sql``), sends one NOTIFY per
committed ``broadcast`` row whose topic is not an ``org:<id>`` topic (those
become durable org events instead), with the whole message
(``{"id", "topic", "event", "private", "payload"}``) or, when it would not
fit, only ``{"id", "topic", "inserted_at", "ref": true}``: the row is then
read from the table.

:func:`broadcast_relay` makes the :class:`~hub.store.relay.NotifyRelay`
that gets the NOTIFY payloads from the store's LISTEN connection
(:mod:`hub.store.listener`) and hands the messages on in commit order,
bounded, reading references from the table.

Best effort, as in Supabase: a message whose NOTIFY arrives while nobody
listens (the LISTEN connection is being re-established) is lost, and so is
one whose row cannot be read.  Nothing is replayed.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, Final

import orjson

from hub.store.base import DatabaseBroadcast
from hub.store.pgjson import loads
from hub.store.relay import NotifyRelay, Reference, RelayNames

log = logging.getLogger(__name__)

#: The NOTIFY channel ``hub.realtime_broadcast_relay()`` announces on.
BROADCAST_CHANNEL: Final = "hub_broadcasts"

#: Reads the message a reference names: ``(id, inserted_at)`` -> the
#: message, or None when the row is gone.
FetchBroadcast = Callable[[str, str], Awaitable[DatabaseBroadcast | None]]


def _encode(value: Any) -> bytes:
    try:
        return orjson.dumps(value)
    except TypeError:
        # Integers past 64 bits (pgjson.loads read them with json).
        return json.dumps(value, separators=(",", ":")).encode()


def parse_broadcast(text: str) -> DatabaseBroadcast | tuple[str, str]:
    """The message a NOTIFY carries, or ``(id, inserted_at)`` for a
    reference.  Raises ValueError, KeyError or TypeError for anything else."""
    data = loads(text)
    if not isinstance(data, dict):
        raise TypeError("a notification is a JSON object")
    message_id, topic = data["id"], data["topic"]
    if not isinstance(message_id, str | int) or not isinstance(topic, str):
        raise TypeError("id and topic must be a string (or integer) and a string")
    if data.get("ref"):
        inserted_at = data["inserted_at"]
        if not isinstance(inserted_at, str):
            raise TypeError("inserted_at must be a string")
        return str(message_id), inserted_at
    event = data["event"]
    if not isinstance(event, str):
        raise TypeError("event must be a string")
    return DatabaseBroadcast(
        id=str(message_id),
        topic=topic,
        event=event,
        private=bool(data.get("private")),
        payload=_encode(data.get("payload")),
    )


def key_of(message_id: str) -> uuid.UUID | int:
    """The id as the driver takes it for ``realtime.messages.id``: a uuid
    (Supabase's current schema) or a bigint (an older one)."""
    try:
        return uuid.UUID(message_id)
    except ValueError:
        return int(message_id)


def _parse(text: str) -> DatabaseBroadcast | Reference[tuple[str, str]]:
    parsed = parse_broadcast(text)
    return Reference(parsed) if isinstance(parsed, tuple) else parsed


def broadcast_relay(
    fetch: FetchBroadcast, deliver: Callable[[DatabaseBroadcast], None]
) -> NotifyRelay[DatabaseBroadcast, tuple[str, str]]:
    """The relay of :data:`BROADCAST_CHANNEL`: references are read with
    ``fetch(id, inserted_at)``."""
    return NotifyRelay(
        _parse,
        lambda key: fetch(*key),
        deliver,
        names=RelayNames("database broadcast", "realtime.messages", "hub-db-broadcasts"),
        label=lambda message: message.topic,
    )
