"""The event store interface and the event it stores."""

from __future__ import annotations

import abc
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

import orjson

from hub.errors import HubError

#: ``event``: published by an app (REST, CLI, Python client).
#: ``change``: captured by a trigger on a tracked table; its payload is
#: ``{"schema", "table", "type", "record", "old_record", "columns",
#: "commit_timestamp"}`` (see :mod:`hub.store.tracking`).
EventKind = Literal["event", "change"]

#: Largest page one read returns, whatever the caller asks for.
MAX_READ: Final = 1000

#: Longest org id (in UTF-8 bytes) a store accepts: a NOTIFY that refers to
#: an event by key must stay far below PostgreSQL's 8000-byte limit.
MAX_ORG_BYTES: Final = 200


class StoreError(HubError):
    """The store cannot do what was asked: not migrated, not started, or an
    argument it refuses (the message says which)."""


class StoreUnavailable(HubError):
    """The database that holds an org cannot be reached now (a tenant
    database down, or an org frozen by a move for too long): retry later.
    The HTTP API answers 503."""


# An escaped NUL in JSON text: \u0000 after an even number of backslashes.
_JSON_NUL: Final = re.compile(rb"(?<!\\)(?:\\\\)*\\u0000")


def _check_text(what: str, value: str) -> bytes:
    try:
        encoded = value.encode()
    except UnicodeEncodeError:
        raise StoreError(f"{what} is not valid Unicode text") from None
    if b"\0" in encoded:
        raise StoreError(f"{what} contains a NUL character")
    return encoded


def check_org(org: str) -> None:
    """Raise StoreError unless ``org`` is a usable org id: non-empty, at most
    :data:`MAX_ORG_BYTES` bytes of UTF-8, no NUL.  Both stores apply the same
    rules."""
    if not org:
        raise StoreError("org must not be empty")
    if len(_check_text("org", org)) > MAX_ORG_BYTES:
        raise StoreError(f"org is longer than {MAX_ORG_BYTES} bytes")


def check_append(org: str, kind: str) -> None:
    """The checks both stores make before an append: a usable org id and a
    known event kind; StoreError otherwise."""
    check_org(org)
    if kind not in ("event", "change"):
        raise StoreError(f"unknown event kind {kind!r}")


def encode_event(type_: str, payload: Any) -> bytes:
    """Check an event before it is stored and return its payload as JSON.

    Raises TypeError when the payload is not JSON-serialisable by orjson
    (including strings with lone surrogates), and StoreError when the type
    is not valid text or either holds a NUL character, which PostgreSQL
    cannot store.  Both stores apply the same rules.
    """
    _check_text("type", type_)
    encoded = orjson.dumps(payload)
    if _JSON_NUL.search(encoded):
        raise StoreError("payload contains a NUL character")
    return encoded


@dataclass(frozen=True, slots=True)
class StoredEvent:
    """One durable event.  ``seq`` is per org: 1, 2, 3... without gaps, in
    commit order."""

    org: str
    seq: int
    id: str
    type: str
    payload: Any
    created_at: float
    kind: EventKind = "event"

    def meta(self) -> dict[str, Any]:
        return {"id": self.id, "seq": self.seq}


OnEvent = Callable[[StoredEvent], None]


@dataclass(frozen=True, slots=True)
class DatabaseBroadcast:
    """A broadcast sent from the database (``realtime.send()``, a row of
    ``realtime.messages`` whose extension is ``broadcast``) on a topic that
    is not an ``org:<id>`` topic (those become durable events).

    ``id`` is the row's id (clients get it as ``meta.id``), ``topic`` the
    topic as written (without ``realtime:``), ``payload`` the row's payload
    as JSON."""

    id: str
    topic: str
    event: str
    private: bool
    payload: bytes


OnBroadcast = Callable[[DatabaseBroadcast], None]

#: A row change of a table tracked without an org column (see
#: :mod:`hub.store.rowchanges` for its keys).
OnChange = Callable[[dict[str, Any]], None]
#: A table as ``(schema, table)``, unquoted.
Table = tuple[str, str]


@dataclass(frozen=True, slots=True)
class DatabaseState:
    """One database of a node's store, as ``/readyz`` and the dashboard
    show it."""

    name: str
    ready: bool
    #: Orgs registered in it (-1: the control database, every other org).
    orgs: int
    #: Why it is not ready (the last connection error), if known.
    error: str | None


