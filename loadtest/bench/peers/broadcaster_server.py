"""encode/broadcaster behind Starlette under uvicorn, as its README shows it.

Each socket subscribes to the channel named in its URL (``/ws/<room>``),
sends one text frame as the join ack once ``subscribe`` has returned, then
forwards every event with ``await websocket.send_text``.  The harness
publishes with ``broadcast.publish(channel=room, message=...)``.  Backend:
``memory://`` by default, ``--backend redis://...`` to share channels
between processes.

    python broadcaster_server.py PORT CONTROL_PORT [--backend URL] [--prefix P]
"""

import argparse
from contextlib import asynccontextmanager

import uvicorn
import uvloop
from _control import serve_control, uvicorn_config
from broadcaster import Broadcast
from starlette.applications import Starlette
from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocketDisconnect

ap = argparse.ArgumentParser()
ap.add_argument("port", type=int)
ap.add_argument("control_port", type=int)
ap.add_argument("--backend", default="memory://")
ap.add_argument("--prefix", default="bench")
args = ap.parse_args()

broadcast = Broadcast(args.backend)
joined = 0


async def ws_endpoint(websocket):
    global joined
    await websocket.accept()
    channel = f"{args.prefix}:{websocket.path_params['room']}"
    try:
        async with broadcast.subscribe(channel=channel) as subscriber:
            joined += 1
            try:
                await websocket.send_text('{"ok":true}')
                async for event in subscriber:
                    await websocket.send_text(event.message)
            finally:
                joined -= 1
    except (WebSocketDisconnect, RuntimeError, OSError):
        pass


async def publish(room, obj, data):
    await broadcast.publish(channel=f"{args.prefix}:{room}", message=data.decode())


@asynccontextmanager
async def lifespan(app):
    await broadcast.connect()
    server = await serve_control(args.control_port, publish, lambda: joined)
    print("ready", flush=True)
    yield
    server.close()
    await broadcast.disconnect()


app = Starlette(routes=[WebSocketRoute("/ws/{room}", ws_endpoint)], lifespan=lifespan)


async def main():
    config = uvicorn_config(app, args.port, lifespan="on")
    await uvicorn.Server(config).serve()


uvloop.run(main())
