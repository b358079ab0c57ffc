"""A small synchronous Supabase Realtime client for load generators.

Built on ``websocket-client`` and plain ``threading``, so it runs as is in
ordinary threads and, under locust (whose gevent monkey-patching turns those
threads into greenlets), as cheap cooperative tasks.  It speaks both
serializers: vsn 1.0.0 (JSON objects) and vsn 2.0.0 (JSON arrays, with
broadcasts arriving as binary kind 4 frames).

What it gives a load test::

    sock = HubSocket(ws_url, token, vsn="2.0.0", on_message=handle)
    sock.connect()
    join_ref = sock.join("realtime:org:acme", {"broadcast": {"ack": True}})
    sock.broadcast("realtime:org:acme", join_ref, "ping", {"t": time.time()})
    sock.track("realtime:org:acme", join_ref, {"user": "u1"})
    sock.close()

``handle`` receives :class:`Incoming` objects on the reader thread.  Replies
to requests (join, heartbeat, acked broadcasts, presence) are matched by
``ref`` and returned to the caller; a refused request raises
:class:`Refused`.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import websocket  # websocket-client

from hub.auth.tokens import issue_token

__all__ = ["HubSocket", "Incoming", "Refused", "parse_kind4", "sign", "split_kind4"]


class Refused(Exception):
    """The hub answered a request with ``phx_reply`` status ``error``."""

    def __init__(self, event: str, response: Any) -> None:
        reason = response.get("reason") if isinstance(response, dict) else response
        super().__init__(f"{event} refused: {reason}")
        self.reason = reason


class Disconnected(Exception):
    """The socket is gone (closed by the hub, or never opened)."""


@dataclass(slots=True)
class Incoming:
    """One server->client message, whatever serializer carried it."""

    topic: str
    event: str
    payload: Any
    ref: str | None = None
    join_ref: str | None = None
    #: Wall-clock time (``time.time()``) the frame was read.
    received_at: float = 0.0
    #: Size of the frame on the wire (payload bytes).
    size: int = 0


def split_kind4(data: bytes) -> tuple[str, str, bytes, int, bytes]:
    """A server->client binary broadcast (kind 4): topic, event, meta (raw
    JSON bytes, empty when absent), payload encoding (1 JSON, 0 binary),
    payload."""
    if not isinstance(data, bytes):
        raise ValueError(f"expected a binary frame, got {data!r}")
    if not data or data[0] != 4:
        raise ValueError(f"not a kind 4 frame: {data[:1]!r}")
    topic_len, event_len, meta_len, enc = data[1:5]
    pos = 5
    topic = data[pos : pos + topic_len].decode()
    pos += topic_len
    event = data[pos : pos + event_len].decode()
    pos += event_len
    meta = data[pos : pos + meta_len]
    pos += meta_len
    return topic, event, meta, enc, data[pos:]


def parse_kind4(data: bytes) -> Incoming:
    """Decode a server->client binary broadcast (kind 4) into the message
    realtime-js would hand to its callback."""
    topic, event, meta, enc, payload = split_kind4(data)
    body: Any = json.loads(payload) if enc == 1 else payload
    inner: dict[str, Any] = {"type": "broadcast", "event": event, "payload": body}
    if meta:
        inner["meta"] = json.loads(meta)
    return Incoming(topic, "broadcast", inner, size=len(data))


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


@dataclass
class _Pending:
    event: threading.Event = field(default_factory=threading.Event)
    reply: Any = None


class HubSocket:
    """One WebSocket connection to a hub.

    ``on_message`` is called on the reader thread for every message that is
    not a reply to one of this socket's requests; ``on_close`` once, with
    ``(code, reason, expected)`` when the connection ends (``expected`` is
    true when :meth:`close` was called first).
    """

    def __init__(
        self,
        ws_url: str,
        token: str,
        *,
        vsn: str = "2.0.0",
        on_message: Callable[[Incoming], None] | None = None,
        on_close: Callable[[int | None, str, bool], None] | None = None,
        timeout: float = 10.0,
        heartbeat: float = 25.0,
    ) -> None:
        self.url = f"{ws_url}?apikey={token}&vsn={vsn}"
        self.vsn = vsn
        self.on_message = on_message
        self.on_close = on_close
        self.timeout = timeout
        self.heartbeat_interval = heartbeat
        self.ws: websocket.WebSocket | None = None
        self._refs = itertools.count(1)
        self._pending: dict[str, _Pending] = {}
        self._send_lock = threading.Lock()
        self._closing = False
        self._closed = threading.Event()
        self.close_code: int | None = None
        self.close_reason = ""
        self.frames_in = 0
        self.bytes_in = 0
        self.callback_errors = 0

    # -- lifecycle -----------------------------------------------------------

    def connect(self) -> None:
        """Open the socket (raises on a refused handshake) and start the
        reader and heartbeat threads."""
        self.ws = websocket.create_connection(
            self.url, timeout=self.timeout, enable_multithread=True, skip_utf8_validation=True
        )
        # Reads block until data arrives; the reader owns the socket's input.
        self.ws.settimeout(None)
        threading.Thread(target=self._read_forever, daemon=True, name="hub-ws-read").start()
        if self.heartbeat_interval > 0:
            threading.Thread(target=self._beat_forever, daemon=True, name="hub-ws-beat").start()

    def close(self) -> None:
        """Close the socket (expected: ``on_close`` says so).

        Only the close frame is sent here: the reader thread owns the
        socket's input (websocket-client's own ``close()`` would read too,
        and wait forever for the reader's lock on a quiet socket).  The
        reader sees the hub's answer and ends; if it does not within a
        second the socket is cut.
        """
        self._closing = True
        ws = self.ws
        if ws is None:
            return
        with contextlib.suppress(OSError, websocket.WebSocketException), self._send_lock:
            ws.send_close()
        if not self._closed.wait(1.0):
            with contextlib.suppress(Exception):
                ws.abort()
            self._closed.wait(1.0)

    @property
    def connected(self) -> bool:
        return self.ws is not None and not self._closed.is_set()

    # -- requests --------------------------------------------------------------

    def next_ref(self) -> str:
        return str(next(self._refs))

    def send(
        self, join_ref: str | None, ref: str | None, topic: str, event: str, payload: Any
    ) -> None:
        if self.vsn == "1.0.0":
            frame: Any = {
                "topic": topic,
                "event": event,
                "payload": payload,
                "ref": ref,
                "join_ref": join_ref,
            }
        else:
            frame = [join_ref, ref, topic, event, payload]
        self.send_raw(json.dumps(frame, separators=(",", ":")))

    def send_raw(self, data: str | bytes) -> None:
        ws = self.ws
        if ws is None or self._closed.is_set():
            raise Disconnected("socket is closed")
        with self._send_lock:
            try:
                if isinstance(data, bytes):
                    ws.send_binary(data)
                else:
                    ws.send(data)
            except (OSError, websocket.WebSocketException) as exc:
                raise Disconnected(str(exc)) from exc

    def request(
        self,
        topic: str,
        event: str,
        payload: Any,
        *,
        join_ref: str | None = None,
        ref: str | None = None,
        timeout: float | None = None,
    ) -> Any:
        """Send and wait for the ``phx_reply`` with the same ref; returns its
        ``response``.  Raises Refused, Disconnected or TimeoutError."""
        ref = ref or self.next_ref()
        pending = self._pending[ref] = _Pending()
        try:
            self.send(join_ref, ref, topic, event, payload)
            if not pending.event.wait(self.timeout if timeout is None else timeout):
                if self._closed.is_set():
                    raise Disconnected(f"closed ({self.close_code}) while waiting for {event}")
                raise TimeoutError(f"no reply to {event} on {topic}")
        finally:
            self._pending.pop(ref, None)
        reply = pending.reply
        if reply is None:
            raise Disconnected(f"closed ({self.close_code}) while waiting for {event}")
        if reply.get("status") != "ok":
            raise Refused(event, reply.get("response"))
        return reply.get("response")

    def heartbeat(self) -> None:
        self.request("phoenix", "heartbeat", {})

    def join(
        self,
        topic: str,
        config: dict[str, Any] | None = None,
        *,
        access_token: str | None = None,
        timeout: float | None = None,
    ) -> str:
        """Join ``topic`` (``realtime:...``); returns the join_ref."""
        join_ref = self.next_ref()
        payload: dict[str, Any] = {"config": config or {}}
        if access_token is not None:
            payload["access_token"] = access_token
        self.request(topic, "phx_join", payload, join_ref=join_ref, ref=join_ref, timeout=timeout)
        return join_ref

    def leave(self, topic: str, join_ref: str) -> None:
        self.request(topic, "phx_leave", {}, join_ref=join_ref)

    def broadcast(
        self, topic: str, join_ref: str, event: str, payload: Any, *, ack: bool = False
    ) -> None:
        body = {"type": "broadcast", "event": event, "payload": payload}
        if ack:
            self.request(topic, "broadcast", body, join_ref=join_ref)
        else:
            self.send(join_ref, None, topic, "broadcast", body)

    def track(self, topic: str, join_ref: str, meta: dict[str, Any]) -> None:
        body = {"type": "presence", "event": "track", "payload": meta}
        self.request(topic, "presence", body, join_ref=join_ref)

    # -- reader --------------------------------------------------------------

    def _read_forever(self) -> None:
        ws = self.ws
        assert ws is not None
        try:
            while True:
                opcode, data = ws.recv_data(control_frame=False)
                if opcode == websocket.ABNF.OPCODE_CLOSE:
                    if len(data) >= 2:
                        self.close_code = int.from_bytes(data[:2], "big")
                        self.close_reason = data[2:].decode(errors="replace")
                    break
                self._dispatch(opcode, data)
        except (OSError, websocket.WebSocketException, ValueError):
            pass
        finally:
            self._closed.set()
            for pending in list(self._pending.values()):
                pending.event.set()
            with contextlib.suppress(Exception):
                ws.abort()
            if self.on_close is not None:
                self.on_close(self.close_code, self.close_reason, self._closing)

    def _dispatch(self, opcode: int, data: bytes) -> None:
        now = time.time()
        self.frames_in += 1
        self.bytes_in += len(data)
        if opcode == websocket.ABNF.OPCODE_BINARY:
            message = parse_kind4(data)
        else:
            value = json.loads(data)
            if isinstance(value, list):
                join_ref, ref, topic, event, payload = value
            else:
                join_ref, ref = value.get("join_ref"), value.get("ref")
                topic, event, payload = value["topic"], value["event"], value["payload"]
            message = Incoming(topic, event, payload, ref, join_ref, size=len(data))
            if event == "phx_reply" and ref is not None:
                pending = self._pending.get(ref)
                if pending is not None:
                    pending.reply = payload
                    pending.event.set()
                    return
        message.received_at = now
        if self.on_message is not None:
            try:
                self.on_message(message)
            except Exception:
                # A bug in the callback must not look like a dropped socket.
                self.callback_errors += 1
                traceback.print_exc()

    def _beat_forever(self) -> None:
        while not self._closed.wait(self.heartbeat_interval):
            try:
                self.heartbeat()
            except (Disconnected, TimeoutError, Refused):
                return
