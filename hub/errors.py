"""One root exception for the hub, and the WebSocket close codes it uses.

Every exception the hub raises on purpose is a :class:`HubError`.  Each edge
translates it once: the session into a ``phx_reply`` error or a close code,
the REST routes into an HTTP status, the CLI into an exit code (2 for a
:class:`ConfigError`, 1 for any other).  Modules that own a failure define
its class next to the code that raises it (``InvalidTopic`` in
``channels/topics.py``, ``StoreError`` in ``store/base.py``), always under
this root.

Close codes follow centrifuge's habit of grouping codes by what the client
should do next.  The Supabase clients reconnect after any close they did not
ask for, so the grouping is for operators and for other clients:

* 1000-1015 are the RFC 6455 codes, used with their standard meaning.
* 4000-4499 mean "reconnect": the connection was fine, this socket is not.
* 4500-4999 mean "do not reconnect without changing something".
"""

from __future__ import annotations

import enum


class HubError(Exception):
    """Root of every exception the hub raises on purpose."""


class ConfigError(HubError):
    """A setting is missing, malformed or contradicts another one."""


class ProtocolError(HubError):
    """A frame could not be decoded into a message.

    The message is safe to show to the peer: it never contains the frame.
    """


class WebSocketError(ProtocolError):
    """A peer broke RFC 6455; answer with a close frame ``code``."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


class ReasonError(HubError):
    """An error a client is told about: ``reason`` is the Supabase-style
    ``Code: text`` (``code`` and ``message`` apart), safe to send."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message

    @property
    def reason(self) -> str:
        return f"{self.code}: {self.message}"


class AuthError(ReasonError):
    """A token was refused."""


class CloseCode(enum.IntEnum):
    """Every close code the hub sends, with its meaning.

    The README's table is generated from these docstrings' wording; keep them
    in step.
    """

    #: The client or the hub ended the session normally.
    NORMAL = 1000
    #: A WebSocket protocol violation: an unmasked frame, reserved bits or
    #: opcodes, a broken fragment sequence, a bad control frame.  Sent by
    #: the WebSocket layer.
    PROTOCOL_ERROR = 1002
    #: Never sent: what a close frame without a code stands for (RFC 6455).
    NO_STATUS = 1005
    #: A frame could not be decoded (bad JSON, bad envelope, lying binary
    #: lengths, refs that are not strings).  Sent by the hub's codec.
    INVALID_FRAME = 1007
    #: A frame was larger than ``HUB_MAX_FRAME_BYTES`` (sent by the
    #: WebSocket layer itself).
    MESSAGE_TOO_BIG = 1009
    #: An unexpected error inside the hub; the connection is dropped rather
    #: than left in an unknown state.
    INTERNAL_ERROR = 1011
    #: The node is shutting down or draining: reconnect, possibly elsewhere.
    SERVICE_RESTART = 1012
    #: Nothing was received for ``HUB_IDLE_TIMEOUT`` seconds (both Supabase
    #: clients heartbeat every 25 s).
    IDLE_TIMEOUT = 4000
    #: The connection's outbound buffer exceeded ``HUB_MAX_OUTBOX_BYTES``:
    #: the client does not read as fast as its channels produce.
    SLOW_CONSUMER = 4001
