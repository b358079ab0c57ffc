"""The hub exactly as ``hub serve`` runs it, plus the benchmark control socket.

Used for the ``hub-inproc`` server: publishing goes through
``node.channels.publish(Broadcast(...))`` inside the process, as the peers
publish through their own APIs, so the REST layer's cost can be told apart
from the fan-out's.  Settings come from the same HUB_* variables.

    python hub_inproc.py CONTROL_PORT   (HUB_PORT etc. in the environment)
"""

import logging
import os
import sys

import uvicorn
import uvloop

from hub.app import create_app
from hub.cli import tune_gc, uvicorn_config
from hub.config import load_settings
from hub.node import Node
from hub.protocol import Broadcast

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _control import serve_control


def main() -> None:
    control_port = int(sys.argv[1])
    settings = load_settings({}, os.environ)
    logging.basicConfig(level=settings.log_level.upper())
    node = Node(settings)
    app = create_app(node)
    # The same uvicorn configuration as hub.cli.serve.
    config = uvicorn_config(app, settings, loop="none")
    tune_gc()

    def publish(room: str, obj: object, data: bytes) -> None:
        node.channels.publish(Broadcast(f"org:{room}", "m", data))

    async def run() -> None:
        await serve_control(
            control_port,
            publish,
            lambda: sum(node.channels.subscriber_count(t) for t in node.channels.topics()),
        )
        print("ready", flush=True)
        await uvicorn.Server(config).serve()

    uvloop.run(run())


if __name__ == "__main__":
    main()
