"""An unexpected error inside a channel costs that channel, not the socket."""

from __future__ import annotations

import json

import pytest

from hub.auth.tokens import TokenVerifier, issue_token
from hub.outbox import ListOutbox
from hub.protocol import Broadcast
from hub.session import Session
from tests.support.channels import local_channels

SECRET = "e" * 40


def test_a_failing_handler_sends_phx_error_and_keeps_the_socket(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    verifier = TokenVerifier(secret=SECRET.encode(), jwks=None, orgs_claim=("app_metadata", "orgs"))
    channels = local_channels()
    outbox = ListOutbox()
    session = Session(
        conn_id="c",
        vsn="2.0.0",
        principal=verifier.verify(issue_token(SECRET, sub="u", orgs=["a"])),
        verifier=verifier,
        channels=channels,
        outbox=outbox,
    )
    session.receive(json.dumps(["1", "1", "realtime:org:a", "phx_join", {}]))

    def explode(broadcast: Broadcast) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(channels, "publish", explode)
    body = {"type": "broadcast", "event": "e", "payload": {}}
    session.receive(json.dumps(["1", "2", "realtime:org:a", "broadcast", body]))
    last = json.loads(outbox.frames[-1].payload)
    assert last == ["1", "1", "realtime:org:a", "phx_error", {}]
    assert not outbox.closed
    assert channels.subscriber_count("org:a") == 0
    assert "boom" in caplog.text
    session.receive(json.dumps([None, "3", "phoenix", "heartbeat", {}]))
    assert json.loads(outbox.frames[-1].payload)[3] == "phx_reply"
