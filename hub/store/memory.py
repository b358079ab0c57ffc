"""The in-process event store: the embedded default when no database is set.

It keeps the last ``max_events_per_org`` events of each org and forgets
older ones (``first_seq`` says where an org's history starts), so a hub
without PostgreSQL still shows history and resumes clients, within bounds.
Nothing survives a restart.
"""

from __future__ import annotations

import itertools
import logging
import time
import uuid
from collections import deque
from collections.abc import Sequence
from typing import Any

import orjson

from hub.store.base import (
    MAX_READ,
    EventKind,
    EventStore,
    StoredEvent,
    check_append,
    encode_event,
)

log = logging.getLogger(__name__)


class _OrgLog:
    __slots__ = ("events", "last_seq")

    def __init__(self, maxlen: int) -> None:
        #: Contiguous seqs: ``events[i].seq == events[0].seq + i``.
        self.events: deque[StoredEvent] = deque(maxlen=maxlen)
        self.last_seq = 0


class MemoryStore(EventStore):
    """An append-only log per org, held in memory and bounded per org.

    ``append`` stores the events and announces them to the ``listen``
    callback synchronously, in seq order, before it returns.  It never
    awaits, so concurrent appends from many tasks cannot interleave.  It
    refuses what :class:`~hub.store.postgres.PostgresStore` refuses (see
    :func:`~hub.store.base.encode_event`) and keeps payloads as their JSON
    round trip, so both stores give back the same values.
    """

    def __init__(self, max_events_per_org: int = 10_000) -> None:
        super().__init__()
        if max_events_per_org < 1:
            raise ValueError("max_events_per_org must be at least 1")
        self._max = max_events_per_org
        self._orgs: dict[str, _OrgLog] = {}

    async def append(
        self, org: str, events: Sequence[tuple[str, Any]], *, kind: EventKind = "event"
    ) -> list[StoredEvent]:
        check_append(org, kind)
        if not events:
            return []
        # Store what a database would give back (JSON values, not the
        # caller's objects, which it may go on to mutate); this also checks
        # every event before any is stored.
        decoded = [(type_, orjson.loads(encode_event(type_, payload))) for type_, payload in events]
        orglog = self._orgs.get(org)
        if orglog is None:
            orglog = self._orgs[org] = _OrgLog(self._max)
        # created_at never goes backwards within an org, even if the wall
        # clock does, so read_since() always returns a suffix of the log.
        floor = orglog.events[-1].created_at if orglog.events else 0.0
        stored: list[StoredEvent] = []
        for type_, payload in decoded:
            orglog.last_seq += 1
            floor = max(floor, time.time())
            event = StoredEvent(
                org=org,
                seq=orglog.last_seq,
                id=str(uuid.uuid4()),
                type=type_,
                payload=payload,
                created_at=floor,
                kind=kind,
            )
            orglog.events.append(event)
            stored.append(event)
        for event in stored:
            self._announce(event)
        return stored

    def _announce(self, event: StoredEvent) -> None:
        if self._on_event is None:
            return
        try:
            self._on_event(event)
        except Exception:
            # The event is stored; a failing consumer must not fail the append.
            log.exception("event callback failed for %s seq %d", event.org, event.seq)

    async def read(self, org: str, *, after: int = 0, limit: int = 100) -> list[StoredEvent]:
        orglog = self._orgs.get(org)
        limit = min(limit, MAX_READ)
        if orglog is None or not orglog.events or limit <= 0:
            return []
        start = max(0, after + 1 - orglog.events[0].seq)
        return list(itertools.islice(orglog.events, start, start + limit))

    async def read_since(self, org: str, *, since: float, limit: int = 100) -> list[StoredEvent]:
        orglog = self._orgs.get(org)
        limit = min(limit, MAX_READ)
        if orglog is None or limit <= 0:
            return []
        matching = (event for event in orglog.events if event.created_at >= since)
        return list(itertools.islice(matching, limit))

    async def orgs(self) -> list[str]:
        return [org for org, orglog in self._orgs.items() if orglog.events]

    async def last_seq(self, org: str) -> int:
        orglog = self._orgs.get(org)
        return orglog.last_seq if orglog is not None else 0

    async def seq_of(self, org: str, event_id: str) -> int | None:
        orglog = self._orgs.get(org)
        if orglog is None:
            return None
        # A scan, newest first: resumes ask for recent ids, and this runs
        # once per rejoin, never per event.
        for event in reversed(orglog.events):
            if event.id == event_id:
                return event.seq
        return None

    async def first_seq(self, org: str) -> int:
        orglog = self._orgs.get(org)
        if orglog is None or not orglog.events:
            return 0
        return orglog.events[0].seq
