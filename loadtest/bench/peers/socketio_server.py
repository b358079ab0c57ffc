"""python-socketio (ASGI, rooms) under uvicorn, as its docs show it.

Clients join with ``emit("join", room)`` (acknowledged once the room is
entered); the harness publishes with ``sio.emit("m", obj, to=room)``.  With
``--redis URL`` several processes share rooms through AsyncRedisManager.

    python socketio_server.py PORT CONTROL_PORT [--redis URL --prefix P]
"""

import argparse

import socketio
import uvicorn
import uvloop
from _control import serve_control, uvicorn_config

ap = argparse.ArgumentParser()
ap.add_argument("port", type=int)
ap.add_argument("control_port", type=int)
ap.add_argument("--redis")
ap.add_argument("--prefix", default="bench")
args = ap.parse_args()

manager = socketio.AsyncRedisManager(args.redis, channel=args.prefix) if args.redis else None
sio = socketio.AsyncServer(async_mode="asgi", client_manager=manager, cors_allowed_origins="*")
joined = 0


@sio.on("join")
async def join(sid, room):
    global joined
    await sio.enter_room(sid, room)
    joined += 1
    return True


@sio.on("disconnect")
async def disconnect(sid, reason=None):
    global joined
    joined -= 1


async def publish(room, obj, data):
    await sio.emit("m", obj, to=room)


async def main():
    config = uvicorn_config(socketio.ASGIApp(sio), args.port)
    await serve_control(args.control_port, publish, lambda: joined)
    print("ready", flush=True)
    await uvicorn.Server(config).serve()


uvloop.run(main())
