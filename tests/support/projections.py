"""Waiting for projections (the runner, docs/projections.md) in tests."""

from __future__ import annotations

import asyncio
import time

import asyncpg


async def caught_up(
    db: asyncpg.Connection, projection: str, *, org: str | None = None, within: float = 30.0
) -> None:
    """Wait until ``projection`` has applied every event (of ``org``, or of
    every org); fails with the lag table after ``within`` seconds."""
    deadline = time.monotonic() + within
    while await db.fetchval(
        "SELECT count(*) FROM hub.projection_lag WHERE projection = $1 AND lag > 0 "
        "AND ($2::text IS NULL OR org = $2)",
        projection,
        org,
    ):
        assert time.monotonic() < deadline, await db.fetch("SELECT * FROM hub.projection_lag")
        await asyncio.sleep(0.05)
