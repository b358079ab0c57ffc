"""The Supabase Realtime (Phoenix) wire codec: bytes in, messages out.

Two serializers share one message model:

* vsn 1.0.0: text frames holding a JSON object
  ``{"topic", "event", "payload", "ref", "join_ref"}``.
* vsn 2.0.0: text frames holding a JSON array
  ``[join_ref, ref, topic, event, payload]``, plus binary frames whose first
  byte is a kind: the client sends user broadcasts as kind 3, the server
  sends them as kind 4.

Nothing here does I/O, so the codec is tested and fuzzed by feeding it
bytes.  Decoding raises :class:`~hub.errors.ProtocolError` with a message
that is safe to send back; it never includes the offending frame.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Final, Literal, TypeGuard

import orjson

from hub.errors import ProtocolError
from hub.frames import Frame, binary_frame, text_frame

Vsn = Literal["1.0.0", "2.0.0"]
VSN1: Final = "1.0.0"
VSN2: Final = "2.0.0"
VERSIONS: Final = (VSN1, VSN2)

#: Clients prefix every channel topic with this; the hub's own topic names
#: (``org:42``) are what follows it.
TOPIC_PREFIX: Final = "realtime:"
#: Marks the routing key of a private free-name channel (see
#: hub.channels.topics): a control character, which no topic contains.
PRIVATE_MARK: Final = "\x00"


def wire_topic(key: str) -> str:
    """The topic clients see (``realtime:room``) for a routing key: a
    private channel's key carries :data:`PRIVATE_MARK`, its topic does not."""
    return TOPIC_PREFIX + (key[1:] if key.startswith(PRIVATE_MARK) else key)


KIND_USER_BROADCAST_PUSH: Final = 3  # client -> server
KIND_USER_BROADCAST: Final = 4  # server -> client
ENC_RAW: Final = 0
ENC_JSON: Final = 1
_KIND3_HEADER: Final = 7  # kind + 5 lengths + encoding byte
#: Every length in the binary format is one byte.
MAX_BINARY_FIELD: Final = 255


def is_event_name(value: object) -> TypeGuard[str]:
    """The one rule for an event name (a broadcast's event, a durable
    event's type), wherever it comes from: a string of 1 to
    :data:`MAX_BINARY_FIELD` UTF-8 bytes, so it fits a binary frame."""
    return isinstance(value, str) and 0 < len(value.encode()) <= MAX_BINARY_FIELD


@dataclass(slots=True)
class BinaryBroadcast:
    """The payload of a kind-3 frame: a user broadcast sent as binary.

    ``data`` is the payload exactly as sent: UTF-8 JSON when ``is_json`` (it
    has been checked to parse), opaque bytes otherwise.
    """

    event: str
    data: bytes
    is_json: bool


@dataclass(slots=True)
class Message:
    """One client->server message, whatever serializer carried it."""

    join_ref: str | None
    ref: str | None
    topic: str
    event: str
    payload: Any


def decode(data: str | bytes, vsn: Vsn) -> Message:
    """Decode one WebSocket message.

    ``str`` is a text frame, ``bytes`` a binary frame.  Raises
    :class:`ProtocolError` for anything that is not a well-formed message of
    the connection's serializer.
    """
    if isinstance(data, bytes):
        if vsn != VSN2:
            raise ProtocolError("binary frames need vsn 2.0.0")
        return _decode_binary(data)
    try:
        value = orjson.loads(data)
    except orjson.JSONDecodeError:
        raise ProtocolError("frame is not valid JSON") from None
    if vsn == VSN1:
        if not isinstance(value, dict):
            raise ProtocolError("vsn 1.0.0 frames are JSON objects")
        join_ref, ref = value.get("join_ref"), value.get("ref")
        topic, event = value.get("topic"), value.get("event")
        payload = value.get("payload", {})
    else:
        if not isinstance(value, list) or len(value) != 5:
            raise ProtocolError("vsn 2.0.0 frames are JSON arrays of 5 elements")
        join_ref, ref, topic, event, payload = value
    if not isinstance(topic, str) or not isinstance(event, str):
        raise ProtocolError("topic and event must be strings")
    if not (ref is None or isinstance(ref, str)):
        raise ProtocolError("ref must be a string or null")
    if not (join_ref is None or isinstance(join_ref, str)):
        raise ProtocolError("join_ref must be a string or null")
    return Message(join_ref, ref, topic, event, payload)


