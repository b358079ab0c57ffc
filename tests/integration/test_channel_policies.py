"""Realtime Authorization against real PostgreSQL: migration 0004 and
hub.auth.channel_policies, with policies written as Supabase's documentation
writes them.

Each test gets its own database (migrated unless it needs the database as a
Supabase project leaves it), so policies of one test never meet another's.
"""

from __future__ import annotations

import asyncio
import datetime
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from hub.auth.channel_policies import (
    BROADCAST,
    PRESENCE,
    ChannelPolicies,
    CheckRefused,
    PolicyCheckFailed,
)
from hub.errors import HubError
from hub.store.migrate import applied_versions, migrate
from tests.support.pg import create_database, drop_database, new_database_name

BOTH = (BROADCAST, PRESENCE)


@pytest.fixture
async def blank_dsn() -> AsyncIterator[str]:
    """A database of its own, not migrated."""
    name = new_database_name()
    dsn = await create_database(name)
    try:
        yield dsn
    finally:
        await drop_database(name)


@pytest.fixture
async def dsn(blank_dsn: str) -> str:
    """A database of its own, migrated."""
    await migrate(blank_dsn)
    return blank_dsn


@pytest.fixture
async def admin(dsn: str) -> AsyncIterator[asyncpg.Connection]:
    """The app's migrations: policies and tables, as the database owner."""
    conn = await asyncpg.connect(dsn)
    try:
        yield conn
    finally:
        await conn.close()


@pytest.fixture
async def policies(dsn: str) -> AsyncIterator[ChannelPolicies]:
    checker = ChannelPolicies(dsn, max_size=4)
    await checker.start()
    try:
        yield checker
    finally:
        await checker.stop()


def user(email: str = "ann@acme.com", role: str = "authenticated", **extra: Any) -> dict[str, Any]:
    """Claims as Supabase Auth issues them."""
    return {
        "sub": str(uuid.uuid4()),
        "role": role,
        "email": email,
        "aud": "authenticated",
        "exp": int(time.time()) + 3600,
        "app_metadata": {"provider": "email"},
        **extra,
    }


async def no_rows_left(dsn: str) -> None:
    """Probe rows are never committed."""
    conn = await asyncpg.connect(dsn)
    try:
        assert await conn.fetchval("SELECT count(*) FROM realtime.messages") == 0
    finally:
        await conn.close()


# -- what the migration creates ------------------------------------------------------


