"""The wire codec against the recorded real-client frames, bad input and fuzz."""

from __future__ import annotations

import json
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hub.errors import ProtocolError
from hub.frames import OP_BINARY, OP_TEXT, Frame, binary_frame, text_frame
from hub.protocol import (
    PRIVATE_MARK,
    VSN1,
    VSN2,
    BinaryBroadcast,
    Broadcast,
    Message,
    Vsn,
    decode,
    encode,
    encode_reply,
)
from tests.support import captures

FUZZ = settings(
    max_examples=300,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)

TOPIC = "realtime:org:42"


def kind3(
    join_ref: bytes,
    ref: bytes,
    topic: bytes,
    event: bytes,
    meta: bytes,
    enc: int,
    payload: bytes,
) -> bytes:
    """A client->server user broadcast, built the way realtime-js builds it."""
    header = bytes((3, len(join_ref), len(ref), len(topic), len(event), len(meta), enc))
    return header + join_ref + ref + topic + event + meta + payload


def as_json(data: str | bytes) -> Any:
    return json.loads(data)


# -- decoding the recorded client frames -----------------------------------


def expected_message(event: captures.Event, vsn: str) -> Message:
    """Decode a recorded frame independently of the hub (stdlib json and the
    recorder's own reading of binary frames)."""
    if event.is_binary:
        decoded = event.decoded
        assert decoded["kind"] == 3
        if decoded["encoding"] == "json":
            data = json.dumps(decoded["payload"], separators=(",", ":")).encode()
            is_json = True
        else:
            data = bytes.fromhex(decoded["payload"]["__binary_hex__"])
            is_json = False
        return Message(
            decoded["join_ref"] or None,
            decoded["ref"] or None,
            decoded["topic"],
            "broadcast",
            BinaryBroadcast(decoded["user_event"], data, is_json),
        )
    value = json.loads(event.raw["data"])
    if vsn == VSN1:
        return Message(
            value.get("join_ref"),
            value.get("ref"),
            value["topic"],
            value["event"],
            value.get("payload", {}),
        )
    join_ref, ref, topic, name, payload = value
    return Message(join_ref, ref, topic, name, payload)


@pytest.mark.parametrize("name", sorted(captures.CAPTURES))
def test_every_recorded_client_frame_decodes(name: str) -> None:
    vsn: Vsn = captures.CAPTURES[name]  # type: ignore[assignment]
    ins = captures.frames(name, "in")
    assert ins, f"{name} has no client frames"
    for event in ins:
        message = decode(event.data, vsn)
        assert message == expected_message(event, vsn), event.raw


def test_recorded_event_sequences() -> None:
    """The captures hold what the clients really send: each one's sequence
    of events, so a broken capture loader cannot pass the test above empty."""

    def events(name: str) -> list[str]:
        vsn: Vsn = captures.CAPTURES[name]  # type: ignore[assignment]
        return [decode(e.data, vsn).event for e in captures.frames(name, "in")]

    python = ["phx_join", "heartbeat", "broadcast", "presence", "access_token"]
    python += ["presence", "phx_leave"]
    assert events("py_realtime") == python
    assert events("py_supabase") == python
    js = ["phx_join", "phx_join", "broadcast", "broadcast", "broadcast", "presence"]
    js += ["access_token", "access_token", "presence", "phx_leave", "phx_leave"]
    assert events("js_supabase_v1") == js
    assert events("js_supabase_v2") == js


def test_python_heartbeat_has_null_refs() -> None:
    (heartbeat,) = [
        e for e in captures.frames("py_realtime", "in") if "heartbeat" in e.raw.get("data", "")
    ]
    assert decode(heartbeat.data, VSN1) == Message(None, None, "phoenix", "heartbeat", {})


