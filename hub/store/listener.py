"""The LISTEN supervisor of :class:`~hub.store.postgres.PostgresStore`: it
turns the NOTIFYs of ``hub.append_event()`` into announcements, per org in
seq order, each once, without gaps, also across reconnects.

``hub.append_event()`` (see ``migrations/0001_events.sql``) sends a NOTIFY
on channel ``hub_events`` with the whole event, or with only
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

The same connection also LISTENs on the channels given as ``also`` (the
store's broadcasts from the database, see :mod:`hub.store.broadcasts`), and
re-LISTENs them on every reconnect.  Their payloads go straight to their
callbacks; they are best effort: what was notified while the connection was
down is lost (a reconnect logs it).

What counts as "already announced" at start: the store reads every org's
current seq before the listener LISTENs and hands it to :meth:`Listener.start`,
which announces only what commits afterwards; history is never replayed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Final, Protocol

import asyncpg  # type: ignore[import-untyped, unused-ignore]

from hub.store.base import MAX_READ, StoredEvent
from hub.store.pgjson import loads

log = logging.getLogger(__name__)

#: The NOTIFY channel ``hub.append_event()`` announces on.
CHANNEL: Final = "hub_events"


class ReadEvents(Protocol):
    """How the listener reads events from the table (the store's ``read``)."""

    async def __call__(
        self, org: str, *, after: int = 0, limit: int = 100
    ) -> list[StoredEvent]: ...


def _payload_only(callback: Callable[[str], None]) -> Callable[[Any, int, str, str], None]:
    """A driver notification callback that passes on only the payload."""

    def on_notify(conn: Any, pid: int, channel: str, payload: str) -> None:
        callback(payload)

    return on_notify


class _Wake:
    """Queue item that only wakes the announcer (a catch-up is pending)."""


_WAKE: Final = _Wake()


def _parse_notification(text: str) -> StoredEvent | tuple[str, int]:
    """The event a notification carries, or ``(org, seq)`` for a reference.
    Raises ValueError, KeyError or TypeError for anything else."""
    data = loads(text)
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


class Listener:
    """The LISTEN connection to ``dsn`` and the two tasks that drive it.

    ``read`` reads events from the table (gap fills, references, catch-ups),
    ``org_seqs`` reads every org's current seq (catch-ups), and ``deliver``
    hands an announced event on; it must not raise.  ``application_name`` is
    the connection's ``application_name``.  The connection is checked with a
    query every ``liveness_interval`` seconds and given ``liveness_timeout``
    seconds to answer; reconnect attempts (and retries of a failed catch-up)
    wait ``reconnect_min`` doubling up to ``reconnect_max`` seconds.  At most
    ``queue_size`` notifications wait for the announcer; more are dropped and
    repaired by a catch-up.  ``also`` maps other NOTIFY channels to the
    callback of their payloads (a driver callback: it must only hand off).

    Constructing it does nothing; :meth:`start` connects and starts the
    tasks, :meth:`stop` ends them.
    """

    def __init__(
        self,
        dsn: str,
        *,
        application_name: str,
        liveness_interval: float,
        liveness_timeout: float,
        reconnect_min: float,
        reconnect_max: float,
        queue_size: int,
        read: ReadEvents,
        org_seqs: Callable[[], Awaitable[dict[str, int]]],
        deliver: Callable[[StoredEvent], None],
        also: Mapping[str, Callable[[str], None]] | None = None,
        announced: dict[str, int] | None = None,
    ) -> None:
        self._dsn = dsn
        self._also = dict(also or {})
        self._app_name = application_name
        self._liveness_interval = liveness_interval
        self._liveness_timeout = liveness_timeout
        self._reconnect_min = reconnect_min
        self._reconnect_max = reconnect_max
        self._read = read
        self._org_seqs = org_seqs
        self._deliver = deliver

        self._conn: asyncpg.Connection | None = None
        self._listening = False
        self._lost = asyncio.Event()
        self._queue: asyncio.Queue[str | _Wake] = asyncio.Queue(queue_size)
        self._tasks: list[asyncio.Task[None]] = []
        #: The last seq announced per org (or known at start, see module doc).
        #: Shared by the listeners of every database of a node
        #: (``announced``): an org that moves between databases goes on from
        #: the seq the old database's listener announced, and an event both
        #: databases hold (copied by the move) is announced once.
        self._last: dict[str, int] = announced if announced is not None else {}
        # A catch-up is pending while requested > done.  Counters rather than
        # a flag, so a request made during a catch-up is not lost.
        self._catch_up_requested = 0
        self._catch_up_done = 0

        #: Successful reconnects of the LISTEN connection (not the first connect).
        self.reconnects = 0
        #: Notifications received on the LISTEN connection.
        self.notifications = 0
        #: Notifications that carried only a reference, resolved by a read.
        self.fetched_by_key = 0
        #: Events announced from the table rather than from their notification
        #: (gaps filled, catch-ups after reconnects or overflows).
        self.recovered = 0

    # -- lifecycle ---------------------------------------------------------

    async def start(self, last: dict[str, int]) -> None:
        """LISTEN, then announce what commits after the seqs in ``last``
        (every org's seq, read before this call).

        Raises the driver's exceptions when the connection fails; nothing is
        left running then.
        """
        for org, seq in last.items():
            if seq > self._last.get(org, 0):
                self._last[org] = seq
        await self._connect()
        self._request_catch_up()
        self._tasks = [
            asyncio.create_task(self._announce_forever(), name="hub-store-announcer"),
            asyncio.create_task(self._supervise_forever(), name="hub-store-listener"),
        ]

    async def stop(self, grace: float) -> set[asyncio.Task[None]]:
        """Cancel the tasks, waiting at most ``grace`` seconds for them,
        then close the connection.

        Returns the tasks still stopping: one cancelled inside a pooled query
        waits for asyncpg to release the connection, which waits for the
        server to confirm the cancel and can take forever on a sick server.
        The caller unblocks them by terminating the pool.
        """
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        stuck: set[asyncio.Task[None]] = set()
        if tasks:
            _, stuck = await asyncio.wait(tasks, timeout=grace)
            if stuck:
                log.warning("store tasks still stopping after %.0f s; terminating", grace)
        await self._close()
        return stuck

    @property
    def ready(self) -> bool:
        """True while the connection is up and no catch-up is pending."""
        return self._listening and self._catch_up_done >= self._catch_up_requested

    @property
    def pid(self) -> int | None:
        """The server process id of the LISTEN connection, if connected."""
        conn = self._conn
        if conn is None or conn.is_closed():
            return None
        return int(conn.get_server_pid())

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
        if conn is self._conn:
            self._listening = False
            self._lost.set()

    def _request_catch_up(self) -> None:
        self._catch_up_requested += 1
        with contextlib.suppress(asyncio.QueueFull):
            self._queue.put_nowait(_WAKE)

    async def _connect(self) -> None:
        conn = await asyncpg.connect(
            self._dsn,
            server_settings={"application_name": self._app_name},
            timeout=max(self._liveness_timeout, 5.0),
        )
        try:
            self._lost.clear()
            self._conn = conn
            conn.add_termination_listener(self._on_terminate)
            await asyncio.wait_for(
                conn.add_listener(CHANNEL, self._on_notify), max(self._liveness_timeout, 5.0)
            )
            for channel, callback in self._also.items():
                await asyncio.wait_for(
                    conn.add_listener(channel, _payload_only(callback)),
                    max(self._liveness_timeout, 5.0),
                )
        except BaseException:
            self._conn = None
            conn.terminate()
            raise
        self._listening = True

    async def _close(self) -> None:
        conn, self._conn = self._conn, None
        self._listening = False
        if conn is None or conn.is_closed():
            return
        try:
            await asyncio.wait_for(conn.close(), 2)
        except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
            conn.terminate()

    def _drop(self) -> None:
        # A dead connection is not closed politely: that could hang.
        conn, self._conn = self._conn, None
        self._listening = False
        if conn is not None and not conn.is_closed():
            conn.terminate()

    async def _supervise_forever(self) -> None:
        while True:
            await self._watch()
            log.warning("LISTEN connection lost; reconnecting")
            self._drop()
            await self._reconnect()
            self.reconnects += 1
            # Whatever committed while nobody listened is read from the table.
            self._request_catch_up()
            log.info("LISTEN connection restored")
            if self._also:
                log.warning(
                    "notifications on %s sent while the LISTEN connection was down are lost "
                    "(best effort, not replayed)",
                    ", ".join(sorted(self._also)),
                )

    async def _watch(self) -> None:
        """Return when the LISTEN connection is dead or does not answer."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._lost.wait(), self._liveness_interval)
                return
            conn = self._conn
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
                await self._connect()
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
            events = await self._read(org, after=last, limit=min(upto - last, MAX_READ))
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
        for org, seq in (await self._org_seqs()).items():
            if seq > self._last.get(org, 0):
                await self._fill(org, seq)

    def _announce(self, event: StoredEvent) -> None:
        # Checked here, not only before a read: while a read awaits, another
        # listener sharing `_last` (an org moving between databases, whose
        # events both hold) may announce some of what the read returns.
        # Subscribers rely on each event coming once and in order.
        if event.seq <= self._last.get(event.org, 0):
            return
        self._last[event.org] = event.seq
        self._deliver(event)
