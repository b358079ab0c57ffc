"""Locust scenarios for the hub.

Seven kinds of users, all configurable from the command line:

* ``MemberUser``: a WebSocket client speaking the Supabase protocol.  It
  connects, joins ``realtime:org:<its org>`` (``broadcast.ack`` on), tracks
  its presence, then publishes broadcasts carrying ``{"t": time.time()}``.
  Every broadcast it *receives* is reported to locust as request type ``WS``
  named ``broadcast latency`` (publish to receipt, ms); durable events from
  the REST publishers as ``durable latency``.  Joins, presence tracks and
  acked publishes are reported with their round-trip time.
* ``RestPublisher``: appends durable events with ``POST /api/orgs/{org}/events``
  (payload carries the same timestamp), and now and then a REST broadcast.
* ``DashboardWatcher``: joins the admin topic ``mother`` with a
  ``service_role`` token and reports every update it receives.
* ``ChurnUser``: connects, joins, holds the connection a little, disconnects,
  again and again.
* ``PublicRoomUser``: an ordinary Supabase app's client on a **public**
  channel with a free name, ``realtime:room:<--room-prefix><n % --rooms>``
  (``config.private = false``, any valid token): tracks its presence and
  publishes acked broadcasts; receipts are ``public broadcast latency``.
* ``PrivateRoomUser``: the same free names joined **private**
  (``config.private = true``), authorized by Realtime Authorization: its
  token's ``sub`` is a member uuid of ``loadtest/policies.py`` and the
  hub's database must hold those policies and members
  (``python -m loadtest.policies DSN`` with the same ``--private-users``,
  ``--rooms`` and ``--room-prefix``; the soak run and the short locust test
  install them).  Publishes acked broadcasts; receipts are ``private
  broadcast latency``.  A public and a private channel of one name are two
  channels: a room user that receives a message of the other kind reports
  a ``public/private mix`` failure.  Without the policies (or without a
  database) give ``--private-weight 0``.
* ``TodoUser``: ``postgres_changes`` over row security: a member's token,
  an INSERT binding on ``public.load_todos`` (RLS: its owner only; created
  by ``python -m loadtest.policies``), on a free name.  Receipts are ``rls
  change latency``; a row of another member, or one carrying the ungranted
  ``secret`` column, is an ``rls leak`` failure.  The rows come from
  ``python -m loadtest.policies DSN --write-todos RATE``; without the
  database give ``--todo-weight 0``.

Run it headless (the README's load-testing section says the same)::

    HUB_JWT_SECRET=... locust -f loadtest/locustfile.py --headless \\
        -u 50 -r 10 -t 60s --host http://127.0.0.1:4000 \\
        --orgs 5 --publish-rate 1 --rest-rate 2 --csv out --html out.html

Tokens are signed with ``--hub-secret`` (default: ``$HUB_JWT_SECRET``, the
hub's own secret) unless ``--member-token`` / ``--admin-token`` give ready
tokens.  A given member token is used for every org, so pair it with
``--org-prefix <its org> --org-exact``.

Options (``locust -f loadtest/locustfile.py --help`` lists them under
"Custom arguments"): ``--orgs``, ``--org-prefix``, ``--vsn``,
``--publish-rate``, ``--payload-bytes``, ``--rest-rate``, ``--rest-batch``,
``--churn-hold``, ``--rooms``, ``--room-prefix``, ``--private-users``,
``--member-weight``, ``--rest-weight``, ``--dashboard-weight``,
``--churn-weight``, ``--public-weight``, ``--private-weight``, ``--todo-weight``.

A WebSocket that closes without being asked to, a refused join and a missed
reply count as failures.
"""

from __future__ import annotations

import itertools
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

from locust import HttpUser, User, events, task
from locust.env import Environment
from locust.exception import StopUser

try:
    from loadtest import policies
    from loadtest.supabase_ws import Disconnected, HubSocket, Message, Refused, sign
except ModuleNotFoundError:  # locust started from outside the repository
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from loadtest import policies
    from loadtest.supabase_ws import Disconnected, HubSocket, Message, Refused, sign

WS = "WS"
_ids = itertools.count(1)


