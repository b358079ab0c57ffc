"""A raw Supabase Realtime (Phoenix) client: the wire protocol spoken by hand.

Everything that talks to the hub's WebSocket without a real Supabase client
(the wire, cluster, security and session tests, the load generators) uses
this one module:

* the codec, with no I/O: :func:`encode` builds a client text frame (vsn
  1.0.0: a JSON object; vsn 2.0.0: a JSON array), :func:`encode_kind3` a
  binary client broadcast, and :func:`decode` turns any server frame (vsn
  1.0.0 object, vsn 2.0.0 array, binary kind 4 broadcast) into one
  :class:`Message`;
* :class:`ClientBase`: the serializer, the ref counter, the join ref of each
  joined channel, the requests a client makes (join, leave, heartbeat,
  broadcast, presence) and the check of their ``phx_reply``;
* :class:`AsyncClient`, on ``websockets.asyncio``, which keeps every message
  it receives and can wait for them; :class:`SyncClient`, on
  ``websockets.sync``, for load generators: it runs in plain threads and,
  under locust's gevent monkey-patching, in greenlets.

Both match replies to requests by ``ref`` and raise :class:`Refused` when
the reply's status is ``error``::

    client = await AsyncClient.connect("ws://HOST/realtime/v1/websocket", token)
    await client.join("realtime:org:42", {"broadcast": {"ack": True}})
    await client.acked_broadcast("realtime:org:42", "ping", {"n": 1}, binary=True)
    await client.close()

The codec is written from the protocol's description, not taken from
:mod:`hub.protocol` (the server's side), so a test speaking through this
client does not check the hub's codec against itself; only the constants
are shared.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import threading
import time
import traceback
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Final, Generic, Self, TypeVar

from websockets.asyncio.client import ClientConnection as AsyncConnection
from websockets.asyncio.client import connect as async_connect
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection as SyncConnection
from websockets.sync.client import connect as sync_connect

from hub.errors import CloseCode, HubError
from hub.protocol import (
    ENC_JSON,
    KIND_USER_BROADCAST,
    TOPIC_PREFIX,
    VSN1,
    VSN2,
)

__all__ = [
    "DEFAULT_TIMEOUT",
    "AsyncClient",
    "ClientBase",
    "ClientError",
    "Disconnected",
    "FrameError",
    "Message",
    "Outgoing",
    "Ref",
    "Refused",
    "SyncClient",
    "broadcast_body",
    "decode",
    "decode_kind4",
    "decode_text",
    "encode",
    "encode_kind3",
    "join_payload",
    "presence_body",
    "socket_url",
    "split_kind4",
    "wire_topic",
]

#: Seconds any single send, reply or handshake may take, unless told.
DEFAULT_TIMEOUT: Final = 10.0


class ClientError(HubError):
    """Root of this client's errors."""


class FrameError(ClientError, ValueError):
    """A server frame this client cannot decode."""


class Disconnected(ClientError):
    """The socket is gone (closed by the hub, or never opened)."""


class Refused(ClientError):
    """The hub answered a request with ``phx_reply`` status ``error``;
    ``reply`` is that reply and ``reason`` its ``response.reason``."""

    def __init__(self, what: str, reply: Message) -> None:
        response = reply.response
        reason = response.get("reason") if isinstance(response, dict) else response
        super().__init__(f"{what} refused: {reason}")
        self.reply = reply
        self.reason = reason


# -- the codec ---------------------------------------------------------------


def socket_url(base: str, token: str | None, vsn: str | None = VSN2) -> str:
    """``base`` (``ws://HOST/realtime/v1/websocket``) with the query the
    clients send; a ``None`` token or vsn is left out (no vsn means 1.0.0)."""
    params = []
    if token is not None:
        params.append(f"apikey={token}")
    if vsn is not None:
        params.append(f"vsn={vsn}")
    return base + ("?" + "&".join(params) if params else "")


def wire_topic(topic: str) -> str:
    """``org:42`` as the clients send it: ``realtime:org:42`` (unchanged
    when it has the prefix already)."""
    return topic if topic.startswith(TOPIC_PREFIX) else TOPIC_PREFIX + topic


