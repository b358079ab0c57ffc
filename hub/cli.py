"""The ``hub`` command: ``hub serve``, ``hub token``, the database commands."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime as dt
import gc
import json
import logging
import math
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

from hub import __version__
from hub.auth.principal import SERVICE_ROLE, parse_claim_path
from hub.auth.tokens import issue_token
from hub.config import Settings, add_arguments, load_settings, parse_retention
from hub.errors import ConfigError, HubError

log = logging.getLogger("hub")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hub", description="Supabase-compatible realtime hub.")
    parser.add_argument("--version", action="version", version=f"hub {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser(
        "serve",
        help="run the hub",
        description="Run the hub. Every flag can also be set with the HUB_* variable it names.",
    )
    add_arguments(serve)

    token = commands.add_parser(
        "token",
        help="print a token signed with HUB_JWT_SECRET (development and tests)",
    )
    token.add_argument("--sub", required=True, help="user id (`sub` claim)")
    token.add_argument("--org", action="append", default=[], help="org id; repeat for several")
    token.add_argument("--role", default="authenticated", help="`role` claim [authenticated]")
    token.add_argument("--ttl", type=float, default=3600.0, help="seconds until expiry [3600]")

    migrate = commands.add_parser(
        "migrate", help="create or upgrade the event store schema in HUB_DATABASE_URL"
    )
    migrate.add_argument("--database", metavar="DSN", help="a tenant database instead")
    track = commands.add_parser(
        "track", help="capture INSERT/UPDATE/DELETE of an app table as durable change events"
    )
    track.add_argument("table", help="SCHEMA.TABLE, or TABLE with --org-from-schema")
    columns = track.add_mutually_exclusive_group()
    columns.add_argument(
        "--org-column", default="org_id", help="column holding the org id [org_id]"
    )
    columns.add_argument(
        "--no-org",
        action="store_true",
        help="the table has no org column: its rows go to postgres_changes bindings on "
        "free-name channels (subject to the table's RLS policies), never to org: topics",
    )
    columns.add_argument(
        "--org-from-schema",
        metavar="PATTERN",
        help="schema per org: track TABLE in every schema matching PATTERN, such as "
        "'org_{org}', now and as schemas are created; the org id is the schema's {org}",
    )
    untrack = commands.add_parser("untrack", help="stop capturing an app table")
    untrack.add_argument("table", help="SCHEMA.TABLE, or TABLE with --org-from-schema")
    untrack.add_argument("--org-from-schema", metavar="PATTERN", help="as given to track")
    for command in (track, untrack):
        command.add_argument(
            "--database", metavar="DSN", help="a tenant database instead of HUB_DATABASE_URL"
        )

    orgs = commands.add_parser(
        "orgs",
        help="which database holds which org; move an org between them (docs/tenancy.md)",
        description="The registry lives in HUB_DATABASE_URL (the control database); "
        "running nodes follow it within a second.",
    )
    org_actions = orgs.add_subparsers(dest="action", required=True)
    org_add = org_actions.add_parser("add", help="place an org without events in a database")
    org_add.add_argument("org")
    org_add.add_argument("--database", metavar="DSN", required=True)
    org_actions.add_parser("list", help="every org with a database of its own, and moves")
    org_remove = org_actions.add_parser(
        "remove", help="unregister an org without events (it lives in the control database)"
    )
    org_remove.add_argument("org")
    org_move = org_actions.add_parser(
        "move", help="move an org's event log to another database while it is live"
    )
    org_move.add_argument("org")
    target = org_move.add_mutually_exclusive_group(required=True)
    target.add_argument("--to", metavar="DSN", help="target database, or 'control'")
    target.add_argument("--abort", action="store_true", help="roll back the move in progress")
    org_move.add_argument("--resume", action="store_true", help="finish the move in progress")
    org_move.add_argument(
        "--exec",
        dest="exec_cmd",
        metavar="CMD",
        help="shell command run while the org's writes are frozen, before the switch "
        "(HUB_MOVE_ORG, HUB_MOVE_SOURCE, HUB_MOVE_TARGET set); non-zero stops the move",
    )

    projections = commands.add_parser(
        "projections",
        help="read models folded from the event log (docs/projections.md)",
        description="Projections in HUB_DATABASE_URL; running hub nodes run them.",
    )
    actions = projections.add_subparsers(dest="action", required=True)
    add = actions.add_parser("add", help="register a projection")
    add.add_argument("name", help="[a-z_][a-z0-9_]*")
    add.add_argument(
        "--handler",
        required=True,
        help="SCHEMA.FUNCTION(hub.events), or with --batch "
        "SCHEMA.FUNCTION(text[], bigint[], bigint[])",
    )
    add.add_argument("--types", help="comma-separated event types it handles [all]")
    add.add_argument("--schema", default="public", help="schema of its read-model tables [public]")
    add.add_argument("--run-as", help="role the handler runs as [the hub's]")
    add.add_argument(
        "--batch", action="store_true", help="the handler takes (org, after_seq, upto_seq)"
    )
    actions.add_parser("list", help="each projection's position and lag per org")
    rebuild = actions.add_parser("rebuild", help="rebuild from the log and switch it in")
    rebuild.add_argument("name")
    rebuild.add_argument(
        "--until",
        type=_timestamp,
        help="ISO time: replay only events created up to it, into a new schema, left as is",
    )
    retry = actions.add_parser("retry", help="run a stopped projection again now")
    retry.add_argument("name")
    retry.add_argument("--org", help="only this org")
    remove = actions.add_parser("remove", help="unregister (its tables stay)")
    remove.add_argument("name")

    archive = commands.add_parser(
        "archive",
        help="write the event log's partitions past HUB_RETENTION to gzipped JSON lines, "
        "then drop them (docs/retention.md)",
    )
    archive.add_argument("--dir", required=True, type=Path, help="where the files go")
    archive.add_argument(
        "--retention", help="instead of HUB_RETENTION [30d]: Nd or Nh, at least a day"
    )
    archive.add_argument("--dry-run", action="store_true", help="only say what would go")

    publish = commands.add_parser(
        "publish",
        help="append a durable event through a running hub's REST API",
        description="Token: HUB_TOKEN, else a service_role token signed with HUB_JWT_SECRET.",
    )
    publish.add_argument("payload", help="the payload, as JSON")
    publish.add_argument("--org", required=True)
    publish.add_argument("--type", required=True, dest="event_type")
    publish.add_argument(
        "--url", default=os.environ.get("HUB_URL", "http://127.0.0.1:4000"), help="hub base URL"
    )
    return parser


def _dev_banner(settings: Settings) -> str:
    assert settings.jwt_secret is not None
    claim = settings.orgs_claim_path
    member = issue_token(
        settings.jwt_secret, sub="demo-user", orgs=["demo"], ttl=86400, orgs_claim=claim
    )
    admin = issue_token(settings.jwt_secret, sub="demo-admin", role=SERVICE_ROLE, ttl=86400)
    url = f"ws://{settings.host}:{settings.port}/realtime/v1/websocket"
    return (
        "\nhub is in DEV MODE: no HUB_JWT_SECRET or HUB_JWKS_URL, so tokens are signed with a\n"
        "random secret that lives as long as this process. Tokens valid for 24 h:\n\n"
        f"  member of org 'demo' (may join org:demo):\n    {member}\n\n"
        f"  service_role admin (may join every topic):\n    {admin}\n\n"
        f"  connect: {url}?apikey=<token>&vsn=2.0.0\n"
        f"  dashboard: http://{settings.host}:{settings.port}/dashboard#token={admin}\n"
        f"  supabase-js: createClient('http://{settings.host}:{settings.port}', <token>)\n"
    )


_TOKEN_IN_QUERY = re.compile(r"(apikey|access_token)=[^&\s\"]+")


class RedactTokens(logging.Filter):
    """uvicorn logs each WebSocket's path with its query string, which holds
    the client's JWT: replace it before any handler sees it."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(
                _TOKEN_IN_QUERY.sub(r"\1=REDACTED", arg) if isinstance(arg, str) else arg
                for arg in record.args
            )
        return True


