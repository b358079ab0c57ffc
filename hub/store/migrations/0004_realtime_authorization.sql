-- Realtime Authorization: what Supabase's own migrations give a project
-- (../shared/protocol/AUTHORIZATION.md, section 2), so that policies written
-- for Supabase work verbatim against the hub.
--
-- Reuse, never replace: the hub may be pointed at a database that already is
-- a Supabase database.  Every object below is created only when it is
-- missing; an existing realtime.messages (its policies, grants, RLS setting,
-- partitions), existing roles and existing realtime.topic() / auth.*()
-- functions are left exactly as they are.  Grants and RLS are set only on
-- objects this migration created itself: on an existing Supabase table they
-- are Supabase's (or its operator's) decision.
--
-- Like every migration this file runs in one transaction (hub/store/migrate.py).
-- Steps that need privileges the hub's role may lack (creating roles, granting
-- membership, creating partitions of a table someone else owns) degrade to a
-- WARNING naming the SQL an administrator should run, rather than failing
-- `hub migrate` for deployments that never use private channels.

-- 1. Roles.  Roles are cluster-wide: another database of the same server (a
-- test database, a second hub) may create them at the same moment, so a
-- duplicate is expected and ignored.  A concurrent CREATE ROLE surfaces as
-- unique_violation on pg_authid once the other transaction commits, or as
-- duplicate_object when it committed before ours looked.
DO $roles$
DECLARE
    wanted text;
BEGIN
    FOREACH wanted IN ARRAY ARRAY['anon', 'authenticated', 'service_role'] LOOP
        CONTINUE WHEN EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = wanted);
        BEGIN
            -- As Supabase creates them: NOLOGIN NOINHERIT, and service_role
            -- bypasses RLS (policies are written for the other two).
            EXECUTE format('CREATE ROLE %I NOLOGIN NOINHERIT%s', wanted,
                           CASE WHEN wanted = 'service_role' THEN ' BYPASSRLS' ELSE '' END);
        EXCEPTION
            WHEN duplicate_object OR unique_violation THEN
                NULL;
            WHEN insufficient_privilege THEN
                RAISE WARNING 'hub migrate could not create role %: %', wanted, SQLERRM
                    USING HINT = format('An administrator should run: CREATE ROLE %I NOLOGIN NOINHERIT%s;',
                                        wanted,
                                        CASE WHEN wanted = 'service_role' THEN ' BYPASSRLS' ELSE '' END);
        END;
    END LOOP;
END
$roles$;

-- 2. The hub checks policies by switching, transaction-locally, to the
-- token's role (set_config('role', ...)), which needs membership unless the
-- hub's role is a superuser (pg_has_role is then always true).
DO $membership$
DECLARE
    wanted text;
BEGIN
    FOREACH wanted IN ARRAY ARRAY['anon', 'authenticated', 'service_role'] LOOP
        CONTINUE WHEN NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = wanted);
        CONTINUE WHEN pg_catalog.pg_has_role(current_user, wanted, 'MEMBER');
        BEGIN
            EXECUTE format('GRANT %I TO %I', wanted, current_user);
        EXCEPTION
            WHEN unique_violation THEN
                NULL;  -- granted concurrently by another database's migration
            WHEN insufficient_privilege OR invalid_grant_operation THEN
                RAISE WARNING 'hub migrate could not grant role % to %: %', wanted, current_user, SQLERRM
                    USING HINT = format('An administrator should run: GRANT %I TO %I;', wanted, current_user);
        END;
    END LOOP;
END
$membership$;

-- 3. Schema realtime, realtime.messages and realtime.topic().
DO $realtime$
DECLARE
    made_schema boolean := to_regnamespace('realtime') IS NULL;
    made_table boolean := to_regclass('realtime.messages') IS NULL;
    grantee text;
