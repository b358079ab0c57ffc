"""Sliding windows of counts, exact and bounded: the mother's arithmetic.

Everything here is pure: no I/O, no clock of its own.  Every method that
depends on time takes ``now`` (Unix seconds), so tests drive it with a fake
clock.

A :class:`Ring` keeps the counts of the last ``size`` buckets of ``width``
seconds each.  A bucket is a whole second (or minute) of wall-clock time,
``floor(t / width)``: nothing is sampled or estimated, an event lands in
exactly one bucket.  A window of ``w`` buckets holds the newest bucket (the
current, partial second or minute) and the ``w - 1`` before it, so the
"last minute" is the current second plus the 59 whole seconds before it.
Adding an event costs O(1); time moving on costs O(1) per elapsed bucket
(amortised, and never more than ``size`` at once), and the sum of each
declared window is kept up to date, so reading it costs O(1) too.

A quiet ring decays by itself: as ``now`` advances, old buckets leave the
windows and are zeroed, so an org that stops publishing falls to 0 within
the window's length.

:class:`EventWindows` is what the mother keeps per org and for the whole
network (events per window, per-second and per-minute series, counts by
type, recent events, the time of the last event); :class:`EventAggregate`
holds them all and deduplicates the two sources of events, the live stream
and the history read after a restart.  :func:`merge_shares` sums the
connection-derived numbers that each node reports for itself.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from hub.store.base import StoredEvent

#: Per-second buckets kept: the per-second series covers the last 5 minutes.
SECOND_SLOTS: Final = 300
#: Per-minute buckets kept: the per-minute series covers the last hour.
MINUTE_SLOTS: Final = 60
#: The windows reported, in buckets of the ring that holds each.
WINDOW_1M: Final = 60  # seconds
WINDOW_5M: Final = 300  # seconds
WINDOW_1H: Final = 60  # minutes
#: The history a restarted node reads back, in seconds (the longest window).
HISTORY_SECONDS: Final = 3600
#: Distinct event types counted per org; further types count as OTHER_TYPE.
MAX_TYPES_PER_ORG: Final = 64
#: Distinct event types counted network-wide.
MAX_TYPES_NETWORK: Final = 256
OTHER_TYPE: Final = "(other)"
#: Recent events kept per org and network-wide.
RECENT_PER_ORG: Final = 10
RECENT_NETWORK: Final = 50


class Ring:
    """Counts in the last ``size`` buckets of ``width`` seconds.

    ``windows`` are the window lengths (in buckets, each at most ``size``)
    whose sums are maintained for O(1) reads; the whole ring (``size``) is
    always one of them.  Events older than the ring are ignored (``add``
    returns False); an event newer than the newest bucket moves the ring on
    to it.
    """

    __slots__ = ("width", "size", "_counts", "_head", "_windows", "_sums")

    def __init__(self, width: int, size: int, windows: Iterable[int] = ()) -> None:
        if width < 1 or size < 1:
            raise ValueError("width and size must be at least 1")
        chosen = sorted({*windows, size})
        if chosen[0] < 1 or chosen[-1] > size:
            raise ValueError(f"windows must be between 1 and {size} buckets")
        self.width = width
        self.size = size
        self._counts = [0] * size
        #: The index (``floor(t / width)``) of the newest bucket; None while
        #: nothing was ever added or advanced.
        self._head: int | None = None
        self._windows = tuple(chosen)
        self._sums = [0] * len(chosen)

    def _index(self, t: float) -> int:
        return math.floor(t / self.width)

    @property
    def head(self) -> int | None:
        return self._head

    def advance(self, now: float) -> None:
        """Move the newest bucket to ``now``'s; buckets that fall out of the
        ring are zeroed.  A ``now`` in the past changes nothing."""
        target = self._index(now)
        head = self._head
        if head is None:
            self._head = target
            return
        steps = target - head
        if steps <= 0:
            return
        counts, size = self._counts, self.size
        if steps >= size:
            # Everything left the ring: clear it at once.
            for i in range(size):
                counts[i] = 0
            for i in range(len(self._sums)):
                self._sums[i] = 0
            self._head = target
            return
        windows, sums = self._windows, self._sums
        for new in range(head + 1, target + 1):
            for i, w in enumerate(windows):
                # Bucket ``new - w`` leaves window ``w`` as ``new`` enters.
                sums[i] -= counts[(new - w) % size]
            counts[new % size] = 0
        self._head = target

    def add(self, t: float, n: int = 1) -> bool:
        """Count ``n`` at time ``t``; False when ``t`` is older than the ring."""
        index = self._index(t)
        if self._head is None or index > self._head:
            self.advance(t)
        head = self._head
        assert head is not None
        if index <= head - self.size:
            return False
        self._counts[index % self.size] += n
        for i, w in enumerate(self._windows):
            if index > head - w:
                self._sums[i] += n
        return True

    def window(self, now: float, buckets: int) -> int:
        """The sum of the newest ``buckets`` buckets as of ``now``."""
        self.advance(now)
        try:
            return self._sums[self._windows.index(buckets)]
        except ValueError:
            if not 1 <= buckets <= self.size:
                raise ValueError(f"a window of {buckets} buckets does not fit") from None
            return sum(self.series(now, buckets))

    def total(self, now: float) -> int:
        """The sum of the whole ring as of ``now``."""
        return self.window(now, self.size)

    def series(self, now: float, count: int | None = None) -> list[int]:
        """The newest ``count`` buckets (default: all), oldest first; the
        last element is ``now``'s bucket."""
        self.advance(now)
        count = self.size if count is None else count
        if not 0 <= count <= self.size:
            raise ValueError(f"a series of {count} buckets does not fit")
        head = self._head
        assert head is not None
        counts, size = self._counts, self.size
        return [counts[i % size] for i in range(head - count + 1, head + 1)]


