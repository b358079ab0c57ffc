"""The PostgreSQL event store: durable events, gap-free per-org seqs, and
live announcements through LISTEN/NOTIFY.

Writes and reads go through a connection pool; ``hub.append_event()`` (see
``migrations/0001_events.sql``) takes each org's next seq under a row lock
held until commit, so seqs are gap-free and commit in seq order, and sends a
NOTIFY on channel ``hub_events`` with the whole event, or with only
``{"org", "seq", "ref": true}`` when the event would not fit.

One dedicated connection (never from the pool) LISTENs.  The driver's
callbacks only hand off to a queue; one task (the *announcer*) turns
notifications into announcements and another (the *supervisor*) keeps the
connection alive.  Per org, the callback sees every event once, in seq
order, without gaps:

* a notification whose seq is not the next one first reads the missing
  events from the table (they committed before it, thanks to the row lock);
* a seq already announced is dropped;
* when the connection dies (terminated backend, restart, or a silent death
  that only the supervisor's liveness query notices), the supervisor
  reconnects with bounded exponential backoff and re-LISTENs, and the
  announcer then *catches up*: every org whose ``hub.org_seq`` is ahead of
  the last seq announced is read from the table.  A catch-up is also how an
  overflow of the notification queue or a failed read is repaired.

What counts as "already announced" at start: ``start()`` reads every org's
current seq before it LISTENs, and announces only what commits afterwards;
history is never replayed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import uuid
from collections.abc import Sequence
from typing import Any, Final

import asyncpg  # type: ignore[import-untyped, unused-ignore]
import orjson

from hub.store.base import (
    MAX_READ,
    EventKind,
    EventStore,
    StoredEvent,
    StoreError,
    check_append,
    encode_event,
)

log = logging.getLogger(__name__)

#: The NOTIFY channel ``hub.append_event()`` announces on.
CHANNEL: Final = "hub_events"
#: Seconds ``stop()`` waits for each step (tasks, pool) before forcing it.
STOP_TIMEOUT: Final = 5.0

_COLUMNS: Final = "org, seq, id, kind, type, payload, created_at"
_APPEND_SIGNATURE: Final = "hub.append_event(text, text, text, jsonb)"
# The payload travels as JSON text, serialised by append() itself so that a
# payload that is not JSON fails with TypeError before any I/O.
_APPEND: Final = f"SELECT {_COLUMNS} FROM hub.append_event($1, $2, $3, $4::text::jsonb)"
_READ: Final = (
    f"SELECT {_COLUMNS} FROM hub.events WHERE org = $1 AND seq > $2 ORDER BY seq LIMIT $3"
)
_READ_SINCE: Final = (
    f"SELECT {_COLUMNS} FROM hub.events WHERE org = $1 AND created_at >= to_timestamp($2) "
    "ORDER BY seq LIMIT $3"
)


class _Wake:
    """Queue item that only wakes the announcer (a catch-up is pending)."""


_WAKE: Final = _Wake()


def _loads(text: str | bytes) -> Any:
    """Decode JSON from PostgreSQL.  orjson is fast but refuses numbers out
    of double range, which ``numeric`` columns of a tracked table can hold."""
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return json.loads(text)


def _dumps(value: Any) -> str:
    return orjson.dumps(value).decode()


async def _init_connection(conn: asyncpg.Connection) -> None:
    for name in ("json", "jsonb"):
        await conn.set_type_codec(
            name, schema="pg_catalog", encoder=_dumps, decoder=_loads, format="text"
        )


def _event_from_row(row: asyncpg.Record) -> StoredEvent:
    return StoredEvent(
        org=row["org"],
        seq=row["seq"],
        id=str(row["id"]),
        type=row["type"],
        payload=row["payload"],
        created_at=row["created_at"].timestamp(),
        kind=row["kind"],
    )


def _parse_notification(text: str) -> StoredEvent | tuple[str, int]:
    """The event a notification carries, or ``(org, seq)`` for a reference.
    Raises ValueError, KeyError or TypeError for anything else."""
    data = _loads(text)
    org, seq = data["org"], data["seq"]
    if not isinstance(org, str) or not isinstance(seq, int):
        raise TypeError("org and seq must be a string and an integer")
    if data.get("ref"):
        return org, seq
    if data["kind"] not in ("event", "change"):
        raise ValueError(f"unknown kind {data['kind']!r}")
    return StoredEvent(
        org=org,
        seq=seq,
        id=str(data["id"]),
        type=str(data["type"]),
        payload=data["payload"],
        created_at=float(data["created_at"]),
        kind=data["kind"],
    )


class PostgresStore(EventStore):
    """The event store in the ``hub`` schema of the database at ``dsn``.

    ``listen_dsn`` (default ``dsn``) is where the LISTEN connection goes: a
    transaction-pooling proxy such as PgBouncer cannot carry LISTEN.
    ``application_name`` prefixes the ``application_name`` of every
    connection (``"<name> store"`` for the pool, ``"<name> listen"`` for the
    listener) so operators can tell them apart in ``pg_stat_activity``.

    The listener checks its connection with a query every
    ``liveness_interval`` seconds and gives it ``liveness_timeout`` seconds to
    answer; reconnect attempts wait ``reconnect_min`` doubling up to
    ``reconnect_max`` seconds (with jitter).
    """

    def __init__(
        self,
        dsn: str,
        *,
        pool_min: int = 1,
        pool_max: int = 10,
        listen_dsn: str | None = None,
        application_name: str = "hub",
        liveness_interval: float = 5.0,
        liveness_timeout: float = 3.0,
        reconnect_min: float = 0.05,
        reconnect_max: float = 5.0,
        queue_size: int = 100_000,
    ) -> None:
        super().__init__()
        self._dsn = dsn
        self._listen_dsn = listen_dsn or dsn
        self._pool_min = pool_min
        self._pool_max = pool_max
        self._app_name = application_name
        self._liveness_interval = liveness_interval
        self._liveness_timeout = liveness_timeout
        self._reconnect_min = reconnect_min
        self._reconnect_max = reconnect_max

        self._pool: asyncpg.Pool | None = None
        self._listener: asyncpg.Connection | None = None
        self._listening = False
        self._lost = asyncio.Event()
        self._queue: asyncio.Queue[str | _Wake] = asyncio.Queue(queue_size)
        self._tasks: list[asyncio.Task[None]] = []
        #: The last seq announced per org (or known at start, see module doc).
        self._last: dict[str, int] = {}
        # A catch-up is pending while requested > done.  Counters rather than
        # a flag, so a request made during a catch-up is not lost.
        self._catch_up_requested = 0
        self._catch_up_done = 0

        #: Successful reconnects of the LISTEN connection (not the first connect).
        self.listener_reconnects = 0
        #: Notifications received on the LISTEN connection.
        self.notifications = 0
        #: Notifications that carried only a reference, resolved by a read.
        self.fetched_by_key = 0
        #: Events announced from the table rather than from their notification
        #: (gaps filled, catch-ups after reconnects or overflows).
        self.recovered = 0

    # -- lifecycle ---------------------------------------------------------

    async def start(self) -> None:
        """Open the pool and the LISTEN connection, then announce from now on.

        Raises StoreError when the schema is missing (run ``hub migrate``), and
        the driver's exceptions when the database is unreachable.
        """
        if self._pool is not None:
            raise StoreError("store already started")
        pool = await asyncpg.create_pool(
            self._dsn,
            min_size=self._pool_min,
            max_size=self._pool_max,
            init=_init_connection,
            server_settings={"application_name": f"{self._app_name} store"},
        )
        try:
            async with pool.acquire() as conn:
                if await conn.fetchval("SELECT to_regprocedure($1)", _APPEND_SIGNATURE) is None:
                    raise StoreError("the hub schema is missing: run `hub migrate` first")
                # Everything committed so far counts as announced: only what
                # commits after this read is announced (catch-up covers the
                # moment between this read and LISTEN).
                rows = await conn.fetch("SELECT org, seq FROM hub.org_seq")
            self._last = {row["org"]: row["seq"] for row in rows}
            self._pool = pool
            await self._connect_listener()
        except BaseException:
            self._pool = None
            await pool.close()
            raise
        self._request_catch_up()
        self._tasks = [
            asyncio.create_task(self._announce_forever(), name="hub-store-announcer"),
            asyncio.create_task(self._supervise_forever(), name="hub-store-listener"),
        ]

    async def stop(self) -> None:
        """Stop announcing, close the listener and the pool."""
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        stuck: set[asyncio.Task[None]] = set()
        if tasks:
            # Bounded: a task cancelled inside a pooled query waits for
            # asyncpg to release the connection, which waits for the
            # server to confirm the cancel and can take forever on a sick
            # server.  Terminating the pool below unblocks it.
            _, stuck = await asyncio.wait(tasks, timeout=STOP_TIMEOUT)
            if stuck:
                log.warning("store tasks still stopping after %.0f s; terminating", STOP_TIMEOUT)
        await self._close_listener()
        pool, self._pool = self._pool, None
        if pool is not None:
            if stuck:
                pool.terminate()
            else:
                try:
                    await asyncio.wait_for(pool.close(), STOP_TIMEOUT)
                except TimeoutError:
                    pool.terminate()
        if stuck:
            await asyncio.wait(stuck, timeout=STOP_TIMEOUT)

    @property
    def ready(self) -> bool:
        """True while the listener is connected and no catch-up is pending."""
        return self._listening and self._catch_up_done >= self._catch_up_requested

    @property
    def listener_pid(self) -> int | None:
        """The server process id of the LISTEN connection, if connected."""
        conn = self._listener
        if conn is None or conn.is_closed():
            return None
        return int(conn.get_server_pid())

    # -- reads and writes --------------------------------------------------

    def _require_pool(self) -> asyncpg.Pool:
        if self._pool is None:
            raise StoreError("store not started")
        return self._pool

    async def append(
        self, org: str, events: Sequence[tuple[str, Any]], *, kind: EventKind = "event"
    ) -> list[StoredEvent]:
        """Append the events in one transaction: all or none are stored.

        Raises StoreError for a bad org, kind, type or payload text and
        TypeError for a payload that is not JSON-serialisable (both before
        any I/O, see :func:`~hub.store.base.encode_event`), and the driver's
        exceptions when the database fails.
        """
        check_append(org, kind)
        if not events:
            return []
        args = [
            (org, kind, type_, encode_event(type_, payload).decode()) for type_, payload in events
        ]
        try:
            async with self._require_pool().acquire() as conn, conn.transaction():
                rows = await conn.fetchmany(_APPEND, args)
        except asyncpg.DataError as exc:
            # Whatever the checks above missed (class 22: data exceptions).
            raise StoreError(f"the database refused the events: {exc}") from None
        return [_event_from_row(row) for row in rows]

    async def read(self, org: str, *, after: int = 0, limit: int = 100) -> list[StoredEvent]:
        limit = min(limit, MAX_READ)
        if limit <= 0:
            return []
        rows = await self._require_pool().fetch(_READ, org, after, limit)
        return [_event_from_row(row) for row in rows]

    async def read_since(self, org: str, *, since: float, limit: int = 100) -> list[StoredEvent]:
        limit = min(limit, MAX_READ)
        if limit <= 0:
            return []
        rows = await self._require_pool().fetch(_READ_SINCE, org, since, limit)
        return [_event_from_row(row) for row in rows]

    async def orgs(self) -> list[str]:
        rows = await self._require_pool().fetch("SELECT org FROM hub.org_seq")
        return [row["org"] for row in rows]

    async def last_seq(self, org: str) -> int:
        seq = await self._require_pool().fetchval("SELECT seq FROM hub.org_seq WHERE org = $1", org)
        return int(seq) if seq is not None else 0

    async def seq_of(self, org: str, event_id: str) -> int | None:
        try:
            uuid.UUID(event_id)
        except ValueError:
            return None
        seq = await self._require_pool().fetchval(
            "SELECT seq FROM hub.events WHERE org = $1 AND id = $2::uuid", org, event_id
        )
        return int(seq) if seq is not None else None

    async def first_seq(self, org: str) -> int:
        seq = await self._require_pool().fetchval(
            "SELECT seq FROM hub.events WHERE org = $1 ORDER BY seq LIMIT 1", org
        )
        return int(seq) if seq is not None else 0

    # -- the LISTEN connection ---------------------------------------------

    def _on_notify(self, conn: Any, pid: int, channel: str, payload: str) -> None:
        # Driver callback: hand off only.
        self.notifications += 1
        try:
            self._queue.put_nowait(payload)
        except asyncio.QueueFull:
            # The announcer is far behind: drop the notification, the
            # catch-up will read the event from the table.
            self._request_catch_up()

    def _on_terminate(self, conn: Any) -> None:
        # Driver callback: hand off only.
        if conn is self._listener:
            self._listening = False
            self._lost.set()

    def _request_catch_up(self) -> None:
        self._catch_up_requested += 1
        with contextlib.suppress(asyncio.QueueFull):
            self._queue.put_nowait(_WAKE)

    async def _connect_listener(self) -> None:
        conn = await asyncpg.connect(
            self._listen_dsn,
            server_settings={"application_name": f"{self._app_name} listen"},
            timeout=max(self._liveness_timeout, 5.0),
        )
        try:
            self._lost.clear()
            self._listener = conn
            conn.add_termination_listener(self._on_terminate)
            await asyncio.wait_for(
                conn.add_listener(CHANNEL, self._on_notify), max(self._liveness_timeout, 5.0)
            )
        except BaseException:
            self._listener = None
            conn.terminate()
            raise
        self._listening = True

    async def _close_listener(self) -> None:
        conn, self._listener = self._listener, None
        self._listening = False
        if conn is None or conn.is_closed():
            return
        try:
            await asyncio.wait_for(conn.close(), 2)
        except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
            conn.terminate()

    def _drop_listener(self) -> None:
        # A dead connection is not closed politely: that could hang.
        conn, self._listener = self._listener, None
        self._listening = False
        if conn is not None and not conn.is_closed():
            conn.terminate()

    async def _supervise_forever(self) -> None:
        while True:
            await self._watch_listener()
            log.warning("LISTEN connection lost; reconnecting")
            self._drop_listener()
            await self._reconnect()
            self.listener_reconnects += 1
            # Whatever committed while nobody listened is read from the table.
            self._request_catch_up()
            log.info("LISTEN connection restored")

    async def _watch_listener(self) -> None:
        """Return when the LISTEN connection is dead or does not answer."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._lost.wait(), self._liveness_interval)
                return
            conn = self._listener
            if conn is None or conn.is_closed():
                return
            try:
                await asyncio.wait_for(conn.fetchval("SELECT 1"), self._liveness_timeout)
            except Exception as exc:
                log.warning("LISTEN connection failed its liveness check: %r", exc)
                self._listening = False
                return

    async def _reconnect(self) -> None:
        delay = self._reconnect_min
        while True:
            await asyncio.sleep(delay * random.uniform(0.8, 1.2))
            try:
                await self._connect_listener()
                return
            except Exception as exc:
                log.warning("cannot reconnect the LISTEN connection: %r", exc)
            delay = min(delay * 2, self._reconnect_max)

    # -- turning notifications into announcements ---------------------------

    async def _announce_forever(self) -> None:
        delay = self._reconnect_min
        while True:
            if self._catch_up_done < self._catch_up_requested:
                requested = self._catch_up_requested
                try:
                    await self._catch_up()
                except Exception:
                    log.exception("catch-up failed; retrying in %.2fs", delay)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, self._reconnect_max)
                    continue
                delay = self._reconnect_min
                self._catch_up_done = requested
            item = await self._queue.get()
            if isinstance(item, _Wake):
                continue
            try:
                event = _parse_notification(item)
            except (ValueError, KeyError, TypeError):
                log.error("ignoring a malformed notification: %.200s", item)
                continue
            try:
                await self._handle(event)
            except Exception:
                # A catch-up repairs whatever this left undone.
                log.exception("cannot resolve a notification; catching up instead")
                self._request_catch_up()

    async def _handle(self, event: StoredEvent | tuple[str, int]) -> None:
        """Announce a notified event (or a reference to one) after any
        missing predecessors; drop it if it was announced already."""
        org, seq = (event.org, event.seq) if isinstance(event, StoredEvent) else event
        last = self._last.get(org, 0)
        if seq <= last:
            return
        if not isinstance(event, StoredEvent):
            self.fetched_by_key += 1
            await self._fill(org, seq, notified=seq)
            return
        if seq > last + 1:
            await self._fill(org, seq - 1)
        self._announce(event)

    async def _fill(self, org: str, upto: int, *, notified: int = 0) -> None:
        """Announce the events of ``org`` after the last announced, up to
        ``upto``, from the table.  ``notified`` is the seq whose notification
        asked for this read (it does not count as recovered)."""
        while (last := self._last.get(org, 0)) < upto:
            events = await self.read(org, after=last, limit=min(upto - last, MAX_READ))
            events = [event for event in events if event.seq <= upto]
            if not events:
                # Only a deleted event can cause this; do not spin on it.
                log.error("events %s %d..%d are missing from hub.events", org, last + 1, upto)
                self._last[org] = upto
                return
            for event in events:
                if event.seq != notified:
                    self.recovered += 1
                self._announce(event)

    async def _catch_up(self) -> None:
        rows = await self._require_pool().fetch("SELECT org, seq FROM hub.org_seq")
        for row in rows:
            org, seq = row["org"], row["seq"]
            if seq > self._last.get(org, 0):
                await self._fill(org, seq)

    def _announce(self, event: StoredEvent) -> None:
        self._last[event.org] = event.seq
        if self._on_event is None:
            return
        try:
            self._on_event(event)
        except Exception:
            log.exception("event callback failed for %s seq %d", event.org, event.seq)
