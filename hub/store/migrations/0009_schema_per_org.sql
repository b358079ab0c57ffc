-- Schema per org: `hub track --org-from-schema 'org_{org}' posts` captures
-- the table posts of every schema whose name matches the pattern, with the
-- org id taken from the schema's name (org_acme.posts belongs to org acme),
-- including schemas and tables created later.
--
-- 1. hub.schema_tracking: the registrations (pattern, table name).
-- 2. hub.org_of_schema(pattern, schema): the org a schema belongs to, or NULL.
-- 3. hub.capture_change() replaced: with two trigger arguments ('' and the
--    pattern) the org is the schema's, for every row; with one (the org
--    column) it is unchanged from 0002 (that body is repeated here because a
--    migration cannot patch a function, only replace it).
-- 4. hub.sync_schema_tracking(): installs the capture trigger on every
--    matching table that lacks it and drops it where no registration wants
--    it any more (a schema renamed, a registration removed).  Every node
--    calls it once a second; the event trigger hub_schema_tracking (created
--    by `hub track --org-from-schema` when the role may: it needs a
--    superuser) calls it at the end of the DDL that creates the table, so
--    even the first row written in that transaction is captured.

CREATE TABLE hub.schema_tracking (
    pattern text NOT NULL CHECK (pattern LIKE '%{org}%' AND pattern NOT LIKE '%{org}%{org}%'),
    table_name text NOT NULL CHECK (table_name <> ''),
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (pattern, table_name)
);

-- The text the pattern's {org} stands for in schema_name: what lies between
-- the pattern's prefix and suffix, NULL when the name does not have them or
-- nothing lies between.  No regular expression: a pattern may hold any
-- character.
CREATE FUNCTION hub.org_of_schema(pattern text, schema_name text)
RETURNS text
LANGUAGE sql
IMMUTABLE STRICT PARALLEL SAFE
AS $$
    SELECT CASE
        WHEN length(schema_name) > length(prefix) + length(suffix)
             AND left(schema_name, length(prefix)) = prefix
             AND right(schema_name, length(suffix)) = suffix
        THEN substr(schema_name, length(prefix) + 1,
                    length(schema_name) - length(prefix) - length(suffix))
    END
    FROM (SELECT split_part(pattern, '{org}', 1) AS prefix,
                 split_part(pattern, '{org}', 2) AS suffix) AS p
$$;

CREATE OR REPLACE FUNCTION hub.capture_change()
RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    org_column text := TG_ARGV[0];
    schema_org text;
    new_record jsonb;
    old_record jsonb;
    new_org text;
    old_org text;
    columns jsonb;
    base jsonb;
