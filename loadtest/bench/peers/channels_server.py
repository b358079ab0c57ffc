"""Django Channels with channels-redis, under uvicorn.

A consumer joins the group named in its URL (``/ws/<room>``) before it
accepts, then sends one text frame as the join ack; the harness publishes
with ``channel_layer.group_send(room, {"type": "bench.m", "text": ...})``.
The layer is channels-redis' pub/sub layer by default (``--layer core`` for
the original RedisChannelLayer).  Several processes share groups through
Redis by construction.

    python channels_server.py PORT CONTROL_PORT --redis URL [--prefix P] [--layer pubsub|core]
"""

import argparse

import django
import uvicorn
import uvloop
from django.conf import settings

ap = argparse.ArgumentParser()
ap.add_argument("port", type=int)
ap.add_argument("control_port", type=int)
ap.add_argument("--redis", required=True)
ap.add_argument("--prefix", default="bench")
ap.add_argument("--layer", default="pubsub", choices=["pubsub", "core"])
args = ap.parse_args()

backend = {
    "pubsub": "channels_redis.pubsub.RedisPubSubChannelLayer",
    "core": "channels_redis.core.RedisChannelLayer",
}[args.layer]
settings.configure(
    DEBUG=False,
    SECRET_KEY="bench-not-secret",
    ALLOWED_HOSTS=["*"],
    INSTALLED_APPS=["channels"],
    CHANNEL_LAYERS={
        "default": {"BACKEND": backend, "CONFIG": {"hosts": [args.redis], "prefix": args.prefix}}
    },
)
django.setup()

from _control import serve_control, uvicorn_config  # noqa: E402
from channels.generic.websocket import AsyncWebsocketConsumer  # noqa: E402
from channels.layers import get_channel_layer  # noqa: E402
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from django.urls import path  # noqa: E402

joined = 0


class Bench(AsyncWebsocketConsumer):
    async def connect(self):
        global joined
        self.room = self.scope["url_route"]["kwargs"]["room"]
        await self.channel_layer.group_add(self.room, self.channel_name)
        await self.accept()
        joined += 1
        await self.send(text_data='{"ok":true}')

    async def disconnect(self, code):
        global joined
        joined -= 1
        await self.channel_layer.group_discard(self.room, self.channel_name)

    async def bench_m(self, event):
        await self.send(text_data=event["text"])


application = ProtocolTypeRouter({"websocket": URLRouter([path("ws/<str:room>", Bench.as_asgi())])})


async def main():
    layer = get_channel_layer()

    async def publish(room, obj, data):
        await layer.group_send(room, {"type": "bench.m", "text": data.decode()})

    config = uvicorn_config(application, args.port)
    await serve_control(args.control_port, publish, lambda: joined)
    print("ready", flush=True)
    await uvicorn.Server(config).serve()


uvloop.run(main())
