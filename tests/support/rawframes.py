"""Hand-made WebSocket frames, for tests that speak below the WebSocket
library (RFC 6455 framing written by hand).

The Supabase envelopes and binary broadcasts (kinds 3 and 4) are built and
read by :mod:`hub.client.realtime`, the one raw protocol client.
"""

from __future__ import annotations

import os

__all__ = ["client_frame"]


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