def _decode_binary(data: bytes) -> Message:
    if not data:
        raise ProtocolError("empty binary frame")
    kind = data[0]
    if kind != KIND_USER_BROADCAST_PUSH:
        raise ProtocolError(f"unsupported binary frame kind {kind}")
    if len(data) < _KIND3_HEADER:
        raise ProtocolError("binary frame shorter than its header")
    join_ref_len, ref_len, topic_len, event_len, meta_len, enc = data[1:_KIND3_HEADER]
    if enc not in (ENC_RAW, ENC_JSON):
        raise ProtocolError(f"unknown binary payload encoding {enc}")
    start = _KIND3_HEADER
    end = start + join_ref_len + ref_len + topic_len + event_len + meta_len
    if end > len(data):
        raise ProtocolError("binary frame lengths exceed the frame")
    try:
        fields = []
        for length in (join_ref_len, ref_len, topic_len, event_len):
            fields.append(data[start : start + length].decode())
            start += length
    except UnicodeDecodeError:
        raise ProtocolError("binary frame header fields must be UTF-8") from None
    # The client's meta (start..end) carries nothing the hub trusts; skip it.
    payload = data[end:]
    if enc == ENC_JSON:
        try:
            orjson.loads(payload)
        except orjson.JSONDecodeError:
            raise ProtocolError("binary broadcast payload is not valid JSON") from None
    join_ref, ref, topic, event = fields
    return Message(
        join_ref or None,
        ref or None,
        topic,
        "broadcast",
        BinaryBroadcast(event, payload, enc == ENC_JSON),
    )


# -- encoding ---------------------------------------------------------------


def _dumps(value: Any) -> bytes:
    return orjson.dumps(value)


def encode(
    vsn: Vsn,
    join_ref: str | None,
    ref: str | None,
    topic: str,
    event: str,
    payload: Any,
) -> Frame:
    """Encode one server->client message as a text frame."""
    if vsn == VSN1:
        # realtime-py drops any server message without a "ref" key, so it is
        # always present, null on pushes.
        body: Any = {"topic": topic, "event": event, "payload": payload, "ref": ref}
        if join_ref is not None:
            body["join_ref"] = join_ref
        return text_frame(_dumps(body))
    return text_frame(_dumps([join_ref, ref, topic, event, payload]))


def encode_reply(
    vsn: Vsn,
    join_ref: str | None,
    ref: str | None,
    topic: str,
    status: Literal["ok", "error"],
    response: Any,
) -> Frame:
    return encode(vsn, join_ref, ref, topic, "phx_reply", {"status": status, "response": response})


class Broadcast:
    """A user broadcast on its way to many sockets, encoded at most once per
    wire format.

    ``topic`` is the routing key (:attr:`hub.channels.topics.Topic.key`);
    the frames carry its :func:`wire_topic`.  ``payload`` is either
    pre-encoded JSON (``is_json``) or opaque bytes.  Opaque bytes have no
    vsn 1.0.0 form: such subscribers skip the message,
    as Supabase does.  ``origin`` identifies the sending subscription so that
    ``self: false`` can skip it.
    """

    __slots__ = ("topic", "event", "payload", "is_json", "meta", "origin", "sent_at", "_v1", "_v2")

    def __init__(
        self,
        topic: str,
        event: str,
        payload: bytes,
        *,
        is_json: bool = True,
        meta: dict[str, Any] | None = None,
        origin: object | None = None,
        sent_at: float | None = None,
    ) -> None:
        self.topic = topic
        self.event = event
        self.payload = payload
        self.is_json = is_json
        self.meta = meta
        self.origin = origin
        #: Wall-clock time of the publish, carried between nodes, for the
        #: fan-out latency metric.
        self.sent_at = time.time() if sent_at is None else sent_at
        self._v1: Frame | None = None
        self._v2: Frame | None = None

    @classmethod
    def from_value(
        cls, topic: str, event: str, value: Any, *, meta: dict[str, Any] | None = None
    ) -> Broadcast:
        return cls(topic, event, _dumps(value), meta=meta)

    def frame_v1(self) -> Frame | None:
        """The vsn 1.0.0 frame, or None when the payload is opaque bytes."""
        if self._v1 is None and self.is_json:
            inner: dict[str, Any] = {
                "type": "broadcast",
                "event": self.event,
                "payload": orjson.Fragment(self.payload),
            }
            if self.meta is not None:
                inner["meta"] = self.meta
            self._v1 = text_frame(
                _dumps(
                    {
                        "topic": wire_topic(self.topic),
                        "event": "broadcast",
                        "payload": inner,
                        "ref": None,
                    }
                )
            )
        return self._v1

    def frame_v2(self) -> Frame:
        """The vsn 2.0.0 frame: binary kind 4, which supabase-js decodes
        without a second JSON pass over the envelope."""
        if self._v2 is None:
            topic = wire_topic(self.topic).encode()
            event = self.event.encode()
            meta = _dumps(self.meta) if self.meta is not None else b""
            if max(len(topic), len(event), len(meta)) > MAX_BINARY_FIELD:
                # Lengths are single bytes; the hub bounds topics and events
                # below this, so only an oversized meta can land here.
                raise ValueError("broadcast header field longer than 255 bytes")
            header = bytes(
                (
                    KIND_USER_BROADCAST,
                    len(topic),
                    len(event),
                    len(meta),
                    ENC_JSON if self.is_json else ENC_RAW,
                )
            )
            self._v2 = binary_frame(b"".join((header, topic, event, meta, self.payload)))
        return self._v2

    def frame_for(self, vsn: Vsn) -> Frame | None:
        return self.frame_v2() if vsn == VSN2 else self.frame_v1()