BEGIN
    IF made_schema THEN
        CREATE SCHEMA realtime;
    END IF;

    IF made_table THEN
        -- Supabase's current shape: uuid ids, one partition per day of
        -- inserted_at (created and dropped by the functions below).
        CREATE TABLE realtime.messages (
            id uuid NOT NULL DEFAULT gen_random_uuid(),
            topic text NOT NULL,
            extension text NOT NULL,
            payload jsonb,
            binary_payload bytea,
            event text,
            private boolean DEFAULT false,
            updated_at timestamp NOT NULL DEFAULT now(),
            inserted_at timestamp NOT NULL DEFAULT now(),
            PRIMARY KEY (id, inserted_at)
        ) PARTITION BY RANGE (inserted_at);
        -- Replay of private channels reads recent broadcasts of one topic.
        CREATE INDEX messages_inserted_at_topic_index
            ON realtime.messages (inserted_at DESC, topic)
            WHERE extension = 'broadcast' AND private IS TRUE;
        -- Without RLS every role could read every probe row: deny by
        -- default, the app's policies open what they open.
        ALTER TABLE realtime.messages ENABLE ROW LEVEL SECURITY;
    END IF;

    IF to_regprocedure('realtime.topic()') IS NULL THEN
        CREATE FUNCTION realtime.topic() RETURNS text
        LANGUAGE sql STABLE
        AS $topic$ SELECT nullif(current_setting('realtime.topic', true), '')::text; $topic$;
    END IF;

    FOR grantee IN
        SELECT rolname FROM pg_catalog.pg_roles
         WHERE rolname IN ('anon', 'authenticated', 'service_role')
    LOOP
        -- A schema that existed but had no messages table (an older Supabase
        -- project) still needs USAGE for the table created here to be usable.
        IF made_schema OR made_table THEN
            EXECUTE format('GRANT USAGE ON SCHEMA realtime TO %I', grantee);
        END IF;
        IF made_table THEN
            EXECUTE format('GRANT SELECT, INSERT, UPDATE ON realtime.messages TO %I', grantee);
        END IF;
    END LOOP;
END
$realtime$;

-- 4. Schema auth with Supabase's helpers, which policies call
-- (auth.uid() = user_id ...).  Same definitions as Supabase's, reading the
-- settings the hub sets for each check.
DO $auth$
DECLARE
    grantee text;
BEGIN
    IF to_regnamespace('auth') IS NULL THEN
        CREATE SCHEMA auth;
        FOR grantee IN
            SELECT rolname FROM pg_catalog.pg_roles
             WHERE rolname IN ('anon', 'authenticated', 'service_role')
        LOOP
            EXECUTE format('GRANT USAGE ON SCHEMA auth TO %I', grantee);
        END LOOP;
    END IF;

    IF to_regprocedure('auth.uid()') IS NULL THEN
        CREATE FUNCTION auth.uid() RETURNS uuid
        LANGUAGE sql STABLE
        AS $uid$
            SELECT coalesce(
                nullif(current_setting('request.jwt.claim.sub', true), ''),
                (nullif(current_setting('request.jwt.claims', true), '')::jsonb ->> 'sub')
            )::uuid;
        $uid$;
    END IF;

    IF to_regprocedure('auth.role()') IS NULL THEN
        CREATE FUNCTION auth.role() RETURNS text
        LANGUAGE sql STABLE
        AS $role$
            SELECT coalesce(
                nullif(current_setting('request.jwt.claim.role', true), ''),
                (nullif(current_setting('request.jwt.claims', true), '')::jsonb ->> 'role')
            )::text;
        $role$;
    END IF;

    IF to_regprocedure('auth.email()') IS NULL THEN
        CREATE FUNCTION auth.email() RETURNS text
        LANGUAGE sql STABLE
        AS $email$
            SELECT coalesce(
                nullif(current_setting('request.jwt.claim.email', true), ''),
                (nullif(current_setting('request.jwt.claims', true), '')::jsonb ->> 'email')
            )::text;
        $email$;
    END IF;

    IF to_regprocedure('auth.jwt()') IS NULL THEN
        CREATE FUNCTION auth.jwt() RETURNS jsonb
        LANGUAGE sql STABLE
        AS $jwt$
            SELECT coalesce(
                nullif(current_setting('request.jwt.claim', true), ''),
                nullif(current_setting('request.jwt.claims', true), '')
            )::jsonb;
        $jwt$;
    END IF;