def encode(
    vsn: str, join_ref: str | None, ref: str | None, topic: str, event: str, payload: Any
) -> str:
    """A client->server text frame.  vsn 1.0.0 always carries both refs
    (null when unset), as realtime-py sends them."""
    if vsn == VSN1:
        return json.dumps(
            {"topic": topic, "event": event, "payload": payload, "ref": ref, "join_ref": join_ref}
        )
    return json.dumps([join_ref, ref, topic, event, payload])


def encode_kind3(
    join_ref: str,
    ref: str,
    topic: str,
    event: str,
    payload: bytes,
    *,
    enc: int = ENC_JSON,
    meta: bytes = b"",
) -> bytes:
    """A client->server user broadcast in the vsn 2.0.0 binary format
    (kind 3), as realtime-js sends every broadcast.  ``enc`` 1 says the
    payload is JSON, 0 raw bytes; any other value is sent as given."""
    fields = [join_ref.encode(), ref.encode(), topic.encode(), event.encode(), meta]
    header = bytes([3, *(len(f) for f in fields), enc])
    return header + b"".join(fields) + payload


def broadcast_body(event: str, payload: Any) -> dict[str, Any]:
    """The payload of a text ``broadcast`` message."""
    return {"type": "broadcast", "event": event, "payload": payload}


def presence_body(event: str, payload: Any) -> dict[str, Any]:
    """The payload of a ``presence`` message (``track`` / ``untrack``)."""
    return {"type": "presence", "event": event, "payload": payload}


def join_payload(config: dict[str, Any] | None, access_token: str | None = None) -> dict[str, Any]:
    """The payload of a ``phx_join``."""
    payload: dict[str, Any] = {"config": config or {}}
    if access_token is not None:
        payload["access_token"] = access_token
    return payload


@dataclass(slots=True)
class Message:
    """One server->client message, whatever carried it.

    Broadcasts come out alike from text and binary (kind 4) frames: ``event``
    is ``broadcast`` and ``payload`` is ``{"type", "event", "payload",
    "meta"?}``, with a raw (enc 0) payload left as bytes.
    """

    topic: str
    event: str
    payload: Any
    ref: str | None = None
    join_ref: str | None = None
    #: True when the frame was binary (kind 4).
    binary: bool = False
    #: The frame as received.
    raw: str | bytes = field(default="", repr=False)
    #: Wall-clock time (``time.time()``) the frame was decoded.
    received_at: float = field(default_factory=time.time, repr=False)
    #: ``time.monotonic()`` at the same moment.
    at: float = field(default_factory=time.monotonic)

    @property
    def size(self) -> int:
        """The frame's length on the wire (characters for a text frame)."""
        return len(self.raw)

    @property
    def status(self) -> str | None:
        """A ``phx_reply``'s status (``ok`` / ``error``), else None."""
        if self.event == "phx_reply" and isinstance(self.payload, dict):
            status = self.payload.get("status")
            return status if isinstance(status, str) else None
        return None

    @property
    def response(self) -> Any:
        """A ``phx_reply``'s response, else None."""
        if self.event == "phx_reply" and isinstance(self.payload, dict):
            return self.payload.get("response")
        return None

    def _broadcast(self, key: str) -> Any:
        if self.event == "broadcast" and isinstance(self.payload, dict):
            return self.payload.get(key)
        return None

    @property
    def user_event(self) -> str | None:
        """A broadcast's own event name."""
        event = self._broadcast("event")
        return event if isinstance(event, str) else None

    @property
    def body(self) -> Any:
        """A broadcast's own payload."""
        return self._broadcast("payload")

    @property
    def meta(self) -> dict[str, Any]:
        """A broadcast's meta (``{}`` when it has none)."""
        meta = self._broadcast("meta")
        return meta if isinstance(meta, dict) else {}


def decode(data: str | bytes) -> Message:
    """A server frame: ``str`` is a text frame, ``bytes`` a binary one."""
    return decode_kind4(data) if isinstance(data, bytes) else decode_text(data)


