"""Fixtures shared by the integration tests."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.support.cluster import Cluster, MakeHub


@pytest.fixture
async def cluster(make_hub: MakeHub, tmp_path: Path) -> AsyncIterator[Cluster]:
    made = Cluster(make_hub, tmp_path)
    try:
        yield made
    finally:
        await made.aclose()