class EventStore(abc.ABC):
    """An append-only log per org.

    Every appended event is announced to the callback given to
    :meth:`listen`: per org in ``seq`` order, each exactly once, without
    gaps, also across reconnects of a networked store.  The callback only
    hands off (it must not block); it runs on the event loop.
    """

    def __init__(self) -> None:
        self._on_event: OnEvent | None = None
        self._on_broadcast: OnBroadcast | None = None
        self._on_change: OnChange | None = None

    def listen(self, on_event: OnEvent) -> None:
        self._on_event = on_event

    def listen_broadcasts(self, on_broadcast: OnBroadcast) -> None:
        """Hand every broadcast sent from the database to ``on_broadcast``
        (best effort, in commit order; it runs on the event loop and must not
        block).  Only a database store has such broadcasts: elsewhere the
        registration is kept and never called."""
        self._on_broadcast = on_broadcast

    async def read_messages(
        self, topic: str, *, private: bool, since: float, limit: int
    ) -> list[DatabaseBroadcast]:
        """The broadcasts kept in ``realtime.messages`` for ``topic`` (and
        privacy) inserted at or after ``since`` (Unix seconds), oldest
        first, at most ``limit``: what a private channel's replay sends.
        Only a database store keeps them."""
        return []

    async def tracked_tables(self, fresh: bool = False) -> frozenset[Table] | None:
        """The tables whose changes reach ``postgres_changes`` bindings
        (tracked by ``hub track`` or the publication), or None when the
        store cannot tell (it has no tables).  ``fresh`` asks for a new read
        rather than the last one."""
        return None

    @property
    def has_tables(self) -> bool:
        """Whether :meth:`tracked_tables` knows the tables."""
        return False

    def listen_changes(self, on_change: OnChange) -> None:
        """Hand every row change of a table tracked without an org column
        (``hub track --no-org``, the publication ``supabase_realtime``) to
        ``on_change`` (best effort, in commit order; it runs on the event
        loop and must not block).  Only a database store has such tables."""
        self._on_change = on_change

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Connect and start announcing; called once."""

    async def stop(self) -> None:  # noqa: B027 - optional hook
        """Stop announcing and disconnect; called once."""

    @property
    def ready(self) -> bool:
        """Whether appended events are being announced right now."""
        return True

    def database_of(self, org: str) -> str | None:
        """The name of the database ``org`` lives in, when the store spans
        several; None otherwise."""
        return None

    def databases(self) -> list[DatabaseState]:
        """The databases behind this store, when it spans several (see
        :mod:`hub.store.federation`); empty otherwise."""
        return []

    @property
    def listener_reconnects(self) -> int:
        """How many times the store's listener link was re-established."""
        return 0

    @property
    def broadcasts_received(self) -> int:
        """Broadcasts sent from the database (realtime.send) received."""
        return 0

    @property
    def broadcasts_dropped(self) -> int:
        """Broadcasts sent from the database lost before delivery."""
        return 0

    @property
    def changes_received(self) -> int:
        """Row changes of tables tracked without an org column received."""
        return 0

    @property
    def changes_dropped(self) -> int:
        """Row changes of tables tracked without an org column lost."""
        return 0

    @abc.abstractmethod
    async def append(
        self, org: str, events: Sequence[tuple[str, Any]], *, kind: EventKind = "event"
    ) -> list[StoredEvent]:
        """Append ``(type, payload)`` pairs atomically; return them stored."""

    @abc.abstractmethod
    async def read(self, org: str, *, after: int = 0, limit: int = 100) -> list[StoredEvent]:
        """Events of ``org`` with ``seq > after``, ascending, at most
        ``min(limit, MAX_READ)``."""

    @abc.abstractmethod
    async def read_since(self, org: str, *, since: float, limit: int = 100) -> list[StoredEvent]:
        """Events of ``org`` created at or after ``since`` (Unix seconds),
        ascending by seq, at most ``min(limit, MAX_READ)``."""

    @abc.abstractmethod
    async def orgs(self) -> list[str]:
        """Every org that has events (the mother reads their last hour back
        after a restart), in no particular order."""

    @abc.abstractmethod
    async def last_seq(self, org: str) -> int:
        """The highest seq of ``org``, 0 when it has none."""

    @abc.abstractmethod
    async def seq_of(self, org: str, event_id: str) -> int | None:
        """The seq of ``org``'s event ``event_id``; None when the store does
        not hold it (unknown, another org's, or forgotten)."""

    async def first_seq(self, org: str) -> int:
        """The lowest seq still held (a bounded store forgets old events);
        0 when it has none."""
        events = await self.read(org, after=0, limit=1)
        return events[0].seq if events else 0