@events.init_command_line_parser.add_listener
def _options(parser: Any) -> None:
    group = parser.add_argument_group("hub", "Options of the hub scenarios")
    group.add_argument(
        "--hub-secret",
        env_var="HUB_JWT_SECRET",
        default="",
        help="HS256 secret to sign tokens with (default: $HUB_JWT_SECRET)",
    )
    group.add_argument("--member-token", default="", help="use this token for every member")
    group.add_argument("--admin-token", default="", help="use this service_role token")
    group.add_argument("--orgs", type=int, default=5, help="number of orgs users spread over")
    group.add_argument("--org-prefix", default="load", help="org ids are <prefix><n>")
    group.add_argument(
        "--org-exact",
        action="store_true",
        default=False,
        help="use --org-prefix itself as the only org id",
    )
    group.add_argument(
        "--vsn", choices=["1.0.0", "2.0.0", "mixed"], default="mixed", help="serializer"
    )
    group.add_argument(
        "--publish-rate", type=float, default=1.0, help="broadcasts/s per member (0: none)"
    )
    group.add_argument("--payload-bytes", type=int, default=64, help="padding per message")
    group.add_argument(
        "--rest-rate", type=float, default=2.0, help="publish requests/s per REST publisher"
    )
    group.add_argument("--rest-batch", type=int, default=1, help="durable events per request")
    group.add_argument("--churn-hold", type=float, default=2.0, help="seconds a churn user stays")
    group.add_argument(
        "--rooms", type=int, default=policies.ROOMS, help="free-name rooms of the room users"
    )
    group.add_argument(
        "--room-prefix", default=policies.ROOM_PREFIX, help="rooms are room:<prefix><n>"
    )
    group.add_argument(
        "--private-users",
        type=int,
        default=policies.USERS,
        help="members installed by loadtest/policies.py (private users cycle over them)",
    )
    group.add_argument("--member-weight", type=int, default=10)
    group.add_argument("--rest-weight", type=int, default=1)
    group.add_argument("--dashboard-weight", type=int, default=1)
    group.add_argument("--churn-weight", type=int, default=2)
    group.add_argument("--public-weight", type=int, default=2)
    group.add_argument(
        "--private-weight",
        type=int,
        default=2,
        help="private room users (need the policies of loadtest/policies.py; 0: none)",
    )
    group.add_argument(
        "--todo-weight",
        type=int,
        default=1,
        help="postgres_changes users of public.load_todos (RLS; loadtest/policies.py; 0: none)",
    )


@events.init.add_listener
def _configure(environment: Environment, **_: Any) -> None:
    options = environment.parsed_options
    if options is None:
        return
    MemberUser.weight = options.member_weight
    RestPublisher.weight = options.rest_weight
    DashboardWatcher.weight = options.dashboard_weight
    ChurnUser.weight = options.churn_weight
    PublicRoomUser.weight = options.public_weight
    PrivateRoomUser.weight = options.private_weight
    TodoUser.weight = options.todo_weight
    if not options.hub_secret and not (options.member_token and options.admin_token):
        raise SystemExit(
            "locustfile: give --hub-secret (or HUB_JWT_SECRET), or both --member-token "
            "and --admin-token"
        )
    if (options.private_weight > 0 or options.todo_weight > 0) and not options.hub_secret:
        raise SystemExit(
            "locustfile: private room users and todo users sign their own tokens (sub = a "
            "member uuid): give --hub-secret, or --private-weight 0 --todo-weight 0"
        )


# -- helpers -------------------------------------------------------------------


def _options_of(user: User) -> Any:
    return user.environment.parsed_options


def _ws_url(host: str) -> str:
    base = host.rstrip("/")
    if base.startswith("https://"):
        base = "wss://" + base[len("https://") :]
    elif base.startswith("http://"):
        base = "ws://" + base[len("http://") :]
    return base + "/realtime/v1/websocket"


def _org(options: Any, n: int) -> str:
    if options.org_exact:
        return str(options.org_prefix)
    return f"{options.org_prefix}{n % max(1, options.orgs)}"


def _member_token(options: Any, sub: str, org: str) -> str:
    if options.member_token:
        return str(options.member_token)
    return sign(options.hub_secret, sub=sub, orgs=[org])


def _admin_token(options: Any) -> str:
    if options.admin_token:
        return str(options.admin_token)
    return sign(options.hub_secret, sub="locust-admin", role="service_role")


def _vsn(options: Any, n: int) -> str:
    if options.vsn == "mixed":
        return "2.0.0" if n % 2 else "1.0.0"
    return str(options.vsn)


