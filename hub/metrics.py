"""The Prometheus view of one node, served at ``GET /metrics``.

Read only when scraped: the hot paths bump :class:`~hub.counters.Counters`,
and the live gauges (connections, topics, link health) are read through
one :class:`Gauges` snapshot the node builds on demand.  This module knows
nothing of the node's parts beyond those two.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Final

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from hub.counters import Counters
from hub.errors import CloseCode

CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"


@dataclass(frozen=True, slots=True)
class Gauges:
    """The node's live numbers at one scrape."""

    connections: int
    channels: int
    topics: int
    engine_ready: bool
    engine_reconnects: int
    store_ready: bool
    listener_reconnects: int
    durable_delivered: int
    database_broadcasts: int = 0
    database_broadcasts_dropped: int = 0
    row_changes: int = 0
    row_changes_dropped: int = 0
    rows_delivered: int = 0
    rows_dropped: int = 0
    #: The projection runner's view (hub.projections.runner.RunnerState).
    projection_leader: bool = False
    projection_lag: dict[tuple[str, str], int] = field(default_factory=dict)
    projection_stopped: dict[tuple[str, str], str] = field(default_factory=dict)
    projection_applied: dict[str, int] = field(default_factory=dict)


class NodeCollector(Collector):
    """Yields the node's counters and gauges, labelled with its id."""

    def __init__(self, node_id: str, counters: Counters, gauges: Callable[[], Gauges]) -> None:
        self.node_id = node_id
        self.counters = counters
        self.gauges = gauges

    def collect(self) -> Iterator[Metric]:
        stats, live = self.counters, self.gauges()
        labels = ["node"]
        node = [self.node_id]

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            family = GaugeMetricFamily(name, doc, labels=labels)
            family.add_metric(node, value)
            return family

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            family = CounterMetricFamily(name, doc, labels=labels)
            family.add_metric(node, value)
            return family

        yield gauge("hub_connections", "Open WebSocket connections.", live.connections)
        yield gauge("hub_channels", "Joined channels (subscriptions) on this node.", live.channels)
        yield gauge("hub_topics", "Topics with local subscribers.", live.topics)
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
            refused.add_metric([self.node_id, reason], count)
        yield refused
        yield counter("hub_messages_in", "Frames received from clients.", stats.messages_in)
        yield counter("hub_bytes_in", "Bytes of frames received from clients.", stats.bytes_in)
        yield counter("hub_messages_out", "Frames written to clients.", stats.frames_out)
        yield counter("hub_bytes_out", "Bytes written to clients.", stats.bytes_out)
        closes = CounterMetricFamily(
            "hub_closes", "Connections the hub closed, by close code.", labels=["node", "code"]
        )
        for code, count in sorted(stats.closes.items()):
            closes.add_metric([self.node_id, str(int(code))], count)
        yield closes
        yield counter(
            "hub_slow_consumer_closes",
            f"Connections closed because their outbox overflowed (code "
            f"{int(CloseCode.SLOW_CONSUMER)}).",
            stats.closes[CloseCode.SLOW_CONSUMER],
        )
        yield gauge("hub_engine_ready", "1 when the engine link is up.", float(live.engine_ready))
        yield counter(
            "hub_engine_reconnects", "Times the engine link was lost.", live.engine_reconnects
        )
        yield gauge(
            "hub_store_ready", "1 when the event store listener is up.", float(live.store_ready)
        )
        yield counter(
            "hub_listener_reconnects",
            "Times the event store's listener connection was re-established.",
            live.listener_reconnects,
        )
        yield counter(
            "hub_durable_delivered",
            "Durable events delivered to subscribers.",
            live.durable_delivered,
        )
        yield counter(
            "hub_database_broadcasts",
            "Broadcasts sent from the database (realtime.send) received by this node.",
            live.database_broadcasts,
        )
        yield counter(
            "hub_database_broadcasts_dropped",
            "Broadcasts sent from the database lost (queue full, malformed, row unreadable).",
            live.database_broadcasts_dropped,
        )
        yield counter(
            "hub_row_changes",
            "Row changes of tables tracked without an org column received.",
            live.row_changes,
        )
        yield counter(
            "hub_row_changes_dropped",
            "Row changes of tables tracked without an org column lost before their checks.",
            live.row_changes_dropped,
        )
        yield counter(
            "hub_rows_delivered",
            "Row changes of tables without an org column handed to their subscribers.",
            live.rows_delivered,
        )
        yield counter(
            "hub_rows_dropped",
            "Row changes of tables without an org column dropped (queue full, RLS check failed).",
            live.rows_dropped,
        )
        yield gauge(
            "hub_projection_leader",
            "1 on the node that runs the projections.",
            float(live.projection_leader),
        )
        lag = GaugeMetricFamily(
            "hub_projection_lag",
            "Events of an org not yet applied by a projection (on the leader).",
            labels=["node", "projection", "org"],
        )
        for (name, org), value in sorted(live.projection_lag.items()):
            lag.add_metric([self.node_id, name, org], value)
        yield lag
        stopped = GaugeMetricFamily(
            "hub_projection_stopped",
            "1 for each projection and org stopped by its handler's error (on the leader).",
            labels=["node", "projection", "org"],
        )
        for name, org in sorted(live.projection_stopped):
            stopped.add_metric([self.node_id, name, org], 1)
        yield stopped
        applied = CounterMetricFamily(
            "hub_projection_applied",
            "Events handed to a projection's handler by this node.",
            labels=["node", "projection"],
        )
        for name, value in sorted(live.projection_applied.items()):
            applied.add_metric([self.node_id, name], value)
        yield applied
        yield from stats.fanout_latency.collect()


def metrics_registry(collector: NodeCollector) -> CollectorRegistry:
    """A registry holding only this node's metrics (not the process-wide
    default one, so two nodes in one process never collide)."""
    registry = CollectorRegistry()
    registry.register(collector)
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