def decode_text(text: str | bytes) -> Message:
    """A text frame (given as ``str`` or as its UTF-8 bytes): a vsn 1.0.0
    JSON object or a vsn 2.0.0 ``[join_ref, ref, topic, event, payload]``."""
    try:
        value = json.loads(text)
    except ValueError:
        raise FrameError("a text frame that is not JSON") from None
    if isinstance(value, list) and len(value) == 5:
        join_ref, ref, topic, event, payload = value
    elif isinstance(value, dict):
        join_ref, ref = value.get("join_ref"), value.get("ref")
        topic, event, payload = value.get("topic"), value.get("event"), value.get("payload")
    else:
        raise FrameError("a text frame that is neither a JSON object nor an array of 5")
    if not isinstance(topic, str) or not isinstance(event, str):
        raise FrameError("a text frame whose topic or event is not a string")
    return Message(topic, event, payload, ref, join_ref, raw=text)


def split_kind4(data: bytes) -> tuple[str, str, bytes, int, bytes]:
    """A server->client binary broadcast (kind 4): topic, event, meta (raw
    JSON bytes, empty when absent), payload encoding (1 JSON, 0 raw) and
    payload."""
    if not isinstance(data, bytes):
        raise FrameError(f"expected a binary frame, got {data!r}")
    if not data or data[0] != KIND_USER_BROADCAST:
        raise FrameError(f"not a kind 4 frame: {data[:1]!r}")
    if len(data) < 5:
        raise FrameError("a kind 4 frame shorter than its header")
    topic_len, event_len, meta_len, enc = data[1:5]
    pos = 5
    if pos + topic_len + event_len + meta_len > len(data):
        raise FrameError("kind 4 lengths exceed the frame")
    try:
        topic = data[pos : pos + topic_len].decode()
        pos += topic_len
        event = data[pos : pos + event_len].decode()
    except UnicodeDecodeError:
        raise FrameError("a kind 4 topic or event that is not UTF-8") from None
    pos += event_len
    meta = data[pos : pos + meta_len]
    pos += meta_len
    return topic, event, meta, enc, data[pos:]


def decode_kind4(data: bytes) -> Message:
    """A kind 4 frame as the broadcast message realtime-js hands its
    callback; a JSON payload is decoded, a raw one stays bytes."""
    topic, event, meta, enc, payload = split_kind4(data)
    try:
        body: Any = json.loads(payload) if enc == ENC_JSON else payload
        inner: dict[str, Any] = broadcast_body(event, body)
        if meta:
            inner["meta"] = json.loads(meta)
    except ValueError:
        raise FrameError("a kind 4 payload or meta that is not JSON") from None
    return Message(topic, "broadcast", inner, binary=True, raw=data)


# -- requests and replies ----------------------------------------------------


@dataclass(frozen=True, slots=True)
class Outgoing:
    """One frame ready to send; ``ref`` is what its reply will carry."""

    topic: str
    event: str
    data: str | bytes
    ref: str | None

    @property
    def what(self) -> str:
        return f"{self.event} on {self.topic}"


#: A ref or join ref: null when unset.
Ref = str | None
_Reply = TypeVar("_Reply")
_Sent = TypeVar("_Sent")