async def test_migration_creates_supabase_objects(dsn: str, admin: asyncpg.Connection) -> None:
    assert "0004_realtime_authorization" in await applied_versions(dsn)
    table = await admin.fetchrow(
        "SELECT relkind::text, relrowsecurity FROM pg_class"
        " WHERE oid = 'realtime.messages'::regclass"
    )
    assert table["relkind"] == "p"  # partitioned
    assert table["relrowsecurity"] is True
    key = await admin.fetchval(
        "SELECT pg_get_constraintdef(oid) FROM pg_constraint"
        " WHERE conrelid = 'realtime.messages'::regclass AND contype = 'p'"
    )
    assert key == "PRIMARY KEY (id, inserted_at)"
    columns = {
        row["attname"]: row["typ"]
        for row in await admin.fetch(
            "SELECT attname, format_type(atttypid, atttypmod) AS typ FROM pg_attribute"
            " WHERE attrelid = 'realtime.messages'::regclass AND attnum > 0 AND NOT attisdropped"
        )
    }
    assert columns == {
        "id": "uuid",
        "topic": "text",
        "extension": "text",
        "payload": "jsonb",
        "binary_payload": "bytea",
        "event": "text",
        "private": "boolean",
        "updated_at": "timestamp without time zone",
        "inserted_at": "timestamp without time zone",
    }
    parts = [
        row["relname"]
        for row in await admin.fetch(
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
            " WHERE i.inhparent = 'realtime.messages'::regclass ORDER BY 1"
        )
    ]
    today = (await admin.fetchval("SELECT (now() AT TIME ZONE 'UTC')::date")).toordinal()
    expected = [
        "messages_" + datetime.date.fromordinal(today + d).strftime("%Y_%m_%d")
        for d in range(-1, 4)
    ]
    assert parts == expected
    for role in ("anon", "authenticated", "service_role"):
        row = await admin.fetchrow(
            "SELECT rolcanlogin, rolbypassrls FROM pg_roles WHERE rolname = $1", role
        )
        assert row is not None and row["rolcanlogin"] is False
        for privilege in ("SELECT", "INSERT", "UPDATE"):
            assert await admin.fetchval(
                "SELECT has_table_privilege($1, 'realtime.messages', $2)", role, privilege
            )
        assert await admin.fetchval("SELECT pg_has_role(current_user, $1, 'MEMBER')", role)
    bypass = await admin.fetchval(
        "SELECT rolbypassrls FROM pg_roles WHERE rolname = 'service_role'"
    )
    assert bypass is True
    async with admin.transaction():
        await admin.execute(
            "SELECT set_config('realtime.topic', 'room:1', true),"
            " set_config('request.jwt.claims', $1, true),"
            " set_config('request.jwt.claim.sub', $2, true),"
            " set_config('request.jwt.claim.role', 'authenticated', true)",
            '{"sub": "5f0c1c86-9d1b-4c0e-8a4e-2f7a8d1e0b11", "email": "a@b.c"}',
            "5f0c1c86-9d1b-4c0e-8a4e-2f7a8d1e0b11",
        )
        row = await admin.fetchrow(
            "SELECT realtime.topic() AS topic, auth.uid() AS uid, auth.role() AS role,"
            " auth.jwt() ->> 'email' AS email, auth.email() AS email2"
        )
    assert row["topic"] == "room:1"
    assert str(row["uid"]) == "5f0c1c86-9d1b-4c0e-8a4e-2f7a8d1e0b11"
    assert row["role"] == "authenticated"
    assert row["email"] == row["email2"] == "a@b.c"
    assert await admin.fetchval("SELECT realtime.topic()") is None


async def test_migrate_twice_changes_nothing(dsn: str, admin: asyncpg.Connection) -> None:
    before = await admin.fetchval("SELECT 'realtime.messages'::regclass::oid")
    assert await migrate(dsn) == []
    assert await migrate(dsn) == []
    assert await admin.fetchval("SELECT 'realtime.messages'::regclass::oid") == before


async def test_migrations_of_databases_racing_on_one_server_all_succeed() -> None:
    """Roles are cluster-wide: migrations of several databases at once must
    not trip over each other's CREATE ROLE or GRANT."""
    names = [new_database_name() for _ in range(3)]
    dsns = [await create_database(name) for name in names]
    try:
        results = await asyncio.gather(*(migrate(one) for one in dsns))
        assert all("0004_realtime_authorization" in applied for applied in results)
    finally:
        for name in names:
            await drop_database(name)


async def test_partition_functions_create_and_drop_by_retention(
    admin: asyncpg.Connection, policies: ChannelPolicies
) -> None:
    assert await policies.create_partitions() == []  # migrate made them
    ten_days_on = "now() + interval '10 days'"
    dropped = await admin.fetch(
        f"SELECT hub.realtime_drop_old_partitions(interval '72 hours', {ten_days_on}) AS name"
    )
    assert len(dropped) == 5
    # A day's partition stays until its last row is older than the retention.
    made = await admin.fetch(f"SELECT hub.realtime_create_partitions({ten_days_on}) AS name")
    assert len(made) == 5
    kept = await admin.fetch(
        f"SELECT hub.realtime_drop_old_partitions(interval '72 hours', {ten_days_on}) AS name"
    )
    assert kept == []
    # Four days on from there, the partitions of days 9 and 10 (their last
    # rows 72 hours old at day 14) go; days 11 to 13 stay.
    dropped_later = await admin.fetch(
        "SELECT hub.realtime_drop_old_partitions(interval '72 hours', now() + interval '14 days')"
        " AS name"
    )
    assert len(dropped_later) == 2
    created = await policies.create_partitions()
    assert len(created) == 5
    assert await policies.drop_old_partitions() == []


# -- the checks, with policies from Supabase's documentation ----------------------------


