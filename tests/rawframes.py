"""Hand-made WebSocket and Supabase binary frames, for tests that speak the
wire directly.

Written here rather than taken from ``hub/``, so that a test never checks
the hub's codec against the hub's own code.  The kind 4 decoder is the load
generator's (``loadtest/supabase_ws.py``), which is not the hub's either.
"""

from __future__ import annotations

import os
from typing import Any

from loadtest.supabase_ws import parse_kind4, split_kind4

__all__ = ["client_frame", "kind3", "kind4_broadcast", "split_kind4"]


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


def kind4_broadcast(data: bytes) -> tuple[str, dict[str, Any]]:
    """A kind 4 frame as the broadcast message realtime-js hands its
    callback: the topic, and ``{"type", "event", "payload"[, "meta"]}`` with
    a JSON payload decoded (a binary one stays bytes)."""
    message = parse_kind4(data)
    return message.topic, message.payload
