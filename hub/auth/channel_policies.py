"""Realtime Authorization: the app's RLS policies on ``realtime.messages``.

Supabase decides who may read and write a private channel by asking the
app's own database (../shared/protocol/AUTHORIZATION.md, section 2), and this
module asks the same questions the same way, so policies written for
Supabase work verbatim:

* **read** (:meth:`ChannelPolicies.can_read`): in one transaction that is
  always rolled back, insert one probe row per extension as the hub's own
  role, switch to the token's role and claims, and select the probe rows
  back.  A probe row the role can see = read allowed for that extension.
* **write** (:meth:`ChannelPolicies.can_write`): with the same settings,
  insert a probe row as the token's role.  Success = write allowed,
  ``insufficient_privilege`` (42501, which is also what an RLS ``WITH CHECK``
  violation raises) = denied.  Rolled back.

Every check is bounded: a pool of a few connections, a timeout to get one,
a server-side ``statement_timeout`` and a client-side timeout on each
statement.  Whatever goes wrong (a policy that raises, a missing partition, a
database that is down or slow) becomes a :class:`PolicyCheckFailed` whose
``reason`` is safe to show a client; the database's own message, which a
policy could fill with data, only reaches the log.

The module does no caching and knows nothing of channels or sessions: the
caller keeps results for a channel's life and decides what a client sees.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, TypeVar

import asyncpg  # type: ignore[import-untyped, unused-ignore]

from hub.auth.probe_pool import CONNECTION_ERRORS, ProbePool, claims_json
from hub.errors import ReasonError

log = logging.getLogger(__name__)

BROADCAST: Final = "broadcast"
PRESENCE: Final = "presence"
#: The extensions Supabase probes (realtime.messages.extension values).
EXTENSIONS: Final = (BROADCAST, PRESENCE)
#: The roles a token may carry into a policy check.  Supabase switches to
#: whatever role a token names; the hub's role is a member of these three
#: only (hub migrate grants them), and a token naming any other role (the
#: hub's own, ``postgres``) must never get its privileges.
ROLES: Final = frozenset({"anon", "authenticated", "service_role"})

T = TypeVar("T")


class ChannelPolicyError(ReasonError):
    """A policy check did not produce an answer.  Its ``reason`` never
    holds the database's message."""


class CheckRefused(ChannelPolicyError):
    """The request cannot be checked at all: the token's role is not one of
    :data:`ROLES`, its claims are not JSON-safe, or the topic or an
    extension is invalid.  Treat as "not allowed"; nothing reached the
    database."""

    def __init__(self, message: str) -> None:
        super().__init__("Unauthorized", message)


class PolicyCheckFailed(ChannelPolicyError):
    """The database could not answer.  ``kind`` says why, for logs and
    metrics:

    * ``policy``: a policy (or a trigger, or a function it calls) raised;
    * ``partition``: realtime.messages has no partition for now;
    * ``setup``: the database lacks what hub migrate creates (the table, the
      role, the hub role's membership in it);
    * ``timeout``: a statement ran past ``statement_timeout`` or waited on a
      lock;
    * ``busy``: no pooled connection was free within ``acquire_timeout``;
    * ``unavailable``: the database is down or the connection broke.
    """

    def __init__(self, kind: str, code: str, message: str) -> None:
        super().__init__(code, message)
        self.kind = kind


def _failed(kind: str) -> PolicyCheckFailed:
    code, message = _FAILURES[kind]
    return PolicyCheckFailed(kind, code, message)


#: kind -> (code, client-safe message).  The Supabase server's names where it
#: has one (it logs RlsPolicyError and answers the join with Unauthorized).
_FAILURES: Final[dict[str, tuple[str, str]]] = {
    "policy": ("RlsPolicyError", "Error occurred while checking the channel's policies"),
    "partition": ("MissingPartition", "realtime.messages has no partition for the current time"),
    "setup": (
        "RealtimeAuthorizationUnavailable",
        "The database is not set up for Realtime Authorization",
    ),
    "timeout": ("DatabaseTimeout", "The channel's policies took too long to check"),
    "busy": ("IncreaseConnectionPool", "Too many database timeouts"),
    "unavailable": (
        "UnableToConnectToProject",
        "Realtime was unable to connect to the project database",
    ),
}

# Each statement below is prepared once per pooled connection (asyncpg's
# statement cache).  PostgreSQL re-plans a cached plan that depends on RLS
# when the role changes, so one prepared SELECT serves every role.