class ClientBase(Generic[_Reply, _Sent]):
    """The half of a client that does no I/O: the serializer (``vsn``), the
    ref counter (refs are ``ref_prefix`` + 1, 2, 3...), ``join_refs`` (topic
    -> join ref of every channel joined with an ok reply), the frames of
    each request and the check of a reply.

    A subclass supplies :meth:`send` (send a frame), :meth:`call` (send one
    and return its reply) and :meth:`request` (the same, refusals raised);
    the requests below are built on them, so they are awaitable on the
    asyncio client and plain calls on the sync one.
    """

    def __init__(self, vsn: str = VSN2, *, ref_prefix: str = "") -> None:
        self.vsn = vsn
        self.ref_prefix = ref_prefix
        self.join_refs: dict[str, str] = {}
        self._refs = itertools.count(1)

    def next_ref(self) -> str:
        return f"{self.ref_prefix}{next(self._refs)}"

    def _join_ref(self, topic: str, join_ref: str | None) -> str | None:
        return self.join_refs.get(topic) if join_ref is None else join_ref

    # -- frames ----------------------------------------------------------

    def message(
        self, topic: str, event: str, payload: Any, *, ref: Ref = None, join_ref: Ref = None
    ) -> Outgoing:
        """Any text message, refs exactly as given (``None`` stays null)."""
        return Outgoing(topic, event, encode(self.vsn, join_ref, ref, topic, event, payload), ref)

    def _broadcast(
        self, topic: str, event: str, payload: Any, ref: Ref, join_ref: Ref, binary: bool
    ) -> Outgoing:
        join_ref = self._join_ref(topic, join_ref)
        if binary and self.vsn == VSN2:
            data = json.dumps(payload).encode()
            frame = encode_kind3(join_ref or "", ref or "", topic, event, data)
            return Outgoing(topic, "broadcast", frame, ref)
        body = broadcast_body(event, payload)
        return self.message(topic, "broadcast", body, ref=ref, join_ref=join_ref)

    def accept(self, sent: Outgoing, reply: Message) -> Message:
        """Check the reply to ``sent``: :class:`Refused` unless ok.  An ok
        join records the channel's join ref, an ok leave forgets it."""
        if reply.status != "ok":
            raise Refused(sent.what, reply)
        if sent.event == "phx_join" and sent.ref is not None:
            self.join_refs[sent.topic] = sent.ref
        elif sent.event == "phx_leave":
            self.join_refs.pop(sent.topic, None)
        return reply

    # -- I/O, supplied by the subclass -------------------------------------

    def send(self, sent: Outgoing) -> _Sent:
        raise NotImplementedError

    def call(self, sent: Outgoing, within: float | None = None) -> _Reply:
        """Send ``sent`` (which has a ref) and return its reply, whatever
        its status."""
        raise NotImplementedError

    def request(self, sent: Outgoing, within: float | None = None) -> _Reply:
        """Like :meth:`call`, but a refusal raises :class:`Refused`."""
        raise NotImplementedError

    # -- requests ----------------------------------------------------------

    def push(self, topic: str, event: str, payload: Any, **refs: Ref) -> _Sent:
        """Send a text message (``ref``, ``join_ref`` as given), waiting for
        nothing."""
        return self.send(self.message(topic, event, payload, **refs))

    def join(
        self,
        topic: str,
        config: dict[str, Any] | None = None,
        *,
        access_token: str | None = None,
        within: float | None = None,
    ) -> _Reply:
        """Join ``topic`` (given as on the wire, ``realtime:...``); the
        reply's ``ref`` is the channel's join ref."""
        ref = self.next_ref()
        payload = join_payload(config, access_token)
        return self.request(self.message(topic, "phx_join", payload, ref=ref, join_ref=ref), within)

    def leave(self, topic: str, *, within: float | None = None) -> _Reply:
        join_ref = self._join_ref(topic, None)
        return self.request(
            self.message(topic, "phx_leave", {}, ref=self.next_ref(), join_ref=join_ref), within
        )

    def heartbeat(self, *, within: float | None = None) -> _Reply:
        return self.request(self.message("phoenix", "heartbeat", {}, ref=self.next_ref()), within)

    def track(
        self, topic: str, meta: dict[str, Any], *, join_ref: Ref = None, within: float | None = None
    ) -> _Reply:
        """Track this socket's presence on a joined channel."""
        body = presence_body("track", meta)
        join_ref = self._join_ref(topic, join_ref)
        sent = self.message(topic, "presence", body, ref=self.next_ref(), join_ref=join_ref)
        return self.request(sent, within)

    def broadcast(
        self,
        topic: str,
        event: str,
        payload: Any,
        *,
        ref: Ref = None,
        join_ref: Ref = None,
        binary: bool = False,
    ) -> _Sent:
        """A user broadcast, waiting for no ack (``ref`` as given,
        ``join_ref`` defaulting to the channel's).  ``binary`` sends it as
        kind 3 on vsn 2.0.0, as realtime-js does; text otherwise."""
        return self.send(self._broadcast(topic, event, payload, ref, join_ref, binary))

    def acked_broadcast(
        self,
        topic: str,
        event: str,
        payload: Any,
        *,
        binary: bool = False,
        within: float | None = None,
    ) -> _Reply:
        """A user broadcast on a channel joined with ``broadcast.ack``:
        waits for the hub's ``phx_reply``."""
        sent = self._broadcast(topic, event, payload, self.next_ref(), None, binary)
        return self.request(sent, within)


