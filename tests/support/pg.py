"""A fresh PostgreSQL database for one test session.

Import the fixture into a test module (``from tests.support.pg import
pg_dsn  # noqa: F401``).  ``pg_dsn`` creates ``hub_test_<random>`` through the
``postgres`` database, applies the hub's migrations and returns the new
database's DSN; the database is dropped (with FORCE) when the session ends.
One database serves the whole session even when several modules import the
fixture.

The server is ``HUB_TEST_POSTGRES_URL`` (default
``postgresql://postgres@127.0.0.1:5432/postgres``).  When it is unreachable
the tests fail with an error that says so: they never skip.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import secrets
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

import asyncpg
import pytest

from hub.store.base import StoredEvent
from hub.store.migrate import migrate

ADMIN_DSN = os.environ.get("HUB_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")

T = TypeVar("T")
_DATABASE = pytest.StashKey[str]()


def dsn_for(database: str) -> str:
    """``ADMIN_DSN`` with its database replaced by ``database``."""
    base, _, _ = ADMIN_DSN.rpartition("/")
    return f"{base}/{database}"


def run_sync(factory: Callable[[], Awaitable[T]]) -> T:
    """Run a coroutine to completion on a private loop in another thread, so
    that neither pytest-asyncio's loops nor the main thread's loop policy are
    touched by session setup and teardown."""

    async def main() -> T:
        return await factory()

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, main()).result()


async def create_database(name: str) -> str:
    """Create the empty database ``name``; return its DSN."""
    try:
        conn = await asyncpg.connect(ADMIN_DSN, timeout=10)
    except (OSError, asyncpg.PostgresError) as exc:
        raise RuntimeError(
            f"PostgreSQL is required for these tests and is unreachable at {ADMIN_DSN}: {exc!r}"
        ) from exc
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return dsn_for(name)


async def drop_database(name: str) -> None:
    conn = await asyncpg.connect(ADMIN_DSN, timeout=10)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


def new_database_name() -> str:
    return f"hub_test_{secrets.token_hex(6)}"


@pytest.fixture(scope="session")
def pg_dsn(request: pytest.FixtureRequest) -> str:
    """The DSN of this session's migrated test database."""
    config = request.config
    name = config.stash.get(_DATABASE, None)
    if name is None:
        name = new_database_name()
        dsn = run_sync(lambda: create_database(name))
        config.stash[_DATABASE] = name
        config.add_cleanup(lambda: run_sync(lambda: drop_database(name)))
        run_sync(lambda: migrate(dsn))
    return dsn_for(name)


# -- helpers shared by the store tests -----------------------------------------------


def new_org() -> str:
    """Tests share one database: each uses orgs nobody else writes to."""
    return "org-" + uuid.uuid4().hex[:12]


@dataclass
class Announced:
    """Records what a store announces and lets a test wait for it."""

    events: list[StoredEvent] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def __call__(self, event: StoredEvent) -> None:
        self.events.append(event)
        self.changed.set()

    def of(self, org: str) -> list[StoredEvent]:
        return [event for event in self.events if event.org == org]

    async def wait_for(self, org: str, count: int, within: float = 10.0) -> list[StoredEvent]:
        """The first ``count`` announcements of ``org``; fails after ``within``
        seconds without them."""
        deadline = time.monotonic() + within
        while len(got := self.of(org)) < count:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                pytest.fail(f"{org}: {len(got)} of {count} events announced after {within}s")
            self.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), remaining)
        return got
