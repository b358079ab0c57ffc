"""Property-based fuzzing of the session: arbitrary join payloads (the
config parser: broadcast, presence, postgres_changes, replay, private,
access_token) and arbitrary frames, fed to :class:`hub.session.Session` with
a :class:`hub.outbox.ListOutbox`, as ``tests/unit/test_session.py`` does.

Properties:

* ``receive`` never raises (the one documented exception, KeyNotCached,
  needs a JWKS verifier, which these sessions do not have);
* a frame that does not decode closes the outbox with 1007 and nothing
  else; every decoded request (a join, a leave, a presence message, a frame
  for a topic not joined, anything on ``phoenix``) gets exactly its answer, a
  ``phx_reply`` with the same ref and status ``ok`` or ``error``;
* a refused join gives a ``Code: message`` reason and leaves the socket
  open; an accepted one is followed by ``presence_state``, echoes its
  bindings in order with non-zero integer ids, and, when it asked for a
  replay, the replay runs against a store without raising and delivers the
  events after ``replay.after`` in seq order;
* after any frame (unless closed), a heartbeat is still answered.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from typing import Any

import jwt
from hypothesis import given, settings
from hypothesis import strategies as st

from hub.auth.tokens import TokenVerifier
from hub.channels.durable import DurableFeed
from hub.errors import CloseCode, ProtocolError
from hub.frames import Frame
from hub.outbox import ListOutbox
from hub.protocol import VSN1, VSN2, Vsn, decode
from hub.session import Session
from hub.store.memory import MemoryStore
from tests.support.channels import local_channels

SECRET = b"fuzz-secret-long-enough-for-hs256-0123456789abcdef"
ORGS = ("app_metadata", "orgs")
TOPIC = "realtime:org:42"
REASON = re.compile(r"^[A-Za-z]+: .+", re.DOTALL)


def token(orgs: Any = ("42",), ttl: float = 3600, **extra: Any) -> str:
    claims: dict[str, Any] = {"role": "authenticated", "exp": int(time.time() + ttl), "sub": "u1"}
    if orgs is not None:
        claims["app_metadata"] = {"orgs": list(orgs)}
    claims.update(extra)
    return jwt.encode(claims, SECRET, algorithm="HS256")


class Rig:
    """One session on an in-memory engine and store."""

    def __init__(self, vsn: Vsn) -> None:
        self.vsn = vsn
        self.verifier = TokenVerifier(secret=SECRET, jwks=None, orgs_claim=ORGS)
        self.channels = local_channels()
        self.store = MemoryStore(max_events_per_org=100)
        self.feed = DurableFeed(self.channels, self.store, replay_max=50)
        self.outbox = ListOutbox()
        self.session = Session(
            conn_id="fuzz-1",
            vsn=vsn,
            principal=self.verifier.verify(token()),
            verifier=self.verifier,
            channels=self.channels,
            outbox=self.outbox,
        )
        self.seen = 0

    def frame(self, join_ref: Any, ref: Any, topic: Any, event: Any, payload: Any) -> str:
        if self.vsn == VSN1:
            return json.dumps(
                {
                    "topic": topic,
                    "event": event,
                    "payload": payload,
                    "ref": ref,
                    "join_ref": join_ref,
                }
            )
        return json.dumps([join_ref, ref, topic, event, payload])

    def take(self) -> list[Any]:
        frames: list[Frame] = self.outbox.frames[self.seen :]
        self.seen = len(self.outbox.frames)
        out = []
        for frame in frames:
            if not frame.is_text:
                out.append(("binary", frame.payload))
                continue
            value = json.loads(frame.payload)
            if isinstance(value, dict):
                value = [
                    value.get("join_ref"),
                    value["ref"],
                    value["topic"],
                    value["event"],
                    value["payload"],
                ]
            out.append(value)
        return out

    def heartbeat_answered(self) -> None:
        if self.outbox.closed:
            return
        self.take()
        self.session.receive(self.frame(None, "hb", "phoenix", "heartbeat", {}))
        assert self.take() == [
            [None, "hb", "phoenix", "phx_reply", {"status": "ok", "response": {}}]
        ]


# -- join payloads ---------------------------------------------------------------------

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=12),
)
anything = st.recursive(
    scalars,
    lambda c: st.one_of(
        st.lists(c, max_size=4), st.dictionaries(st.text(max_size=8), c, max_size=4)
    ),
    max_leaves=12,
)


def maybe(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """The strategy's values, or any JSON value in its place."""
    return st.one_of(strategy, strategy, anything)


