"""Settings from command-line flags and ``HUB_*`` environment variables.

Every setting is declared once in :data:`OPTIONS`; ``hub serve --help`` and
the README's table are generated from that list.  A flag beats its variable,
which beats the default.  :func:`load_settings` validates everything and
raises :class:`~hub.errors.ConfigError` naming the setting at fault, so a
mistake stops the hub at start-up, not at the first connection.  No I/O.
"""

from __future__ import annotations

import argparse
import json
import re
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from hub.auth.principal import parse_claim_path
from hub.errors import ConfigError
from hub.quotas import FREE_CHANNELS, OrgQuota, parse_overrides


@dataclass(frozen=True, slots=True)
class SessionLimits:
    """Per-connection limits.  Each is a ``HUB_*`` setting (see config)."""

    #: Channels one socket may have joined at once (Supabase: 100).
    max_channels: int = 100
    #: Sustained joins per second per socket, and the burst allowed above it.
    joins_per_second: float = 10.0
    join_burst: int = 20
    #: Largest broadcast payload or presence meta, in bytes of JSON.
    max_payload_bytes: int = 256 * 1024
    #: Seconds without any frame from the client before the socket is closed.
    idle_timeout: float = 60.0
    #: Refuse public channels on free names (Supabase's ``private_only``).
    private_only: bool = False
    #: Presence calls (track, untrack) one socket may make per
    #: PRESENCE_WINDOW seconds, as a bucket of that size refilled evenly
    #: (Supabase: 5 per 30 s).
    presence_calls: int = 5


#: The window of ``presence_calls`` (seconds), Supabase's.
PRESENCE_WINDOW = 30.0


@dataclass(frozen=True, slots=True)
class Option:
    name: str
    type: Callable[[str], Any]
    default: Any
    help: str
    #: Greater than zero (numbers only).
    positive: bool = False

    @property
    def env(self) -> str:
        return "HUB_" + self.name.upper()

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


def _text(value: str) -> str:
    return value


