"""Channels: subscriptions, the broadcast fan-out and presence delivery."""

from __future__ import annotations

import json
from typing import Any

from hub.auth.principal import Principal
from hub.channels.fanout import Channels
from hub.channels.presence import PresenceDiff
from hub.channels.subscription import Subscription
from hub.channels.topics import parse_topic
from hub.engine.base import NodeGone, PresenceSnapshot
from hub.engine.memory import MemoryEngine
from hub.outbox import ListOutbox
from hub.protocol import VSN1, VSN2, Broadcast, Vsn
from tests.support.channels import local_channels

MEMBER = Principal(role="authenticated", exp=2e9, sub="u", orgs={"42": "member"})


class RecordingEngine(MemoryEngine):
    def __init__(self) -> None:
        super().__init__()
        self.subscribed: list[str] = []
        self.unsubscribed: list[str] = []
        self.published: list[Any] = []

    def publish(self, envelope: Any) -> None:
        self.published.append(envelope)
        super().publish(envelope)

    def subscribe(self, topic: str) -> None:
        self.subscribed.append(topic)

    def unsubscribe(self, topic: str) -> None:
        self.unsubscribed.append(topic)


class CountingBroadcast(Broadcast):
    """Counts how often each wire format is asked for."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.v1_calls = 0
        self.v2_calls = 0

    def frame_v1(self) -> Any:
        self.v1_calls += 1
        return super().frame_v1()

    def frame_v2(self) -> Any:
        self.v2_calls += 1
        return super().frame_v2()


def sub(
    channels: Channels,
    topic: str = "org:42",
    vsn: Vsn = VSN2,
    *,
    presence: bool = True,
    key: str = "k",
    subscribe: bool = True,
) -> Subscription:
    subscription = Subscription(
        topic=parse_topic(topic),
        join_ref="1",
        vsn=vsn,
        outbox=ListOutbox(),
        principal=MEMBER,
        conn_id="c",
        presence_key=key,
        presence_enabled=presence,
    )
    if subscribe:
        channels.subscribe(subscription)
    return subscription


def frames(subscription: Subscription) -> list[Any]:
    outbox = subscription.outbox
    assert isinstance(outbox, ListOutbox)
    return outbox.frames


def texts(subscription: Subscription) -> list[Any]:
    return [json.loads(frame.payload) for frame in frames(subscription)]


def test_fanout_encodes_once_per_format_and_shares_the_frame() -> None:
    channels = local_channels()
    v2 = [sub(channels, vsn=VSN2) for _ in range(3)]
    v1 = [sub(channels, vsn=VSN1) for _ in range(2)]
    broadcast = CountingBroadcast("org:42", "e", b'{"n":1}')
    channels.publish(broadcast)
    assert broadcast.v2_calls == 1
    assert broadcast.v1_calls == 1
    v2_frames = [frames(s)[0] for s in v2]
    v1_frames = [frames(s)[0] for s in v1]
    # One encoding per format: every subscriber got the same bytes object.
    assert all(frame.wire is v2_frames[0].wire for frame in v2_frames)
    assert all(frame.wire is v1_frames[0].wire for frame in v1_frames)
    assert not v2_frames[0].is_text
    assert v1_frames[0].is_text
    assert v2_frames[0].payload == Broadcast("org:42", "e", b'{"n":1}').frame_v2().payload
    assert json.loads(v1_frames[0].payload)["payload"]["payload"] == {"n": 1}
    assert channels.delivered == 5


def test_fanout_builds_no_frame_for_an_absent_format() -> None:
    channels = local_channels()
    sub(channels, vsn=VSN2)
    only_v2 = CountingBroadcast("org:42", "e", b"{}")
    channels.publish(only_v2)
    assert (only_v2.v1_calls, only_v2.v2_calls) == (0, 1)

    channels = local_channels()
    sub(channels, vsn=VSN1)
    only_v1 = CountingBroadcast("org:42", "e", b"{}")
    channels.publish(only_v1)
    assert (only_v1.v1_calls, only_v1.v2_calls) == (1, 0)


def test_fanout_skips_the_origin() -> None:
    channels = local_channels()
    sender, other = sub(channels), sub(channels)
    sender_v1, other_v1 = sub(channels, vsn=VSN1), sub(channels, vsn=VSN1)
    channels.publish(Broadcast("org:42", "e", b"{}", origin=sender))
    assert [len(frames(s)) for s in (sender, other, sender_v1, other_v1)] == [0, 1, 1, 1]
    channels.publish(Broadcast("org:42", "e", b"{}", origin=sender_v1))
    assert [len(frames(s)) for s in (sender, other, sender_v1, other_v1)] == [1, 2, 1, 2]
    # origin=None means everyone, the sender included (self: true).
    channels.publish(Broadcast("org:42", "e", b"{}"))
    assert [len(frames(s)) for s in (sender, other, sender_v1, other_v1)] == [2, 3, 2, 3]
    assert channels.delivered == 3 + 3 + 4


def test_fanout_drops_raw_binary_for_v1() -> None:
    channels = local_channels()
    v1, v2 = sub(channels, vsn=VSN1), sub(channels, vsn=VSN2)
    channels.publish(Broadcast("org:42", "bin", b"\x00\x01", is_json=False))
    assert frames(v1) == []
    (frame,) = frames(v2)
    assert frame.payload.endswith(b"bin\x00\x01")
    assert frame.payload[4] == 0  # encoding: raw
    assert channels.delivered == 1


def test_fanout_reaches_only_the_topic() -> None:
    channels = local_channels()
    a, b, c = sub(channels, "org:42"), sub(channels, "org:42:chat"), sub(channels, "org:43")
    channels.publish(Broadcast("org:42", "e", b"{}"))
    assert [len(frames(s)) for s in (a, b, c)] == [1, 0, 0]
    channels.publish(Broadcast("org:nobody", "e", b"{}"))
    assert channels.delivered == 1


def test_engine_subscribes_on_first_and_unsubscribes_on_last() -> None:
    engine = RecordingEngine()
    channels = local_channels(engine)
    a = sub(channels, "org:42", VSN1)
    b = sub(channels, "org:42", VSN2)
    assert engine.subscribed == ["org:42"]
    assert channels.subscriber_count("org:42") == 2
    assert channels.topic_count == 1
    channels.unsubscribe(a)
    assert engine.unsubscribed == []
    channels.unsubscribe(b)
    assert engine.unsubscribed == ["org:42"]
    assert channels.subscriber_count("org:42") == 0
    assert channels.topic_count == 0
    # Idempotent.
    channels.unsubscribe(b)
    assert engine.unsubscribed == ["org:42"]
    channels.publish(Broadcast("org:42", "e", b"{}"))
    assert frames(a) == frames(b) == []


def test_unsubscribe_untracks_and_tells_the_others() -> None:
    engine = RecordingEngine()
    channels = local_channels(engine)
    leaver, stayer = sub(channels, key="leaver"), sub(channels, vsn=VSN1, key="stayer")
    channels.track(leaver, {"n": 1})
    assert channels.presence_size("org:42") == 1
    channels.unsubscribe(leaver)
    assert channels.presence_size("org:42") == 0
    join, leave = texts(stayer)
    assert join["event"] == leave["event"] == "presence_diff"
    assert list(leave["payload"]["leaves"]) == ["leaver"]
    assert leave["payload"]["joins"] == {}
    assert leave["ref"] is None
    assert "join_ref" not in leave
    # An untracked subscription leaving publishes nothing.
    published = len(engine.published)
    channels.unsubscribe(stayer)
    assert len(engine.published) == published


def test_presence_diff_is_encoded_once_per_format_and_skips_disabled() -> None:
    channels = local_channels()
    v2 = [sub(channels, vsn=VSN2, key=f"k{i}") for i in range(2)]
    v1 = [sub(channels, vsn=VSN1, key=f"v{i}") for i in range(2)]
    off = sub(channels, vsn=VSN2, presence=False, key="off")
    channels.track(v2[0], {"x": 1})
    assert frames(v2[0])[0] is frames(v2[1])[0]
    assert frames(v1[0])[0] is frames(v1[1])[0]
    assert frames(off) == []
    body = json.loads(frames(v2[1])[0].payload)
    assert body[:4] == [None, None, "realtime:org:42", "presence_diff"]
    assert list(body[4]["joins"]) == ["k0"]


def test_presence_state_of_the_topic() -> None:
    channels = local_channels(node_id="n1.")
    a, b = sub(channels, key="alice"), sub(channels, key="bob")
    assert channels.presence_state("org:42") == {}
    channels.track(a, {"n": 1})
    channels.track(b, {"n": 2})
    state = channels.presence_state("org:42")
    assert set(state) == {"alice", "bob"}
    refs = [m["phx_ref"] for entry in state.values() for m in entry["metas"]]
    assert all(ref.startswith("n1.") for ref in refs)
    assert channels.presence_state("org:43") == {}
    assert channels.local_presence("org:42") == state


def test_remote_presence_is_applied_only_for_local_topics() -> None:
    channels = local_channels(node_id="a.")
    watcher = sub(channels, key="w")
    remote = PresenceDiff("org:42", joins={"bob": {"metas": [{"phx_ref": "b.1"}]}}, node="b")
    channels.deliver(remote)
    (diff,) = texts(watcher)
    assert diff[4]["joins"] == {"bob": {"metas": [{"phx_ref": "b.1"}]}}
    # A duplicate is not shown twice.
    channels.deliver(remote)
    assert len(frames(watcher)) == 1
    # A topic nobody here watches is not mirrored.
    channels.deliver(PresenceDiff("org:7", joins={"x": {"metas": [{"phx_ref": "b.2"}]}}, node="b"))
    assert channels.presence_state("org:7") == {}
    # Snapshots re-sync, and a node that is gone takes its entries along.
    channels.deliver(PresenceSnapshot("org:42", "b", {"bo": {"metas": [{"phx_ref": "b.3"}]}}))
    resync = texts(watcher)[-1][4]
    assert list(resync["leaves"]) == ["bob"]
    assert list(resync["joins"]) == ["bo"]
    channels.deliver(NodeGone("b"))
    gone = texts(watcher)[-1][4]
    assert list(gone["leaves"]) == ["bo"]
    assert channels.presence_state("org:42") == {}


def test_subscription_wire_topic() -> None:
    channels = local_channels()
    assert sub(channels, "org:42:chat", subscribe=False).wire_topic == "realtime:org:42:chat"
