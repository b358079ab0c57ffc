"""Raw protocol clients (hub/client/realtime.py) opened by a test, closed
after it whatever its outcome.

A test module imports :func:`connect` and the autouse fixture
:func:`close_raw_clients` (importing a fixture makes it the module's)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from hub.client.realtime import AsyncClient
from tests.support.hubs import HubProcess

V1, V2 = "1.0.0", "2.0.0"
#: Default bound of every wait of a client (seconds).
T = 5.0

#: Clients opened by the running test.
OPEN: list[AsyncClient] = []


async def connect(hub: HubProcess, token: str, vsn: str = V2, *, within: float = T) -> AsyncClient:
    client = await AsyncClient.connect(hub.ws_url, token, vsn, within=within)
    OPEN.append(client)
    return client


@pytest.fixture(autouse=True)
async def close_raw_clients() -> AsyncIterator[None]:
    yield
    while OPEN:
        await OPEN.pop().close()