class SlidingCount:
    """Counts over the last minute, five minutes and hour, with a
    per-second series (last :data:`SECOND_SLOTS` seconds) and a per-minute
    series (last :data:`MINUTE_SLOTS` minutes)."""

    __slots__ = ("seconds", "minutes")

    def __init__(self) -> None:
        self.seconds = Ring(1, SECOND_SLOTS, (WINDOW_1M, WINDOW_5M))
        self.minutes = Ring(60, MINUTE_SLOTS, (WINDOW_1H,))

    def add(self, t: float, n: int = 1) -> bool:
        """Count ``n`` at ``t``; False when ``t`` is older than the hour."""
        self.seconds.add(t, n)
        return self.minutes.add(t, n)

    def windows(self, now: float) -> dict[str, int]:
        return {
            "1m": self.seconds.window(now, WINDOW_1M),
            "5m": self.seconds.window(now, WINDOW_5M),
            "1h": self.minutes.window(now, WINDOW_1H),
        }

    def per_second(self, now: float, count: int = SECOND_SLOTS) -> list[int]:
        return self.seconds.series(now, count)

    def per_minute(self, now: float) -> list[int]:
        return self.minutes.series(now)

    def idle(self, now: float) -> bool:
        """True when nothing was counted in the last hour."""
        return self.minutes.total(now) == 0


class TypeCounts:
    """Events per type over the last hour (per-minute buckets), for at
    most ``limit`` types; others are counted under :data:`OTHER_TYPE`."""

    __slots__ = ("limit", "_rings")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._rings: dict[str, Ring] = {}

    def add(self, type_: str, t: float) -> None:
        ring = self._rings.get(type_)
        if ring is None:
            if len(self._rings) >= self.limit:
                type_ = OTHER_TYPE
                ring = self._rings.get(type_)
            if ring is None:
                ring = self._rings[type_] = Ring(60, MINUTE_SLOTS)
        ring.add(t)

    def counts(self, now: float) -> dict[str, int]:
        """Type -> events in the last hour, largest first; types without
        events in the hour are forgotten (which frees their place)."""
        result: dict[str, int] = {}
        for type_, ring in list(self._rings.items()):
            count = ring.total(now)
            if count:
                result[type_] = count
            else:
                del self._rings[type_]
        return dict(sorted(result.items(), key=lambda item: (-item[1], item[0])))

    def __len__(self) -> int:
        return len(self._rings)


