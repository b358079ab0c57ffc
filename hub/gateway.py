"""Where a connection meets the node: handshakes, sessions, and the frames
a socket hands over.

The transport (:mod:`hub.transport`) knows the node only through a
:class:`Gateway`: it asks it to check a handshake, to open a
:class:`~hub.session.Session` for an accepted socket, to feed it each
client message, and to close it.  The gateway keeps the node's live
sessions and ticks them (token expiry, idle sockets).  No socket I/O here.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, Final

import anyio

from hub.auth.channel_policies import ChannelPolicies, ChannelPolicyError, CheckRefused
from hub.auth.principal import Principal
from hub.auth.tokens import KeyNotCached, TokenVerifier
from hub.channels.changes import unmatched
from hub.channels.durable import DurableFeed, ReplayRequest
from hub.channels.fanout import Channels
from hub.channels.observer import Observers
from hub.channels.subscription import Subscription
from hub.config import SessionLimits
from hub.counters import Counters
from hub.errors import CloseCode
from hub.flusher import Flusher
from hub.outbox import Outbox
from hub.protocol import VERSIONS, Vsn
from hub.quotas import Quotas
from hub.session import PolicyCheck, Session, TablesCheck
from hub.store.base import Table

log = logging.getLogger(__name__)

#: How often sessions are checked for expired tokens and idle sockets.
TICK_SECONDS: Final = 1.0


@dataclass(frozen=True, slots=True)
class SocketLimits:
    """What bounds one socket: the largest message it may send, and the
    bytes it may leave unread before it is cut (``HUB_MAX_FRAME_BYTES``,
    ``HUB_MAX_OUTBOX_BYTES``)."""

    max_frame_bytes: int
    max_outbox_bytes: int


class Gateway:
    """The node's live sessions, and the one way a socket reaches them."""

    def __init__(
        self,
        *,
        node_id: str,
        verifier: TokenVerifier,
        channels: Channels,
        durable: DurableFeed,
        observers: Observers,
        quotas: Quotas,
        counters: Counters,
        flusher: Flusher,
        session_limits: SessionLimits,
        socket_limits: SocketLimits,
        policies: ChannelPolicies | None = None,
        tables: Callable[[bool], Awaitable[frozenset[Table] | None]] | None = None,
    ) -> None:
        self.node_id = node_id
        self.verifier = verifier
        self.channels = channels
        self.durable = durable
        self.observers = observers
        self.quotas = quotas
        self.counters = counters
        #: Socket outboxes schedule their writes here.
        self.flusher = flusher
        self.session_limits = session_limits
        self.socket_limits = socket_limits
        #: The app's Realtime Authorization policies (with a database).
        self.policies = policies
        #: The tracked tables (with a database): ``tables(fresh)``, where
        #: fresh asks for a new read rather than the last one.
        self.tables = tables
        self.sessions: set[Session] = set()
        self._conn_ids = itertools.count(1)

    # -- handshakes ---------------------------------------------------------

    def check_handshake(self, vsn: str, token: str) -> tuple[int, str] | None:
        """The refusal (HTTP status, message) for a bad vsn or a missing
        token, before any signature is checked; None when fine so far."""
        if vsn not in VERSIONS:
            return self.refuse_handshake(400, f"Unsupported vsn {vsn[:20]!r}")
        if not token:
            return self.refuse_handshake(401, "No apikey given")
        return None

    def refuse_handshake(self, status: int, message: str) -> tuple[int, str]:
        self.counters.connections_refused += 1
        log.info("handshake refused: %s", message)
        return status, message

    # -- sessions -----------------------------------------------------------

    def open_session(self, principal: Principal, vsn: Vsn, outbox: Outbox) -> Session:
        session = Session(
            conn_id=f"{self.node_id}-{next(self._conn_ids)}",
            vsn=vsn,
            principal=principal,
            verifier=self.verifier,
            channels=self.channels,
            outbox=outbox,
            limits=self.session_limits,
            stats=self.counters,
            quotas=self.quotas,
            policies=self.policies is not None,
            tables=self.tables is not None,
        )
        self.sessions.add(session)
        self.counters.connections_opened += 1
        self.observers.notify("connected", session.conn_id, principal)
        log.debug(
            "connection open conn=%s sub=%s role=%s vsn=%s",
            session.conn_id,
            principal.sub,
            principal.role,
            vsn,
        )
        return session

    def close_session(self, session: Session) -> None:
        self.sessions.discard(session)
        session.close()
        self.observers.notify("disconnected", session.conn_id, session.principal)
        log.debug(
            "connection closed conn=%s sub=%s code=%s frames_in=%d",
            session.conn_id,
            session.principal.sub,
            getattr(session.outbox, "close_code", None),
            session.frames_in,
        )

    def feed(self, session: Session, data: str | bytes) -> Coroutine[Any, Any, None] | None:
        """Hand one client frame to its session.

        Returns None when the frame is fully handled, or a coroutine the
        caller must run to completion before it feeds the next frame of this
        connection: a JWKS refresh and retry, the policy checks of a private
        channel, or the replays a join asked for (so later frames act on a
        channel that is fully live).
        """
        try:
            session.receive(data)
        except KeyNotCached:
            return self._refresh_then_feed(session, data)
        except Exception:
            self._fail(session)
            return None
        checks, replays = session.take_checks(), session.take_replays()
        return self._finish(session, checks, replays) if checks or replays else None

    async def _refresh_then_feed(self, session: Session, data: str | bytes) -> None:
        assert self.verifier.jwks is not None
        await self.verifier.jwks.refresh()
        try:
            session.receive(data, keys_refreshed=True)
        except Exception:
            self._fail(session)
            return
        await self._finish(session, session.take_checks(), session.take_replays())

    async def _finish(
        self,
        session: Session,
        checks: Sequence[PolicyCheck | TablesCheck],
        replays: Sequence[tuple[Subscription, ReplayRequest]],
    ) -> None:
        while checks:
            for check in checks:
                if isinstance(check, TablesCheck):
                    await self._check_tables(session, check)
                else:
                    await self._authorize(session, check)
            # A private join admitted by its check may have asked for a
            # replay, and its bindings for the tables.
            checks = session.take_checks()
        replays = [*replays, *session.take_replays()]
        for sub, request in replays:
            await self.durable.replay(sub, request)

    async def _authorize(self, session: Session, check: PolicyCheck) -> None:
        """Ask the app's policies, then let the session go on; never raises
        (a check that cannot be answered is a refusal with its reason)."""
        assert self.policies is not None  # sessions ask only when it is set
        claims = check.principal.claims
        try:
            if check.mode == "read":
                outcome = await self.policies.can_read(claims, check.topic, check.extensions)
            else:
                outcome = await self.policies.can_write_many(claims, check.topic, check.extensions)
        except CheckRefused:
            outcome = dict.fromkeys(check.extensions, False)
        except ChannelPolicyError as exc:
            log.warning("policy check of %s failed: %s", check.topic, exc)
            self._resume(session, check, None, exc.reason)
            return
        except Exception:
            log.exception("policy check of %s failed", check.topic)
            self._resume(session, check, None, "RlsPolicyError: the policy check failed")
            return
        self._resume(session, check, outcome, "")

    async def _check_tables(self, session: Session, check: TablesCheck) -> None:
        """Read the tracked tables (again, fresh, when the bindings name one
        the last read did not have: it may have just been tracked); a
        database that cannot answer leaves them unknown."""
        assert self.tables is not None  # sessions ask only when it is set
        try:
            tables = await self.tables(False)
            if tables is not None and unmatched(check.bindings, tables):
                tables = await self.tables(True)
        except Exception as exc:
            log.warning("cannot read the tracked tables: %r", exc)
            tables = None
        try:
            check.resume(tables)
        except Exception:
            self._fail(session)

    def _resume(
        self, session: Session, check: PolicyCheck, outcome: dict[str, bool] | None, error: str
    ) -> None:
        try:
            check.resume(outcome, error)
        except Exception:
            self._fail(session)

    def _fail(self, session: Session) -> None:
        # Unexpected: drop this connection (1011), keep the process.
        log.exception("connection %s failed", session.conn_id)
        session.outbox.close(CloseCode.INTERNAL_ERROR, "internal error")

    async def tick_forever(self) -> None:
        """Enforce the time-based rules of every session, once a second."""
        while True:
            await anyio.sleep(TICK_SECONDS)
            now = time.time()
            for session in list(self.sessions):
                session.tick(now)