async def test_reader_who_may_not_send(
    dsn: str, admin: asyncpg.Connection, policies: ChannelPolicies
) -> None:
    await admin.execute(
        """
        CREATE POLICY "authenticated can receive room broadcasts"
        ON realtime.messages FOR SELECT TO authenticated
        USING (realtime.topic() LIKE 'room:%');
        """
    )
    reader = user()
    assert await policies.can_read(reader, "room:lobby", BOTH) == {
        BROADCAST: True,
        PRESENCE: True,
    }
    assert await policies.can_write(reader, "room:lobby", BROADCAST) is False
    assert await policies.can_write_many(reader, "room:lobby", BOTH) == {
        BROADCAST: False,
        PRESENCE: False,
    }
    assert await policies.can_read(reader, "other", BOTH) == {BROADCAST: False, PRESENCE: False}
    await no_rows_left(dsn)


async def test_user_with_no_policy_is_refused(
    admin: asyncpg.Connection, policies: ChannelPolicies
) -> None:
    await admin.execute(
        """
        CREATE POLICY "authenticated can receive"
        ON realtime.messages FOR SELECT TO authenticated USING (true);
        """
    )
    anon = {"role": "anon", "iss": "supabase", "exp": int(time.time()) + 60}
    assert await policies.can_read(anon, "room:1", BOTH) == {BROADCAST: False, PRESENCE: False}
    assert await policies.can_write(anon, "room:1", BROADCAST) is False
    assert await policies.can_read(user(), "room:1", [BROADCAST]) == {BROADCAST: True}


async def test_policy_on_jwt_claims_email_domain(
    admin: asyncpg.Connection, policies: ChannelPolicies
) -> None:
    await admin.execute(
        """
        CREATE POLICY "acme staff can receive"
        ON realtime.messages FOR SELECT TO authenticated
        USING ((current_setting('request.jwt.claims')::json ->> 'email') LIKE '%@acme.com');
        CREATE POLICY "acme staff can send"
        ON realtime.messages FOR INSERT TO authenticated
        WITH CHECK ((auth.jwt() ->> 'email') LIKE '%@acme.com');
        """
    )
    staff, outsider = user("ann@acme.com"), user("bob@example.com")
    assert await policies.can_read(staff, "acme", BOTH) == {BROADCAST: True, PRESENCE: True}
    assert await policies.can_write(staff, "acme", BROADCAST) is True
    assert await policies.can_read(outsider, "acme", BOTH) == {BROADCAST: False, PRESENCE: False}
    assert await policies.can_write(outsider, "acme", BROADCAST) is False


async def test_policy_joining_an_app_table(
    dsn: str, admin: asyncpg.Connection, policies: ChannelPolicies
) -> None:
    member, stranger = user(), user("eve@acme.com")
    await admin.execute(
        """
        CREATE TABLE public.rooms_users (user_id uuid NOT NULL, room_topic text NOT NULL);
        GRANT SELECT ON public.rooms_users TO authenticated;
        CREATE POLICY "room members can receive"
        ON realtime.messages FOR SELECT TO authenticated
        USING (EXISTS (SELECT 1 FROM rooms_users
                        WHERE user_id = auth.uid() AND room_topic = realtime.topic()));
        CREATE POLICY "room members can send"
        ON realtime.messages FOR INSERT TO authenticated
        WITH CHECK (EXISTS (SELECT 1 FROM rooms_users
                             WHERE user_id = auth.uid() AND room_topic = realtime.topic()));
        """
    )
    await admin.execute(
        "INSERT INTO rooms_users VALUES ($1, 'room:1'), ($1, 'room:2')", uuid.UUID(member["sub"])
    )
    assert await policies.can_read(member, "room:1", BOTH) == {BROADCAST: True, PRESENCE: True}
    assert await policies.can_write(member, "room:2", PRESENCE) is True
    assert await policies.can_read(member, "room:3", BOTH) == {BROADCAST: False, PRESENCE: False}
    assert await policies.can_read(stranger, "room:1", BOTH) == {BROADCAST: False, PRESENCE: False}
    assert await policies.can_write(stranger, "room:1", BROADCAST) is False
    # Membership is read at each check: the caller's cache decides how long
    # an answer lives, never this module.
    await admin.execute("DELETE FROM rooms_users WHERE room_topic = 'room:1'")
    assert await policies.can_read(member, "room:1", BOTH) == {BROADCAST: False, PRESENCE: False}
    await no_rows_left(dsn)