def _recent_key(event: StoredEvent) -> tuple[float, str, int]:
    return (event.created_at, event.org, event.seq)


class Recent:
    """The newest ``limit`` events, ordered by (created_at, org, seq).
    Appending in order is O(1); an older event (from a history read) is
    placed by bisection, or dropped when older than all that is kept."""

    __slots__ = ("limit", "_events", "_keys")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._events: list[StoredEvent] = []
        self._keys: list[tuple[float, str, int]] = []

    def add(self, event: StoredEvent) -> None:
        key = _recent_key(event)
        keys = self._keys
        if not keys or key >= keys[-1]:
            keys.append(key)
            self._events.append(event)
        else:
            if len(keys) >= self.limit and key < keys[0]:
                return
            at = bisect.bisect_right(keys, key)
            keys.insert(at, key)
            self._events.insert(at, event)
        if len(keys) > 2 * self.limit:
            # Trim in batches, so appends stay O(1) amortised.
            del keys[: -self.limit]
            del self._events[: -self.limit]

    def newest(self, count: int | None = None) -> list[StoredEvent]:
        """The newest ``count`` (default ``limit``) events, newest first."""
        count = self.limit if count is None else min(count, self.limit)
        return self._events[::-1][:count]

    def __len__(self) -> int:
        return min(len(self._events), self.limit)


class EventWindows:
    """The event-derived numbers of one org, or of the whole network."""

    __slots__ = ("count", "types", "recent", "last_at", "seq")

    def __init__(self, *, max_types: int, recent: int) -> None:
        self.count = SlidingCount()
        self.types = TypeCounts(max_types)
        self.recent = Recent(recent)
        #: ``created_at`` of the newest event seen (any age).
        self.last_at: float | None = None
        #: The highest seq seen (orgs only: the org's event count ever).
        self.seq = 0

    def add(self, event: StoredEvent) -> None:
        t = event.created_at
        if self.count.add(t):
            self.types.add(event.type, t)
        self.recent.add(event)
        if self.last_at is None or t > self.last_at:
            self.last_at = t
        if event.seq > self.seq:
            self.seq = event.seq

    def since_last(self, now: float) -> float | None:
        return None if self.last_at is None else max(0.0, now - self.last_at)


@dataclass(slots=True)
class _OrgEvents:
    windows: EventWindows
    #: The seq of the first event that arrived live (None: none yet).
    first_live: int | None = None
    #: The highest seq counted, from either source.
    counted: int = 0
    #: The highest seq the history read has offered.
    history_max: int = 0


@dataclass
class EventAggregate:
    """Event windows per org and network-wide, fed by two sources that may
    overlap: the live stream (per org in seq order, without gaps, from the
    first event announced after the node started) and the history read
    back from the store after a restart (per org in seq order).  Each event
    is counted once, whichever source brings it first:

    * a live event is counted unless its seq was already counted;
    * a history event is counted if it precedes the first live event, or
      follows everything counted so far (it committed, but its
      announcement has not arrived yet; the announcement is then skipped).
    """

    orgs: dict[str, _OrgEvents] = field(default_factory=dict)
    network: EventWindows = field(
        default_factory=lambda: EventWindows(max_types=MAX_TYPES_NETWORK, recent=RECENT_NETWORK)
    )

    def _org(self, org: str) -> _OrgEvents:
        state = self.orgs.get(org)
        if state is None:
            windows = EventWindows(max_types=MAX_TYPES_PER_ORG, recent=RECENT_PER_ORG)
            state = self.orgs[org] = _OrgEvents(windows)
        return state

    def live(self, event: StoredEvent) -> bool:
        """Count an announced event; False if it was counted already."""
        state = self._org(event.org)
        if event.seq <= state.counted:
            return False
        if state.first_live is None:
            state.first_live = event.seq
        self._count(state, event)
        return True

    def history(self, event: StoredEvent) -> bool:
        """Count an event read from the store; False if counted already."""
        state = self._org(event.org)
        if event.seq <= state.history_max:
            return False
        state.history_max = event.seq
        first_live = state.first_live
        if first_live is None or event.seq < first_live or event.seq > state.counted:
            self._count(state, event)
            return True
        return False

    def _count(self, state: _OrgEvents, event: StoredEvent) -> None:
        state.counted = max(state.counted, event.seq)
        state.windows.add(event)
        self.network.add(event)

    def get(self, org: str) -> EventWindows | None:
        state = self.orgs.get(org)
        return None if state is None else state.windows

    def prune(self, now: float) -> list[str]:
        """Forget orgs without events in the last hour; returns them.  Only
        call once the history has been read (it forgets what was counted)."""
        quiet = [org for org, state in self.orgs.items() if state.windows.count.idle(now)]
        for org in quiet:
            del self.orgs[org]
        return quiet