async def preflight(settings: Settings) -> None:
    """Reach every dependency once before serving, so that a wrong URL, an
    unreachable server or an unmigrated database stops the hub at start-up
    with one clear line instead of a traceback from inside the lifespan."""
    if settings.jwks_url:
        from hub.auth.tokens import JwksCache

        await JwksCache(settings.jwks_url).load()
    if settings.redis_url:
        from hub.engine.redis import connect

        try:
            client = await connect(settings.redis_url, cluster=settings.redis_cluster, within=5)
        except ConfigError:
            raise
        except Exception as exc:
            raise ConfigError(f"HUB_REDIS_URL: cannot reach Redis: {exc}") from None
        await client.aclose()
    if settings.database_url:
        from hub.store.migrate import applied_versions, migrations

        try:
            applied = await asyncio.wait_for(applied_versions(settings.database_url), 10)
        except Exception as exc:
            raise ConfigError(f"HUB_DATABASE_URL: cannot use the database: {exc}") from None
        missing = [version for version, _ in migrations() if version not in applied]
        if missing:
            raise ConfigError(
                f"HUB_DATABASE_URL: schema not up to date (missing {', '.join(missing)}): "
                "run `hub migrate`"
            )


def uvicorn_config(app: Any, settings: Settings, *, loop: str = "uvloop", **extra: Any) -> Any:
    """How the hub runs under uvicorn (also used by the benchmark's
    in-process hub, so both measure the same server); ``extra`` goes to
    ``uvicorn.Config`` as it is."""
    import uvicorn

    from hub.transport.http import HubHttpProtocol

    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        # /realtime/v1/websocket is served by HubHttpProtocol itself; other
        # upgrade paths take uvicorn's sans-I/O websockets protocol and the
        # ASGI app.
        ws="websockets-sansio",
        # Frames are built once and written to many sockets unchanged, which
        # compression per socket would undo.
        ws_per_message_deflate=False,
        ws_max_size=settings.max_frame_bytes,
        # Liveness is the protocol's heartbeat (HUB_IDLE_TIMEOUT), not pings.
        ws_ping_interval=None,
        loop=loop,
        http=HubHttpProtocol,
        lifespan="on",
        log_level=settings.log_level,
        access_log=False,
        # SIGTERM: stop accepting, close every socket with 1012 (clients
        # reconnect elsewhere), wait this long for them, then exit.
        timeout_graceful_shutdown=math.ceil(settings.drain_timeout),
        server_header=False,
        **extra,
    )