def test_js_binary_broadcasts_decode_to_exact_bytes() -> None:
    binaries = [e for e in captures.frames("js_supabase_v2", "in") if e.is_binary]
    assert len(binaries) == 3
    ping, noack, raw = (decode(e.data, VSN2) for e in binaries)
    assert ping == Message(
        "6", "10", TOPIC, "broadcast", BinaryBroadcast("client_ping", b'{"hello":"world"}', True)
    )
    assert noack == Message(
        "9", "11", "realtime:org:43", "broadcast", BinaryBroadcast("noack", b'{"a":1}', True)
    )
    assert raw == Message(
        "6", "12", TOPIC, "broadcast", BinaryBroadcast("bin", bytes.fromhex("deadbeef"), False)
    )


def test_protocol_md_example_frame() -> None:
    frame = bytes.fromhex("0301020f0b0001") + b"610realtime:org:42client_ping{}"
    assert decode(frame, VSN2) == Message(
        "6", "10", TOPIC, "broadcast", BinaryBroadcast("client_ping", b"{}", True)
    )


def test_v1_payload_defaults_to_empty_object() -> None:
    message = decode('{"topic":"phoenix","event":"heartbeat","ref":"1"}', VSN1)
    assert message == Message(None, "1", "phoenix", "heartbeat", {})


def test_binary_meta_is_skipped_and_empty_refs_are_none() -> None:
    frame = kind3(b"", b"", TOPIC.encode(), b"e", b"\xff\xfe not json", 0, b"\x00\x01")
    message = decode(frame, VSN2)
    assert message == Message(
        None, None, TOPIC, "broadcast", BinaryBroadcast("e", b"\x00\x01", False)
    )


# -- encoding: the hub's frames against the recorded server answers --------


def only_out(name: str, *needles: str) -> captures.Event:
    """The single recorded server frame whose text contains every needle."""
    found = [
        e
        for e in captures.frames(name, "out")
        if not e.is_binary and all(n in e.raw["data"] for n in needles)
    ]
    assert len(found) == 1, (name, needles, len(found))
    return found[0]


def only_binary_out(name: str, hex_part: str) -> captures.Event:
    found = [e for e in captures.frames(name, "out") if e.is_binary and hex_part in e.raw["hex"]]
    assert len(found) == 1, (name, hex_part, len(found))
    return found[0]


def assert_same_text(frame: Frame, recorded: captures.Event) -> None:
    assert frame.is_text
    assert as_json(frame.payload) == as_json(recorded.raw["data"])


BINDING = {"event": "*", "schema": "public", "table": "events", "id": 1001}


@pytest.mark.parametrize(
    ("name", "join_ref"),
    [("py_realtime", "1"), ("py_supabase", "1"), ("js_supabase_v1", "6"), ("js_supabase_v2", "6")],
)
def test_join_answers_match_capture(name: str, join_ref: str) -> None:
    vsn: Vsn = captures.CAPTURES[name]  # type: ignore[assignment]
    reply = encode_reply(vsn, join_ref, join_ref, TOPIC, "ok", {"postgres_changes": [BINDING]})
    assert_same_text(reply, only_out(name, "phx_reply", '"id":1001'))
    state = encode(vsn, join_ref, None, TOPIC, "presence_state", {})
    assert_same_text(state, only_out(name, "presence_state", "{}"))
    system = {
        "channel": "org:42",
        "extension": "postgres_changes",
        "message": "Subscribed to PostgreSQL",
        "status": "ok",
    }
    assert_same_text(
        encode(vsn, join_ref, None, TOPIC, "system", system),
        only_out(name, "Subscribed to PostgreSQL"),
    )
    close = encode(vsn, join_ref, join_ref, TOPIC, "phx_close", {})
    assert_same_text(close, only_out(name, "phx_close", TOPIC))


def test_heartbeat_reply_matches_capture_and_keeps_null_ref() -> None:
    reply = encode_reply(VSN1, None, None, "phoenix", "ok", {})
    recorded = only_out("py_realtime", '"phoenix"')
    assert_same_text(reply, recorded)
    body = as_json(reply.payload)
    # realtime-py drops any message without a "ref" key.
    assert "ref" in body
    assert body["ref"] is None
    assert "join_ref" not in body


