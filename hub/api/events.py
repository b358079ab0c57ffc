"""Durable org events over REST.

* ``POST /api/orgs/{org}/events`` appends ``{"type", "payload"}`` or a list
  of them (at most 100), atomically, and answers 201
  ``{"events": [{"seq", "id"}, ...]}``.
* ``GET /api/orgs/{org}/events?after=SEQ&limit=N`` reads history, ascending,
  ``limit`` at most 1000: ``{"events": [...], "last_seq": N}``.

Members of the org and ``service_role`` may do both; anyone else gets 403
(401 without a valid token).  Publishing goes to the store only: subscribers
hear the event from the store's listener like every other durable event.
"""

from __future__ import annotations

from typing import Any, Final

import orjson
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from hub.api.common import Rejected, authenticate, error_response, read_json
from hub.auth.policy import authorize_write
from hub.auth.tokens import TokenVerifier
from hub.channels.topics import InvalidTopic, parse_topic
from hub.errors import AuthError
from hub.protocol import MAX_BINARY_FIELD, is_event_name
from hub.store.base import MAX_READ, EventStore, StoredEvent, StoreError, StoreUnavailable

#: Events one request may append.
MAX_BATCH: Final = 100


async def _authorized_org(request: Request, verifier: TokenVerifier) -> str:
    principal = await authenticate(request, verifier)
    org: str = request.path_params["org"]
    try:
        topic = parse_topic(f"org:{org}")
    except InvalidTopic:
        raise Rejected(422, "invalid org id") from None
    try:
        authorize_write(principal, topic)
    except AuthError as exc:
        raise Rejected(403, exc.reason) from None
    return org


def event_json(event: StoredEvent) -> dict[str, Any]:
    return {
        "seq": event.seq,
        "id": event.id,
        "type": event.type,
        "kind": event.kind,
        "payload": event.payload,
        "created_at": event.created_at,
    }


def parse_batch(body: Any, max_payload_bytes: int) -> list[tuple[str, Any]]:
    """Validate a publish body; raise Rejected(422) when malformed."""
    items = body if isinstance(body, list) else [body]
    if not items or len(items) > MAX_BATCH:
        raise Rejected(422, f"publish 1 to {MAX_BATCH} events per request")
    batch = []
    for item in items:
        if not isinstance(item, dict):
            raise Rejected(422, 'each event must be {"type": ..., "payload": ...}')
        kind, payload = item.get("type"), item.get("payload", {})
        if not is_event_name(kind):
            raise Rejected(422, f"type must be a string of 1 to {MAX_BINARY_FIELD} bytes")
        if len(orjson.dumps(payload)) > max_payload_bytes:
            raise Rejected(422, "Payload size exceeds tenant limit")
        batch.append((kind, payload))
    return batch


def _int_param(request: Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    if not raw.isdigit() or not low <= int(raw) <= high:
        raise Rejected(422, f"{name} must be an integer from {low} to {high}")
    return int(raw)


class EventsApi:
    """The durable events routes, with what they use: the token check, the
    event store and the size limits."""

    def __init__(
        self,
        *,
        verifier: TokenVerifier,
        store: EventStore,
        max_payload_bytes: int,
        max_request_bytes: int,
    ) -> None:
        self.verifier = verifier
        self.store = store
        self.max_payload_bytes = max_payload_bytes
        self.max_request_bytes = max_request_bytes

    def routes(self) -> list[BaseRoute]:
        return [
            Route("/api/orgs/{org}/events", self.append, methods=["POST"]),
            Route("/api/orgs/{org}/events", self.read, methods=["GET"]),
        ]

    async def append(self, request: Request) -> Response:
        try:
            org = await _authorized_org(request, self.verifier)
            body = await read_json(request, self.max_request_bytes)
            batch = parse_batch(body, self.max_payload_bytes)
            try:
                stored = await self.store.append(org, batch)
            except (StoreError, TypeError) as exc:
                # The store's own checks (NUL bytes, unencodable values).
                raise Rejected(422, f"event refused: {exc}") from None
            except StoreUnavailable as exc:
                raise Rejected(503, str(exc)) from None
        except Rejected as rejected:
            return error_response(rejected.status, rejected.message)
        return JSONResponse(
            {"events": [{"seq": event.seq, "id": event.id} for event in stored]}, status_code=201
        )

    async def read(self, request: Request) -> Response:
        try:
            org = await _authorized_org(request, self.verifier)
            after = _int_param(request, "after", 0, 0, 2**62)
            limit = _int_param(request, "limit", 100, 1, MAX_READ)
            events = await self.store.read(org, after=after, limit=limit)
            last_seq = await self.store.last_seq(org)
        except Rejected as rejected:
            return error_response(rejected.status, rejected.message)
        except StoreUnavailable as exc:
            return error_response(503, str(exc))
        return JSONResponse({"events": [event_json(e) for e in events], "last_seq": last_seq})