#: Probe rows as the hub's role.  inserted_at is set in UTC, as Supabase's
#: server does, so the row lands in the partition named after the UTC day
#: whatever the session's time zone.
_INSERT_PROBES: Final = """
INSERT INTO realtime.messages (topic, extension, inserted_at, updated_at)
SELECT $1, ext, now() AT TIME ZONE 'UTC', now() AT TIME ZONE 'UTC'
  FROM unnest($2::text[]) AS ext
RETURNING id, extension
"""

#: The settings Supabase sets before a check, transaction-local.  The role
#: comes last: the set_config calls before it run as the hub's role.
_SET_CONTEXT: Final = """
SELECT set_config('realtime.topic', $2, true),
       set_config('request.jwt.claims', $3, true),
       set_config('request.jwt.claim.sub', $4, true),
       set_config('request.jwt.claim.role', $1, true),
       set_config('request.headers', '{}', true),
       set_config('role', $1, true)
"""

#: ``id = ANY($2)`` lets PostgreSQL type $2 after the table's id column:
#: uuid today, bigint in an older Supabase schema the hub may be reusing.
_SELECT_PROBES: Final = "SELECT id FROM realtime.messages WHERE topic = $1 AND id = ANY($2)"

#: No RETURNING: with it PostgreSQL would also apply the SELECT policies to
#: the new row, and a user allowed to send but not to receive would be
#: refused (Supabase's server dropped RETURNING for the same reason).
_INSERT_ONE: Final = """
INSERT INTO realtime.messages (topic, extension, inserted_at, updated_at)
VALUES ($1, $2, now() AT TIME ZONE 'UTC', now() AT TIME ZONE 'UTC')
"""


@dataclass(frozen=True, slots=True)
class _Context:
    """What a check sets in the database, validated and encoded."""

    role: str
    topic: str
    claims_json: str
    sub: str


def _text_ok(value: str) -> bool:
    """PostgreSQL text holds neither NUL nor lone surrogates."""
    if "\x00" in value:
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _context(claims: Mapping[str, Any], topic: str) -> _Context:
    if not isinstance(topic, str) or not topic or not _text_ok(topic):
        raise CheckRefused("The channel topic cannot be checked")
    role = claims.get("role")
    if not isinstance(role, str) or role not in ROLES:
        raise CheckRefused("The token's role may not use private channels")
    sub = claims.get("sub")
    if sub is None:
        sub = ""
    elif not isinstance(sub, str) or not _text_ok(sub):
        raise CheckRefused("Claim `sub` must be a string")
    try:
        # orjson escapes control characters, NUL included, so the JSON text
        # is always valid PostgreSQL text; it refuses lone surrogates,
        # non-string keys and integers past 64 bits.
        encoded = claims_json(claims)
    except TypeError:  # orjson.JSONEncodeError is a TypeError
        raise CheckRefused("The token's claims are not valid JSON") from None
    return _Context(role=role, topic=topic, claims_json=encoded, sub=sub)


def _extensions(extensions: Sequence[str]) -> tuple[str, ...]:
    # A lone string is a Sequence too: "broadcast" would become nine letters.
    if isinstance(extensions, str):
        extensions = (extensions,)
    wanted: list[str] = []
    for extension in extensions:
        if extension not in EXTENSIONS:
            raise CheckRefused("Unknown extension")
        if extension not in wanted:
            wanted.append(extension)
    return tuple(wanted)


#: undefined_table, undefined_column, invalid_schema_name, insufficient_privilege.
_SETUP_STATES: Final = frozenset({"42P01", "42703", "3F000", "42501"})


def _sql_failure(exc: asyncpg.PostgresError, step: str) -> PolicyCheckFailed:
    """Classify a database error raised at ``step`` (probe: the hub's own
    insert; context: the settings; check: as the token's role)."""
    sqlstate = getattr(exc, "sqlstate", None) or ""
    if isinstance(exc, asyncpg.QueryCanceledError) or sqlstate == "55P03":
        kind = "timeout"  # statement_timeout (57014) or lock_timeout (55P03)
    elif sqlstate == "23514" and "no partition" in str(exc):
        kind = "partition"
    elif sqlstate.startswith("08") or sqlstate.startswith("57P"):
        kind = "unavailable"  # connection exceptions, admin shutdown, crash
    elif step == "context" or (step == "probe" and sqlstate in _SETUP_STATES):
        # set_config('role') failed (no such role: 22023; not a member:
        # 42501), or the hub's own probe insert found realtime.messages (or
        # a column, or the schema) missing or closed to it.  The same codes
        # from a policy (a dropped app table) are the policy's failure.
        kind = "setup"
    else:
        kind = "policy"
    log.warning(
        "realtime authorization check failed at %s: %s [%s] %s",
        step,
        kind,
        sqlstate,
        exc,
    )
    return _failed(kind)


