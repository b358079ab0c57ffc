"""Best-effort NOTIFY relays: payloads of one channel turned into values and
handed on in the order their NOTIFYs arrived (commit order).

The store's LISTEN connection feeds :meth:`NotifyRelay.on_notify`.  The
driver callback only parses and queues; a payload too large for its NOTIFY
arrives as a :class:`Reference`, read by a task (at most
``fetch_concurrency`` at a time); one worker awaits each item in order and
hands it to ``deliver``.  Past ``queue_size`` waiting items the newest are
dropped and logged.  Best effort, as in Supabase: nothing is replayed.

Used for broadcasts sent from the database (:mod:`hub.store.broadcasts`)
and rows of tables without an org column (:mod:`hub.store.rowchanges`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")
K = TypeVar("K")


@dataclass(frozen=True, slots=True)
class Reference(Generic[K]):
    """A NOTIFY that names its value instead of carrying it: ``key`` is
    what ``fetch`` reads it by."""

    key: K


@dataclass(frozen=True, slots=True)
class RelayNames:
    """How a relay's logs name what it carries."""

    #: One item, e.g. "database broadcast".
    what: str
    #: Where a referenced item is read from, e.g. "realtime.messages".
    source: str
    #: Prefix of the worker's and the reads' task names.
    task: str


class NotifyRelay(Generic[T, K]):
    """Parses NOTIFY payloads with ``parse`` (a value, or a Reference to read
    with ``fetch``; ValueError, KeyError or TypeError for a malformed one)
    and hands the values to ``deliver`` in arrival order.

    ``deliver`` runs on the event loop and must not block; what it raises is
    logged with ``label(value)``.  Constructing it does nothing;
    :meth:`start` starts the worker, :meth:`stop` ends it and the reads in
    flight.
    """

    def __init__(
        self,
        parse: Callable[[str], T | Reference[K]],
        fetch: Callable[[K], Awaitable[T | None]],
        deliver: Callable[[T], None],
        *,
        names: RelayNames,
        label: Callable[[T], object],
        queue_size: int = 10_000,
        fetch_concurrency: int = 2,
    ) -> None:
        self._parse = parse
        self._fetch = fetch
        self._deliver = deliver
        self._names = names
        self._label = label
        self._queue: asyncio.Queue[T | asyncio.Task[T | None]] = asyncio.Queue(queue_size)
        self._reads = asyncio.Semaphore(fetch_concurrency)
        self._worker: asyncio.Task[None] | None = None
        #: Items received (whole or by reference).
        self.received = 0
        #: Items read because their NOTIFY held a reference.
        self.fetched = 0
        #: Items lost: queue full, malformed, or their row unreadable.
        self.dropped = 0

    def start(self) -> None:
        if self._worker is None:
            self._worker = asyncio.create_task(self._work_forever(), name=self._names.task)

    async def stop(self) -> None:
        worker, self._worker = self._worker, None
        if worker is not None:
            worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await worker
        while not self._queue.empty():
            item = self._queue.get_nowait()
            if isinstance(item, asyncio.Task):
                item.cancel()

    def on_notify(self, text: str) -> None:
        """One NOTIFY payload (driver callback: parse and hand off only)."""
        self.received += 1
        what = self._names.what
        try:
            parsed = self._parse(text)
        except (ValueError, KeyError, TypeError):
            self.dropped += 1
            log.error("ignoring a malformed %s: %.200s", what, text)
            return
        if self._queue.full():
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 1000 == 0:
                log.warning(
                    "%ss are arriving faster than they are delivered: %d dropped so far",
                    what,
                    self.dropped,
                )
            return
        if isinstance(parsed, Reference):
            name = self._names.task + "-read"
            self._queue.put_nowait(asyncio.create_task(self._read(parsed.key), name=name))
        else:
            self._queue.put_nowait(parsed)

    async def _read(self, key: K) -> T | None:
        async with self._reads:
            return await self._fetch(key)

    async def _work_forever(self) -> None:
        what, source = self._names.what, self._names.source
        while True:
            item = await self._queue.get()
            if isinstance(item, asyncio.Task):
                try:
                    value = await item
                except Exception as exc:
                    self.dropped += 1
                    log.warning("cannot read a %s from %s: %r", what, source, exc)
                    continue
                if value is None:
                    self.dropped += 1
                    log.warning("a %s is gone from %s", what, source)
                    continue
                self.fetched += 1
            else:
                value = item
            try:
                self._deliver(value)
            except Exception:
                log.exception("%s callback failed for %.100r", what, self._label(value))
