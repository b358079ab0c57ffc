-- Retention: hub.events becomes a table partitioned by created_at, one
-- partition per UTC day (hub.events_YYYYMMDD), so that events past the
-- retention go by dropping whole partitions, never by DELETE
-- (hub.store.retention, HUB_RETENTION).
--
-- The rows already stored stay where they are: the old table becomes the
-- partition hub.events_upto_<day after this migration>, holding everything
-- before that day, and goes as one partition once that day is past the
-- retention (a new install, with no rows, has no such partition).  A
-- default partition catches a row no daily partition covers (every node
-- down for days).  Such rows stay there (moving them would hide them from
-- a concurrent reader whose list of partitions predates the move) and go
-- by DELETE once past the retention (hub.store.retention).
--
-- The primary key becomes (org, seq, created_at): a partitioned table's
-- unique keys must hold its partition key.  (org, seq) stays unique as
-- before: hub.append_event() hands out each seq once, under the row lock
-- of hub.org_seq.
--
-- Functions and views that name hub.events are bound to the old table (a
-- view) or its row type (a function's arguments or result, as event-mode
-- projection handlers are): they are re-created from their definitions,
-- read before the rename, so that they name the new table.  Owners, grants
-- and comments of re-created functions are kept.
--
-- Like every migration this file runs in one transaction: hub.events is
-- locked for its duration (a scan of the old rows to attach them).

CREATE TEMPORARY TABLE hub_0010_functions ON COMMIT DROP AS
SELECT p.oid, p.oid::regprocedure::text AS signature, pg_get_functiondef(p.oid) AS definition,
       pg_get_userbyid(p.proowner) AS owner, p.proacl AS acl,
       obj_description(p.oid, 'pg_proc') AS comment
  FROM pg_proc p
 WHERE p.prokind = 'f'
   AND ('hub.events'::regtype = p.prorettype
        OR 'hub.events'::regtype = ANY (p.proargtypes::oid[]));

CREATE TEMPORARY TABLE hub_0010_views ON COMMIT DROP AS
SELECT DISTINCT v.oid::regclass::text AS name, pg_get_viewdef(v.oid) AS definition
  FROM pg_depend d
  JOIN pg_rewrite r ON r.oid = d.objid
  JOIN pg_class v ON v.oid = r.ev_class
 WHERE d.classid = 'pg_rewrite'::regclass
   AND d.refobjid = 'hub.events'::regclass
   AND v.oid <> 'hub.events'::regclass;

DO $rename$
DECLARE
    upto date := (now() AT TIME ZONE 'UTC')::date + 1;
    old_name text := 'events_upto_' || to_char(upto, 'YYYYMMDD');
    has_rows boolean;
BEGIN
    EXECUTE format('ALTER TABLE hub.events RENAME TO %I', old_name);
    -- A partition's primary key is its parent's: (org, seq, created_at),
    -- built when the old table is attached below.
    EXECUTE format('ALTER TABLE hub.%I DROP CONSTRAINT events_pkey', old_name);
    ALTER SEQUENCE hub.events_gid_seq OWNED BY NONE;

    CREATE TABLE hub.events (
        gid bigint NOT NULL DEFAULT nextval('hub.events_gid_seq'),
        org text NOT NULL CONSTRAINT events_org_check CHECK (octet_length(org) BETWEEN 1 AND 200),
        seq bigint NOT NULL,
        id uuid NOT NULL DEFAULT gen_random_uuid(),
        kind text NOT NULL DEFAULT 'event'
            CONSTRAINT events_kind_check CHECK (kind IN ('event', 'change')),
        type text NOT NULL,
        payload jsonb NOT NULL DEFAULT 'null',
        created_at timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (org, seq, created_at)
    ) PARTITION BY RANGE (created_at);
    ALTER SEQUENCE hub.events_gid_seq OWNED BY hub.events.gid;
    -- The old table's own indexes have these names.
    ALTER INDEX hub.events_org_created_at RENAME TO events_old_org_created_at;
    ALTER INDEX hub.events_org_id RENAME TO events_old_org_id;
    CREATE INDEX events_org_created_at ON hub.events (org, created_at);
    CREATE INDEX events_org_id ON hub.events (org, id);

    -- A new install has no rows: no old partition then, only days.
    EXECUTE format('SELECT EXISTS (SELECT 1 FROM hub.%I)', old_name) INTO has_rows;
    IF has_rows THEN
        EXECUTE format('ALTER TABLE hub.events ATTACH PARTITION hub.%I '
                       'FOR VALUES FROM (MINVALUE) TO (%L)',
                       old_name, (upto::timestamp AT TIME ZONE 'UTC'));
    END IF;  -- else it is dropped below, once nothing names its row type
    CREATE TABLE hub.events_default PARTITION OF hub.events DEFAULT;
