"""The node: every part wired in its constructor, started and stopped in
order, and nothing connected before start."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest

from hub.auth.principal import Principal
from hub.config import load_settings
from hub.engine.memory import MemoryEngine
from hub.node import Node
from hub.outbox import ListOutbox
from hub.protocol import VSN1
from hub.store.memory import MemoryStore

SECRET = "s" * 40
MEMBER = Principal(role="authenticated", exp=2e9, sub="u", orgs={"acme": "member"})


def settings(**env: str) -> Any:
    return load_settings({}, {"HUB_JWT_SECRET": SECRET, **env})


class RecordingEngine(MemoryEngine):
    def __init__(self, log: list[str]) -> None:
        super().__init__()
        self.log = log

    async def start(self) -> None:
        self.log.append("engine start")

    async def stop(self) -> None:
        self.log.append("engine stop")


class RecordingStore(MemoryStore):
    def __init__(self, log: list[str]) -> None:
        super().__init__()
        self.log = log

    async def start(self) -> None:
        self.log.append("store start")

    async def stop(self) -> None:
        self.log.append("store stop")


def join(node: Node, topic: str) -> ListOutbox:
    outbox = ListOutbox()
    session = node.gateway.open_session(MEMBER, VSN1, outbox)
    frame = {"topic": f"realtime:{topic}", "event": "phx_join", "payload": {}, "ref": "1"}
    frame["join_ref"] = "1"
    assert node.gateway.feed(session, orjson.dumps(frame).decode()) is None
    return outbox


async def test_an_event_appended_after_start_reaches_subscribers_and_the_mother() -> None:
    node = Node(settings())
    async with node.running():
        outbox = join(node, "org:acme")
        await node.store.append("acme", [("created", {"n": 1})])
        # Delivered at the node's next flush, which waits for the loop's
        # next poll (hub/flusher.py).
        for _ in range(3):
            await asyncio.sleep(0)
        events = [orjson.loads(f.payload) for f in outbox.frames]
        assert [e["event"] for e in events] == ["phx_reply", "presence_state", "broadcast"]
        assert events[-1]["payload"]["meta"]["seq"] == 1
        # The mother observes the node's channels: it counted the event and
        # the connection (not read back from the store: it came after start).
        network = node.mother.snapshot()["network"]
        assert network["events"]["1m"] == 1 and network["clients"] == 1
        assert node.gauges().connections == 1 and node.gauges().durable_delivered == 1


async def test_start_and_stop_run_in_their_documented_order() -> None:
    log: list[str] = []
    node = Node(settings(), engine=lambda quotas: RecordingEngine(log), store=RecordingStore(log))
    async with node.running():
        log.append("serving")
        assert node.flusher.loop is asyncio.get_running_loop()
    assert log == ["store start", "engine start", "serving", "engine stop", "store stop"]


async def test_a_failed_engine_start_still_stops_the_store() -> None:
    log: list[str] = []

    class Broken(RecordingEngine):
        async def start(self) -> None:
            raise RuntimeError("no engine")

    node = Node(settings(), engine=lambda quotas: Broken(log), store=RecordingStore(log))
    with pytest.raises(RuntimeError, match="no engine"):
        async with node.running():
            raise AssertionError("served without an engine")
    assert log == ["store start", "store stop"]


def test_building_a_node_connects_to_nothing() -> None:
    # Ports nobody listens on: a constructor that connected would fail.
    node = Node(
        settings(
            HUB_DATABASE_URL="postgresql://postgres@127.0.0.1:9/none",
            HUB_REDIS_URL="redis://127.0.0.1:9/0",
        )
    )
    assert not node.store.ready and not node.engine.ready
    # The Redis engine shares the node's quota usage with the other nodes.
    assert node.engine.quotas is node.quotas


def test_an_engine_from_outside_is_built_with_the_nodes_quotas() -> None:
    given: list[Any] = []

    def engine(quotas: Any) -> MemoryEngine:
        given.append(quotas)
        return MemoryEngine(quotas=quotas)

    node = Node(settings(), engine=engine)
    assert given == [node.quotas] and node.engine.quotas is node.quotas
    assert node.gateway.sessions == set()