async def test_presence_read_without_write_and_write_without_read(
    admin: asyncpg.Connection, policies: ChannelPolicies
) -> None:
    await admin.execute(
        """
        CREATE POLICY "may see who is online"
        ON realtime.messages FOR SELECT TO authenticated
        USING (realtime.messages.extension = 'presence');
        CREATE POLICY "may send broadcasts"
        ON realtime.messages FOR INSERT TO authenticated
        WITH CHECK (realtime.messages.extension = 'broadcast');
        """
    )
    someone = user()
    assert await policies.can_read(someone, "room:1", BOTH) == {BROADCAST: False, PRESENCE: True}
    assert await policies.can_write(someone, "room:1", PRESENCE) is False
    # Sending without receiving: the write probe has no RETURNING, so the
    # SELECT policies do not apply to it.
    assert await policies.can_write(someone, "room:1", BROADCAST) is True
    assert await policies.can_write_many(someone, "room:1", BOTH) == {
        BROADCAST: True,
        PRESENCE: False,
    }
    assert await policies.can_write_many(someone, "room:1", (PRESENCE, BROADCAST)) == {
        PRESENCE: False,
        BROADCAST: True,
    }


async def test_policy_on_a_table_the_role_may_not_read_denies(
    admin: asyncpg.Connection, policies: ChannelPolicies
) -> None:
    """permission denied (42501) inside a policy fails closed: denied, as a
    failed write is, rather than an error."""
    await admin.execute(
        """
        CREATE TABLE public.secret_members (user_id uuid);
        CREATE POLICY r ON realtime.messages FOR SELECT TO authenticated
        USING (EXISTS (SELECT 1 FROM public.secret_members WHERE user_id = auth.uid()));
        CREATE POLICY w ON realtime.messages FOR INSERT TO authenticated
        WITH CHECK (EXISTS (SELECT 1 FROM public.secret_members WHERE user_id = auth.uid()));
        """
    )
    assert await policies.can_read(user(), "room:1", BOTH) == {BROADCAST: False, PRESENCE: False}
    assert await policies.can_write(user(), "room:1", BROADCAST) is False


async def test_probe_rows_have_no_event_or_payload(
    admin: asyncpg.Connection, policies: ChannelPolicies
) -> None:
    await admin.execute(
        """
        CREATE POLICY "events only"
        ON realtime.messages FOR SELECT TO authenticated
        USING (realtime.messages.event = 'chat' OR realtime.messages.payload IS NOT NULL);
        """
    )
    assert await policies.can_read(user(), "room:1", BOTH) == {BROADCAST: False, PRESENCE: False}


async def test_service_role_bypasses_rls(policies: ChannelPolicies) -> None:
    service = {"role": "service_role", "iss": "supabase", "exp": int(time.time()) + 60}
    assert await policies.can_read(service, "anything", BOTH) == {BROADCAST: True, PRESENCE: True}
    assert await policies.can_write(service, "anything", BROADCAST) is True


async def test_concurrent_checks_share_a_small_pool(
    dsn: str, admin: asyncpg.Connection, policies: ChannelPolicies
) -> None:
    await admin.execute(
        "CREATE POLICY r ON realtime.messages FOR SELECT TO authenticated"
        " USING (realtime.topic() = 'room:' || (auth.jwt() ->> 'n'))"
    )
    claims = [user(n=str(i)) for i in range(40)]
    answers = await asyncio.gather(
        *(policies.can_read(c, f"room:{i % 2}", [BROADCAST]) for i, c in enumerate(claims))
    )
    assert [a[BROADCAST] for a in answers] == [i in (0, 1) for i in range(40)]
    await no_rows_left(dsn)


# -- failures -------------------------------------------------------------------------------