def test_v1_pushes_always_carry_a_ref_key() -> None:
    for frame in (
        encode(VSN1, None, None, TOPIC, "presence_diff", {"joins": {}, "leaves": {}}),
        Broadcast.from_value("org:42", "e", {"n": 1}).frame_v1(),
    ):
        assert frame is not None
        body = as_json(frame.payload)
        assert "ref" in body
        assert body["ref"] is None


def test_v2_pushes_are_five_element_arrays() -> None:
    frame = encode(VSN2, None, None, TOPIC, "presence_diff", {"joins": {}, "leaves": {}})
    assert as_json(frame.payload) == [
        None,
        None,
        TOPIC,
        "presence_diff",
        {"joins": {}, "leaves": {}},
    ]


@pytest.mark.parametrize("name", ["py_realtime", "py_supabase", "js_supabase_v1"])
def test_v1_broadcast_echo_matches_capture(name: str) -> None:
    frame = Broadcast("org:42", "client_ping", b'{"hello":"world"}').frame_v1()
    assert frame is not None
    assert_same_text(frame, only_out(name, '"event":"broadcast"', "client_ping"))


@pytest.mark.parametrize("name", ["py_realtime", "js_supabase_v1"])
def test_v1_server_broadcasts_match_capture(name: str) -> None:
    plain = Broadcast.from_value("org:42", "server_ping", {"n": 1}).frame_v1()
    assert plain is not None
    assert_same_text(plain, only_out(name, "server_ping", '{"n":1}'))
    meta = {"id": "018f-uuid", "replayed": False}
    with_meta = Broadcast.from_value("org:42", "server_ping", {"n": 3}, meta=meta).frame_v1()
    assert with_meta is not None
    assert_same_text(with_meta, only_out(name, "server_ping", "018f-uuid"))


def test_v2_broadcast_echo_is_byte_identical_to_capture() -> None:
    recorded = only_binary_out("js_supabase_v2", "636c69656e745f70696e67")  # client_ping
    frame = Broadcast("org:42", "client_ping", b'{"hello":"world"}').frame_v2()
    assert frame.opcode == OP_BINARY
    assert frame.payload == bytes.fromhex(recorded.raw["hex"])


def test_v2_server_broadcasts_are_byte_identical_to_capture() -> None:
    outs = [e for _, e in captures.scenario_outs("js_supabase_v2") if e.is_binary]
    assert len(outs) == 3
    plain, with_meta, raw = (bytes.fromhex(e.raw["hex"]) for e in outs)
    assert Broadcast("org:42", "server_ping", b'{"n":10}').frame_v2().payload == plain
    assert (
        Broadcast("org:42", "server_ping", b'{"n":11}', meta={"id": "018f-uuid"}).frame_v2().payload
        == with_meta
    )
    assert (
        Broadcast("org:42", "server_ping", b"\x01\x02\x03", is_json=False).frame_v2().payload == raw
    )


def test_presence_diff_shape_matches_capture() -> None:
    payload = {
        "joins": {"user-1": {"metas": [{"name": "Alice", "online_at": 123, "phx_ref": "GF0001"}]}},
        "leaves": {},
    }
    assert_same_text(
        encode(VSN2, None, None, TOPIC, "presence_diff", payload),
        only_out("js_supabase_v2", "presence_diff", "Alice"),
    )
    assert_same_text(
        encode(VSN1, None, None, TOPIC, "presence_diff", payload),
        only_out("py_supabase", "presence_diff", "Alice"),
    )


def test_broadcast_frames_are_cached_per_format() -> None:
    broadcast = Broadcast("org:42", "e", b"{}")
    assert broadcast.frame_v2() is broadcast.frame_v2()
    assert broadcast.frame_v1() is broadcast.frame_v1()
    assert broadcast.frame_for(VSN2) is broadcast.frame_v2()
    assert broadcast.frame_for(VSN1) is broadcast.frame_v1()


