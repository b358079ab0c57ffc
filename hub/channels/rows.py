"""Row changes of tables tracked without an org column, to the
``postgres_changes`` bindings of free-name channels, with row security.

The store hands each change over in commit order
(:meth:`~hub.store.base.EventStore.listen_changes`).  :class:`RowFeed`:

* finds the subscriptions whose bindings match, on free-name channels only
  (:meth:`~hub.channels.fanout.Channels.free_matches`): an ``org:`` topic
  never gets these rows;
* on a table with RLS enabled, for INSERT and UPDATE, groups those
  subscriptions by distinct context (role, claims) and asks once for all
  of them (:class:`RowCheck`, :mod:`hub.auth.row_security`); each gets the
  row only when its context may select it, cut to the columns its role may
  read.  DELETE goes to every matching subscription, cut to the primary
  key (its ``old_record`` already is, in the database; ``columns`` here).  Tables without RLS go
  to every matching subscription, as captured;
* delivers in commit order: checks run concurrently (bounded by the
  checker's pool), and one worker hands the results to the fan-out in the
  order the changes arrived.

A check that fails drops the change for the subscriptions it was for, and
is logged; so is a subscriber whose token cannot be used in a check (a role
other than anon, authenticated and service_role).  Best effort, as the
changes themselves: past ``queue_size`` waiting changes the newest are
dropped, and logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from hub.auth.row_security import Context, ContextRefused, Verdict, context_of
from hub.channels.fanout import Channels, change_data
from hub.channels.subscription import Subscription
from hub.errors import HubError

log = logging.getLogger(__name__)

_Targets = list[tuple[Subscription, tuple[int, ...]]]
_Rows = list[tuple[Subscription, tuple[int, ...], dict[str, Any]]]


class RowCheck(Protocol):
    """Which contexts may see a row (:meth:`hub.auth.row_security.RowSecurity.check`)."""

    async def check(
        self, relid: int, record: Mapping[str, Any], contexts: Sequence[Context]
    ) -> list[Verdict]: ...


def _cut(data: dict[str, Any], readable: frozenset[str]) -> dict[str, Any]:
    """``data`` with only the columns in ``readable``."""
    cut = dict(data)
    for key in ("record", "old_record"):
        if isinstance(data.get(key), dict):
            cut[key] = {k: v for k, v in data[key].items() if k in readable}
    cut["columns"] = [c for c in data.get("columns") or () if c.get("name") in readable]
    return cut


class RowFeed:
    """Offers row changes of tables without an org column to this node's
    free-name channels.  The node hands :meth:`on_change` to the store.
    ``check`` answers row checks; without one (no database) rows of RLS
    tables are never delivered.  No I/O of its own; :meth:`start` starts
    the worker, :meth:`stop` ends it and the checks in flight."""

    def __init__(
        self,
        channels: Channels,
        check: RowCheck | None,
        *,
        queue_size: int = 10_000,
        checks: int = 4,
        max_contexts_cached: int = 100_000,
    ) -> None:
        self.channels = channels
        self._check = check
        self._queue: asyncio.Queue[tuple[dict[str, Any], asyncio.Future[_Rows]]] = asyncio.Queue(
            queue_size
        )
        self._worker: asyncio.Task[None] | None = None
        # (id(claims), role) -> (claims, context): a token's claims are one
        # shared object for as long as it is in use, so each is encoded once
        # (the claims are kept to make sure the id is still theirs).
        self._contexts: dict[tuple[int, str], tuple[Mapping[str, Any], Context | None]] = {}
        # Checks wait here rather than for a pooled connection (whose wait
        # is bounded and would fail them under a burst).
        self._checks = asyncio.Semaphore(checks)
        self._max_contexts = max_contexts_cached
        #: Changes handed to the fan-out / dropped (queue full, check failed).
        self.delivered = 0
        self.dropped = 0

    def start(self) -> None:
        if self._worker is None:
            self._worker = asyncio.create_task(self._work_forever(), name="hub-row-feed")

    async def stop(self) -> None:
        worker, self._worker = self._worker, None
        if worker is not None:
            worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await worker
        while not self._queue.empty():
            self._queue.get_nowait()[1].cancel()

    def on_change(self, change: dict[str, Any]) -> None:
        """The store's callback: one change, in commit order."""
        targets = self.channels.free_matches(change)
        if not targets:
            return  # nobody listens: no check, no frame
        if self._queue.full():
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 1000 == 0:
                log.warning("row changes wait too long for their checks: %d dropped", self.dropped)
            return
        future: asyncio.Future[_Rows]
        if change.get("rls") and change.get("type") in ("INSERT", "UPDATE"):
            future = asyncio.ensure_future(self._checked(change, targets))
        else:
            data = change_data(change)
            if change.get("rls"):
                # A DELETE is not checked: it names the primary key only
                # (old_record is cut in the database), so its column list
                # must not reveal the others either.
                data = _cut(data, frozenset(change.get("pk") or ()))
            future = asyncio.get_running_loop().create_future()
            future.set_result([(sub, ids, data) for sub, ids in targets])
        self._queue.put_nowait((change, future))

    def _context(self, sub: Subscription) -> Context | None:
        principal = sub.principal
        claims = principal.claims
        key = (id(claims), principal.role)
        cached = self._contexts.get(key)
        if cached is not None and cached[0] is claims:
            return cached[1]
        context: Context | None
        try:
            # The claims' role is the one the token names; the principal's
            # is the same, kept when the verifier keeps no claims.
            context = context_of(principal.role, claims)
        except ContextRefused as exc:
            log.warning("no rows of RLS tables for %s: %s", sub.conn_id, exc)
            context = None
        if len(self._contexts) >= self._max_contexts:
            self._contexts.clear()
        self._contexts[key] = (claims, context)
        return context

    async def _checked(self, change: dict[str, Any], targets: _Targets) -> _Rows:
        """The rows each target may see of an INSERT or UPDATE on an RLS
        table: one check for all distinct contexts."""
        groups: dict[Context, list[tuple[Subscription, tuple[int, ...]]]] = {}
        for sub, ids in targets:
            context = self._context(sub)
            if context is not None:
                groups.setdefault(context, []).append((sub, ids))
        if not groups or self._check is None:
            return []
        contexts = list(groups)
        try:
            async with self._checks:
                verdicts = await self._check.check(
                    int(change["relid"]), change.get("record") or {}, contexts
                )
        except HubError as exc:
            self.dropped += 1
            log.warning(
                "dropping a %s on %s.%s for %d subscribers: its row check failed: %s",
                change.get("type"),
                change.get("schema"),
                change.get("table"),
                len(targets),
                exc,
            )
            return []
        data = change_data(change)
        cuts: dict[frozenset[str], dict[str, Any]] = {}
        rows: _Rows = []
        for context, verdict in zip(contexts, verdicts, strict=True):
            if not verdict.visible:
                continue
            cut = cuts.get(verdict.readable)
            if cut is None:
                cut = cuts[verdict.readable] = _cut(data, verdict.readable)
            rows.extend((sub, ids, cut) for sub, ids in groups[context])
        return rows

    async def _work_forever(self) -> None:
        while True:
            change, future = await self._queue.get()
            try:
                rows = await future
            except Exception:
                self.dropped += 1
                log.exception("row change for %.100r failed", change.get("table"))
                continue
            if rows:
                self.channels.deliver_rows(rows)
                self.delivered += 1