replays = maybe(
    st.fixed_dictionaries(
        {},
        optional={
            "after": maybe(st.integers(min_value=-5, max_value=30)),
            "since": maybe(st.integers(min_value=-5, max_value=2**45)),
            "limit": maybe(st.integers(min_value=-2, max_value=100)),
        },
    )
)
bindings = maybe(
    st.lists(
        maybe(
            st.fixed_dictionaries(
                {},
                optional={
                    "event": maybe(
                        st.sampled_from(["*", "INSERT", "UPDATE", "DELETE", "TRUNCATE"])
                    ),
                    "schema": maybe(st.sampled_from(["public", "", "x"])),
                    "table": maybe(st.sampled_from(["items", "", "*"])),
                    "filter": maybe(
                        st.sampled_from(["n=eq.1", "n=in.(1,2)", "n=gt.x", "bad", "=eq.", "n=zz.1"])
                    ),
                },
            )
        ),
        max_size=3,
    )
)
configs = maybe(
    st.fixed_dictionaries(
        {},
        optional={
            "broadcast": maybe(
                st.fixed_dictionaries(
                    {},
                    optional={
                        "self": maybe(st.booleans()),
                        "ack": maybe(st.booleans()),
                        "replay": replays,
                    },
                )
            ),
            "presence": maybe(
                st.fixed_dictionaries(
                    {},
                    optional={"key": maybe(st.text(max_size=8)), "enabled": maybe(st.booleans())},
                )
            ),
            "postgres_changes": bindings,
            "private": maybe(st.booleans()),
        },
    )
)
access_tokens = st.one_of(
    st.none(),
    st.just(""),
    st.sampled_from(["member", "other-org", "expired", "garbage"]),
    anything,
)
topics = st.one_of(
    st.just(TOPIC),
    st.just(TOPIC),
    st.sampled_from(
        ["realtime:org:42:chat", "realtime:org:43", "realtime:mother", "realtime:user:u1"]
    ),
    st.text(max_size=20),
)


def resolve_token(name: Any) -> Any:
    tokens = {
        "member": token(),
        "other-org": token(["43"]),
        "expired": token(ttl=-10),
        "garbage": "a.b.c",
    }
    return tokens.get(name, name) if isinstance(name, str) else name


@settings(max_examples=150, deadline=None)
@given(
    vsn=st.sampled_from([VSN1, VSN2]),
    topic=topics,
    config=configs,
    access_token=access_tokens,
    extra=st.dictionaries(st.sampled_from(["version", "x", "config2"]), anything, max_size=2),
    whole=st.one_of(st.none(), anything),
)
def test_any_join_payload_gets_a_defined_answer(
    vsn: Vsn, topic: str, config: Any, access_token: Any, extra: dict[str, Any], whole: Any
) -> None:
    rig = Rig(vsn)
    payload: Any = {"config": config, **extra}
    if access_token is not None:
        payload["access_token"] = resolve_token(access_token)
    if whole is not None:
        payload = whole  # not even an object
    # Events to replay: seqs 1..5 of org 42.
    asyncio.run(rig.store.append("42", [("e", {"n": n}) for n in range(1, 6)]))
    rig.take()
    rig.session.receive(rig.frame("j1", "j1", topic, "phx_join", payload))
    assert not rig.outbox.closed
    pushed = rig.take()
    assert pushed, "a join got no answer"
    join_ref, ref, reply_topic, event, body = pushed[0]
    assert (join_ref, ref, reply_topic, event) == ("j1", "j1", topic, "phx_reply")
    assert body["status"] in ("ok", "error")
    if body["status"] == "error":
        assert len(pushed) == 1, pushed
        assert REASON.match(body["response"]["reason"]), body
        assert not rig.session.subs
    else:
        assert pushed[1][3] == "presence_state", pushed
        used = payload.get("config") if isinstance(payload, dict) else None
        sent = used.get("postgres_changes") if isinstance(used, dict) else None
        echoed = body["response"]["postgres_changes"]
        assert len(echoed) == len(sent or [])
        for mine, theirs in zip(sent or [], echoed, strict=True):
            assert {k: v for k, v in theirs.items() if k != "id"} == mine
            assert isinstance(theirs["id"], int) and theirs["id"] != 0
        replays_asked = rig.session.take_replays()
        for sub, request in replays_asked:
            asyncio.run(rig.feed.replay(sub, request))
            delivered = [m for m in rig.take() if m[0] == "binary" or m[3] == "broadcast"]
            if request.after is not None and not sub.durable_paused:
                assert len(delivered) == max(0, 5 - request.after), (request, delivered)
    rig.heartbeat_answered()


