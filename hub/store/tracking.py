"""Change capture: track an app table so that its row changes become events.

``track`` installs one row trigger, ``hub_capture_change``, that runs the
shared function ``hub.capture_change(org_column)`` (see
``migrations/0002_capture_change.sql``) after every INSERT, UPDATE and
DELETE: the change is appended to the row's org, kind ``change``, type
``INSERT``/``UPDATE``/``DELETE``, in the writer's own transaction.  The
payload is ``{"schema", "table", "type", "record", "old_record", "columns",
"commit_timestamp"}``.  Rows whose org column is NULL are not captured; an
UPDATE that moves a row to another org becomes a DELETE for the old org and
an INSERT for the new one.  TRUNCATE is not captured.

``track(..., org_column=None)`` (``hub track TABLE --no-org``) tracks a
table without an org column instead: its trigger, ``hub_capture_public``,
runs ``hub.capture_public()`` (``migrations/0006_orgless_changes.sql``),
which never writes the event log: each change is one NOTIFY for the
``postgres_changes`` bindings of free-name channels, best effort, never for
an ``org:`` topic.  Tables added to the publication ``supabase_realtime``
get the same function under the trigger ``hub_capture_publication``,
installed and removed by the hub itself (:mod:`hub.store.postgres`).  A
table carries at most one of the three: tracking replaces the others, and
the publication leaves a table tracked by ``hub track`` alone.

``track_schemas(pattern, table)`` (``hub track --org-from-schema 'org_{org}'
posts``) serves the schema-per-org layout: it registers the pair in
``hub.schema_tracking`` and ``hub.sync_schema_tracking()``
(``migrations/0009_schema_per_org.sql``) puts the same trigger,
``hub_capture_change``, with the arguments ``('', pattern)`` on the table
``posts`` of every schema whose name matches, so every row of
``org_acme.posts`` is an event of org ``acme``.  Schemas and tables created
later are tracked by the event trigger ``hub_schema_tracking`` in the DDL's
own transaction when the hub's role could create it (a superuser), and by
every running node within a second otherwise (rows written before that are
not captured).  The same poll puts back a capture trigger that someone
dropped, and logs it.
"""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg  # type: ignore[import-untyped, unused-ignore]

from hub.store.base import StoreError
from hub.store.migrate import migrate

#: The trigger's name on every table tracked with an org column.
TRIGGER = "hub_capture_change"
#: The trigger of a table tracked without an org column (``--no-org``).
PUBLIC_TRIGGER = "hub_capture_public"
#: The trigger the publication supabase_realtime puts on its tables.
PUBLICATION_TRIGGER = "hub_capture_publication"
#: The event trigger that tracks tables of per-org schemas as they are created.
EVENT_TRIGGER = "hub_schema_tracking"
#: The placeholder for the org id in a schema pattern.
ORG_PLACEHOLDER = "{org}"
#: Every trigger that makes a table tracked.
TRIGGERS = (TRIGGER, PUBLIC_TRIGGER, PUBLICATION_TRIGGER)


#: Every tracked table (``$1``: :data:`TRIGGERS`): its schema and name, the
#: quoted ``schema.table``, and the trigger's arguments (the org column).
TRACKED_TABLES = (
    "SELECT n.nspname AS schema, c.relname AS table, "
    "format('%I.%I', n.nspname, c.relname) AS name, t.tgargs AS args "
    "FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid "
    "JOIN pg_namespace n ON n.oid = c.relnamespace "
    "WHERE t.tgname = ANY($1::text[]) ORDER BY 3"
)


class TrackingError(StoreError):
    """A table cannot be tracked: it does not exist, is not a table, or has
    no such org column."""


async def _connect(dsn: str) -> asyncpg.Connection:
    return await asyncpg.connect(dsn, server_settings={"application_name": "hub track"})


