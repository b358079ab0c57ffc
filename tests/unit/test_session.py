"""The session state machine, fed frames and a fake clock, with real tokens,
real channels and the in-memory engine; what it pushes is checked frame by
frame."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import jwt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hub.auth.principal import Principal
from hub.auth.tokens import JwksCache, KeyNotCached, TokenVerifier
from hub.client import realtime
from hub.config import SessionLimits
from hub.errors import CloseCode
from hub.frames import Frame
from hub.outbox import ListOutbox
from hub.protocol import VSN1, VSN2, Broadcast, Vsn, decode
from hub.session import Session, TablesCheck
from tests.support import captures
from tests.support.channels import local_channels

SECRET = b"session-test-secret-long-enough-for-hs256-and-more-0123456789abc"
ORGS = ("app_metadata", "orgs")
T42 = "realtime:org:42"
T43 = "realtime:org:43"


class Clock:
    """A clock that moves only when told; starts at the real time so that
    tokens valid now are valid for PyJWT too."""

    def __init__(self) -> None:
        self.now = float(int(time.time()))

    def __call__(self) -> float:
        return self.now


@dataclass
class Pushed:
    """One frame the session pushed, decoded."""

    join_ref: str | None
    ref: str | None
    topic: str | None
    event: str | None
    payload: Any
    raw: Any = None
    binary: bytes | None = None


def parse(frame: Frame, vsn: Vsn) -> Pushed:
    if not frame.is_text:
        return Pushed(None, None, None, None, None, binary=frame.payload)
    value = json.loads(frame.payload)
    if vsn == VSN1:
        assert isinstance(value, dict)
        assert "ref" in value, "realtime-py drops messages without a ref key"
    else:
        assert isinstance(value, list)
        assert len(value) == 5
    got = realtime.decode_text(frame.payload)
    return Pushed(got.join_ref, got.ref, got.topic, got.event, got.payload, value)


class Hub:
    def __init__(self) -> None:
        self.clock = Clock()
        # As a node with a database: policies read the claims.
        self.verifier = TokenVerifier(secret=SECRET, jwks=None, orgs_claim=ORGS, keep_claims=True)
        self.channels = local_channels()
        self._ids = 0

    def token(
        self,
        sub: str | None = "user-1",
        orgs: list[str] | dict[str, str] | None = None,
        role: str = "authenticated",
        ttl: float = 3600,
    ) -> str:
        claims: dict[str, Any] = {"role": role, "exp": int(self.clock.now + ttl)}
        if sub is not None:
            claims["sub"] = sub
        if orgs is not None:
            claims["app_metadata"] = {"orgs": orgs}
        return jwt.encode(claims, SECRET, algorithm="HS256")

    def client(
        self,
        vsn: Vsn = VSN2,
        orgs: list[str] | None = None,
        *,
        principal: Principal | None = None,
        limits: SessionLimits | None = None,
        tables: bool = False,
    ) -> Client:
        if principal is None:
            principal = self.verifier.verify(self.token(orgs=["42"] if orgs is None else orgs))
        self._ids += 1
        return Client(
            self, vsn, principal, limits or SessionLimits(), f"conn-{self._ids}", tables=tables
        )


class Client:
    def __init__(
        self,
        hub: Hub,
        vsn: Vsn,
        principal: Principal,
        limits: SessionLimits,
        conn_id: str,
        *,
        tables: bool = False,
    ) -> None:
        self.hub = hub
        self.vsn = vsn
        self.outbox = ListOutbox()
        self.session = Session(
            conn_id=conn_id,
            vsn=vsn,
            principal=principal,
            verifier=hub.verifier,
            channels=hub.channels,
            outbox=self.outbox,
            limits=limits,
            clock=hub.clock,
            tables=tables,
        )
        self._seen = 0
        self._refs = 0

    def next_ref(self) -> str:
        self._refs += 1
        return str(self._refs)

    def send(
        self, join_ref: str | None, ref: str | None, topic: str, event: str, payload: Any
    ) -> None:
        self.session.receive(realtime.encode(self.vsn, join_ref, ref, topic, event, payload))

    def send_binary(
        self, join_ref: str, ref: str, topic: str, event: str, payload: bytes, is_json: bool = True
    ) -> None:
        enc = 1 if is_json else 0
        self.session.receive(realtime.encode_kind3(join_ref, ref, topic, event, payload, enc=enc))

    def take(self) -> list[Pushed]:
        """Frames pushed since the last take."""
        frames = self.outbox.frames[self._seen :]
        self._seen = len(self.outbox.frames)
        return [parse(frame, self.vsn) for frame in frames]

    def join(
        self,
        topic: str = T42,
        config: dict[str, Any] | None = None,
        access_token: str | None = None,
        *,
        expect_ok: bool = True,
    ) -> list[Pushed]:
        """Join ``topic``; returns (and consumes) every frame the join caused."""
        ref = self.next_ref()
        default = {
            "broadcast": {"self": False, "ack": False},
            "presence": {"key": "", "enabled": True},
            "postgres_changes": [],
            "private": False,
        }
        payload = realtime.join_payload(config or default, access_token)
        self.send(ref, ref, topic, "phx_join", payload)
        if expect_ok:
            pushed = self.take()
            assert pushed[0].event == "phx_reply", pushed
            assert pushed[0].payload["status"] == "ok", pushed[0].payload
            return pushed
        return []


def config(
    *,
    self_: bool = False,
    ack: bool = False,
    key: str = "",
    presence: bool = True,
    bindings: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    return {
        "broadcast": {"self": self_, "ack": ack},
        "presence": {"key": key, "enabled": presence},
        "postgres_changes": bindings or [],
        "private": False,
    }


def ok_reply(join_ref: str | None, ref: str | None, topic: str, response: Any) -> Pushed:
    return Pushed(join_ref, ref, topic, "phx_reply", {"status": "ok", "response": response})


def error_reply(join_ref: str | None, ref: str | None, topic: str, reason: str) -> Pushed:
    return Pushed(
        join_ref, ref, topic, "phx_reply", {"status": "error", "response": {"reason": reason}}
    )


def same(got: list[Pushed], expected: list[Pushed]) -> None:
    """Compare envelopes and payloads (not the raw encoding)."""

    def key(p: Pushed) -> tuple[Any, ...]:
        return (p.join_ref, p.ref, p.topic, p.event, p.payload, p.binary)

    assert [key(p) for p in got] == [key(p) for p in expected]


@pytest.fixture
def hub() -> Hub:
    return Hub()


# -- heartbeat -----------------------------------------------------------------


def test_heartbeat_v1_exact_frame(hub: Hub) -> None:
    client = hub.client(VSN1)
    client.session.receive(
        '{"event":"heartbeat","payload":{},"topic":"phoenix","ref":null,"join_ref":null}'
    )
    (frame,) = client.outbox.frames
    assert json.loads(frame.payload) == {
        "topic": "phoenix",
        "event": "phx_reply",
        "payload": {"status": "ok", "response": {}},
        "ref": None,
    }


def test_heartbeat_v2_echoes_ref(hub: Hub) -> None:
    client = hub.client(VSN2)
    client.session.receive('[null,"7","phoenix","heartbeat",{}]')
    (frame,) = client.outbox.frames
    assert json.loads(frame.payload) == [
        None,
        "7",
        "phoenix",
        "phx_reply",
        {"status": "ok", "response": {}},
    ]


def test_unknown_phoenix_event_is_an_error_reply(hub: Hub) -> None:
    client = hub.client(VSN2)
    client.send(None, "1", "phoenix", "nope", {})
    (reply,) = client.take()
    assert reply.payload["status"] == "error"
    assert not client.outbox.closed


# -- joining -------------------------------------------------------------------


@pytest.mark.parametrize("vsn", [VSN1, VSN2])
def test_join_ok(hub: Hub, vsn: Vsn) -> None:
    client = hub.client(vsn)
    client.send("1", "1", T42, "phx_join", {"config": config()})
    same(
        client.take(),
        [
            ok_reply("1", "1", T42, {"postgres_changes": []}),
            Pushed("1", None, T42, "presence_state", {}),
        ],
    )
    assert hub.channels.subscriber_count("org:42") == 1


def test_join_with_bindings_echoes_them_and_announces_postgres(hub: Hub) -> None:
    client = hub.client(VSN1)
    bindings = [
        {"event": "*", "schema": "public", "table": "events"},
        {"event": "INSERT", "schema": "public", "table": "events", "filter": "org_id=eq.42"},
    ]
    client.send("1", "1", T42, "phx_join", {"config": config(bindings=bindings)})
    reply, state, system = client.take()
    echoed = reply.payload["response"]["postgres_changes"]
    assert [{k: v for k, v in b.items() if k != "id"} for b in echoed] == bindings
    for binding in echoed:
        assert type(binding["id"]) is int
        assert binding["id"] != 0
    assert state == Pushed("1", None, T42, "presence_state", {}, state.raw)
    assert system.join_ref == "1"
    assert system.event == "system"
    assert system.payload == {
        "channel": "org:42",
        "extension": "postgres_changes",
        "message": "Subscribed to PostgreSQL",
        "status": "ok",
    }


def test_bindings_are_checked_against_the_tracked_tables_after_the_reply(hub: Hub) -> None:
    """With a database, Supabase's system message waits for the tables: ok
    when every binding names a tracked table (``*``: any in its schema),
    else an error naming the first binding that matches none."""
    tracked = frozenset({("public", "todos")})
    cases = [
        ([{"event": "*", "schema": "public", "table": "todos"}], None),
        ([{"event": "*", "schema": "public", "table": "*"}], None),
        (
            [
                {"event": "*", "schema": "public", "table": "todos"},
                {"event": "INSERT", "schema": "public", "table": "nope", "filter": "id=eq.1"},
            ],
            "event: INSERT, schema: public, table: nope, filter: id=eq.1",
        ),
        ([{"event": "*", "schema": "other", "table": "*"}], "event: *, schema: other, table: *"),
    ]
    for bindings, missing in cases:
        client = hub.client(VSN2, tables=True)
        client.send("1", "1", T42, "phx_join", {"config": config(bindings=bindings)})
        reply, _state = client.take()  # no system message yet
        assert reply.payload["status"] == "ok"
        [check] = client.session.take_checks()
        assert isinstance(check, TablesCheck)
        check.resume(tracked)
        [system] = client.take()
        assert system.event == "system"
        if missing is None:
            assert system.payload["status"] == "ok"
            assert system.payload["message"] == "Subscribed to PostgreSQL"
        else:
            assert system.payload == {
                "channel": "org:42",
                "extension": "postgres_changes",
                "message": "Unable to subscribe to changes with given parameters. Please check "
                f"Realtime is enabled for the given connect parameters: [{missing}]",
                "status": "error",
            }
            assert hub.channels.subscriber_count("org:42") >= 1  # the channel stays joined


def test_bindings_check_answers_nothing_after_a_leave_or_when_tables_are_unknown(hub: Hub) -> None:
    bindings = [{"event": "*", "schema": "public", "table": "nope"}]
    client = hub.client(VSN2, tables=True)
    client.send("1", "1", T42, "phx_join", {"config": config(bindings=bindings)})
    [check] = client.session.take_checks()
    client.send("1", "2", T42, "phx_leave", {})
    client.take()
    assert isinstance(check, TablesCheck)
    check.resume(frozenset())
    assert client.take() == []
    client.send("3", "3", T42, "phx_join", {"config": config(bindings=bindings)})
    client.take()
    [check] = client.session.take_checks()
    assert isinstance(check, TablesCheck)
    check.resume(None)  # the database could not tell
    [system] = client.take()
    assert system.payload["message"] == "Subscribed to PostgreSQL"


def test_join_refused_for_non_member(hub: Hub) -> None:
    client = hub.client(VSN2)
    client.send("1", "1", T43, "phx_join", {"config": config()})
    same(
        client.take(),
        [
            error_reply(
                "1",
                "1",
                T43,
                "Unauthorized: You do not have permissions to read from this Channel topic: org:43",
            )
        ],
    )
    assert not client.outbox.closed
    assert client.session.subs == {}
    assert hub.channels.subscriber_count("org:43") == 0


@pytest.mark.parametrize(
    "topic",
    [
        "org:42",
        "Realtime:org:42",
        "realtime:org:4 2",
        "realtime:org:42:",
        "realtime:org:*",
        "realtime:org:\u043e",
        "realtime:org:" + "a" * 65,
        "realtime:mother:x",
        "realtime:room\n",
    ],
)
def test_join_refused_for_bad_topic(hub: Hub, topic: str) -> None:
    client = hub.client(VSN2)
    client.send("1", "1", topic, "phx_join", {"config": config()})
    (reply,) = client.take()
    assert reply.payload["status"] == "error"
    assert reply.payload["response"]["reason"].startswith("Unauthorized: ")
    assert (reply.join_ref, reply.ref, reply.topic) == ("1", "1", topic)
    assert not client.outbox.closed
    assert client.session.subs == {}


def test_join_refused_when_connection_token_expired(hub: Hub) -> None:
    principal = Principal(role="authenticated", exp=hub.clock.now - 10, sub="u", orgs={"42": "m"})
    client = hub.client(VSN2, principal=principal)
    client.send("1", "1", T42, "phx_join", {"config": config()})
    same(
        client.take(),
        [error_reply("1", "1", T42, "InvalidJWTToken: Token has expired 10 seconds ago")],
    )
    # A fresh token in the join is used instead of the connection's.
    client.join(T42, access_token=hub.token(orgs=["42"]))
    assert T42 in client.session.subs


def test_access_token_in_join_overrides_connection_token(hub: Hub) -> None:
    anon = hub.verifier.verify(hub.token(sub=None, role="anon"))
    client = hub.client(VSN2, principal=anon)
    client.send("1", "1", T42, "phx_join", {"config": config()})
    (refusal,) = client.take()
    assert refusal.payload["status"] == "error"
    # supabase-js retries with the user's token: the refusal is not remembered.
    user_token = hub.token(sub="user-9", orgs=["42"])
    client.join(T42, access_token=user_token)
    assert client.session.subs[T42].principal.sub == "user-9"
    # ... and the join token is not an addition to the connection's rights:
    member = hub.client(VSN2, orgs=["42", "43"])
    member.send("1", "1", T43, "phx_join", {"config": config(), "access_token": user_token})
    (reply,) = member.take()
    assert reply.payload["status"] == "error"


@pytest.mark.parametrize(
    ("token", "reason"),
    [
        ("garbage", "InvalidJWTToken: The token provided is not a valid JWT"),
        (
            jwt.encode({"role": "a", "exp": 2**40}, b"w" * 64, algorithm="HS256"),
            "InvalidJWTToken: Failed to validate JWT signature",
        ),
        (123, "InvalidJWTToken: The token provided is not a valid JWT"),
    ],
)
def test_join_refused_for_bad_access_token(hub: Hub, token: object, reason: str) -> None:
    client = hub.client(VSN1)
    client.send("1", "1", T42, "phx_join", {"config": config(), "access_token": token})
    same(client.take(), [error_reply("1", "1", T42, reason)])


def test_join_refused_for_expired_access_token(hub: Hub) -> None:
    client = hub.client(VSN1)
    expired = hub.token(orgs=["42"], ttl=-100)
    client.send("1", "1", T42, "phx_join", {"config": config(), "access_token": expired})
    same(
        client.take(),
        [error_reply("1", "1", T42, "InvalidJWTToken: Token has expired 100 seconds ago")],
    )


@pytest.mark.parametrize(
    "payload",
    [
        {"config": "x"},
        {"config": {"broadcast": "yes"}},
        {"config": {"presence": []}},
        {"config": {"postgres_changes": [{"event": "TRUNCATE"}]}},
        {"config": {"postgres_changes": "*"}},
    ],
)
def test_join_refused_for_bad_config(hub: Hub, payload: dict[str, Any]) -> None:
    client = hub.client(VSN2)
    client.send("1", "1", T42, "phx_join", payload)
    (reply,) = client.take()
    assert reply.payload["status"] == "error"
    assert reply.payload["response"]["reason"].startswith("InvalidJoinPayload: ")
    assert client.session.subs == {}


def test_join_without_config_uses_defaults(hub: Hub) -> None:
    client = hub.client(VSN2)
    client.send("1", "1", T42, "phx_join", {})
    reply, state = client.take()
    assert reply.payload == {"status": "ok", "response": {"postgres_changes": []}}
    assert state.event == "presence_state"
    sub = client.session.subs[T42]
    assert not sub.echo_self
    assert not sub.ack
    assert sub.presence_enabled
    # No key given: the hub makes one at the first track, and keeps it.
    client.send("1", "2", T42, "presence", {"event": "track", "payload": {}})
    key = sub.presence_key
    assert key
    client.send("1", "3", T42, "presence", {"event": "track", "payload": {"a": 1}})
    assert sub.presence_key == key


def test_second_join_of_a_topic_closes_the_first(hub: Hub) -> None:
    client = hub.client(VSN2)
    client.join(T42, config(ack=True))
    first = client.session.subs[T42]
    client.send("5", "5", T42, "phx_join", {"config": config(ack=True)})
    same(
        client.take(),
        [
            Pushed("1", "1", T42, "phx_close", {}),
            ok_reply("5", "5", T42, {"postgres_changes": []}),
            Pushed("5", None, T42, "presence_state", {}),
        ],
    )
    assert client.session.subs[T42] is not first
    assert client.session.subs[T42].join_ref == "5"
    assert hub.channels.subscriber_count("org:42") == 1
    # The old join_ref is now unknown; the new one works.
    client.send("1", "6", T42, "broadcast", {"type": "broadcast", "event": "e", "payload": {}})
    same(client.take(), [error_reply("1", "6", T42, "unmatched topic")])
    other = hub.client(VSN2)
    other.join(T42)
    other.send(
        other.session.subs[T42].join_ref, "9", T42, "broadcast", {"event": "e", "payload": {}}
    )
    pushed = client.take()
    assert len(pushed) == 1  # delivered once, not once per join
    assert pushed[0].binary is not None


def test_leave(hub: Hub) -> None:
    client = hub.client(VSN1)
    client.join(T42)
    client.send("1", "2", T42, "phx_leave", {})
    same(client.take(), [ok_reply("1", "2", T42, {}), Pushed("1", "1", T42, "phx_close", {})])
    assert client.session.subs == {}
    assert hub.channels.subscriber_count("org:42") == 0
    client.send("1", "3", T42, "broadcast", {"type": "broadcast", "event": "e", "payload": {}})
    same(client.take(), [error_reply("1", "3", T42, "unmatched topic")])
    other = hub.client(VSN1)
    other.join(T42, config(self_=True))
    other.send("1", "2", T42, "broadcast", {"type": "broadcast", "event": "e", "payload": {}})
    assert client.take() == []


def test_messages_for_unjoined_topic_or_unknown_event(hub: Hub) -> None:
    client = hub.client(VSN2)
    client.send("1", "1", T43, "presence", {"event": "track", "payload": {}})
    same(client.take(), [error_reply("1", "1", T43, "unmatched topic")])
    client.join(T42)
    client.send("1", "2", T42, "something", {})
    (reply,) = client.take()
    assert reply.payload["status"] == "error"
    assert not client.outbox.closed


def test_python_messages_with_null_join_ref_reach_the_channel(hub: Hub) -> None:
    client = hub.client(VSN1)
    client.join(T42, config(ack=True))
    client.send(None, "2", T42, "broadcast", {"type": "broadcast", "event": "e", "payload": {}})
    same(client.take(), [ok_reply(None, "2", T42, {})])


# -- broadcast -------------------------------------------------------------------


def test_broadcast_between_v2_and_v1(hub: Hub) -> None:
    a = hub.client(VSN2)  # supabase-js
    b = hub.client(VSN1)  # Python
    a.join(T42, config(ack=True))
    b.join(T42, config())
    a.take(), b.take()

    a.send_binary("1", "7", T42, "client_ping", b'{"hello":"world"}')
    same(a.take(), [ok_reply("1", "7", T42, {})])  # ack, no echo (self: false)
    (got,) = b.take()
    assert got.raw == {
        "topic": T42,
        "event": "broadcast",
        "payload": {"type": "broadcast", "event": "client_ping", "payload": {"hello": "world"}},
        "ref": None,
    }

    b.send("1", "8", T42, "broadcast", {"type": "broadcast", "event": "py", "payload": {"n": 1}})
    assert b.take() == []  # no ack asked, no self
    (binary,) = a.take()
    assert binary.binary == Broadcast("org:42", "py", b'{"n":1}').frame_v2().payload


def test_broadcast_self_and_ack(hub: Hub) -> None:
    a = hub.client(VSN2)
    a.join(T42, config(self_=True, ack=True))
    a.send_binary("1", "2", T42, "e", b"[1,2]")
    ack, echo = a.take()
    same([ack], [ok_reply("1", "2", T42, {})])
    assert echo.binary == Broadcast("org:42", "e", b"[1,2]").frame_v2().payload

    b = hub.client(VSN1)
    b.join(T42, config(self_=True, ack=False))
    a.take()
    b.send("1", "2", T42, "broadcast", {"type": "broadcast", "event": "e", "payload": {"x": 1}})
    (echo_v1,) = b.take()
    assert echo_v1.event == "broadcast"
    assert echo_v1.payload == {"type": "broadcast", "event": "e", "payload": {"x": 1}}
    assert a.take()[0].binary is not None


def test_raw_binary_broadcast_skips_v1_subscribers(hub: Hub) -> None:
    sender, v2, v1 = hub.client(VSN2), hub.client(VSN2), hub.client(VSN1)
    for client in (sender, v2, v1):
        client.join(T42)
        client.take()
    sender.send_binary("1", "2", T42, "bin", b"\xde\xad\xbe\xef", is_json=False)
    (got,) = v2.take()
    assert got.binary == bytes.fromhex("040f030000") + b"realtime:org:42bin" + b"\xde\xad\xbe\xef"
    assert v1.take() == []


def test_broadcast_refusals(hub: Hub) -> None:
    limits = SessionLimits(max_payload_bytes=100)
    client = hub.client(VSN1, limits=limits)
    client.join(T42, config(ack=True))
    cases = [
        ({"type": "broadcast", "payload": {}}, "InvalidPayload: "),
        ({"type": "broadcast", "event": 5, "payload": {}}, "InvalidPayload: "),
        ({"type": "broadcast", "event": "", "payload": {}}, "InvalidPayload: "),
        ({"type": "broadcast", "event": "e" * 256, "payload": {}}, "InvalidPayload: "),
        ([1, 2], "InvalidPayload: "),
        ({"event": "e", "payload": {"x": "y" * 200}}, "PayloadTooLarge: "),
    ]
    for i, (payload, prefix) in enumerate(cases):
        client.send("1", str(10 + i), T42, "broadcast", payload)
        (reply,) = client.take()
        assert reply.payload["status"] == "error", payload
        assert reply.payload["response"]["reason"].startswith(prefix), payload
        assert reply.ref == str(10 + i)


def test_service_role_connection_may_broadcast_anywhere(hub: Hub) -> None:
    admin = hub.client(VSN2, principal=hub.verifier.verify(hub.token(role="service_role")))
    admin.join("realtime:org:999", config(ack=True))
    admin.join("realtime:user:someone-else")
    admin.send_binary("1", "9", "realtime:org:999", "e", b"{}")
    (ack,) = admin.take()
    assert ack.payload["status"] == "ok"


def test_user_topic_only_for_its_user(hub: Hub) -> None:
    client = hub.client(VSN2)  # sub user-1
    client.join("realtime:user:user-1")
    client.send("9", "9", "realtime:user:user-2", "phx_join", {"config": config()})
    (reply,) = client.take()
    assert reply.payload["status"] == "error"


# -- presence ---------------------------------------------------------------------


def metas_of(payload: dict[str, Any]) -> list[dict[str, Any]]:
    return [meta for entry in payload.values() for meta in entry["metas"]]


def test_presence_track_diff_state_and_retrack(hub: Hub) -> None:
    a, b = hub.client(VSN2), hub.client(VSN1)
    a.join(T42, config(key="alice"))
    b.join(T42, config(key="bob"))
    a.take(), b.take()

    a.send("1", "2", T42, "presence", {"type": "presence", "event": "track", "payload": {"n": 1}})
    ack, diff_a = a.take()
    same([ack], [ok_reply("1", "2", T42, {})])
    (diff_b,) = b.take()
    for diff in (diff_a, diff_b):
        assert (diff.join_ref, diff.ref, diff.topic, diff.event) == (
            None,
            None,
            T42,
            "presence_diff",
        )
        assert diff.payload["leaves"] == {}
        (meta,) = diff.payload["joins"]["alice"]["metas"]
        assert meta["n"] == 1
        assert isinstance(meta["phx_ref"], str)
        assert meta["phx_ref"]
    first_ref = diff_a.payload["joins"]["alice"]["metas"][0]["phx_ref"]

    # A later joiner sees the member in presence_state.
    c = hub.client(VSN2)
    _, state = c.join(T42, config(key="carol"))
    assert (state.join_ref, state.event) == ("1", "presence_state")
    assert state.payload == {"alice": {"metas": [{"n": 1, "phx_ref": first_ref}]}}

    # Python omits "type"; a re-track is a leave plus a join with phx_ref_prev.
    b.send("1", "3", T42, "presence", {"event": "track", "payload": {"n": 2}})
    a.send("1", "3", T42, "presence", {"event": "track", "payload": {"n": 3}})
    pushed = c.take()
    assert len(pushed) == 2
    bob_join, alice_retrack = (p.payload for p in pushed)
    assert list(bob_join["joins"]) == ["bob"]
    assert alice_retrack["leaves"] == {"alice": {"metas": [{"n": 1, "phx_ref": first_ref}]}}
    (new_meta,) = alice_retrack["joins"]["alice"]["metas"]
    assert new_meta["n"] == 3
    assert new_meta["phx_ref_prev"] == first_ref
    assert new_meta["phx_ref"] != first_ref
    for p in pushed:
        for meta in metas_of(p.payload["joins"]) + metas_of(p.payload["leaves"]):
            assert meta.get("phx_ref")

    d = hub.client(VSN1)
    _, state = d.join(T42)
    assert set(state.payload) == {"alice", "bob"}
    assert all(meta.get("phx_ref") for meta in metas_of(state.payload))

    a.take()
    a.send("1", "4", T42, "presence", {"type": "presence", "event": "untrack"})
    same(a.take()[:1], [ok_reply("1", "4", T42, {})])
    (leave,) = d.take()
    assert leave.payload == {"joins": {}, "leaves": {"alice": {"metas": [new_meta]}}}


def test_same_key_from_two_sockets_holds_two_metas(hub: Hub) -> None:
    a, b = hub.client(VSN2), hub.client(VSN2)
    for client in (a, b):
        client.join(T42, config(key="user-1"))
        client.send("1", "2", T42, "presence", {"event": "track", "payload": {}})
    c = hub.client(VSN2)
    _, state = c.join(T42)
    metas = state.payload["user-1"]["metas"]
    assert len(metas) == 2
    assert metas[0]["phx_ref"] != metas[1]["phx_ref"]


def test_presence_calls_past_five_per_30_s_get_supabases_rate_limit(hub: Hub) -> None:
    a, b = hub.client(VSN2), hub.client(VSN2)
    a.join(T42, config(key="a"))
    b.join(T42, config(key="b"))
    for n, event in enumerate(["track", "track", "untrack", "track", "track"]):
        a.send("1", str(n + 2), T42, "presence", {"event": event, "payload": {"n": n}})
        assert a.take()[0].payload["status"] == "ok"
    b.take()
    a.send("1", "9", T42, "presence", {"event": "track", "payload": {"n": 9}})
    system, reply = a.take()
    assert system.event == "system"
    assert system.payload == {
        "channel": "org:42",
        "extension": "presence",
        "message": "Client presence rate limit exceeded",
        "status": "error",
    }
    assert reply.payload == {
        "status": "error",
        "response": {"reason": "Client presence rate limit exceeded"},
    }
    assert b.take() == []  # the refused call changed nothing
    assert hub.channels.subscriber_count("org:42") == 2  # the channel stays
    hub.clock.now += 6.0  # 30 s / 5: one call back
    a.send("1", "10", T42, "presence", {"event": "track", "payload": {"n": 10}})
    assert a.take()[0].payload["status"] == "ok"
    a.send("1", "11", T42, "presence", {"event": "track", "payload": {"n": 11}})
    assert a.take()[-1].payload["status"] == "error"


def test_empty_presence_key_is_generated(hub: Hub) -> None:
    a, b = hub.client(VSN2), hub.client(VSN2)
    a.join(T42, config(key=""))
    b.join(T42, config(key=""))
    a.send("1", "2", T42, "presence", {"event": "track", "payload": {}})
    b.send("1", "2", T42, "presence", {"event": "track", "payload": {}})
    c = hub.client(VSN2)
    _, state = c.join(T42)
    keys = list(state.payload)
    assert len(keys) == 2
    assert all(keys)
    assert keys[0] != keys[1]


def test_presence_disabled_until_first_track(hub: Hub) -> None:
    a, b = hub.client(VSN2), hub.client(VSN2)
    a.join(T42, config(key="a"))
    b.join(T42, config(key="b", presence=False))
    a.take(), b.take()
    a.send("1", "2", T42, "presence", {"event": "track", "payload": {"x": 1}})
    assert b.take() == []  # presence off: no diffs
    b.send("1", "2", T42, "presence", {"event": "track", "payload": {"y": 2}})
    ack, state, diff = b.take()
    same([ack], [ok_reply("1", "2", T42, {})])
    assert (state.join_ref, state.event) == ("1", "presence_state")
    assert set(state.payload) == {"a"}
    assert diff.event == "presence_diff"
    assert set(diff.payload["joins"]) == {"b"}


def test_presence_refusals(hub: Hub) -> None:
    client = hub.client(VSN2, limits=SessionLimits(max_payload_bytes=50))
    client.join(T42)
    for i, payload in enumerate(
        [
            {"event": "track", "payload": [1]},
            {"event": "track", "payload": {"x": "y" * 100}},
            {"event": "dance"},
            "track",
        ]
    ):
        client.send("1", str(i + 10), T42, "presence", payload)
        (reply,) = client.take()
        assert reply.payload["status"] == "error", payload
    assert hub.channels.presence_size("org:42") == 0


def test_disconnect_sends_leave_to_others(hub: Hub) -> None:
    a, b = hub.client(VSN1), hub.client(VSN2)
    a.join(T42, config(key="alice"))
    a.join("realtime:org:42:chat", config(key="alice"))
    b.join(T42)
    a.send("1", "2", T42, "presence", {"event": "track", "payload": {"n": 1}})
    b.take()
    a.session.close()
    (leave,) = b.take()
    assert leave.event == "presence_diff"
    assert leave.payload["joins"] == {}
    assert [m["n"] for m in leave.payload["leaves"]["alice"]["metas"]] == [1]
    assert a.session.subs == {}
    assert hub.channels.subscriber_count("org:42") == 1
    assert hub.channels.subscriber_count("org:42:chat") == 0
    assert hub.channels.presence_size("org:42") == 0


# -- time: token expiry and idle sockets -------------------------------------------


def test_tick_ends_channel_when_its_token_expires(hub: Hub) -> None:
    a = hub.client(VSN2, limits=SessionLimits(idle_timeout=1000))
    b = hub.client(VSN2)
    a.join(T42, access_token=hub.token(orgs=["42"], ttl=60))
    b.join(T42)
    a.take(), b.take()
    hub.clock.now += 30
    a.session.tick(hub.clock.now)
    assert a.take() == []
    hub.clock.now += 31
    a.session.tick(hub.clock.now)
    same(
        a.take(),
        [
            Pushed(
                "1",
                None,
                T42,
                "system",
                {
                    "channel": "org:42",
                    "extension": "system",
                    "message": "Token has expired 1 seconds ago",
                    "status": "error",
                },
            ),
            Pushed("1", "1", T42, "phx_close", {}),
        ],
    )
    assert not a.outbox.closed  # the socket stays
    b.send("1", "5", T42, "broadcast", {"event": "e", "payload": {}})
    assert a.take() == []
    a.session.tick(hub.clock.now + 100)
    assert a.take() == []


def test_expired_channel_token_is_caught_between_ticks(hub: Hub) -> None:
    a = hub.client(VSN1)
    a.join(T42, config(self_=True, ack=True), access_token=hub.token(orgs=["42"], ttl=60))
    a.take()
    hub.clock.now += 65
    a.send("1", "2", T42, "broadcast", {"event": "e", "payload": {}})
    system, close = a.take()
    assert system.event == "system"
    assert system.payload["status"] == "error"
    assert system.payload["message"] == "Token has expired 5 seconds ago"
    assert close.event == "phx_close"


def test_a_shorter_lived_token_after_a_tick_is_still_enforced(hub: Hub) -> None:
    """tick skips sessions whose channels' tokens all expire later than
    the last check found; a join or an access_token with an earlier
    expiry must pull that check forward."""
    a = hub.client(VSN2, limits=SessionLimits(idle_timeout=1000))
    a.join(T42, access_token=hub.token(orgs=["42"], ttl=3600))
    a.take()
    hub.clock.now += 10
    a.session.tick(hub.clock.now)  # nothing due before +3600 now
    a.send("1", "2", T42, "access_token", {"access_token": hub.token(orgs=["42"], ttl=20)})
    room = "realtime:org:42:room"
    a.join(room, access_token=hub.token(orgs=["42"], ttl=40))
    a.take()
    hub.clock.now += 25
    a.session.tick(hub.clock.now)
    assert [(m.topic, m.event) for m in a.take()] == [(T42, "system"), (T42, "phx_close")]
    hub.clock.now += 20
    a.session.tick(hub.clock.now)
    assert [(m.topic, m.event) for m in a.take()] == [(room, "system"), (room, "phx_close")]


def test_idle_timeout_closes_with_4000(hub: Hub) -> None:
    client = hub.client(VSN2, limits=SessionLimits(idle_timeout=60))
    hub.clock.now += 50
    client.session.receive('[null,"1","phoenix","heartbeat",{}]')
    hub.clock.now += 50
    client.session.tick(hub.clock.now)
    assert not client.outbox.closed
    hub.clock.now += 11
    client.session.tick(hub.clock.now)
    assert client.outbox.closed
    assert client.outbox.close_code == CloseCode.IDLE_TIMEOUT == 4000


# -- access_token --------------------------------------------------------------------


def test_access_token_of_another_org_ends_the_channel(hub: Hub) -> None:
    client = hub.client(VSN1)
    client.join(T42)
    client.send("1", "2", T42, "access_token", {"access_token": hub.token(orgs=["43"])})
    same(
        client.take(),
        [
            Pushed(
                "1",
                None,
                T42,
                "system",
                {
                    "channel": "org:42",
                    "extension": "system",
                    "message": (
                        "You no longer have permission to read from this Channel topic: org:42"
                    ),
                    "status": "error",
                },
            ),
            Pushed("1", "1", T42, "phx_close", {}),
        ],
    )
    assert client.session.subs == {}


def test_access_token_of_same_org_keeps_the_channel_and_extends_it(hub: Hub) -> None:
    client = hub.client(VSN2, limits=SessionLimits(idle_timeout=1000))
    client.join(T42, access_token=hub.token(orgs=["42"], ttl=60))
    client.send("1", "2", T42, "access_token", {"access_token": hub.token(orgs=["42"], ttl=600)})
    assert client.take() == []  # no reply to access_token
    hub.clock.now += 120
    client.session.tick(hub.clock.now)
    assert client.take() == []
    assert T42 in client.session.subs
    assert not client.outbox.closed
    # The new token's expiry is the one that counts now.
    hub.clock.now += 600
    client.session.tick(hub.clock.now)
    assert [p.event for p in client.take()] == ["system", "phx_close"]


@pytest.mark.parametrize(
    ("token", "message"),
    [
        ("NEW-USER-JWT-456", "The token provided is not a valid JWT"),
        (42, "The token provided is not a valid JWT"),
    ],
)
def test_bad_access_token_ends_the_channel(hub: Hub, token: object, message: str) -> None:
    client = hub.client(VSN2)
    client.join(T42)
    client.send("1", "2", T42, "access_token", {"access_token": token})
    system, close = client.take()
    assert system.payload == {
        "channel": "org:42",
        "extension": "system",
        "message": message,
        "status": "error",
    }
    assert close.event == "phx_close"


def test_null_access_token_is_ignored(hub: Hub) -> None:
    client = hub.client(VSN2)
    client.join(T42)
    client.send("1", "2", T42, "access_token", {"access_token": None})
    assert client.take() == []
    assert T42 in client.session.subs


# -- limits ----------------------------------------------------------------------------


def test_join_rate_limit(hub: Hub) -> None:
    client = hub.client(
        VSN2, orgs=["1", "2", "3", "4"], limits=SessionLimits(joins_per_second=1, join_burst=2)
    )
    client.join("realtime:org:1")
    client.join("realtime:org:2")
    client.send("9", "9", "realtime:org:3", "phx_join", {"config": config()})
    same(
        client.take(),
        [
            error_reply(
                "9", "9", "realtime:org:3", "ClientJoinRateLimitReached: Too many joins per second"
            )
        ],
    )
    assert not client.outbox.closed
    hub.clock.now += 1
    client.join("realtime:org:3")
    client.send("10", "10", "realtime:org:4", "phx_join", {"config": config()})
    (reply,) = client.take()
    assert reply.payload["status"] == "error"


def test_max_channels(hub: Hub) -> None:
    client = hub.client(VSN2, orgs=["1", "2", "3"], limits=SessionLimits(max_channels=2))
    client.join("realtime:org:1")
    client.join("realtime:org:2")
    client.send("9", "9", "realtime:org:3", "phx_join", {"config": config()})
    same(
        client.take(),
        [error_reply("9", "9", "realtime:org:3", "ChannelRateLimitReached: Too many channels")],
    )
    # Re-joining a joined topic is not a new channel.
    client.send("10", "10", "realtime:org:2", "phx_join", {"config": config()})
    close, reply, _ = client.take()
    assert close.event == "phx_close"
    assert reply.payload["status"] == "ok"
    client.send("10", "11", "realtime:org:2", "phx_leave", {})
    client.join("realtime:org:3")


@pytest.mark.parametrize(
    ("vsn", "data"),
    [
        (VSN1, "not json"),
        (VSN1, '[null,null,"phoenix","heartbeat",{}]'),
        (VSN1, b"\x03\x00\x00\x00\x00\x00\x01{}"),
        (VSN2, '{"topic":"phoenix","event":"heartbeat","payload":{},"ref":"1"}'),
        (VSN2, '[1,"1","phoenix","heartbeat",{}]'),
        (VSN2, b"\x03\x01\x02\xff\x0b\x00\x01"),
        (VSN2, b"\x04"),
    ],
)
def test_bad_frame_closes_with_1007(hub: Hub, vsn: Vsn, data: str | bytes) -> None:
    client = hub.client(vsn)
    client.session.receive(data)
    assert client.outbox.closed
    assert client.outbox.close_code == CloseCode.INVALID_FRAME == 1007
    assert client.outbox.frames == []


# -- JWKS keys not yet cached ------------------------------------------------------------


def test_unknown_jwks_key_is_raised_before_any_state_change() -> None:
    from cryptography.hazmat.primitives.asymmetric import ec

    hub = Hub()
    hub.verifier = TokenVerifier(
        secret=SECRET, jwks=JwksCache("http://127.0.0.1:9/unused"), orgs_claim=ORGS
    )
    client = hub.client(VSN2)
    claims = {
        "role": "authenticated",
        "exp": int(hub.clock.now) + 60,
        "app_metadata": {"orgs": ["42"]},
    }
    token = jwt.encode(
        claims, ec.generate_private_key(ec.SECP256R1()), algorithm="ES256", headers={"kid": "k9"}
    )
    frame = json.dumps(["1", "1", T42, "phx_join", {"config": config(), "access_token": token}])
    with pytest.raises(KeyNotCached):
        client.session.receive(frame)
    assert client.outbox.frames == []
    assert client.session.subs == {}
    # The caller refreshed the keys and the kid is still unknown: refused.
    client.session.receive(frame, keys_refreshed=True)
    same(client.take(), [error_reply("1", "1", T42, "InvalidJWTToken: Unknown signing key")])


# -- replaying the recorded clients -----------------------------------------------------


def normalize(value: Any) -> Any:
    """Blank out what legitimately differs from the recording: binding ids
    (any non-zero int) and presence refs (any non-empty string)."""
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            if key in ("phx_ref", "phx_ref_prev"):
                assert isinstance(item, str)
                assert item
                out[key] = "<ref>"
            elif key == "postgres_changes" and isinstance(item, list):
                for binding in item:
                    assert type(binding["id"]) is int
                    assert binding["id"] != 0
                out[key] = [{**normalize(b), "id": "<id>"} for b in item]
            else:
                out[key] = normalize(item)
        return out
    if isinstance(value, list):
        return [normalize(item) for item in value]
    return value


def recorded(event: captures.Event) -> tuple[str, Any]:
    if event.is_binary:
        decoded = event.decoded
        payload = decoded["payload"]
        if isinstance(payload, dict) and "__binary_hex__" in payload:
            # The recorder wrapped a raw payload in JSON; the hub forwards
            # the raw bytes (encoding 0), which realtime-js hands over as an
            # ArrayBuffer.
            topic, name = decoded["topic"].encode(), decoded["event"].encode()
            raw = bytes.fromhex(payload["__binary_hex__"])
            return "binary", bytes((4, len(topic), len(name), 0, 0)) + topic + name + raw
        return "binary", bytes.fromhex(event.raw["hex"])
    return "text", normalize(json.loads(event.raw["data"]))


def produced(frame: Frame) -> tuple[str, Any]:
    if frame.is_text:
        return "text", normalize(json.loads(frame.payload))
    return "binary", frame.payload


@pytest.mark.parametrize("name", sorted(captures.CAPTURES))
def test_replay_recorded_client(name: str) -> None:
    """Feed a real client's frames to a session: the hub answers what the
    recording server answered (which the client accepted)."""
    hub = Hub()
    vsn: Vsn = captures.CAPTURES[name]  # type: ignore[assignment]
    connection_token = hub.token(sub="user-1", orgs=["42", "43"])
    refreshed_token = hub.token(sub="user-1", orgs=["42", "43"], ttl=7200)
    client = hub.client(vsn, principal=hub.verifier.verify(connection_token))
    exchanges = captures.exchanges(name)
    assert len(exchanges) >= 7
    for event, outs in exchanges:
        data = event.data
        if isinstance(data, str):
            data = data.replace(captures.CONNECTION_TOKEN, connection_token)
            data = data.replace(captures.REFRESHED_TOKEN, refreshed_token)
        seen = len(client.outbox.frames)
        client.session.receive(data)
        got = [produced(frame) for frame in client.outbox.frames[seen:]]
        expected = [recorded(out) for out in outs]
        message = decode(data, vsn)
        if message.event == "phx_join" and not any("presence_state" in str(e) for e in expected):
            # The recorder skipped it for a channel without presence; the
            # hub always sends one (supabase-js waits for it).
            state: Any = {"topic": message.topic, "event": "presence_state", "payload": {}}
            state.update({"ref": None, "join_ref": message.join_ref})
            if vsn == VSN2:
                state = [message.join_ref, None, message.topic, "presence_state", {}]
            expected.insert(1, ("text", state))
        if isinstance(data, str) and '"untrack"' in data:
            # The recorder tracked nobody; the hub tells the channel (the
            # sender included) that user-1 left.
            leave = {
                "joins": {},
                "leaves": {
                    "user-1": {"metas": [{"name": "Alice", "online_at": 123, "phx_ref": "<ref>"}]}
                },
            }
            if vsn == VSN1:
                push = {"topic": T42, "event": "presence_diff", "payload": leave, "ref": None}
                expected.append(("text", push))
            else:
                expected.append(("text", [None, None, T42, "presence_diff", leave]))
        assert got == expected, (name, event.raw)
    assert not client.outbox.closed
    assert client.session.subs == {}


# -- fuzz: whatever a client sends, the session answers or closes, never raises ------

WORDS = st.sampled_from(
    [
        "config", "broadcast", "presence", "postgres_changes", "private", "self", "ack",
        "replay", "since", "after", "limit", "key", "enabled", "event", "type", "payload",
        "access_token", "schema", "table", "filter", "track", "untrack", "*", "INSERT",
    ]
)  # fmt: skip
FUZZ_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 5) | WORDS | st.text(max_size=5),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(WORDS, children, max_size=4),
    max_leaves=12,
)
FUZZ_MESSAGE = st.tuples(
    st.sampled_from([None, "1", "2"]),
    st.sampled_from([None, "1", "9"]),
    st.sampled_from(["phoenix", T42, T43, "realtime:org:42:chat", "realtime:user:user-1", "x"]),
    st.sampled_from(
        ["phx_join", "phx_leave", "broadcast", "presence", "access_token", "heartbeat", "zz"]
    ),
    FUZZ_JSON,
)


@settings(max_examples=150, database=None, deadline=None)
@given(
    vsn=st.sampled_from([VSN1, VSN2]),
    messages=st.lists(FUZZ_MESSAGE | st.binary(max_size=40), max_size=12),
    tokens=st.lists(st.sampled_from(["member", "other", "expired", "garbage"]), max_size=3),
)
def test_fuzz_session_never_raises(vsn: Vsn, messages: list[Any], tokens: list[str]) -> None:
    hub = Hub()
    token_for = {
        "member": hub.token(orgs=["42"]),
        "other": hub.token(orgs=["43"]),
        "expired": hub.token(orgs=["42"], ttl=-5),
        "garbage": "garbage",
    }
    client = hub.client(vsn)
    peer = hub.client(VSN2 if vsn == VSN1 else VSN1)
    peer.join(T42, config(key="peer"))
    peer.send("1", "2", T42, "presence", {"event": "track", "payload": {}})
    for i, message in enumerate(messages):
        if client.outbox.closed:
            break
        if isinstance(message, bytes):
            client.session.receive(message)
            continue
        join_ref, ref, topic, event, payload = message
        if tokens and isinstance(payload, dict) and "access_token" in payload:
            payload["access_token"] = token_for[tokens[i % len(tokens)]]
        client.send(join_ref, ref, topic, event, payload)
        client.session.tick(hub.clock.now)
    client.session.close()
    for pushed in client.take() + peer.take():
        assert pushed.binary is not None or pushed.event is not None
    # Everything the client joined is gone from the registry.
    for topic in (T42, T43, "realtime:org:42:chat", "realtime:user:user-1"):
        key = topic.removeprefix("realtime:")
        expected = 1 if topic == T42 else 0
        assert hub.channels.subscriber_count(key) == expected
    assert list(hub.channels.presence_state("org:42")) == ["peer"]


# -- free names: ordinary Supabase channels ---------------------------------------


def test_an_empty_topic_needs_a_name(hub: Hub) -> None:
    client = hub.client(VSN1)
    client.send("1", "1", "realtime:", "phx_join", {"config": config()})
    same(
        client.take(),
        [error_reply("1", "1", "realtime:", "TopicNameRequired: You must provide a topic name")],
    )


@pytest.mark.parametrize("vsn", [VSN1, VSN2])
def test_public_free_names_join_broadcast_and_track_for_any_valid_token(hub: Hub, vsn: Vsn) -> None:
    anon = hub.verifier.verify(hub.token(sub=None, role="anon"))
    a, b = hub.client(vsn, principal=anon), hub.client(vsn, orgs=[])
    for client in (a, b):
        client.join("realtime:room:lobby")
    a.send("1", "2", "realtime:room:lobby", "broadcast", realtime.broadcast_body("hi", {"n": 1}))
    [got] = b.take()
    if vsn == VSN1:
        assert (got.topic, got.payload["event"]) == ("realtime:room:lobby", "hi")
    else:  # kind 4: the topic and the event in the header
        assert got.binary is not None and b"realtime:room:lobby" in got.binary
    assert a.take() == []  # self: false
    b.send("1", "3", "realtime:room:lobby", "presence", realtime.presence_body("track", {"u": 1}))
    assert [m.event for m in b.take()] == ["phx_reply", "presence_diff"]
    assert [m.event for m in a.take()] == ["presence_diff"]


def test_public_and_private_channels_of_one_name_share_nothing(hub: Hub) -> None:
    service = hub.verifier.verify(hub.token(sub="svc", role="service_role"))
    public, private = hub.client(VSN1), hub.client(VSN1, principal=service)
    public.join("realtime:room")
    private.join("realtime:room", {**config(), "private": True})
    assert hub.channels.subscriber_count("room") == 1
    private.send("1", "2", "realtime:room", "broadcast", realtime.broadcast_body("secret", {}))
    public.send("1", "2", "realtime:room", "broadcast", realtime.broadcast_body("open", {}))
    assert public.take() == [] and private.take() == []
    # Each channel still has its own audience: a second public member hears
    # the public one, the private sender is never told of it.
    other = hub.client(VSN1)
    other.join("realtime:room")
    public.send("1", "3", "realtime:room", "broadcast", realtime.broadcast_body("open", {}))
    [heard] = other.take()
    assert heard.payload["event"] == "open" and private.take() == []


@pytest.mark.parametrize("flag", [True, "true", "TRUE", "True"])
def test_private_joins_need_realtime_authorization(hub: Hub, flag: object) -> None:
    client = hub.client(VSN1)
    client.send("1", "1", "realtime:room", "phx_join", {"config": {**config(), "private": flag}})
    [reply] = client.take()
    reason = reply.payload["response"]["reason"]
    assert reply.payload["status"] == "error" and reason.startswith("Unauthorized: ")
    assert "HUB_DATABASE_URL" in reason and client.session.subs == {}


def test_private_does_not_split_org_topics(hub: Hub) -> None:
    a, b = hub.client(VSN1), hub.client(VSN1)
    a.join(T42, {**config(), "private": True})
    b.join(T42)
    a.send("1", "2", T42, "broadcast", realtime.broadcast_body("e", {}))
    assert [m.payload["event"] for m in b.take()] == ["e"]


@pytest.mark.parametrize("value", [1, "yes", None, {"x": 1}])
def test_private_must_be_a_boolean(hub: Hub, value: object) -> None:
    client = hub.client(VSN1)
    client.send("1", "1", "realtime:room", "phx_join", {"config": {"private": value}})
    reply = client.take()[0]
    if value is None:  # absent and null both mean public
        assert reply.payload["status"] == "ok"
        return
    assert reply.payload["response"]["reason"] == (
        "InvalidJoinPayload: config.private must be a boolean"
    )


def test_private_only_refuses_public_free_names_only(hub: Hub) -> None:
    client = hub.client(VSN1, limits=SessionLimits(private_only=True))
    client.send("1", "1", "realtime:room", "phx_join", {"config": config()})
    same(
        client.take(),
        [
            error_reply(
                "1", "1", "realtime:room", "PrivateOnly: This project only allows private channels"
            )
        ],
    )
    client.join(T42)  # the hub's own namespaces keep their rules


def test_replay_is_refused_on_public_channels(hub: Hub) -> None:
    client = hub.client(VSN1)
    cfg = {**config(), "broadcast": {"replay": {"since": 0}}}
    client.send("1", "1", "realtime:room", "phx_join", {"config": cfg})
    same(
        client.take(),
        [
            error_reply(
                "1",
                "1",
                "realtime:room",
                "UnableToReplayMessages: Replay is not allowed for public channels",
            )
        ],
    )


# -- Realtime Authorization: the session's side, fed outcomes ---------------------

PRIVATE = "realtime:room:secret"


def private_config(presence: bool = True) -> dict[str, Any]:
    return {**config(presence=presence), "private": True}


def policed(hub: Hub, vsn: Vsn = VSN1, **claims: Any) -> Client:
    client = hub.client(vsn, orgs=[])
    client.session.policies = True
    return client


def join_private(client: Client, outcome: dict[str, bool] | None, error: str = "") -> list[Pushed]:
    client.send("1", "1", PRIVATE, "phx_join", {"config": private_config()})
    assert client.take() == [], "nothing is answered before the policies are"
    [check] = client.session.take_checks()
    assert (check.mode, check.topic, check.extensions) == (
        "read",
        "room:secret",
        ("broadcast", "presence"),
    )
    assert check.principal.claims["role"] == "authenticated"
    check.resume(outcome, error)
    return client.take()


def test_a_private_join_waits_for_the_read_check_then_is_admitted(hub: Hub) -> None:
    client = policed(hub)
    pushed = join_private(client, {"broadcast": True, "presence": True})
    assert [(p.event, p.payload.get("status")) for p in pushed] == [
        ("phx_reply", "ok"),
        ("presence_state", None),
    ]
    assert hub.channels.subscriber_count("\x00room:secret") == 1
    assert hub.channels.subscriber_count("room:secret") == 0  # the public one


def test_a_private_join_without_any_read_is_refused(hub: Hub) -> None:
    client = policed(hub)
    same(
        join_private(client, {"broadcast": False, "presence": False}),
        [
            error_reply(
                "1",
                "1",
                PRIVATE,
                "Unauthorized: You do not have permissions to read from this Channel topic: "
                "room:secret",
            )
        ],
    )
    assert client.session.subs == {}


def test_a_check_that_cannot_be_answered_refuses_with_its_reason(hub: Hub) -> None:
    client = policed(hub)
    reason = "RlsPolicyError: Error occurred while checking the channel's policies"
    same(join_private(client, None, reason), [error_reply("1", "1", PRIVATE, reason)])


def test_presence_read_only_gets_presence_and_no_broadcast(hub: Hub) -> None:
    reader = policed(hub)
    join_private(reader, {"broadcast": False, "presence": True})
    service = hub.verifier.verify(hub.token(sub="svc", role="service_role"))
    sender = hub.client(VSN1, principal=service)
    sender.join(PRIVATE, private_config())
    sender.send("1", "2", PRIVATE, "broadcast", realtime.broadcast_body("e", {}))
    sender.send("1", "3", PRIVATE, "presence", realtime.presence_body("track", {"s": 1}))
    assert [p.event for p in reader.take()] == ["presence_diff"]


def test_broadcast_read_only_gets_no_presence_state(hub: Hub) -> None:
    client = policed(hub)
    pushed = join_private(client, {"broadcast": True, "presence": False})
    assert [p.event for p in pushed] == ["phx_reply"]


def test_a_denied_broadcast_is_dropped_silently_and_the_answer_kept(hub: Hub) -> None:
    client = policed(hub)
    join_private(client, {"broadcast": True, "presence": True})
    listener = hub.client(VSN1, principal=hub.verifier.verify(hub.token(role="service_role")))
    listener.join(PRIVATE, private_config())
    body = realtime.broadcast_body("e", {"n": 1})
    client.send("1", "2", PRIVATE, "broadcast", body)
    [check] = client.session.take_checks()
    assert (check.mode, check.extensions) == ("write", ("broadcast",))
    check.resume({"broadcast": False}, "")
    client.send("1", "3", PRIVATE, "broadcast", body)
    assert client.session.take_checks() == ()  # kept for the channel's life
    assert client.take() == [] and listener.take() == []


def test_an_allowed_broadcast_is_published_once_checked(hub: Hub) -> None:
    client = policed(hub)
    join_private(client, {"broadcast": True, "presence": True})
    listener = hub.client(VSN1, principal=hub.verifier.verify(hub.token(role="service_role")))
    listener.join(PRIVATE, private_config())
    client.send("1", "2", PRIVATE, "broadcast", realtime.broadcast_body("first", {}))
    [check] = client.session.take_checks()
    check.resume({"broadcast": True}, "")
    client.send("1", "3", PRIVATE, "broadcast", realtime.broadcast_body("second", {}))
    assert client.session.take_checks() == ()
    assert [p.payload["event"] for p in listener.take()] == ["first", "second"]


def test_a_denied_track_gets_an_error_reply(hub: Hub) -> None:
    client = policed(hub)
    join_private(client, {"broadcast": True, "presence": True})
    client.send("1", "2", PRIVATE, "presence", realtime.presence_body("track", {"s": 1}))
    [check] = client.session.take_checks()
    assert (check.mode, check.extensions) == ("write", ("presence",))
    check.resume({"presence": False}, "")
    same(
        client.take(),
        [
            error_reply(
                "1",
                "2",
                PRIVATE,
                "Unauthorized: You do not have permissions to write to this Channel topic: "
                "room:secret",
            )
        ],
    )
    assert hub.channels.presence_size("\x00room:secret") == 0


def test_a_new_token_that_loses_read_ends_the_channel(hub: Hub) -> None:
    client = policed(hub)
    join_private(client, {"broadcast": True, "presence": True})
    client.send("1", "2", PRIVATE, "access_token", {"access_token": hub.token(orgs=[])})
    [check] = client.session.take_checks()
    assert check.mode == "read"
    check.resume({"broadcast": False, "presence": True}, "")
    pushed = client.take()
    assert [p.event for p in pushed] == ["system", "phx_close"]
    assert pushed[0].payload["message"] == (
        "You no longer have permission to read from this Channel topic: room:secret"
    )
    assert client.session.subs == {}


def test_a_new_token_that_keeps_read_clears_the_write_answers(hub: Hub) -> None:
    client = policed(hub)
    join_private(client, {"broadcast": True, "presence": True})
    client.send("1", "2", PRIVATE, "broadcast", realtime.broadcast_body("e", {}))
    client.session.take_checks()[0].resume({"broadcast": False}, "")
    client.send("1", "3", PRIVATE, "access_token", {"access_token": hub.token(orgs=[])})
    client.session.take_checks()[0].resume({"broadcast": True, "presence": True}, "")
    client.send("1", "4", PRIVATE, "broadcast", realtime.broadcast_body("e", {}))
    [check] = client.session.take_checks()  # asked again
    assert check.mode == "write"


def test_a_socket_gone_during_the_read_check_admits_nothing(hub: Hub) -> None:
    client = policed(hub)
    client.send("1", "1", PRIVATE, "phx_join", {"config": private_config()})
    [check] = client.session.take_checks()
    client.session.close()
    check.resume({"broadcast": True, "presence": True}, "")
    assert client.session.subs == {} and hub.channels.subscriber_count("\x00room:secret") == 0


def test_bad_tracks_get_supabases_replies(hub: Hub) -> None:
    client = hub.client(VSN1, limits=SessionLimits(max_payload_bytes=50))
    client.join(T42)
    for ref, meta, reason in (
        ("2", [1, 2], "Presence track payload must be a map"),
        ("3", {"x": "y" * 100}, "Track message size exceeded"),
    ):
        client.send(
            "1", ref, T42, "presence", {"type": "presence", "event": "track", "payload": meta}
        )
        same(client.take(), [error_reply("1", ref, T42, reason)])


def test_a_private_join_asks_its_replay_once_admitted(hub: Hub) -> None:
    client = policed(hub)
    cfg = {**private_config(), "broadcast": {"replay": {"since": 1000, "limit": 5}}}
    client.send("1", "1", PRIVATE, "phx_join", {"config": cfg})
    assert client.session.take_replays() == ()  # nothing before the policies answer
    client.session.take_checks()[0].resume({"broadcast": True, "presence": True}, "")
    [(sub, request)] = client.session.take_replays()
    assert (sub.topic.text, request.since, request.limit) == ("room:secret", 1.0, 5)
    assert sub.replay_buffer is None  # no seq to join a live stream on
    client.send(
        "2",
        "2",
        "realtime:other",
        "phx_join",
        {"config": {**cfg, "broadcast": {"replay": {"after": 3}}}},
    )
    [reply] = client.take()[-1:]
    assert reply.payload["response"]["reason"] == (
        "InvalidJoinPayload: replay on a private channel takes since (ms)"
    )
