"""The network's history for the command center: the last day, week or
month, per org and for the whole network.

Two implementations of one interface, :class:`History`:

* :class:`SqlHistory` (with a database) reads the mother's rollups, the
  views of ``migrations/0008_projections.sql`` that the projection
  ``mother`` keeps (``docs/mother.md``, "History in SQL"): nothing is
  rebuilt in memory, so after a restart the history is there at once.
* :class:`MemoryHistory` (the embedded default) counts the durable events
  this process sees, in bounded buckets: 10-minute buckets for a day and
  hourly ones for 30 days, for at most :data:`MEMORY_MAX_ORGS` orgs; it
  starts empty at every start.

A view covers a range (``24h``, ``7d``, ``30d``) in buckets of
:data:`RANGES` seconds ending with the current, partial one; a range with no
data is a view of zeros.  Events are bucketed by their ``created_at`` as
the live counters bucket them.
"""

from __future__ import annotations

import abc
import asyncio
import csv
import io
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

import asyncpg  # type: ignore[import-untyped, unused-ignore]

from hub.channels.observer import Observer

if TYPE_CHECKING:
    from hub.store.base import StoredEvent

log = logging.getLogger(__name__)

#: Range name -> (seconds covered, seconds per bucket).
RANGES: Final = {"24h": (86_400, 600), "7d": (7 * 86_400, 3_600), "30d": (30 * 86_400, 21_600)}
#: Orgs the in-memory history counts; events of further orgs are not kept.
MEMORY_MAX_ORGS: Final = 2_000
#: Distinct users remembered per org and hour in memory.
MEMORY_USERS_PER_HOUR: Final = 1_000
#: Fine (10-minute) and coarse (hourly) buckets of the in-memory history.
_FINE: Final = 600
_COARSE: Final = 3_600
_FINE_KEEP: Final = 86_400
_COARSE_KEEP: Final = 30 * 86_400


class UnknownRange(ValueError):
    """A range that is not one of :data:`RANGES`."""


@dataclass(frozen=True, slots=True)
class OrgTotal:
    """One org over a range: its events, distinct users (where events name
    one) and last event (Unix seconds, None when unknown)."""

    org: str
    events: int
    users: int
    last_event_at: float | None


@dataclass(frozen=True, slots=True)
class HistoryView:
    """A range of the network's history, as the dashboard shows it."""

    range: str
    bucket: int
    #: Start of the first bucket and end of the range (Unix seconds).
    start: float
    end: float
    #: Events per bucket, oldest first, the network's.
    network: list[int]
    #: Every org with events in the range, most events first.
    orgs: list[OrgTotal]
    source: str
    org: str | None = None
    #: Events per bucket of ``org`` (when asked for one).
    org_series: list[int] | None = field(default=None)

    def as_json(self) -> dict[str, Any]:
        return {
            "range": self.range,
            "bucket": self.bucket,
            "start": self.start,
            "end": self.end,
            "source": self.source,
            "network": self.network,
            "events": sum(self.network),
            "orgs": [
                {
                    "org": o.org,
                    "events": o.events,
                    "users": o.users,
                    "last_event_at": o.last_event_at,
                }
                for o in self.orgs
            ],
            "org": None
            if self.org is None
            else {"org": self.org, "series": self.org_series or [0] * len(self.network)},
        }

    def csv(self) -> str:
        """The table the dashboard shows: one row per org."""
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(["org", "events", "users", "last_event_at"])
        for o in self.orgs:
            last = (
                ""
                if o.last_event_at is None
                else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(o.last_event_at))
            )
            writer.writerow([o.org, o.events, o.users, last])
        return out.getvalue()


def _frame(range_name: str, now: float) -> tuple[int, int, int]:
    """(bucket seconds, number of buckets, index of the first bucket)."""
    if range_name not in RANGES:
        raise UnknownRange(f"range must be one of {', '.join(RANGES)}")
    span, bucket = RANGES[range_name]
    count = span // bucket
    return bucket, count, math.floor(now / bucket) - count + 1


def _view(
    range_name: str,
    now: float,
    counts: dict[tuple[str, int], int],
    users: dict[str, int],
    last: dict[str, float],
    org: str | None,
    source: str,
) -> HistoryView:
    """Assemble a view from (org, bucket index) -> events."""
    bucket, count, first = _frame(range_name, now)
    network = [0] * count
    series = [0] * count if org is not None else None
    totals: dict[str, int] = {}
    for (name, index), events in counts.items():
        slot = index - first
        if not 0 <= slot < count:
            continue
        network[slot] += events
        totals[name] = totals.get(name, 0) + events
        if series is not None and name == org:
            series[slot] += events
    orgs = sorted(
        (
            OrgTotal(name, events, users.get(name, 0), last.get(name))
            for name, events in totals.items()
        ),
        key=lambda o: (-o.events, o.org),
    )
    return HistoryView(range_name, bucket, first * bucket, now, network, orgs, source, org, series)