async def _resolve(conn: asyncpg.Connection, table: str) -> tuple[int, str]:
    """The oid and the quoted ``schema.table`` of ``table``, which may be
    schema-qualified and quoted as in SQL (unqualified names follow the
    search_path, usually ``public``)."""
    try:
        oid = await conn.fetchval("SELECT to_regclass($1)::oid", table)
    except asyncpg.PostgresError as exc:
        raise TrackingError(f"invalid table name {table!r}: {exc}") from None
    if oid is None:
        raise TrackingError(f"table {table!r} does not exist")
    row = await conn.fetchrow(
        "SELECT format('%I.%I', n.nspname, c.relname) AS name, c.relkind::text AS relkind "
        "FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = $1",
        oid,
    )
    if row["relkind"] not in ("r", "p"):
        raise TrackingError(f"{table!r} is not a table")
    return int(oid), str(row["name"])


async def track(dsn: str, table: str, org_column: str | None = "org_id") -> str:
    """Capture the row changes of ``table`` into the event store, grouped by
    ``org_column``; with ``org_column`` None, as changes without an org for
    free-name channels only.  Idempotent: tracking again replaces the
    trigger (so the org column can change).  Applies pending migrations
    first.

    Returns the quoted ``schema.table``.  Raises TrackingError when the table
    or the column does not exist.
    """
    await migrate(dsn)
    conn = await _connect(dsn)
    try:
        async with conn.transaction():
            oid, name = await _resolve(conn, table)
            for trigger in TRIGGERS:
                await conn.execute(f"DROP TRIGGER IF EXISTS {trigger} ON {name}")
            if org_column is None:
                await conn.execute(
                    f"CREATE TRIGGER {PUBLIC_TRIGGER} AFTER INSERT OR UPDATE OR DELETE ON {name} "
                    "FOR EACH ROW EXECUTE FUNCTION hub.capture_public()"
                )
                return name
            has_column = await conn.fetchval(
                "SELECT EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = $1 "
                "AND attname = $2 AND attnum > 0 AND NOT attisdropped)",
                oid,
                org_column,
            )
            if not has_column:
                raise TrackingError(f"table {name} has no column {org_column!r}")
            argument = await conn.fetchval("SELECT quote_literal($1)", org_column)
            await conn.execute(
                f"CREATE TRIGGER {TRIGGER} AFTER INSERT OR UPDATE OR DELETE ON {name} "
                f"FOR EACH ROW EXECUTE FUNCTION hub.capture_change({argument})"
            )
        return name
    finally:
        await conn.close()


def check_schema_pattern(pattern: str, table: str) -> None:
    """Refuse a schema pattern without exactly one ``{org}`` and a table name
    that is schema-qualified (the schema comes from the pattern)."""
    if pattern.count(ORG_PLACEHOLDER) != 1:
        raise TrackingError(
            f"schema pattern {pattern!r} must hold {ORG_PLACEHOLDER} exactly once, "
            "for example 'org_{org}'"
        )
    if not table or "." in table or '"' in table:
        raise TrackingError(
            f"give the table's bare name with --org-from-schema, not {table!r}: "
            "its schema comes from the pattern"
        )


@dataclass(frozen=True, slots=True)
class SchemaTracking:
    """What ``track_schemas`` did: the tables tracked now, and whether tables
    created later are tracked in their DDL's transaction (an event trigger)
    or by the nodes' poll."""

    tables: list[tuple[str, str]]  # (quoted schema.table, org)
    event_trigger: bool
    skipped: list[str]  # tables already tracked another way