async def test_policy_that_raises_gives_policy_check_failed(
    dsn: str, admin: asyncpg.Connection, policies: ChannelPolicies
) -> None:
    await admin.execute(
        """
        CREATE FUNCTION public.broken() RETURNS boolean LANGUAGE plpgsql AS $$
        BEGIN RAISE EXCEPTION 'secret-detail-42'; END $$;
        CREATE POLICY "broken read" ON realtime.messages FOR SELECT TO authenticated
        USING (public.broken());
        CREATE POLICY "broken write" ON realtime.messages FOR INSERT TO authenticated
        WITH CHECK (public.broken());
        """
    )
    with pytest.raises(PolicyCheckFailed) as read:
        await policies.can_read(user(), "room:1", BOTH)
    assert read.value.kind == "policy"
    assert "secret-detail-42" not in read.value.reason
    assert isinstance(read.value, HubError)
    with pytest.raises(PolicyCheckFailed) as write:
        await policies.can_write(user(), "room:1", BROADCAST)
    assert write.value.kind == "policy"
    # The pool survives: the next check on a sane topic still answers.
    await admin.execute('DROP POLICY "broken read" ON realtime.messages')
    assert await policies.can_read(user(), "room:1", BOTH) == {BROADCAST: False, PRESENCE: False}
    await no_rows_left(dsn)


async def test_a_non_uuid_sub_in_auth_uid_fails_like_supabase(
    admin: asyncpg.Connection, policies: ChannelPolicies
) -> None:
    await admin.execute(
        "CREATE POLICY mine ON realtime.messages FOR SELECT TO authenticated"
        " USING (auth.uid() IS NOT NULL)"
    )
    with pytest.raises(PolicyCheckFailed) as failed:
        await policies.can_read(user(sub="user-1"), "room:1", [BROADCAST])
    assert failed.value.kind == "policy"


async def test_slow_policy_times_out(dsn: str, admin: asyncpg.Connection) -> None:
    await admin.execute(
        "CREATE POLICY slow ON realtime.messages FOR SELECT TO authenticated"
        " USING (pg_sleep(10) IS NOT NULL)"
    )
    checker = ChannelPolicies(dsn, statement_timeout=0.3)
    await checker.start()
    try:
        started = time.monotonic()
        with pytest.raises(PolicyCheckFailed) as failed:
            await checker.can_read(user(), "room:1", [BROADCAST])
        assert failed.value.kind == "timeout"
        assert time.monotonic() - started < 3.0
    finally:
        await checker.stop()


async def test_missing_partition(admin: asyncpg.Connection, policies: ChannelPolicies) -> None:
    await admin.execute(
        "CREATE POLICY r ON realtime.messages FOR SELECT TO authenticated USING (true)"
    )
    await admin.fetch(
        "SELECT hub.realtime_drop_old_partitions(interval '0 seconds', now() + interval '30 days')"
    )
    with pytest.raises(PolicyCheckFailed) as read:
        await policies.can_read(user(), "room:1", [BROADCAST])
    assert read.value.kind == "partition"
    with pytest.raises(PolicyCheckFailed) as write:
        await policies.can_write(user(), "room:1", BROADCAST)
    assert write.value.kind == "partition"
    await policies.create_partitions()
    assert await policies.can_read(user(), "room:1", [BROADCAST]) == {BROADCAST: True}


async def test_database_down_fails_fast() -> None:
    # A port nothing listens on: connection refused at once.
    checker = ChannelPolicies("postgresql://postgres@127.0.0.1:1/postgres", acquire_timeout=1.0)
    await checker.start()  # no I/O with min_size 0: a dead database never stops the hub
    try:
        started = time.monotonic()
        with pytest.raises(PolicyCheckFailed) as failed:
            await checker.can_read(user(), "room:1", BOTH)
        assert failed.value.kind in ("unavailable", "busy")
        assert failed.value.reason.startswith(failed.value.code + ": ")
        assert time.monotonic() - started < 5.0
    finally:
        await checker.stop()


async def test_stopped_checker_fails_cleanly(dsn: str) -> None:
    checker = ChannelPolicies(dsn)
    with pytest.raises(PolicyCheckFailed):
        await checker.can_read(user(), "room:1", BOTH)


