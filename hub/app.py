"""The ASGI application: routes, the WebSocket endpoint, and the lifespan.

:func:`create_app` builds a Starlette app around one :class:`Hub`, which
owns the node's shared state: token verifier, engine, channels, the live
sessions and the write flusher.  The lifespan's task group owns every
long-lived task.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import AsyncIterator, Coroutine
from contextlib import asynccontextmanager
from typing import Any

import anyio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

from hub.aggregator.mother import Mother
from hub.aggregator.routes import routes as mother_routes
from hub.api.broadcast import rest_broadcast, rest_broadcast_one
from hub.api.events import append_events, read_events
from hub.auth.principal import Principal
from hub.auth.tokens import JwksCache, KeyNotCached, TokenVerifier
from hub.channels.durable import DurableFeed, ReplayRequest
from hub.channels.registry import Channels, Subscription
from hub.config import Settings
from hub.engine.base import Engine
from hub.engine.memory import MemoryEngine
from hub.errors import AuthError, CloseCode
from hub.frames import Outbox
from hub.protocol import VERSIONS, VSN1, Vsn
from hub.quotas import Quotas
from hub.session import Session
from hub.stats import CONTENT_TYPE, HubCollector, Stats, render
from hub.store.base import EventStore
from hub.transport import AsgiOutbox, Flusher

log = logging.getLogger(__name__)

#: How often sessions are checked for expired tokens and idle sockets.
TICK_SECONDS = 1.0


class Hub:
    """The state one hub node shares between its connections."""

    def __init__(
        self,
        settings: Settings,
        engine: Engine | None = None,
        store: EventStore | None = None,
    ) -> None:
        self.settings = settings
        self.node_id = settings.node_id or "node"
        jwks = (
            JwksCache(settings.jwks_url, min_interval=settings.jwks_min_refresh)
            if settings.jwks_url
            else None
        )
        self.verifier = TokenVerifier(
            secret=settings.jwt_secret.encode() if settings.jwt_secret else None,
            jwks=jwks,
            orgs_claim=settings.orgs_claim_path,
            admin_claim=settings.admin_claim_path,
            audience=settings.jwt_audience,
        )
        self.engine = engine or _make_engine(settings, self.node_id)
        self.quotas = Quotas(settings.org_quota, settings.org_quota_overrides)
        self.engine.quotas = self.quotas
        self.stats = Stats()
        self.channels = Channels(self.engine, node_id=self.node_id + ".", stats=self.stats)
        self.store = store or _make_store(settings)
        self.durable = DurableFeed(self.channels, self.store, replay_max=settings.replay_max)
        self.stats.registry.register(HubCollector(self))
        self.mother = Mother(
            channels=self.channels,
            store=self.store,
            node_id=self.node_id,
            redis_url=settings.redis_url,
            redis_prefix=settings.redis_prefix,
            rate=settings.mother_rate,
        )
        self.channels.observers.append(self.mother)
        self.sessions: set[Session] = set()
        self._limits = settings.limits
        self._conn_ids = itertools.count(1)
        self._flusher: Flusher | None = None

    @property
    def flusher(self) -> Flusher:
        if self._flusher is None:
            self._flusher = Flusher(asyncio.get_running_loop(), self.stats)
            # Fan-out then writes each topic's sockets once per iteration.
            self.channels.schedule = self._flusher.mark
        return self._flusher

    def next_conn_id(self) -> str:
        return f"{self.node_id}-{next(self._conn_ids)}"

    # -- connections (shared by the ASGI endpoint and the fast path) --------

    def check_handshake(self, vsn: str, token: str) -> tuple[int, str] | None:
        """The refusal (HTTP status, message) for a bad vsn or a missing
        token, before any signature is checked; None when fine so far."""
        if vsn not in VERSIONS:
            return self.refuse_handshake(400, f"Unsupported vsn {vsn[:20]!r}")
        if not token:
            return self.refuse_handshake(401, "No apikey given")
        return None

    def refuse_handshake(self, status: int, message: str) -> tuple[int, str]:
        self.stats.connections_refused += 1
        log.info("handshake refused: %s", message)
        return status, message

    def open_session(self, principal: Principal, vsn: Vsn, outbox: Outbox) -> Session:
        session = Session(
            conn_id=self.next_conn_id(),
            vsn=vsn,
            principal=principal,
            verifier=self.verifier,
            channels=self.channels,
            outbox=outbox,
            limits=self._limits,
            stats=self.stats,
            quotas=self.quotas,
        )
        self.sessions.add(session)
        self.stats.connections_opened += 1
        self.channels.observe("connected", session.conn_id, principal)
        log.debug(
            "connection open conn=%s sub=%s role=%s vsn=%s",
            session.conn_id,
            principal.sub,
            principal.role,
            vsn,
        )
        return session

    def close_session(self, session: Session) -> None:
        self.sessions.discard(session)
        session.close()
        self.channels.observe("disconnected", session.conn_id, session.principal)
        log.debug(
            "connection closed conn=%s sub=%s code=%s frames_in=%d",
            session.conn_id,
            session.principal.sub,
            getattr(session.outbox, "close_code", None),
            session.frames_in,
        )

    def feed(self, session: Session, data: str | bytes) -> Coroutine[Any, Any, None] | None:
        """Hand one client frame to its session.

        Returns None when the frame is fully handled, or a coroutine the
        caller must run to completion before it feeds the next frame of this
        connection: a JWKS refresh and retry, or the replays a join asked
        for (so later frames act on a channel that is fully live).
        """
        try:
            session.receive(data)
        except KeyNotCached:
            return self._refresh_then_feed(session, data)
        except Exception:
            self._fail(session)
            return None
        replays = session.take_replays()
        return self._replay(replays) if replays else None

    async def _refresh_then_feed(self, session: Session, data: str | bytes) -> None:
        assert self.verifier.jwks is not None
        await self.verifier.jwks.refresh()
        try:
            session.receive(data, keys_refreshed=True)
        except Exception:
            self._fail(session)
            return
        await self._replay(session.take_replays())

    async def _replay(self, replays: list[tuple[Subscription, ReplayRequest]]) -> None:
        for sub, request in replays:
            await self.durable.replay(sub, request)

    def _fail(self, session: Session) -> None:
        # Unexpected: drop this connection (1011), keep the process.
        log.exception("connection %s failed", session.conn_id)
        session.outbox.close(CloseCode.INTERNAL_ERROR, "internal error")

    async def start(self) -> None:
        if self.verifier.jwks is not None:
            await self.verifier.jwks.load()
        await self.store.start()
        await self.engine.start()

    async def stop(self) -> None:
        await self.engine.stop()
        await self.store.stop()

    async def tick_forever(self) -> None:
        while True:
            await anyio.sleep(TICK_SECONDS)
            now = time.time()
            for session in list(self.sessions):
                session.tick(now)


def _make_engine(settings: Settings, node_id: str) -> Engine:
    if settings.redis_url:
        from hub.engine.redis import RedisEngine

        return RedisEngine(
            settings.redis_url,
            node_id=node_id,
            prefix=settings.redis_prefix,
            sharded=settings.redis_sharded,
            node_timeout=settings.node_timeout,
        )
    return MemoryEngine()


def _make_store(settings: Settings) -> EventStore:
    if settings.database_url:
        from hub.store.postgres import PostgresStore

        return PostgresStore(settings.database_url)
    from hub.store.memory import MemoryStore

    return MemoryStore(max_events_per_org=settings.memory_events_per_org)


def _deny(status: int, message: str) -> JSONResponse:
    # Supabase answers a refused handshake with HTTP and {"error": ...}.
    return JSONResponse({"error": message}, status_code=status)


async def realtime_socket(websocket: WebSocket) -> None:
    """The WebSocket endpoint as an ASGI app: the path taken when the server
    does not run :class:`~hub.transport.HubHttpProtocol`'s fast path
    (another ASGI server, or Starlette's TestClient)."""
    hub: Hub = websocket.app.state.hub
    params = websocket.query_params
    vsn = params.get("vsn", VSN1)
    token = params.get("apikey", "")
    refusal = hub.check_handshake(vsn, token)
    principal: Principal | None = None
    if refusal is None:
        try:
            principal = await hub.verifier.verify_async(token)
        except AuthError as exc:
            refusal = hub.refuse_handshake(401, exc.message)
    if refusal is not None or principal is None:
        assert refusal is not None
        await websocket.send_denial_response(_deny(*refusal))
        return
    await websocket.accept()
    writer = AsgiOutbox(websocket.send, hub.settings.max_outbox_bytes, hub.stats)
    session = hub.open_session(principal, vsn, writer)  # type: ignore[arg-type]
    try:
        async with anyio.create_task_group() as tg:

            async def write_then_stop() -> None:
                await writer.run()
                tg.cancel_scope.cancel()

            tg.start_soon(write_then_stop)
            await _read_loop(hub, session, websocket)
            writer.close(1000)
    finally:
        hub.close_session(session)


async def _read_loop(hub: Hub, session: Session, websocket: WebSocket) -> None:
    receive = websocket.receive
    outbox = session.outbox
    while not outbox.closed:
        message = await receive()
        if message["type"] == "websocket.disconnect":
            return
        data: Any = message.get("text")
        if data is None:
            data = message.get("bytes") or b""
        pending = hub.feed(session, data)
        if pending is not None:
            await pending


async def healthz(request: Request) -> Response:
    return PlainTextResponse("ok")


async def readyz(request: Request) -> Response:
    """200 when this node's engine and store links are up, else 503: a load
    balancer should stop sending clients to a node that is deaf."""
    hub: Hub = request.app.state.hub
    checks = {"engine": hub.engine.ready, "store": hub.store.ready}
    return JSONResponse(checks, status_code=200 if all(checks.values()) else 503)


async def metrics(request: Request) -> Response:
    hub: Hub = request.app.state.hub
    return Response(render(hub.stats), media_type=CONTENT_TYPE)


def create_app(
    settings: Settings, engine: Engine | None = None, store: EventStore | None = None
) -> Starlette:
    """Build the hub's ASGI app for ``settings``."""
    hub = Hub(settings, engine, store)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
        await hub.start()
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(hub.tick_forever)
                tg.start_soon(hub.mother.run)
                # Lifespan state reaches uvicorn's protocols as app_state:
                # that is how HubHttpProtocol finds the hub.
                yield {"hub": hub}
                tg.cancel_scope.cancel()
        finally:
            await hub.stop()

    app = Starlette(
        routes=[
            WebSocketRoute("/realtime/v1/websocket", realtime_socket),
            Route("/realtime/v1/api/broadcast", rest_broadcast, methods=["POST"]),
            Route("/api/broadcast", rest_broadcast, methods=["POST"]),
            Route(
                "/realtime/v1/api/broadcast/{topic}/events/{event}",
                rest_broadcast_one,
                methods=["POST"],
            ),
            Route("/api/orgs/{org}/events", append_events, methods=["POST"]),
            Route("/api/orgs/{org}/events", read_events, methods=["GET"]),
            Route("/healthz", healthz, methods=["GET"]),
            Route("/readyz", readyz, methods=["GET"]),
            Route("/metrics", metrics, methods=["GET"]),
            *mother_routes(),
        ],
        lifespan=lifespan,
    )
    app.state.hub = hub
    return app
