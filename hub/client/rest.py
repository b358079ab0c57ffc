"""A small async client for the hub's REST API, for app servers.

    async with HubClient("http://127.0.0.1:4000", token) as hub:
        stored = await hub.publish("42", "order.created", {"id": 7})
        history = await hub.history("42", after=0)

The token is a Supabase JWT: ``service_role`` (any org) or a member's.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import TracebackType
from typing import Any

import httpx

from hub.errors import HubError


class HubClientError(HubError):
    """The hub refused a request; ``status`` is the HTTP status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message


class HubClient:
    def __init__(self, base_url: str, token: str, *, timeout: float = 10.0) -> None:
        self._http = httpx.AsyncClient(
            base_url=base_url.rstrip("/"),
            headers={"Authorization": f"Bearer {token}"},
            timeout=timeout,
        )

    async def __aenter__(self) -> HubClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        response = await self._http.request(method, path, **kwargs)
        if response.status_code >= 400:
            try:
                message = response.json().get("message", response.text)
            except ValueError:
                message = response.text
            raise HubClientError(response.status_code, str(message))
        return response.json() if response.content else None

    async def publish(self, org: str, type: str, payload: Any) -> dict[str, Any]:
        """Append one durable event to ``org``; returns ``{"seq", "id"}``."""
        body = await self._call(
            "POST", f"/api/orgs/{org}/events", json={"type": type, "payload": payload}
        )
        result: dict[str, Any] = body["events"][0]
        return result

    async def publish_many(
        self, org: str, events: Sequence[tuple[str, Any]]
    ) -> list[dict[str, Any]]:
        """Append several events atomically, in order."""
        body = [{"type": kind, "payload": payload} for kind, payload in events]
        result: list[dict[str, Any]] = (
            await self._call("POST", f"/api/orgs/{org}/events", json=body)
        )["events"]
        return result

    async def history(self, org: str, *, after: int = 0, limit: int = 100) -> list[dict[str, Any]]:
        """Events of ``org`` with seq > ``after``, oldest first."""
        body = await self._call(
            "GET", f"/api/orgs/{org}/events", params={"after": after, "limit": limit}
        )
        result: list[dict[str, Any]] = body["events"]
        return result

    async def broadcast(self, topic: str, event: str, payload: Any) -> None:
        """An ephemeral broadcast (not stored) to ``topic``, e.g. ``org:42``."""
        message = {"topic": topic, "event": event, "payload": payload}
        await self._call("POST", "/realtime/v1/api/broadcast", json={"messages": [message]})
