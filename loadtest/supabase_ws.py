"""The load generators' Supabase Realtime socket.

The client is :class:`hub.client.realtime.SyncClient` (``websockets.sync``:
it runs as is in ordinary threads and, under locust, whose gevent
monkey-patching turns those threads into greenlets, as cheap cooperative
tasks).  It speaks both serializers: vsn 1.0.0 (JSON objects) and vsn 2.0.0
(JSON arrays, broadcasts arriving as binary kind 4 frames).  What it gives a
load test::

    sock = HubSocket(ws_url, token, vsn="2.0.0", on_message=handle)
    sock.connect()
    sock.join("realtime:org:acme", {"broadcast": {"ack": True}})
    sock.acked_broadcast("realtime:org:acme", "ping", {"t": time.time()})
    sock.track("realtime:org:acme", {"user": "u1"})
    sock.close()

``handle`` receives :class:`~hub.client.realtime.Message` objects on the
reader thread.  Replies to requests are matched by ``ref``; a refused
request raises :class:`~hub.client.realtime.Refused`.
"""

from __future__ import annotations

from typing import Any

from hub.auth.tokens import issue_token
from hub.client.realtime import Disconnected, Message, Refused, SyncClient

__all__ = ["Disconnected", "HubSocket", "Message", "Refused", "sign"]


class HubSocket(SyncClient):
    """A :class:`SyncClient` that offers no permessage-deflate by default:
    the load is the hub's routing, not zlib on both ends."""

    def __init__(self, ws_url: str, token: str, *, vsn: str = "2.0.0", **kwargs: Any) -> None:
        kwargs.setdefault("compression", None)
        super().__init__(ws_url, token, vsn=vsn, **kwargs)


def sign(
    secret: str,
    *,
    sub: str,
    orgs: list[str] | None = None,
    role: str = "authenticated",
    ttl: float = 24 * 3600,
    extra: dict[str, Any] | None = None,
) -> str:
    """An HS256 token shaped like Supabase Auth's, signed with ``secret``."""
    return issue_token(secret, sub=sub, orgs=orgs, role=role, ttl=ttl, extra=extra)
