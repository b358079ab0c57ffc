"""The event store interface and the event it stores."""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

#: ``event``: published by an app (REST, CLI, Python client).
#: ``change``: captured by a trigger on a tracked table; its payload is
#: ``{"schema", "table", "type", "record", "old_record", "columns",
#: "commit_timestamp"}`` (see :mod:`hub.store.postgres`).
EventKind = Literal["event", "change"]

#: Largest page one read returns, whatever the caller asks for.
MAX_READ: Final = 1000


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


class EventStore(abc.ABC):
    """An append-only log per org.

    Every appended event is announced to the callback given to
    :meth:`listen`: per org in ``seq`` order, each exactly once, without
    gaps, also across reconnects of a networked store.  The callback only
    hands off (it must not block); it runs on the event loop.
    """

    def __init__(self) -> None:
        self._on_event: OnEvent | None = None

    def listen(self, on_event: OnEvent) -> None:
        self._on_event = on_event

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Connect and start announcing; called once."""

    async def stop(self) -> None:  # noqa: B027 - optional hook
        """Stop announcing and disconnect; called once."""

    @property
    def ready(self) -> bool:
        return True

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
    async def last_seq(self, org: str) -> int:
        """The highest seq of ``org``, 0 when it has none."""

    async def first_seq(self, org: str) -> int:
        """The lowest seq still held (a bounded store forgets old events);
        0 when it has none."""
        events = await self.read(org, after=0, limit=1)
        return events[0].seq if events else 0