BEGIN
    IF TG_NARGS > 1 THEN
        -- Schema per org: every row of this table belongs to the schema's org.
        schema_org := hub.org_of_schema(TG_ARGV[1], TG_TABLE_SCHEMA);
    END IF;
    IF TG_OP IN ('INSERT', 'UPDATE') THEN
        new_record := to_jsonb(NEW);
        new_org := CASE WHEN TG_NARGS > 1 THEN schema_org ELSE new_record ->> org_column END;
    END IF;
    IF TG_OP IN ('UPDATE', 'DELETE') THEN
        old_record := to_jsonb(OLD);
        old_org := CASE WHEN TG_NARGS > 1 THEN schema_org ELSE old_record ->> org_column END;
    END IF;
    IF new_org IS NULL AND old_org IS NULL THEN
        RETURN NULL;
    END IF;

    SELECT coalesce(jsonb_agg(jsonb_build_object('name', a.attname, 'type', t.typname)
                              ORDER BY a.attnum), '[]'::jsonb)
      INTO columns
      FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid
     WHERE a.attrelid = TG_RELID AND a.attnum > 0 AND NOT a.attisdropped;

    base := jsonb_build_object(
        'schema', TG_TABLE_SCHEMA,
        'table', TG_TABLE_NAME,
        'columns', columns,
        'commit_timestamp',
        to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"'));

    IF TG_OP = 'UPDATE' AND new_org IS DISTINCT FROM old_org THEN
        IF old_org IS NOT NULL THEN
            PERFORM hub.append_event(old_org, 'change', 'DELETE', base || jsonb_build_object(
                'type', 'DELETE', 'record', NULL, 'old_record', old_record));
        END IF;
        IF new_org IS NOT NULL THEN
            PERFORM hub.append_event(new_org, 'change', 'INSERT', base || jsonb_build_object(
                'type', 'INSERT', 'record', new_record, 'old_record', NULL));
        END IF;
    ELSE
        PERFORM hub.append_event(coalesce(new_org, old_org), 'change', TG_OP,
            base || jsonb_build_object(
                'type', TG_OP, 'record', new_record, 'old_record', old_record));
    END IF;
    RETURN NULL;
END
$$;

REVOKE EXECUTE ON FUNCTION hub.capture_change() FROM PUBLIC;

-- Returns one line per trigger created or dropped.  With wait, waits for
-- the lock instead of leaving the work to the next call.  SECURITY DEFINER: the
-- event trigger runs it as whoever ran the DDL (an app role that may not
-- attach hub.capture_change); it does nothing but what the registrations
-- say.  Shares the publication's advisory lock, so one node at a time
-- changes triggers; a table whose lock is not free within a second is
-- retried at the next call.  A table already tracked another way (an org
-- column, --no-org) is left alone: `hub track --org-from-schema` reports it.
CREATE FUNCTION hub.sync_schema_tracking(wait boolean DEFAULT false)
RETURNS SETOF text
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    item record;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM hub.schema_tracking)
       AND NOT EXISTS (SELECT 1 FROM pg_trigger t WHERE t.tgname = 'hub_capture_change'
                          AND t.tgnargs = 2) THEN
        RETURN;  -- the common case: nothing registered, nothing installed
    END IF;
    FOR item IN
        WITH wanted AS (
            SELECT c.oid, r.pattern, hub.org_of_schema(r.pattern, n.nspname) AS org
              FROM hub.schema_tracking r
              JOIN pg_class c ON c.relname = r.table_name AND c.relkind IN ('r', 'p')
              JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE hub.org_of_schema(r.pattern, n.nspname) IS NOT NULL
               AND n.nspname NOT IN ('hub', 'realtime', 'pg_catalog', 'information_schema')
               AND NOT c.relispartition
        ), have AS (
            -- tgargs: each argument followed by a NUL byte; ours are '' and the pattern.
            SELECT t.tgrelid AS oid,
                   convert_from(substr(t.tgargs, 2, length(t.tgargs) - 2), 'UTF8') AS pattern
              FROM pg_trigger t
             WHERE t.tgname = 'hub_capture_change' AND t.tgnargs = 2
        ), other AS (
            SELECT t.tgrelid AS oid FROM pg_trigger t
             WHERE (t.tgname = 'hub_capture_change' AND t.tgnargs <> 2)
                OR t.tgname = 'hub_capture_public'
        )
        SELECT w.oid::regclass AS tbl, w.pattern, w.org, true AS add FROM wanted w
         WHERE NOT EXISTS (SELECT 1 FROM have h WHERE h.oid = w.oid AND h.pattern = w.pattern)
           AND NOT EXISTS (SELECT 1 FROM other o WHERE o.oid = w.oid)
        UNION ALL
        SELECT h.oid::regclass, h.pattern, NULL, false FROM have h
         WHERE NOT EXISTS (SELECT 1 FROM wanted w WHERE w.oid = h.oid AND w.pattern = h.pattern)
    LOOP
        IF wait THEN
            PERFORM pg_advisory_xact_lock(7526449310231155712);
        ELSIF NOT pg_try_advisory_xact_lock(7526449310231155712) THEN
            RETURN;  -- another node is at it
        END IF;
        BEGIN
            PERFORM set_config('lock_timeout', '1000', true);
            IF item.add THEN
                -- The publication's trigger gives way, as for `hub track`.
                EXECUTE format('DROP TRIGGER IF EXISTS hub_capture_publication ON %s', item.tbl);
                EXECUTE format('DROP TRIGGER IF EXISTS hub_capture_change ON %s', item.tbl);
                EXECUTE format('CREATE TRIGGER hub_capture_change AFTER INSERT OR UPDATE '
                               'OR DELETE ON %s FOR EACH ROW EXECUTE FUNCTION '
                               'hub.capture_change(%L, %L)', item.tbl, '', item.pattern);
                RETURN NEXT format('tracking %s (org %s, schema pattern %s)',
                                   item.tbl, item.org, item.pattern);
            ELSE
                EXECUTE format('DROP TRIGGER IF EXISTS hub_capture_change ON %s', item.tbl);
                RETURN NEXT format('no longer tracking %s (schema pattern %s)',
                                   item.tbl, item.pattern);
            END IF;
        EXCEPTION
            WHEN OTHERS THEN
                RAISE WARNING 'hub: cannot % the capture trigger on %: %',
                    CASE WHEN item.add THEN 'create' ELSE 'drop' END, item.tbl, SQLERRM;
        END;
    END LOOP;
END
$$;

REVOKE EXECUTE ON FUNCTION hub.sync_schema_tracking(boolean) FROM PUBLIC;

-- The event trigger's function (the trigger itself needs a superuser, so
-- `hub track --org-from-schema` creates it when it can, not this migration).
CREATE FUNCTION hub.schema_tracking_ddl()
RETURNS event_trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM hub.schema_tracking) THEN
        -- Waits for a node's sync in progress: the table must be tracked
        -- before the DDL's transaction writes its first row.
        PERFORM hub.sync_schema_tracking(true);
    END IF;
END
$$;
