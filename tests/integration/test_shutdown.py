"""A node's shutdown and the HTTP connections it accepted just before it:
a request already on its way is answered, not cut (a proxy cannot retry a
POST that a close cuts: nginx answers 502)."""

from __future__ import annotations

import asyncio
import signal

import orjson

from tests.support.cluster import Cluster, T, wait_until


async def _refused(port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return True
    writer.close()
    return False


async def test_a_connection_accepted_before_shutdown_gets_its_first_request_answered(
    cluster: Cluster,
) -> None:
    (hub,) = await cluster.start(1, HUB_DRAIN_TIMEOUT="5")
    # Accepted by the node, its request not sent yet: a proxy's connection
    # racing the node's SIGTERM.
    reader, writer = await asyncio.open_connection("127.0.0.1", hub.port)
    idle_reader, idle_writer = await asyncio.open_connection("127.0.0.1", hub.port)
    ws_reader, ws_writer = await asyncio.open_connection("127.0.0.1", hub.port)
    await asyncio.sleep(0.2)  # the node's loop accepts them
    hub.process.send_signal(signal.SIGTERM)
    # The listener is closed, and with it every connection was told to shut down.
    await wait_until(lambda: _refused(hub.port), T, "the listener to close", every=0.02)

    body = orjson.dumps({"messages": [{"topic": "t", "event": "e", "payload": {}}]})
    writer.write(
        b"POST /api/broadcast HTTP/1.1\r\nHost: hub\r\nContent-Type: application/json\r\n"
        b"Authorization: Bearer " + hub.admin_token().encode() + b"\r\n"
        b"Content-Length: %d\r\n\r\n" % len(body) + body
    )
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), T)
    assert head.startswith(b"HTTP/1.1 202"), head
    assert b"connection: close" in head.lower()
    assert await asyncio.wait_for(reader.read(), T) == b"", "closed after its answer"
    writer.close()

    # A WebSocket upgrade is refused: the node has closed its sockets (1012).
    ws_writer.write(
        b"GET /realtime/v1/websocket?vsn=1.0.0&apikey="
        + hub.token(orgs=["o"]).encode()
        + b" HTTP/1.1\r\nHost: hub\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    head = await asyncio.wait_for(ws_reader.readuntil(b"\r\n\r\n"), T)
    assert head.startswith(b"HTTP/1.1 503"), head
    ws_writer.close()

    # One that sends nothing is closed after the grace, not held to the end.
    assert await asyncio.wait_for(idle_reader.read(), T) == b""
    idle_writer.close()
