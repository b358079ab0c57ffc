"""HubHttpProtocol's REST broadcast: answered without the ASGI app, with
the bytes the ASGI route sends, in order on a keep-alive or pipelined
connection.

Each test runs real uvicorn servers on loopback in the test's loop: one
with :class:`HubHttpProtocol`, and for comparison one with uvicorn's own
httptools protocol, where every request goes through the ASGI route.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import orjson
import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from hub.app import create_app
from hub.auth.tokens import issue_token
from hub.cli import uvicorn_config
from hub.config import load_settings
from hub.node import Node
from hub.protocol import Broadcast
from tests.support.hubs import free_port

SECRET = "s" * 40
SERVICE = issue_token(SECRET, sub="app", role="service_role", ttl=600)
MEMBER = issue_token(SECRET, sub="u", orgs=["acme"], ttl=600)
PATH = "/realtime/v1/api/broadcast"
HEALTH = b"GET /healthz HTTP/1.1\r\nHost: hub\r\n\r\n"


@dataclass
class Served:
    """A running server: its port, what its ASGI app was asked, and what
    its node published."""

    port: int
    asgi_paths: list[str] = field(default_factory=list)
    published: list[Broadcast] = field(default_factory=list)


@asynccontextmanager
async def serve(protocol: type[HttpToolsProtocol] | None = None) -> AsyncIterator[Served]:
    settings = load_settings({"port": free_port()}, {"HUB_JWT_SECRET": SECRET})
    node = Node(settings)
    served = Served(settings.port)
    publish = node.channels.publish

    def recording_publish(broadcast: Broadcast) -> None:
        served.published.append(broadcast)
        publish(broadcast)

    node.channels.publish = recording_publish  # type: ignore[method-assign]
    app = create_app(node)

    async def counting_app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            served.asgi_paths.append(scope["path"])
        await app(scope, receive, send)

    config = uvicorn_config(counting_app, settings, loop="none")
    if protocol is not None:
        config.http = protocol
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    while not server.started:
        assert not task.done(), "the server did not start"
        await asyncio.sleep(0.01)
    try:
        yield served
    finally:
        server.should_exit = True
        await task


def post(body: bytes | dict[str, Any], *headers: str, version: str = "1.1") -> bytes:
    data = body if isinstance(body, bytes) else orjson.dumps(body)
    head = [f"POST {PATH} HTTP/{version}", "Host: hub", *headers, f"Content-Length: {len(data)}"]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + data


def bearer(token: str) -> str:
    return f"Authorization: Bearer {token}"


def messages(*topics: str, **extra: Any) -> dict[str, Any]:
    return {"messages": [{"topic": t, "event": "e", "payload": {"n": 1}, **extra} for t in topics]}


async def exchange(port: int, data: bytes, answers: int) -> tuple[list[bytes], bool]:
    """Send ``data``, read ``answers`` HTTP responses; and whether the
    server then closed the connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    out = []
    for _ in range(answers):
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        match = re.search(rb"content-length: (\d+)", head)
        body = await reader.readexactly(int(match[1])) if match else b""
        # The date changes by the second; everything else must not.
        out.append(re.sub(rb"date: [^\r]*\r\n", b"", head) + body)
    # Still open: another request is answered.  Closed: end of stream.
    try:
        writer.write(HEALTH)
        closed = not await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    except (asyncio.IncompleteReadError, ConnectionError):
        closed = True
    writer.close()
    return out, closed


#: Requests whose answers (and whether the connection stays) must be the
#: ASGI route's byte for byte: published, and each way of being refused.
REQUESTS: list[tuple[str, bytes]] = [
    ("published", post(messages("org:acme", "room"), bearer(SERVICE))),
    ("apikey header", post(messages("org:acme"), f"apikey: {MEMBER}")),
    ("no token", post(messages("org:acme"))),
    ("bad token", post(messages("org:acme"), bearer("not-a-jwt"))),
    ("other org", post(messages("org:acme", "org:other"), bearer(MEMBER))),
    ("not JSON", post(b"{nope", bearer(SERVICE))),
    ("no messages", post({"messages": []}, bearer(SERVICE))),
    ("too many", post(messages(*["room"] * 101), bearer(SERVICE))),
    ("bad private", post(messages("room", private="maybe"), bearer(SERVICE))),
    ("private, no policies", post(messages("room", private=True), bearer(MEMBER))),
    ("connection close", post(messages("room"), bearer(SERVICE), "Connection: close")),
    ("HTTP/1.0", post(messages("room"), bearer(SERVICE), version="1.0")),
]