def test_raw_broadcast_has_no_v1_form() -> None:
    broadcast = Broadcast("org:42", "e", b"\x00\xff", is_json=False)
    assert broadcast.frame_v1() is None
    assert broadcast.frame_v2().payload.endswith(b"\x00\xff")


def test_oversized_meta_is_refused_when_framing() -> None:
    with pytest.raises(ValueError):
        Broadcast("org:42", "e", b"{}", meta={"id": "x" * 300}).frame_v2()


# -- bad input ---------------------------------------------------------------

BAD_V1 = [
    "not json",
    "",
    "{",
    '{"topic":"t","event":"e"',
    "[]",
    '"text"',
    "1",
    "null",
    '[null,null,"t","e",{}]',
    '{"event":"e"}',
    '{"topic":"t"}',
    '{"topic":1,"event":"e"}',
    '{"topic":"t","event":null}',
    '{"topic":"t","event":"e","ref":1}',
    '{"topic":"t","event":"e","ref":["1"]}',
    '{"topic":"t","event":"e","ref":true}',
    '{"topic":"t","event":"e","join_ref":5}',
    '{"topic":"t","event":"e","join_ref":{}}',
    "\ud800",
]

BAD_V2 = [
    "not json",
    "",
    '{"topic":"t","event":"e","payload":{},"ref":null,"join_ref":null}',
    "[]",
    '[null,null,"t","e"]',
    '[null,null,"t","e",{},null]',
    '[null,null,1,"e",{}]',
    '[null,null,"t",2,{}]',
    '[1,null,"t","e",{}]',
    '[null,2,"t","e",{}]',
    '[null,[],"t","e",{}]',
    '"[null,null,\\"t\\",\\"e\\",{}]"',
]


@pytest.mark.parametrize("data", BAD_V1)
def test_bad_v1_text_is_a_protocol_error(data: str) -> None:
    with pytest.raises(ProtocolError):
        decode(data, VSN1)


@pytest.mark.parametrize("data", BAD_V2)
def test_bad_v2_text_is_a_protocol_error(data: str) -> None:
    with pytest.raises(ProtocolError):
        decode(data, VSN2)


GOOD_KIND3 = kind3(b"6", b"10", TOPIC.encode(), b"client_ping", b"", 1, b'{"hello":"world"}')

BAD_BINARY = {
    "empty": b"",
    "kind only": b"\x03",
    "truncated header": GOOD_KIND3[:6],
    "header without fields": GOOD_KIND3[:7],
    "lying topic length": bytes((3, 1, 2, 200, 11, 0, 1)) + GOOD_KIND3[7:],
    "lying meta length": bytes((3, 1, 2, 15, 11, 255, 1)) + GOOD_KIND3[7:],
    "fields cut short": GOOD_KIND3[:20],
    "kind 0": b"\x00" + GOOD_KIND3[1:],
    "kind 1": b"\x01" + GOOD_KIND3[1:],
    "kind 2": b"\x02" + GOOD_KIND3[1:],
    "kind 4 (server only)": bytes.fromhex("040f0b0001") + b"realtime:org:42client_ping{}",
    "kind 255": b"\xff" + GOOD_KIND3[1:],
    "encoding 2": GOOD_KIND3[:6] + b"\x02" + GOOD_KIND3[7:],
    "encoding 255": GOOD_KIND3[:6] + b"\xff" + GOOD_KIND3[7:],
    "join_ref not UTF-8": kind3(b"\xff", b"1", b"realtime:org:1", b"e", b"", 1, b"{}"),
    "ref not UTF-8": kind3(b"1", b"\xc3", b"realtime:org:1", b"e", b"", 1, b"{}"),
    "topic not UTF-8": kind3(b"1", b"1", b"realtime:org:\xe9", b"e", b"", 1, b"{}"),
    "event not UTF-8": kind3(b"1", b"1", b"realtime:org:1", b"\xed\xa0\x80", b"", 1, b"{}"),
    "payload not JSON": kind3(b"1", b"1", b"realtime:org:1", b"e", b"", 1, b"{not json"),
    "payload empty with enc 1": kind3(b"1", b"1", b"realtime:org:1", b"e", b"", 1, b""),
    "payload JSON plus garbage": kind3(b"1", b"1", b"realtime:org:1", b"e", b"", 1, b"{}{}"),
    "payload not UTF-8 with enc 1": kind3(b"1", b"1", b"realtime:org:1", b"e", b"", 1, b'"\xff"'),
}


