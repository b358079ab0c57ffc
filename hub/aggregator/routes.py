"""HTTP routes of the command center: the stats API and the dashboard.

* ``GET /api/mother/stats``: the mother's snapshot (docs/mother.md) as JSON,
  for an admin's bearer token (``service_role`` or the admin claim); 401
  without a valid token, 403 for anyone else.
* ``GET /dashboard``: the page; its scripts and styles are under
  ``/dashboard/static/``.  The page itself is public: it holds no data and
  asks for an admin token, which it sends only to this hub.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Final

import orjson
from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from hub.api.common import Rejected, authenticate, error_response

if TYPE_CHECKING:
    from hub.app import Hub

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


async def mother_stats(request: Request) -> Response:
    hub: Hub = request.app.state.hub
    try:
        principal = await authenticate(request, hub)
        if not principal.is_admin:
            raise Rejected(403, "Forbidden: the network stats are for admins")
    except Rejected as rejected:
        return error_response(rejected.status, rejected.message)
    return Response(
        orjson.dumps(hub.mother.snapshot()),
        media_type="application/json",
        headers={"Cache-Control": "no-store"},
    )


async def dashboard(request: Request) -> Response:
    return FileResponse(DASHBOARD_DIR / "index.html", headers=_PAGE_HEADERS)


def routes() -> list[BaseRoute]:
    """The routes to add to the hub's app."""
    return [
        Route("/api/mother/stats", mother_stats, methods=["GET"]),
        Route("/dashboard", dashboard, methods=["GET"]),
        Mount("/dashboard/static", StaticFiles(directory=DASHBOARD_DIR), name="dashboard"),
    ]
