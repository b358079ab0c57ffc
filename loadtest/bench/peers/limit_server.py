"""The raw limit probe (../shared/probes/batch_server.py) in the benchmark's shape.

A raw asyncio transport speaking just enough RFC 6455: the frame is built
once per message and appended to every subscriber's buffer; one
``writelines`` per connection per loop tick.  Rooms come from the URL path
(``/ws/<room>``); after the upgrade the server sends one text frame as the
join ack.  No auth, no protocol: it bounds what is possible.

    python limit_server.py PORT CONTROL_PORT
"""

import asyncio
import base64
import hashlib
import sys

import uvloop
from _control import serve_control

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
rooms: dict[str, list["P"]] = {}
dirty: list["P"] = []
pending = False


def frame(data: bytes) -> bytes:
    n = len(data)
    if n < 126:
        return bytes([0x81, n]) + data
    if n < 65536:
        return bytes([0x81, 126]) + n.to_bytes(2, "big") + data
    return bytes([0x81, 127]) + n.to_bytes(8, "big") + data


ACK = frame(b'{"ok":true}')


class P(asyncio.Protocol):
    def connection_made(self, t):
        self.t, self.buf, self.open, self.out, self.room = t, b"", False, [], None

    def data_received(self, d):
        if self.open:
            return
        self.buf += d
        if b"\r\n\r\n" not in self.buf:
            return
        lines = self.buf.split(b"\r\n")
        path = lines[0].split(b" ")[1].decode()
        key = next(
            h.split(b":", 1)[1].strip() for h in lines if h.lower().startswith(b"sec-websocket-key")
        )
        acc = base64.b64encode(hashlib.sha1(key + GUID).digest())
        self.t.write(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + acc + b"\r\n\r\n"
        )
        self.open = True
        self.room = path.rsplit("/", 1)[-1]
        rooms.setdefault(self.room, []).append(self)
        self.t.write(ACK)

    def connection_lost(self, exc):
        if self.room is not None:
            rooms[self.room].remove(self)


def flush():
    global pending, dirty
    pending = False
    todo, dirty = dirty, []
    for c in todo:
        if c.out:
            c.t.writelines(c.out)
            c.out = []


def publish(room, obj, data):
    global pending
    f = frame(data)
    for c in rooms.get(room, ()):
        if not c.out:
            dirty.append(c)
        c.out.append(f)
    if not pending:
        pending = True
        asyncio.get_running_loop().call_soon(flush)


async def main(port, control_port):
    loop = asyncio.get_running_loop()
    await loop.create_server(P, "127.0.0.1", port, backlog=4096)
    await serve_control(control_port, publish, lambda: sum(map(len, rooms.values())))
    print("ready", flush=True)
    await asyncio.Event().wait()


uvloop.run(main(int(sys.argv[1]), int(sys.argv[2])))
