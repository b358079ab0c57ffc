"""The event store of a network whose orgs live in several databases.

The control database (``HUB_DATABASE_URL``) holds the registry,
``hub.org_databases``: the orgs that live in a database of their own
(``hub orgs add``, :mod:`hub.store.registry`).  Every other org lives in the
control database.  :class:`FederatedStore` is one
:class:`~hub.store.base.EventStore` over all of them:

* every read and write of an org goes to the org's database, so an org's
  events never land in another org's database;
* each database has its own :class:`~hub.store.postgres.PostgresStore`: one
  dedicated LISTEN connection, a bounded pool (tenants: at most
  :data:`TENANT_POOL_MAX` connections, each closed after
  :data:`TENANT_POOL_IDLE` idle seconds, the publication and per-org
  schemas followed every :data:`TENANT_POLL_INTERVAL` seconds), its own
  maintenance (partitions, retention) and, through ``runner``, its own
  projection runner (one more connection, for its leader lock).  The listeners share one record of
  the last seq announced per org, so an org that moves between databases
  goes on from where the old one stopped and an event both hold (copied by
  the move) is announced once;
* the registry is read once a second: a node learns an org added, removed
  or moved within about a second, without a restart, and opens or closes
  the tenant databases accordingly;
* a tenant database that is down or slow harms only its orgs.  It is
  started in the background (retried with backoff), its orgs' reads and
  writes fail with :class:`~hub.store.base.StoreUnavailable` (HTTP 503)
  meanwhile, and its listener catches up from its log when it returns.
  The node stays ready: :meth:`databases` names the database that is
  unwell, for ``/readyz`` and the dashboard.

An append refused because the org is moving (SQLSTATE ``HB001``, set by
``hub orgs move`` while it copies the tail, :mod:`hub.store.moves`) is
retried every 50 ms against the registry until the org's new database
takes it, for at most :data:`MOVE_WAIT` seconds: writers through the hub
are blocked for the move's freeze, not failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Protocol, TypeVar

import asyncpg  # type: ignore[import-untyped, unused-ignore]

from hub.store.base import (
    DatabaseBroadcast,
    DatabaseState,
    EventKind,
    EventStore,
    StoredEvent,
    StoreUnavailable,
    Table,
)
from hub.store.postgres import PostgresStore
from hub.store.registry import ORG_MOVED, display_name, read_routes

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Seconds between two reads of the registry.
REGISTRY_INTERVAL: Final = 1.0
#: Longest time an append waits for a moving org's new database (seconds).
MOVE_WAIT: Final = 10.0
#: Longest wait for a tenant database that is still connecting (seconds).
START_WAIT: Final = 5.0
#: Pool bounds of a tenant database: at most this many connections, each
#: closed after this many idle seconds.
TENANT_POOL_MAX: Final = 4
TENANT_POOL_IDLE: Final = 2.0
#: How often a tenant database's publication and per-org schemas are
#: followed (seconds): longer than the idle time, so an idle tenant keeps
#: only its LISTEN connection (and its projection runner's) open between
#: polls.
TENANT_POLL_INTERVAL: Final = 5.0


class Runner(Protocol):
    """A database's projection runner (hub.projections.runner)."""

    async def run(self) -> None: ...

    def durable(self, event: StoredEvent) -> None: ...


@dataclass
class Member:
    """One tenant database of the node."""

    dsn: str
    name: str
    store: PostgresStore
    runner: Runner | None = None
    started: bool = False
    error: str | None = None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    up: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def ready(self) -> bool:
        return self.started and self.store.ready


