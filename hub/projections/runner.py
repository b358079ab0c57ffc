"""The node's projection runner: one leader in the cluster folds the log.

Every node with a database runs a :class:`ProjectionRunner`; the one that
holds the session-level advisory lock :data:`LEADER_LOCK` on its own
connection is the leader and the only one that runs projections.  The
others try to take the lock every ``takeover`` seconds.  When the leader's
process dies or its connection is cut, PostgreSQL ends its session (within
:data:`CONNECTION_CHECK_MS` even in the middle of a batch), rolls the batch
back and frees the lock, so another node leads within about
``takeover`` + 1 s.

The leader, on that same connection, reads ``hub.projection_lag`` and calls
``hub.project()`` for every projection with orgs behind their head: one
statement, one transaction, whose writes and checkpoints commit together.
A batch cut short (the connection lost, the process killed, a statement
timeout) commits nothing, so whoever runs next starts from the last
checkpoint: every event is applied exactly once, in seq order per org.  It
works when woken by a new event (the node's durable feed) or every
``interval`` seconds, and under steady traffic at most one turn per
``coalesce`` seconds, so batches hold what arrived in between.

A handler that raises stops its projection for that org only (the error is
recorded in the checkpoint row, logged and exported); the leader retries it
every ``retry`` seconds from the event that failed, so fixing the handler
(``CREATE OR REPLACE FUNCTION``) is enough.  A handler that runs past
``timeout`` seconds is cancelled by PostgreSQL (``statement_timeout``); the
leader then runs each org of that batch one event at a time and records
the timeout against the event that exceeds it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

import asyncpg  # type: ignore[import-untyped, unused-ignore]

from hub.channels.observer import Observer

if TYPE_CHECKING:
    from hub.store.base import StoredEvent

log = logging.getLogger(__name__)

#: ``pg_try_advisory_lock(LEADER_LOCK)``: the projection leader ("hubplead").
LEADER_LOCK: Final = 0x6875627065616421
#: How often the leader's backend checks that the leader is still there
#: while a batch runs (``client_connection_check_interval``, ms).
CONNECTION_CHECK_MS: Final = 1000
#: Events per org per ``hub.project()`` call.
BATCH: Final = 500
#: A turn that applied events is followed by the next one this long after
#: it started at the soonest (seconds): under steady traffic each org's
#: batch holds what arrived meanwhile instead of one event.
COALESCE: Final = 0.5
#: How often the mother's rollups are pruned to their retention (seconds).
PRUNE_INTERVAL: Final = 600.0

_LAG: Final = (
    "SELECT projection, target, org, lag, error, error_seq, "
    "extract(epoch FROM error_at) AS error_at FROM hub.projection_lag "
    "WHERE lag > 0 OR error IS NOT NULL"
)
_PROJECT: Final = "SELECT org, seq, applied, error FROM hub.project($1, $2, $3, $4, NULL, $5, $6)"
_TIMED_OUT: Final = (
    "INSERT INTO hub.projection_checkpoints AS c (projection, target, org, error, error_seq, "
    "error_at) VALUES ($1, $2, $3, $4, (SELECT coalesce(max(seq), 0) + 1 FROM "
    "hub.projection_checkpoints WHERE projection = $1 AND target = $2 AND org = $3), now()) "
    "ON CONFLICT (projection, target, org) DO UPDATE SET error = excluded.error, "
    "error_seq = c.seq + 1, error_at = now()"
)


def _connection_lost(exc: asyncpg.PostgresError) -> bool:
    """Errors that end the session (terminated backend, shutdown): the
    runner reconnects rather than retry on this connection."""
    return str(getattr(exc, "sqlstate", "")).startswith(("57P", "08"))


@dataclass
class RunnerState:
    """What ``/metrics`` shows of the runner (the leader's view; empty on
    the others)."""

    leader: bool = False
    #: (projection, org) -> events behind the org's head.
    lag: dict[tuple[str, str], int] = field(default_factory=dict)
    #: (projection, org) -> the error that stopped it.
    stopped: dict[tuple[str, str], str] = field(default_factory=dict)
    #: projection -> events handed to its handler by this node.
    applied: dict[str, int] = field(default_factory=dict)


class ProjectionRunner(Observer):
    """Runs the registered projections while this node leads."""

    def __init__(
        self,
        dsn: str,
        *,
        application_name: str = "hub",
        interval: float = 1.0,
        takeover: float = 1.0,
        timeout: float = 30.0,
        retry: float = 30.0,
        batch: int = BATCH,
        coalesce: float = COALESCE,
    ) -> None:
        self.dsn = dsn
        self.application_name = f"{application_name} projections"
        self.interval = interval
        self.takeover = takeover
        self.timeout = timeout
        self.retry = retry
        self.batch = batch
        self.coalesce = coalesce
        self.state = RunnerState()
        self._wake = asyncio.Event()

    # -- the node's hook -----------------------------------------------------

    def durable(self, event: StoredEvent) -> None:
        """A new event: the leader looks at once rather than at its next turn."""
        self._wake.set()

    # -- leading ---------------------------------------------------------------

    async def run(self) -> None:
        """Forever: connect, try to lead, lead until the connection fails."""
        failing = False
        while True:
            conn: asyncpg.Connection | None = None
            try:
                conn = await asyncpg.connect(
                    self.dsn,
                    timeout=10,
                    server_settings={
                        "application_name": self.application_name,
                        "statement_timeout": str(int(self.timeout * 1000)),
                        # A leader that dies mid-batch: its backend notices
                        # within a second (not when the batch ends), rolls
                        # back and frees the lock (PostgreSQL 14+).
                        "client_connection_check_interval": str(CONNECTION_CHECK_MS),
                    },
                )
                failing = False
                while True:
                    if await conn.fetchval("SELECT pg_try_advisory_lock($1)", LEADER_LOCK):
                        log.info("this node leads the projections")
                        self.state.leader = True
                        await self._lead(conn)
                    await asyncio.sleep(self.takeover)
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                if not failing:
                    log.warning("projections: %r; trying again", exc)
                failing = True
            finally:
                if self.state.leader:
                    log.info("this node no longer leads the projections")
                self.state = RunnerState(applied=self.state.applied)
                if conn is not None:
                    conn.terminate()
            await asyncio.sleep(self.takeover)

    async def _lead(self, conn: asyncpg.Connection) -> None:
        pruned_at = -math.inf
        while True:
            self._wake.clear()
            started = time.monotonic()
            worked = await self._turn(conn)
            if time.monotonic() - pruned_at > PRUNE_INTERVAL:
                await conn.execute("SELECT hub.mother_prune()")
                pruned_at = time.monotonic()
            if worked:
                # Let events gather: a turn costs a few statements per
                # projection and org whatever it applies.
                await asyncio.sleep(max(0.0, self.coalesce - (time.monotonic() - started)))
            else:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.interval)

    async def _turn(self, conn: asyncpg.Connection) -> bool:
        """One pass over every projection behind; True when it applied any."""
        now = time.time()
        work: dict[tuple[str, str], list[str]] = {}
        retries: dict[tuple[str, str], list[str]] = {}
        lag: dict[tuple[str, str], int] = {}
        stopped: dict[tuple[str, str], str] = {}
        for row in await conn.fetch(_LAG):
            name, target, org = str(row["projection"]), str(row["target"]), str(row["org"])
            lag[(name, org)] = int(row["lag"])
            if row["error"] is None:
                work.setdefault((name, target), []).append(org)
                continue
            stopped[(name, org)] = str(row["error"])
            if now - float(row["error_at"] or 0) >= self.retry:
                retries.setdefault((name, target), []).append(org)
        self.state.lag, self.state.stopped = lag, stopped
        moved = False
        for (name, target), orgs in work.items():
            moved |= await self._batch(conn, name, target, orgs, retry=False)
        for (name, target), orgs in retries.items():
            moved |= await self._batch(conn, name, target, orgs, retry=True)
        return moved

    async def _batch(
        self, conn: asyncpg.Connection, name: str, target: str, orgs: list[str], *, retry: bool
    ) -> bool:
        """The fast path first (no subtransaction per event, see
        hub.project()); when a handler raised in it, the same batch again
        with each event isolated, which stops only the org that failed."""
        try:
            try:
                rows = await conn.fetch(_PROJECT, name, target, orgs, self.batch, retry, retry)
            except asyncpg.PostgresError as exc:
                if isinstance(exc, asyncpg.QueryCanceledError) or _connection_lost(exc):
                    raise
                rows = await conn.fetch(_PROJECT, name, target, orgs, self.batch, retry, True)
        except asyncpg.QueryCanceledError:
            return await self._one_by_one(conn, name, target, orgs, retry=retry)
        return self._count(name, rows)

    async def _one_by_one(
        self, conn: asyncpg.Connection, name: str, target: str, orgs: list[str], *, retry: bool
    ) -> bool:
        """A batch ran past the timeout: each org again, one event at a
        time, to stop only the org whose event is too slow."""
        moved = False
        for org in orgs:
            try:
                rows = await conn.fetch(_PROJECT, name, target, [org], 1, retry, True)
            except asyncpg.QueryCanceledError:
                reason = f"the handler ran longer than {self.timeout:g} s (HUB_PROJECTION_TIMEOUT)"
                log.warning("projection %s stopped for org %s: %s", name, org, reason)
                await conn.execute(_TIMED_OUT, name, target, org, reason)
                continue
            moved |= self._count(name, rows)
        return moved

    def _count(self, name: str, rows: list[asyncpg.Record]) -> bool:
        """Count what a batch applied; True when an org moved (a call for
        an org behind its head that ends without an error moved it)."""
        moved = False
        for row in rows:
            applied = int(row["applied"])
            self.state.applied[name] = self.state.applied.get(name, 0) + applied
            if row["error"] is None:
                moved = True
            elif (name, row["org"]) not in self.state.stopped:
                log.warning(
                    "projection %s stopped for org %s after seq %s: %s",
                    name,
                    row["org"],
                    row["seq"],
                    row["error"],
                )
        return moved
