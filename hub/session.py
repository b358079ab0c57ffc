"""One socket's state machine: joins, refs, heartbeats, tokens and limits.

A :class:`Session` is fed decoded frames and the time; it answers by pushing
frames to its :class:`~hub.outbox.Outbox` and by calling the channels
registry.  It does no I/O and never awaits, so it is tested by feeding it
frames (see ``tests/unit/test_session.py``).

The one exception that escapes :meth:`Session.receive` is
:class:`~hub.auth.tokens.KeyNotCached`: the caller refreshes the JWKS and
feeds the same frame again.  Every handler verifies tokens before it changes
any state, so the retry is safe.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

import orjson

from hub.auth.policy import authorize_read, authorize_write
from hub.auth.principal import Principal
from hub.auth.tokens import KeyNotCached, TokenVerifier
from hub.channels.changes import (
    Binding,
    InvalidBinding,
    parse_bindings,
    unable_to_subscribe,
    unmatched,
)
from hub.channels.durable import ReplayRequest, parse_replay
from hub.channels.fanout import Channels
from hub.channels.subscription import Subscription
from hub.channels.topics import InvalidTopic, TopicNameRequired, parse_topic
from hub.config import PRESENCE_WINDOW, SessionLimits
from hub.counters import Counters
from hub.errors import AuthError, CloseCode, HubError, ProtocolError
from hub.outbox import Outbox
from hub.protocol import (
    MAX_BINARY_FIELD,
    TOPIC_PREFIX,
    BinaryBroadcast,
    Broadcast,
    Message,
    Vsn,
    decode,
    encode,
    encode_reply,
    is_event_name,
)
from hub.quotas import Quotas, quota_bucket
from hub.store.base import Table

PHOENIX: Final = "phoenix"

log = logging.getLogger(__name__)


class _TokenBucket:
    """A token bucket: ``rate`` per second, bursts up to ``burst`` (joins,
    presence calls)."""

    __slots__ = ("rate", "burst", "tokens", "stamp")

    def __init__(self, rate: float, burst: int, now: float) -> None:
        # burst and the first tokens are the int given (shared objects, no
        # float per socket); take() makes tokens a float.
        self.rate, self.burst = rate, burst
        self.tokens: float = burst
        self.stamp = now

    def take(self, now: float) -> bool:
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens < 1.0:
            return False
        self.tokens -= 1.0
        return True


class Refused(HubError):
    """A request is refused: the session replies ``phx_reply`` error with
    ``reason`` (``Code: message``) and the socket stays open."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


#: What a policy check answers: the extensions allowed (read: each asked
#: for; write: the one), or None when it could not be answered; the reason
#: (``Code: message``, safe to show the client) comes with it.
PolicyOutcome = dict[str, bool] | None


@dataclass(slots=True)
class PolicyCheck:
    """A step of a private channel that waits for the app's Realtime
    Authorization policies: a join (read), a first broadcast or track
    (write), a new token (read again).  The I/O layer runs the check and
    calls :attr:`resume` with the outcome before it feeds the next frame of
    this connection, so the connection's frames stay in order."""

    mode: Literal["read", "write"]
    topic: str
    extensions: tuple[str, ...]
    principal: Principal
    resume: Callable[[PolicyOutcome, str], None]


@dataclass(slots=True)
class TablesCheck:
    """A join with ``postgres_changes`` bindings waits for the tracked
    tables (with a database): the I/O layer reads them and calls
    :attr:`resume` with them (None: unknown), which sends Supabase's
    ``system`` message, ok or error.  Like Supabase's, that message comes
    after the join reply."""

    bindings: list[Binding]
    resume: Callable[[frozenset[Table] | None], None]


