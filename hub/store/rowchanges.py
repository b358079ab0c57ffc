"""Row changes of tables tracked without an org column: the NOTIFYs of
``hub_changes`` turned into change dicts, in order.

``hub.capture_public()`` (see ``migrations/0006_orgless_changes.sql``) sends
one NOTIFY per row change of a table tracked with ``hub track --no-org`` or
added to the publication ``supabase_realtime``, with the whole change::

    {"id", "schema", "table", "type", "record", "old_record", "columns",
     "commit_timestamp", "relid", "rls", "pk"}

or, when it would not fit, only ``{"id", "ref": true}``: the change is then
read from ``hub.change_overflow``.  These rows never enter an org's event
log; they are for the ``postgres_changes`` bindings of free-name channels.

:class:`ChangeRelay` gets the payloads from the store's LISTEN connection,
as :class:`~hub.store.broadcasts.BroadcastRelay` gets broadcasts: the driver
callback only parses and queues, references are read by tasks (at most
``fetch_concurrency`` at a time), one worker hands the changes on in the
order their NOTIFYs arrived (commit order), and past ``queue_size`` waiting
changes the newest are dropped and logged.

Best effort, as in Supabase: a change notified while the LISTEN connection
is being re-established is lost, and so is one whose overflow row cannot be
read.  Nothing is replayed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Final

from hub.store.pgjson import loads

log = logging.getLogger(__name__)

#: The NOTIFY channel ``hub.capture_public()`` announces on.
CHANGES_CHANNEL: Final = "hub_changes"

#: Row operations a change may carry.
OPERATIONS: Final = ("INSERT", "UPDATE", "DELETE")

#: Reads a change too large for its NOTIFY by id; None when it is gone.
FetchChange = Callable[[int], Awaitable[dict[str, Any] | None]]


def check_change(data: Any) -> dict[str, Any]:
    """``data`` when it is a well-formed change; raises TypeError otherwise."""
    if not isinstance(data, dict):
        raise TypeError("a change is a JSON object")
    if not isinstance(data.get("schema"), str) or not isinstance(data.get("table"), str):
        raise TypeError("schema and table must be strings")
    if data.get("type") not in OPERATIONS:
        raise TypeError("type must be INSERT, UPDATE or DELETE")
    for key in ("record", "old_record"):
        if data.get(key) is not None and not isinstance(data[key], dict):
            raise TypeError(f"{key} must be an object or null")
    if not isinstance(data.get("relid"), int) or not isinstance(data.get("pk"), list):
        raise TypeError("relid must be an integer and pk a list")
    return data


def parse_change(text: str) -> dict[str, Any] | int:
    """The change a NOTIFY carries, or the id of one to read.  Raises
    ValueError, KeyError or TypeError for anything else."""
    data = loads(text)
    if isinstance(data, dict) and data.get("ref"):
        change_id = data["id"]
        if not isinstance(change_id, int) or isinstance(change_id, bool):
            raise TypeError("id must be an integer")
        return change_id
    return check_change(data)


class ChangeRelay:
    """Parses ``hub_changes`` NOTIFYs and hands the changes to ``deliver``
    in arrival order; references are resolved with ``fetch``.

    ``deliver`` runs on the event loop and must not block; what it raises is
    logged.  Constructing it does nothing; :meth:`start` starts the worker,
    :meth:`stop` ends it and the reads in flight.
    """

    def __init__(
        self,
        fetch: FetchChange,
        deliver: Callable[[dict[str, Any]], None],
        *,
        queue_size: int = 10_000,
        fetch_concurrency: int = 2,
    ) -> None:
        self._fetch = fetch
        self._deliver = deliver
        self._queue: asyncio.Queue[dict[str, Any] | asyncio.Task[dict[str, Any] | None]] = (
            asyncio.Queue(queue_size)
        )
        self._reads = asyncio.Semaphore(fetch_concurrency)
        self._worker: asyncio.Task[None] | None = None
        #: Changes received (whole or by reference).
        self.received = 0
        #: Changes read from hub.change_overflow.
        self.fetched = 0
        #: Changes lost: queue full, malformed, or their overflow row unreadable.
        self.dropped = 0

    def start(self) -> None:
        if self._worker is None:
            self._worker = asyncio.create_task(self._work_forever(), name="hub-row-changes")

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
        """A NOTIFY payload of :data:`CHANGES_CHANNEL` (driver callback:
        parse and hand off only)."""
        self.received += 1
        try:
            parsed = parse_change(text)
        except (ValueError, KeyError, TypeError):
            self.dropped += 1
            log.error("ignoring a malformed row change: %.200s", text)
            return
        if self._queue.full():
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 1000 == 0:
                log.warning(
                    "row changes are arriving faster than they are delivered: %d dropped so far",
                    self.dropped,
                )
            return
        if isinstance(parsed, dict):
            self._queue.put_nowait(parsed)
        else:
            self._queue.put_nowait(asyncio.create_task(self._read(parsed), name="hub-change-read"))

    async def _read(self, change_id: int) -> dict[str, Any] | None:
        async with self._reads:
            return await self._fetch(change_id)

    async def _work_forever(self) -> None:
        while True:
            item = await self._queue.get()
            if isinstance(item, asyncio.Task):
                try:
                    change = await item
                except Exception as exc:
                    self.dropped += 1
                    log.warning("cannot read a row change from hub.change_overflow: %r", exc)
                    continue
                if change is None:
                    self.dropped += 1
                    log.warning("a row change is gone from hub.change_overflow")
                    continue
                self.fetched += 1
            else:
                change = item
            try:
                self._deliver(change)
            except Exception:
                log.exception("row change callback failed for %.100r", change.get("table"))
