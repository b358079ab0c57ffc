"""Retention of the event log: daily partitions, dropped whole past
``HUB_RETENTION``, optionally archived first.

``hub.events`` is partitioned by ``created_at``, one partition per UTC day
(``migrations/0010_event_partitions.sql``).  :func:`maintain` is what a
node runs every :data:`MAINTENANCE_INTERVAL` seconds (and ``hub archive``
runs by hand): it creates the partitions of the next days, then drops each
partition whose whole day is older than the retention, unless a projection
has not applied all of its events yet (it waits, and says which one), and
deletes the default partition's rows past the retention the same way (rows
land there only while no node made partitions; they are never moved, see
the migration).
With an archive directory, each partition is first written to
``<dir>/<database>-<partition>.jsonl.gz``, one JSON object per event
(``org, seq, id, kind, type, payload, created_at``; oldest first per org),
complete and renamed into place before the partition is dropped.

Dropping a partition takes an exclusive lock on ``hub.events`` for the
moment of the detach (appends wait for it); it is tried with a 2 s
``lock_timeout`` and retried at the next turn rather than queue behind a
long reader.  A replay that reaches past the oldest event kept gets a
``ReplayGap`` notice (:mod:`hub.channels.durable`).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import gzip
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Final

import asyncpg  # type: ignore[import-untyped, unused-ignore]

log = logging.getLogger(__name__)

#: Seconds between two maintenance turns of a node.
MAINTENANCE_INTERVAL: Final = 600.0
#: Days ahead for which partitions exist (an outage shorter than this never
#: sends rows to the default partition).
DAYS_AHEAD: Final = 3
#: Rows fetched per round trip while archiving.
ARCHIVE_CHUNK: Final = 5_000

#: pg_advisory_lock key of the archive-and-drop step.
RETENTION_LOCK: Final = 7526449310231155714


@dataclass(frozen=True, slots=True)
class Expired:
    """A partition wholly older than the retention, or the default
    partition's rows older than it (``upper_bound`` is then the cutoff and
    ``rows_estimate`` their exact count)."""

    partition: str
    upper_bound: dt.datetime
    rows_estimate: int
    #: The projection (and org) that has not applied all of its events; None
    #: when it may be dropped.
    held_by: str | None


async def expired(conn: asyncpg.Connection, retention: float) -> list[Expired]:
    rows = await conn.fetch(
        "SELECT * FROM hub.expired_event_partitions(make_interval(secs => $1))", retention
    )
    return [
        Expired(r["partition"], r["upper_bound"], int(r["rows_estimate"]), r["held_by"])
        for r in rows
    ]


async def archive(
    conn: asyncpg.Connection,
    partition: str,
    directory: Path,
    *,
    before: dt.datetime | None = None,
) -> Path:
    """Write ``partition`` (its rows created before ``before``, if given) to
    ``directory`` as gzipped JSON lines; return the file.  Written under a
    temporary name, flushed to disk, then renamed: a file with the final
    name is always complete."""
    database = await conn.fetchval("SELECT current_database()")
    name = partition.removeprefix("hub.")
    if before is not None:
        name += f"-before-{before:%Y%m%dT%H%M%S}"
    final = directory / f"{database}-{name}.jsonl.gz"
    partial = final.with_name(final.name + ".partial")
    await asyncio.to_thread(directory.mkdir, parents=True, exist_ok=True)
    raw = await asyncio.to_thread(open, partial, "wb")
    out = gzip.GzipFile(fileobj=raw, mode="wb")
    try:
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            # One JSON text per row, built by the server: no re-encoding here.
            cursor = await conn.cursor(
                "SELECT json_build_object('org', org, 'seq', seq, 'id', id, 'kind', kind, "
                "'type', type, 'payload', payload, 'created_at', created_at)::text AS line "
                f"FROM {partition} WHERE $1::timestamptz IS NULL OR created_at < $1 "
                "ORDER BY org, seq",
                before,
            )
            while rows := await cursor.fetch(ARCHIVE_CHUNK):
                chunk = "".join(row["line"] + "\n" for row in rows).encode()
                await asyncio.to_thread(out.write, chunk)
        await asyncio.to_thread(_finish, out, raw)
    except BaseException:
        await asyncio.to_thread(raw.close)
        await asyncio.to_thread(partial.unlink, missing_ok=True)
        raise
    await asyncio.to_thread(os.replace, partial, final)
    return final


def _finish(out: gzip.GzipFile, raw: BinaryIO) -> None:
    out.close()  # writes the gzip trailer; leaves raw open
    raw.flush()
    os.fsync(raw.fileno())
    raw.close()


async def drop(conn: asyncpg.Connection, partition: str) -> None:
    """Detach and drop ``partition``, waiting at most 2 s for the lock."""
    async with conn.transaction():
        await conn.execute("SET LOCAL lock_timeout = '2s'")
        await conn.execute(f"ALTER TABLE hub.events DETACH PARTITION {partition}")
        await conn.execute(f"DROP TABLE {partition}")


async def maintain(
    conn: asyncpg.Connection,
    retention: float | None,
    archive_dir: Path | None = None,
    *,
    dry_run: bool = False,
) -> list[str]:
    """One turn: create the coming days' partitions; then archive (with a
    directory) and drop every partition past the retention that no
    projection holds back.  Returns one line per thing done or held."""
    lines = [
        f"created partition {row['p']}"
        for row in await conn.fetch("SELECT hub.ensure_event_partitions($1) AS p", DAYS_AHEAD)
    ]
    if retention is None:
        return lines
    # One node at a time archives and drops (a session lock: it spans the
    # archive's transaction and the drop's).
    if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", RETENTION_LOCK):
        return lines
    try:
        lines += await _expire(conn, retention, archive_dir, dry_run)
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", RETENTION_LOCK)
    return lines


#: How the default partition shows in hub.expired_event_partitions().
DEFAULT_PARTITION: Final = "hub.events_default"


async def _expire(
    conn: asyncpg.Connection, retention: float, archive_dir: Path | None, dry_run: bool
) -> list[str]:
    lines: list[str] = []
    for part in await expired(conn, retention):
        # The default partition's old rows go by DELETE (it stays), a day's
        # partition by DROP; the checks before either are the same.
        old_rows = part.partition == DEFAULT_PARTITION
        what = (
            f"{part.rows_estimate} events of {part.partition} before "
            f"{part.upper_bound:%Y-%m-%d %H:%M}"
            if old_rows
            else part.partition
        )
        if part.held_by is not None:
            lines.append(
                f"kept {what} past the retention: projection {part.held_by} "
                "has not applied all of its events"
            )
            continue
        if dry_run:
            lines.append(
                f"would delete {what}"
                if old_rows
                else f"would drop {what} (~{part.rows_estimate} events)"
            )
            continue
        if archive_dir is not None:
            before = part.upper_bound if old_rows else None
            path = await archive(conn, part.partition, archive_dir, before=before)
            lines.append(f"archived {what} to {path}")
        if old_rows:
            await conn.execute(
                f"DELETE FROM {DEFAULT_PARTITION} WHERE created_at < $1", part.upper_bound
            )
            lines.append(f"deleted {what}")
            continue
        try:
            await drop(conn, part.partition)
        except asyncpg.LockNotAvailableError:
            lines.append(f"kept {what} for now: hub.events is busy (retried later)")
            continue
        lines.append(f"dropped {what} (~{part.rows_estimate} events)")
    return lines
