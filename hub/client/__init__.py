"""Clients of the hub.

* :mod:`hub.client.rest`: ``HubClient``, an async client of the REST API,
  for app servers.
* :mod:`hub.client.realtime`: a raw Supabase Realtime (Phoenix) WebSocket
  client, asyncio and synchronous, for tests and load generators.
"""

from hub.client.rest import HubClient, HubClientError

__all__ = ["HubClient", "HubClientError"]