async def test_connection_killed_between_checks_is_retried(
    dsn: str, admin: asyncpg.Connection
) -> None:
    await admin.execute(
        "CREATE POLICY r ON realtime.messages FOR SELECT TO authenticated USING (true)"
    )
    checker = ChannelPolicies(dsn, max_size=1, application_name="hub policies kill test")
    await checker.start()
    try:
        assert await checker.can_read(user(), "room:1", [BROADCAST]) == {BROADCAST: True}
        killed = await admin.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE application_name = 'hub policies kill test'"
        )
        assert killed == 1
        assert await checker.can_read(user(), "room:1", [BROADCAST]) == {BROADCAST: True}
    finally:
        await checker.stop()


@pytest.mark.parametrize(
    "claims",
    [
        {"role": "postgres"},  # the hub's own role: never
        {"role": "supabase_admin"},
        {"role": 7},
        {},
        {"role": "authenticated", "big": 2**70},
        {"role": "authenticated", "x": object()},
        {"role": "authenticated", 1: "non-string key"},
        {"role": "authenticated", "name": "\ud800"},
        {"role": "authenticated", "sub": 12},
        {"role": "authenticated", "sub": "a\x00b"},
    ],
)
async def test_claims_that_cannot_be_checked_are_refused(
    claims: dict[Any, Any], policies: ChannelPolicies
) -> None:
    with pytest.raises(CheckRefused) as refused:
        await policies.can_read(claims, "room:1", BOTH)
    assert refused.value.reason.startswith("Unauthorized: ")
    with pytest.raises(CheckRefused):
        await policies.can_write(claims, "room:1", BROADCAST)


@pytest.mark.parametrize("topic", ["", "a\x00b", "\udc80"])
async def test_topics_that_cannot_be_checked_are_refused(
    topic: str, policies: ChannelPolicies
) -> None:
    with pytest.raises(CheckRefused):
        await policies.can_read(user(), topic, BOTH)


async def test_unknown_extension_is_refused(policies: ChannelPolicies) -> None:
    with pytest.raises(CheckRefused):
        await policies.can_read(user(), "room:1", ["postgres_changes"])
    assert await policies.can_read(user(), "room:1", []) == {}


async def test_odd_but_json_safe_claims_are_checked(
    admin: asyncpg.Connection, policies: ChannelPolicies
) -> None:
    await admin.execute(
        "CREATE POLICY r ON realtime.messages FOR SELECT TO authenticated"
        " USING (auth.jwt() -> 'app_metadata' ->> 'note' = 'it''s \"quoted\" \\ and ünïcode')"
    )
    claims = user(app_metadata={"note": 'it\'s "quoted" \\ and ünïcode'})
    assert await policies.can_read(claims, "room:'; DROP TABLE x; --", [BROADCAST]) == {
        BROADCAST: True
    }


# -- an existing Supabase database ----------------------------------------------------------

SUPABASE_SCHEMA = """
DO $$ BEGIN
    CREATE ROLE anon NOLOGIN NOINHERIT;
EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL; END $$;
DO $$ BEGIN
    CREATE ROLE authenticated NOLOGIN NOINHERIT;
EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL; END $$;
DO $$ BEGIN
    CREATE ROLE service_role NOLOGIN NOINHERIT BYPASSRLS;
EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL; END $$;

CREATE SCHEMA realtime;
GRANT USAGE ON SCHEMA realtime TO anon, authenticated, service_role;
CREATE TABLE realtime.messages (
    topic text NOT NULL,
    extension text NOT NULL,
    payload jsonb,
    event text,
    private boolean DEFAULT false,
    updated_at timestamp NOT NULL DEFAULT now(),
    inserted_at timestamp NOT NULL DEFAULT now(),
    id uuid NOT NULL DEFAULT gen_random_uuid(),
    PRIMARY KEY (id, inserted_at)
) PARTITION BY RANGE (inserted_at);
ALTER TABLE realtime.messages ENABLE ROW LEVEL SECURITY;
GRANT SELECT, INSERT, UPDATE ON realtime.messages TO anon, authenticated, service_role;
-- Supabase's server made today's partition, with its own naming.
DO $$
DECLARE d date := (now() AT TIME ZONE 'UTC')::date;
BEGIN
    EXECUTE format(
        'CREATE TABLE realtime.%I PARTITION OF realtime.messages FOR VALUES FROM (%L) TO (%L)',
        'messages_' || to_char(d, 'YYYY_MM_DD'), d::timestamp, (d + 1)::timestamp);
END $$;

CREATE FUNCTION realtime.topic() RETURNS text LANGUAGE sql STABLE AS $$
    -- supabase's own body
    select nullif(current_setting('realtime.topic', true), '')::text;
$$;

CREATE SCHEMA auth;
GRANT USAGE ON SCHEMA auth TO anon, authenticated, service_role;
CREATE FUNCTION auth.uid() RETURNS uuid LANGUAGE sql STABLE AS $$
    -- supabase auth's own body
    select nullif(current_setting('request.jwt.claim.sub', true), '')::uuid;
$$;

CREATE POLICY "supabase app policy" ON realtime.messages FOR SELECT TO authenticated
USING (realtime.topic() = 'room:' || auth.uid()::text);
"""