# -- asyncio -----------------------------------------------------------------------


class AsyncClient(ClientBase[Coroutine[Any, Any, Message], Coroutine[Any, Any, None]]):
    """One WebSocket on ``websockets.asyncio``.

    A reader task decodes every frame into :attr:`messages` (replies
    included), hands it to ``on_message`` first, and resolves the request
    waiting for it.  ``heartbeat`` seconds, when given, is the interval of
    heartbeats sent without waiting for their replies.
    """

    def __init__(
        self,
        ws: AsyncConnection,
        vsn: str = VSN2,
        *,
        ref_prefix: str = "",
        timeout: float = DEFAULT_TIMEOUT,
        heartbeat: float | None = None,
        on_message: Callable[[Message], None] | None = None,
    ) -> None:
        super().__init__(vsn, ref_prefix=ref_prefix)
        self.ws = ws
        self.timeout = timeout
        self.on_message = on_message
        self.messages: list[Message] = []
        #: Set when the socket is gone.
        self.closed = asyncio.Event()
        #: The close frame the hub sent (None: the socket was cut without one).
        self.close_code: int | None = None
        self.close_reason = ""
        #: A frame that could not be decoded (the reader stopped on it).
        self.error: FrameError | None = None
        self._pending: dict[str, asyncio.Future[Message]] = {}
        self._changed = asyncio.Event()
        self._cursor = 0
        self._reader = asyncio.create_task(self._read())
        self._beat = asyncio.create_task(self._heartbeat(heartbeat)) if heartbeat else None

    @classmethod
    async def connect(
        cls,
        base_url: str,
        token: str | None,
        vsn: str | None = VSN2,
        *,
        ref_prefix: str = "",
        within: float = DEFAULT_TIMEOUT,
        heartbeat: float | None = None,
        on_message: Callable[[Message], None] | None = None,
        **options: Any,
    ) -> Self:
        """Open ``base_url`` (``ws://HOST/realtime/v1/websocket``) with
        ``token`` as the ``apikey``, ``within`` seconds being the default
        bound of every wait; ``vsn`` None leaves it out of the URL
        (1.0.0).  ``options`` go to ``websockets``' ``connect`` (e.g.
        ``max_size``).  A refused handshake raises ``InvalidStatus``."""
        url = socket_url(base_url, token, vsn)
        options.setdefault("ping_interval", None)
        ws = await asyncio.wait_for(async_connect(url, open_timeout=within, **options), within)
        return cls(
            ws,
            vsn or VSN1,
            ref_prefix=ref_prefix,
            timeout=within,
            heartbeat=heartbeat,
            on_message=on_message,
        )

    # -- reading ---------------------------------------------------------

    async def _read(self) -> None:
        try:
            async for data in self.ws:
                message = decode(data)
                if self.on_message is not None:
                    self.on_message(message)
                self.messages.append(message)
                if message.event == "phx_reply" and message.ref is not None:
                    future = self._pending.pop(message.ref, None)
                    if future is not None and not future.done():
                        future.set_result(message)
                self._wake()
        except ConnectionClosed:
            pass
        except FrameError as exc:
            self.error = exc
            await self.ws.close(CloseCode.INVALID_FRAME)
        finally:
            received = self.ws.protocol.close_rcvd
            if received is not None:
                self.close_code, self.close_reason = received.code, received.reason
            self.closed.set()
            for future in self._pending.values():
                if not future.done():
                    future.set_exception(Disconnected(f"closed ({self.close_code})"))
            self._wake()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def wait_changed(self, within: float) -> None:
        """Return when the next message arrives or the socket closes, or
        after ``within`` seconds, whichever comes first."""
        if self.closed.is_set():
            return
        changed = self._changed
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(changed.wait(), within)

    async def _find(
        self, predicate: Callable[[Message], bool], since: int, within: float | None
    ) -> int:
        deadline = time.monotonic() + (self.timeout if within is None else within)
        checked = since
        while True:
            while checked < len(self.messages):
                if predicate(self.messages[checked]):
                    return checked
                checked += 1
            if self.closed.is_set():
                raise Disconnected(f"closed ({self.close_code}) before the message awaited")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("the message awaited did not come")
            await self.wait_changed(remaining)

    async def wait_for(
        self,
        predicate: Callable[[Message], bool],
        *,
        within: float | None = None,
        since: int = 0,
    ) -> Message:
        """The first message from index ``since`` on (received already or
        coming) matching ``predicate``.  Raises TimeoutError, or
        Disconnected when the socket closed without one."""
        return self.messages[await self._find(predicate, since, within)]

    async def recv(self, within: float | None = None) -> Message:
        """The next message, in arrival order, that ``recv`` has not
        returned yet (replies to requests included)."""
        index = await self._find(lambda _: True, self._cursor, within)
        self._cursor = index + 1
        return self.messages[index]

    # -- sending ---------------------------------------------------------

    async def send_raw(self, data: str | bytes) -> None:
        try:
            await asyncio.wait_for(self.ws.send(data), self.timeout)
        except ConnectionClosed as exc:
            raise Disconnected(str(exc)) from exc

    async def send(self, sent: Outgoing) -> None:
        await self.send_raw(sent.data)

    async def call(self, sent: Outgoing, within: float | None = None) -> Message:
        if sent.ref is None:
            raise ValueError(f"{sent.what} has no ref to match a reply with")
        if self.closed.is_set():
            raise Disconnected(f"closed ({self.close_code}) before {sent.what}")
        future: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        self._pending[sent.ref] = future
        try:
            await self.send_raw(sent.data)
            return await asyncio.wait_for(future, self.timeout if within is None else within)
        except TimeoutError:
            raise TimeoutError(f"no reply to {sent.what} (ref {sent.ref})") from None
        finally:
            self._pending.pop(sent.ref, None)

    async def request(self, sent: Outgoing, within: float | None = None) -> Message:
        return self.accept(sent, await self.call(sent, within))

    async def _heartbeat(self, every: float) -> None:
        with contextlib.suppress(Disconnected, TimeoutError):
            while True:
                await asyncio.sleep(every)
                await self.push("phoenix", "heartbeat", {}, ref=self.next_ref())

    # -- closing ---------------------------------------------------------

    async def close(self) -> None:
        """Close with a handshake (cut after ``timeout``) and stop the tasks."""
        if self._beat is not None:
            self._beat.cancel()
        try:
            await asyncio.wait_for(self.ws.close(), self.timeout)
        except TimeoutError:
            self.ws.transport.abort()
        await self._stopped()

    async def drop(self) -> None:
        """Cut the TCP connection without a close handshake."""
        if self._beat is not None:
            self._beat.cancel()
        self.ws.transport.abort()
        await self._stopped()

    async def _stopped(self) -> None:
        with contextlib.suppress(asyncio.CancelledError, TimeoutError):
            await asyncio.wait_for(self._reader, self.timeout)
        if self._beat is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._beat


