"""REST broadcast, as Supabase serves it.

* ``POST /realtime/v1/api/broadcast`` (also ``/api/broadcast``) with
  ``{"messages": [{"topic", "event", "payload", "private"?}]}``.
* ``POST /realtime/v1/api/broadcast/{topic}/events/{event}`` with the payload
  as the body (JSON, or raw bytes as ``application/octet-stream``): what
  realtime-py's ``channel.http_send`` calls.

The token comes from ``Authorization: Bearer`` or the ``apikey`` header.
Answers: 202 (empty) when everything was published; 401 without a valid
token; 403 when any message names a topic the token may not write to; 422
for a malformed body.  A request is all or nothing: every message is
checked before the first is published.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final

import orjson
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from hub.auth.policy import authorize_write
from hub.auth.principal import Principal
from hub.channels.topics import InvalidTopic, parse_topic
from hub.errors import AuthError
from hub.protocol import MAX_BINARY_FIELD, Broadcast

if TYPE_CHECKING:
    from hub.app import Hub

#: Messages one request may carry.
MAX_MESSAGES: Final = 100


class _Rejected(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"message": message}, status_code=status)


async def _authenticate(request: Request, hub: Hub) -> Principal:
    header = request.headers.get("authorization", "")
    scheme, _, credentials = header.partition(" ")
    token = credentials.strip() if scheme.lower() == "bearer" else request.headers.get("apikey")
    if not token:
        raise _Rejected(401, "Unauthorized")
    try:
        return await hub.verifier.verify_async(token)
    except AuthError as exc:
        raise _Rejected(401, f"Unauthorized: {exc.message}") from None


async def _read_body(request: Request, hub: Hub) -> bytes:
    limit = hub.settings.max_payload_bytes * MAX_MESSAGES
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _Rejected(413, "Payload size exceeds tenant limit")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise _Rejected(413, "Payload size exceeds tenant limit")
    return bytes(body)


def _check(
    hub: Hub, principal: Principal, topic_text: Any, event: Any, payload: bytes
) -> tuple[str, str]:
    if not isinstance(topic_text, str):
        raise _Rejected(422, "topic must be a string")
    if not isinstance(event, str) or not event or len(event.encode()) > MAX_BINARY_FIELD:
        raise _Rejected(422, f"event must be a string of 1 to {MAX_BINARY_FIELD} bytes")
    try:
        topic = parse_topic(topic_text)
    except InvalidTopic as exc:
        raise _Rejected(422, f"invalid topic: {exc}") from None
    try:
        authorize_write(principal, topic)
    except AuthError as exc:
        raise _Rejected(403, exc.reason) from None
    if len(payload) > hub.settings.max_payload_bytes:
        raise _Rejected(422, "Payload size exceeds tenant limit")
    return topic.text, event


async def rest_broadcast(request: Request) -> Response:
    hub: Hub = request.app.state.hub
    try:
        principal = await _authenticate(request, hub)
        try:
            body = orjson.loads(await _read_body(request, hub))
        except orjson.JSONDecodeError:
            raise _Rejected(422, "body is not valid JSON") from None
        messages = body.get("messages") if isinstance(body, dict) else None
        if not isinstance(messages, list) or not messages:
            raise _Rejected(422, 'body must be {"messages": [...]} with at least one message')
        if len(messages) > MAX_MESSAGES:
            raise _Rejected(422, f"at most {MAX_MESSAGES} messages per request")
        ready = []
        for message in messages:
            if not isinstance(message, dict):
                raise _Rejected(422, "each message must be an object")
            payload = orjson.dumps(message.get("payload", {}))
            topic, event = _check(
                hub, principal, message.get("topic"), message.get("event"), payload
            )
            ready.append(Broadcast(topic, event, payload))
    except _Rejected as rejected:
        return _error(rejected.status, rejected.message)
    for broadcast in ready:
        hub.channels.publish(broadcast)
    return Response(status_code=202)


async def rest_broadcast_one(request: Request) -> Response:
    hub: Hub = request.app.state.hub
    try:
        principal = await _authenticate(request, hub)
        body = await _read_body(request, hub)
        is_json = request.headers.get("content-type", "").split(";")[0] != (
            "application/octet-stream"
        )
        if is_json:
            try:
                orjson.loads(body)
            except orjson.JSONDecodeError:
                raise _Rejected(422, "body is not valid JSON") from None
        topic, event = _check(
            hub, principal, request.path_params["topic"], request.path_params["event"], body
        )
    except _Rejected as rejected:
        return _error(rejected.status, rejected.message)
    hub.channels.publish(Broadcast(topic, event, body, is_json=is_json))
    return Response(status_code=202)
