"""The node's counters, and their Prometheus view at ``GET /metrics``.

Hot paths bump plain integers on :class:`Stats`; nothing on them takes a
lock or allocates.  :class:`HubCollector` reads the integers (and the live
gauges from the hub) when Prometheus scrapes.  Only the fan-out latency is a
real Histogram, observed once per broadcast per node, not per delivery.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from hub.app import Hub

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Stats:
    """Counters of one hub node.  Plain attributes, bumped in place."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.connections_opened = 0
        self.connections_refused = 0
        self.joins = 0
        self.joins_refused: Counter[str] = Counter()
        self.messages_in = 0
        self.bytes_in = 0
        self.frames_out = 0
        self.bytes_out = 0
        self.closes: Counter[int] = Counter()
        self.fanout_latency = Histogram(
            "hub_fanout_latency_seconds",
            "From a broadcast's publish (on any node) to its frames being queued "
            "for every local subscriber.",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
            registry=self.registry,
        )

    def refused(self, reason: str) -> None:
        self.joins_refused[reason.partition(":")[0]] += 1


class HubCollector(Collector):
    def __init__(self, hub: Hub) -> None:
        self.hub = hub

    def collect(self) -> Iterator[Metric]:
        hub, stats = self.hub, self.hub.stats
        labels = ["node"]
        node = [hub.node_id]

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            family = GaugeMetricFamily(name, doc, labels=labels)
            family.add_metric(node, value)
            return family

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            family = CounterMetricFamily(name, doc, labels=labels)
            family.add_metric(node, value)
            return family

        yield gauge("hub_connections", "Open WebSocket connections.", len(hub.sessions))
        yield gauge(
            "hub_channels",
            "Joined channels (subscriptions) on this node.",
            sum(len(session.subs) for session in hub.sessions),
        )
        yield gauge("hub_topics", "Topics with local subscribers.", hub.channels.topic_count)
        yield counter("hub_connections_opened", "Accepted connections.", stats.connections_opened)
        yield counter(
            "hub_connections_refused",
            "Handshakes refused (bad token, bad vsn).",
            stats.connections_refused,
        )
        yield counter("hub_joins", "Successful joins.", stats.joins)
        refused = CounterMetricFamily(
            "hub_joins_refused", "Refused joins by reason code.", labels=["node", "reason"]
        )
        for reason, count in sorted(stats.joins_refused.items()):
            refused.add_metric([hub.node_id, reason], count)
        yield refused
        yield counter("hub_messages_in", "Frames received from clients.", stats.messages_in)
        yield counter("hub_bytes_in", "Bytes of frames received from clients.", stats.bytes_in)
        yield counter("hub_messages_out", "Frames written to clients.", stats.frames_out)
        yield counter("hub_bytes_out", "Bytes written to clients.", stats.bytes_out)
        closes = CounterMetricFamily(
            "hub_closes", "Connections the hub closed, by close code.", labels=["node", "code"]
        )
        for code, count in sorted(stats.closes.items()):
            closes.add_metric([hub.node_id, str(code)], count)
        yield closes
        yield counter(
            "hub_slow_consumer_closes",
            "Connections closed because their outbox overflowed (code 4001).",
            stats.closes[4001],
        )
        yield gauge("hub_engine_ready", "1 when the engine link is up.", float(hub.engine.ready))
        yield counter(
            "hub_engine_reconnects", "Times the engine link was lost.", hub.engine.reconnects
        )
        yield gauge(
            "hub_store_ready", "1 when the event store listener is up.", float(hub.store.ready)
        )
        yield counter(
            "hub_listener_reconnects",
            "Times the event store's listener connection was re-established.",
            getattr(hub.store, "listener_reconnects", 0),
        )
        yield counter(
            "hub_durable_delivered",
            "Durable events delivered to subscribers.",
            hub.durable.delivered,
        )


def render(stats: Stats) -> bytes:
    return generate_latest(stats.registry)