class ChannelPolicies:
    """Read and write checks against one database's ``realtime.messages``.

    No I/O until :meth:`start`; :meth:`stop` closes the pool.  Safe for
    concurrent use: each check holds one pooled connection for a few round
    trips (five for a read, four for a write).
    """

    def __init__(
        self,
        dsn: str,
        *,
        min_size: int = 0,
        max_size: int = 4,
        acquire_timeout: float = 2.0,
        statement_timeout: float = 2.0,
        application_name: str = "hub policies",
    ) -> None:
        if not 0 <= min_size <= max_size or max_size < 1:
            raise ValueError("need 0 <= min_size <= max_size and max_size >= 1")
        self._probe = ProbePool(
            dsn,
            min_size=min_size,
            max_size=max_size,
            acquire_timeout=acquire_timeout,
            statement_timeout=statement_timeout,
            application_name=application_name,
        )

    async def start(self) -> None:
        """Open the pool.  With ``min_size`` 0 (the default) this does not
        connect: a database that is down at start makes checks fail with
        PolicyCheckFailed until it is back, and never stops the hub."""
        await self._probe.start()

    async def stop(self) -> None:
        await self._probe.stop()

    # -- checks ------------------------------------------------------------------

    async def can_read(
        self, claims: Mapping[str, Any], topic: str, extensions: Sequence[str]
    ) -> dict[str, bool]:
        """Which of ``extensions`` the token behind ``claims`` may read on
        ``topic``, e.g. ``{"broadcast": True, "presence": False}``.

        All extensions are checked in one transaction.  Raises CheckRefused
        (nothing asked) or PolicyCheckFailed (no answer).
        """
        wanted = _extensions(extensions)
        context = _context(claims, topic)
        if not wanted:
            return {}
        return await self._run(lambda conn: self._read(conn, context, wanted))

    async def can_write(self, claims: Mapping[str, Any], topic: str, extension: str) -> bool:
        """Whether the token behind ``claims`` may send ``extension``
        messages (broadcast, or presence tracks) on ``topic``."""
        return (await self.can_write_many(claims, topic, (extension,)))[extension]

    async def can_write_many(
        self, claims: Mapping[str, Any], topic: str, extensions: Sequence[str]
    ) -> dict[str, bool]:
        """:meth:`can_write` for several extensions in one transaction."""
        wanted = _extensions(extensions)
        context = _context(claims, topic)
        if not wanted:
            return {}
        return await self._run(lambda conn: self._write(conn, context, wanted))

    # -- partitions --------------------------------------------------------------

    async def create_partitions(self) -> list[str]:
        """Create realtime.messages' daily partitions from yesterday to
        today + 3 (UTC) that are missing; return their names."""

        async def run(conn: asyncpg.Connection) -> list[str]:
            rows = await conn.fetch(
                "SELECT hub.realtime_create_partitions() AS name", timeout=self._probe.call_timeout
            )
            return [str(row["name"]) for row in rows]

        return await self._run(run, transaction=False)

    async def drop_old_partitions(self, retention: float = 72 * 3600.0) -> list[str]:
        """Drop the daily partitions whose rows are all older than
        ``retention`` seconds (Supabase: 72 hours); return their names."""

        async def run(conn: asyncpg.Connection) -> list[str]:
            rows = await conn.fetch(
                "SELECT hub.realtime_drop_old_partitions(make_interval(secs => $1)) AS name",
                retention,
                timeout=self._probe.call_timeout,
            )
            return [str(row["name"]) for row in rows]

        return await self._run(run, transaction=False)

    # -- internals ---------------------------------------------------------------

    async def _read(
        self, conn: asyncpg.Connection, context: _Context, wanted: tuple[str, ...]
    ) -> dict[str, bool]:
        timeout = self._probe.call_timeout
        try:
            probes = await conn.fetch(_INSERT_PROBES, context.topic, list(wanted), timeout=timeout)
        except CONNECTION_ERRORS:
            raise  # _run retries on a fresh connection
        except asyncpg.PostgresError as exc:
            raise _sql_failure(exc, "probe") from exc
        ids = {str(row["extension"]): row["id"] for row in probes}
        await self._set_context(conn, context)
        try:
            visible = await conn.fetch(
                _SELECT_PROBES, context.topic, list(ids.values()), timeout=timeout
            )
        except asyncpg.InsufficientPrivilegeError:
            # The role may not select from realtime.messages, or a policy
            # uses a table or function it may not use: it cannot read.
            return dict.fromkeys(wanted, False)
        except CONNECTION_ERRORS:
            raise
        except asyncpg.PostgresError as exc:
            raise _sql_failure(exc, "check") from exc
        seen = {row["id"] for row in visible}
        return {extension: ids[extension] in seen for extension in wanted}

    async def _write(
        self, conn: asyncpg.Connection, context: _Context, wanted: tuple[str, ...]
    ) -> dict[str, bool]:
        timeout = self._probe.call_timeout
        await self._set_context(conn, context)
        allowed: dict[str, bool] = {}
        for index, extension in enumerate(wanted):
            # A denied insert aborts the transaction; the savepoint lets the
            # next extension be tried.  The last insert needs none: nothing
            # runs after it but the rollback, so it saves a round trip.
            last = index == len(wanted) - 1
            if not last:
                await conn.execute("SAVEPOINT probe", timeout=timeout)
            try:
                await conn.execute(_INSERT_ONE, context.topic, extension, timeout=timeout)
            except asyncpg.InsufficientPrivilegeError:
                allowed[extension] = False
                if not last:
                    await conn.execute("ROLLBACK TO SAVEPOINT probe", timeout=timeout)
            except CONNECTION_ERRORS:
                raise
            except asyncpg.PostgresError as exc:
                raise _sql_failure(exc, "check") from exc
            else:
                allowed[extension] = True
        return allowed

    async def _set_context(self, conn: asyncpg.Connection, context: _Context) -> None:
        try:
            await conn.execute(
                _SET_CONTEXT,
                context.role,
                context.topic,
                context.claims_json,
                context.sub,
                timeout=self._probe.call_timeout,
            )
        except CONNECTION_ERRORS:
            raise
        except asyncpg.PostgresError as exc:
            raise _sql_failure(exc, "context") from exc

    async def _run(
        self,
        body: Callable[[asyncpg.Connection], Awaitable[T]],
        *,
        transaction: bool = True,
    ) -> T:
        """Run ``body`` on a pooled connection, inside a transaction that is
        always rolled back; retry once when the connection itself failed."""
        pool = self._probe.pool
        if pool is None:
            raise _failed("unavailable")
        for attempt in (1, 2):
            try:
                return await self._once(pool, body, transaction)
            except PolicyCheckFailed:
                raise
            except TimeoutError as exc:
                # Client-side timeout: the server did not answer at all.  Before
                # CONNECTION_ERRORS: TimeoutError is an OSError, and a server
                # that hangs is not worth a second wait.
                log.warning(
                    "realtime authorization: no answer within %.1fs", self._probe.call_timeout
                )
                raise _failed("timeout") from exc
            except CONNECTION_ERRORS as exc:
                if attempt == 2:
                    log.warning("realtime authorization: database unavailable: %r", exc)
                    raise _failed("unavailable") from exc
            except asyncpg.PostgresError as exc:
                # BEGIN or a savepoint failed: not a policy's doing.
                raise _sql_failure(exc, "transaction") from exc
        raise AssertionError("unreachable")

    async def _once(
        self,
        pool: asyncpg.Pool,
        body: Callable[[asyncpg.Connection], Awaitable[T]],
        transaction: bool,
    ) -> T:
        try:
            conn = await pool.acquire(timeout=self._probe.acquire_timeout)
        except TimeoutError as exc:
            # Either every connection is busy or connecting hangs; both mean
            # the database cannot take more checks right now.
            log.warning(
                "realtime authorization: no connection within %.1fs", self._probe.acquire_timeout
            )
            raise _failed("busy") from exc
        try:
            if not transaction:
                return await body(conn)
            # BEGIN and the SET LOCALs in one round trip (simple protocol);
            # the probe rows must never be committed, so the only way out is
            # ROLLBACK (or the connection's end).
            await conn.execute(self._probe.begin, timeout=self._probe.call_timeout)
            try:
                return await body(conn)
            finally:
                await self._rollback(conn)
        except CONNECTION_ERRORS:
            # Whatever state the connection is in, the pool must not hand it
            # out again: close it, and the retry gets a fresh one.
            conn.terminate()
            raise
        finally:
            await pool.release(conn, timeout=self._probe.call_timeout)

    async def _rollback(self, conn: asyncpg.Connection) -> None:
        if conn.is_closed():
            return
        try:
            await conn.execute("ROLLBACK", timeout=self._probe.call_timeout)
        except (*CONNECTION_ERRORS, TimeoutError, asyncpg.PostgresError):
            # A connection that cannot roll back must not be reused with a
            # transaction (and a role) still open.
            conn.terminate()
