"""The PostgreSQL event store: durable events in the ``hub`` schema,
gap-free per-org seqs, reads and writes through a connection pool.

``hub.append_event()`` (see ``migrations/0001_events.sql``) takes each org's
next seq under a row lock held until commit, so seqs are gap-free and commit
in seq order, and sends a NOTIFY for every event.  The store owns a
:class:`~hub.store.listener.Listener`, which LISTENs on its own connection
and turns those NOTIFYs into announcements (see :mod:`hub.store.listener`
for the ordering guarantees, gap fills and catch-ups).

The same LISTEN connection carries the broadcasts sent from the database
(``realtime.send()``, see ``migrations/0005_database_broadcast.sql``): a
:func:`~hub.store.broadcasts.broadcast_relay` hands them to the callback of
:meth:`~hub.store.base.EventStore.listen_broadcasts`, best effort.  It also
carries the row changes of tables tracked without an org column
(``migrations/0006_orgless_changes.sql``): a
:func:`~hub.store.rowchanges.change_relay` hands them to the callback of
:meth:`~hub.store.base.EventStore.listen_changes`, best effort.

Supabase's switch, the publication ``supabase_realtime``, is followed by
polling: once a second the store calls ``hub.sync_realtime_publication()``,
which tracks (without an org column) the tables added to the publication
and untracks those removed, so ``alter publication supabase_realtime add
table todos`` takes effect within about a second, with no hub command and
no restart.  Polling rather than an event trigger: creating an event
trigger needs a superuser, which the hub's role on a Supabase database is
not.  The same poll tracks the tables of per-org schemas created since
(``hub track --org-from-schema``, see :mod:`hub.store.tracking`) where no
event trigger did it already, and prunes ``hub.change_overflow``.

Another task keeps the event log's daily partitions and its retention
(:mod:`hub.store.retention`): at start and every 10 minutes.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

import asyncpg  # type: ignore[import-untyped, unused-ignore]

from hub.store import retention
from hub.store.base import (
    MAX_READ,
    DatabaseBroadcast,
    EventKind,
    EventStore,
    StoredEvent,
    StoreError,
    Table,
    check_append,
    encode_event,
)
from hub.store.broadcasts import BROADCAST_CHANNEL, broadcast_relay, key_of
from hub.store.listener import Listener
from hub.store.pgjson import dumps, loads
from hub.store.rowchanges import CHANGES_CHANNEL, change_relay, check_change
from hub.store.tracking import TRACKED_TABLES, TRIGGERS

log = logging.getLogger(__name__)

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
_ORG_SEQS: Final = "SELECT org, seq FROM hub.org_seq"
#: A fresh read of the tracked tables reuses one at most this old (s): a
#: client joining bindings on untracked tables in a loop costs a query per
#: this much time, not per join.
TABLES_FRESH: Final = 0.1
#: How often the publication supabase_realtime is followed (seconds).
PUBLICATION_INTERVAL: Final = 1.0
#: Changes too large for their NOTIFY are kept this long (seconds) for
#: every node to read them back, then pruned.
OVERFLOW_RETENTION: Final = 300.0
_READ_CHANGE: Final = "SELECT change::text FROM hub.change_overflow WHERE id = $1"
_PRUNE_OVERFLOW: Final = (
    "DELETE FROM hub.change_overflow WHERE created_at < now() - make_interval(secs => $1)"
)

#: A database broadcast too large for its NOTIFY, by its key.  $1 takes the
#: id column's type (uuid, or bigint in an older Supabase schema).
_READ_BROADCAST: Final = (
    "SELECT id::text AS id, topic, event, coalesce(private, false) AS private, "
    "payload::text AS payload FROM realtime.messages "
    "WHERE id = $1 AND inserted_at = $2::text::timestamp AND extension = 'broadcast'"
)

#: A private channel's replay (Supabase's ``broadcast.replay``): the kept
#: broadcasts of one topic since a time, oldest first.
_READ_MESSAGES: Final = (
    "SELECT id::text AS id, topic, event, coalesce(private, false) AS private, "
    "payload::text AS payload FROM realtime.messages "
    "WHERE topic = $1 AND private = $2 AND extension = 'broadcast' AND event IS NOT NULL "
    "AND inserted_at >= (to_timestamp($3) AT TIME ZONE 'UTC') ORDER BY inserted_at LIMIT $4"
)


async def _init_connection(conn: asyncpg.Connection) -> None:
    for name in ("json", "jsonb"):
        await conn.set_type_codec(
            name, schema="pg_catalog", encoder=dumps, decoder=loads, format="text"
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

    ``retention`` (seconds, None: keep all) and ``archive_dir`` drive the
    event log's maintenance (:mod:`hub.store.retention`).  ``announced`` is
    the listener's record of the last seq announced per org, shared by the
    stores of one node's databases (:mod:`hub.store.federation`).  Pool
    connections idle for ``pool_idle`` seconds are closed.
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
        publication_interval: float = PUBLICATION_INTERVAL,
        retention: float | None = None,
        archive_dir: str | None = None,
        maintenance_interval: float = retention.MAINTENANCE_INTERVAL,
        announced: dict[str, int] | None = None,
        pool_idle: float = 300.0,
    ) -> None:
        super().__init__()
        self._dsn = dsn
        self._pool_min = pool_min
        self._pool_max = pool_max
        self._app_name = application_name
        self._pool: asyncpg.Pool | None = None
        self._listener = Listener(
            listen_dsn or dsn,
            application_name=f"{application_name} listen",
            liveness_interval=liveness_interval,
            liveness_timeout=liveness_timeout,
            reconnect_min=reconnect_min,
            reconnect_max=reconnect_max,
            queue_size=queue_size,
            read=self.read,
            org_seqs=self._org_seqs,
            deliver=self._deliver,
            also={BROADCAST_CHANNEL: self._relay_notify, CHANGES_CHANNEL: self._change_notify},
            announced=announced,
        )
        self._pool_idle = pool_idle
        self._relay = broadcast_relay(self._read_broadcast, self._deliver_broadcast)
        self._changes = change_relay(self._read_change, self._deliver_change)
        self._publication_interval = publication_interval
        self._publication: asyncio.Task[None] | None = None
        self._tables: frozenset[Table] | None = None
        self._tables_at = -math.inf
        self._tables_lock = asyncio.Lock()
        self._retention = retention
        self._archive_dir = Path(archive_dir) if archive_dir else None
        self._maintenance_interval = maintenance_interval
        self._maintenance: asyncio.Task[None] | None = None

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
            max_inactive_connection_lifetime=self._pool_idle,
            server_settings={"application_name": f"{self._app_name} store"},
        )
        try:
            async with pool.acquire() as conn:
                if await conn.fetchval("SELECT to_regprocedure($1)", _APPEND_SIGNATURE) is None:
                    raise StoreError("the hub schema is missing: run `hub migrate` first")
                # Everything committed so far counts as announced: only what
                # commits after this read is announced (catch-up covers the
                # moment between this read and LISTEN).
                rows = await conn.fetch(_ORG_SEQS)
            self._pool = pool
            self._relay.start()
            self._changes.start()
            await self._listener.start({row["org"]: row["seq"] for row in rows})
        except BaseException:
            self._pool = None
            await self._relay.stop()
            await self._changes.stop()
            await pool.close()
            raise
        self._publication = asyncio.create_task(self._follow_publication(), name="hub-publication")
        self._maintenance = asyncio.create_task(self._maintain(), name="hub-retention")

    async def stop(self) -> None:
        """Stop announcing, close the listener and the pool."""
        # Bounded: a listener task cancelled inside a pooled query waits for
        # asyncpg to release the connection, which waits for the server to
        # confirm the cancel and can take forever on a sick server.
        # Terminating the pool below unblocks it.
        tasks = {t for t in (self._publication, self._maintenance) if t is not None}
        self._publication = self._maintenance = None
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=STOP_TIMEOUT)
        stuck = await self._listener.stop(STOP_TIMEOUT)
        try:
            await asyncio.wait_for(self._relay.stop(), STOP_TIMEOUT)
        except TimeoutError:
            log.warning("database broadcasts still stopping after %.0f s", STOP_TIMEOUT)
        try:
            await asyncio.wait_for(self._changes.stop(), STOP_TIMEOUT)
        except TimeoutError:
            log.warning("row changes still stopping after %.0f s", STOP_TIMEOUT)
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
        return self._listener.ready

    @property
    def listener_pid(self) -> int | None:
        """The server process id of the LISTEN connection, if connected."""
        return self._listener.pid

    @property
    def listener_reconnects(self) -> int:
        """Successful reconnects of the LISTEN connection (not the first connect)."""
        return self._listener.reconnects

    @property
    def notifications(self) -> int:
        """Notifications received on the LISTEN connection."""
        return self._listener.notifications

    @property
    def fetched_by_key(self) -> int:
        """Notifications that carried only a reference, resolved by a read."""
        return self._listener.fetched_by_key

    @property
    def broadcasts_received(self) -> int:
        """Broadcasts from the database received (whole or by reference)."""
        return self._relay.received

    @property
    def broadcasts_fetched(self) -> int:
        """Broadcasts from the database read from realtime.messages because
        they did not fit their NOTIFY."""
        return self._relay.fetched

    @property
    def broadcasts_dropped(self) -> int:
        """Broadcasts from the database lost (queue full, malformed, row
        unreadable)."""
        return self._relay.dropped

    @property
    def recovered(self) -> int:
        """Events announced from the table rather than from their notification
        (gaps filled, catch-ups after reconnects or overflows)."""
        return self._listener.recovered

    # -- reads and writes --------------------------------------------------

    async def read_messages(
        self, topic: str, *, private: bool, since: float, limit: int
    ) -> list[DatabaseBroadcast]:
        rows = await self._require_pool().fetch(_READ_MESSAGES, topic, private, since, limit)
        return [
            DatabaseBroadcast(
                id=row["id"],
                topic=row["topic"],
                event=row["event"],
                private=row["private"],
                payload=(row["payload"] or "{}").encode(),
            )
            for row in rows
        ]

    @property
    def pool(self) -> asyncpg.Pool:
        """The started store's pool (the registry and moves use it)."""
        return self._require_pool()

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

    # -- what the listener needs --------------------------------------------

    async def _org_seqs(self) -> dict[str, int]:
        """Every org's current seq."""
        rows = await self._require_pool().fetch(_ORG_SEQS)
        return {row["org"]: row["seq"] for row in rows}

    def _deliver(self, event: StoredEvent) -> None:
        if self._on_event is None:
            return
        try:
            self._on_event(event)
        except Exception:
            log.exception("event callback failed for %s seq %d", event.org, event.seq)

    # -- broadcasts from the database ----------------------------------------

    def _relay_notify(self, payload: str) -> None:
        self._relay.on_notify(payload)

    async def _read_broadcast(self, message_id: str, inserted_at: str) -> DatabaseBroadcast | None:
        row = await self._require_pool().fetchrow(_READ_BROADCAST, key_of(message_id), inserted_at)
        if row is None or row["event"] is None:
            return None
        payload = row["payload"]
        return DatabaseBroadcast(
            id=row["id"],
            topic=row["topic"],
            event=row["event"],
            private=row["private"],
            payload=payload.encode() if payload is not None else b"null",
        )

    def _deliver_broadcast(self, message: DatabaseBroadcast) -> None:
        if self._on_broadcast is not None:
            self._on_broadcast(message)

    # -- tables tracked without an org column ----------------------------------

    @property
    def changes_received(self) -> int:
        """Row changes of tables tracked without an org column received."""
        return self._changes.received

    @property
    def changes_dropped(self) -> int:
        """Such row changes lost (queue full, malformed, overflow row gone)."""
        return self._changes.dropped

    def _change_notify(self, payload: str) -> None:
        self._changes.on_notify(payload)

    async def _read_change(self, change_id: int) -> dict[str, Any] | None:
        text = await self._require_pool().fetchval(_READ_CHANGE, change_id)
        if text is None:
            return None
        return check_change(loads(text))

    def _deliver_change(self, change: dict[str, Any]) -> None:
        if self._on_change is not None:
            self._on_change(change)

    @property
    def has_tables(self) -> bool:
        return True

    async def tracked_tables(self, fresh: bool = False) -> frozenset[Table] | None:
        """The tracked tables, read again when asked ``fresh`` or never read
        (the publication loop also reads them every interval)."""
        wanted = time.monotonic() - TABLES_FRESH if fresh else -math.inf
        if self._tables is None or self._tables_at < wanted:
            async with self._tables_lock:  # one read at a time serves all waiters
                if self._tables is None or self._tables_at < wanted:
                    await self._read_tables()
        return self._tables

    async def _read_tables(self) -> None:
        started = time.monotonic()
        rows = await self._require_pool().fetch(TRACKED_TABLES, list(TRIGGERS))
        self._tables = frozenset((str(row["schema"]), str(row["table"])) for row in rows)
        self._tables_at = started

    async def sync_publication(self) -> list[str]:
        """Track the tables of the publication supabase_realtime without an
        org column, untrack those that left it; track the tables of per-org
        schemas that appeared (or lost their trigger), untrack those no
        registration wants; return what changed."""
        pool = self._require_pool()
        rows = await pool.fetch("SELECT hub.sync_realtime_publication() AS line")
        rows += await pool.fetch("SELECT hub.sync_schema_tracking() AS line")
        return [str(row["line"]) for row in rows]

    async def _maintain(self) -> None:
        """At start and every ``maintenance_interval`` seconds: the coming
        days' partitions, and the retention (:mod:`hub.store.retention`).
        Its own task: archiving a partition may take minutes."""
        while True:
            try:
                async with self._require_pool().acquire() as conn:
                    for line in await retention.maintain(conn, self._retention, self._archive_dir):
                        log.log(
                            logging.WARNING if line.startswith("kept") else logging.INFO,
                            "event log: %s",
                            line,
                        )
            except Exception as exc:
                log.warning(
                    "event log maintenance failed (retried in %.0f s): %r",
                    self._maintenance_interval,
                    exc,
                )
            await asyncio.sleep(self._maintenance_interval)

    async def _follow_publication(self) -> None:
        """Every ``publication_interval`` seconds: follow the publication;
        about once a minute: prune hub.change_overflow.  Failures are logged
        and retried (the database may be down for a while)."""
        turns = 0
        failing = False
        while True:
            try:
                for line in await self.sync_publication():
                    log.info("%s", line)
                await self._read_tables()
                if turns % max(1, round(60 / self._publication_interval)) == 0:
                    await self._require_pool().execute(_PRUNE_OVERFLOW, OVERFLOW_RETENTION)
                failing = False
            except Exception as exc:
                # One line per outage, not one a second.
                if not failing:
                    log.warning("cannot follow the publication supabase_realtime: %r", exc)
                failing = True
            turns += 1
            await asyncio.sleep(self._publication_interval)