# -- arbitrary frames on a session with one joined channel -------------------------------


@st.composite
def frames(draw: st.DrawFn) -> tuple[Vsn, str | bytes]:
    vsn = draw(st.sampled_from([VSN1, VSN2]))
    kind = draw(st.integers(0, 3))
    if kind == 0:
        return vsn, draw(st.one_of(st.text(max_size=60), st.binary(max_size=60)))
    topic = draw(st.one_of(st.just(TOPIC), st.just("phoenix"), topics))
    event = draw(
        st.one_of(
            st.sampled_from(
                ["phx_join", "phx_leave", "broadcast", "presence", "access_token", "heartbeat"]
            ),
            st.text(max_size=10),
        )
    )
    payload = draw(
        st.one_of(
            anything,
            st.fixed_dictionaries(
                {
                    "type": maybe(st.sampled_from(["broadcast", "presence"])),
                    "event": maybe(st.sampled_from(["x", "track", "untrack", ""])),
                    "payload": anything,
                }
            ),
            st.fixed_dictionaries({"access_token": access_tokens.map(resolve_token)}),
        )
    )
    join_ref = draw(st.one_of(st.just("1"), st.none(), st.text(max_size=3)))
    ref = draw(st.one_of(st.text(min_size=1, max_size=4), st.none()))
    if vsn == VSN1:
        data = {
            "topic": topic,
            "event": event,
            "payload": payload,
            "ref": ref,
            "join_ref": join_ref,
        }
        return vsn, json.dumps(data)
    if kind == 3:
        fields = [
            (join_ref or "").encode(),
            (ref or "").encode(),
            topic.encode()[:255],
            event.encode()[:255],
            b"",
        ]
        body = json.dumps(payload).encode()
        return vsn, bytes([3, *(len(f) for f in fields), 1]) + b"".join(fields) + body
    return vsn, json.dumps([join_ref, ref, topic, event, payload])


@settings(max_examples=200, deadline=None)
@given(frames())
def test_any_frame_gets_a_defined_answer(case: tuple[Vsn, str | bytes]) -> None:
    vsn, data = case
    rig = Rig(vsn)
    rig.session.receive(rig.frame("1", "1", TOPIC, "phx_join", {"config": {}}))
    rig.take()
    try:
        message = decode(data, vsn)
    except ProtocolError:
        message = None
    rig.session.receive(data)
    pushed = rig.take()
    if message is None:
        assert rig.outbox.closed and rig.outbox.close_code == CloseCode.INVALID_FRAME
        assert pushed == []
        return
    assert not rig.outbox.closed
    joined = message.topic == TOPIC and message.join_ref in (None, "1")
    quiet = joined and message.event in ("broadcast", "access_token")
    if not quiet:
        replies = [p for p in pushed if p[0] != "binary" and p[3] == "phx_reply"]
        assert replies, (message, pushed)
        assert replies[0][1] == message.ref
        assert replies[0][4]["status"] in ("ok", "error")
        if replies[0][4]["status"] == "error":
            assert isinstance(replies[0][4]["response"]["reason"], str)
    rig.heartbeat_answered()


@settings(max_examples=60, deadline=None)
@given(st.lists(frames(), min_size=2, max_size=12))
def test_frame_sequences_never_break_a_session(cases: list[tuple[Vsn, str | bytes]]) -> None:
    """Many frames in a row on one session: no exception, and the socket is
    either closed with 1007 or still answers heartbeats."""
    rig = Rig(cases[0][0])
    for _, data in cases:
        if rig.outbox.closed:
            break
        rig.session.receive(data)
        for sub, request in rig.session.take_replays():
            asyncio.run(rig.feed.replay(sub, request))
    assert not rig.outbox.closed or rig.outbox.close_code == CloseCode.INVALID_FRAME
    rig.heartbeat_answered()
    rig.session.close()
    assert rig.channels.topic_count == 0
