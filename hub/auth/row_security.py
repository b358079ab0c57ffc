"""Row security for ``postgres_changes``: which subscribers may see a
changed row of a table with RLS enabled, and which of its columns.

Supabase checks each change once per subscriber, one query at a time on one
connection (../shared/protocol/AUTHORIZATION.md, section 4), its known
bottleneck.  Here one change is checked for all its subscribers in **one
call**, ``hub.rls_visible()`` (``migrations/0007_rls_prepared_lookup.sql``),
given each distinct subscriber context (role, claims) once: subscribers
who share a token's claims (one user's tabs) cost one lookup together, and
the whole check is one round trip whatever the number of contexts.  Inside,
for each context, the function switches to the role with
``request.jwt.claims``, ``request.jwt.claim.sub`` and
``request.jwt.claim.role`` set, and runs Supabase's
``select exists(select 1 from <table> where <pk> = <value>)`` (a prepared
statement of the pool connection, planned once per table and role), so the
table's own policies decide; it also returns the columns each role may
read.  The call runs in a transaction that is always rolled back, on a
pool of a few connections, with a server-side statement timeout, so it
never blocks the event loop and never holds the database for long.

Whatever goes wrong becomes a :class:`RowCheckFailed`; the caller drops the
change for the subscribers it was checking and logs.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import asyncpg  # type: ignore[import-untyped, unused-ignore]
import orjson

from hub.auth.channel_policies import ROLES
from hub.auth.probe_pool import CONNECTION_ERRORS, ProbePool, claims_json
from hub.errors import HubError

log = logging.getLogger(__name__)

_CHECK: Final = (
    "SELECT idx, visible, readable FROM hub.rls_visible($1::oid, $2::text::jsonb, $3::text::jsonb)"
)


class RowCheckFailed(HubError):
    """A row check produced no answer (a policy raised, the table has no
    primary key, the database is down, busy or slow)."""


class ContextRefused(HubError):
    """A subscriber's token cannot be taken into a row check: its role is
    not one of anon, authenticated, service_role, or its claims are not
    JSON-safe.  Such a subscriber gets no row of an RLS table."""


@dataclass(frozen=True, slots=True)
class Context:
    """One subscriber context of a check: what ``hub.rls_visible()`` sets."""

    role: str
    claims_json: str
    sub: str


@dataclass(frozen=True, slots=True)
class Verdict:
    """For one context: whether it may see the row, and the columns its
    role may read (a row it may see is cut to them)."""

    visible: bool
    readable: frozenset[str]


def context_of(role: str, claims: Mapping[str, Any]) -> Context:
    """The context a subscriber's role and claims give; ContextRefused
    when they cannot be used (the hub's own role must never be assumed)."""
    if role not in ROLES:
        raise ContextRefused(f"role {role!r} may not read rows of RLS tables")
    sub = claims.get("sub")
    if sub is None:
        sub = ""
    if not isinstance(sub, str) or "\x00" in sub:
        raise ContextRefused("claim `sub` must be a string")
    try:
        encoded = claims_json(claims)
    except TypeError:
        raise ContextRefused("the token's claims are not valid JSON") from None
    return Context(role, encoded, sub)


class RowSecurity:
    """Row checks against one database.  No I/O until :meth:`start`;
    :meth:`stop` closes the pool.  Safe for concurrent use: each check holds
    one pooled connection for three round trips (BEGIN, the call,
    ROLLBACK)."""

    def __init__(
        self,
        dsn: str,
        *,
        max_size: int = 4,
        acquire_timeout: float = 2.0,
        statement_timeout: float = 2.0,
        application_name: str = "hub rows",
    ) -> None:
        self._probe = ProbePool(
            dsn,
            max_size=max_size,
            acquire_timeout=acquire_timeout,
            statement_timeout=statement_timeout,
            application_name=application_name,
        )

    async def start(self) -> None:
        """Open the pool (it connects on first use: a database that is down
        makes checks fail until it is back, and never stops the hub)."""
        await self._probe.start()

    async def stop(self) -> None:
        await self._probe.stop()

    async def check(
        self, relid: int, record: Mapping[str, Any], contexts: Sequence[Context]
    ) -> list[Verdict]:
        """One verdict per context, in order, for the row ``record`` (whose
        primary key is looked up) of table ``relid``.  Raises
        RowCheckFailed."""
        if not contexts:
            return []
        groups = orjson.dumps([[c.role, c.claims_json, c.sub] for c in contexts]).decode()
        try:
            row_json = orjson.dumps(record).decode()
        except TypeError:
            raise RowCheckFailed("the row is not JSON") from None
        pool = self._probe.pool
        if pool is None:
            raise RowCheckFailed("row checks are not started")
        for attempt in (1, 2):
            try:
                rows = await self._once(pool, relid, row_json, groups)
            except TimeoutError as exc:
                raise RowCheckFailed(f"no answer within {self._probe.call_timeout:.1f}s") from exc
            except CONNECTION_ERRORS as exc:
                if attempt == 2:
                    raise RowCheckFailed(f"database unavailable: {exc!r}") from exc
                continue
            except asyncpg.PostgresError as exc:
                raise RowCheckFailed(f"[{exc.sqlstate}] {exc}") from exc
            verdicts = [Verdict(False, frozenset())] * len(contexts)
            for row in rows:
                verdicts[row["idx"]] = Verdict(bool(row["visible"]), frozenset(row["readable"]))
            return verdicts
        raise AssertionError("unreachable")

    async def _once(
        self, pool: asyncpg.Pool, relid: int, row_json: str, groups: str
    ) -> list[asyncpg.Record]:
        try:
            conn = await pool.acquire(timeout=self._probe.acquire_timeout)
        except TimeoutError as exc:
            raise RowCheckFailed("no database connection free for row checks") from exc
        try:
            await conn.execute(self._probe.begin, timeout=self._probe.call_timeout)
            try:
                rows: list[asyncpg.Record] = await conn.fetch(
                    _CHECK, relid, row_json, groups, timeout=self._probe.call_timeout
                )
                return rows
            finally:
                if not conn.is_closed():
                    try:
                        # The role and claims were set for the transaction
                        # only: the rollback is what takes them away.
                        await conn.execute("ROLLBACK", timeout=self._probe.call_timeout)
                    except (*CONNECTION_ERRORS, TimeoutError, asyncpg.PostgresError):
                        conn.terminate()
        except CONNECTION_ERRORS:
            conn.terminate()
            raise
        finally:
            await pool.release(conn, timeout=self._probe.call_timeout)
