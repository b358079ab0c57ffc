"""One hub node, wired in one place.

:class:`Node`'s constructor builds every part of the node and connects
them; nothing else in the package reaches for a part it was not handed.
Constructors of the parts have no side effects: the connections between
them are made here, and every I/O starts in :meth:`Node.running`.

How the parts connect::

    TokenVerifier ─┐
    Quotas ────────┼─> Gateway ──> Session ──> Channels ──> Engine (memory | Redis)
    Counters ──────┘     ^            │           ^  │            │
                         │ (transport │           │  └─ fan-out ──┼──> sinks ──> Flusher
                    HubHttpProtocol, HubSocket)   └─── deliver <──┘
    EventStore ── listener ──> DurableFeed ──> Channels.deliver_durable / deliver_change
               ├─ database broadcasts (realtime.send) ──> Channels.deliver, this node only
               └─ rows of tables without an org column ──> RowFeed (RLS: RowSecurity)
                                                           ──> Channels.deliver_rows
    Observers: Mother (the aggregator) hears Channels, Gateway and DurableFeed

The HTTP side (:mod:`hub.app`) is built from the node's parts, each route
group with only what it uses.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import AsyncIterator, Callable

import anyio

from hub.aggregator.history import History, MemoryHistory, SqlHistory
from hub.aggregator.mother import Mother
from hub.auth.channel_policies import ChannelPolicies
from hub.auth.row_security import RowSecurity
from hub.auth.tokens import JwksCache, TokenVerifier
from hub.channels.database import deliver_database_broadcast
from hub.channels.durable import DurableFeed
from hub.channels.fanout import Channels
from hub.channels.observer import Observers
from hub.channels.rows import RowFeed
from hub.config import Settings
from hub.counters import Counters
from hub.engine.base import Engine
from hub.engine.memory import MemoryEngine
from hub.flusher import Flusher
from hub.gateway import Gateway, SocketLimits
from hub.metrics import Gauges, NodeCollector, metrics_registry
from hub.outbox import PYTHON_WRITES, native_writes
from hub.projections.runner import ProjectionRunner, RunnerState
from hub.quotas import Quotas
from hub.store.base import EventStore
from hub.store.federation import FederatedStore

log = logging.getLogger(__name__)


class Node:
    """Every part of one hub node, and its start and stop."""

    def __init__(
        self,
        settings: Settings,
        *,
        engine: Callable[[Quotas], Engine] | None = None,
        store: EventStore | None = None,
    ) -> None:
        """``engine`` builds the engine from the node's quotas (a networked
        engine shares each node's quota usage); default: from ``settings``.
        ``store`` replaces the store ``settings`` name."""
        self.settings = settings
        self.node_id = settings.node_id or "node"
        self.counters = Counters()
        self.verifier = TokenVerifier(
            secret=settings.jwt_secret.encode() if settings.jwt_secret else None,
            jwks=(
                JwksCache(settings.jwks_url, min_interval=settings.jwks_min_refresh)
                if settings.jwks_url
                else None
            ),
            orgs_claim=settings.orgs_claim_path,
            admin_claim=settings.admin_claim_path,
            audience=settings.jwt_audience,
            # The policies of Realtime Authorization read the claims.
            keep_claims=settings.database_url is not None,
        )
        self.quotas = Quotas(settings.org_quota, settings.quota_overrides)
        self.engine = (engine or functools.partial(_make_engine, settings, self.node_id))(
            self.quotas
        )
        self.store = store or _make_store(settings)
        # Realtime Authorization: the app's policies on realtime.messages,
        # read from the same database (none without one).
        self.policies = ChannelPolicies(settings.database_url) if settings.database_url else None
        # Writes are coalesced: the fan-out marks topics, the flusher writes
        # them once, after the loop's next poll (hub/flusher.py).
        self.flusher = Flusher()
        self.observers = Observers()
        # The fan-out's inner loops: compiled when built (hub/_writes.c).
        native = native_writes() if settings.native_writes else None
        if settings.native_writes and native is None:
            log.warning(
                "hub._writes is not built (no C compiler when the hub was installed?): "
                "the fan-out takes its pure-Python loops, slower in steady traffic "
                "(docs/benchmarks.md)"
            )
        self.channels = Channels(
            self.engine,
            node_id=self.node_id + ".",
            stats=self.counters,
            observers=self.observers,
            schedule=self.flusher.mark,
            writes=native or PYTHON_WRITES,
        )
        # What any node publishes comes back through the engine to here.
        self.engine.bind(self.channels)
        self.durable = DurableFeed(
            self.channels, self.store, replay_max=settings.replay_max, observers=self.observers
        )
        # Every appended event, from this node's own store listener.
        self.store.listen(self.durable.on_event)
        # Broadcasts sent from the database (realtime.send): every node
        # hears them itself, so each delivers them to its own subscribers
        # only (through the engine every subscriber would get one per node).
        self.store.listen_broadcasts(functools.partial(deliver_database_broadcast, self.channels))
        # Rows of tables tracked without an org column (hub track --no-org,
        # the publication supabase_realtime): to free-name channels only,
        # through the tables' RLS policies, checked in the same database.
        self.row_security = RowSecurity(settings.database_url) if settings.database_url else None
        self.rows = RowFeed(self.channels, self.row_security)
        self.store.listen_changes(self.rows.on_change)
        self.mother = Mother(
            channels=self.channels,
            store=self.store,
            node_id=self.node_id,
            redis_url=settings.redis_url,
            redis_prefix=settings.redis_prefix,
            redis_cluster=settings.redis_cluster,
            rate=settings.mother_rate,
        )
        self.observers.add(self.mother)
        # The command center's ranges beyond the hour: the mother's rollups
        # in SQL with a database, else bounded counters of what this node sees.
        self.history: History
        if settings.database_url:
            self.history = SqlHistory(
                settings.database_url,
                tenants=(
                    self.store.tenant_dsns if isinstance(self.store, FederatedStore) else list
                ),
            )
        else:
            memory = MemoryHistory()
            self.observers.add(memory)
            self.history = memory
        # Read models folded from the log, on one node of the cluster at a
        # time (the leader); every node's durable feed wakes it.
        self.projections = (
            ProjectionRunner(
                settings.database_url,
                application_name=f"hub {self.node_id}",
                timeout=settings.projection_timeout,
                retry=settings.projection_retry,
            )
            if settings.database_url and settings.projections
            else None
        )
        if self.projections is not None:
            self.observers.add(self.projections)
        self.gateway = Gateway(
            node_id=self.node_id,
            verifier=self.verifier,
            channels=self.channels,
            durable=self.durable,
            observers=self.observers,
            quotas=self.quotas,
            counters=self.counters,
            flusher=self.flusher,
            session_limits=settings.limits,
            socket_limits=SocketLimits(settings.max_frame_bytes, settings.max_outbox_bytes),
            policies=self.policies,
            tables=self.store.tracked_tables if self.store.has_tables else None,
        )
        self.metrics = metrics_registry(NodeCollector(self.node_id, self.counters, self.gauges))

    def gauges(self) -> Gauges:
        """The live numbers of ``/metrics``."""
        sessions = self.gateway.sessions
        projections = self.projections.state if self.projections else RunnerState()
        return Gauges(
            connections=len(sessions),
            channels=sum(len(session.subs) for session in sessions),
            topics=self.channels.topic_count,
            engine_ready=self.engine.ready,
            engine_reconnects=self.engine.reconnects,
            store_ready=self.store.ready,
            listener_reconnects=self.store.listener_reconnects,
            durable_delivered=self.durable.delivered,
            database_broadcasts=self.store.broadcasts_received,
            database_broadcasts_dropped=self.store.broadcasts_dropped,
            row_changes=self.store.changes_received,
            row_changes_dropped=self.store.changes_dropped,
            rows_delivered=self.rows.delivered,
            rows_dropped=self.rows.dropped,
            projection_leader=projections.leader,
            projection_lag=dict(projections.lag),
            projection_stopped=dict(projections.stopped),
            projection_applied=dict(projections.applied),
        )

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """Start the node, serve while the body runs, then stop it.

        Start, in order (nothing is served before the last step):

        1. the JWKS keys, when tokens are checked against a JWKS URL;
        2. the row feed and its checks' pool (it connects on first use), the
           event store, with its listener (from here on every appended
           event is announced, in seq order per org, and broadcasts sent
           from the database and rows of tables without an org column are
           delivered, best effort; the store follows the publication
           supabase_realtime), and the policies' pool (it connects on first
           use);
        3. the engine (subscriptions to other nodes);
        4. the write flusher, on this loop;
        5. the background tasks: the session ticker (token expiry, idle
           sockets), the mother (feed, shares, rebuild), with a database the
           projection runner (it leads when it gets the lock) and, with
           policies, the daily partitions of realtime.messages.

        Stop.  Under uvicorn, the first three steps are uvicorn's own
        shutdown, before this body ends:

        1. stop accepting connections;
        2. each open socket flushes what is queued and closes with 1012
           (:meth:`hub.transport.socket.HubSocket.shutdown`), so clients
           reconnect, elsewhere if they can;
        3. wait up to ``HUB_DRAIN_TIMEOUT`` seconds for them to go, then cut
           the rest;
        4. cancel the background tasks (the mother removes its share);
        5. stop the engine, then the policies' pool, the store, the row
           feed and its checks' pool.
        """
        if self.verifier.jwks is not None:
            await self.verifier.jwks.load()
        self.rows.start()
        if self.row_security is not None:
            await self.row_security.start()
        try:
            async with self._serving():
                yield
        finally:
            await self.rows.stop()
            if self.row_security is not None:
                await self.row_security.stop()

    @contextlib.asynccontextmanager
    async def _serving(self) -> AsyncIterator[None]:
        """Steps 2 (from the store on) to 5 of :meth:`running`, and their stop."""
        await self.store.start()
        try:
            if self.policies is not None:
                await self.policies.start()
            await self.engine.start()
            try:
                self.flusher.start(asyncio.get_running_loop())
                async with anyio.create_task_group() as tasks:
                    tasks.start_soon(self.gateway.tick_forever)
                    tasks.start_soon(self.mother.run)
                    if self.projections is not None:
                        tasks.start_soon(self.projections.run)
                    if self.policies is not None:
                        tasks.start_soon(_keep_partitions, self.policies)
                    yield
                    tasks.cancel_scope.cancel()
            finally:
                await self.engine.stop()
        finally:
            await self.history.stop()
            if self.policies is not None:
                await self.policies.stop()
            await self.store.stop()


#: How often the daily partitions of realtime.messages are made ahead and
#: the old ones dropped (Supabase keeps 72 hours).
PARTITION_INTERVAL = 3600.0


async def _keep_partitions(policies: ChannelPolicies) -> None:
    """Keep realtime.messages partitioned as Supabase does: yesterday to
    three days ahead exist, those past the retention are dropped.  A
    failure is logged and retried at the next interval."""
    while True:
        try:
            await policies.create_partitions()
            await policies.drop_old_partitions()
        except Exception as exc:
            log.warning("realtime.messages partitions: %s", exc)
        await anyio.sleep(PARTITION_INTERVAL)


def _make_engine(settings: Settings, node_id: str, quotas: Quotas) -> Engine:
    if settings.redis_url:
        from hub.engine.redis import RedisEngine

        return RedisEngine(
            settings.redis_url,
            node_id=node_id,
            prefix=settings.redis_prefix,
            sharded=settings.redis_sharded,
            cluster=settings.redis_cluster,
            node_timeout=settings.node_timeout,
            quotas=quotas,
        )
    return MemoryEngine(quotas=quotas)


def _make_store(settings: Settings) -> EventStore:
    if settings.database_url:
        from hub.store.federation import TENANT_POLL_INTERVAL, TENANT_POOL_IDLE, TENANT_POOL_MAX
        from hub.store.postgres import PostgresStore

        # One record of the last seq announced per org for every database's
        # listener: an org that moves goes on from where it was.
        announced: dict[str, int] = {}

        def tenant(dsn: str, shared: dict[str, int]) -> PostgresStore:
            return PostgresStore(
                dsn,
                pool_min=0,
                pool_max=TENANT_POOL_MAX,
                pool_idle=TENANT_POOL_IDLE,
                publication_interval=TENANT_POLL_INTERVAL,
                application_name="hub tenant",
                retention=settings.retention_seconds,
                archive_dir=settings.archive_dir,
                announced=shared,
            )

        def runner(dsn: str) -> ProjectionRunner:
            return ProjectionRunner(
                dsn,
                application_name=f"hub {settings.node_id}",
                timeout=settings.projection_timeout,
                retry=settings.projection_retry,
            )

        control = PostgresStore(
            settings.database_url,
            retention=settings.retention_seconds,
            archive_dir=settings.archive_dir,
            announced=announced,
        )
        return FederatedStore(
            control,
            make_store=tenant,
            runner=runner if settings.projections else None,
            announced=announced,
        )
    from hub.store.memory import MemoryStore

    return MemoryStore(max_events_per_org=settings.memory_events_per_org)
