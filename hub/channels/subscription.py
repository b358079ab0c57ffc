"""One channel joined by one socket: what it asked for, and where it stands
in the durable stream.  No I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hub.auth.principal import Principal
from hub.channels.changes import Binding
from hub.channels.topics import Topic
from hub.outbox import Outbox
from hub.protocol import TOPIC_PREFIX, Vsn


@dataclass(eq=False, slots=True)
class Subscription:
    """One channel joined by one socket.  Identity is the object itself."""

    topic: Topic
    join_ref: str | None
    vsn: Vsn
    outbox: Outbox
    principal: Principal
    conn_id: str
    echo_self: bool = False
    ack: bool = False
    presence_key: str = ""
    presence_enabled: bool = True
    bindings: list[Binding] = field(default_factory=list)
    #: False once unsubscribed; async work (a replay) checks it on resume.
    active: bool = True
    #: The highest durable seq it took itself; lower or equal ones are
    #: duplicates.  Not moved once settled (every later live seq is higher).
    durable_seq: int = 0
    #: While a replay runs, live durable events wait here (see durable.py).
    replay_buffer: list[Any] | None = None
    #: Set when a replay was truncated: live durable events would leave a
    #: gap, so none are delivered until the client rejoins.
    durable_paused: bool = False
    #: True while it takes every live durable event as it comes: it asked
    #: for no replay, or its replay has run and it took a live event since
    #: (so none it holds is ahead of the live stream, which the store's
    #: listener gives once and in order).  The fan-out sets it (see
    #: :meth:`~hub.channels.fanout.Channels.deliver_durable`); while every
    #: subscription of a topic is settled, durable events go to them as one
    #: broadcast without asking each, and ``durable_seq`` stays where it was.
    durable_settled: bool = True
    #: What Realtime Authorization allows on a private channel (public and
    #: reserved channels: everything).  Reads are decided at the join;
    #: writes at the first broadcast and the first track (None: not asked
    #: yet), then kept for the channel's life.
    #: Orgs whose rows a free-name channel's postgres_changes bindings are
    #: indexed under (its principal's orgs; None: every org, service_role).
    bound_orgs: tuple[str, ...] | None = ()
    read_broadcast: bool = True
    read_presence: bool = True
    write_broadcast: bool | None = True
    write_presence: bool | None = True

    def __post_init__(self) -> None:
        if self.replay_buffer is not None or self.durable_paused:
            self.durable_settled = False

    @property
    def wire_topic(self) -> str:
        return TOPIC_PREFIX + self.topic.text

    def take_durable(self, seq: int, event: object, *, own: bool = True) -> bool:
        """The one rule for accepting durable event ``seq`` (``event`` is
        what the replay buffer keeps): each is taken at most once and in
        order (``seq`` above :attr:`durable_seq`), none while paused, and
        while a replay reads the store it waits in :attr:`replay_buffer`.
        True when the caller must deliver it now.

        ``own`` is False for an event of another stream than this channel's
        org (rows of the subscriber's orgs reaching a free-name channel):
        its seq is not this channel's, so only the pause applies; the store
        listener already gives each once and in order."""
        if self.durable_paused:
            return False
        if not own:
            return True
        if seq <= self.durable_seq:
            return False
        if self.replay_buffer is not None:
            self.replay_buffer.append(event)
            return False
        self.durable_seq = seq
        return True