@pytest.mark.parametrize("data", list(BAD_BINARY.values()), ids=list(BAD_BINARY))
def test_bad_binary_is_a_protocol_error(data: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode(data, VSN2)


def test_good_kind3_frame_is_valid() -> None:
    # The bad frames above are variations of this one.
    assert decode(GOOD_KIND3, VSN2).payload == BinaryBroadcast(
        "client_ping", b'{"hello":"world"}', True
    )


@pytest.mark.parametrize("data", [GOOD_KIND3, b"\x03", b""])
def test_binary_on_vsn1_is_a_protocol_error(data: bytes) -> None:
    with pytest.raises(ProtocolError, match="vsn 2"):
        decode(data, VSN1)


def test_protocol_errors_never_quote_the_frame() -> None:
    secret = "SECRET-TOKEN-abcdef"
    for data, vsn in (
        (f'{{"topic":"t","event":"e","ref":1,"x":"{secret}"}}', VSN1),
        (f'[null,null,"t",2,"{secret}"]', VSN2),
        (kind3(b"1", b"1", b"t", b"e", b"", 1, secret.encode()), VSN2),
    ):
        with pytest.raises(ProtocolError) as info:
            decode(data, vsn)  # type: ignore[arg-type]
        assert secret not in str(info.value)


# -- fuzz --------------------------------------------------------------------


def decode_or_protocol_error(data: str | bytes, vsn: Vsn) -> Message | None:
    try:
        message = decode(data, vsn)
    except ProtocolError:
        return None
    assert isinstance(message.topic, str)
    assert isinstance(message.event, str)
    assert message.ref is None or isinstance(message.ref, str)
    assert message.join_ref is None or isinstance(message.join_ref, str)
    return message


@FUZZ
@given(data=st.binary(max_size=600), vsn=st.sampled_from([VSN1, VSN2]))
def test_fuzz_arbitrary_bytes(data: bytes, vsn: Vsn) -> None:
    decode_or_protocol_error(data, vsn)


@FUZZ
@given(data=st.text(max_size=300), vsn=st.sampled_from([VSN1, VSN2]))
def test_fuzz_arbitrary_text(data: str, vsn: Vsn) -> None:
    decode_or_protocol_error(data, vsn)


JSON_LEAVES = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8)
)
JSON = st.recursive(
    JSON_LEAVES,
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=4), children, max_size=3)
    ),
    max_leaves=8,
)
KEYS = st.sampled_from(["topic", "event", "payload", "ref", "join_ref", "x"])


@FUZZ
@given(value=st.dictionaries(KEYS, JSON, max_size=6) | st.lists(JSON, min_size=4, max_size=6))
def test_fuzz_json_envelopes(value: Any) -> None:
    text = orjson.dumps(value).decode()
    for vsn in (VSN1, VSN2):
        message = decode_or_protocol_error(text, vsn)  # type: ignore[arg-type]
        if message is not None and vsn == VSN1:
            assert message.topic == value["topic"]
            assert message.payload == value.get("payload", {})


