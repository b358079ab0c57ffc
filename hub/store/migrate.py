"""Versioned, idempotent schema migrations for the ``hub`` schema.

Each ``hub/store/migrations/NNNN_name.sql`` file is one version, named by
its file stem and applied once, in name order, in its own transaction;
``hub.schema_migrations`` records what was applied.  An advisory lock makes
nodes that migrate at the same time take turns.
"""

from __future__ import annotations

import logging
import re
from importlib import resources
from typing import Final

import asyncpg  # type: ignore[import-untyped, unused-ignore]

from hub.store.base import StoreError

log = logging.getLogger(__name__)

#: pg_advisory_lock key shared by every hub node ("hubmigr" in ASCII).
MIGRATION_LOCK: Final = 0x6875626D69677221
_VERSION: Final = re.compile(r"\d{4}_[a-z0-9_]+")

_BOOTSTRAP: Final = """
CREATE SCHEMA IF NOT EXISTS hub;
CREATE TABLE IF NOT EXISTS hub.schema_migrations (
    version text PRIMARY KEY,
    applied_at timestamptz NOT NULL DEFAULT now()
);
"""


def migrations() -> list[tuple[str, str]]:
    """Every ``(version, sql)`` shipped with the hub, in the order to apply."""
    found: list[tuple[str, str]] = []
    for entry in (resources.files("hub.store") / "migrations").iterdir():
        name = entry.name
        if not name.endswith(".sql"):
            continue
        version = name.removesuffix(".sql")
        if _VERSION.fullmatch(version) is None:
            raise StoreError(f"migration file {name!r} is not named NNNN_name.sql")
        found.append((version, entry.read_text(encoding="utf-8")))
    found.sort()
    return found


async def migrate(dsn: str) -> list[str]:
    """Bring the ``hub`` schema of the database at ``dsn`` up to date.

    Returns the versions this call applied (empty when nothing was pending).
    Raises the driver's exceptions (``OSError``, ``asyncpg.PostgresError``)
    when the database is unreachable or refuses a statement; a failed version
    is rolled back whole and later ones are not tried.
    """
    conn = await asyncpg.connect(dsn, server_settings={"application_name": "hub migrate"})
    conn.add_log_listener(_log_warning)
    try:
        # Session-level lock: it must outlive the per-version transactions.
        await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK)
        try:
            return await _apply_pending(conn)
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK)
    finally:
        await conn.close()


def _log_warning(_conn: asyncpg.Connection, message: asyncpg.PostgresLogMessage) -> None:
    """Log a migration's RAISE WARNING (0004 degrades a missing privilege to
    one): asyncpg drops server messages nobody listens to."""
    if message.severity == "WARNING":
        hint = getattr(message, "hint", None)
        log.warning("%s%s", message.message, f" (hint: {hint})" if hint else "")


async def _apply_pending(conn: asyncpg.Connection) -> list[str]:
    await conn.execute(_BOOTSTRAP)
    done = {row["version"] for row in await conn.fetch("SELECT version FROM hub.schema_migrations")}
    applied: list[str] = []
    for version, sql in migrations():
        if version in done:
            continue
        async with conn.transaction():
            await conn.execute(sql)
            await conn.execute("INSERT INTO hub.schema_migrations (version) VALUES ($1)", version)
        log.info("applied migration %s", version)
        applied.append(version)
    return applied


async def applied_versions(dsn: str) -> list[str]:
    """The versions recorded in ``hub.schema_migrations`` (empty when the
    schema was never migrated)."""
    conn = await asyncpg.connect(dsn, server_settings={"application_name": "hub migrate"})
    try:
        if await conn.fetchval("SELECT to_regclass('hub.schema_migrations')") is None:
            return []
        rows = await conn.fetch("SELECT version FROM hub.schema_migrations ORDER BY version")
        return [str(row["version"]) for row in rows]
    finally:
        await conn.close()