#: Allocations between young collections (CPython's default is 700).
GC_THRESHOLD: Final = (10_000, 10, 10)


def tune_gc() -> None:
    """Make the cyclic garbage collector cheap for a server with many
    long-lived connections.  Call once, after the app is built.

    Every connection adds a few dozen tracked objects that live as long as
    it does.  With CPython's defaults, a burst of 12,000 connects ran about
    1,200 young and 8 full collections: 2.3 s of the hub's 11.5 CPU-seconds
    (measured with ``gc.callbacks`` in ``python -m loadtest.bench
    --scenarios capacity``).  Freezing what start-up built (modules, the
    app) takes it out of every later full collection, and a larger young
    generation lets most per-connection objects settle before a
    collection looks at them: the same burst then spends 0.6 s in 90
    collections, none of them full, and connects+joins per CPU-second went
    from about 1,040 to 1,440.  Young collections then pause for up to
    about 50 ms at 12,000 connections, during connect storms only (fan-out
    allocates little: frames are shared).
    """
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLD)


#: How ``hub serve --workers N`` hands its settings to each worker: as
#: JSON, exactly as the supervisor resolved them (flags, environment, and
#: a dev-mode secret, which every worker must share).
WORKER_SETTINGS: Final = "HUB_WORKER_SETTINGS"


def serve(settings: Settings) -> None:
    """Serve until SIGTERM or SIGINT: one process, or with ``workers`` > 1
    uvicorn's supervisor and that many worker processes sharing the
    listening socket, each a node of its own (:func:`worker_app`)."""
    import uvicorn

    _configure_logging(settings)
    if settings.dev_mode:
        print(_dev_banner(settings), flush=True)
    if settings.workers > 1:
        os.environ[WORKER_SETTINGS] = json.dumps(dataclasses.asdict(settings))
        config = uvicorn_config(
            f"{__name__}:worker_app", settings, factory=True, workers=settings.workers
        )
    else:
        from hub.app import create_app
        from hub.node import Node

        config = uvicorn_config(create_app(Node(settings)), settings)
    if settings.demo:
        from hub.aggregator.demo import start_in_thread

        assert settings.jwt_secret is not None, "--demo needs HUB_JWT_SECRET or dev mode"
        host = "127.0.0.1" if settings.host in ("0.0.0.0", "::") else settings.host
        start_in_thread(
            f"http://{host}:{settings.port}",
            settings.jwt_secret,
            orgs=settings.demo_orgs,
            orgs_claim=settings.orgs_claim_path,
        )
    _redact_uvicorn_logs()
    if settings.workers > 1:
        from uvicorn.supervisors import Multiprocess

        # The supervisor binds the port once; every worker accepts on it.
        # SIGTERM reaches every worker, and each drains as one node does.
        Multiprocess(config, sockets=[config.bind_socket()]).run()
        return
    tune_gc()
    uvicorn.Server(config).run()