class FederatedStore(EventStore):
    """The control database's store plus one store per tenant database.

    ``make_store(dsn, announced)`` builds a tenant's store; ``runner(dsn)``,
    when given, builds its projection runner (started with the store).
    """

    def __init__(
        self,
        control: PostgresStore,
        *,
        make_store: Callable[[str, dict[str, int]], PostgresStore],
        runner: Callable[[str], Runner] | None = None,
        registry_interval: float = REGISTRY_INTERVAL,
        announced: dict[str, int],
    ) -> None:
        super().__init__()
        self.control = control
        self._make_store = make_store
        self._make_runner = runner
        self._interval = registry_interval
        self._announced = announced
        #: org -> dsn of its database, for orgs not in the control database.
        self._routes: dict[str, str] = {}
        self._members: dict[str, Member] = {}
        self._poll: asyncio.Task[None] | None = None
        self._registry_ok = True
        # One registry read at a time: the poll and every append blocked by
        # a move share it (as PostgresStore.tracked_tables shares its read).
        self._refresh_lock = asyncio.Lock()
        self._refreshed_at = -math.inf

    # -- lifecycle ---------------------------------------------------------

    async def start(self) -> None:
        """Start the control store and read the registry (both must work);
        tenant databases start in the background."""
        self._wire(self.control, None)
        await self.control.start()
        try:
            await self._refresh()
        except BaseException:
            await self.control.stop()
            raise
        # Healthy tenant databases are up before the node serves; one that
        # is down goes on trying in the background.
        waits = [asyncio.create_task(m.up.wait()) for m in self._members.values()]
        if waits:
            _, pending = await asyncio.wait(waits, timeout=START_WAIT)
            for task in pending:
                task.cancel()
        self._poll = asyncio.create_task(self._follow_registry(), name="hub-registry")

    async def stop(self) -> None:
        poll, self._poll = self._poll, None
        if poll is not None:
            poll.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await poll
        for dsn in list(self._members):
            await self._close(dsn)
        await self.control.stop()

    def _wire(self, store: PostgresStore, member: Member | None) -> None:
        store.listen(lambda event: self._deliver(event, member))
        store.listen_broadcasts(self._deliver_broadcast)
        store.listen_changes(self._deliver_change)

    def _deliver(self, event: StoredEvent, member: Member | None) -> None:
        if member is not None and member.runner is not None:
            member.runner.durable(event)
        if self._on_event is not None:
            self._on_event(event)

    def _deliver_broadcast(self, message: DatabaseBroadcast) -> None:
        if self._on_broadcast is not None:
            self._on_broadcast(message)

    def _deliver_change(self, change: dict[str, Any]) -> None:
        if self._on_change is not None:
            self._on_change(change)

    # -- the registry --------------------------------------------------------

    async def _follow_registry(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self._refresh()
                if not self._registry_ok:
                    log.info("the registry of org databases is readable again")
                self._registry_ok = True
            except Exception as exc:
                if self._registry_ok:
                    log.warning("cannot read the registry of org databases: %r", exc)
                self._registry_ok = False

    async def _refresh(self) -> None:
        """Read the registry; open the databases it names, close the others.
        A caller that waited while another read ran, started after it
        arrived, takes that read's result instead of reading again."""
        arrived = time.monotonic()
        async with self._refresh_lock:
            if self._refreshed_at >= arrived:
                return
            started = time.monotonic()
            await self._apply(await read_routes(self.control))
            self._refreshed_at = started

    async def _apply(self, routes: dict[str, str]) -> None:
        if routes != self._routes:
            moved = {
                org
                for org in routes.keys() | self._routes.keys()
                if routes.get(org) != self._routes.get(org)
            }
            log.info(
                "org databases changed for %d org(s): %s", len(moved), ", ".join(sorted(moved)[:10])
            )
        self._routes = routes
        wanted = set(routes.values())
        for dsn in wanted - self._members.keys():
            self._open(dsn)
        for dsn in self._members.keys() - wanted:
            await self._close(dsn)

    def _open(self, dsn: str) -> None:
        member = Member(
            dsn=dsn, name=display_name(dsn), store=self._make_store(dsn, self._announced)
        )
        self._wire(member.store, member)
        self._members[dsn] = member
        member.tasks.append(asyncio.create_task(self._start(member), name=f"hub-db {member.name}"))

    async def _start(self, member: Member) -> None:
        """Start a tenant's store, retrying with backoff while it fails."""
        delay = 0.5
        while True:
            try:
                await member.store.start()
                break
            except Exception as exc:
                if member.error is None:
                    log.warning("database %s is unavailable (retrying): %r", member.name, exc)
                member.error = repr(exc)
            await asyncio.sleep(delay * random.uniform(0.8, 1.2))
            delay = min(delay * 2, 10.0)
        member.started, member.error = True, None
        member.up.set()
        log.info("database %s started", member.name)
        if self._make_runner is not None:
            member.runner = self._make_runner(member.dsn)
            member.tasks.append(
                asyncio.create_task(member.runner.run(), name=f"hub-projections {member.name}")
            )

    async def _close(self, dsn: str) -> None:
        member = self._members.pop(dsn)
        for task in member.tasks:
            task.cancel()
        await asyncio.gather(*member.tasks, return_exceptions=True)
        if member.started:
            await member.store.stop()
        log.info("database %s closed", member.name)

    def database_of(self, org: str) -> str:
        """The name of the database ``org`` lives in (``control``: the
        control database)."""
        dsn = self._routes.get(org)
        return self._members[dsn].name if dsn in self._members else "control"

    def tenant_dsns(self) -> list[str]:
        """The DSNs of the tenant databases started (the mother's history
        reads each)."""
        return [dsn for dsn, member in self._members.items() if member.started]

    def databases(self) -> list[DatabaseState]:
        """Every database of the node, the control database first (its
        ``orgs`` is -1: every org without a registry entry)."""
        counts: dict[str, int] = {}
        for dsn in self._routes.values():
            counts[dsn] = counts.get(dsn, 0) + 1
        states = [DatabaseState("control", self.control.ready, -1, None)]
        for dsn, member in sorted(self._members.items(), key=lambda item: item[1].name):
            states.append(
                DatabaseState(member.name, member.ready, counts.get(dsn, 0), member.error)
            )
        return states

    async def _store(self, org: str) -> PostgresStore:
        dsn = self._routes.get(org)
        if dsn is None:
            return self.control
        member = self._members.get(dsn)
        if member is not None and not member.started and member.error is None:
            # Just registered, still connecting: worth a short wait.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(member.up.wait(), START_WAIT)
        if member is None or not member.started:
            name = member.name if member else display_name(dsn)
            raise StoreUnavailable(f"the database of org {org} ({name}) is unavailable")
        return member.store

    # -- reads and writes --------------------------------------------------

    async def append(
        self, org: str, events: Sequence[tuple[str, Any]], *, kind: EventKind = "event"
    ) -> list[StoredEvent]:
        deadline = time.monotonic() + MOVE_WAIT
        while True:
            store = await self._store(org)
            try:
                return await self._guard(org, store.append(org, events, kind=kind))
            except asyncpg.PostgresError as exc:
                if getattr(exc, "sqlstate", None) != ORG_MOVED:
                    raise
                if time.monotonic() > deadline:
                    raise StoreUnavailable(
                        f"org {org} is moving between databases; retry shortly"
                    ) from None
            # Frozen for a move: wait for the registry to name its new home.
            await asyncio.sleep(0.05)
            with contextlib.suppress(Exception):
                await self._refresh()

    async def _guard(self, org: str, call: Awaitable[T]) -> T:
        """Run ``call``; a tenant database that cannot be reached becomes
        StoreUnavailable (the caller answers 503), not a crash."""
        try:
            return await call
        except (
            OSError,
            TimeoutError,
            asyncpg.InterfaceError,
            asyncpg.PostgresConnectionError,
            asyncpg.exceptions.OperatorInterventionError,  # terminated, shut down
        ) as exc:
            raise StoreUnavailable(f"the database of org {org} is unavailable: {exc!r}") from None

    async def read(self, org: str, *, after: int = 0, limit: int = 100) -> list[StoredEvent]:
        return await self._guard(org, (await self._store(org)).read(org, after=after, limit=limit))

    async def read_since(self, org: str, *, since: float, limit: int = 100) -> list[StoredEvent]:
        return await self._guard(
            org, (await self._store(org)).read_since(org, since=since, limit=limit)
        )

    async def last_seq(self, org: str) -> int:
        return await self._guard(org, (await self._store(org)).last_seq(org))

    async def seq_of(self, org: str, event_id: str) -> int | None:
        return await self._guard(org, (await self._store(org)).seq_of(org, event_id))

    async def first_seq(self, org: str) -> int:
        return await self._guard(org, (await self._store(org)).first_seq(org))

    async def orgs(self) -> list[str]:
        """Every org with events, in whichever database it lives; a tenant
        database that is down contributes the orgs the registry gives it."""
        found = {org for org in await self.control.orgs() if org not in self._routes}
        for dsn, member in list(self._members.items()):
            mine = {org for org, where in self._routes.items() if where == dsn}
            if member.started:
                with contextlib.suppress(Exception):
                    found |= mine & set(await member.store.orgs())
                    continue
            found |= mine
        return sorted(found)

    async def read_messages(
        self, topic: str, *, private: bool, since: float, limit: int
    ) -> list[DatabaseBroadcast]:
        return await self.control.read_messages(topic, private=private, since=since, limit=limit)

    # -- tracked tables --------------------------------------------------------

    @property
    def has_tables(self) -> bool:
        return True

    async def tracked_tables(self, fresh: bool = False) -> frozenset[Table] | None:
        """The tables tracked in any database (a binding may name a table of
        a tenant's schema)."""
        tables = await self.control.tracked_tables(fresh)
        if tables is None:
            return None
        for member in list(self._members.values()):
            if member.started:
                with contextlib.suppress(Exception):
                    tables |= await member.store.tracked_tables(fresh) or frozenset()
        return tables

    # -- state ---------------------------------------------------------------

    def _stores(self) -> list[PostgresStore]:
        return [self.control, *(m.store for m in self._members.values() if m.started)]

    @property
    def ready(self) -> bool:
        """The control database's listener: a tenant database that is
        unwell does not make the node unready (see :meth:`databases`)."""
        return self.control.ready

    @property
    def listener_reconnects(self) -> int:
        return sum(store.listener_reconnects for store in self._stores())

    @property
    def broadcasts_received(self) -> int:
        return sum(store.broadcasts_received for store in self._stores())

    @property
    def broadcasts_dropped(self) -> int:
        return sum(store.broadcasts_dropped for store in self._stores())

    @property
    def changes_received(self) -> int:
        return sum(store.changes_received for store in self._stores())

    @property
    def changes_dropped(self) -> int:
        return sum(store.changes_dropped for store in self._stores())
