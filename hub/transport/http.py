"""uvicorn's httptools protocol, plus the hub's two hot paths.

uvicorn runs :class:`HubHttpProtocol`, which serves two things without
ASGI:

* ``/realtime/v1/websocket``: the handshake is answered from the headers
  httptools already parsed, and the socket goes to a
  :class:`~hub.transport.socket.HubSocket`;
* the REST bulk broadcast (``POST /realtime/v1/api/broadcast`` and
  ``/api/broadcast``), what an app's server calls for every message it
  publishes: answered as the body completes, with no task, no Starlette
  request and no middleware (through ASGI those were about half of the
  request's CPU); see :meth:`HubHttpProtocol._start_asgi_task` for when
  it still goes there.

Every other request, WebSocket upgrades included, goes to uvicorn's own
protocols and the ASGI app.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from http import HTTPStatus
from typing import Final
from urllib.parse import parse_qs

import orjson
from uvicorn._types import ASGI3Application
from uvicorn.protocols.http.httptools_impl import (
    STATUS_LINE,
    HttpToolsProtocol,
    RequestResponseCycle,
)

from hub.api.broadcast import BroadcastApi, MustAwait
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
#: The REST bulk broadcast's paths (hub.api.broadcast), served here.
BROADCAST_PATHS: Final = frozenset({"/realtime/v1/api/broadcast", "/api/broadcast"})
#: How long a connection accepted before a shutdown, with no request yet,
#: is given to begin one (a proxy sends its request right after connecting).
FIRST_REQUEST_GRACE: Final = 1.0


class HubHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, plus the hub's WebSocket and REST
    broadcast fast paths.

    Select it with ``uvicorn.Config(http=HubHttpProtocol)``.  An upgrade to
    ``/realtime/v1/websocket`` is answered here: the token is checked during
    the handshake (a refusal is HTTP with ``{"error": ...}``, as Supabase
    answers; a token naming a JWKS key not fetched yet waits for the
    refresh) and the socket goes to a :class:`HubSocket`.

    A REST bulk broadcast keeps uvicorn's request cycle (its keep-alive,
    pipelining and closing), but instead of a task running the ASGI app,
    :meth:`BroadcastApi.broadcast_now` answers it when its body is
    complete, with the same bytes the ASGI route would send (a test
    compares them).
    """

    #: A handshake's token check waiting for a JWKS refresh (a reference,
    #: so the task is not collected).
    _token_check: asyncio.Task[Principal] | None = None
    #: A REST broadcast to answer here once its body is complete.
    _waiting: RequestResponseCycle | None = None
    #: Shutdown came before this connection's first request: that request
    #: is still answered, then the connection closes.
    _last_request: bool = False
    #: A request began on this connection.
    _began: bool = False
    #: Closes a connection that shutdown found without a request, if none begins.
    _first_request_due: asyncio.TimerHandle | None = None

    def shutdown(self) -> None:
        """uvicorn closes at once every connection without a request in
        progress.  One that has not had its first request yet was accepted
        just before the listener closed, and its client may have sent the
        request already: a proxy (nginx) cannot retry a POST that the close
        cuts, and answers 502.  Such a connection gets its first request
        answered, with ``connection: close``; if none begins within
        :data:`FIRST_REQUEST_GRACE` seconds it is closed."""
        if self.cycle is not None:
            super().shutdown()
            return
        self._last_request = True
        if not self._began:
            self._first_request_due = self.loop.call_later(
                FIRST_REQUEST_GRACE, self.transport.close
            )

    def on_message_begin(self) -> None:
        self._began = True
        self._cancel_first_request_due()
        super().on_message_begin()

    def _cancel_first_request_due(self) -> None:
        if self._first_request_due is not None:
            self._first_request_due.cancel()
            self._first_request_due = None

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        if self._last_request and self.cycle is not None:
            self.cycle.keep_alive = False

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: ASGI3Application) -> None:
        """uvicorn starts a request's ASGI task here: when no earlier
        request is unanswered (so answers stay in order), or when the one
        before it is answered (a pipelined request).  A REST bulk broadcast
        is answered here instead, unless it is one the ASGI route must
        take: a body without a Content-Length or longer than the request
        limit (413), ``Expect: 100-continue``, over uvicorn's concurrency
        limit (``app`` is then its 503), or one that needs an await (see
        :meth:`BroadcastApi.broadcast_now`)."""
        api: BroadcastApi | None = self.app_state.get("broadcast")
        if api is not None and app is self.app and _may_answer(cycle, api):
            if cycle.more_body:
                self._waiting = cycle  # on_message_complete answers it
            else:
                # Pipelined behind a request the ASGI app answered: its
                # body is here.  Answered on the next loop turn, as the
                # task would run, not from inside the answer before it
                # (which would recurse once per request queued).
                self.loop.call_soon(self._broadcast_now, api, cycle)
            return
        super()._start_asgi_task(cycle, app)

    def on_body(self, body: bytes) -> None:
        super().on_body(body)
        if self._waiting is not None and self._waiting is self.cycle:
            # uvicorn stops reading past 64 KiB until the app asks for the
            # body; this one is read here, whole, bounded by its length.
            self.flow.resume_reading()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        cycle = self._waiting
        if cycle is not None and cycle is self.cycle:
            self._waiting = None
            self._broadcast_now(self.app_state["broadcast"], cycle)

    def connection_lost(self, exc: Exception | None) -> None:
        self._waiting = None
        self._cancel_first_request_due()
        super().connection_lost(exc)

    def _broadcast_now(self, api: BroadcastApi, cycle: RequestResponseCycle) -> None:
        if cycle.disconnected or self.transport.is_closing():
            # The client left, or asked to close after an earlier answer:
            # nothing is published (the ASGI route's body read would end
            # with a disconnect, and it would publish nothing either).
            return
        if self.flow.write_paused:
            # The client is not reading its answers: the ASGI route waits
            # for it to drain before answering.
            super()._start_asgi_task(cycle, self.app)
            return
        authorization, apikey = "", None
        for name, value in cycle.scope["headers"]:
            # The first of each, as Starlette's Headers.get reads them.
            if name == b"authorization" and not authorization:
                authorization = value.decode("latin-1")
            elif name == b"apikey" and apikey is None:
                apikey = value.decode("latin-1")
        try:
            refusal = api.broadcast_now(authorization, apikey, bytes(cycle.body))
        except MustAwait:
            super()._start_asgi_task(cycle, self.app)
            return
        except Exception:
            # What uvicorn does for an ASGI app that raises.
            log.exception("REST broadcast failed")
            _complete(cycle, self.transport, _INTERNAL_ERROR, keep_alive=False)
            return
        if refusal is None:
            _complete(cycle, self.transport, _ACCEPTED)
        else:
            body = orjson.dumps({"message": refusal.message})
            head = b"content-length: %d\r\ncontent-type: application/json\r\n" % len(body)
            _complete(cycle, self.transport, (refusal.status, head, body))

    def handle_websocket_upgrade(self) -> None:
        if self._last_request:
            # The node is shutting down: its WebSockets are being closed (1012).
            self.connections.discard(self)
            self._refuse(503, "Service Unavailable: the node is shutting down")
            return
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