def fire(
    environment: Environment,
    name: str,
    started: float,
    *,
    length: int = 0,
    exception: BaseException | None = None,
    elapsed_ms: float | None = None,
) -> None:
    """Report one WebSocket 'request' to locust."""
    if elapsed_ms is None:
        elapsed_ms = (time.perf_counter() - started) * 1000.0
    environment.events.request.fire(
        request_type=WS,
        name=name,
        response_time=elapsed_ms,
        response_length=length,
        exception=exception,
        context={},
    )


class _Timed:
    """``with _Timed(env, "join"):`` reports the block as one request."""

    def __init__(self, environment: Environment, name: str) -> None:
        self.environment = environment
        self.name = name

    def __enter__(self) -> _Timed:
        self.started = time.perf_counter()
        return self

    def __exit__(self, kind: Any, exc: BaseException | None, tb: Any) -> bool:
        if exc is None:
            fire(self.environment, self.name, self.started)
            return False
        if isinstance(exc, Refused | Disconnected | TimeoutError | OSError):
            fire(self.environment, self.name, self.started, exception=exc)
            # The user cannot go on without this step: stop it (counted).
            raise StopUser() from exc
        return False


class _SocketUser(User):
    """Shared parts of the WebSocket users: one socket, failures on
    unexpected closes, latency reports for timestamped broadcasts."""

    abstract = True

    def __init__(self, environment: Environment) -> None:
        super().__init__(environment)
        self.n = next(_ids)
        self.sock: HubSocket | None = None
        self.received = 0

    def open_socket(self, token: str, vsn: str, name: str = "connect") -> HubSocket:
        sock = HubSocket(
            _ws_url(self.host or ""),
            token,
            vsn=vsn,
            on_message=self.on_message,
            on_close=self.on_close,
        )
        started = time.perf_counter()
        try:
            sock.connect()
        except Exception as exc:
            fire(self.environment, name, started, exception=exc)
            raise StopUser() from exc
        fire(self.environment, name, started)
        self.sock = sock
        return sock

    def close_socket(self) -> None:
        sock, self.sock = self.sock, None
        if sock is not None:
            sock.close()

    def on_close(self, code: int | None, reason: str, expected: bool) -> None:
        if not expected:
            fire(
                self.environment,
                "unexpected close",
                time.perf_counter(),
                exception=Disconnected(f"closed by the hub: {code} {reason}"),
            )

    def on_message(self, message: Message) -> None:
        self.received += 1
        if message.event == "broadcast" and isinstance(message.payload, dict):
            body = message.payload.get("payload")
            meta = message.payload.get("meta")
            sent = body.get("t") if isinstance(body, dict) else None
            if isinstance(sent, int | float):
                name = "durable latency" if meta and "seq" in meta else "broadcast latency"
                fire(
                    self.environment,
                    name,
                    0.0,
                    length=message.size,
                    elapsed_ms=max(0.0, (message.received_at - sent) * 1000.0),
                )
        elif message.event == "system" and isinstance(message.payload, dict):
            if message.payload.get("status") == "error":
                fire(
                    self.environment,
                    "system error",
                    time.perf_counter(),
                    exception=Exception(str(message.payload.get("message"))),
                )
        elif message.event == "phx_close" and self.sock is not None:
            fire(
                self.environment,
                "channel closed",
                time.perf_counter(),
                exception=Exception(f"phx_close on {message.topic}"),
            )

    def on_stop(self) -> None:
        self.close_socket()


class MemberUser(_SocketUser):
    """A member of one org: receives, publishes, tracks presence."""

    weight = 10

    def wait_time(self) -> float:
        rate = _options_of(self).publish_rate
        return 1.0 / rate if rate > 0 else 5.0

    def on_start(self) -> None:
        options = _options_of(self)
        self.org = _org(options, self.n)
        self.topic = f"realtime:org:{self.org}"
        self.sub = f"member-{self.n}"
        self.pad = "x" * max(0, options.payload_bytes)
        sock = self.open_socket(_member_token(options, self.sub, self.org), _vsn(options, self.n))
        config = {
            "broadcast": {"self": False, "ack": True},
            "presence": {"key": self.sub, "enabled": True},
            "postgres_changes": [],
            "private": False,
        }
        with _Timed(self.environment, "join"):
            sock.join(self.topic, config)
        with _Timed(self.environment, "presence track"):
            sock.track(self.topic, {"user": self.sub, "online_at": time.time()})
        self.sent = 0

    @task
    def publish(self) -> None:
        if _options_of(self).publish_rate <= 0 or self.sock is None:
            return
        self.sent += 1
        payload = {"t": time.time(), "from": self.sub, "n": self.sent, "pad": self.pad}
        with _Timed(self.environment, "publish (ack)"):
            self.sock.acked_broadcast(self.topic, "load", payload)