END
$rename$;

DO $recreate$
DECLARE
    f record;
    v record;
    grant_row record;
BEGIN
    FOR f IN SELECT * FROM hub_0010_functions LOOP
        -- The definition says hub.events, which now names the new table.
        EXECUTE format('DROP FUNCTION %s', f.oid::regprocedure);
        EXECUTE f.definition;
        EXECUTE format('ALTER FUNCTION %s OWNER TO %I', f.signature, f.owner);
        IF f.acl IS NOT NULL THEN
            EXECUTE format('REVOKE ALL ON FUNCTION %s FROM PUBLIC', f.signature);
            FOR grant_row IN SELECT * FROM aclexplode(f.acl) LOOP
                EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO %s', f.signature,
                               CASE WHEN grant_row.grantee = 0 THEN 'PUBLIC'
                                    ELSE quote_ident(pg_get_userbyid(grant_row.grantee)) END);
            END LOOP;
        END IF;
        IF f.comment IS NOT NULL THEN
            EXECUTE format('COMMENT ON FUNCTION %s IS %L', f.signature, f.comment);
        END IF;
    END LOOP;
    FOR v IN SELECT * FROM hub_0010_views LOOP
        EXECUTE format('CREATE OR REPLACE VIEW %s AS %s', v.name, v.definition);
    END LOOP;
END
$recreate$;

-- The old table of a new install (no rows): not attached, dropped now.
DO $empty$
DECLARE
    t record;
BEGIN
    FOR t IN SELECT c.relname FROM pg_class c
              WHERE c.relnamespace = 'hub'::regnamespace AND c.relkind = 'r'
                AND c.relname LIKE 'events\_upto\_%' AND NOT c.relispartition LOOP
        EXECUTE format('DROP TABLE hub.%I', t.relname);
    END LOOP;
END
$empty$;

-- The registered handlers' regprocedure values name the dropped functions'
-- oids: point them at the re-created ones (same signature text).
UPDATE hub.projections p
   SET handler = f.signature::regprocedure
  FROM hub_0010_functions f
 WHERE p.handler::oid = f.oid;

