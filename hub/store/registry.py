"""The registry of org databases (``hub orgs add|list|remove``).

``hub.org_databases`` in the control database (``HUB_DATABASE_URL``, see
``migrations/0011_org_databases.sql``) names the orgs that live in a
database of their own; an org without a row lives in the control database.
Running nodes read it once a second (:mod:`hub.store.federation`).

Adding an org checks what would otherwise lose or mix events: the tenant
database must be reachable and migrated, must not be the control database,
and neither database may already hold events of the org (an org with
events moves with ``hub orgs move``, :mod:`hub.store.moves`).  Removing an
org is refused while its database holds its events.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final
from urllib.parse import urlsplit

import asyncpg  # type: ignore[import-untyped, unused-ignore]

from hub.errors import HubError
from hub.store.base import check_org
from hub.store.migrate import migrations

if TYPE_CHECKING:
    from hub.store.postgres import PostgresStore

#: SQLSTATE of hub.append_event() for an org frozen or gone by a move.
ORG_MOVED: Final = "HB001"
#: The name ``hub orgs move --to`` takes for the control database.
CONTROL: Final = "control"


class RegistryError(HubError):
    """A registry command cannot be done (the message says why)."""


def display_name(dsn: str) -> str:
    """``host:port/database`` of a DSN: what logs, ``/readyz`` and the
    dashboard show (never the user or the password)."""
    parts = urlsplit(dsn)
    host = parts.hostname or "localhost"
    port = parts.port or 5432
    return f"{host}:{port}{parts.path or '/'}"


@contextlib.asynccontextmanager
async def connect(dsn: str, what: str = "database") -> AsyncIterator[asyncpg.Connection]:
    """A connection to ``dsn``, or RegistryError saying it is unreachable."""
    try:
        conn = await asyncpg.connect(
            dsn, timeout=5, server_settings={"application_name": "hub orgs"}
        )
    except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
        raise RegistryError(f"cannot reach the {what} {display_name(dsn)}: {exc}") from None
    try:
        yield conn
    finally:
        await conn.close()


async def identity(conn: asyncpg.Connection) -> str:
    """What tells two databases apart, whatever DSN reaches them."""
    value = await conn.fetchval(
        "SELECT (SELECT system_identifier FROM pg_control_system())::text "
        "|| '/' || current_database()"
    )
    return str(value)


async def check_migrated(conn: asyncpg.Connection, dsn: str) -> None:
    """RegistryError unless every migration of this hub is applied."""
    latest = migrations()[-1][0]
    applied = False
    if await conn.fetchval("SELECT to_regclass('hub.schema_migrations')") is not None:
        applied = bool(
            await conn.fetchval("SELECT 1 FROM hub.schema_migrations WHERE version = $1", latest)
        )
    if not applied:
        raise RegistryError(
            f"the database {display_name(dsn)} is not migrated to {latest}: "
            f"run `hub migrate --database DSN` first"
        )


async def live_events(conn: asyncpg.Connection, org: str) -> int:
    """The org's seq in that database, unless it has moved away (0)."""
    seq = await conn.fetchval(
        "SELECT seq FROM hub.org_seq WHERE org = $1 AND moved_to IS NULL", org
    )
    return int(seq or 0)


async def read_routes(store: PostgresStore) -> dict[str, str]:
    """org -> DSN of every org that lives in a tenant database."""
    rows = await store.pool.fetch("SELECT org, dsn FROM hub.org_databases")
    return {str(row["org"]): str(row["dsn"]) for row in rows}


async def add(control_dsn: str, org: str, dsn: str) -> None:
    """Register ``org`` in the database at ``dsn``."""
    check_org(org)
    async with connect(control_dsn, "control database") as control, connect(dsn) as tenant:
        await check_migrated(tenant, dsn)
        if await identity(control) == await identity(tenant):
            raise RegistryError(
                "that is the control database: orgs without a registry entry live there"
            )
        where = await control.fetchval("SELECT dsn FROM hub.org_databases WHERE org = $1", org)
        if where is not None:
            raise RegistryError(f"org {org} is already registered in {display_name(where)}")
        if moving := await control.fetchval("SELECT step FROM hub.org_moves WHERE org = $1", org):
            raise RegistryError(f"org {org} is being moved ({moving})")
        if seq := await live_events(control, org):
            raise RegistryError(
                f"org {org} has {seq} events in the control database: "
                f"move them with `hub orgs move {org} --to DSN`"
            )
        if seq := await live_events(tenant, org):
            raise RegistryError(
                f"the database {display_name(dsn)} already holds {seq} events of org {org}"
            )
        try:
            await control.execute(
                "INSERT INTO hub.org_databases (org, dsn) VALUES ($1, $2)", org, dsn
            )
        except asyncpg.UniqueViolationError:
            raise RegistryError(f"org {org} is already registered") from None


async def remove(control_dsn: str, org: str) -> str:
    """Unregister ``org`` (it lives in the control database again); return
    the name of the database it left."""
    async with connect(control_dsn, "control database") as control:
        dsn = await control.fetchval("SELECT dsn FROM hub.org_databases WHERE org = $1", org)
        if dsn is None:
            raise RegistryError(f"org {org} is not registered in a database of its own")
        if moving := await control.fetchval("SELECT step FROM hub.org_moves WHERE org = $1", org):
            raise RegistryError(f"org {org} is being moved ({moving})")
        async with connect(dsn) as tenant:
            if seq := await live_events(tenant, org):
                raise RegistryError(
                    f"org {org} has {seq} events in {display_name(dsn)}: move them back with "
                    f"`hub orgs move {org} --to {CONTROL}` instead"
                )
        await control.execute("DELETE FROM hub.org_databases WHERE org = $1", org)
    return display_name(dsn)


@dataclass(frozen=True, slots=True)
class OrgEntry:
    org: str
    database: str
    #: The org's last seq there (None: the database is unreachable).
    seq: int | None
    #: The step of a move in progress, if any.
    moving: str | None


async def entries(control_dsn: str) -> list[OrgEntry]:
    """Every registered org, and every org of a move in progress."""
    async with connect(control_dsn, "control database") as control:
        rows = await control.fetch(
            "SELECT coalesce(d.org, m.org) AS org, d.dsn, m.step FROM hub.org_databases d "
            "FULL JOIN hub.org_moves m ON m.org = d.org ORDER BY 1"
        )
        result = []
        for row in rows:
            dsn = row["dsn"]
            seq: int | None
            if dsn is None:
                seq = await live_events(control, row["org"])
            else:
                try:
                    async with connect(dsn) as tenant:
                        seq = await live_events(tenant, row["org"])
                except RegistryError:
                    seq = None
            name = display_name(dsn) if dsn else CONTROL
            result.append(OrgEntry(row["org"], name, seq, row["step"]))
    return result
