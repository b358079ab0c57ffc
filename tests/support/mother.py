"""Harness of the mother's tests (integration and the dashboard's e2e):
hubs started and checked for tracebacks, fresh databases, publishing."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from hub.store.migrate import migrate
from tests.support.hubs import HubProcess, start_hub, stop_hub
from tests.support.pg import create_database, drop_database, new_database_name

#: Default bound of every wait (seconds).
T = 10.0


StartHub = Callable[..., HubProcess]


@contextlib.contextmanager
def hub_starter(tmp_path: Path) -> Iterator[StartHub]:
    """Start hubs with ``start(env, secret=..., port=...)``; all are stopped
    on exit, and none may have logged a traceback."""
    started: list[HubProcess] = []

    def start(
        env: dict[str, str] | None = None, secret: str | None = None, port: int | None = None
    ) -> HubProcess:
        hub = start_hub(tmp_path, env, secret, port)
        started.append(hub)
        return hub

    try:
        yield start
    finally:
        for hub in started:
            stop_hub(hub)
    for hub in started:
        assert "Traceback" not in hub.log(), hub.log()


@contextlib.asynccontextmanager
async def fresh_database(*, migrated: bool = True) -> AsyncIterator[str]:
    """A database of its own (migrated unless told not to), dropped on exit."""
    name = new_database_name()
    dsn = await create_database(name)
    try:
        if migrated:
            await migrate(dsn)
        yield dsn
    finally:
        await drop_database(name)


def new_org() -> str:
    return "m" + uuid.uuid4().hex[:10]


async def publish(hub: HubProcess, org: str, events: list[tuple[str, Any]]) -> None:
    async with httpx.AsyncClient(base_url=hub.http_url, timeout=T) as http:
        for start in range(0, len(events), 100):
            body = [{"type": t, "payload": p} for t, p in events[start : start + 100]]
            response = await http.post(
                f"/api/orgs/{org}/events",
                json=body,
                headers={"Authorization": f"Bearer {hub.admin_token()}"},
            )
            assert response.status_code == 201, response.text


@pytest.fixture
def mother_hub(tmp_path: Path) -> Iterator[StartHub]:
    """Start hubs for one test (see :func:`hub_starter`)."""
    with hub_starter(tmp_path) as start:
        yield start


@pytest.fixture
async def fresh_dsn() -> AsyncIterator[str]:
    """A database of the test's own: the session's is shared with other
    tests' orgs, and the mother's tests compare network-wide totals."""
    async with fresh_database() as dsn:
        yield dsn
