"""The WebSocket layer fed bytes: handshake checks, frame parsing, closes.

Client frames are built here by hand (RFC 6455 section 5.2) with a random
mask, and cross-checked with the websockets library's own client-side
serializer, so the reader is tested against an implementation it does not
share code with.
"""

from __future__ import annotations

import base64

import pytest
from hypothesis import given
from hypothesis import strategies as st
from websockets.frames import Frame as WsFrame
from websockets.frames import Opcode

from hub.errors import WebSocketError
from hub.websocket import (
    OP_BINARY,
    OP_CLOSE,
    OP_PING,
    OP_TEXT,
    FrameReader,
    accept_response,
    check_upgrade,
    close_frame,
    parse_close,
)
from tests.support.rawframes import client_frame


def websockets_frame(opcode: Opcode, payload: bytes, fin: bool = True) -> bytes:
    """The same frame serialized by the websockets library, client side."""
    return WsFrame(opcode, payload, fin).serialize(mask=True)


KEY = base64.b64encode(b"0123456789abcdef")
HEADERS = [
    (b"host", b"hub"),
    (b"upgrade", b"websocket"),
    (b"connection", b"Upgrade"),
    (b"sec-websocket-key", KEY),
    (b"sec-websocket-version", b"13"),
]


def test_accept_matches_the_rfc_example() -> None:
    # RFC 6455 section 1.3: this key must be answered with this accept value.
    response = accept_response(b"dGhlIHNhbXBsZSBub25jZQ==")
    assert response.startswith(b"HTTP/1.1 101 Switching Protocols\r\n")
    assert b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n" in response
    assert response.endswith(b"\r\n\r\n")


def test_a_valid_upgrade_gives_its_key() -> None:
    assert check_upgrade("GET", HEADERS) == KEY


@pytest.mark.parametrize(
    ("method", "headers", "status"),
    [
        ("POST", HEADERS, 405),
        ("GET", [h for h in HEADERS if h[0] != b"sec-websocket-version"], 426),
        ("GET", [*HEADERS[:4], (b"sec-websocket-version", b"8")], 426),
        ("GET", [h for h in HEADERS if h[0] != b"sec-websocket-key"], 400),
        ("GET", [*HEADERS, (b"sec-websocket-key", KEY)], 400),
        ("GET", [*HEADERS[:3], (b"sec-websocket-key", b"short"), HEADERS[4]], 400),
        ("GET", [*HEADERS[:3], (b"sec-websocket-key", b"!not base64!!!!!!!!!=="), HEADERS[4]], 400),
    ],
)
def test_bad_upgrades_are_refused(
    method: str, headers: list[tuple[bytes, bytes]], status: int
) -> None:
    refusal = check_upgrade(method, headers)
    assert isinstance(refusal, tuple) and refusal[0] == status, refusal


def test_messages_of_every_length_class() -> None:
    reader = FrameReader(max_size=1 << 20)
    payloads = [b"", b"x" * 125, b"y" * 126, b"z" * 65535, b"w" * 65536]
    data = b"".join(client_frame(OP_BINARY, p) for p in payloads)
    assert reader.feed(data) == [(OP_BINARY, p) for p in payloads]
    assert reader.buffered == 0


def test_agrees_with_the_websockets_serializer() -> None:
    reader = FrameReader(max_size=1 << 20)
    data = websockets_frame(Opcode.TEXT, b'["1","1","realtime:org:1","phx_join",{}]')
    data += websockets_frame(Opcode.PING, b"hi")
    assert reader.feed(data) == [
        (OP_TEXT, b'["1","1","realtime:org:1","phx_join",{}]'),
        (OP_PING, b"hi"),
    ]


@given(st.binary(max_size=3000), st.lists(st.integers(1, 40), min_size=1, max_size=50))
def test_any_split_of_the_stream_gives_the_same_messages(payload: bytes, cuts: list[int]) -> None:
    stream = client_frame(OP_BINARY, payload) + client_frame(OP_TEXT, b"after")
    reader = FrameReader(max_size=1 << 20)
    out = []
    pos = 0
    for cut in cuts * (len(stream) // sum(cuts) + 1):
        out += reader.feed(stream[pos : pos + cut])
        pos += cut
        if pos >= len(stream):
            break
    assert out == [(OP_BINARY, payload), (OP_TEXT, b"after")]


def test_fragments_are_reassembled_around_a_ping() -> None:
    reader = FrameReader(max_size=100)
    data = (
        client_frame(OP_TEXT, b"hel", fin=False)
        + client_frame(OP_PING, b"p")
        + client_frame(0x0, b"lo", fin=False)
        + client_frame(0x0, b"!")
    )
    assert reader.feed(data) == [(OP_PING, b"p"), (OP_TEXT, b"hello!")]


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (client_frame(OP_TEXT, b"x", rsv=0x40), 1002),  # compression never negotiated
        (bytes((0x81, 0x01)) + b"x", 1002),  # unmasked
        (client_frame(0x3, b""), 1002),  # reserved data opcode
        (client_frame(0xB, b""), 1002),  # reserved control opcode
        (client_frame(OP_PING, b"x", fin=False), 1002),  # fragmented control frame
        (client_frame(OP_PING, b"x" * 126), 1002),  # control frame over 125 bytes
        (client_frame(0x0, b"x"), 1002),  # continuation with nothing to continue
        (client_frame(OP_TEXT, b"a", fin=False) + client_frame(OP_TEXT, b"b"), 1002),
        (client_frame(OP_BINARY, b"x" * 101), 1009),
        (client_frame(OP_TEXT, b"x" * 60, fin=False) + client_frame(0x0, b"x" * 60), 1009),
    ],
)
def test_protocol_violations_name_their_close_code(data: bytes, code: int) -> None:
    reader = FrameReader(max_size=100)
    with pytest.raises(WebSocketError) as err:
        reader.feed(data)
    assert err.value.code == code


def test_an_oversized_frame_is_refused_from_its_header_alone() -> None:
    reader = FrameReader(max_size=1000)
    header = bytes((0x82, 0x80 | 127)) + (1 << 40).to_bytes(8, "big")
    with pytest.raises(WebSocketError) as err:
        reader.feed(header)  # no payload sent: nothing is waited for
    assert err.value.code == 1009


def test_close_payloads() -> None:
    assert parse_close(b"") == (1005, "")
    assert parse_close((1000).to_bytes(2, "big") + "bye é".encode()) == (1000, "bye é")
    assert parse_close((4001).to_bytes(2, "big")) == (4001, "")
    for bad, code in [
        (b"\x03", 1002),
        ((1005).to_bytes(2, "big"), 1002),
        ((999).to_bytes(2, "big"), 1002),
        ((5000).to_bytes(2, "big"), 1002),
        ((1000).to_bytes(2, "big") + b"\xff", 1007),
    ]:
        with pytest.raises(WebSocketError) as err:
            parse_close(bad)
        assert err.value.code == code


def test_close_frames_fit_the_control_limit_and_stay_utf8() -> None:
    frame = close_frame(1008, "é" * 100)
    assert frame.opcode == OP_CLOSE
    assert len(frame.payload) <= 125
    assert parse_close(frame.payload)[0] == 1008
    assert frame.wire[:2] == bytes((0x88, len(frame.payload)))
    assert close_frame(1005).payload == b""
