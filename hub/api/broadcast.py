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
from starlette.responses import Response

from hub.api.common import Rejected, authenticate, error_response, read_body, read_json
from hub.auth.policy import authorize_write
from hub.auth.principal import Principal
from hub.channels.topics import InvalidTopic, parse_topic
from hub.errors import AuthError
from hub.protocol import MAX_BINARY_FIELD, Broadcast

if TYPE_CHECKING:
    from hub.app import Hub

#: Messages one request may carry.
MAX_MESSAGES: Final = 100


def _check(
    hub: Hub, principal: Principal, topic_text: Any, event: Any, payload: bytes
) -> tuple[str, str]:
    if not isinstance(topic_text, str):
        raise Rejected(422, "topic must be a string")
    if not isinstance(event, str) or not event or len(event.encode()) > MAX_BINARY_FIELD:
        raise Rejected(422, f"event must be a string of 1 to {MAX_BINARY_FIELD} bytes")
    try:
        topic = parse_topic(topic_text)
    except InvalidTopic as exc:
        raise Rejected(422, f"invalid topic: {exc}") from None
    try:
        authorize_write(principal, topic)
    except AuthError as exc:
        raise Rejected(403, exc.reason) from None
    if len(payload) > hub.settings.max_payload_bytes:
        raise Rejected(422, "Payload size exceeds tenant limit")
    return topic.text, event


def _charge(hub: Hub, principal: Principal, topics: list[str]) -> None:
    """Count the messages against their orgs' quotas; 429 when over."""
    if principal.is_service:
        return
    for text in topics:
        org = parse_topic(text).org
        if org is not None and not hub.quotas.take_message(org):
            raise Rejected(429, "You have exceeded your rate limit")


async def rest_broadcast(request: Request) -> Response:
    hub: Hub = request.app.state.hub
    try:
        principal = await authenticate(request, hub)
        body = await read_json(request, hub.settings.max_request_bytes)
        messages = body.get("messages") if isinstance(body, dict) else None
        if not isinstance(messages, list) or not messages:
            raise Rejected(422, 'body must be {"messages": [...]} with at least one message')
        if len(messages) > MAX_MESSAGES:
            raise Rejected(422, f"at most {MAX_MESSAGES} messages per request")
        ready = []
        for message in messages:
            if not isinstance(message, dict):
                raise Rejected(422, "each message must be an object")
            payload = orjson.dumps(message.get("payload", {}))
            topic, event = _check(
                hub, principal, message.get("topic"), message.get("event"), payload
            )
            ready.append(Broadcast(topic, event, payload))
        _charge(hub, principal, [broadcast.topic for broadcast in ready])
    except Rejected as rejected:
        return error_response(rejected.status, rejected.message)
    for broadcast in ready:
        hub.channels.publish(broadcast)
    return Response(status_code=202)


async def rest_broadcast_one(request: Request) -> Response:
    hub: Hub = request.app.state.hub
    try:
        principal = await authenticate(request, hub)
        body = await read_body(request, hub.settings.max_request_bytes)
        is_json = request.headers.get("content-type", "").split(";")[0] != (
            "application/octet-stream"
        )
        if is_json:
            try:
                orjson.loads(body)
            except orjson.JSONDecodeError:
                raise Rejected(422, "body is not valid JSON") from None
        topic, event = _check(
            hub, principal, request.path_params["topic"], request.path_params["event"], body
        )
        _charge(hub, principal, [topic])
    except Rejected as rejected:
        return error_response(rejected.status, rejected.message)
    hub.channels.publish(Broadcast(topic, event, body, is_json=is_json))
    return Response(status_code=202)
