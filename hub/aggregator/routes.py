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
from typing import Final

import orjson
from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from hub.aggregator.mother import Mother
from hub.api.common import Rejected, authenticate, error_response
from hub.auth.tokens import TokenVerifier

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

    def __init__(self, *, verifier: TokenVerifier, mother: Mother) -> None:
        self.verifier = verifier
        self.mother = mother

    def routes(self) -> list[BaseRoute]:
        return [
            Route("/api/mother/stats", self.stats, methods=["GET"]),
            Route("/dashboard", dashboard, methods=["GET"]),
            Mount("/dashboard/static", StaticFiles(directory=DASHBOARD_DIR), name="dashboard"),
        ]

    async def stats(self, request: Request) -> Response:
        try:
            principal = await authenticate(request, self.verifier)
            if not principal.is_admin:
                raise Rejected(403, "Forbidden: the network stats are for admins")
        except Rejected as rejected:
            return error_response(rejected.status, rejected.message)
        return Response(
            orjson.dumps(self.mother.snapshot()),
            media_type="application/json",
            headers={"Cache-Control": "no-store"},
        )


async def dashboard(request: Request) -> Response:
    return FileResponse(DASHBOARD_DIR / "index.html", headers=_PAGE_HEADERS)
