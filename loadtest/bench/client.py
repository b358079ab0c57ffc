"""The lean load client: many WebSocket connections in one process.

In the spirit of ../shared/probes/rawclient.py: frames are counted by their
header only, and every ``sample``-th counted frame is searched for a
``"t":<ns>`` send timestamp (within its first ``SCAN`` bytes) to sample
publish-to-receive latency.  On top of the probe it speaks just enough of
each server's protocol to join a topic/room:

* ``phx``: Supabase Realtime vsn 2.0.0.  After the upgrade it sends the
  ``phx_join`` text frame (a JSON array, masked as every client frame must
  be), waits for the ``ok`` reply, and from then on counts binary frames
  (the hub sends broadcasts to vsn 2 clients as kind 4 binary frames; the
  replies, ``presence_state`` and heartbeats are text and are not counted).
  Sends the Phoenix heartbeat every 25 s so idle sockets stay open.
* ``sio``: Socket.IO 5 over Engine.IO 4, websocket transport only: waits
  for the open packet, connects the default namespace (``40``), emits
  ``join`` with an ack id and waits for the ack; counts text frames longer
  than one byte; answers Engine.IO pings (``2``) with pongs (``3``).
* ``plain``: the small peer servers of this package: the room is in the
  URL path, the server subscribes, then sends one text frame as the join
  ack; every later text frame is counted.

Run by the harness as ``python -m loadtest.bench.client SPEC.json``.  The
spec names the connections to open; the process talks to the harness on
stdin/stdout with one JSON object per line:

* it prints ``{"ev": "ready", ...}`` once every connection is joined (or
  failed); with ``"defer_join": true`` in the spec it first prints
  ``{"ev": "connected", ...}`` once every connection is upgraded, waits for
  a ``join`` line, joins them (``concurrency`` in flight, ``"private"``
  from the spec in the join's config) and then prints ``ready`` with each
  join's round trip in ms (``join_ms``); then ``{"ev": "n", "n": COUNT,
  "a": ACTIVE}`` every 20 ms while the count moves (ACTIVE: connections
  that have received something);
* it obeys ``reset`` (zero the counters and samples), ``sample K``,
  ``stats`` (answers ``{"ev": "stats", ...}`` with counters, latency
  samples and its own CPU seconds) and ``quit`` (resets every socket with
  SO_LINGER 0, so no TIME_WAIT eats the ephemeral ports, and exits).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import re
import resource
import socket
import struct
import sys
import time

import orjson
import uvloop

#: Bytes of a frame's payload searched for the timestamp.  A hub kind 4
#: frame has its topic, event and meta (a durable event's id and seq)
#: before the payload JSON, about 90 bytes.
SCAN = 200
_TS = re.compile(rb'"t":\s*(\d{1,20})')
HEARTBEAT_SECONDS = 25.0


def mask_frame(payload: bytes, opcode: int = 0x1) -> bytes:
    """A client frame: FIN, ``opcode``, masked with a random key."""
    key = os.urandom(4)
    n = len(payload)
    if n < 126:
        head = bytes((0x80 | opcode, 0x80 | n))
    elif n < 65536:
        head = bytes((0x80 | opcode, 0x80 | 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((0x80 | opcode, 0x80 | 127)) + n.to_bytes(8, "big")
    stream = (key * (n // 4 + 1))[:n]
    body = (int.from_bytes(payload, "big") ^ int.from_bytes(stream, "big")).to_bytes(n, "big")
    return head + key + body


class Shared:
    """Per-process counters (one object, so the hot loop touches one name)."""

    __slots__ = ("count", "active", "sample", "lat", "closed", "close_codes", "errors")

    def __init__(self, sample: int) -> None:
        self.count = 0
        #: Connections that have received at least one counted frame.
        self.active = 0
        self.sample = sample
        self.lat: list[float] = []
        self.closed = 0
        self.close_codes: dict[int, int] = {}
        self.errors: dict[str, int] = {}


class Conn(asyncio.Protocol):
    def __init__(
        self,
        shared: Shared,
        proto: str,
        host: str,
        path: str,
        room: str,
        token: str | None,
        join_token: bool,
        private: bool = False,
        defer_join: bool = False,
    ) -> None:
        self.st = shared
        self.proto = proto
        self.buf = bytearray()
        self.state = 0  # 0 handshake, 1 joining, 2 ready, 3 closed
        self.count = 0
        self.room = room
        self.url = ""
        self.token = token
        self.join_token = join_token
        self.private = private
        self.t: asyncio.Transport | None = None
        key = base64.b64encode(os.urandom(16)).decode()
        self.req = (
            f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
        loop = asyncio.get_running_loop()
        self.ready: asyncio.Future[bool] = loop.create_future()
        #: With ``defer_join``: set once upgraded; the join waits for :meth:`join`.
        self.upgraded: asyncio.Future[bool] | None = loop.create_future() if defer_join else None
        # the byte that starts a counted frame: FIN + binary (phx) or text
        self.want = 0x82 if proto == "phx" else 0x81

    # -- plumbing ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.t = transport  # type: ignore[assignment]
        transport.write(self.req)  # type: ignore[attr-defined]

    def connection_lost(self, exc: Exception | None) -> None:
        if self.state != 3:
            self.state = 3
            self.st.closed += 1
        self._set_error(ConnectionError(f"lost while joining: {exc!r}"))

    def _set_error(self, exc: Exception) -> None:
        if self.upgraded is not None and not self.upgraded.done():
            self.upgraded.set_exception(exc)
            # Nobody awaits ``ready`` before the upgrade: do not leave an
            # unretrieved exception behind.
            self.ready.cancel()
        elif not self.ready.done():
            self.ready.set_exception(exc)

    def fail(self, why: str) -> None:
        self._set_error(ConnectionError(why))
        if self.t is not None:
            self.t.abort()

    def send_text(self, text: bytes) -> None:
        assert self.t is not None
        self.t.write(mask_frame(text))

    def reset(self) -> None:
        """Close with RST: no TIME_WAIT left on this side."""
        t = self.t
        if t is None or t.is_closing():
            return
        sock = t.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        t.abort()

    # -- joining (few frames, full parsing) ------------------------------------

    def join(self) -> None:
        """Send the join of a ``defer_join`` connection (upgraded by now)."""
        if self.state == 1:
            self._join()

    def _join(self) -> None:
        if self.proto == "phx":
            payload: dict[str, object] = {
                "config": {
                    "broadcast": {"ack": False, "self": False},
                    "presence": {"key": "", "enabled": False},
                    "postgres_changes": [],
                    "private": self.private,
                }
            }
            if self.join_token and self.token:
                payload["access_token"] = self.token
            self.send_text(orjson.dumps(["1", "1", self.room, "phx_join", payload]))
        # sio: wait for the Engine.IO open packet; plain: wait for the ack

    def _joining_frame(self, op: int, data: bytes) -> None:
        proto = self.proto
        if proto == "phx":
            if op != 0x1:
                return
            msg = orjson.loads(data)
            if msg[3] == "phx_reply" and msg[1] == "1":
                if msg[4].get("status") == "ok":
                    self._ready()
                else:
                    self.fail(f"join refused: {msg[4].get('response')}")
        elif proto == "sio":
            if data[:1] == b"0":  # Engine.IO open
                self.send_text(b"40")
            elif data[:2] == b"40":  # namespace connected
                self.send_text(b"421" + orjson.dumps(["join", self.room]))
            elif data[:3] == b"431":  # join ack
                self._ready()
            elif data[:2] == b"44":
                self.fail(f"socket.io connect error: {data[:100]!r}")
            elif data == b"2":
                self.send_text(b"3")
        else:
            self._ready()

    def _ready(self) -> None:
        self.state = 2
        if not self.ready.done():
            self.ready.set_result(True)

    def data_received(self, data: bytes) -> None:
        if self.state == 2:
            if self.buf:
                self.buf += data
                self._frames(self.buf)
            else:
                self._frames(data)
            return
        b = self.buf
        b += data
        if self.state == 0:
            i = b.find(b"\r\n\r\n")
            if i < 0:
                return
            if not b.startswith(b"HTTP/1.1 101"):
                self.fail(f"upgrade refused: {bytes(b[:120])!r}")
                return
            del b[: i + 4]
            self.state = 1
            if self.upgraded is not None:
                self.upgraded.set_result(True)
            else:
                self._join()
        # joining: parse whole frames one by one until ready
        while self.state == 1 and len(b) >= 2:
            ln = b[1] & 0x7F
            h = 2
            if ln == 126:
                if len(b) < 4:
                    return
                ln = int.from_bytes(b[2:4], "big")
                h = 4
            elif ln == 127:
                if len(b) < 10:
                    return
                ln = int.from_bytes(b[2:10], "big")
                h = 10
            if len(b) < h + ln:
                return
            op = b[0] & 0x0F
            payload = bytes(b[h : h + ln])
            del b[: h + ln]
            if op == 0x8:
                code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
                self.fail(f"closed while joining: {code} {payload[2:80]!r}")
                return
            self._joining_frame(op, payload)
        if self.state == 2 and b:
            data = bytes(b)
            b.clear()
            self._frames(data)

    # -- the hot loop ------------------------------------------------------------

    def _frames(self, b: bytes | bytearray) -> None:
        st = self.st
        want = self.want
        seen = st.count
        every = st.sample
        pos = 0
        n = len(b)
        while n - pos >= 2:
            ln = b[pos + 1] & 0x7F
            h = 2
            if ln == 126:
                if n - pos < 4:
                    break
                ln = (b[pos + 2] << 8) | b[pos + 3]
                h = 4
            elif ln == 127:
                if n - pos < 10:
                    break
                ln = int.from_bytes(b[pos + 2 : pos + 10], "big")
                h = 10
            end = pos + h + ln
            if end > n:
                break
            first = b[pos]
            if first == want and ln > 1:
                seen += 1
                if seen % every == 0:
                    m = _TS.search(b, pos + h, min(end, pos + h + SCAN))
                    if m is not None:
                        st.lat.append((time.time_ns() - int(m.group(1))) / 1e6)
            elif first == 0x88:
                code = (b[pos + h] << 8 | b[pos + h + 1]) if ln >= 2 else 1005
                st.close_codes[code] = st.close_codes.get(code, 0) + 1
            elif first == 0x89:  # ping: pong with the same payload
                assert self.t is not None
                self.t.write(mask_frame(bytes(b[pos + h : end]), 0xA))
            elif first == 0x81 and ln == 1 and b[pos + h] == 0x32 and self.proto == "sio":
                self.send_text(b"3")
            pos = end
        if seen != st.count:
            if not self.count:
                st.active += 1
            self.count += seen - st.count
            st.count = seen
        if b is self.buf:
            del self.buf[:pos]
        elif pos < n:
            self.buf += b[pos:]


async def open_all(spec: dict, st: Shared) -> tuple[list[Conn], dict[str, int], float]:
    loop = asyncio.get_running_loop()
    conns: list[Conn] = []
    failures: dict[str, int] = {}
    sem = asyncio.Semaphore(int(spec.get("concurrency", 100)))
    timeout = float(spec.get("join_timeout", 30.0))
    join_token = bool(spec.get("join_token", True))
    private = bool(spec.get("private", False))
    defer = bool(spec.get("defer_join", False))

    async def one(target: dict, room: str, token: str | None) -> None:
        url = target["url"]
        hostport, _, rest = url.split("//", 1)[1].partition("/")
        host, port = hostport.rsplit(":", 1)
        path = "/" + rest.replace("{room}", room).replace("{token}", token or "")
        async with sem:
            for attempt in range(3):
                conn = Conn(
                    st, target["proto"], hostport, path, room, token, join_token, private, defer
                )
                conn.url = url
                try:
                    await loop.create_connection(lambda c=conn: c, host, int(port))
                    waited = conn.upgraded if conn.upgraded is not None else conn.ready
                    await asyncio.wait_for(asyncio.shield(waited), timeout)
                    conns.append(conn)
                    return
                except (TimeoutError, OSError, ConnectionError) as exc:
                    conn.reset()
                    why = type(exc).__name__ + (f": {str(exc)[:120]}" if str(exc) else "")
                    if attempt == 2 or not isinstance(exc, OSError):
                        failures[why] = failures.get(why, 0) + 1
                        return
                    await asyncio.sleep(0.2 * (attempt + 1))

    t0 = time.perf_counter()
    tasks = []
    for target in spec["targets"]:
        rooms = target["rooms"]
        tokens = target.get("tokens") or [None]
        for i in range(int(target["count"])):
            tasks.append(one(target, rooms[i % len(rooms)], tokens[i % len(tokens)]))
    await asyncio.gather(*tasks)
    return conns, failures, time.perf_counter() - t0


async def join_all(
    conns: list[Conn], concurrency: int, join_timeout: float
) -> tuple[list[Conn], dict[str, int], float, list[float]]:
    """Join upgraded ``defer_join`` connections, at most ``concurrency`` in
    flight; the ones refused or lost are reset and left out.  Also returns
    each successful join's time from sending ``phx_join`` to the ``ok``
    reply, in ms."""
    sem = asyncio.Semaphore(concurrency)
    joined: list[Conn] = []
    failures: dict[str, int] = {}
    join_ms: list[float] = []

    async def one(conn: Conn) -> None:
        async with sem:
            t0 = time.perf_counter()
            conn.join()
            try:
                await asyncio.wait_for(asyncio.shield(conn.ready), join_timeout)
                join_ms.append((time.perf_counter() - t0) * 1000.0)
                joined.append(conn)
            except (TimeoutError, OSError, ConnectionError) as exc:
                conn.reset()
                why = type(exc).__name__ + (f": {str(exc)[:120]}" if str(exc) else "")
                failures[why] = failures.get(why, 0) + 1

    t0 = time.perf_counter()
    await asyncio.gather(*(one(c) for c in conns))
    return joined, failures, time.perf_counter() - t0, join_ms


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def emit(obj: dict) -> None:
    sys.stdout.buffer.write(orjson.dumps(obj) + b"\n")
    sys.stdout.flush()


async def main(spec: dict) -> None:
    loop = asyncio.get_running_loop()
    st = Shared(int(spec.get("sample", 16)))
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    cpu0 = cpu_seconds()
    conns, failures, secs = await open_all(spec, st)
    if spec.get("defer_join"):
        # Two phases: connect (upgrade) everything, then join on command, so
        # that the joins are measured on their own.
        emit(
            {
                "ev": "connected",
                "connected": len(conns),
                "failed": failures,
                "secs": secs,
                "cpu": cpu_seconds() - cpu0,
            }
        )
        if (await reader.readline()).decode().strip() != "join":
            return
        cpu0 = cpu_seconds()
        conns, failures, secs, join_ms = await join_all(
            conns, int(spec.get("concurrency", 100)), float(spec.get("join_timeout", 30.0))
        )
    else:
        join_ms = []
    emit(
        {
            "ev": "ready",
            "joined": len(conns),
            "failed": failures,
            "secs": secs,
            "cpu": cpu_seconds() - cpu0,
            "join_ms": join_ms,
        }
    )

    heartbeat = mask_frame(orjson.dumps([None, "hb", "phoenix", "heartbeat", {}]))

    async def heartbeats() -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_SECONDS)
            for c in conns:
                if c.proto == "phx" and c.state == 2 and c.t is not None:
                    c.t.write(heartbeat)

    async def progress() -> None:
        last = -1
        while True:
            await asyncio.sleep(0.02)
            if st.count != last:
                last = st.count
                emit({"ev": "n", "n": last, "a": st.active})

    tasks = [asyncio.create_task(heartbeats()), asyncio.create_task(progress())]
    base_cpu = cpu_seconds()
    while True:
        line = (await reader.readline()).decode().strip()
        if not line or line == "quit":
            break
        cmd, _, arg = line.partition(" ")
        if cmd == "reset":
            st.count = 0
            st.active = 0
            st.lat = []
            for c in conns:
                c.count = 0
            base_cpu = cpu_seconds()
            emit({"ev": "reset"})
        elif cmd == "sample":
            st.sample = max(1, int(arg))
            emit({"ev": "sample"})
        elif cmd == "stats":
            counts = [c.count for c in conns]
            per_url: dict[str, int] = {}
            for c in conns:
                per_url[c.url] = per_url.get(c.url, 0) + c.count
            emit(
                {
                    "ev": "stats",
                    "count": st.count,
                    "lat": st.lat,
                    "cpu": cpu_seconds() - base_cpu,
                    "conns": len(conns),
                    "open": sum(1 for c in conns if c.state == 2),
                    "closed": st.closed,
                    "close_codes": st.close_codes,
                    "min_per_conn": min(counts) if counts else 0,
                    "max_per_conn": max(counts) if counts else 0,
                    "zero_conns": sum(1 for x in counts if x == 0),
                    "per_url": per_url,
                }
            )
    for t in tasks:
        t.cancel()
    for c in conns:
        c.reset()
    await asyncio.sleep(0.05)


if __name__ == "__main__":
    with open(sys.argv[1], "rb") as f:
        spec = orjson.loads(f.read())
    uvloop.run(main(spec))