class DashboardWatcher(_SocketUser):
    """An admin watching ``mother``; reports each update and heartbeats."""

    weight = 1

    def wait_time(self) -> float:
        return 5.0

    def on_start(self) -> None:
        self.last_update = time.perf_counter()
        sock = self.open_socket(_admin_token(_options_of(self)), "2.0.0")
        with _Timed(self.environment, "join mother"):
            sock.join("realtime:mother", {"broadcast": {"self": False}})

    def on_message(self, message: Message) -> None:
        if message.topic == "realtime:mother" and message.event not in (
            "presence_state",
            "presence_diff",
            "phx_close",
            "system",
        ):
            now = time.perf_counter()
            fire(
                self.environment,
                "mother update",
                0.0,
                length=message.size,
                elapsed_ms=(now - self.last_update) * 1000.0,
            )
            self.last_update = now
            return
        super().on_message(message)

    @task
    def heartbeat(self) -> None:
        if self.sock is not None:
            with _Timed(self.environment, "heartbeat"):
                self.sock.heartbeat()


class ChurnUser(_SocketUser):
    """Connects, joins, stays ``--churn-hold`` seconds, leaves; repeatedly."""

    weight = 2

    def wait_time(self) -> float:
        return random.uniform(0.1, 0.5)

    @task
    def churn(self) -> None:
        options = _options_of(self)
        org = _org(options, self.n + random.randrange(max(1, options.orgs)))
        sub = f"churn-{self.n}"
        sock = self.open_socket(
            _member_token(options, sub, org), _vsn(options, self.n), "churn connect"
        )
        with _Timed(self.environment, "churn join"):
            sock.join(f"realtime:org:{org}", {"presence": {"key": sub}})
        time.sleep(random.uniform(0.5, 1.5) * options.churn_hold)
        self.close_socket()


class _RoomUser(_SocketUser):
    """A client of a free-name room (``realtime:room:...``), public or
    private: publishes acked broadcasts, reports what it receives under its
    own names, and fails on a message of the other kind."""

    abstract = True
    private = False
    kind = "public"
    #: The token's ``sub`` (set by :meth:`token`).
    sub = ""

    def wait_time(self) -> float:
        rate = _options_of(self).publish_rate
        return 1.0 / rate if rate > 0 else 5.0

    def token(self, options: Any) -> str:
        raise NotImplementedError

    def on_start(self) -> None:
        options = _options_of(self)
        self.slot = self.n % max(1, options.private_users)
        self.topic = "realtime:" + policies.room_topic(
            options.room_prefix, options.rooms, self.slot
        )
        self.pad = "x" * max(0, options.payload_bytes)
        self.sent = 0
        sock = self.open_socket(self.token(options), _vsn(options, self.n), f"{self.kind} connect")
        config = {
            "broadcast": {"self": False, "ack": True},
            "presence": {"key": self.sub, "enabled": not self.private},
            "postgres_changes": [],
            "private": self.private,
        }
        with _Timed(self.environment, f"{self.kind} join"):
            sock.join(self.topic, config)
        if not self.private:
            with _Timed(self.environment, f"{self.kind} presence track"):
                sock.track(self.topic, {"user": self.sub, "online_at": time.time()})

    def on_message(self, message: Message) -> None:
        if message.event == "broadcast" and isinstance(message.payload, dict):
            body = message.payload.get("payload")
            if isinstance(body, dict) and "kind" in body:
                self.received += 1
                if body["kind"] != self.kind or message.topic != self.topic:
                    fire(
                        self.environment,
                        "public/private mix",
                        time.perf_counter(),
                        exception=Exception(
                            f"a {self.kind} user of {self.topic} received a {body['kind']} "
                            f"message of {message.topic}"
                        ),
                    )
                    return
                sent = body.get("t")
                if isinstance(sent, int | float):
                    fire(
                        self.environment,
                        f"{self.kind} broadcast latency",
                        0.0,
                        length=message.size,
                        elapsed_ms=max(0.0, (message.received_at - sent) * 1000.0),
                    )
                return
        super().on_message(message)

    @task
    def publish(self) -> None:
        if _options_of(self).publish_rate <= 0 or self.sock is None:
            return
        self.sent += 1
        payload = {
            "t": time.time(),
            "kind": self.kind,
            "from": self.sub,
            "n": self.sent,
            "pad": self.pad,
        }
        with _Timed(self.environment, f"{self.kind} publish (ack)"):
            self.sock.acked_broadcast(self.topic, "room", payload)