# -- connection-derived numbers, one share per node -----------------------------


@dataclass(slots=True)
class OrgConnections:
    """One org's connection-derived numbers, summed over nodes."""

    clients: int = 0
    users: int = 0
    user_ids: list[str] = field(default_factory=list)
    presence: int = 0
    delivered_1m: int = 0
    refused_1h: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "clients": self.clients,
            "users": self.users,
            "user_ids": self.user_ids,
            "presence": self.presence,
            "delivered_1m": self.delivered_1m,
            "refused_1h": self.refused_1h,
        }


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _distinct(shares: list[Mapping[str, Any]]) -> tuple[int, list[str]]:
    """Distinct users over shares: exact (the union) when every share
    listed all its users, else the sum of the counts."""
    union: set[str] = set()
    complete = True
    total = 0
    for share in shares:
        count = _int(share.get("users_count"))
        total += count
        ids = share.get("users")
        if isinstance(ids, list) and len(ids) == count:
            union.update(str(user) for user in ids)
        else:
            complete = False
    if complete:
        return len(union), sorted(union)
    return total, sorted(union)


def merge_shares(
    shares: Iterable[Mapping[str, Any]],
) -> tuple[OrgConnections, dict[str, OrgConnections]]:
    """Sum the nodes' shares: ``(network, {org: numbers})``.

    Each share is what one node reports of its own connections (see
    ``Mother.local_share``).  Clients, delivered and refused add up.  Users
    are the union of the nodes' lists while every node could list all of
    its users, else the sum of their counts.  Presence is per topic the
    largest size any node reports (a node with subscribers of a topic
    mirrors every other node's presence on it), summed over the org's
    topics.  Malformed fields count as zero.
    """
    network = OrgConnections()
    network_shares: list[Mapping[str, Any]] = []
    org_shares: dict[str, list[Mapping[str, Any]]] = {}
    presence: dict[str, dict[str, int]] = {}
    for share in shares:
        network.clients += _int(share.get("clients"))
        network.delivered_1m += _int(share.get("delivered_1m"))
        network.refused_1h += _int(share.get("refused_1h"))
        network_shares.append(share)
        orgs = share.get("orgs")
        if not isinstance(orgs, Mapping):
            continue
        for org, numbers in orgs.items():
            if not isinstance(org, str) or not isinstance(numbers, Mapping):
                continue
            org_shares.setdefault(org, []).append(numbers)
            topics = numbers.get("presence")
            if isinstance(topics, Mapping):
                sizes = presence.setdefault(org, {})
                for topic, size in topics.items():
                    sizes[str(topic)] = max(sizes.get(str(topic), 0), _int(size))
    network.users, network.user_ids = _distinct(network_shares)
    result: dict[str, OrgConnections] = {}
    for org, parts in org_shares.items():
        numbers = OrgConnections()
        for part in parts:
            numbers.clients += _int(part.get("clients"))
            numbers.delivered_1m += _int(part.get("delivered_1m"))
            numbers.refused_1h += _int(part.get("refused_1h"))
        numbers.users, numbers.user_ids = _distinct(parts)
        numbers.presence = sum(presence.get(org, {}).values())
        network.presence += numbers.presence
        result[org] = numbers
    return network, result
