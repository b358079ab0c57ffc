"""Types of the compiled fan-out writes (hub/_writes.c)."""

from collections.abc import Iterable
from typing import Any

from hub.outbox import HasOutbox, Sink

def fan_out(group: dict[Any, Sink], wire: bytes, origin: object, /) -> int: ...
def flush_subscribers(subscriptions: Iterable[HasOutbox], /) -> tuple[int, int]: ...