class PublicRoomUser(_RoomUser):
    """A public channel on a free name: any valid token may join it."""

    weight = 2

    def token(self, options: Any) -> str:
        self.sub = f"public-{self.n}"
        if options.member_token:
            return str(options.member_token)
        return sign(options.hub_secret, sub=self.sub)


class PrivateRoomUser(_RoomUser):
    """The same free names, private: the hub asks the app's policies
    (loadtest/policies.py) at the join and at the first broadcast."""

    weight = 2
    private = True
    kind = "private"

    def token(self, options: Any) -> str:
        self.sub = policies.member_id(self.slot)
        return sign(options.hub_secret, sub=self.sub)


class TodoUser(_SocketUser):
    """A Supabase app's ``postgres_changes`` listener on a table with row
    security (``public.load_todos`` of loadtest/policies.py): joins a free
    name with an INSERT binding and the token of one member, and must get
    only that member's rows, without the ungranted ``secret`` column.
    Receipts are ``rls change latency`` (write to receipt, from the row's
    ``written_at``); another member's row is an ``rls leak`` failure.  The
    rows come from ``python -m loadtest.policies DSN --write-todos RATE``
    (or the short locust test's writer)."""

    weight = 1

    def wait_time(self) -> float:
        return 5.0

    def on_start(self) -> None:
        options = _options_of(self)
        self.sub = policies.member_id(self.n % max(1, options.private_users))
        token = sign(options.hub_secret, sub=self.sub)
        sock = self.open_socket(token, _vsn(options, self.n), "todo connect")
        config = {
            "broadcast": {"self": False},
            "presence": {"enabled": False},
            "private": False,
            "postgres_changes": [{"event": "INSERT", "schema": "public", "table": "load_todos"}],
        }
        with _Timed(self.environment, "todo join"):
            sock.join(f"realtime:todos-{self.n}", config)

    def on_message(self, message: Message) -> None:
        if message.event != "postgres_changes" or not isinstance(message.payload, dict):
            super().on_message(message)
            return
        data = message.payload.get("data")
        record = data.get("record") if isinstance(data, dict) else None
        if not isinstance(record, dict):
            return
        if record.get("user_id") != self.sub or "secret" in record:
            fire(
                self.environment,
                "rls leak",
                time.perf_counter(),
                exception=Exception(
                    f"{self.sub} received {sorted(record)} of {record.get('user_id')}"
                ),
            )
            return
        written = record.get("written_at")
        if isinstance(written, int | float):
            fire(
                self.environment,
                "rls change latency",
                0.0,
                length=message.size,
                elapsed_ms=max(0.0, (message.received_at - written) * 1000.0),
            )

    @task
    def idle(self) -> None:
        """Nothing to send: the rows come from the database."""


class RestPublisher(HttpUser):
    """Appends durable events over REST (and some REST broadcasts)."""

    weight = 1

    def wait_time(self) -> float:
        rate = _options_of(self).rest_rate
        return 1.0 / rate if rate > 0 else 5.0

    def on_start(self) -> None:
        options = _options_of(self)
        self.n = next(_ids)
        self.org = _org(options, self.n)
        self.pad = "x" * max(0, options.payload_bytes)
        token = _member_token(options, f"publisher-{self.n}", self.org)
        self.headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        self.count = 0

    @task(5)
    def publish_durable(self) -> None:
        batch = []
        for _ in range(max(1, _options_of(self).rest_batch)):
            self.count += 1
            batch.append({"type": "load", "payload": {"t": time.time(), "n": self.count}})
        with self.client.post(
            f"/api/orgs/{self.org}/events",
            data=json.dumps(batch),
            headers=self.headers,
            name="POST /api/orgs/[org]/events",
            catch_response=True,
        ) as response:
            if response.status_code != 201:
                response.failure(f"{response.status_code}: {response.text[:200]}")

    @task(1)
    def rest_broadcast(self) -> None:
        message = {
            "topic": f"org:{self.org}",
            "event": "rest",
            "payload": {"t": time.time(), "pad": self.pad},
        }
        with self.client.post(
            "/realtime/v1/api/broadcast",
            data=json.dumps({"messages": [message]}),
            headers=self.headers,
            name="POST /realtime/v1/api/broadcast",
            catch_response=True,
        ) as response:
            if response.status_code != 202:
                response.failure(f"{response.status_code}: {response.text[:200]}")
