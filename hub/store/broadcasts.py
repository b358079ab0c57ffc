"""Broadcast from the database: the NOTIFYs of ``hub_broadcasts`` turned
into :class:`~hub.store.base.DatabaseBroadcast` values, in order.

``hub.realtime_broadcast_relay()``, the trigger on ``realtime.messages``
(see ``migrations/0005_database_broadcast.sql``), sends one NOTIFY per
committed ``broadcast`` row whose topic is not an ``org:<id>`` topic (those
become durable org events instead), with the whole message
(``{"id", "topic", "event", "private", "payload"}``) or, when it would not
fit, only ``{"id", "topic", "inserted_at", "ref": true}``: the row is then
read from the table.

:class:`BroadcastRelay` gets the NOTIFY payloads from the store's LISTEN
connection (:mod:`hub.store.listener`).  The driver callback only parses
and queues; references are read by tasks, at most
``fetch_concurrency`` at a time, and one worker hands the messages on in
the order their NOTIFYs arrived (commit order).  The queue is bounded:
past ``queue_size`` waiting messages the newest are dropped, and logged.

Best effort, as in Supabase: a message whose NOTIFY arrives while nobody
listens (the LISTEN connection is being re-established) is lost, and so is
one whose row cannot be read.  Nothing is replayed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, Final

import orjson

from hub.store.base import DatabaseBroadcast
from hub.store.pgjson import loads

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


class BroadcastRelay:
    """Parses ``hub_broadcasts`` NOTIFYs and hands the messages to
    ``deliver`` in arrival order; references are resolved with ``fetch``.

    ``deliver`` runs on the event loop and must not block; what it raises is
    logged.  Constructing it does nothing; :meth:`start` starts the worker,
    :meth:`stop` ends it and the reads in flight.
    """

    def __init__(
        self,
        fetch: FetchBroadcast,
        deliver: Callable[[DatabaseBroadcast], None],
        *,
        queue_size: int = 10_000,
        fetch_concurrency: int = 2,
    ) -> None:
        self._fetch = fetch
        self._deliver = deliver
        self._queue: asyncio.Queue[DatabaseBroadcast | asyncio.Task[DatabaseBroadcast | None]] = (
            asyncio.Queue(queue_size)
        )
        self._reads = asyncio.Semaphore(fetch_concurrency)
        self._worker: asyncio.Task[None] | None = None
        #: Messages received (whole or by reference).
        self.received = 0
        #: Messages read from the table because their NOTIFY held a reference.
        self.fetched = 0
        #: Messages lost: queue full, malformed, or their row unreadable.
        self.dropped = 0

    def start(self) -> None:
        if self._worker is None:
            self._worker = asyncio.create_task(self._work_forever(), name="hub-db-broadcasts")

    async def stop(self) -> None:
        worker, self._worker = self._worker, None
        if worker is not None:
            worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await worker
        while not self._queue.empty():
            item = self._queue.get_nowait()
            if isinstance(item, asyncio.Task):
                item.cancel()

    def on_notify(self, text: str) -> None:
        """A NOTIFY payload of :data:`BROADCAST_CHANNEL` (driver callback:
        parse and hand off only)."""
        self.received += 1
        try:
            parsed = parse_broadcast(text)
        except (ValueError, KeyError, TypeError):
            self.dropped += 1
            log.error("ignoring a malformed database broadcast: %.200s", text)
            return
        if self._queue.full():
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 1000 == 0:
                log.warning(
                    "database broadcasts are arriving faster than they are delivered: "
                    "%d dropped so far",
                    self.dropped,
                )
            return
        if isinstance(parsed, DatabaseBroadcast):
            self._queue.put_nowait(parsed)
        else:
            self._queue.put_nowait(
                asyncio.create_task(self._read(*parsed), name="hub-db-broadcast-read")
            )

    async def _read(self, message_id: str, inserted_at: str) -> DatabaseBroadcast | None:
        async with self._reads:
            return await self._fetch(message_id, inserted_at)

    async def _work_forever(self) -> None:
        while True:
            item = await self._queue.get()
            if isinstance(item, asyncio.Task):
                try:
                    message = await item
                except Exception as exc:
                    self.dropped += 1
                    log.warning("cannot read a database broadcast from realtime.messages: %r", exc)
                    continue
                if message is None:
                    self.dropped += 1
                    log.warning("a database broadcast's row is gone from realtime.messages")
                    continue
                self.fetched += 1
            else:
                message = item
            try:
                self._deliver(message)
            except Exception:
                log.exception("database broadcast callback failed for %.100r", message.topic)