class History(abc.ABC):
    """Where the command center's ranges come from."""

    @abc.abstractmethod
    async def view(self, range_name: str, org: str | None = None) -> HistoryView:
        """The range ``range_name`` (raises UnknownRange), with ``org``'s
        own series when given."""

    async def projections(self) -> dict[str, Any] | None:
        """The projections' state for the command center (None: there are
        none without a database)."""
        return None

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Connect, if there is anything to connect to."""

    async def stop(self) -> None:  # noqa: B027 - optional hook
        """Disconnect."""


class SqlHistory(History):
    """The mother's rollups (the views of the ``mother`` schema) in the
    control database and in every tenant database (``tenants()`` names
    them, :mod:`hub.store.federation`): each database's mother folds its
    own orgs, so the network's history is their sum.  A pool of at most two
    connections per database, closed when idle."""

    def __init__(
        self,
        dsn: str,
        *,
        clock: Callable[[], float] = time.time,
        tenants: Callable[[], list[str]] = list,
    ) -> None:
        self.dsn = dsn
        self.clock = clock
        self.tenants = tenants
        self._pools: dict[str, asyncpg.Pool] = {}

    async def stop(self) -> None:
        pools, self._pools = self._pools, {}
        for pool in pools.values():
            await pool.close()

    async def _connection_pool(self, dsn: str | None = None) -> asyncpg.Pool:
        dsn = dsn or self.dsn
        if dsn not in self._pools:
            self._pools[dsn] = await asyncpg.create_pool(
                dsn,
                min_size=0,
                max_size=2,
                max_inactive_connection_lifetime=60.0,
                server_settings={"application_name": "hub history"},
            )
        return self._pools[dsn]

    async def view(self, range_name: str, org: str | None = None) -> HistoryView:
        now = self.clock()
        bucket, _, first = _frame(range_name, now)
        counts: dict[tuple[str, int], int] = {}
        users: dict[str, int] = {}
        last: dict[str, float] = {}
        databases = [self.dsn, *(dsn for dsn in self.tenants() if dsn != self.dsn)]
        parts = await asyncio.gather(
            *(self._read(dsn, bucket, first * bucket) for dsn in databases),
            return_exceptions=True,
        )
        for dsn, part in zip(databases, parts, strict=True):
            if isinstance(part, BaseException):
                if dsn == self.dsn:
                    raise part
                # A tenant database that is down: its orgs' history is
                # missing from this answer, the rest is whole.
                log.warning("history of a tenant database unavailable: %r", part)
                continue
            # An org lives in one database (a move deletes its rollups from
            # the one it leaves), so the parts add up.
            part_counts, part_users, part_last = part
            for key, value in part_counts.items():
                counts[key] = counts.get(key, 0) + value
            users.update(part_users)
            for who, at in part_last.items():
                last[who] = max(last.get(who, at), at)
        return _view(range_name, now, counts, users, last, org, "sql")

    async def _read(
        self, dsn: str, bucket: int, since: int
    ) -> tuple[dict[tuple[str, int], int], dict[str, int], dict[str, float]]:
        """One database's part of a view: counts per (org, slot), distinct
        users per org, last event per org."""
        fine = bucket < _COARSE
        source, column = (
            ("mother.org_activity", "minute") if fine else ("mother.org_activity_hourly", "hour")
        )
        pool = await self._connection_pool(dsn)
        async with pool.acquire() as conn:
            rows = await conn.fetch(
                f"SELECT org, floor(extract(epoch FROM {column}) / $1)::bigint AS slot, "
                f"sum(events)::bigint AS events FROM {source} "
                f"WHERE {column} >= to_timestamp($2) GROUP BY 1, 2",
                bucket,
                since,
            )
            users_view, users_column = (
                ("mother.minute_users", "minute") if fine else ("mother.hour_users", "hour")
            )
            user_rows = await conn.fetch(
                f"SELECT org, count(DISTINCT user_id)::bigint AS users FROM {users_view} "
                f"WHERE {users_column} >= to_timestamp($1) GROUP BY org",
                since,
            )
            last_rows = await conn.fetch(
                "SELECT org, extract(epoch FROM last_event_at)::float8 AS at "
                "FROM mother.org_summary"
            )
        counts = {(str(r["org"]), int(r["slot"])): int(r["events"]) for r in rows}
        users = {str(r["org"]): int(r["users"]) for r in user_rows}
        last = {str(r["org"]): float(r["at"]) for r in last_rows}
        return counts, users, last

    async def projections(self) -> dict[str, Any] | None:
        """Per projection: orgs behind, events behind (sum and worst org),
        orgs stopped; and the stopped orgs with their errors."""
        pool = await self._connection_pool()
        # One snapshot for both reads: a projection stopping between them
        # would be listed as stopped and counted as running.
        async with (
            pool.acquire() as conn,
            conn.transaction(isolation="repeatable_read", readonly=True),
        ):
            rows = await conn.fetch(
                "SELECT p.name, p.mode, p.target_schema::text AS schema, "
                "count(l.org) FILTER (WHERE l.lag > 0) AS behind, "
                "coalesce(sum(l.lag), 0)::bigint AS lag, "
                "coalesce(max(l.lag), 0)::bigint AS max_lag, "
                "count(l.org) FILTER (WHERE l.error IS NOT NULL) AS stopped "
                "FROM hub.projections p LEFT JOIN hub.projection_lag l ON l.projection = p.name "
                "GROUP BY 1, 2, 3 ORDER BY 1"
            )
            stopped = await conn.fetch(
                "SELECT projection, org, error_seq, error, "
                "extract(epoch FROM error_at)::float8 AS at FROM hub.projection_lag "
                "WHERE error IS NOT NULL "
                "ORDER BY error_at DESC LIMIT $1",
                MAX_STOPPED,
            )
        return {
            "projections": [dict(row) for row in rows],
            "stopped": [dict(row) for row in stopped],
        }


#: Stopped (projection, org) pairs listed at most.
MAX_STOPPED: Final = 50


class MemoryHistory(History, Observer):
    """Bounded history of the durable events this process has seen."""

    def __init__(self, *, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self._fine: dict[tuple[str, int], int] = {}
        self._coarse: dict[tuple[str, int], int] = {}
        self._users: dict[tuple[str, int], set[str]] = {}
        self._last: dict[str, float] = {}
        self._orgs: set[str] = set()
        self._pruned_hour = 0

    def durable(self, event: StoredEvent) -> None:
        org, at = event.org, event.created_at
        hour = math.floor(at / _COARSE)
        if hour > self._pruned_hour:
            self._prune(at)
            self._pruned_hour = hour
        if org not in self._orgs:
            if len(self._orgs) >= MEMORY_MAX_ORGS:
                return
            self._orgs.add(org)
        fine = (org, math.floor(at / _FINE))
        coarse = (org, hour)
        self._fine[fine] = self._fine.get(fine, 0) + 1
        self._coarse[coarse] = self._coarse.get(coarse, 0) + 1
        self._last[org] = max(self._last.get(org, at), at)
        user = _user_of(event.payload)
        if user is not None:
            seen = self._users.setdefault(coarse, set())
            if len(seen) < MEMORY_USERS_PER_HOUR:
                seen.add(user)

    def _prune(self, now: float) -> None:
        fine_floor = math.floor((now - _FINE_KEEP) / _FINE)
        coarse_floor = math.floor((now - _COARSE_KEEP) / _COARSE)
        self._fine = {k: v for k, v in self._fine.items() if k[1] >= fine_floor}
        self._coarse = {k: v for k, v in self._coarse.items() if k[1] >= coarse_floor}
        self._users = {k: v for k, v in self._users.items() if k[1] >= coarse_floor}
        self._orgs = {org for org, _ in self._coarse}
        self._last = {org: at for org, at in self._last.items() if org in self._orgs}

    async def view(self, range_name: str, org: str | None = None) -> HistoryView:
        now = self.clock()
        bucket, _, first = _frame(range_name, now)
        since = first * bucket
        source = self._fine if bucket < _COARSE else self._coarse
        width = _FINE if bucket < _COARSE else _COARSE
        counts: dict[tuple[str, int], int] = {}
        for (name, index), events in source.items():
            if index * width >= since:
                key = (name, math.floor(index * width / bucket))
                counts[key] = counts.get(key, 0) + events
        users: dict[str, set[str]] = {}
        for (name, hour), seen in self._users.items():
            if hour * _COARSE >= since - _COARSE:
                users.setdefault(name, set()).update(seen)
        return _view(
            range_name,
            now,
            counts,
            {name: len(seen) for name, seen in users.items()},
            dict(self._last),
            org,
            "memory",
        )


def _user_of(payload: Any) -> str | None:
    """The user an event names, as the SQL rollups read it: payload.user_id,
    or payload.record.user_id for a row change."""
    if not isinstance(payload, dict):
        return None
    user = payload.get("user_id")
    if user is None and isinstance(payload.get("record"), dict):
        user = payload["record"].get("user_id")
    return None if user is None else str(user)
