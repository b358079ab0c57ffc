"""Per-org quotas: connections, joins per second, messages per second.

One org over its quota is refused; the rest of the org's traffic already
admitted, and every other org, are unaffected.  ``service_role`` (the org's
own back end) is not counted against any org.

* A connection counts toward org X while it has at least one channel of X
  joined.  Over ``max_connections``: the join is refused with
  ``ConnectionRateLimitReached: Too many connected users``.
* Joins of X's topics, over ``joins_per_second``:
  ``ClientJoinRateLimitReached: Too many joins per second``.
* Broadcasts to X's topics (WebSocket and REST), over
  ``messages_per_second``: as in Supabase, the channel ends (``system``
  error ``Too many messages per second``, then ``phx_close``); REST 429.

Free-name channels (ordinary Supabase channels) share one bucket,
:data:`FREE_CHANNELS`, whose ``messages_per_second`` is
``HUB_FREE_MESSAGES_PER_SECOND``: the network's equivalent of Supabase's
per-project events-per-second limit.

Rates are counted in whole-second windows.  Across nodes (Redis engine),
each node adds what the other nodes reported in their last heartbeat (one
per second) for the previous second, and their current connection counts.
So a limit holds exactly on one node, and across N nodes a burst inside one
second can overshoot a rate by at most what the other N-1 nodes admit in
that second before their next report; connection counts lag by up to one
heartbeat.  No I/O here: the engine carries the reports.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any

from hub.channels.topics import Topic
from hub.errors import ConfigError

#: The quota bucket of every free-name channel (never an org id: those
#: start with a letter or a digit).
FREE_CHANNELS = "*free"


def quota_bucket(topic: Topic) -> str | None:
    """Whose messages quota a broadcast to ``topic`` counts against: its
    org, the free-name channels' shared bucket, or none (user topics)."""
    if topic.kind == "org":
        return topic.owner
    return FREE_CHANNELS if topic.kind == "free" else None


@dataclass(frozen=True, slots=True)
class OrgQuota:
    max_connections: int = 1000
    joins_per_second: int = 100
    messages_per_second: int = 1000


def parse_overrides(raw: Any, defaults: OrgQuota) -> dict[str, OrgQuota]:
    """Validate ``HUB_ORG_QUOTAS``: ``{"org": {"max_connections": n, ...}}``."""
    if not isinstance(raw, dict):
        raise ConfigError("HUB_ORG_QUOTAS: must be a JSON object of org id -> limits")
    names = {f.name for f in fields(OrgQuota)}
    result: dict[str, OrgQuota] = {}
    for org, limits in raw.items():
        if not isinstance(limits, dict) or not set(limits) <= names:
            raise ConfigError(f"HUB_ORG_QUOTAS: {org!r} may set only {', '.join(sorted(names))}")
        values = {name: getattr(defaults, name) for name in names}
        for name, value in limits.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"HUB_ORG_QUOTAS: {org}.{name} must be a non-negative integer")
            values[name] = value
        result[org] = OrgQuota(**values)
    return result


class _Window:
    """Counts in the current whole second, and remembers the last one."""

    __slots__ = ("second", "count", "previous")

    def __init__(self) -> None:
        self.second = 0
        self.count = 0
        self.previous = 0

    def current(self, second: int) -> int:
        if second != self.second:
            self.previous = self.count if second == self.second + 1 else 0
            self.second, self.count = second, 0
        return self.count


class Quotas:
    def __init__(
        self,
        defaults: OrgQuota | None = None,
        overrides: Mapping[str, OrgQuota] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.defaults = defaults or OrgQuota()
        self.overrides = dict(overrides or {})
        self.clock = clock
        #: org -> conn id -> channels of that org the connection holds
        self._connections: dict[str, dict[str, int]] = {}
        self._joins: dict[str, _Window] = {}
        self._messages: dict[str, _Window] = {}
        #: node -> org -> (connections, joins last second, messages last second)
        self._remote: dict[str, dict[str, tuple[int, int, int]]] = {}

    def limits(self, org: str) -> OrgQuota:
        return self.overrides.get(org, self.defaults)

    def _remote_sum(self, org: str, index: int) -> int:
        if not self._remote:
            return 0
        return sum(usage[org][index] for usage in self._remote.values() if org in usage)

    def _take(self, table: dict[str, _Window], org: str, limit: int, index: int) -> bool:
        window = table.get(org)
        if window is None:
            window = table[org] = _Window()
        used = window.current(int(self.clock()))
        if used + self._remote_sum(org, index) >= limit:
            return False
        window.count += 1
        return True

    def take_join(self, org: str) -> bool:
        return self._take(self._joins, org, self.limits(org).joins_per_second, 1)

    def take_message(self, org: str) -> bool:
        return self._take(self._messages, org, self.limits(org).messages_per_second, 2)

    def admit(self, conn_id: str, org: str) -> bool:
        """Count one more channel of ``org`` held by ``conn_id``; False (and
        nothing counted) if that would exceed the org's connections."""
        held = self._connections.setdefault(org, {})
        if conn_id not in held:
            total = len(held) + self._remote_sum(org, 0)
            if total >= self.limits(org).max_connections:
                if not held:
                    del self._connections[org]
                return False
            held[conn_id] = 0
        held[conn_id] += 1
        return True

    def release(self, conn_id: str, org: str) -> None:
        held = self._connections.get(org)
        if held is None or conn_id not in held:
            return
        held[conn_id] -= 1
        if held[conn_id] <= 0:
            del held[conn_id]
            if not held:
                del self._connections[org]

    def connections(self, org: str) -> int:
        return len(self._connections.get(org, ())) + self._remote_sum(org, 0)

    # -- the cross-node report ------------------------------------------------

    def local_usage(self) -> dict[str, list[int]]:
        """This node's share, for the heartbeat: org -> [conns, joins, msgs]
        (rates of the last whole second)."""
        second = int(self.clock())
        usage: dict[str, list[int]] = {}
        for org, held in self._connections.items():
            usage[org] = [len(held), 0, 0]
        for index, table in ((1, self._joins), (2, self._messages)):
            for org, window in list(table.items()):
                window.current(second)
                if window.previous or window.count:
                    usage.setdefault(org, [0, 0, 0])[index] = max(window.previous, window.count)
                elif org not in self._connections:
                    del table[org]
        return usage

    def set_remote(self, node: str, usage: Any) -> None:
        clean: dict[str, tuple[int, int, int]] = {}
        if isinstance(usage, dict):
            for org, values in usage.items():
                if (
                    isinstance(org, str)
                    and isinstance(values, list)
                    and len(values) == 3
                    and all(isinstance(v, int) for v in values)
                ):
                    clean[org] = (values[0], values[1], values[2])
        self._remote[node] = clean

    def drop_node(self, node: str) -> None:
        self._remote.pop(node, None)