-- One partition per UTC day from yesterday (a row stamped just before
-- midnight may commit after it) to days_ahead days from now, and for the
-- days in extra (an org's days before its events are copied in,
-- hub.store.moves), except a day with rows in the default partition: rows
-- are never moved between partitions, because a reader that listed the
-- partitions before the move and took its snapshot after it (it waited for
-- the attach's lock on the default partition) would miss them.  Returns
-- the partitions created.  Any node may call it: the advisory lock makes one
-- at a time do the work.
CREATE FUNCTION hub.ensure_event_partitions(days_ahead integer DEFAULT 3,
                                            extra date[] DEFAULT '{}')
RETURNS SETOF text
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    today date := (now() AT TIME ZONE 'UTC')::date;
    day date;
    lo timestamptz;
    hi timestamptz;
    name text;
    covered boolean;
BEGIN
    -- Waited for, not tried: a caller that asked for a past day (a move's
    -- target, a test) must find it made when this returns, not have its
    -- rows land in the default partition because a node's maintenance
    -- happened to hold the lock. The holder is done in milliseconds.
    PERFORM pg_advisory_xact_lock(7526449310231155713);
    FOR day IN
        SELECT today + i FROM generate_series(-1, days_ahead) AS i
        UNION
        SELECT unnest(extra)
        ORDER BY 1
    LOOP
        lo := day::timestamp AT TIME ZONE 'UTC';
        hi := (day + 1)::timestamp AT TIME ZONE 'UTC';
        name := 'events_' || to_char(day, 'YYYYMMDD');
        -- Already covered: by its own partition, or by the old table's.
        SELECT EXISTS (
            SELECT 1 FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
             WHERE i.inhparent = 'hub.events'::regclass
               AND c.relname <> 'events_default'
               -- CASE: to_date() only ever sees a name it can read, whatever
               -- order the planner evaluates the conditions in.
               AND CASE WHEN c.relname ~ '^events_upto_[0-9]{8}$'
                        THEN to_date(right(c.relname, 8), 'YYYYMMDD') > day
                        ELSE c.relname = name END)
          INTO covered;
        CONTINUE WHEN covered
            OR EXISTS (SELECT 1 FROM hub.events_default
                        WHERE created_at >= lo AND created_at < hi);
        -- Created empty, then attached: the attach checks (under its lock)
        -- that the default partition holds nothing of that day.
        EXECUTE format('CREATE TABLE hub.%I (LIKE hub.events INCLUDING DEFAULTS '
                       'INCLUDING CONSTRAINTS)', name);
        EXECUTE format('ALTER TABLE hub.events ATTACH PARTITION hub.%I '
                       'FOR VALUES FROM (%L) TO (%L)', name, lo, hi);
        RETURN NEXT 'hub.' || name;
    END LOOP;
END
$$;

SELECT hub.ensure_event_partitions();

-- The partitions wholly older than the retention (their upper bound at or
-- before now() - retention), oldest first, then the default partition when
-- it holds rows older than that (it is never dropped: those rows go by
-- DELETE, upper_bound being the cutoff and rows_estimate their count);
-- each with what holds it back: NULL when it may go, else the first
-- projection (and org) that has not applied all of those events
-- (hub.projection_checkpoints, every target, rebuilds included).
CREATE FUNCTION hub.expired_event_partitions(retention interval)
RETURNS TABLE (partition text, upper_bound timestamptz, rows_estimate bigint, held_by text)
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    cutoff timestamptz := now() - retention;
    part record;
BEGIN
    FOR part IN
        SELECT c.relname, greatest(c.reltuples, 0)::bigint AS estimate,
               CASE WHEN c.relname ~ '^events_upto_[0-9]{8}$'
                    THEN to_date(right(c.relname, 8), 'YYYYMMDD')
                    WHEN c.relname ~ '^events_[0-9]{8}$'
                    THEN to_date(right(c.relname, 8), 'YYYYMMDD') + 1
               END::timestamp AT TIME ZONE 'UTC' AS upper_bound
          FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
         WHERE i.inhparent = 'hub.events'::regclass
           AND c.relname ~ '^events_(upto_)?[0-9]{8}$'
        UNION ALL
        SELECT 'events_default', count(*), cutoff
          FROM hub.events_default WHERE created_at < cutoff
        HAVING count(*) > 0
         ORDER BY 3
    LOOP
        CONTINUE WHEN part.upper_bound > cutoff;
        partition := 'hub.' || quote_ident(part.relname);
        upper_bound := part.upper_bound;
        rows_estimate := part.estimate;
        -- A day's partition holds nothing at or past its upper bound, so
        -- the same query serves it and the default partition's old rows.
        EXECUTE format(
            'SELECT p.name || '' (org '' || m.org || '')'' '
            '  FROM (SELECT org, max(seq) AS seq FROM hub.%I WHERE created_at < $1 '
            '         GROUP BY org) m '
            ' CROSS JOIN hub.projections p '
            '  LEFT JOIN LATERAL (SELECT min(c.seq) AS seq FROM hub.projection_checkpoints c '
            '                      WHERE c.projection = p.name AND c.org = m.org) c ON true '
            ' WHERE coalesce(c.seq, 0) < m.seq ORDER BY 1 LIMIT 1', part.relname)
          INTO held_by USING part.upper_bound;
        RETURN NEXT;
    END LOOP;
END
$$;

REVOKE EXECUTE ON FUNCTION hub.ensure_event_partitions(integer, date[]) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION hub.expired_event_partitions(interval) FROM PUBLIC;