@FUZZ
@given(
    header=st.lists(st.integers(0, 255), min_size=6, max_size=6),
    body=st.binary(max_size=400),
)
def test_fuzz_kind3_headers(header: list[int], body: bytes) -> None:
    decode_or_protocol_error(bytes([3, *header]) + body, VSN2)


def field(max_bytes: int = 255) -> st.SearchStrategy[str]:
    return st.text(max_size=80).filter(lambda s: len(s.encode()) <= max_bytes)


@FUZZ
@given(
    join_ref=field(),
    ref=field(),
    topic=field(),
    event=field(),
    meta=st.binary(max_size=255),
    payload=st.one_of(
        JSON.map(lambda v: (orjson.dumps(v), True)),
        st.binary(max_size=300).map(lambda b: (b, False)),
    ),
)
def test_fuzz_kind3_round_trip(
    join_ref: str, ref: str, topic: str, event: str, meta: bytes, payload: tuple[bytes, bool]
) -> None:
    data, is_json = payload
    frame = kind3(
        join_ref.encode(), ref.encode(), topic.encode(), event.encode(), meta, int(is_json), data
    )
    message = decode(frame, VSN2)
    assert message == Message(
        join_ref or None, ref or None, topic, "broadcast", BinaryBroadcast(event, data, is_json)
    )


@FUZZ
@given(
    # Topics as the hub routes them: no control characters (the private
    # mark of a routing key is one, tested below).
    topic=st.text(st.characters(blacklist_categories=("Cc", "Cs")), max_size=100).filter(
        lambda s: len(s.encode()) <= 246
    ),
    event=st.text(max_size=100).filter(lambda s: len(s.encode()) <= 255),
    value=JSON,
    private=st.booleans(),
)
def test_fuzz_kind4_layout(topic: str, event: str, value: Any, private: bool) -> None:
    """Parse the hub's kind-4 frames the way realtime-js does.  A private
    channel's routing key carries its mark; its frames never do."""
    key = PRIVATE_MARK + topic if private else topic
    broadcast = Broadcast.from_value(key, event, value)
    data = broadcast.frame_v2().payload
    assert data[0] == 4
    topic_len, event_len, meta_len, enc = data[1:5]
    assert enc == 1
    assert meta_len == 0
    rest = data[5:]
    assert rest[:topic_len].decode() == "realtime:" + topic
    assert rest[topic_len : topic_len + event_len].decode() == event
    if broadcast.is_json:
        assert orjson.loads(broadcast.frame_v1().payload)["topic"] == "realtime:" + topic
    assert orjson.loads(rest[topic_len + event_len + meta_len :]) == value


# -- frame headers -----------------------------------------------------------


@pytest.mark.parametrize(
    ("length", "header"),
    [
        (0, b"\x81\x00"),
        (1, b"\x81\x01"),
        (125, b"\x81\x7d"),
        (126, b"\x81\x7e\x00\x7e"),
        (65535, b"\x81\x7e\xff\xff"),
        (65536, b"\x81\x7f\x00\x00\x00\x00\x00\x01\x00\x00"),
    ],
)
def test_text_frame_headers(length: int, header: bytes) -> None:
    payload = b"a" * length
    frame = text_frame(payload)
    assert frame.opcode == OP_TEXT
    assert frame.is_text
    assert frame.payload is payload
    assert frame.wire == header + payload
    assert len(frame) == len(header) + length


@pytest.mark.parametrize(
    ("length", "header"),
    [
        (0, b"\x82\x00"),
        (125, b"\x82\x7d"),
        (126, b"\x82\x7e\x00\x7e"),
        (65535, b"\x82\x7e\xff\xff"),
        (65536, b"\x82\x7f\x00\x00\x00\x00\x00\x01\x00\x00"),
    ],
)
def test_binary_frame_headers(length: int, header: bytes) -> None:
    frame = binary_frame(b"\x00" * length)
    assert not frame.is_text
    assert frame.wire[: len(header)] == header
    assert len(frame.wire) == len(header) + length
