"""HTTP routes of the command center: the stats API and the dashboard.

* ``GET /api/mother/stats``: the mother's snapshot (docs/mother.md) as JSON,
  for an admin's bearer token (``service_role`` or the admin claim); 401
  without a valid token, 403 for anyone else.
* ``GET /api/mother/history?range=24h|7d|30d[&org=ORG][&format=csv]``: the
  network's history over that range (:mod:`hub.aggregator.history`), same
  auth; as CSV, the per-org table the dashboard shows.
* ``GET /api/mother/projections``: each projection's lag and its stopped
  orgs with their errors (docs/projections.md), same auth; ``projections``
  is null without a database.
* ``GET /dashboard``: the page; its scripts and styles are under
  ``/dashboard/static/``.  The page itself is public: it holds no data and
  asks for an admin token, which it sends only to this hub.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Final

import asyncpg  # type: ignore[import-untyped, unused-ignore]
import orjson
from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from hub.aggregator.history import History, UnknownRange
from hub.aggregator.mother import Mother
from hub.api.common import Rejected, authenticate, error_response
from hub.auth.tokens import TokenVerifier

log = logging.getLogger(__name__)

#: Where index.html, style.css and app.js live (package data).
DASHBOARD_DIR: Final = Path(__file__).resolve().parent.parent / "dashboard"

#: The page loads only its own files and talks only to this origin.
_PAGE_HEADERS: Final = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}


class MotherApi:
    """The command center's routes, with what they use: the token check and
    the mother aggregator."""

    def __init__(self, *, verifier: TokenVerifier, mother: Mother, history: History) -> None:
        self.verifier = verifier
        self.mother = mother
        self.history = history

    def routes(self) -> list[BaseRoute]:
        return [
            Route("/api/mother/stats", self.stats, methods=["GET"]),
            Route("/api/mother/history", self.history_view, methods=["GET"]),
            Route("/api/mother/projections", self.projections, methods=["GET"]),
            Route("/dashboard", dashboard, methods=["GET"]),
            Mount("/dashboard/static", StaticFiles(directory=DASHBOARD_DIR), name="dashboard"),
        ]

    async def _admin(self, request: Request) -> Response | None:
        """None for an admin's request, else the refusal to send."""
        try:
            principal = await authenticate(request, self.verifier)
            if not principal.is_admin:
                raise Rejected(403, "Forbidden: the network stats are for admins")
        except Rejected as rejected:
            return error_response(rejected.status, rejected.message)
        return None

    async def history_view(self, request: Request) -> Response:
        refused = await self._admin(request)
        if refused is not None:
            return refused
        params = request.query_params
        org = params.get("org") or None
        fmt = params.get("format", "json")
        if fmt not in ("json", "csv"):
            return error_response(422, "format must be json or csv")
        try:
            view = await self.history.view(params.get("range", "24h"), org)
        except UnknownRange as exc:
            return error_response(422, str(exc))
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            log.warning("history unavailable: %r", exc)
            return error_response(503, "the history is unavailable: the database did not answer")
        if fmt == "csv":
            return Response(
                view.csv(),
                media_type="text/csv; charset=utf-8",
                headers={
                    "Cache-Control": "no-store",
                    "Content-Disposition": f'attachment; filename="hub-history-{view.range}.csv"',
                },
            )
        return Response(
            orjson.dumps(view.as_json()),
            media_type="application/json",
            headers={"Cache-Control": "no-store"},
        )

    async def projections(self, request: Request) -> Response:
        refused = await self._admin(request)
        if refused is not None:
            return refused
        try:
            state = await self.history.projections()
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            log.warning("projections unavailable: %r", exc)
            return error_response(
                503, "the projections are unavailable: the database did not answer"
            )
        return Response(
            orjson.dumps(state or {"projections": None, "stopped": []}),
            media_type="application/json",
            headers={"Cache-Control": "no-store"},
        )

    async def stats(self, request: Request) -> Response:
        refused = await self._admin(request)
        if refused is not None:
            return refused
        return Response(
            orjson.dumps(self.mother.snapshot()),
            media_type="application/json",
            headers={"Cache-Control": "no-store"},
        )


async def dashboard(request: Request) -> Response:
    return FileResponse(DASHBOARD_DIR / "index.html", headers=_PAGE_HEADERS)