END
$auth$;

-- 5. Daily partitions, named and bounded as Supabase names and bounds them
-- (realtime.messages_YYYY_MM_DD holds [day, day + 1) of inserted_at, a
-- timestamp without time zone, days counted in UTC).  Yesterday and three
-- days ahead exist at all times, so a session in any time zone and a clock
-- crossing midnight both find their partition.  The hub calls this at start
-- and periodically; it returns the partitions it created.
--
-- In the hub schema, not realtime: Supabase has no such SQL function (its
-- server does this itself), and a name of ours there could collide with a
-- future one of theirs.  lock_timeout: creating or dropping a partition
-- takes a strong lock on realtime.messages; waiting behind a long
-- transaction would queue every policy check behind us, so give up instead
-- and let the next periodic call retry.
CREATE FUNCTION hub.realtime_create_partitions(around timestamptz DEFAULT now())
RETURNS SETOF text
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
SET lock_timeout = '2s'
AS $$
DECLARE
    today date := (around AT TIME ZONE 'UTC')::date;
    part_day date;
    part_name text;
BEGIN
    FOR offset_days IN -1..3 LOOP
        part_day := today + offset_days;
        part_name := 'messages_' || to_char(part_day, 'YYYY_MM_DD');
        -- Checked first so the common case (all there) takes no lock.
        CONTINUE WHEN to_regclass(format('realtime.%I', part_name)) IS NOT NULL;
        BEGIN
            EXECUTE format(
                'CREATE TABLE realtime.%I PARTITION OF realtime.messages FOR VALUES FROM (%L) TO (%L)',
                part_name, part_day::timestamp, (part_day + 1)::timestamp);
            RETURN NEXT part_name;
        EXCEPTION
            -- Another node created it meanwhile.
            WHEN duplicate_table OR unique_violation THEN
                NULL;
            -- A partition of another name (made by an operator) covers the day.
            WHEN invalid_object_definition THEN
                NULL;
        END;
    END LOOP;
END
$$;

-- Drops the day partitions whose every row is older than ``retention``
-- (Supabase keeps messages 72 hours): the partition of day D goes once
-- D + 1 day <= now - retention.  Only partitions named as above are
-- touched; returns the ones dropped.
CREATE FUNCTION hub.realtime_drop_old_partitions(
    retention interval DEFAULT interval '72 hours',
    around timestamptz DEFAULT now())
RETURNS SETOF text
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
SET lock_timeout = '2s'
AS $$
DECLARE
    cutoff timestamp := (around AT TIME ZONE 'UTC') - retention;
    part text;
    part_day date;
BEGIN
    FOR part IN
        SELECT c.relname
          FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
         WHERE i.inhparent = 'realtime.messages'::regclass
           AND c.relname ~ '^messages_[0-9]{4}_[0-9]{2}_[0-9]{2}$'
         ORDER BY c.relname
    LOOP
        BEGIN
            part_day := to_date(substr(part, 10), 'YYYY_MM_DD');
        EXCEPTION WHEN datetime_field_overflow OR invalid_datetime_format THEN
            CONTINUE;  -- named like a day but is not one: not ours
        END;
        IF (part_day + 1)::timestamp <= cutoff THEN
            EXECUTE format('DROP TABLE realtime.%I', part);
            RETURN NEXT part;
        END IF;
    END LOOP;
END
$$;

-- Only the hub's own role (the owner) manages partitions.
REVOKE EXECUTE ON FUNCTION hub.realtime_create_partitions(timestamptz) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION hub.realtime_drop_old_partitions(interval, timestamptz) FROM PUBLIC;

-- Today's partitions now, so checks work before the hub's first periodic
-- call.  The hub's role may not own an existing Supabase realtime.messages;
-- Supabase's own server then keeps its partitions.
DO $partitions$
BEGIN
    PERFORM hub.realtime_create_partitions();
EXCEPTION
    WHEN insufficient_privilege OR lock_not_available THEN
        RAISE WARNING 'hub migrate could not create partitions of realtime.messages: %', SQLERRM;
END
$partitions$;
