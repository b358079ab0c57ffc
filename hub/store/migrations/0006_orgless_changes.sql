-- postgres_changes for tables without an org column (AUTHORIZATION.md,
-- section 4), best effort as in Supabase:
--
-- 1. hub.capture_public(): the row trigger of tables tracked without an org
--    column, by `hub track TABLE --no-org` (trigger hub_capture_public) or
--    by the publication supabase_realtime (trigger hub_capture_publication,
--    installed and removed by hub.sync_realtime_publication()).  Their rows
--    never enter an org's event log: each change is one NOTIFY on
--    hub_changes, which every node's LISTEN connection relays to the
--    postgres_changes bindings of free-name channels.
-- 2. hub.rls_visible(): which (role, claims) may select a changed row, for
--    tables with RLS enabled: one call checks a change for every distinct
--    subscriber context.
-- 3. The publication supabase_realtime, created empty when missing.
--
-- Like every migration this file runs in one transaction.

-- Each change gets an id: it keeps the NOTIFYs of one transaction distinct
-- (PostgreSQL folds identical payloads sent in one transaction into one) and
-- names a change that is too large for its NOTIFY.
CREATE SEQUENCE hub.change_id;

-- Changes too large for a NOTIFY (8000 bytes), read back by id.  Every node
-- reads them, so none deletes on read: the store prunes rows older than a
-- few minutes (hub.store.postgres).  UNLOGGED: best effort, like the NOTIFY.
CREATE UNLOGGED TABLE hub.change_overflow (
    id bigint PRIMARY KEY,
    change jsonb NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);

-- The NOTIFY carries
--   {"id", "schema", "table", "type", "record", "old_record", "columns",
--    "commit_timestamp", "relid", "rls", "pk"}
-- or {"id", "ref": true} when that would not fit.  On a table with RLS
-- enabled the old row is cut to its primary key (DELETE as Supabase; UPDATE
-- too, since the old values are never checked against the policies), so it
-- never leaves the database whole.
--
-- SECURITY DEFINER: the app's roles write their tables without any
-- privilege on the hub schema.
CREATE FUNCTION hub.capture_public()
RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    change_id bigint := nextval('hub.change_id');
    rls boolean;
    pk text[];
    columns jsonb;
    new_record jsonb;
    old_record jsonb;
    note text;
BEGIN
    SELECT c.relrowsecurity INTO rls FROM pg_class c WHERE c.oid = TG_RELID;
    SELECT coalesce(array_agg(a.attname::text ORDER BY a.attnum), '{}')
      INTO pk
      FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey)
     WHERE i.indrelid = TG_RELID AND i.indisprimary;
    SELECT coalesce(jsonb_agg(jsonb_build_object('name', a.attname, 'type', t.typname)
                              ORDER BY a.attnum), '[]'::jsonb)
      INTO columns
      FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid
     WHERE a.attrelid = TG_RELID AND a.attnum > 0 AND NOT a.attisdropped;
    IF TG_OP <> 'DELETE' THEN
        new_record := to_jsonb(NEW);
    END IF;
    IF TG_OP <> 'INSERT' THEN
        old_record := to_jsonb(OLD);
        IF rls THEN
            SELECT coalesce(jsonb_object_agg(k, old_record -> k), '{}'::jsonb)
              INTO old_record FROM unnest(pk) AS k;
        END IF;
    END IF;
    note := jsonb_build_object(
        'id', change_id,
        'schema', TG_TABLE_SCHEMA,
        'table', TG_TABLE_NAME,
        'type', TG_OP,
        'record', new_record,
        'old_record', old_record,
        'columns', columns,
        'commit_timestamp',
        to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"'),
        'relid', TG_RELID::bigint,
        'rls', rls,
        'pk', to_jsonb(pk))::text;
    IF octet_length(note) > 7500 THEN
        INSERT INTO hub.change_overflow (id, change) VALUES (change_id, note::jsonb);
        note := jsonb_build_object('id', change_id, 'ref', true)::text;
    END IF;
    PERFORM pg_notify('hub_changes', note);
    RETURN NULL;
END
$$;

-- Whoever may attach this function to a table may announce its rows.
REVOKE EXECUTE ON FUNCTION hub.capture_public() FROM PUBLIC;

-- Which subscriber contexts may select a changed row.  groups is a JSON
-- array of [role, claims (JSON text), sub]; the answer has one row per
-- group: idx (0-based), whether the row is visible (NULL when the role may
-- not read the primary key), and the columns the role may read.
--
-- Not SECURITY DEFINER: it switches to each group's role with
-- set_config('role', ..., true), which PostgreSQL refuses inside a security
-- definer function; the caller (the hub's role, a member of anon,
-- authenticated and service_role) runs it in a transaction it rolls back.
-- The lookup is dynamic SQL, planned for the role in force, so the table's
-- policies for that role and those claims apply, as in Supabase's
-- `select exists(select 1 from <table> where <pk> = <value>)`.  An error (a
-- policy that raises) fails the whole call: the hub then drops the change
-- for every subscriber it was checking, and logs it.
CREATE FUNCTION hub.rls_visible(relation oid, record jsonb, groups jsonb)
RETURNS TABLE (idx integer, visible boolean, readable text[])
LANGUAGE plpgsql
AS $$
DECLARE
    tbl regclass := relation::regclass;
    pk text[];
    conditions text[];
    lookup text;
    readable_by jsonb := '{}'::jsonb;
    grp jsonb;
    role_name text;
    cols text[];
    found_row boolean;