class Session:
    """The protocol state of one WebSocket connection."""

    # Tens of thousands of these live at once: no per-instance __dict__.
    __slots__ = (
        "conn_id",
        "vsn",
        "principal",
        "verifier",
        "channels",
        "outbox",
        "limits",
        "clock",
        "stats",
        "quotas",
        "last_seen",
        "_expiry_check_at",
        "_join_rate",
        "_presence_rate",
        "subs",
        "frames_in",
        "_keys_refreshed",
        "_replays",
        "policies",
        "_checks",
        "tables",
        "closed",
    )

    def __init__(
        self,
        *,
        conn_id: str,
        vsn: Vsn,
        principal: Principal,
        verifier: TokenVerifier,
        channels: Channels,
        outbox: Outbox,
        limits: SessionLimits | None = None,
        clock: Callable[[], float] = time.time,
        stats: Counters | None = None,
        quotas: Quotas | None = None,
        policies: bool = False,
        tables: bool = False,
    ) -> None:
        self.conn_id = conn_id
        self.vsn = vsn
        self.principal = principal
        self.verifier = verifier
        self.channels = channels
        self.outbox = outbox
        self.limits = limits = limits or SessionLimits()
        self.clock = clock
        self.stats = stats or Counters()
        self.quotas = quotas or Quotas()
        now = clock()
        self.last_seen = now
        self._join_rate = _TokenBucket(limits.joins_per_second, limits.join_burst, now)
        #: Made at the first presence call, full as it would be by then:
        #: most sockets never make one, and each idle socket's bytes count.
        self._presence_rate: _TokenBucket | None = None
        #: wire topic (``realtime:org:42``) -> subscription
        self.subs: dict[str, Subscription] = {}
        #: No channel's token expires before this: until then ``tick`` has
        #: only the idle check to do (lowered wherever a channel gets a
        #: principal, raised by ``tick`` itself).
        self._expiry_check_at = math.inf
        self.frames_in = 0
        self._keys_refreshed = False
        #: Replays asked for by joins, for the I/O layer to run (in order)
        #: before it feeds the next frame: see :meth:`take_replays`.
        #: None while there are none (the usual case: no list per session).
        self._replays: list[tuple[Subscription, ReplayRequest]] | None = None
        #: Whether the node reads Realtime Authorization policies (it has a
        #: database); without them private free-name channels are refused.
        self.policies = policies
        #: Whether the node knows its tracked tables (it has a database):
        #: then a join's bindings are checked against them (TablesCheck).
        self.tables = tables
        #: Checks for the I/O layer to run, in order: take_checks.  None
        #: while there are none.
        self._checks: list[PolicyCheck | TablesCheck] | None = None
        #: Set by close(): a check that ends later admits nothing.
        self.closed = False

    # -- input -------------------------------------------------------------

    def receive(self, data: str | bytes, *, keys_refreshed: bool = False) -> None:
        """Handle one WebSocket message from the client.

        Raises KeyNotCached when a token names an unknown JWKS key, unless
        ``keys_refreshed`` says the caller has just refreshed the keys: then
        the token is refused as signed by an unknown key.
        """
        self._keys_refreshed = keys_refreshed
        self.last_seen = self.clock()
        self.frames_in += 1
        self.stats.messages_in += 1
        self.stats.bytes_in += len(data)
        try:
            message = decode(data, self.vsn)
        except ProtocolError as exc:
            self.outbox.close(CloseCode.INVALID_FRAME, str(exc))
            return
        self.handle(message)

    def handle(self, msg: Message) -> None:
        if msg.topic == PHOENIX:
            if msg.event == "heartbeat":
                self._reply(msg, "ok", {})
            else:
                self._reply(
                    msg, "error", {"reason": f"unknown event {msg.event[:64]!r} on phoenix"}
                )
            return
        if msg.event == "phx_join":
            try:
                self._join(msg)
            except Refused as refusal:
                self.channels.refused(msg.topic.removeprefix(TOPIC_PREFIX), refusal.reason)
                self._reply(msg, "error", {"reason": refusal.reason})
            return
        sub = self.subs.get(msg.topic)
        if sub is None or (msg.join_ref is not None and msg.join_ref != sub.join_ref):
            # Phoenix's answer to a frame for a channel this socket has not
            # joined (or has since rejoined under a new join_ref).
            self._reply(msg, "error", {"reason": "unmatched topic"})
            return
        handler = _HANDLERS.get(msg.event)
        if handler is None:
            self._reply(msg, "error", {"reason": f"unknown event {msg.event[:64]!r}"})
            return
        try:
            handler(self, sub, msg)
        except Refused as refusal:
            self._reply(msg, "error", {"reason": refusal.reason})
        except KeyNotCached:
            raise
        except Exception:
            # A bug must cost one channel, not the socket or the process:
            # phx_error makes both clients rejoin after a second.
            log.exception(
                "channel %s failed on %r (conn %s)", sub.topic.text, msg.event, self.conn_id
            )
            self._unsubscribe(sub)
            self.subs.pop(sub.wire_topic, None)
            self.outbox.push(
                encode(self.vsn, sub.join_ref, sub.join_ref, sub.wire_topic, "phx_error", {})
            )

    def tick(self, now: float) -> None:
        """Enforce time-based rules: token expiry per channel, idle sockets."""
        if now - self.last_seen > self.limits.idle_timeout:
            self.outbox.close(CloseCode.IDLE_TIMEOUT, "no heartbeat")
            return
        # The hub ticks every session every second: at 19,000 sessions the
        # walk over each one's channels was a few percent of a core.
        if now < self._expiry_check_at:
            return
        earliest = math.inf
        for sub in list(self.subs.values()):
            if now >= sub.principal.exp:
                ago = int(now - sub.principal.exp)
                self._end_channel(sub, f"Token has expired {ago} seconds ago")
            else:
                earliest = min(earliest, sub.principal.exp)
        self._expiry_check_at = earliest

    def take_replays(self) -> Sequence[tuple[Subscription, ReplayRequest]]:
        replays, self._replays = self._replays, None
        return replays or ()

    def take_checks(self) -> Sequence[PolicyCheck | TablesCheck]:
        """Checks the last frame asked for; the caller runs each and calls
        its ``resume`` before feeding the next frame."""
        checks, self._checks = self._checks, None
        return checks or ()

    def _ask(self, check: PolicyCheck | TablesCheck) -> None:
        if self._checks is None:
            self._checks = []
        self._checks.append(check)

    def close(self) -> None:
        """The socket is gone: leave every channel (and its presence)."""
        self.closed = True
        for sub in self.subs.values():
            self._unsubscribe(sub)
        self.subs.clear()

    def _unsubscribe(self, sub: Subscription) -> None:
        self.channels.unsubscribe(sub)
        org = sub.topic.org
        if org is not None:
            self.quotas.release(self.conn_id, org)

    # -- output helpers ------------------------------------------------------

    def _reply(self, msg: Message, status: str, response: Any) -> None:
        join_ref = msg.join_ref if msg.topic != PHOENIX else None
        self.outbox.push(
            encode_reply(self.vsn, join_ref, msg.ref, msg.topic, status, response)  # type: ignore[arg-type]
        )

    def _push(self, sub: Subscription, event: str, payload: Any) -> None:
        self.outbox.push(encode(self.vsn, sub.join_ref, None, sub.wire_topic, event, payload))

    def _system(self, sub: Subscription, message: str, status: str, extension: str) -> None:
        self._push(
            sub,
            "system",
            {
                "channel": sub.topic.text,
                "extension": extension,
                "message": message,
                "status": status,
            },
        )

    def _end_channel(self, sub: Subscription, message: str) -> None:
        """End a channel the way Supabase does: a ``system`` error, then
        ``phx_close``.  Nothing more reaches it."""
        self._system(sub, message, "error", "system")
        self._close_channel(sub)

    def _close_channel(self, sub: Subscription) -> None:
        self._unsubscribe(sub)
        self.subs.pop(sub.wire_topic, None)
        self.outbox.push(
            encode(self.vsn, sub.join_ref, sub.join_ref, sub.wire_topic, "phx_close", {})
        )

    def _principal_for(self, token: object) -> Principal:
        """The channel's principal: its own token, else the connection's."""
        if token is None or token == "":
            principal = self.principal
            now = self.clock()
            if now >= principal.exp:
                raise Refused(
                    f"InvalidJWTToken: Token has expired {int(now - principal.exp)} seconds ago"
                )
            return principal
        try:
            return self._verify(token)
        except AuthError as exc:
            raise Refused(exc.reason) from None

    def _verify(self, token: object) -> Principal:
        try:
            return self.verifier.verify(token, self.clock())
        except KeyNotCached:
            if self._keys_refreshed:
                raise AuthError("InvalidJWTToken", "Unknown signing key") from None
            raise

    # -- handlers ------------------------------------------------------------

    def _join(self, msg: Message) -> None:
        wire_topic = msg.topic
        if not wire_topic.startswith(TOPIC_PREFIX):
            raise Refused("Unauthorized: channel topics start with realtime:")
        try:
            topic = parse_topic(wire_topic[len(TOPIC_PREFIX) :])
        except TopicNameRequired as exc:
            raise Refused(f"TopicNameRequired: {exc}") from None
        except InvalidTopic as exc:
            raise Refused(f"Unauthorized: {exc}: {wire_topic[:80]!r}") from None
        # Every attempt counts, refused ones too: each may cost a signature
        # check, so a flood of bad joins must hit the limit as well.
        if not self._join_rate.take(self.clock()):
            raise Refused("ClientJoinRateLimitReached: Too many joins per second")
        payload = msg.payload if isinstance(msg.payload, dict) else {}
        config = payload.get("config", {})
        if not isinstance(config, dict):
            raise Refused("InvalidJoinPayload: config must be an object")
        if topic.kind == "free":
            # A public and a private channel of one free name are two
            # channels; in reserved namespaces `private` changes nothing.
            if _private(config):
                topic = dataclasses.replace(topic, private=True)
            elif self.limits.private_only:
                raise Refused("PrivateOnly: This project only allows private channels")
        principal = self._principal_for(payload.get("access_token"))
        # A private free name is decided by the app's policies (service_role
        # bypasses them, as Supabase's role bypasses RLS).
        by_policy = topic.private and not principal.is_service
        if by_policy and not self.policies:
            raise Refused(
                "Unauthorized: private channels need Realtime Authorization, which reads "
                "the realtime.messages policies of HUB_DATABASE_URL; this hub has none"
            )
        if not by_policy:
            try:
                authorize_read(principal, topic)
            except AuthError as exc:
                raise Refused(exc.reason) from None
        previous = self.subs.get(wire_topic)
        if previous is None and len(self.subs) >= self.limits.max_channels:
            raise Refused("ChannelRateLimitReached: Too many channels")
        broadcast = _section(config, "broadcast")
        presence = _section(config, "presence")
        try:
            bindings = parse_bindings(config.get("postgres_changes"))
        except InvalidBinding as exc:
            raise Refused(f"InvalidJoinPayload: {exc}") from None
        replay: ReplayRequest | None = None
        if broadcast.get("replay") is not None:
            if topic.kind == "free" and not topic.private:
                raise Refused("UnableToReplayMessages: Replay is not allowed for public channels")
            if topic.kind != "free" and (topic.kind != "org" or topic.name is not None):
                raise Refused(
                    "InvalidJoinPayload: replay is only available on org:<id> topics "
                    "and private channels"
                )
            try:
                replay = parse_replay(broadcast["replay"])
            except ValueError as exc:
                raise Refused(f"InvalidJoinPayload: {exc}") from None
            if topic.kind == "free" and replay.since is None:
                # Supabase's replay of a private channel: realtime.messages
                # rows since a time; they have no seq.
                raise Refused("InvalidJoinPayload: replay on a private channel takes since (ms)")
        org = topic.org if not principal.is_service else None
        if org is not None:
            if not self.quotas.take_join(org):
                raise Refused("ClientJoinRateLimitReached: Too many joins per second")
            if not self.quotas.admit(self.conn_id, org):
                raise Refused("ConnectionRateLimitReached: Too many connected users")
        key = presence.get("key")
        sub = Subscription(
            topic=topic,
            join_ref=msg.join_ref,
            vsn=self.vsn,
            outbox=self.outbox,
            principal=principal,
            conn_id=self.conn_id,
            echo_self=broadcast.get("self") is True,
            ack=broadcast.get("ack") is True,
            # An empty key means "server generates one" (at the first track).
            presence_key=key if isinstance(key, str) else "",
            presence_enabled=presence.get("enabled", True) is not False,
            bindings=bindings,
            # Live durable events wait here until the replay has run (org
            # topics: a private channel's replay has no seq to join on).
            replay_buffer=[] if replay is not None and topic.kind == "org" else None,
        )
        if by_policy:
            # Writes are checked at the first broadcast and the first track.
            sub.write_broadcast = sub.write_presence = None
            extensions = ("broadcast", "presence") if sub.presence_enabled else ("broadcast",)

            def resume(outcome: PolicyOutcome, error: str) -> None:
                self._joined_by_policy(msg, sub, outcome, error, replay)

            self._ask(PolicyCheck("read", topic.text, extensions, principal, resume))
            return
        self._admit(msg, sub, replay)

    def _joined_by_policy(
        self,
        msg: Message,
        sub: Subscription,
        outcome: PolicyOutcome,
        error: str,
        replay: ReplayRequest | None,
    ) -> None:
        """The end of a private join: refused, or admitted with what the
        policies let it read."""
        if self.closed:
            return  # the socket went while the policies were asked
        topic = sub.topic.text
        if outcome is None:
            reason = error
        elif not any(outcome.values()):
            reason = "Unauthorized: You do not have permissions to read from this Channel topic: "
            reason += topic
        else:
            sub.read_broadcast = outcome.get("broadcast", False)
            sub.read_presence = outcome.get("presence", False)
            sub.presence_enabled = sub.presence_enabled and sub.read_presence
            if msg.topic in self.subs or len(self.subs) < self.limits.max_channels:
                self._admit(msg, sub, replay if sub.read_broadcast else None)
                return
            reason = "ChannelRateLimitReached: Too many channels"
        self.channels.refused(topic, reason)
        self._reply(msg, "error", {"reason": reason})

    def _admit(self, msg: Message, sub: Subscription, replay: ReplayRequest | None) -> None:
        """Subscribe ``sub`` and tell the client: the join succeeded."""
        previous = self.subs.get(msg.topic)
        if previous is not None:
            # A second join of one topic replaces the first (Phoenix).
            self._close_channel(previous)
        topic, principal, bindings = sub.topic, sub.principal, sub.bindings
        # Interned: every session joined to a topic shares the key's text.
        self.subs[sys.intern(msg.topic)] = sub
        self._expiry_check_at = min(self._expiry_check_at, principal.exp)
        self.channels.subscribe(sub)
        self.stats.joins += 1
        self._reply(msg, "ok", {"postgres_changes": [b.reply() for b in bindings]})
        # supabase-js buffers presence diffs until it has seen a state.
        if sub.read_presence:
            self._push(sub, "presence_state", self.channels.presence_state(topic.key))
        if bindings and self.tables:
            self._ask(TablesCheck(bindings, lambda tables: self._bindings_checked(sub, tables)))
        elif bindings:
            self._system(sub, "Subscribed to PostgreSQL", "ok", "postgres_changes")
        if replay is not None:
            if self._replays is None:
                self._replays = []
            self._replays.append((sub, replay))
        self.channels.joined(sub)

    def _bindings_checked(self, sub: Subscription, tables: frozenset[Table] | None) -> None:
        """Supabase's answer to a join's bindings: an error naming the first
        that matches no tracked table, else ok.  The bindings stay either
        way, so a table tracked later does deliver (Supabase would need a
        rejoin); unknown tables (None) count as matched."""
        if self.closed or self.subs.get(sub.wire_topic) is not sub:
            return  # left or replaced while the tables were read
        missing = unmatched(sub.bindings, tables) if tables is not None else []
        if missing:
            self._system(sub, unable_to_subscribe(missing[0]), "error", "postgres_changes")
        else:
            self._system(sub, "Subscribed to PostgreSQL", "ok", "postgres_changes")

    def _leave(self, sub: Subscription, msg: Message) -> None:
        self._reply(msg, "ok", {})
        self._close_channel(sub)

    def _check_live(self, sub: Subscription) -> bool:
        """End the channel if its token expired between ticks."""
        now = self.clock()
        if now >= sub.principal.exp:
            self._end_channel(sub, f"Token has expired {int(now - sub.principal.exp)} seconds ago")
            return False
        return True

    def _broadcast(self, sub: Subscription, msg: Message) -> None:
        if not self._check_live(sub):
            return
        body = msg.payload
        event: Any
        if isinstance(body, BinaryBroadcast):
            event, data, is_json = body.event, body.data, body.is_json
        elif isinstance(body, dict):
            event = body.get("event")
            if not isinstance(event, str):
                raise Refused("InvalidPayload: broadcast needs a string event")
            data, is_json = orjson.dumps(body.get("payload", {})), True
        else:
            raise Refused("InvalidPayload: broadcast payload must be an object")
        if not is_event_name(event):
            raise Refused(f"InvalidPayload: event must be 1 to {MAX_BINARY_FIELD} bytes")
        if len(data) > self.limits.max_payload_bytes:
            raise Refused("PayloadTooLarge: Payload size exceeds tenant limit")
        if sub.topic.private and not sub.principal.is_service:
            if sub.write_broadcast is not True:  # the app's policies decide
                self._by_policy(sub, msg, "broadcast", lambda: self._broadcast(sub, msg), None)
                return
        else:
            try:
                authorize_write(sub.principal, sub.topic)
            except AuthError as exc:
                raise Refused(exc.reason) from None
        bucket = quota_bucket(sub.topic)
        if (
            bucket is not None
            and not sub.principal.is_service
            and not self.quotas.take_message(bucket)
        ):
            # Supabase's answer to a tenant over its events per second.
            self._end_channel(sub, "Too many messages per second")
            return
        if sub.ack:
            self._reply(msg, "ok", {})
        origin = None if sub.echo_self else sub
        self.channels.publish(Broadcast(sub.topic.key, event, data, is_json=is_json, origin=origin))

    def _presence(self, sub: Subscription, msg: Message) -> None:
        if not self._check_live(sub):
            return
        body = msg.payload if isinstance(msg.payload, dict) else {}
        event = body.get("event")
        if event == "track":
            fields = body.get("payload", {})
            # Supabase's own replies for a bad track.
            if not isinstance(fields, dict):
                raise Refused("Presence track payload must be a map")
            if len(orjson.dumps(fields)) > self.limits.max_payload_bytes:
                raise Refused("Track message size exceeded")
            if sub.write_presence is not True:
                topic = sub.topic.text
                self._by_policy(
                    sub,
                    msg,
                    "presence",
                    lambda: self._presence(sub, msg),
                    lambda: self._reply(
                        msg,
                        "error",
                        {
                            "reason": "Unauthorized: You do not have permissions to write "
                            f"to this Channel topic: {topic}"
                        },
                    ),
                )
                return
            if not self._presence_call(sub, msg):
                return
            self._reply(msg, "ok", {})
            if not sub.presence_enabled and sub.read_presence:
                # Supabase turns presence on at the first track, even when
                # the join said enabled: false, and sends the state then
                # (never to a private channel without presence read).
                sub.presence_enabled = True
                self._push(sub, "presence_state", self.channels.presence_state(sub.topic.key))
            self.channels.track(sub, fields)
        elif event == "untrack":
            if not self._presence_call(sub, msg):
                return
            self._reply(msg, "ok", {})
            self.channels.untrack(sub)
        else:
            raise Refused("InvalidPayload: presence event must be track or untrack")

    def _presence_call(self, sub: Subscription, msg: Message) -> bool:
        """Count one presence call against the socket's bucket; past it,
        Supabase's ``system`` error and an error reply, and the call is
        dropped (the channel stays)."""
        now = self.clock()
        bucket = self._presence_rate
        if bucket is None:
            calls = self.limits.presence_calls
            bucket = self._presence_rate = _TokenBucket(calls / PRESENCE_WINDOW, calls, now)
        if bucket.take(now):
            return True
        reason = "Client presence rate limit exceeded"
        self._system(sub, reason, "error", "presence")
        self._reply(msg, "error", {"reason": reason})
        return False

    def _by_policy(
        self,
        sub: Subscription,
        msg: Message,
        extension: str,
        allowed: Callable[[], None],
        denied: Callable[[], None] | None,
    ) -> None:
        """A write to a private channel: denied when the policies said so
        (``denied``, or dropped silently as Supabase drops a broadcast),
        else checked once (the result is kept for the channel's life), then
        ``allowed`` runs again with the answer known."""
        known = sub.write_broadcast if extension == "broadcast" else sub.write_presence
        if known is False:
            if denied is not None:
                denied()
            return

        def resume(outcome: PolicyOutcome, error: str) -> None:
            if not sub.active:
                return  # left while the check ran
            if outcome is None:
                log.warning("write check of %s failed: %s", sub.topic.text, error)
                ok = False  # not cached: the next write asks again
            else:
                ok = outcome.get(extension, False)
                if extension == "broadcast":
                    sub.write_broadcast = ok
                else:
                    sub.write_presence = ok
            try:
                if ok:
                    allowed()
                elif denied is not None:
                    denied()
            except Refused as refusal:
                self._reply(msg, "error", {"reason": refusal.reason})

        self._ask(PolicyCheck("write", sub.topic.text, (extension,), sub.principal, resume))

    def _access_token(self, sub: Subscription, msg: Message) -> None:
        body = msg.payload if isinstance(msg.payload, dict) else {}
        token = body.get("access_token")
        if token is None:
            return
        try:
            principal = self._verify(token)
        except AuthError as exc:
            self._end_channel(sub, exc.message)
            return
        if sub.topic.private and not principal.is_service:
            self._reread(sub, principal)
            return
        try:
            authorize_read(principal, sub.topic)
        except AuthError:
            self._end_channel(
                sub,
                f"You no longer have permission to read from this Channel topic: {sub.topic.text}",
            )
            return
        sub.principal = principal
        self.channels.rebind(sub)
        self._expiry_check_at = min(self._expiry_check_at, principal.exp)

    def _reread(self, sub: Subscription, principal: Principal) -> None:
        """A new token on a private channel: the policies are asked again
        (the cache is cleared); a read it had and lost ends the channel."""
        extensions = ("broadcast", "presence")

        def resume(outcome: PolicyOutcome, error: str) -> None:
            if not sub.active:
                return
            lost = outcome is None or any(
                had and not outcome.get(ext, False)
                for ext, had in (("broadcast", sub.read_broadcast), ("presence", sub.read_presence))
            )
            if lost:
                self._end_channel(
                    sub,
                    "You no longer have permission to read from this Channel topic: "
                    f"{sub.topic.text}",
                )
                return
            sub.principal = principal
            self.channels.rebind(sub)
            sub.write_broadcast = sub.write_presence = None
            self._expiry_check_at = min(self._expiry_check_at, principal.exp)

        self._ask(PolicyCheck("read", sub.topic.text, extensions, principal, resume))


def _private(config: dict[str, Any]) -> bool:
    """``config.private``: true or false, or those words as strings in any
    case (as Supabase reads it); absent means public."""
    value = config.get("private")
    if value is None:
        return False
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    if not isinstance(value, bool):
        raise Refused("InvalidJoinPayload: config.private must be a boolean")
    return value


def _section(config: dict[str, Any], name: str) -> dict[str, Any]:
    value = config.get(name)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise Refused(f"InvalidJoinPayload: config.{name} must be an object")
    return value


_HANDLERS: dict[str, Callable[[Session, Subscription, Message], None]] = {
    "phx_leave": Session._leave,
    "broadcast": Session._broadcast,
    "presence": Session._presence,
    "access_token": Session._access_token,
}
