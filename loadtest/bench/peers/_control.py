"""The control socket every benchmark server opens next to its WebSocket port.

The harness drives publishing through it so that every server publishes
in-process, through its own API, the same payloads (one JSON line per
command, one line per answer):

* ``P COUNT START NROOMS BODY [T]``: publish COUNT messages; message ``j``
  goes to room ``o{(START + j) % NROOMS}`` and is
  ``{"t": T, "i": START + j, "body": "x" * BODY}``.  T is the harness's
  ``time_ns()`` when it sent the command (so time spent queued in a busy
  server counts, as it does for the hub's REST requests); without it, the
  server's clock at publish time.  Answers ``K`` once the server's publish
  call returned for all of them; the harness does not wait for it.
* ``C``: answers ``{"joined": N}``, the subscriptions the server holds.

Only the standard library and orjson at import time: it runs in every
peer's venv (``uvicorn_config`` imports uvicorn when called).
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Callable
from typing import Any

import orjson


def uvicorn_config(app: Any, port: int, *, lifespan: str = "off") -> Any:
    """How every uvicorn-based peer runs: the same WebSocket implementation,
    uvloop (the caller's loop), no compression, a deep accept backlog."""
    import uvicorn  # not in the limit probe's venv

    return uvicorn.Config(
        app,
        host="127.0.0.1",
        port=port,
        log_level="warning",
        ws="websockets-sansio",
        loop="none",
        ws_per_message_deflate=False,
        backlog=4096,
        lifespan=lifespan,
    )


def payload(i: int, body: str, t: int | None = None) -> dict[str, Any]:
    # "t" first: the client finds it within the first bytes of the frame.
    return {"t": time.time_ns() if t is None else t, "i": i, "body": body}


async def serve_control(
    port: int,
    publish: Callable[[str, dict[str, Any], bytes], Any],
    joined: Callable[[], int],
) -> asyncio.AbstractServer:
    """``publish(room, obj, obj_as_json_bytes)`` may be sync or async."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        bodies: dict[int, str] = {}
        while True:
            line = await reader.readline()
            if not line:
                break
            parts = line.split()
            if parts[0] == b"P":
                count, start, nrooms, size = (int(x) for x in parts[1:5])
                stamp = int(parts[5]) if len(parts) > 5 else None
                body = bodies.setdefault(size, "x" * size)
                for j in range(count):
                    obj = payload(start + j, body, stamp)
                    result = publish(f"o{(start + j) % nrooms}", obj, orjson.dumps(obj))
                    if inspect.isawaitable(result):
                        await result
                writer.write(b"K\n")
            elif parts[0] == b"C":
                writer.write(orjson.dumps({"joined": joined()}) + b"\n")
            await writer.drain()
        writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", port)
