"""Property-based fuzzing of the wire codec (``hub.protocol``).

For any input, text or binary, in either serializer, ``decode`` returns a
well-typed :class:`~hub.protocol.Message` or raises
:class:`~hub.errors.ProtocolError` (documented), nothing else, and the
error's message never quotes the frame.  Binary kind-3 frames are checked
against an independent model of the format, so a lying length is refused
exactly when it lies.  Encoding then decoding gives the message back.
A short seeded run of mutated frames against a real hub closes the loop:
every frame gets its defined answer and the hub keeps serving.
"""

from __future__ import annotations

import asyncio
import json
import random
from typing import Any

import orjson
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from hub.client.realtime import split_kind4
from hub.errors import ProtocolError
from hub.protocol import VSN1, VSN2, Broadcast, Message, decode, encode
from tests.support.hubs import HubProcess

VSNS = st.sampled_from([VSN1, VSN2])
#: Planted in fuzzed frames: no error message may repeat it.
MARK = "S3CR3T-FRAME-CONTENT"

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
    st.just(MARK),
)
json_values = st.recursive(
    json_scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=5),
        st.dictionaries(st.text(max_size=10), children, max_size=5),
    ),
    max_leaves=20,
)
refs = st.one_of(st.none(), st.text(max_size=10), json_values)
fields = st.sampled_from(["topic", "event", "payload", "ref", "join_ref", "extra"])


@st.composite
def envelopes(draw: st.DrawFn) -> tuple[str, Any]:
    """Near-valid frames of either serializer: right shape, any field types."""
    vsn = draw(VSNS)
    topic = draw(st.one_of(st.sampled_from(["phoenix", "realtime:org:42"]), json_values))
    event = draw(st.one_of(st.sampled_from(["heartbeat", "phx_join", "broadcast"]), json_values))
    ref, join_ref, payload = draw(refs), draw(refs), draw(json_values)
    if vsn == VSN1:
        frame: Any = {"topic": topic, "event": event, "payload": payload, "ref": ref}
        frame["join_ref"] = join_ref
        for name in draw(st.lists(fields, max_size=2)):
            if draw(st.booleans()):
                frame.pop(name, None)
            else:
                frame[name] = draw(json_values)
    else:
        frame = [join_ref, ref, topic, event, payload]
        if draw(st.booleans()):
            frame = draw(st.lists(json_values, max_size=7))
    return vsn, json.dumps(frame)


def check_decoded(message: Message) -> None:
    assert isinstance(message.topic, str)
    assert isinstance(message.event, str)
    assert message.ref is None or isinstance(message.ref, str)
    assert message.join_ref is None or isinstance(message.join_ref, str)


def decode_or_error(data: str | bytes, vsn: Any) -> Message | ProtocolError:
    """Decode; the documented ProtocolError is returned, anything else raises."""
    try:
        message = decode(data, vsn)
    except ProtocolError as exc:
        assert MARK not in str(exc), "the error quotes the frame"
        assert len(str(exc)) < 200
        return exc
    check_decoded(message)
    return message


@settings(max_examples=150, deadline=None)
@given(st.text(max_size=200), VSNS)
def test_any_text_decodes_or_is_refused(text: str, vsn: Any) -> None:
    decode_or_error(text, vsn)


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=300), VSNS)
def test_any_bytes_decode_or_are_refused(data: bytes, vsn: Any) -> None:
    result = decode_or_error(data, vsn)
    if vsn == VSN1:
        assert isinstance(result, ProtocolError), "binary frames need vsn 2.0.0"


@settings(max_examples=150, deadline=None)
@given(envelopes())
def test_envelopes_with_any_field_types(case: tuple[str, Any]) -> None:
    vsn, text = case
    result = decode_or_error(text, vsn)
    value = json.loads(text)
    if isinstance(result, Message):
        if vsn == VSN1:
            assert isinstance(value, dict)
            assert result.topic == value["topic"] and result.event == value["event"]
            assert result.payload == value.get("payload", {})
        else:
            assert isinstance(value, list) and len(value) == 5
            assert [result.join_ref, result.ref, result.topic, result.event] == value[:4]
            assert result.payload == value[4]


