"""Hand-made WebSocket and Supabase binary frames, for tests that speak the
wire directly.

Written here rather than taken from ``hub/``, so that a test never checks
the hub's codec against the hub's own code.
"""

from __future__ import annotations

import json
import os
from typing import Any


def client_frame(opcode: int, payload: bytes, *, fin: bool = True, rsv: int = 0) -> bytes:
    """A masked client->server frame (RFC 6455 section 5.2), as a browser
    sends it: ``opcode`` 1 text, 2 binary, 0 continuation, 8-10 control."""
    first = (0x80 if fin else 0) | rsv | opcode
    n = len(payload)
    if n < 126:
        head = bytes((first, 0x80 | n))
    elif n < 65536:
        head = bytes((first, 0x80 | 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((first, 0x80 | 127)) + n.to_bytes(8, "big")
    mask = os.urandom(4)
    body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return head + mask + body


def kind3(
    join_ref: str,
    ref: str,
    topic: str,
    event: str,
    payload: bytes,
    enc: int = 1,
    meta: bytes = b"",
) -> bytes:
    """A client->server user broadcast in the vsn 2 binary format."""
    fields = [join_ref.encode(), ref.encode(), topic.encode(), event.encode(), meta]
    header = bytes([3, *(len(f) for f in fields), enc])
    return header + b"".join(fields) + payload


def split_kind4(data: bytes) -> tuple[str, str, bytes, int, bytes]:
    """A server->client binary broadcast (kind 4): topic, event, meta (raw
    JSON bytes, empty when absent), payload encoding (1 JSON, 0 binary),
    payload."""
    assert isinstance(data, bytes), f"expected a binary frame, got {data!r}"
    assert data[0] == 4, f"binary kind {data[0]}"
    topic_len, event_len, meta_len, enc = data[1:5]
    pos = 5
    topic = data[pos : pos + topic_len].decode()
    pos += topic_len
    event = data[pos : pos + event_len].decode()
    pos += event_len
    meta = data[pos : pos + meta_len]
    pos += meta_len
    return topic, event, meta, enc, data[pos:]


def kind4_broadcast(data: bytes) -> tuple[str, dict[str, Any]]:
    """A kind 4 frame as the broadcast message realtime-js hands its
    callback: the topic, and ``{"type", "event", "payload"[, "meta"]}`` with
    a JSON payload decoded (a binary one stays bytes)."""
    topic, event, meta, enc, body = split_kind4(data)
    inner: dict[str, Any] = {
        "type": "broadcast",
        "event": event,
        "payload": json.loads(body) if enc == 1 else body,
    }
    if meta:
        inner["meta"] = json.loads(meta)
    return topic, inner