def _flag(value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(value)


_flag.__name__ = "boolean (1/0, true/false)"

_DURATION = re.compile(r"(\d+)\s*([dh])")


def parse_retention(text: str) -> float | None:
    """``30d``, ``36h`` or ``off`` as seconds (None: keep everything).
    Raises ValueError for anything else, and for less than one day: a
    partition of the event log is a day, so a shorter retention would drop
    today's events."""
    value = text.strip().lower()
    if value in ("off", "none", "forever"):
        return None
    match = _DURATION.fullmatch(value)
    if match is None:
        raise ValueError(text)
    seconds = int(match[1]) * (86_400 if match[2] == "d" else 3_600)
    if seconds < 86_400:
        raise ValueError(text)
    return float(seconds)


def _retention(value: str) -> str:
    parse_retention(value)
    return value


_retention.__name__ = "retention (Nd or Nh, at least a day, or off)"


OPTIONS: tuple[Option, ...] = (
    Option("host", _text, "127.0.0.1", "Interface to listen on."),
    Option("port", int, 4000, "TCP port to listen on.", positive=True),
    Option(
        "jwt_secret",
        _text,
        None,
        "HS256 secret of the Supabase project (at least 32 bytes). Without it "
        "and without HUB_JWKS_URL the hub runs in dev mode with a random secret.",
    ),
    Option(
        "jwks_url",
        _text,
        None,
        "JWKS URL for ES256/RS256 tokens, e.g. "
        "https://<ref>.supabase.co/auth/v1/.well-known/jwks.json.",
    ),
    Option(
        "jwks_min_refresh",
        float,
        30.0,
        "Seconds between JWKS refetches caused by unknown key ids.",
        positive=True,
    ),
    Option(
        "jwt_audience",
        _text,
        None,
        "If set, tokens must carry this `aud` (Supabase: authenticated).",
    ),
    Option(
        "orgs_claim",
        _text,
        "app_metadata.orgs",
        "Claim path of the org membership list or map; must be under app_metadata.",
    ),
    Option(
        "admin_claim",
        _text,
        "app_metadata.hub_admin",
        "Claim path that, when exactly true, makes a user a network admin "
        "(mother topic, dashboard); must be under app_metadata.",
    ),
    Option(
        "max_frame_bytes",
        int,
        1024 * 1024,
        "Largest WebSocket message accepted; larger ones close the socket with 1009.",
        positive=True,
    ),
    Option(
        "max_payload_bytes",
        int,
        256 * 1024,
        "Largest broadcast payload or presence meta (JSON bytes); larger ones are refused.",
        positive=True,
    ),
    Option(
        "max_outbox_bytes",
        int,
        4 * 1024 * 1024,
        "Outbound bytes one connection may have waiting; beyond it the socket "
        "is closed with 4001 (slow consumer).",
        positive=True,
    ),
    Option("max_channels", int, 100, "Channels one connection may join.", positive=True),
    Option(
        "joins_per_second",
        float,
        10.0,
        "Sustained joins per second per connection.",
        positive=True,
    ),
    Option("join_burst", int, 20, "Joins a connection may make at once.", positive=True),
    Option(
        "presence_calls",
        int,
        5,
        "Presence calls (track, untrack) per connection per 30 s, a bucket refilled evenly "
        "(Supabase: 5); past it a call gets `Client presence rate limit exceeded`.",
        positive=True,
    ),
    Option(
        "idle_timeout",
        float,
        60.0,
        "Seconds without a frame (clients heartbeat every 25 s) before closing with 4000.",
        positive=True,
    ),
    Option(
        "org_max_connections",
        int,
        1000,
        "Per org: connections holding a channel of the org (all nodes).",
        positive=True,
    ),
    Option(
        "org_joins_per_second",
        int,
        100,
        "Per org: joins of the org's topics per second (all nodes).",
        positive=True,
    ),
    Option(
        "org_messages_per_second",
        int,
        1000,
        "Per org: broadcasts to the org's topics per second, WebSocket and REST (all nodes).",
        positive=True,
    ),
    Option(
        "org_quotas",
        _text,
        None,
        'Per-org overrides as JSON, e.g. {"acme": {"max_connections": 50, '
        '"joins_per_second": 10, "messages_per_second": 100}}.',
    ),
    Option(
        "database_url",
        _text,
        None,
        "PostgreSQL DSN of the event store (run `hub migrate` first). Unset: an "
        "in-memory store, bounded by HUB_MEMORY_EVENTS_PER_ORG.",
    ),
    Option(
        "projections",
        _flag,
        True,
        "Run the projection runner on this node (with a database); false: this node never "
        "leads the projections (another node does).",
    ),
    Option(
        "projection_timeout",
        float,
        30.0,
        "Seconds a projection batch may run (PostgreSQL statement_timeout); an event whose "
        "handler runs longer stops its projection for that org.",
        positive=True,
    ),
    Option(
        "projection_retry",
        float,
        30.0,
        "Seconds between retries of a projection stopped by its handler's error, from the "
        "event that failed.",
        positive=True,
    ),
    Option(
        "retention",
        _retention,
        "30d",
        "How long the event log keeps events (with a database): Nd or Nh of at least a "
        "day, or off. Daily partitions wholly past it are dropped (archived first with "
        "HUB_ARCHIVE_DIR), unless a projection has not applied them yet (docs/retention.md).",
    ),
    Option(
        "archive_dir",
        _text,
        None,
        "Directory where the node that drops a partition past HUB_RETENTION first writes "
        "it as gzipped JSON lines. Unset: dropped without a copy.",
    ),
    Option(
        "memory_events_per_org",
        int,
        10_000,
        "Events the in-memory store keeps per org (oldest forgotten first).",
        positive=True,
    ),
    Option(
        "replay_max",
        int,
        10_000,
        "Most events one replay delivers; beyond it the client is told (ReplayTruncated).",
        positive=True,
    ),
    Option(
        "free_messages_per_second",
        int,
        1000,
        "Broadcasts per second to all free-name channels together (all nodes; Supabase's "
        "events per second); over it the sender's channel ends with Too many messages per second.",
        positive=True,
    ),
    Option(
        "private_only",
        _flag,
        False,
        "Refuse joins of public channels on free topic names (Supabase's private_only) "
        "with PrivateOnly; org:, user: and mother topics are not affected.",
    ),
    Option(
        "redis_url",
        _text,
        None,
        "Redis URL (redis://host:6379/0) joining several hub nodes. Unset: one node.",
    ),
    Option("redis_prefix", _text, "hub", "Prefix of every Redis channel and key this hub uses."),
    Option(
        "redis_sharded",
        _flag,
        False,
        "Use sharded pub/sub (SSUBSCRIBE/SPUBLISH, Redis 7+) on a single Redis; "
        "HUB_REDIS_CLUSTER implies it.",
    ),
    Option(
        "redis_cluster",
        _flag,
        False,
        "HUB_REDIS_URL names one node of a Redis Cluster: discover the others, publish "
        "and subscribe on each channel's shard, follow failovers. Implies HUB_REDIS_SHARDED.",
    ),
    Option(
        "native_writes",
        _flag,
        True,
        "Write fan-out frames with the compiled loop (hub/_writes.c) when it is built; "
        "false: the pure-Python path. A missing build is logged at start-up.",
    ),
    Option(
        "node_timeout",
        float,
        10.0,
        "Seconds without a heartbeat (every 1 s) before another node's presence is dropped.",
        positive=True,
    ),
    Option(
        "drain_timeout",
        float,
        10.0,
        "On SIGTERM: seconds to wait for clients to go after the 1012 close, then exit.",
        positive=True,
    ),
    Option(
        "mother_rate",
        float,
        1.0,
        "Updates per second sent to subscribers of the admin topic `mother`.",
        positive=True,
    ),
    Option(
        "demo",
        _flag,
        False,
        "Drive synthetic orgs and members against this hub, so the dashboard comes alive.",
    ),
    Option("demo_orgs", int, 8, "Orgs the demo drives.", positive=True),
    Option(
        "workers",
        int,
        1,
        "Processes serving the port, each a node of its own (node id `<HUB_NODE_ID>-<pid>`), "
        "joined through Redis; more than 1 needs HUB_REDIS_URL and HUB_DATABASE_URL.",
        positive=True,
    ),
    Option("node_id", _text, None, "This node's name in logs and metrics (default: random)."),
    Option("log_level", _text, "info", "debug, info, warning or error."),
)


@dataclass(frozen=True, slots=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 4000
    jwt_secret: str | None = None
    jwks_url: str | None = None
    jwks_min_refresh: float = 30.0
    jwt_audience: str | None = None
    orgs_claim: str = "app_metadata.orgs"
    admin_claim: str = "app_metadata.hub_admin"
    max_frame_bytes: int = 1024 * 1024
    max_payload_bytes: int = 256 * 1024
    max_outbox_bytes: int = 4 * 1024 * 1024
    max_channels: int = 100
    joins_per_second: float = 10.0
    join_burst: int = 20
    presence_calls: int = 5
    idle_timeout: float = 60.0
    org_max_connections: int = 1000
    org_joins_per_second: int = 100
    org_messages_per_second: int = 1000
    org_quotas: str | None = None
    database_url: str | None = None
    memory_events_per_org: int = 10_000
    projections: bool = True
    projection_timeout: float = 30.0
    projection_retry: float = 30.0
    retention: str = "30d"
    archive_dir: str | None = None
    replay_max: int = 10_000
    private_only: bool = False
    free_messages_per_second: int = 1000
    redis_url: str | None = None
    redis_prefix: str = "hub"
    redis_sharded: bool = False
    redis_cluster: bool = False
    native_writes: bool = True
    node_timeout: float = 10.0
    drain_timeout: float = 10.0
    mother_rate: float = 1.0
    demo: bool = False
    demo_orgs: int = 8
    workers: int = 1
    node_id: str | None = None
    log_level: str = "info"
    #: Set when neither a secret nor a JWKS URL was given.
    dev_mode: bool = field(default=False)

    @property
    def orgs_claim_path(self) -> tuple[str, ...]:
        return parse_claim_path(self.orgs_claim)

    @property
    def admin_claim_path(self) -> tuple[str, ...]:
        return parse_claim_path(self.admin_claim)

    @property
    def max_request_bytes(self) -> int:
        """Largest REST body.  Everything one request publishes reaches every
        subscriber's outbox before one write, so it must fit in half an
        outbox, or a prompt reader would be cut as a slow one.  (Requests
        that arrive together share a write: those of the two polls one
        flush covers, hub/flusher.py; only what the kernel does not take
        counts against the bound.)"""
        return min(self.max_payload_bytes * 100, self.max_outbox_bytes // 2)

    @property
    def org_quota(self) -> OrgQuota:
        return OrgQuota(
            max_connections=self.org_max_connections,
            joins_per_second=self.org_joins_per_second,
            messages_per_second=self.org_messages_per_second,
        )

    @property
    def org_quota_overrides(self) -> dict[str, OrgQuota]:
        if not self.org_quotas:
            return {}
        try:
            raw = json.loads(self.org_quotas)
        except ValueError as exc:
            raise ConfigError(f"HUB_ORG_QUOTAS: not valid JSON: {exc}") from None
        return parse_overrides(raw, self.org_quota)

    @property
    def quota_overrides(self) -> dict[str, OrgQuota]:
        """The per-org overrides, and the free-name channels' bucket."""
        free = OrgQuota(messages_per_second=self.free_messages_per_second)
        return {**self.org_quota_overrides, FREE_CHANNELS: free}

    @property
    def retention_seconds(self) -> float | None:
        """HUB_RETENTION in seconds; None keeps every event."""
        return parse_retention(self.retention)

    @property
    def limits(self) -> SessionLimits:
        return SessionLimits(
            max_channels=self.max_channels,
            joins_per_second=self.joins_per_second,
            join_burst=self.join_burst,
            max_payload_bytes=self.max_payload_bytes,
            idle_timeout=self.idle_timeout,
            private_only=self.private_only,
            presence_calls=self.presence_calls,
        )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one flag per option; help names the variable and the default."""
    for option in OPTIONS:
        default = "unset" if option.default is None else option.default
        extra: dict[str, Any] = {}
        if option.type is _flag:
            # `--demo` alone means on; `--demo 0` still works.
            extra = {"nargs": "?", "const": "1"}
        parser.add_argument(
            option.flag,
            dest=option.name,
            default=None,
            metavar=option.env,
            help=f"{option.help} [env {option.env}; default {default}]",
            **extra,
        )


def load_settings(
    flags: Mapping[str, Any] | None = None, env: Mapping[str, str] | None = None
) -> Settings:
    """Merge flags, environment and defaults, and validate the result."""
    flags = flags or {}
    env = env or {}
    values: dict[str, Any] = {}
    for option in OPTIONS:
        raw = flags.get(option.name)
        source = option.flag
        if raw is None:
            raw, source = env.get(option.env), option.env
        if raw == "" and option.name == "jwt_secret":
            # An empty secret is a broken deployment template, not a request
            # for dev mode (which would print an admin token to the logs).
            raise ConfigError(f"{source}: is set but empty")
        if raw is None or raw == "":
            values[option.name] = option.default
            continue
        try:
            value = option.type(raw) if isinstance(raw, str) else raw
        except ValueError:
            raise ConfigError(f"{source}: {raw!r} is not a valid {option.type.__name__}") from None
        if option.positive and not value > 0:
            raise ConfigError(f"{source}: must be greater than 0, got {raw!r}")
        values[option.name] = value
    settings = Settings(**values)
    return _validate(settings)


def _validate(settings: Settings) -> Settings:
    if settings.port > 65535:
        raise ConfigError(f"HUB_PORT: must be at most 65535, got {settings.port}")
    for name, variable in (("orgs_claim", "HUB_ORGS_CLAIM"), ("admin_claim", "HUB_ADMIN_CLAIM")):
        try:
            parse_claim_path(getattr(settings, name))
        except ConfigError as exc:
            raise ConfigError(f"{variable}: {exc}") from None
    settings.org_quota_overrides  # noqa: B018
    if settings.jwt_secret is not None and len(settings.jwt_secret.encode()) < 32:
        raise ConfigError("HUB_JWT_SECRET: must be at least 32 bytes")
    if settings.jwks_url is not None and not settings.jwks_url.startswith(("https://", "http://")):
        raise ConfigError("HUB_JWKS_URL: must be an http(s) URL")
    if settings.database_url is not None and not settings.database_url.startswith(
        ("postgres://", "postgresql://")
    ):
        raise ConfigError("HUB_DATABASE_URL: must be a postgresql:// DSN")
    if settings.redis_url is not None and not settings.redis_url.startswith(
        ("redis://", "rediss://", "unix://")
    ):
        raise ConfigError("HUB_REDIS_URL: must be a redis://, rediss:// or unix:// URL")
    if settings.redis_cluster and (
        settings.redis_url is None or settings.redis_url.startswith("unix://")
    ):
        raise ConfigError("HUB_REDIS_CLUSTER: needs HUB_REDIS_URL, a redis:// or rediss:// URL")
    if settings.node_timeout < 3:
        raise ConfigError("HUB_NODE_TIMEOUT: must be at least 3 s (heartbeats come every 1 s)")
    if settings.max_payload_bytes >= settings.max_frame_bytes:
        raise ConfigError("HUB_MAX_PAYLOAD_BYTES: must be smaller than HUB_MAX_FRAME_BYTES")
    if settings.max_outbox_bytes < 2 * settings.max_frame_bytes:
        raise ConfigError("HUB_MAX_OUTBOX_BYTES: must be at least twice HUB_MAX_FRAME_BYTES")
    if settings.workers > 1 and settings.redis_url is None:
        raise ConfigError(
            "HUB_WORKERS: more than one worker needs HUB_REDIS_URL: a worker reaches the "
            "sockets the others hold through it"
        )
    if settings.workers > 1 and settings.database_url is None:
        raise ConfigError(
            "HUB_WORKERS: more than one worker needs HUB_DATABASE_URL: each worker's "
            "in-memory store would hold only its own events, and a client reconnecting to "
            "another worker could not get what it missed"
        )
    if settings.log_level not in ("debug", "info", "warning", "error"):
        raise ConfigError("HUB_LOG_LEVEL: must be debug, info, warning or error")
    changes: dict[str, Any] = {}
    if settings.node_id is None:
        changes["node_id"] = secrets.token_hex(3)
    if settings.jwt_secret is None and settings.jwks_url is None:
        changes["dev_mode"] = True
        changes["jwt_secret"] = secrets.token_urlsafe(32)
    if changes:
        settings = Settings(**{**_as_dict(settings), **changes})
    return settings


def _as_dict(settings: Settings) -> dict[str, Any]:
    return {name: getattr(settings, name) for name in Settings.__dataclass_fields__}


def markdown_table() -> str:
    """The README's configuration table (``python -m hub.config``); a test
    checks the README holds exactly this."""
    rows = ["| variable | flag | default | meaning |", "|---|---|---|---|"]
    for opt in OPTIONS:
        default = "unset" if opt.default is None else opt.default
        rows.append(f"| `{opt.env}` | `{opt.flag}` | {default} | {opt.help} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(markdown_table())