async def test_answers_are_the_asgi_routes_and_no_asgi_app_runs() -> None:
    async with serve() as fast, serve(HttpToolsProtocol) as asgi:
        for name, request in REQUESTS:
            got = await exchange(fast.port, request, 1)
            want = await exchange(asgi.port, request, 1)
            assert got == want, name
        # (and the health check after each answer on a connection left open)
        assert set(fast.asgi_paths) == {"/healthz"}
        assert asgi.asgi_paths.count(PATH) == len(REQUESTS)
        assert [(b.topic, b.payload) for b in fast.published] == [
            (b.topic, b.payload) for b in asgi.published
        ]
        # published, apikey, connection close, HTTP/1.0
        assert len(fast.published) == 5


async def test_pipelined_requests_are_answered_in_order() -> None:
    """A broadcast behind a request the ASGI app serves waits for its
    answer; one in front of it is answered first."""
    publish = post(messages("room"), bearer(SERVICE))
    async with serve() as fast:
        answers, closed = await exchange(fast.port, publish + HEALTH + publish + publish, 4)
        assert [a.split(b"\r\n", 1)[0] for a in answers] == [
            b"HTTP/1.1 202 Accepted",
            b"HTTP/1.1 200 OK",
            b"HTTP/1.1 202 Accepted",
            b"HTTP/1.1 202 Accepted",
        ]
        assert answers[1].endswith(b"ok")
        assert not closed
        assert fast.asgi_paths == ["/healthz", "/healthz"]
        assert len(fast.published) == 3


async def test_many_broadcasts_pipelined_behind_an_asgi_request() -> None:
    """Requests queued behind one the ASGI app serves are started one by
    one as each answer completes; a broadcast among them is answered on
    the next loop turn, not from inside the answer before it (1,500 of
    them nested would pass Python's recursion limit)."""
    publish = post(messages("room"), bearer(SERVICE))
    async with serve() as fast:
        answers, closed = await exchange(fast.port, HEALTH + publish * 1500, 1501)
        assert answers[0].startswith(b"HTTP/1.1 200 OK")
        assert all(a.startswith(b"HTTP/1.1 202 Accepted") for a in answers[1:])
        assert not closed
        assert len(fast.published) == 1500


async def test_a_body_in_pieces_and_past_64_kib_is_read_whole() -> None:
    """uvicorn stops reading a body past 64 KiB until the app asks for it;
    here nothing asks, so the protocol reads on by itself."""
    big = {"messages": [{"topic": "room", "event": "e", "payload": {"b": "x" * 150_000}}]}
    request = post(big, bearer(SERVICE))
    async with serve() as fast:
        reader, writer = await asyncio.open_connection("127.0.0.1", fast.port)
        head, _, body = request.partition(b"\r\n\r\n")
        writer.write(head + b"\r\n\r\n" + body[:1000])
        await writer.drain()
        await asyncio.sleep(0.05)
        assert fast.published == []  # waiting for the rest
        writer.write(body[1000:])
        answer = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        writer.close()
        assert answer.startswith(b"HTTP/1.1 202 Accepted")
        assert len(fast.published) == 1 and len(fast.published[0].payload) > 150_000
        assert fast.asgi_paths == []


async def test_requests_the_asgi_route_must_take_go_there() -> None:
    """Chunked bodies, ``Expect: 100-continue`` and other methods are the
    ASGI route's, which answers them as it always did."""
    body = orjson.dumps(messages("room"))
    chunked = (
        f"POST {PATH} HTTP/1.1\r\nHost: hub\r\n{bearer(SERVICE)}\r\n"
        "Transfer-Encoding: chunked\r\n\r\n"
    ).encode() + b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    expect = post(messages("room"), bearer(SERVICE), "Expect: 100-continue")
    get = f"GET {PATH} HTTP/1.1\r\nHost: hub\r\n\r\n".encode()
    cases: list[tuple[bytes, int, Callable[[bytes], bool]]] = [
        (chunked, 1, lambda a: a.startswith(b"HTTP/1.1 202")),
        (expect, 2, lambda a: a.startswith(b"HTTP/1.1 202")),
        (get, 1, lambda a: a.startswith(b"HTTP/1.1 405")),
    ]
    async with serve() as fast:
        for request, answers, check in cases:
            got, _ = await exchange(fast.port, request, answers)
            assert check(got[-1]), got
        assert [p for p in fast.asgi_paths if p == PATH] == [PATH] * 3
        assert len(fast.published) == 2
