"""Per-org quotas: pure counting, cross-node shares, and the session's answers."""

from __future__ import annotations

import json
from typing import Any

import pytest

from hub.auth.tokens import TokenVerifier, issue_token
from hub.channels.fanout import Channels
from hub.errors import ConfigError
from hub.outbox import ListOutbox
from hub.quotas import FREE_CHANNELS, OrgQuota, Quotas, parse_overrides
from hub.session import Session
from tests.support.channels import local_channels

SECRET = "q" * 40


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_rates_are_per_org_and_per_second() -> None:
    clock = Clock()
    quotas = Quotas(OrgQuota(joins_per_second=2, messages_per_second=3), clock=clock)
    assert [quotas.take_join("a") for _ in range(3)] == [True, True, False]
    assert quotas.take_join("b"), "another org is unaffected"
    assert [quotas.take_message("a") for _ in range(4)] == [True, True, True, False]
    clock.now += 1
    assert quotas.take_join("a") and quotas.take_message("a")


def test_connections_count_once_per_connection_until_its_last_channel_goes() -> None:
    quotas = Quotas(OrgQuota(max_connections=2))
    assert quotas.admit("c1", "a") and quotas.admit("c1", "a")
    assert quotas.admit("c2", "a")
    assert not quotas.admit("c3", "a")
    assert quotas.connections("a") == 2
    quotas.release("c1", "a")
    assert not quotas.admit("c3", "a"), "c1 still holds one channel"
    quotas.release("c1", "a")
    assert quotas.admit("c3", "a")


def test_other_nodes_shares_count_and_vanish_with_the_node() -> None:
    clock = Clock()
    quotas = Quotas(OrgQuota(max_connections=3, messages_per_second=5), clock=clock)
    quotas.set_remote("n2", {"a": [2, 0, 4]})
    assert quotas.connections("a") == 2
    assert quotas.admit("c1", "a") and not quotas.admit("c2", "a")
    assert quotas.take_message("a") and not quotas.take_message("a")
    quotas.drop_node("n2")
    assert quotas.admit("c2", "a") and quotas.take_message("a")


def test_local_usage_reports_connections_and_last_second() -> None:
    clock = Clock()
    quotas = Quotas(clock=clock)
    quotas.admit("c1", "a")
    for _ in range(3):
        quotas.take_message("a")
    clock.now += 1
    assert quotas.local_usage() == {"a": [1, 0, 3]}
    malformed: Any = {"a": ["x", 1, 2], 5: [1, 2, 3]}
    quotas.set_remote("n2", malformed)
    assert quotas.connections("a") == 1


def test_overrides_are_validated() -> None:
    defaults = OrgQuota()
    assert parse_overrides({"acme": {"max_connections": 5}}, defaults)["acme"] == OrgQuota(
        max_connections=5
    )
    for bad in ([], {"acme": {"bogus": 1}}, {"acme": {"max_connections": -1}}, {"a": 3}):
        with pytest.raises(ConfigError):
            parse_overrides(bad, defaults)


def _session(quotas: Quotas, conn: str, channels: Channels) -> tuple[Session, ListOutbox]:
    verifier = TokenVerifier(secret=SECRET.encode(), jwks=None, orgs_claim=("app_metadata", "orgs"))
    outbox = ListOutbox()
    token = issue_token(SECRET, sub=conn, orgs=["a", "b"])
    session = Session(
        conn_id=conn,
        vsn="1.0.0",
        principal=verifier.verify(token),
        verifier=verifier,
        channels=channels,
        outbox=outbox,
        quotas=quotas,
    )
    return session, outbox


def _send(session: Session, topic: str, event: str, payload: Any, ref: str) -> None:
    frame = {"topic": topic, "event": event, "payload": payload, "ref": ref, "join_ref": "1"}
    session.receive(json.dumps(frame))


def _replies(outbox: ListOutbox) -> dict[str, Any]:
    messages = [json.loads(frame.payload) for frame in outbox.frames]
    return {m["ref"]: m["payload"] for m in messages if m["event"] == "phx_reply"}


def test_session_refuses_over_quota_and_leaves_other_orgs_alone() -> None:
    quotas = Quotas(OrgQuota(max_connections=1, messages_per_second=1))
    channels = local_channels()
    first, first_out = _session(quotas, "c1", channels)
    second, second_out = _session(quotas, "c2", channels)
    _send(first, "realtime:org:a", "phx_join", {}, "1")
    _send(second, "realtime:org:a", "phx_join", {}, "1")
    _send(second, "realtime:org:b", "phx_join", {}, "2")
    refused = _replies(second_out)
    assert refused["1"]["response"]["reason"] == (
        "ConnectionRateLimitReached: Too many connected users"
    )
    assert refused["2"]["status"] == "ok", "org b has room"
    body = {"type": "broadcast", "event": "e", "payload": {}}
    _send(first, "realtime:org:a", "broadcast", body, "3")
    _send(first, "realtime:org:a", "broadcast", body, "4")
    replies = _replies(first_out)
    assert "3" not in replies and "4" not in replies, "no ack asked, none sent"
    # Over the org's messages per second: Supabase's answer, the channel ends.
    system, close = (json.loads(frame.payload) for frame in first_out.frames[-2:])
    assert (system["event"], close["event"]) == ("system", "phx_close")
    assert system["payload"]["status"] == "error"
    assert system["payload"]["message"] == "Too many messages per second"
    first.close()
    _send(second, "realtime:org:a", "phx_join", {}, "5")
    assert _replies(second_out)["5"]["status"] == "ok", "the slot is free once c1 left"


def test_free_name_channels_share_one_bucket_with_supabases_answer() -> None:
    """Free-name channels (ordinary Supabase channels) count against one
    network-wide bucket, HUB_FREE_MESSAGES_PER_SECOND; over it the sender's
    channel ends as Supabase ends it.  Org buckets are not touched."""
    quotas = Quotas(OrgQuota(), {FREE_CHANNELS: OrgQuota(messages_per_second=2)})
    channels = local_channels()
    first, first_out = _session(quotas, "c1", channels)
    second, second_out = _session(quotas, "c2", channels)
    _send(first, "realtime:room:1", "phx_join", {}, "1")
    _send(second, "realtime:room:2", "phx_join", {}, "1")
    _send(first, "realtime:org:a", "phx_join", {}, "2")
    body = {"type": "broadcast", "event": "e", "payload": {}}
    _send(first, "realtime:room:1", "broadcast", body, "3")
    _send(second, "realtime:room:2", "broadcast", body, "2")
    _send(second, "realtime:room:2", "broadcast", body, "3")  # the third in this second
    ended = [json.loads(f.payload) for f in second_out.frames[-2:]]
    assert [m["event"] for m in ended] == ["system", "phx_close"]
    assert ended[0]["payload"]["message"] == "Too many messages per second"
    assert second.subs == {}
    _send(first, "realtime:org:a", "broadcast", body, "4")  # org a has its own bucket
    assert [json.loads(f.payload)["event"] for f in first_out.frames][-1] != "phx_close"
    assert set(first.subs) == {"realtime:room:1", "realtime:org:a"}
