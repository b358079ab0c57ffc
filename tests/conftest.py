"""Shared fixtures: a real `hub serve` process (tests/support/hubs.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.hubs import HubProcess, start_hub, stop_hub

#: Fixtures that live with their harness: the mother's hubs and databases,
#: the Realtime Authorization database with its policies.
pytest_plugins = [
    "tests.support.mother",
    "tests.support.policies",
    "tests.support.rediscluster",
]


@pytest.fixture(scope="session")
def hub_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubProcess]:
    """One `hub serve` shared by the tests that need only the defaults."""
    hub = start_hub(tmp_path_factory.mktemp("hub"))
    yield hub
    stop_hub(hub)


@pytest.fixture
def make_hub(tmp_path: Path) -> Iterator[Any]:
    """Start a hub with extra environment: ``make_hub({"HUB_X": "1"})``."""
    started: list[HubProcess] = []

    def make(env: dict[str, str] | None = None, secret: str | None = None) -> HubProcess:
        hub = start_hub(tmp_path, env, secret)
        started.append(hub)
        return hub

    yield make
    for hub in started:
        stop_hub(hub)