async def test_migrating_a_supabase_database_keeps_what_it_has(blank_dsn: str) -> None:
    conn = await asyncpg.connect(blank_dsn)
    try:
        await conn.execute(SUPABASE_SCHEMA)
        snapshot_sql = """
            SELECT 'realtime.messages'::regclass::oid AS table_oid,
              (SELECT array_agg(polname || ':' || pg_get_expr(polqual, polrelid) ORDER BY polname)
                 FROM pg_policy WHERE polrelid = 'realtime.messages'::regclass) AS policies,
              (SELECT prosrc FROM pg_proc
                WHERE oid = 'realtime.topic()'::regprocedure) AS topic_src,
              (SELECT prosrc FROM pg_proc WHERE oid = 'auth.uid()'::regprocedure) AS uid_src,
              (SELECT oid FROM pg_proc WHERE oid = 'auth.uid()'::regprocedure) AS uid_oid,
              (SELECT array_agg(attname::text ORDER BY attnum) FROM pg_attribute
                WHERE attrelid = 'realtime.messages'::regclass AND attnum > 0) AS columns,
              (SELECT relacl::text FROM pg_class
                WHERE oid = 'realtime.messages'::regclass) AS acl,
              (SELECT relrowsecurity FROM pg_class
                WHERE oid = 'realtime.messages'::regclass) AS rls,
              (SELECT nspacl::text FROM pg_namespace WHERE nspname = 'realtime') AS schema_acl
        """
        before = dict(await conn.fetchrow(snapshot_sql))
        roles_sql = (
            "SELECT array_agg(rolname || ':' || rolcanlogin || rolbypassrls || rolinherit"
            " ORDER BY rolname) FROM pg_roles"
            " WHERE rolname IN ('anon', 'authenticated', 'service_role')"
        )
        roles_before = await conn.fetchval(roles_sql)

        applied = await migrate(blank_dsn)
        assert "0004_realtime_authorization" in applied

        after = dict(await conn.fetchrow(snapshot_sql))
        assert after == before
        assert "supabase's own body" in after["topic_src"]
        assert "supabase auth's own body" in after["uid_src"]
        assert await conn.fetchval(roles_sql) == roles_before
        # What was missing is added beside what was there.
        assert await conn.fetchval("SELECT to_regprocedure('auth.jwt()') IS NOT NULL")
        assert await conn.fetchval("SELECT to_regprocedure('auth.role()') IS NOT NULL")

        # The app's own policy decides, verbatim.
        checker = ChannelPolicies(blank_dsn)
        await checker.start()
        try:
            owner = user()
            assert await checker.can_read(owner, f"room:{owner['sub']}", BOTH) == {
                BROADCAST: True,
                PRESENCE: True,
            }
            assert await checker.can_read(user(), f"room:{owner['sub']}", BOTH) == {
                BROADCAST: False,
                PRESENCE: False,
            }
        finally:
            await checker.stop()
        assert await migrate(blank_dsn) == []
    finally:
        await conn.close()
