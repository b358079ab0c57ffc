"""Load the recorded real-client sessions in ``tests/support/captures/``.

Each ``.jsonl`` file is one WebSocket session recorded against a scripted
server: ``in`` events are what the client sent, ``out`` events what the
recording server answered.  Binary frames carry ``hex``; the recorder's own
interpretation of a binary frame is under ``decoded``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

CAPTURES_DIR = Path(__file__).resolve().parent / "captures"

#: name -> the vsn the client connected with
CAPTURES: dict[str, str] = {
    "py_realtime": "1.0.0",
    "py_supabase": "1.0.0",
    "js_supabase_v1": "1.0.0",
    "js_supabase_v2": "2.0.0",
}

#: The placeholder tokens the clients were given when they were recorded.
CONNECTION_TOKEN = "ANON-KEY-123"
REFRESHED_TOKEN = "NEW-USER-JWT-456"


@dataclass(frozen=True)
class Event:
    """One line of a capture."""

    index: int
    raw: dict[str, Any]

    @property
    def kind(self) -> str:
        return str(self.raw["ev"])

    @property
    def is_binary(self) -> bool:
        return self.raw.get("type") == "binary"

    @property
    def data(self) -> str | bytes:
        """The frame as it was on the wire: ``str`` for text, ``bytes`` for binary."""
        if self.is_binary:
            return bytes.fromhex(self.raw["hex"])
        return str(self.raw["data"])

    @property
    def decoded(self) -> dict[str, Any]:
        return dict(self.raw["decoded"])


@cache
def load(name: str) -> tuple[Event, ...]:
    path = CAPTURES_DIR / f"{name}.jsonl"
    with path.open(encoding="utf-8") as handle:
        return tuple(
            Event(index, json.loads(line)) for index, line in enumerate(handle) if line.strip()
        )


def frames(name: str, kind: str) -> list[Event]:
    """Every ``in`` or ``out`` frame of a capture, in order."""
    return [event for event in load(name) if event.kind == kind]


def exchanges(name: str) -> list[tuple[Event, list[Event]]]:
    """Each client frame with the server frames that answered it.

    Server frames sent on the recording server's own initiative (after a
    ``scenario_step``) belong to no client frame and are left out.
    """
    result: list[tuple[Event, list[Event]]] = []
    current: list[Event] | None = None
    for event in load(name):
        if event.kind == "in":
            current = []
            result.append((event, current))
        elif event.kind == "scenario_step":
            current = None
        elif event.kind == "out" and current is not None:
            current.append(event)
    return result


def scenario_outs(name: str) -> list[tuple[str, Event]]:
    """The server-initiated frames, each with the step that describes it."""
    result: list[tuple[str, Event]] = []
    step: str | None = None
    for event in load(name):
        if event.kind == "scenario_step":
            step = str(event.raw["step"])
        elif event.kind == "in":
            step = None
        elif event.kind == "out" and step is not None and step != "scenario done":
            result.append((step, event))
    return result
