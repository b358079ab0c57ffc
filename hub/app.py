"""The HTTP side of a node: the ASGI app, its routes and its lifespan.

:func:`create_app` builds the Starlette app from a :class:`~hub.node.Node`'s
parts: each route group gets only what it uses.  ``/realtime/v1/websocket``
is not among the routes: :class:`hub.transport.http.HubHttpProtocol` serves
it before ASGI, and finds the node's :class:`~hub.gateway.Gateway` in the
lifespan state (uvicorn hands it to every protocol as ``app_state``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from hub.aggregator.routes import MotherApi
from hub.api.broadcast import BroadcastApi
from hub.api.events import EventsApi
from hub.metrics import CONTENT_TYPE, render
from hub.node import Node


def create_app(node: Node) -> Starlette:
    """The hub's ASGI app for ``node``; its lifespan runs the node."""
    settings = node.settings

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
        async with node.running():
            # Lifespan state reaches uvicorn's protocols as app_state: that
            # is how HubHttpProtocol finds the gateway and the REST
            # broadcast it serves itself.
            yield {"gateway": node.gateway, "broadcast": broadcast}

    async def healthz(request: Request) -> Response:
        return PlainTextResponse("ok")

    async def readyz(request: Request) -> Response:
        """200 when this node's engine and store links are up, else 503: a
        load balancer should stop sending clients to a node that is deaf."""
        checks = {"engine": node.engine.ready, "store": node.store.ready}
        status = 200 if all(checks.values()) else 503
        # A tenant database that is unwell harms only its orgs: named here,
        # it does not take the node out of the pool.
        databases = {d.name: d.ready for d in node.store.databases()}
        return JSONResponse({**checks, "databases": databases} if databases else checks, status)

    async def metrics(request: Request) -> Response:
        return Response(render(node.metrics), media_type=CONTENT_TYPE)

    broadcast = BroadcastApi(
        verifier=node.verifier,
        channels=node.channels,
        quotas=node.quotas,
        max_payload_bytes=settings.max_payload_bytes,
        max_request_bytes=settings.max_request_bytes,
        policies=node.policies,
    )
    events = EventsApi(
        verifier=node.verifier,
        store=node.store,
        max_payload_bytes=settings.max_payload_bytes,
        max_request_bytes=settings.max_request_bytes,
    )
    mother = MotherApi(verifier=node.verifier, mother=node.mother, history=node.history)
    return Starlette(
        routes=[
            *broadcast.routes(),
            *events.routes(),
            Route("/healthz", healthz, methods=["GET"]),
            Route("/readyz", readyz, methods=["GET"]),
            Route("/metrics", metrics, methods=["GET"]),
            *mother.routes(),
        ],
        lifespan=lifespan,
    )