BEGIN
    SELECT array_agg(a.attname::text ORDER BY a.attnum),
           array_agg(format('t.%I = ($1 ->> %L)::%s', a.attname, a.attname,
                            format_type(a.atttypid, a.atttypmod)) ORDER BY a.attnum)
      INTO pk, conditions
      FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey)
     WHERE i.indrelid = tbl AND i.indisprimary;
    IF pk IS NULL THEN
        RAISE EXCEPTION 'table % has no primary key: its rows cannot be checked', tbl;
    END IF;
    lookup := format('SELECT EXISTS (SELECT 1 FROM %s t WHERE %s)', tbl,
                     array_to_string(conditions, ' AND '));
    idx := -1;
    FOR grp IN SELECT value FROM jsonb_array_elements(groups) LOOP
        idx := idx + 1;
        role_name := grp ->> 0;
        IF NOT readable_by ? role_name THEN
            SELECT coalesce(array_agg(a.attname::text ORDER BY a.attnum), '{}')
              INTO cols
              FROM pg_attribute a
             WHERE a.attrelid = tbl AND a.attnum > 0 AND NOT a.attisdropped
               AND has_column_privilege(role_name, tbl, a.attnum, 'SELECT');
            readable_by := readable_by || jsonb_build_object(role_name, to_jsonb(cols));
        ELSE
            cols := ARRAY(SELECT jsonb_array_elements_text(readable_by -> role_name));
        END IF;
        readable := cols;
        IF NOT pk <@ cols THEN
            visible := NULL;
        ELSE
            PERFORM set_config('request.jwt.claims', grp ->> 1, true),
                    set_config('request.jwt.claim.sub', coalesce(grp ->> 2, ''), true),
                    set_config('request.jwt.claim.role', role_name, true),
                    set_config('role', role_name, true);
            EXECUTE lookup INTO found_row USING record;
            PERFORM set_config('role', 'none', true);
            visible := found_row;
        END IF;
        RETURN NEXT;
    END LOOP;
END
$$;

REVOKE EXECUTE ON FUNCTION hub.rls_visible(oid, jsonb, jsonb) FROM PUBLIC;

-- Supabase's switch: tables in the publication supabase_realtime are
-- tracked without an org column.  Every node calls this once a second
-- (hub.store.postgres); it installs hub_capture_publication on tables added
-- to the publication and removes it from tables no longer in it.  Tables
-- tracked by `hub track` (with or without an org column) keep their own
-- trigger: an org-column table must never leak its rows to every org.
-- Returns one line per change made.  Only the node that gets the advisory
-- lock changes anything; a table whose lock is not free within a second is
-- retried at the next call.
CREATE FUNCTION hub.sync_realtime_publication()
RETURNS SETOF text
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    item record;
BEGIN
    FOR item IN
        WITH wanted AS (
            SELECT c.oid
              FROM pg_publication_tables p
              JOIN pg_namespace n ON n.nspname = p.schemaname
              JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = p.tablename
             WHERE p.pubname = 'supabase_realtime'
               AND c.relkind IN ('r', 'p')
               AND n.nspname NOT IN ('hub', 'realtime', 'pg_catalog', 'information_schema')
               AND NOT EXISTS (SELECT 1 FROM pg_trigger t WHERE t.tgrelid = c.oid
                                  AND t.tgname IN ('hub_capture_change', 'hub_capture_public'))
        ), have AS (
            SELECT t.tgrelid AS oid FROM pg_trigger t WHERE t.tgname = 'hub_capture_publication'
        )
        SELECT w.oid::regclass AS tbl, true AS add FROM wanted w
         WHERE w.oid NOT IN (SELECT oid FROM have)
        UNION ALL
        SELECT h.oid::regclass, false FROM have h
         WHERE h.oid NOT IN (SELECT oid FROM wanted)
    LOOP
        IF NOT pg_try_advisory_xact_lock(7526449310231155712) THEN
            RETURN;  -- another node is at it
        END IF;
        BEGIN
            PERFORM set_config('lock_timeout', '1000', true);
            IF item.add THEN
                EXECUTE format('CREATE TRIGGER hub_capture_publication AFTER INSERT OR UPDATE '
                               'OR DELETE ON %s FOR EACH ROW EXECUTE FUNCTION hub.capture_public()',
                               item.tbl);
                RETURN NEXT format('tracking %s (publication supabase_realtime)', item.tbl);
            ELSE
                EXECUTE format('DROP TRIGGER IF EXISTS hub_capture_publication ON %s', item.tbl);
                RETURN NEXT format('no longer tracking %s (left publication supabase_realtime)',
                                   item.tbl);
            END IF;
        EXCEPTION
            WHEN OTHERS THEN
                RAISE WARNING 'hub: cannot % the publication trigger on %: %',
                    CASE WHEN item.add THEN 'create' ELSE 'drop' END, item.tbl, SQLERRM;
        END;
    END LOOP;
END
$$;

REVOKE EXECUTE ON FUNCTION hub.sync_realtime_publication() FROM PUBLIC;

-- Supabase creates the publication empty; an existing one is never touched.
DO $publication$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_publication WHERE pubname = 'supabase_realtime') THEN
        BEGIN
            -- The hub reads no WAL: the warning about a wal_level below
            -- logical is noise here (Supabase's own server needs it).
            PERFORM set_config('client_min_messages', 'error', true);
            CREATE PUBLICATION supabase_realtime;
            PERFORM set_config('client_min_messages', 'notice', true);
        EXCEPTION
            WHEN insufficient_privilege THEN
                RAISE WARNING 'hub migrate could not create the publication supabase_realtime: %',
                    SQLERRM
                    USING HINT = 'An administrator should run: CREATE PUBLICATION supabase_realtime;';
        END;
    END IF;
END
$publication$;
