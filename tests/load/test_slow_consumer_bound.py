"""One client that stops reading must not slow the others down, and must not
make the hub's memory grow without bound.

Setup: a hub with ``HUB_MAX_OUTBOX_BYTES`` = 1 MiB; ten subscribers that
read promptly; one publisher sending 16 KB broadcasts at 100/s, each carrying
its send time.  Phase A measures the subscribers' delivery latency alone;
phase B adds one raw client that joins and then never reads (4 KiB receive
buffer) and runs until the hub has cut it, plus two seconds.

The documented bounds (also stated in docs/reliability.md):

* every prompt subscriber receives every broadcast of both phases, in order;
* their p99 latency in phase B is at most ``max(3 x p99(A), p99(A) + 50 ms)``
  and never above 250 ms;
* the slow client is closed as a slow consumer (``hub_slow_consumer_closes``
  is 1 on /metrics: close code 4001) within 15 s;
* the hub's RSS during phase B stays within 48 MiB of its RSS at the start
  of phase B (1 MiB of outbox, the kernel's socket buffers, and slack).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import socket
import time
import uuid
from typing import Any

import httpx
import psutil
from websockets.asyncio.client import ClientConnection, connect

from tests.support.hubs import HubProcess
from tests.support.rawframes import client_frame

SUBSCRIBERS = 10
RATE = 100  # broadcasts per second
PAD = "x" * 16_000
PHASE_A = 3.0
MAX_OUTBOX = 1 << 20
RSS_SLACK = 48 << 20


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


async def slow_client(hub: HubProcess, token: str, topic: str) -> socket.socket:
    """A hand-made WebSocket client with a tiny receive buffer that joins
    ``topic`` and then never reads again."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.wait_for(loop.sock_connect(sock, ("127.0.0.1", hub.port)), 5)
    key = base64.b64encode(os.urandom(16)).decode()
    request = (
        f"GET /realtime/v1/websocket?apikey={token}&vsn=1.0.0 HTTP/1.1\r\n"
        f"Host: 127.0.0.1:{hub.port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    await loop.sock_sendall(sock, request.encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = await asyncio.wait_for(loop.sock_recv(sock, 1), 5)
        assert chunk, "closed during the handshake"
        head += chunk
    assert head.startswith(b"HTTP/1.1 101"), head
    join = {"topic": topic, "event": "phx_join", "payload": {}, "ref": "1", "join_ref": "1"}
    await loop.sock_sendall(sock, client_frame(1, json.dumps(join).encode()))
    return sock


async def metric(http: httpx.AsyncClient, name: str) -> float:
    text = (await http.get("/metrics")).text
    match = re.search(rf"^{name}\{{[^}}]*\}} ([0-9.e+-]+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


async def test_slow_consumer_does_not_slow_the_others(make_hub: Any) -> None:
    hub: HubProcess = make_hub(
        {
            "HUB_MAX_OUTBOX_BYTES": str(MAX_OUTBOX),
            "HUB_MAX_FRAME_BYTES": "262144",
            "HUB_MAX_PAYLOAD_BYTES": "131072",
            "HUB_LOG_LEVEL": "warning",
        }
    )
    process = psutil.Process(hub.process.pid)
    org = "slow" + uuid.uuid4().hex[:8]
    topic = f"realtime:org:{org}"
    token = hub.token(orgs=[org])
    url = f"{hub.ws_url}?apikey={token}"

    subscribers: list[ClientConnection] = []
    for i in range(SUBSCRIBERS):
        ws = await connect(f"{url}&vsn={'2.0.0' if i % 2 else '1.0.0'}", max_size=None)
        frame: Any = {"topic": topic, "event": "phx_join", "payload": {}, "ref": "1"}
        if i % 2:
            frame = ["1", "1", topic, "phx_join", {}]
        await ws.send(json.dumps(frame))
        reply = json.loads(await asyncio.wait_for(ws.recv(), 5))
        assert "ok" in json.dumps(reply), reply
        subscribers.append(ws)
    publisher = await connect(f"{url}&vsn=1.0.0", max_size=None)
    await publisher.send(
        json.dumps(
            {"topic": topic, "event": "phx_join", "payload": {}, "ref": "1", "join_ref": "1"}
        )
    )
    await asyncio.wait_for(publisher.recv(), 5)

    #: per subscriber: (sequence number, latency in seconds)
    received: list[list[tuple[int, float]]] = [[] for _ in subscribers]

    async def read(index: int, ws: ClientConnection) -> None:
        while True:
            data = await ws.recv()
            now = time.time()
            if isinstance(data, bytes):  # kind 4: the payload follows the header
                topic_len, event_len, meta_len = data[1], data[2], data[3]
                body = json.loads(data[5 + topic_len + event_len + meta_len :])
            else:
                value = json.loads(data)
                if isinstance(value, list):  # vsn 2.0.0 text: a reply or a push
                    continue
                if value.get("event") != "broadcast":
                    continue
                body = value["payload"]["payload"]
            received[index].append((body["i"], now - body["t"]))

    readers = [asyncio.create_task(read(i, ws)) for i, ws in enumerate(subscribers)]
    sent = 0

    async def publish(until: float) -> None:
        nonlocal sent
        start, first = time.monotonic(), sent
        while time.monotonic() < until:
            body = {"type": "broadcast", "event": "load", "payload": {}}
            body["payload"] = {"i": sent, "t": time.time(), "pad": PAD}
            frame = {"topic": topic, "event": "broadcast", "payload": body, "ref": None}
            frame["join_ref"] = "1"
            await publisher.send(json.dumps(frame))
            sent += 1
            await asyncio.sleep(max(0.0, start + (sent - first) / RATE - time.monotonic()))

    async with httpx.AsyncClient(base_url=hub.http_url, timeout=5) as http:
        try:
            await publish(time.monotonic() + PHASE_A)
            await asyncio.sleep(0.5)
            phase_a = [lat for sub in received for _, lat in sub]
            sent_a = sent
            rss_start = process.memory_info().rss

            slow = await slow_client(hub, token, topic)
            rss_peak = rss_start
            cut_after: float | None = None
            started = time.monotonic()
            stop_at = started + 15
            while time.monotonic() < stop_at:
                await publish(time.monotonic() + 0.25)
                rss_peak = max(rss_peak, process.memory_info().rss)
                if cut_after is None and await metric(http, "hub_slow_consumer_closes_total") >= 1:
                    cut_after = time.monotonic() - started
                    stop_at = min(stop_at, time.monotonic() + 2)
            await asyncio.sleep(0.5)
            slow.close()
            closes = await metric(http, "hub_slow_consumer_closes_total")
        finally:
            for task in readers:
                task.cancel()
            await asyncio.gather(*readers, return_exceptions=True)
            for ws in [*subscribers, publisher]:
                await ws.close()

    phase_b = [lat for sub in received for seq, lat in sub if seq >= sent_a]
    for index, sub in enumerate(received):
        assert [seq for seq, _ in sub] == list(range(sent)), f"subscriber {index} lost messages"
    base, loaded = p99(phase_a), p99(phase_b)
    report = (
        f"p99 alone {base * 1000:.1f} ms, with a slow consumer {loaded * 1000:.1f} ms; "
        f"cut after {cut_after} s; RSS {rss_start >> 20} -> peak {rss_peak >> 20} MiB"
    )
    print(report)
    assert closes == 1 and cut_after is not None, report
    assert loaded <= max(3 * base, base + 0.050), report
    assert loaded <= 0.250, report
    assert rss_peak - rss_start <= RSS_SLACK, report
    assert "Traceback" not in hub.log()
