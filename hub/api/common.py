"""What every REST route shares: token auth, bounded bodies, JSON errors."""

from __future__ import annotations

from typing import Any

import orjson
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse

from hub.auth.principal import Principal
from hub.auth.tokens import TokenVerifier
from hub.errors import AuthError, HubError


class Rejected(HubError):
    """Answer the request with ``status`` and ``{"message": message}``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def error_response(status: int, message: str) -> JSONResponse:
    return JSONResponse({"message": message}, status_code=status)


def bearer_token(authorization: str, apikey: str | None) -> str:
    """A request's token: ``Authorization: Bearer``, else the ``apikey``
    header; Rejected(401) when there is none."""
    scheme, _, credentials = authorization.partition(" ")
    token = credentials.strip() if scheme.lower() == "bearer" else apikey
    if not token:
        raise Rejected(401, "Unauthorized")
    return token


def refused(exc: AuthError) -> Rejected:
    """How a refused token is answered."""
    return Rejected(401, f"Unauthorized: {exc.message}")


async def authenticate(request: Request, verifier: TokenVerifier) -> Principal:
    token = bearer_token(request.headers.get("authorization", ""), request.headers.get("apikey"))
    try:
        return await verifier.verify_async(token)
    except AuthError as exc:
        raise refused(exc) from None


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, or Rejected(413) once it passes ``limit`` bytes.

    A client that hangs up before its body is complete gets Rejected(400):
    nothing is appended or published, and the answer goes nowhere (uvicorn
    drops sends on a closed connection), but the hub logs no traceback for
    what is a normal event (a publisher cancelled or timed out)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise Rejected(413, "Payload size exceeds tenant limit")
    body = bytearray()
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise Rejected(413, "Payload size exceeds tenant limit")
    except ClientDisconnect:
        raise Rejected(400, "client disconnected before the body was complete") from None
    return bytes(body)


async def read_json(request: Request, limit: int) -> Any:
    """The request body parsed as JSON; Rejected(413/422) otherwise."""
    try:
        return orjson.loads(await read_body(request, limit))
    except orjson.JSONDecodeError:
        raise Rejected(422, "body is not valid JSON") from None