# -- threads (and greenlets) -------------------------------------------------------


@dataclass(slots=True)
class _Pending:
    done: threading.Event = field(default_factory=threading.Event)
    reply: Message | None = None


class SyncClient(ClientBase[Message, None]):
    """One WebSocket on ``websockets.sync``, with a reader thread and a
    heartbeat thread (every ``heartbeat`` seconds, waiting for the reply;
    ``0`` or ``None``: none).

    ``on_message`` is called on the reader thread for every message that is
    not a reply to one of this client's requests; ``on_close`` once, with
    ``(code, reason, expected)``, when the connection ends (``expected``:
    :meth:`close` was called first).  Messages are not kept.  ``options``
    go to ``websockets``' ``connect`` (e.g. ``compression=None``).
    """

    def __init__(
        self,
        base_url: str,
        token: str | None,
        *,
        vsn: str = VSN2,
        ref_prefix: str = "",
        timeout: float = DEFAULT_TIMEOUT,
        heartbeat: float | None = 25.0,
        on_message: Callable[[Message], None] | None = None,
        on_close: Callable[[int | None, str, bool], None] | None = None,
        **options: Any,
    ) -> None:
        super().__init__(vsn, ref_prefix=ref_prefix)
        self.url = socket_url(base_url, token, vsn)
        self.timeout = timeout
        self.heartbeat_interval = heartbeat
        self.on_message = on_message
        self.on_close = on_close
        self.options = options
        self.ws: SyncConnection | None = None
        self.close_code: int | None = None
        self.close_reason = ""
        self.frames_in = 0
        self.bytes_in = 0
        self.callback_errors = 0
        self._pending: dict[str, _Pending] = {}
        self._send_lock = threading.Lock()
        self._closing = False
        self._closed = threading.Event()

    def connect(self) -> None:
        """Open the socket (a refused handshake raises ``InvalidStatus``)
        and start the reader and heartbeat threads."""
        options = {"ping_interval": None, "close_timeout": 1.0, "max_size": None, **self.options}
        self.ws = sync_connect(self.url, open_timeout=self.timeout, **options)
        threading.Thread(target=self._read_forever, daemon=True, name="hub-ws-read").start()
        if self.heartbeat_interval:
            threading.Thread(target=self._beat_forever, daemon=True, name="hub-ws-beat").start()

    def close(self) -> None:
        """Close the socket (``on_close`` is told it was expected); the
        reader is given a second to see the hub's answer."""
        self._closing = True
        ws = self.ws
        if ws is None:
            return
        with contextlib.suppress(Exception):
            ws.close()
        self._closed.wait(1.0)

    @property
    def connected(self) -> bool:
        return self.ws is not None and not self._closed.is_set()

    # -- sending ---------------------------------------------------------

    def send_raw(self, data: str | bytes) -> None:
        ws = self.ws
        if ws is None or self._closed.is_set():
            raise Disconnected("socket is closed")
        with self._send_lock:
            try:
                ws.send(data)
            except (OSError, ConnectionClosed) as exc:
                raise Disconnected(str(exc)) from exc

    def send(self, sent: Outgoing) -> None:
        self.send_raw(sent.data)

    def call(self, sent: Outgoing, within: float | None = None) -> Message:
        if sent.ref is None:
            raise ValueError(f"{sent.what} has no ref to match a reply with")
        pending = self._pending[sent.ref] = _Pending()
        try:
            self.send_raw(sent.data)
            if not pending.done.wait(self.timeout if within is None else within):
                if self._closed.is_set():
                    raise Disconnected(f"closed ({self.close_code}) awaiting {sent.what}")
                raise TimeoutError(f"no reply to {sent.what} (ref {sent.ref})")
        finally:
            self._pending.pop(sent.ref, None)
        if pending.reply is None:
            raise Disconnected(f"closed ({self.close_code}) awaiting {sent.what}")
        return pending.reply

    def request(self, sent: Outgoing, within: float | None = None) -> Message:
        return self.accept(sent, self.call(sent, within))

    # -- threads ---------------------------------------------------------

    def _read_forever(self) -> None:
        ws = self.ws
        assert ws is not None
        try:
            for data in ws:
                self._dispatch(data)
        except (OSError, ConnectionClosed, FrameError):
            pass
        finally:
            received = ws.protocol.close_rcvd
            if received is not None:
                self.close_code, self.close_reason = received.code, received.reason
            self._closed.set()
            for pending in list(self._pending.values()):
                pending.done.set()
            with contextlib.suppress(Exception):
                ws.close()
            if self.on_close is not None:
                self.on_close(self.close_code, self.close_reason, self._closing)

    def _dispatch(self, data: str | bytes) -> None:
        self.frames_in += 1
        self.bytes_in += len(data)
        message = decode(data)
        if message.event == "phx_reply" and message.ref is not None:
            pending = self._pending.get(message.ref)
            if pending is not None:
                pending.reply = message
                pending.done.set()
                return
        if self.on_message is not None:
            try:
                self.on_message(message)
            except Exception:
                # A bug in the callback must not look like a dropped socket.
                self.callback_errors += 1
                traceback.print_exc()

    def _beat_forever(self) -> None:
        interval = self.heartbeat_interval
        while interval and not self._closed.wait(interval):
            try:
                self.heartbeat()
            except (ClientError, TimeoutError):
                return