def worker_app() -> Any:
    """The app of one worker of ``hub serve --workers N``: uvicorn's
    supervisor calls this in each worker process it starts.  The worker is
    a node named ``<node id>-<pid>``; the workers meet through Redis and
    the event store, as the nodes of a cluster do."""
    from hub.app import create_app
    from hub.node import Node

    settings = Settings(**json.loads(os.environ[WORKER_SETTINGS]))
    settings = dataclasses.replace(settings, node_id=f"{settings.node_id}-{os.getpid()}")
    _configure_logging(settings)
    _redact_uvicorn_logs()
    app = create_app(Node(settings))
    tune_gc()
    return app


def _configure_logging(settings: Settings) -> None:
    logging.basicConfig(
        level=settings.log_level.upper(),
        format=f"%(asctime)s %(levelname)s node={settings.node_id} %(name)s: %(message)s",
    )
    # httpx (the demo's client) would log every request at INFO.
    logging.getLogger("httpx").setLevel(logging.WARNING)


def _redact_uvicorn_logs() -> None:
    # uvicorn configures its loggers when its Config is built (and again in
    # each worker): filter them after that.
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).addFilter(RedactTokens())


def _timestamp(text: str) -> dt.datetime:
    try:
        value = dt.datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO time: {text!r}") from None
    return value if value.tzinfo else value.replace(tzinfo=dt.UTC)


async def _projections_command(args: argparse.Namespace) -> None:
    from hub.projections import catalog

    url = _database_url()
    if args.action == "add":
        types = [t.strip() for t in args.types.split(",") if t.strip()] if args.types else None
        await catalog.register(
            url,
            args.name,
            args.handler,
            types=types,
            schema=args.schema,
            run_as=args.run_as,
            batch=args.batch,
        )
        print(f"projection {args.name} registered")
    elif args.action == "list":
        known = await catalog.projections(url)
        positions = await catalog.positions(url)
        for item in known:
            handled = ",".join(item["event_types"]) if item["event_types"] else "all types"
            print(
                f"{item['name']}: {item['handler']} ({item['mode']}, {handled}) "
                f"-> schema {item['target_schema']}"
            )
            for pos in (p for p in positions if p.projection == item["name"]):
                state = f"stopped at seq {pos.error_seq}: {pos.error}" if pos.error else "running"
                print(f"  {pos.org}: seq {pos.seq}/{pos.head}, lag {pos.lag}, {state}")
    elif args.action == "rebuild":
        schema = await catalog.rebuild(url, args.name, until=args.until)
        if args.until is None:
            print(f"projection {args.name} rebuilt and switched in")
        else:
            print(f"projection {args.name} as of {args.until.isoformat()} is in schema {schema}")
    elif args.action == "retry":
        count = await catalog.retry(url, args.name, args.org)
        print(f"retried {count} stopped org(s)")
    else:
        await catalog.remove(url, args.name)
        print(f"projection {args.name} removed")


def _database_url() -> str:
    url = os.environ.get("HUB_DATABASE_URL")
    if not url:
        raise ConfigError("this command needs HUB_DATABASE_URL")
    return url


async def _orgs_command(args: argparse.Namespace) -> None:
    from hub.store import moves, registry

    url = _database_url()
    if args.action == "add":
        await registry.add(url, args.org, args.database)
        print(f"org {args.org} lives in {registry.display_name(args.database)}")
    elif args.action == "remove":
        name = await registry.remove(url, args.org)
        print(f"org {args.org} left {name}: it lives in the control database")
    elif args.action == "list":
        entries = await registry.entries(url)
        print(f"{'org':<24} {'database':<40} {'seq':>10}  move")
        for entry in entries:
            seq = "unreachable" if entry.seq is None else str(entry.seq)
            print(f"{entry.org:<24} {entry.database:<40} {seq:>10}  {entry.moving or ''}")
    elif args.abort:
        await moves.abort(url, args.org)
        print(f"the move of org {args.org} is rolled back")
    else:
        report = await moves.move(
            url, args.org, args.to, resume=args.resume, exec_cmd=args.exec_cmd
        )
        blocked = (
            f"; writes were blocked {report.frozen_for * 1000:.0f} ms"
            if report.frozen_for is not None
            else ""
        )
        print(
            f"moved org {report.org} to {report.target}: {report.seq} events "
            f"({report.copied} copied by this run){blocked}"
        )


