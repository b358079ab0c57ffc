"""The node's counters: plain integers the hot paths bump in place.

Nothing here takes a lock or allocates per event.  The Prometheus view of
these numbers (and of the node's live gauges) is :mod:`hub.metrics`, read
only when ``/metrics`` is scraped.
"""

from __future__ import annotations

from collections import Counter

from prometheus_client import Histogram


class Counters:
    """Counters of one hub node.  Plain attributes, bumped in place."""

    __slots__ = (
        "connections_opened",
        "connections_refused",
        "joins",
        "joins_refused",
        "messages_in",
        "bytes_in",
        "frames_out",
        "bytes_out",
        "closes",
        "fanout_latency",
    )

    def __init__(self) -> None:
        self.connections_opened = 0
        self.connections_refused = 0
        self.joins = 0
        self.joins_refused: Counter[str] = Counter()
        self.messages_in = 0
        self.bytes_in = 0
        self.frames_out = 0
        self.bytes_out = 0
        self.closes: Counter[int] = Counter()
        #: The one real histogram, observed once per broadcast per node (not
        #: per delivery).  Registered by hub.metrics, not here.
        self.fanout_latency = Histogram(
            "hub_fanout_latency_seconds",
            "From a broadcast's publish (on any node) to its frames being queued "
            "for every local subscriber.",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
            registry=None,
        )

    def refused(self, reason: str) -> None:
        self.joins_refused[reason.partition(":")[0]] += 1
