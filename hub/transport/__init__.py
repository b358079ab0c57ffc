"""Socket I/O for ``/realtime/v1/websocket``, outside ASGI.

* :mod:`hub.transport.http`: :class:`HubHttpProtocol`, uvicorn's httptools
  protocol plus the realtime path's handshake;
* :mod:`hub.transport.socket`: :class:`HubSocket`, one client WebSocket:
  frames in, to its session;
* :mod:`hub.transport.outbox`: :class:`SocketOutbox`, frames out, bounded.

The frames are parsed by :mod:`hub.websocket` (sans-I/O); a connection meets
the rest of the node only through :class:`hub.gateway.Gateway`.
"""