async def track_schemas(dsn: str, pattern: str, table: str) -> SchemaTracking:
    """Track ``table`` in every schema matching ``pattern`` (``{org}`` marks
    the org id), now and as schemas and tables appear.  Idempotent.  Applies
    pending migrations first.  A matching table already tracked with an org
    column or ``--no-org`` is left as it is and listed in ``skipped``."""
    check_schema_pattern(pattern, table)
    await migrate(dsn)
    conn = await _connect(dsn)
    try:
        async with conn.transaction():
            await conn.execute(
                "INSERT INTO hub.schema_tracking (pattern, table_name) VALUES ($1, $2) "
                "ON CONFLICT DO NOTHING",
                pattern,
                table,
            )
            await conn.fetch("SELECT hub.sync_schema_tracking(true)")
        event_trigger = await _ensure_event_trigger(conn)
        rows = await conn.fetch(
            "SELECT format('%I.%I', n.nspname, c.relname) AS name, "
            "hub.org_of_schema($1, n.nspname) AS org, "
            "EXISTS (SELECT 1 FROM pg_trigger t WHERE t.tgrelid = c.oid "
            "AND t.tgname = $3 AND t.tgnargs = 2) AS ours "
            "FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE c.relname = $2 AND c.relkind IN ('r', 'p') AND NOT c.relispartition "
            "AND hub.org_of_schema($1, n.nspname) IS NOT NULL ORDER BY 1",
            pattern,
            table,
            TRIGGER,
        )
    finally:
        await conn.close()
    return SchemaTracking(
        tables=[(str(r["name"]), str(r["org"])) for r in rows if r["ours"]],
        event_trigger=event_trigger,
        skipped=[str(r["name"]) for r in rows if not r["ours"]],
    )


async def _ensure_event_trigger(conn: asyncpg.Connection) -> bool:
    """Create the event trigger unless it exists; False when the role may
    not (only a superuser may create event triggers)."""
    if await conn.fetchval("SELECT 1 FROM pg_event_trigger WHERE evtname = $1", EVENT_TRIGGER):
        return True
    try:
        await conn.execute(
            f"CREATE EVENT TRIGGER {EVENT_TRIGGER} ON ddl_command_end "
            "WHEN TAG IN ('CREATE TABLE', 'CREATE TABLE AS', 'SELECT INTO', 'CREATE SCHEMA', "
            "'ALTER TABLE', 'ALTER SCHEMA') EXECUTE FUNCTION hub.schema_tracking_ddl()"
        )
    except asyncpg.InsufficientPrivilegeError:
        return False
    except asyncpg.DuplicateObjectError:  # another `hub track` got there first
        pass
    return True


async def untrack_schemas(dsn: str, pattern: str, table: str) -> list[str]:
    """Stop tracking ``table`` in the schemas of ``pattern``; return one line
    per table no longer tracked.  Raises TrackingError when no such
    registration exists."""
    check_schema_pattern(pattern, table)
    conn = await _connect(dsn)
    try:
        async with conn.transaction():
            removed = await conn.fetchval(
                "DELETE FROM hub.schema_tracking WHERE pattern = $1 AND table_name = $2 "
                "RETURNING 1",
                pattern,
                table,
            )
            if not removed:
                raise TrackingError(f"{table!r} is not tracked in the schemas {pattern!r}")
            lines = await conn.fetch("SELECT hub.sync_schema_tracking(true) AS line")
    finally:
        await conn.close()
    return [str(r["line"]) for r in lines]


async def untrack(dsn: str, table: str) -> str:
    """Stop capturing ``table``'s changes (a no-op when it was not tracked).
    A table in the publication supabase_realtime is tracked again (without
    an org column) until it leaves the publication.

    Returns the quoted ``schema.table``; raises TrackingError when the table
    does not exist.
    """
    conn = await _connect(dsn)
    try:
        async with conn.transaction():
            _, name = await _resolve(conn, table)
            for trigger in (TRIGGER, PUBLIC_TRIGGER):
                await conn.execute(f"DROP TRIGGER IF EXISTS {trigger} ON {name}")
        return name
    finally:
        await conn.close()


async def tracked(dsn: str) -> list[tuple[str, str | None]]:
    """Every tracked table as ``(quoted schema.table, org)``: the org column,
    ``"schema:<pattern>"`` for a table of a per-org schema, None for a table
    tracked without an org."""
    conn = await _connect(dsn)
    try:
        rows = await conn.fetch(TRACKED_TABLES, list(TRIGGERS))
    finally:
        await conn.close()
    return [(str(row["name"]), _org_source(bytes(row["args"]))) for row in rows]


def _org_source(tgargs: bytes) -> str | None:
    # tgargs holds each argument followed by a NUL byte: none (no org),
    # the org column, or '' and the schema pattern.
    args = tgargs.split(b"\0")[:-1]
    if len(args) == 2:
        return f"schema:{args[1].decode()}"
    return args[0].decode() if args else None