def model_kind3(data: bytes) -> tuple[str, str, str, str, bytes, bool] | None:
    """An independent reading of the kind-3 format: the fields, or None when
    the frame is malformed."""
    if len(data) < 7 or data[0] != 3 or data[6] not in (0, 1):
        return None
    lengths, pos, parts = data[1:6], 7, []
    if pos + sum(lengths) > len(data):
        return None
    for length in lengths:
        parts.append(data[pos : pos + length])
        pos += length
    try:
        join_ref, ref, topic, event = (part.decode("utf-8") for part in parts[:4])
    except UnicodeDecodeError:
        return None
    payload = data[pos:]
    if data[6] == 1:
        try:
            orjson.loads(payload)
        except orjson.JSONDecodeError:
            return None
    return join_ref, ref, topic, event, payload, data[6] == 1


@st.composite
def kind3_frames(draw: st.DrawFn) -> bytes:
    """Kind-3 frames whose declared lengths may lie, with fields that may not
    be UTF-8 and payloads that may not be JSON."""
    parts = [
        draw(st.one_of(st.text(max_size=8).map(str.encode), st.binary(max_size=8)))
        for _ in range(5)
    ]
    lengths = [len(part) for part in parts]
    if draw(st.booleans()):
        index = draw(st.integers(0, 4))
        lengths[index] = draw(st.integers(0, 255))
    enc = draw(st.sampled_from([0, 1, 1, 2, 255]))
    payload = draw(
        st.one_of(
            json_values.map(lambda v: json.dumps(v).encode()),
            st.binary(max_size=20),
        )
    )
    kind = draw(st.sampled_from([3, 3, 3, 0, 1, 2, 4]))
    frame = bytes([kind, *lengths, enc]) + b"".join(parts) + payload
    if draw(st.integers(0, 9)) == 0:
        frame = frame[: draw(st.integers(0, len(frame)))]
    return frame


@settings(max_examples=200, deadline=None)
@given(kind3_frames())
def test_kind3_frames_against_a_model(frame: bytes) -> None:
    result = decode_or_error(frame, VSN2)
    expected = model_kind3(frame)
    if expected is None:
        assert isinstance(result, ProtocolError), (frame, result)
        return
    assert isinstance(result, Message), (frame, result)
    join_ref, ref, topic, event, payload, is_json = expected
    assert (result.join_ref, result.ref, result.topic) == (join_ref or None, ref or None, topic)
    assert result.event == "broadcast"
    body = result.payload
    assert (body.event, body.data, body.is_json) == (event, payload, is_json)


text_fields = st.text(max_size=30)


@settings(max_examples=150, deadline=None)
@given(
    vsn=VSNS,
    join_ref=st.one_of(st.none(), text_fields),
    ref=st.one_of(st.none(), text_fields),
    topic=text_fields,
    event=text_fields,
    payload=json_values,
)
def test_encode_then_decode_round_trips(
    vsn: Any, join_ref: str | None, ref: str | None, topic: str, event: str, payload: Any
) -> None:
    frame = encode(vsn, join_ref, ref, topic, event, payload)
    message = decode(frame.payload.decode(), vsn)
    assert (message.join_ref, message.ref, message.topic, message.event) == (
        join_ref,
        ref,
        topic,
        event,
    )
    assert message.payload == json.loads(json.dumps(payload))


SEQS = st.integers(0, 2**40)


@settings(max_examples=150, deadline=None)
@given(
    # Routing keys as the hub makes them: no control characters (a private
    # channel's key starts with one, and its frames carry the topic only).
    st.text(st.characters(blacklist_categories=("Cc", "Cs")), min_size=1, max_size=40),
    st.text(min_size=1, max_size=60),
    json_values,
    st.one_of(
        st.none(), st.fixed_dictionaries({"id": st.uuids().map(str), "seq": st.integers(0, 2**40)})
    ),
)
def test_kind4_broadcasts_carry_what_was_published(
    topic: str, event: str, payload: Any, meta: dict[str, Any] | None
) -> None:
    assume(len(("realtime:" + topic).encode()) <= 255 and len(event.encode()) <= 255)
    broadcast = Broadcast.from_value(topic, event, payload, meta=meta)
    data = broadcast.frame_v2().payload
    assert data[0] == 4
    got_topic, got_event, got_meta, enc, body = split_kind4(data)
    assert (got_topic, got_event, enc) == ("realtime:" + topic, event, 1)
    assert json.loads(body) == json.loads(json.dumps(payload))
    assert (json.loads(got_meta) if got_meta else None) == meta
    v1 = broadcast.frame_v1()
    assert v1 is not None
    value = json.loads(v1.payload)
    assert value["payload"]["payload"] == json.loads(json.dumps(payload))
    assert "ref" in value


