"""REST broadcast, as Supabase serves it.

* ``POST /realtime/v1/api/broadcast`` (also ``/api/broadcast``) with
  ``{"messages": [{"topic", "event", "payload", "private"?}]}``.
* ``POST /realtime/v1/api/broadcast/{topic}/events/{event}[?private=true]``
  with the payload as the body (JSON, or raw bytes as
  ``application/octet-stream``): what realtime-py's ``channel.http_send``
  and supabase-js's ``channel.httpSend`` call.

The token comes from ``Authorization: Bearer`` or the ``apikey`` header.
Answers: 202 (empty) when everything was published; 401 without a valid
token; 403 when any message names a topic the token may not write to; 422
for a malformed body.  A request is all or nothing: every message is
checked before the first is published.
"""

from __future__ import annotations

from typing import Any, Final

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from hub.api.common import (
    Rejected,
    authenticate,
    bearer_token,
    error_response,
    read_body,
    refused,
)
from hub.auth.channel_policies import ChannelPolicies, ChannelPolicyError, CheckRefused
from hub.auth.policy import authorize_write
from hub.auth.principal import Principal
from hub.auth.tokens import KeyNotCached, TokenVerifier
from hub.channels.fanout import Channels
from hub.channels.topics import InvalidTopic, Topic, parse_topic
from hub.errors import AuthError, HubError
from hub.protocol import MAX_BINARY_FIELD, Broadcast, is_event_name
from hub.quotas import Quotas, quota_bucket

#: Messages one request may carry.
MAX_MESSAGES: Final = 100


class MustAwait(HubError):
    """A request :meth:`BroadcastApi.broadcast_now` cannot answer without
    awaiting; the ASGI route must take it."""


def _check(
    principal: Principal,
    topic_text: Any,
    event: Any,
    payload: bytes,
    max_payload_bytes: int,
    private: Any = False,
    policies: ChannelPolicies | None = None,
) -> tuple[Topic, str]:
    if not isinstance(topic_text, str):
        raise Rejected(422, "topic must be a string")
    if not is_event_name(event):
        raise Rejected(422, f"event must be a string of 1 to {MAX_BINARY_FIELD} bytes")
    try:
        topic = parse_topic(topic_text, private=_private(private))
    except InvalidTopic as exc:
        raise Rejected(422, f"invalid topic: {exc}") from None
    if topic.private and not principal.is_service:
        if policies is None:
            raise Rejected(
                403,
                "Unauthorized: private channels need Realtime Authorization, which reads "
                "the realtime.messages policies of HUB_DATABASE_URL; this hub has none",
            )
    else:
        try:
            authorize_write(principal, topic)
        except AuthError as exc:
            raise Rejected(403, exc.reason) from None
    if len(payload) > max_payload_bytes:
        raise Rejected(422, "Payload size exceeds tenant limit")
    return topic, event


def _private(value: Any) -> bool:
    """A message's ``private``: true or false, or those words as strings in
    any case (as the join reads ``config.private``, and as Supabase casts
    it); absent means public, anything else is refused: a private message
    must never go to the public channel of its name by a misreading."""
    if value is None:
        return False
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    if not isinstance(value, bool):
        raise Rejected(422, "private must be a boolean")
    return value


def _policed(
    policies: ChannelPolicies | None, principal: Principal, topics: list[Topic]
) -> list[Topic]:
    """The topics, once each, whose writes the app's policies decide: the
    private ones, unless there are no policies or the token is the
    service role's."""
    if policies is None or principal.is_service:
        return []
    return list({t.text: t for t in topics if t.private}.values())


async def _authorize_private(
    policies: ChannelPolicies | None, principal: Principal, topics: list[Topic]
) -> None:
    """Private free names are written by policy: the app's realtime.messages
    policies must let this token insert a broadcast (403 otherwise, 503
    when the check cannot be answered)."""
    if policies is None:
        return
    for topic in _policed(policies, principal, topics):
        try:
            allowed = await policies.can_write(principal.claims, topic.text, "broadcast")
        except CheckRefused:
            allowed = False
        except ChannelPolicyError as exc:
            raise Rejected(503, exc.reason) from None
        if not allowed:
            raise Rejected(
                403,
                f"Unauthorized: You do not have permissions to write to this Channel topic: "
                f"{topic.text}",
            )