async def _database_command(args: argparse.Namespace) -> None:
    from hub.store import tracking
    from hub.store.migrate import migrate

    url = args.database or _database_url()
    if args.command == "migrate":
        applied = await migrate(url)
        print(f"applied: {', '.join(applied)}" if applied else "schema is up to date")
    elif args.command == "track" and args.org_from_schema:
        done = await tracking.track_schemas(url, args.org_from_schema, args.table)
        for name, org in done.tables:
            print(f"tracking {name} (org {org})")
        for name in done.skipped:
            print(f"left alone: {name} is already tracked with an org column or --no-org")
        later = (
            "in the transaction that creates them (event trigger)"
            if done.event_trigger
            else "by running hub nodes within a second (no event trigger: the role is not "
            "a superuser; rows written before that are not captured)"
        )
        print(
            f"{args.table} in schemas {args.org_from_schema}: {len(done.tables)} tracked now; "
            f"tables created later are tracked {later}"
        )
    elif args.command == "untrack" and args.org_from_schema:
        for line in await tracking.untrack_schemas(url, args.org_from_schema, args.table):
            print(line)
        print(f"no longer tracking {args.table} in schemas {args.org_from_schema}")
    elif args.command == "track":
        if args.no_org:
            await tracking.track(url, args.table, None)
            print(f"tracking {args.table} (no org column)")
        else:
            await tracking.track(url, args.table, args.org_column)
            print(f"tracking {args.table} (org column {args.org_column})")
    else:
        await tracking.untrack(url, args.table)
        print(f"no longer tracking {args.table}")


async def _archive(args: argparse.Namespace) -> None:
    import asyncpg  # type: ignore[import-untyped, unused-ignore]

    from hub.store import retention
    from hub.store.migrate import migrate

    text = args.retention or os.environ.get("HUB_RETENTION") or "30d"
    try:
        seconds = parse_retention(text)
    except ValueError:
        raise ConfigError(f"{text!r} is not a retention: Nd or Nh, at least a day") from None
    if seconds is None:
        raise ConfigError("the retention is off: nothing is past it")
    url = _database_url()
    await migrate(url)
    conn = await asyncpg.connect(url, server_settings={"application_name": "hub archive"})
    try:
        lines = await retention.maintain(conn, seconds, args.dir, dry_run=args.dry_run)
    finally:
        await conn.close()
    for line in lines:
        print(line)
    if not lines:
        print("nothing is past the retention")


async def _publish(args: argparse.Namespace) -> dict[str, Any]:
    from hub.client.rest import HubClient

    try:
        payload = json.loads(args.payload)
    except ValueError as exc:
        raise ConfigError(f"payload is not valid JSON: {exc}") from None
    token = os.environ.get("HUB_TOKEN")
    if not token:
        secret = os.environ.get("HUB_JWT_SECRET")
        if not secret:
            raise ConfigError("hub publish needs HUB_TOKEN or HUB_JWT_SECRET")
        token = issue_token(secret, sub="hub-cli", role=SERVICE_ROLE, ttl=300)
    async with HubClient(args.url, token) as client:
        return await client.publish(args.org, args.event_type, payload)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "serve":
            settings = load_settings(vars(args), os.environ)
            asyncio.run(preflight(settings))
            serve(settings)
        elif args.command in ("migrate", "track", "untrack"):
            asyncio.run(_database_command(args))
        elif args.command == "projections":
            asyncio.run(_projections_command(args))
        elif args.command == "archive":
            asyncio.run(_archive(args))
        elif args.command == "orgs":
            asyncio.run(_orgs_command(args))
        elif args.command == "publish":
            print(json.dumps(asyncio.run(_publish(args))))
        elif args.command == "token":
            secret = os.environ.get("HUB_JWT_SECRET")
            if not secret:
                raise ConfigError("hub token needs HUB_JWT_SECRET")
            claim = parse_claim_path(os.environ.get("HUB_ORGS_CLAIM") or "app_metadata.orgs")
            print(
                issue_token(
                    secret,
                    sub=args.sub,
                    orgs=list(args.org),
                    role=args.role,
                    ttl=args.ttl,
                    orgs_claim=claim,
                )
            )
    except ConfigError as exc:
        print(f"hub: configuration error: {exc}", file=sys.stderr)
        return 2
    except HubError as exc:
        print(f"hub: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
