"""The bounded pool that Realtime Authorization's checks run on, shared by
the channel policies (:mod:`hub.auth.channel_policies`) and the row
security of ``postgres_changes`` (:mod:`hub.auth.row_security`).

Both run short transactions that are always rolled back, as the token's
role, against the app's database; both must never block the event loop or
hold the database for long.  What they share is here: the pool (which
connects on first use, so a database that is down never stops the hub),
the server-side timeouts every check transaction starts with, the errors
that mean the connection (not the check) failed, and the claims as JSON.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any, Final

import asyncpg  # type: ignore[import-untyped, unused-ignore]
import orjson

#: Errors meaning the connection, not the check, failed: retried once on a
#: fresh connection, since a pooled connection may have died while idle
#: (database restart, failover) and the pool only notices on use.
CONNECTION_ERRORS: Final = (
    OSError,
    asyncpg.InterfaceError,
    # The protocol is out of step with the server, e.g. after the server
    # ended the session (a FATAL arrives while the connection sits idle).
    asyncpg.InternalClientError,
    # SQLSTATE class 08, ConnectionDoesNotExistError included.  These are
    # PostgresErrors too: every handler of PostgresError lets them pass first.
    asyncpg.PostgresConnectionError,
    asyncpg.CannotConnectNowError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
)


def _mapping_default(value: object) -> object:
    # Claims arrive as Mappings (the verifier's dicts, or read-only views of
    # them); orjson only knows dict.  Anything else is not JSON.
    if isinstance(value, Mapping):
        return dict(value)
    raise TypeError(f"{type(value).__name__} is not JSON")


def claims_json(claims: Mapping[str, Any]) -> str:
    """The claims as ``request.jwt.claims`` takes them; TypeError when they
    are not JSON-safe (integers past 64 bits, lone surrogates, objects)."""
    return orjson.dumps(claims, default=_mapping_default).decode()


class ProbePool:
    """A small asyncpg pool for check transactions.  No I/O until
    :meth:`start`; :meth:`stop` closes it, cut short after
    :attr:`call_timeout`."""

    def __init__(
        self,
        dsn: str,
        *,
        min_size: int = 0,
        max_size: int = 4,
        acquire_timeout: float = 2.0,
        statement_timeout: float = 2.0,
        application_name: str,
    ) -> None:
        self.dsn = dsn
        self.min_size = min_size
        self.max_size = max_size
        self.acquire_timeout = acquire_timeout
        self.application_name = application_name
        # Server-side timeouts are the real bound (they stop the work on the
        # server); the client-side one, a second later, only covers a
        # connection that stopped answering altogether.
        self.call_timeout = statement_timeout + 1.0
        ms = max(1, int(statement_timeout * 1000))
        #: How every check transaction starts (one round trip).
        self.begin = (
            "BEGIN;"
            f" SET LOCAL statement_timeout = {ms};"
            f" SET LOCAL lock_timeout = {ms};"
            # A hub that stalls mid-check (a stuck event loop) must not hold
            # locks and a probe transaction open on the server indefinitely.
            f" SET LOCAL idle_in_transaction_session_timeout = {ms * 5}"
        )
        self.pool: asyncpg.Pool | None = None

    async def start(self) -> None:
        if self.pool is not None:
            return
        self.pool = await asyncpg.create_pool(
            self.dsn,
            min_size=self.min_size,
            max_size=self.max_size,
            timeout=self.acquire_timeout,
            command_timeout=self.call_timeout,
            # Each connection is a backend of the app's database, whose
            # connection budget is the app's: give idle ones back.
            max_inactive_connection_lifetime=60.0,
            server_settings={"application_name": self.application_name},
        )

    async def stop(self) -> None:
        pool, self.pool = self.pool, None
        if pool is not None:
            try:
                await asyncio.wait_for(pool.close(), self.call_timeout)
            except TimeoutError:
                pool.terminate()