#: An answer's status, its headers after uvicorn's defaults (each line
#: ending in CRLF), and its body: what Starlette's Response(status_code=202)
#: and uvicorn's 500 send.
_Answer = tuple[int, bytes, bytes]
_ACCEPTED: Final[_Answer] = (202, b"content-length: 0\r\n", b"")
_INTERNAL_ERROR: Final[_Answer] = (
    500,
    b"content-type: text/plain; charset=utf-8\r\ncontent-length: 21\r\n",
    b"Internal Server Error",
)


def _may_answer(cycle: RequestResponseCycle, api: BroadcastApi) -> bool:
    scope = cycle.scope
    if scope["method"] != "POST" or scope["path"] not in BROADCAST_PATHS:
        return False
    if cycle.waiting_for_100_continue:
        return False  # uvicorn sends the 100 when the app reads the body
    length = None
    for name, value in scope["headers"]:
        if name == b"content-length":
            length = value
        elif name == b"transfer-encoding":
            return False
    return length is not None and length.isdigit() and int(length) <= api.max_request_bytes


def _complete(
    cycle: RequestResponseCycle,
    transport: asyncio.Transport,
    answer: _Answer,
    keep_alive: bool = True,
) -> None:
    """Answer ``cycle`` and finish it as uvicorn's ``send`` does: the
    default headers (the date) first, ``connection: close`` when the
    connection does not stay open, then the next pipelined request."""
    status, head, body = answer
    keep_alive = keep_alive and cycle.keep_alive
    cycle.keep_alive = keep_alive
    lines = [STATUS_LINE[status]]
    for name, value in cycle.default_headers:
        lines += (name, b": ", value, b"\r\n")
    lines.append(head)
    if not keep_alive:
        lines.append(b"connection: close\r\n")
    lines += (b"\r\n", body)
    cycle.response_started = cycle.response_complete = True
    cycle.waiting_for_100_continue = False
    transport.write(b"".join(lines))
    cycle.message_event.set()
    if not keep_alive:
        transport.close()
    cycle.on_response()