# -- the loop closed over a real hub ------------------------------------------------


def _mutate(rng: random.Random, frame: bytes) -> bytes:
    data = bytearray(frame)
    for _ in range(rng.randint(1, 4)):
        choice = rng.random()
        if choice < 0.4 and data:
            data[rng.randrange(len(data))] = rng.randrange(256)
        elif choice < 0.6 and data:
            del data[rng.randrange(len(data))]
        elif choice < 0.8:
            data.insert(rng.randrange(len(data) + 1), rng.randrange(256))
        else:
            data = data[: rng.randrange(len(data) + 1)]
    return bytes(data)


SEEDS_V1 = [
    b'{"topic":"phoenix","event":"heartbeat","payload":{},"ref":"1","join_ref":null}',
    b'{"topic":"realtime:org:ORG","event":"phx_join","payload":{"config":{}},"ref":"2",'
    b'"join_ref":"2"}',
    b'{"topic":"realtime:org:ORG","event":"broadcast","payload":{"type":"broadcast",'
    b'"event":"x","payload":{}},"ref":"3","join_ref":"2"}',
]
SEEDS_V2 = [
    b'[null,"1","phoenix","heartbeat",{}]',
    b'["2","2","realtime:org:ORG","phx_join",{"config":{"broadcast":{"ack":true}}}]',
    b"KIND3",
]


def kind3(org: str) -> bytes:
    fields = [b"2", b"3", f"realtime:org:{org}".encode(), b"x", b""]
    return bytes([3, *(len(f) for f in fields), 1]) + b"".join(fields) + b'{"a":1}'


async def test_mutated_frames_against_a_real_hub(hub_server: HubProcess) -> None:
    """Seeded mutations of valid frames, sent over real sockets: each frame
    gets a reply, or the socket is closed with 1007 (or 1009/1000 never), and
    the hub keeps serving; a bystander's heartbeats keep working."""
    hub = hub_server
    rng = random.Random(20261127)
    org = "fz" + format(rng.getrandbits(40), "x")
    token = hub.token(orgs=[org])
    start = len(hub.log())
    bystander = await connect(f"{hub.ws_url}?apikey={token}&vsn=2.0.0", open_timeout=5)
    sent = closes = replies = 0
    for vsn, seeds in ((VSN1, SEEDS_V1), (VSN2, SEEDS_V2)):
        conn = None
        for _ in range(80):
            if conn is None:
                conn = await connect(
                    f"{hub.ws_url}?apikey={token}&vsn={vsn}", open_timeout=5, ping_interval=None
                )
            seed = rng.choice(seeds).replace(b"ORG", org.encode())
            if seed == b"KIND3":
                seed = kind3(org)
            frame = _mutate(rng, seed)
            binary = vsn == VSN2 and frame[:1] == b"\x03"
            try:
                if binary:
                    await conn.send(frame)
                else:
                    await conn.send(frame.decode("utf-8", errors="replace"))
                sent += 1
                # Drain what the frame caused; a frame may legitimately cause
                # nothing (a well-formed broadcast without ack).
                while True:
                    await asyncio.wait_for(conn.recv(), 0.05)
                    replies += 1
            except TimeoutError:
                continue
            except ConnectionClosed:
                code = conn.close_code
                assert code == 1007, f"closed with {code} after {frame!r}"
                closes += 1
                conn = None
        if conn is not None:
            await conn.close()
    await bystander.send('[null,"hb","phoenix","heartbeat",{}]')
    reply = json.loads(await asyncio.wait_for(bystander.recv(), 5))
    assert reply[1] == "hb" and reply[4]["status"] == "ok"
    await bystander.close()
    assert sent >= 150 and closes > 0 and replies > 0, (sent, closes, replies)
    assert hub.process.poll() is None
    assert "Traceback" not in hub.log()[start:]
