"""Projections in the database: register, list, retry, remove and rebuild.

A projection is a handler registered under a name (``hub.projections``,
``migrations/0008_projections.sql``): the node's runner
(:mod:`hub.projections.runner`) folds each org's events into it through
``hub.project()``, which commits the handler's writes and the per-org
checkpoint in one transaction.  These functions are what ``hub projections
...`` calls; each opens its own connection.

A rebuild replays the log into a scratch schema (``<schema>__rebuild``)
holding empty copies of the read model's tables, then switches: in one
transaction, with the projection's running batches held off (an exclusive
advisory lock that ``hub.project()`` takes shared), it catches the copy up
with the log, replaces the rows of each live table with the copy's, and
moves the checkpoints.  Readers see the old state or the new one, never a
mix.  ``--until TIME`` replays the events created up to TIME into
``<schema>_at_<YYYYMMDD_HHMMSS>`` (UTC) instead and leaves it there, the read
model as it was at that time; nothing live changes.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass
from typing import Any, Final

import asyncpg  # type: ignore[import-untyped, unused-ignore]

from hub.errors import HubError

log = logging.getLogger(__name__)

#: ``pg_advisory_*lock(PROJECTION_LOCK, hashtext(name))``: hub.project()
#: takes it shared, a rebuild's switch exclusively ("hubp").
PROJECTION_LOCK: Final = 1752523376
#: Held by a rebuild for its whole run, so two never run at once ("hubr").
REBUILD_LOCK: Final = 1752523378
#: Events per org per hub.project() call of a rebuild.
REBUILD_BATCH: Final = 1000


class ProjectionError(HubError):
    """A projection cannot be registered, found, or rebuilt."""


@dataclass(frozen=True, slots=True)
class OrgPosition:
    """One projection's position in one org's log."""

    projection: str
    org: str
    head: int
    seq: int
    applied: int
    error: str | None
    error_seq: int | None

    @property
    def lag(self) -> int:
        return self.head - self.seq


async def _connect(dsn: str) -> asyncpg.Connection:
    return await asyncpg.connect(dsn, server_settings={"application_name": "hub projections"})


def _failure(exc: asyncpg.PostgresError) -> ProjectionError:
    hint = getattr(exc, "hint", None)
    return ProjectionError(f"{exc}" + (f" ({hint})" if hint else ""))


async def register(
    dsn: str,
    name: str,
    handler: str,
    *,
    types: list[str] | None = None,
    schema: str = "public",
    run_as: str | None = None,
    batch: bool = False,
) -> None:
    """Register ``handler`` (``schema.function(hub.events)``, or
    ``(text[], bigint[], bigint[])`` with ``batch``) as projection ``name``
    writing the tables of ``schema``.  Raises ProjectionError when the name
    is taken, the handler or schema does not exist, or the handler has the
    wrong signature."""
    conn = await _connect(dsn)
    try:
        await conn.execute(
            "SELECT hub.register_projection($1, $2::regprocedure, $3, $4, $5, $6)",
            name,
            handler,
            types,
            schema,
            run_as,
            "batch" if batch else "event",
        )
    except asyncpg.PostgresError as exc:
        raise _failure(exc) from None
    finally:
        await conn.close()


async def remove(dsn: str, name: str) -> None:
    """Unregister ``name`` and forget its checkpoints (its tables stay)."""
    conn = await _connect(dsn)
    try:
        if await conn.fetchval("DELETE FROM hub.projections WHERE name = $1 RETURNING 1", name):
            return
        raise ProjectionError(f"no projection {name!r}")
    finally:
        await conn.close()


async def positions(dsn: str) -> list[OrgPosition]:
    """Every projection's position in every org, by projection then org."""
    conn = await _connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT projection, org, head, seq, coalesce(applied, 0) AS applied, error, "
            "error_seq FROM hub.projection_lag ORDER BY projection, org"
        )
    finally:
        await conn.close()
    return [OrgPosition(**dict(row)) for row in rows]


async def projections(dsn: str) -> list[dict[str, Any]]:
    """The registered projections (name, handler, mode, types, schema, role)."""
    conn = await _connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT name, handler::text AS handler, mode, event_types, target_schema, run_as "
            "FROM hub.projections ORDER BY name"
        )
    finally:
        await conn.close()
    return [dict(row) for row in rows]


async def retry(dsn: str, name: str, org: str | None = None) -> int:
    """Run the stopped orgs of ``name`` (or only ``org``) again now, from
    the event that failed; returns how many were retried.  The runner also
    retries them on its own (``HUB_PROJECTION_RETRY``)."""
    conn = await _connect(dsn)
    try:
        target = await conn.fetchval(
            "SELECT target_schema FROM hub.projections WHERE name = $1", name
        )
        if target is None:
            raise ProjectionError(f"no projection {name!r}")
        orgs = [
            row["org"]
            for row in await conn.fetch(
                "SELECT org FROM hub.projection_checkpoints WHERE projection = $1 "
                "AND target = $2 AND error IS NOT NULL AND ($3::text IS NULL OR org = $3)",
                name,
                target,
                org,
            )
        ]
        if orgs:
            await conn.fetch(
                "SELECT * FROM hub.project($1, $2, $3, $4, NULL, true)",
                name,
                target,
                orgs,
                REBUILD_BATCH,
            )
        return len(orgs)
    finally:
        await conn.close()


