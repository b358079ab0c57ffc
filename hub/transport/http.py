"""uvicorn's httptools protocol, plus the hub's WebSocket handshake.

``/realtime/v1/websocket`` is served without ASGI: uvicorn runs
:class:`HubHttpProtocol`, which answers the handshake from the headers
httptools already parsed and hands the socket to a
:class:`~hub.transport.socket.HubSocket`.  Every other path, WebSocket
upgrades included, goes to uvicorn's own protocols and the ASGI app.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from http import HTTPStatus
from typing import Final
from urllib.parse import parse_qs

import orjson
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from hub.auth.principal import Principal
from hub.auth.tokens import KeyNotCached
from hub.errors import AuthError
from hub.gateway import Gateway
from hub.protocol import VERSIONS, VSN1, VSN2
from hub.transport.socket import HubSocket
from hub.websocket import accept_response, check_upgrade

log = logging.getLogger(__name__)

REALTIME_PATH: Final = "/realtime/v1/websocket"
#: The longest request line or header line, and the most header lines, of
#: an upgrade request (the limits of the websockets parser behind uvicorn's
#: WebSocket route).
MAX_HEAD_LINE: Final = 8192
MAX_HEADERS: Final = 128


class HubHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, plus the hub's WebSocket fast path.

    Select it with ``uvicorn.Config(http=HubHttpProtocol)``.  An upgrade to
    ``/realtime/v1/websocket`` is answered here: the token is checked during
    the handshake (a refusal is HTTP with ``{"error": ...}``, as Supabase
    answers; a token naming a JWKS key not fetched yet waits for the
    refresh) and the socket goes to a :class:`HubSocket`.
    """

    #: A handshake's token check waiting for a JWKS refresh (a reference,
    #: so the task is not collected).
    _token_check: asyncio.Task[Principal] | None = None

    def handle_websocket_upgrade(self) -> None:
        if (
            len(self.url) > MAX_HEAD_LINE
            or len(self.headers) > MAX_HEADERS
            or any(len(name) + len(value) + 2 > MAX_HEAD_LINE for name, value in self.headers)
        ):
            # websockets' parser (behind uvicorn's route) refuses these
            # without answering or closing; answer for every path.
            self.connections.discard(self)
            self._refuse(431, "Request line or header fields too large")
            return
        gateway: Gateway | None = self.app_state.get("gateway")
        raw_path, _, query = self.url.partition(b"?")
        if gateway is None or raw_path != REALTIME_PATH.encode():
            super().handle_websocket_upgrade()
            return
        self.connections.discard(self)
        params = parse_qs(query.decode("latin-1"))
        vsn = params.get("vsn", [VSN1])[0]
        token = params.get("apikey", [""])[0]
        refusal = gateway.check_handshake(vsn, token)
        if refusal is not None:
            self._answer(gateway, vsn, refusal)
            return
        try:
            principal = gateway.verifier.verify(token)
        except KeyNotCached:
            # A JWKS key not fetched yet (a rotation): refresh it (at the
            # bounded rate) without blocking the loop, then answer.  The
            # client sends nothing before our answer; reading waits anyway.
            self.transport.pause_reading()
            self._token_check = self.loop.create_task(gateway.verifier.verify_async(token))
            self._token_check.add_done_callback(functools.partial(self._verified, gateway, vsn))
            return
        except AuthError as exc:
            self._answer(gateway, vsn, gateway.refuse_handshake(401, exc.message))
            return
        self._answer(gateway, vsn, principal)

    def _verified(self, gateway: Gateway, vsn: str, task: asyncio.Task[Principal]) -> None:
        self._token_check = None
        if task.cancelled() or self.transport.is_closing():
            return  # shutting down, or the client left
        exc = task.exception()
        if exc is None:
            self._answer(gateway, vsn, task.result())
        elif isinstance(exc, AuthError):
            self._answer(gateway, vsn, gateway.refuse_handshake(401, exc.message))
        else:
            log.error("token check failed", exc_info=exc)
            self._refuse(500, "Internal Server Error")

    def _answer(self, gateway: Gateway, vsn: str, outcome: Principal | tuple[int, str]) -> None:
        """Refuse with (status, message), or accept for ``outcome``'s principal."""
        if isinstance(outcome, tuple):
            self._refuse(*outcome)
            return
        upgrade = check_upgrade(self.scope["method"], self.headers)
        if not isinstance(upgrade, bytes):
            self._refuse(*upgrade)
            return
        socket = HubSocket(gateway, self.connections, self.loop)
        self.transport.set_protocol(socket)
        socket.connection_made(self.transport)
        self.transport.write(accept_response(upgrade))
        assert vsn in VERSIONS  # check_handshake refused any other
        # The protocol's own constant, not the query's copy of it (which
        # every session would hold).
        socket.start(outcome, VSN2 if vsn == VSN2 else VSN1)
        self.transport.resume_reading()  # paused while a JWKS refresh ran

    def _refuse(self, status: int, message: str) -> None:
        body = orjson.dumps({"error": message})
        self.transport.write(
            f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\n"
            "Content-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
            + body
        )
        self.transport.close()