def _charge(quotas: Quotas, principal: Principal, topics: list[Topic]) -> None:
    """Count the messages against their orgs' quotas; 429 when over."""
    if principal.is_service:
        return
    for topic in topics:
        bucket = quota_bucket(topic)
        if bucket is not None and not quotas.take_message(bucket):
            raise Rejected(429, "You have exceeded your rate limit")


class BroadcastApi:
    """The REST broadcast routes, with what they use: the token check, the
    channels to publish to, the org quotas and the size limits."""

    def __init__(
        self,
        *,
        verifier: TokenVerifier,
        channels: Channels,
        quotas: Quotas,
        max_payload_bytes: int,
        max_request_bytes: int,
        policies: ChannelPolicies | None = None,
    ) -> None:
        self.verifier = verifier
        self.policies = policies
        self.channels = channels
        self.quotas = quotas
        self.max_payload_bytes = max_payload_bytes
        self.max_request_bytes = max_request_bytes

    def routes(self) -> list[BaseRoute]:
        return [
            Route("/realtime/v1/api/broadcast", self.broadcast, methods=["POST"]),
            Route("/api/broadcast", self.broadcast, methods=["POST"]),
            Route(
                "/realtime/v1/api/broadcast/{topic}/events/{event}",
                self.broadcast_one,
                methods=["POST"],
            ),
        ]

    async def broadcast(self, request: Request) -> Response:
        try:
            principal = await authenticate(request, self.verifier)
            ready = self.prepare(principal, await read_body(request, self.max_request_bytes))
            await _authorize_private(self.policies, principal, [topic for topic, _ in ready])
            self.commit(principal, ready)
        except Rejected as rejected:
            return error_response(rejected.status, rejected.message)
        return Response(status_code=202)

    def broadcast_now(self, authorization: str, apikey: str | None, body: bytes) -> Rejected | None:
        """The bulk route answered without awaiting, as
        :class:`hub.transport.http.HubHttpProtocol` serves it: None once
        everything is published (202), else the refusal to answer.

        Raises :class:`MustAwait` when the answer needs an await (a JWKS
        key not fetched yet; a private topic's policies, for a token that
        is not the service role); nothing is published then, and the ASGI
        route, which decides the same way, takes the request."""
        try:
            token = bearer_token(authorization, apikey)
            try:
                principal = self.verifier.verify(token)
            except KeyNotCached:
                raise MustAwait from None
            except AuthError as exc:
                raise refused(exc) from None
            ready = self.prepare(principal, body)
            if _policed(self.policies, principal, [topic for topic, _ in ready]):
                raise MustAwait
            self.commit(principal, ready)
        except Rejected as rejected:
            return rejected
        return None

    def prepare(self, principal: Principal, body: bytes) -> list[tuple[Topic, Broadcast]]:
        """A bulk request's messages, each checked (Rejected otherwise),
        with the broadcast to publish for it."""
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise Rejected(422, "body is not valid JSON") from None
        messages = data.get("messages") if isinstance(data, dict) else None
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
                principal,
                message.get("topic"),
                message.get("event"),
                payload,
                self.max_payload_bytes,
                message.get("private", False),
                self.policies,
            )
            ready.append((topic, Broadcast(topic.key, event, payload)))
        return ready

    def commit(self, principal: Principal, ready: list[tuple[Topic, Broadcast]]) -> None:
        """Charge checked messages to their orgs' quotas (Rejected(429),
        and nothing published, when over), then publish them all."""
        _charge(self.quotas, principal, [topic for topic, _ in ready])
        for _, broadcast in ready:
            self.channels.publish(broadcast)

    async def broadcast_one(self, request: Request) -> Response:
        try:
            principal = await authenticate(request, self.verifier)
            body = await read_body(request, self.max_request_bytes)
            is_json = request.headers.get("content-type", "").split(";")[0] != (
                "application/octet-stream"
            )
            if is_json:
                try:
                    orjson.loads(body)
                except orjson.JSONDecodeError:
                    raise Rejected(422, "body is not valid JSON") from None
            # supabase-js's httpSend and realtime-py's http_send name a
            # private channel with ?private=true.
            private = request.query_params.get("private")
            topic, event = _check(
                principal,
                request.path_params["topic"],
                request.path_params["event"],
                body,
                self.max_payload_bytes,
                private,
                self.policies,
            )
            await _authorize_private(self.policies, principal, [topic])
            _charge(self.quotas, principal, [topic])
        except Rejected as rejected:
            return error_response(rejected.status, rejected.message)
        self.channels.publish(Broadcast(topic.key, event, body, is_json=is_json))
        return Response(status_code=202)