async def rebuild(dsn: str, name: str, *, until: dt.datetime | None = None) -> str:
    """Rebuild ``name`` from the log; returns the schema the result is in
    (the live one, or with ``until`` the point-in-time copy).  Raises
    ProjectionError when another rebuild of ``name`` runs, the projection is
    unknown, or its handler raises (the live read model is then untouched)."""
    conn = await _connect(dsn)
    try:
        if not await conn.fetchval(
            "SELECT pg_try_advisory_lock($1, hashtext($2))", REBUILD_LOCK, name
        ):
            raise ProjectionError(f"a rebuild of {name!r} is already running")
        row = await conn.fetchrow(
            "SELECT target_schema, run_as FROM hub.projections WHERE name = $1", name
        )
        if row is None:
            raise ProjectionError(f"no projection {name!r}")
        live, run_as = str(row["target_schema"]), row["run_as"]
        if until is None:
            scratch = f"{live}__rebuild"
        else:
            scratch = f"{live}_at_{until.astimezone(dt.UTC):%Y%m%d_%H%M%S}"
        tables = await _copy_tables(conn, live, scratch, run_as)
        try:
            await _replay(conn, name, scratch, until)
            if until is not None:
                await _forget(conn, name, scratch)
                return scratch
            await _switch(conn, name, live, scratch, tables)
        except BaseException:
            await _drop_scratch(conn, name, scratch)
            raise
        await _drop_scratch(conn, name, scratch)
        return live
    finally:
        await conn.close()


async def _copy_tables(
    conn: asyncpg.Connection, live: str, scratch: str, run_as: str | None
) -> list[str]:
    """Empty copies of ``live``'s tables in a fresh ``scratch`` schema;
    returns their names."""
    tables = [
        str(row["relname"])
        for row in await conn.fetch(
            "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = $1 AND c.relkind IN ('r', 'p') ORDER BY 1",
            live,
        )
    ]
    async with conn.transaction():
        await conn.execute(f'DROP SCHEMA IF EXISTS "{scratch}" CASCADE')
        await conn.execute(f'CREATE SCHEMA "{scratch}"')
        for table in tables:
            await conn.execute(
                f'CREATE TABLE "{scratch}"."{table}" (LIKE "{live}"."{table}" INCLUDING ALL)'
            )
        if run_as is not None:
            await conn.execute(f'GRANT USAGE ON SCHEMA "{scratch}" TO "{run_as}"')
            await conn.execute(f'GRANT ALL ON ALL TABLES IN SCHEMA "{scratch}" TO "{run_as}"')
    return tables


async def _replay(
    conn: asyncpg.Connection, name: str, target: str, until: dt.datetime | None
) -> None:
    """Run ``name`` into ``target`` from seq 0 until no org moves."""
    await _forget(conn, name, target)
    await _advance(conn, name, target, until)


async def _advance(
    conn: asyncpg.Connection, name: str, target: str, until: dt.datetime | None
) -> None:
    """Run ``name`` into ``target`` from its checkpoints until no org
    moves; a handler's error aborts with ProjectionError."""
    orgs = [str(row["org"]) for row in await conn.fetch("SELECT org FROM hub.org_seq")]
    seqs: dict[str, int] = {}
    while orgs:
        rows = await conn.fetch(
            "SELECT * FROM hub.project($1, $2, $3, $4, $5, true)",
            name,
            target,
            orgs,
            REBUILD_BATCH,
            until,
        )
        moved = []
        for row in rows:
            org, seq = str(row["org"]), int(row["seq"])
            if row["error"] is not None:
                raise ProjectionError(
                    f"rebuild of {name!r} stopped: org {org!r}, the event after seq {seq}: "
                    f"{row['error']}"
                )
            if seq > seqs.get(org, -1):
                moved.append(org)
            seqs[org] = seq
        orgs = moved


async def _switch(
    conn: asyncpg.Connection, name: str, live: str, scratch: str, tables: list[str]
) -> None:
    async with conn.transaction():
        # Held off: every running batch of this projection (they take the
        # lock shared), until this transaction ends.
        await conn.execute("SELECT pg_advisory_xact_lock($1, hashtext($2))", PROJECTION_LOCK, name)
        # What committed since the replay: caught up inside the switch.
        await _advance(conn, name, scratch, None)
        for table in tables:
            await conn.execute(f'TRUNCATE "{live}"."{table}"')
            await conn.execute(
                f'INSERT INTO "{live}"."{table}" OVERRIDING SYSTEM VALUE '
                f'SELECT * FROM "{scratch}"."{table}"'
            )
        await conn.execute(
            "DELETE FROM hub.projection_checkpoints WHERE projection = $1 AND target = $2",
            name,
            live,
        )
        await conn.execute(
            "UPDATE hub.projection_checkpoints SET target = $3 "
            "WHERE projection = $1 AND target = $2",
            name,
            scratch,
            live,
        )
    log.info("projection %s rebuilt and switched in", name)


async def _forget(conn: asyncpg.Connection, name: str, target: str) -> None:
    await conn.execute(
        "DELETE FROM hub.projection_checkpoints WHERE projection = $1 AND target = $2",
        name,
        target,
    )


async def _drop_scratch(conn: asyncpg.Connection, name: str, scratch: str) -> None:
    await _forget(conn, name, scratch)
    await conn.execute(f'DROP SCHEMA IF EXISTS "{scratch}" CASCADE')
