-- Projections: read models folded from each org's event log, exactly once,
-- in seq order (docs/projections.md).
--
-- 1. hub.projections: what is registered (hub.register_projection()).
-- 2. hub.projection_checkpoints: per projection, target schema and org, the
--    last seq applied, and the error that stopped it (if any).  A batch's
--    writes and its checkpoint commit in one transaction: hub.project().
-- 3. The mother's history: the built-in batch projection "mother" keeps
--    per-minute and per-hour rollups per org and event type in the schema
--    mother, and the documented views over them.
--
-- Like every migration this file runs in one transaction.

CREATE TABLE hub.projections (
    name text PRIMARY KEY CHECK (name ~ '^[a-z_][a-z0-9_]{0,62}$'),
    -- event mode: handler(hub.events) per event; batch mode:
    -- handler(orgs text[], after_seqs bigint[], upto_seqs bigint[]) once per
    -- batch: each org's events (after, upto], set-based.
    handler regprocedure NOT NULL,
    mode text NOT NULL DEFAULT 'event' CHECK (mode IN ('event', 'batch')),
    -- Event types handed to the handler (NULL: all); others only advance
    -- the checkpoint.  Event mode only.
    event_types text[],
    -- The schema of the read model's tables: the handler runs with
    -- search_path = <schema>, public and names its tables unqualified, so a
    -- rebuild can run it into fresh copies of them.
    target_schema name NOT NULL,
    -- The role the handler runs as (NULL: the hub's own): give it rights on
    -- its tables only and a write elsewhere fails (and stops the projection).
    run_as name,
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE hub.projection_checkpoints (
    projection text NOT NULL REFERENCES hub.projections (name) ON DELETE CASCADE,
    -- The schema whose tables hold this state: the projection's own, or a
    -- rebuild's scratch schema.
    target name NOT NULL,
    org text NOT NULL,
    seq bigint NOT NULL DEFAULT 0,
    -- Events handed to the handler (types it does not take are skipped).
    applied bigint NOT NULL DEFAULT 0,
    updated_at timestamptz NOT NULL DEFAULT now(),
    -- Set when the handler raised at error_seq: the projection is stopped
    -- for this org (others go on) until a retry succeeds.
    error text,
    error_seq bigint,
    error_at timestamptz,
    PRIMARY KEY (projection, target, org)
);

-- Register a projection.  Raises when the name is taken, the handler has
-- the wrong signature, or the handler lives in its own target schema.
CREATE FUNCTION hub.register_projection(
    p_name text,
    p_handler regprocedure,
    p_types text[] DEFAULT NULL,
    p_schema name DEFAULT 'public',
    p_run_as name DEFAULT NULL,
    p_mode text DEFAULT 'event'
) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    args oid[];
    handler_schema name;
BEGIN
    IF EXISTS (SELECT 1 FROM hub.projections WHERE name = p_name) THEN
        RAISE EXCEPTION 'projection % is already registered', p_name
            USING ERRCODE = 'unique_violation',
                  HINT = 'remove it first (hub projections remove), or choose another name';
    END IF;
    SELECT ARRAY(SELECT unnest(p.proargtypes)), n.nspname INTO args, handler_schema
      FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace WHERE p.oid = p_handler;
    IF p_mode = 'event' AND args <> ARRAY['hub.events'::regtype::oid] THEN
        RAISE EXCEPTION 'the handler of an event projection takes one hub.events: %', p_handler
            USING ERRCODE = 'invalid_function_definition';
    END IF;
    IF p_mode = 'batch' AND args <> ARRAY['text[]'::regtype::oid, 'bigint[]'::regtype::oid,
                                          'bigint[]'::regtype::oid] THEN
        RAISE EXCEPTION 'the handler of a batch projection takes (text[], bigint[], bigint[]): %',
            p_handler USING ERRCODE = 'invalid_function_definition';
    END IF;
    IF p_mode = 'batch' AND p_types IS NOT NULL THEN
        RAISE EXCEPTION 'a batch projection sees every event: no event types'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF to_regnamespace(p_schema) IS NULL THEN
        RAISE EXCEPTION 'schema % does not exist', p_schema USING ERRCODE = 'invalid_schema_name';
    END IF;
    IF handler_schema = p_schema THEN
        RAISE EXCEPTION 'the handler % must not live in its read model''s schema %',
            p_handler, p_schema USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF p_run_as IS NOT NULL AND NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = p_run_as) THEN
        RAISE EXCEPTION 'role % does not exist', p_run_as USING ERRCODE = 'undefined_object';
    END IF;
    INSERT INTO hub.projections (name, handler, mode, event_types, target_schema, run_as)
    VALUES (p_name, p_handler, p_mode, p_types, p_schema, p_run_as);
END
$$;

-- Apply up to p_limit events of each org of p_orgs to projection p_name's
-- state in schema p_target, stopping at events created after p_until (if
-- given).  Per org: the checkpoint row is locked, the events after it are
-- handed to the handler in seq order.  With p_isolate, each call is a
-- subtransaction: the first that raises stops that org (its error is
-- recorded, the events before it stay applied) while the other orgs go on.
-- Without it (the runner's fast path), a handler's error aborts the whole
-- call and the caller runs it again isolated: a transaction holding more
-- than 64 subtransactions makes every other session's snapshot checks
-- consult pg_subtrans, which under a steady write load cost PostgreSQL
-- about 0.6 ms of CPU per event (measured in the projections benchmark).
-- An org stopped by an error is skipped unless p_retry.  Everything
-- commits with the caller's transaction, checkpoints included: an event is
-- applied exactly once.
--
-- Running projections take a shared advisory lock on the projection (key
-- 1752523376, "hubp", and hashtext(name)); a
-- rebuild's switch takes it exclusively, so no batch runs during a switch.
CREATE FUNCTION hub.project(
    p_name text,
    p_target name,
    p_orgs text[],
    p_limit integer,
    p_until timestamptz DEFAULT NULL,
    p_retry boolean DEFAULT false,
    p_isolate boolean DEFAULT true
) RETURNS TABLE (org text, seq bigint, applied integer, error text)
LANGUAGE plpgsql
AS $$
#variable_conflict use_column
DECLARE
    proj hub.projections;
    cp record;
    e hub.events;
    call text;
    upto bigint;
    -- Per org, in the order of r_orgs: the new checkpoint, the events
    -- handed to the handler, the error that stopped it and where.
    r_orgs text[] := '{}';
    r_last bigint[] := '{}';
    r_done integer[] := '{}';
    r_failed text[] := '{}';
    r_failed_seq bigint[] := '{}';
    i integer := 0;
    j integer;
    b_orgs text[];
    b_after bigint[];
    b_upto bigint[];
    events refcursor;
BEGIN
    SELECT * INTO proj FROM hub.projections p WHERE p.name = p_name;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'no projection %', p_name USING ERRCODE = 'undefined_object';
    END IF;
    PERFORM pg_advisory_xact_lock_shared(1752523376, hashtext(p_name));
    PERFORM set_config('search_path', format('%I, public', p_target), true);
    IF proj.mode = 'event' THEN
        call := format('SELECT %s($1)', proj.handler::regproc);
    ELSE
        call := format('SELECT %s($1, $2, $3)', proj.handler::regproc);
    END IF;
    -- Set-based bookkeeping: one statement creates the missing checkpoint
    -- rows, one locks them all, one writes them back (a turn of the runner
    -- costs a few statements per projection, not per org).
    INSERT INTO hub.projection_checkpoints (projection, target, org)
    SELECT p_name, p_target, o FROM unnest(p_orgs) AS o ON CONFLICT DO NOTHING;
    FOR cp IN SELECT c.org, c.seq, c.error FROM hub.projection_checkpoints c
               WHERE c.projection = p_name AND c.target = p_target AND c.org = ANY (p_orgs)
               ORDER BY c.org FOR UPDATE
    LOOP
        i := i + 1;
        r_orgs[i] := cp.org; r_last[i] := cp.seq; r_done[i] := 0;
        r_failed[i] := CASE WHEN cp.error IS NOT NULL AND NOT p_retry THEN cp.error END;
        r_failed_seq[i] := NULL;
    END LOOP;
    IF proj.mode = 'batch' THEN
        -- Each org's range (after, upto], then one call for all of them
        -- (isolated: one call per org, so an error stops only its org).
        IF p_until IS NULL THEN
            -- Seqs are gap-free: the range ends at the head or p_limit on.
            SELECT coalesce(array_agg(c.org ORDER BY c.org), '{}'),
                   coalesce(array_agg(c.seq ORDER BY c.org), '{}'),
                   coalesce(array_agg(least(h.seq, c.seq + p_limit) ORDER BY c.org), '{}')
              INTO b_orgs, b_after, b_upto
              FROM unnest(r_orgs, r_last, r_failed) AS c(org, seq, failed)
              JOIN hub.org_seq h ON h.org = c.org
             WHERE c.failed IS NULL AND h.seq > c.seq;
        ELSE
            SELECT coalesce(array_agg(c.org ORDER BY c.org), '{}'),
                   coalesce(array_agg(c.seq ORDER BY c.org), '{}'),
                   coalesce(array_agg(u.upto ORDER BY c.org), '{}')
              INTO b_orgs, b_after, b_upto
              FROM unnest(r_orgs, r_last, r_failed) AS c(org, seq, failed)
             CROSS JOIN LATERAL (
                 SELECT max(x.seq) AS upto FROM (
                     SELECT ev.seq FROM hub.events ev
                      WHERE ev.org = c.org AND ev.seq > c.seq AND ev.created_at <= p_until
                      ORDER BY ev.seq LIMIT p_limit) x) u
             WHERE c.failed IS NULL AND u.upto IS NOT NULL;
        END IF;
        -- The handler runs as run_as (when set), the bookkeeping as the hub.
        IF proj.run_as IS NOT NULL THEN
            PERFORM set_config('role', proj.run_as, true);
        END IF;
        IF NOT p_isolate AND cardinality(b_orgs) > 0 THEN
            EXECUTE call USING b_orgs, b_after, b_upto;
        END IF;
        FOR j IN 1 .. cardinality(b_orgs) LOOP
            i := array_position(r_orgs, b_orgs[j]);
            IF p_isolate THEN
                BEGIN
                    EXECUTE call USING ARRAY[b_orgs[j]], ARRAY[b_after[j]], ARRAY[b_upto[j]];
                EXCEPTION WHEN OTHERS THEN
                    r_failed[i] := SQLERRM; r_failed_seq[i] := b_after[j] + 1;
                    CONTINUE;
                END;
            END IF;
            r_done[i] := b_upto[j] - b_after[j]; r_last[i] := b_upto[j];
        END LOOP;
        IF proj.run_as IS NOT NULL THEN
            PERFORM set_config('role', 'none', true);
        END IF;
    ELSE
        -- Org by org, each a key range of the primary key (seqs are
        -- gap-free).  Planned at each open (EXECUTE): a plan cached while
        -- the log was small scans the whole log once it is not, until
        -- autovacuum's next ANALYZE, and the log only grows.
        FOR i IN 1 .. coalesce(array_length(r_orgs, 1), 0) LOOP
            CONTINUE WHEN r_failed[i] IS NOT NULL;
            IF p_until IS NULL THEN
                OPEN events FOR EXECUTE
                    'SELECT * FROM hub.events x WHERE x.org = $1 AND x.seq > $2 '
                    'AND x.seq <= $3 ORDER BY x.seq'
                    USING r_orgs[i], r_last[i], r_last[i] + p_limit;
            ELSE
                OPEN events FOR EXECUTE
                    'SELECT * FROM hub.events x WHERE x.org = $1 AND x.seq > $2 '
                    'AND x.created_at <= $3 ORDER BY x.seq LIMIT $4'
                    USING r_orgs[i], r_last[i], p_until, p_limit;
            END IF;
            -- Opened as the hub (its rights were checked then), the
            -- handler runs as run_as (when set).
            IF proj.run_as IS NOT NULL THEN
                PERFORM set_config('role', proj.run_as, true);
            END IF;
            LOOP
                FETCH events INTO e;
                EXIT WHEN NOT FOUND;
                IF proj.event_types IS NULL OR e.type = ANY (proj.event_types) THEN
                    IF NOT p_isolate THEN
                        EXECUTE call USING e;
                    ELSE
                        BEGIN
                            EXECUTE call USING e;
                        EXCEPTION WHEN OTHERS THEN
                            r_failed[i] := SQLERRM; r_failed_seq[i] := e.seq;
                            EXIT;
                        END;
                    END IF;
                    r_done[i] := r_done[i] + 1;
                END IF;
                r_last[i] := e.seq;
            END LOOP;
            CLOSE events;
            IF proj.run_as IS NOT NULL THEN
                PERFORM set_config('role', 'none', true);
            END IF;
        END LOOP;
    END IF;
    UPDATE hub.projection_checkpoints c
       SET seq = r.last, applied = c.applied + r.done, updated_at = now(),
           error = CASE WHEN r.failed_seq IS NOT NULL THEN r.failed
                        WHEN p_retry THEN NULL ELSE c.error END,
           error_seq = CASE WHEN r.failed_seq IS NOT NULL THEN r.failed_seq
                            WHEN p_retry THEN NULL ELSE c.error_seq END,
           error_at = CASE WHEN r.failed_seq IS NOT NULL THEN now()
                           WHEN p_retry THEN NULL ELSE c.error_at END
      FROM unnest(r_orgs, r_last, r_done, r_failed, r_failed_seq)
           AS r(org, last, done, failed, failed_seq)
     WHERE c.projection = p_name AND c.target = p_target AND c.org = r.org
       AND (r.done > 0 OR r.last <> c.seq OR r.failed_seq IS NOT NULL OR p_retry);
    RETURN QUERY
    SELECT r.org, r.last, r.done, r.failed
      FROM unnest(r_orgs, r_last, r_done, r_failed) AS r(org, last, done, failed);
END
$$;

REVOKE EXECUTE ON FUNCTION hub.project(text, name, text[], integer, timestamptz, boolean, boolean)
    FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION hub.register_projection(text, regprocedure, text[], name, name, text)
    FROM PUBLIC;

-- What runs next: for each projection and org, the org's head and the
-- projection's checkpoint, where the checkpoint is behind.
CREATE VIEW hub.projection_lag AS
SELECT p.name AS projection, p.target_schema AS target, s.org, s.seq AS head,
       coalesce(c.seq, 0) AS seq, s.seq - coalesce(c.seq, 0) AS lag,
       c.applied, c.error, c.error_seq, c.error_at, c.updated_at
  FROM hub.projections p
 CROSS JOIN hub.org_seq s
  LEFT JOIN hub.projection_checkpoints c
    ON c.projection = p.name AND c.target = p.target_schema AND c.org = s.org;

-- The mother's history, kept by the built-in batch projection "mother".
-- Per minute and per hour (UTC), per org and event type, the events of the
-- org's log (both kinds: app events and captured row changes), bucketed by
-- created_at exactly as the live counters bucket them (floor of Unix
-- seconds / 60); the distinct users of each minute and hour (the event's
-- payload.user_id, or payload.record.user_id for a row change; events
-- without one count no user); and a summary per org.
CREATE SCHEMA IF NOT EXISTS mother;

CREATE TABLE mother.minutes (
    org text NOT NULL,
    minute timestamptz NOT NULL,
    type text NOT NULL,
    events bigint NOT NULL,
    PRIMARY KEY (org, minute, type)
);
CREATE INDEX minutes_minute ON mother.minutes (minute);

CREATE TABLE mother.hours (
    org text NOT NULL,
    hour timestamptz NOT NULL,
    type text NOT NULL,
    events bigint NOT NULL,
    PRIMARY KEY (org, hour, type)
);
CREATE INDEX hours_hour ON mother.hours (hour);

CREATE TABLE mother.minute_users (
    org text NOT NULL,
    minute timestamptz NOT NULL,
    user_id text NOT NULL,
    PRIMARY KEY (org, minute, user_id)
);

CREATE TABLE mother.hour_users (
    org text NOT NULL,
    hour timestamptz NOT NULL,
    user_id text NOT NULL,
    PRIMARY KEY (org, hour, user_id)
);

CREATE TABLE mother.orgs (
    org text PRIMARY KEY,
    first_event_at timestamptz NOT NULL,
    last_event_at timestamptz NOT NULL,
    events bigint NOT NULL,
    last_seq bigint NOT NULL
);

-- The batch handler: one set-based pass over the events (after, upto] of
-- every org of the batch, whatever their number.  Its tables are unqualified (the runner
-- sets search_path to the target schema), so a rebuild can fill copies.
-- (Its body names tables of whatever schema is first on the search_path
-- when it runs: not checked at creation.)
SET LOCAL check_function_bodies = off;
CREATE FUNCTION hub.mother_rollup(p_orgs text[], p_after bigint[], p_upto bigint[])
RETURNS void
LANGUAGE sql
AS $$
    WITH batch AS MATERIALIZED (
        -- LATERAL: one index range scan per org (a join let the planner
        -- scan the whole log, which grows).
        SELECT e.org,
               to_timestamp(floor(extract(epoch FROM e.created_at) / 60) * 60) AS minute,
               e.type,
               coalesce(e.payload ->> 'user_id', e.payload -> 'record' ->> 'user_id') AS user_id,
               e.created_at,
               e.seq
          FROM unnest(p_orgs, p_after, p_upto) AS b(org, after_seq, upto_seq)
         CROSS JOIN LATERAL (
             SELECT x.org, x.created_at, x.type, x.payload, x.seq FROM hub.events x
              WHERE x.org = b.org AND x.seq > b.after_seq AND x.seq <= b.upto_seq) e
    ), by_minute AS (
        INSERT INTO minutes AS m (org, minute, type, events)
        SELECT b.org, b.minute, b.type, count(*) FROM batch b GROUP BY 1, 2, 3
        ON CONFLICT (org, minute, type) DO UPDATE SET events = m.events + excluded.events
    ), by_hour AS (
        INSERT INTO hours AS h (org, hour, type, events)
        SELECT b.org, date_trunc('hour', b.minute), b.type, count(*) FROM batch b GROUP BY 1, 2, 3
        ON CONFLICT (org, hour, type) DO UPDATE SET events = h.events + excluded.events
    ), users_by_minute AS (
        INSERT INTO minute_users (org, minute, user_id)
        SELECT DISTINCT b.org, b.minute, b.user_id FROM batch b WHERE b.user_id IS NOT NULL
        ON CONFLICT DO NOTHING
    ), users_by_hour AS (
        INSERT INTO hour_users (org, hour, user_id)
        SELECT DISTINCT b.org, date_trunc('hour', b.minute), b.user_id
          FROM batch b WHERE b.user_id IS NOT NULL
        ON CONFLICT DO NOTHING
    )
    INSERT INTO orgs AS o (org, first_event_at, last_event_at, events, last_seq)
    SELECT b.org, min(b.created_at), max(b.created_at), count(*), max(b.seq)
      FROM batch b GROUP BY b.org
    ON CONFLICT (org) DO UPDATE
       SET first_event_at = least(o.first_event_at, excluded.first_event_at),
           last_event_at = greatest(o.last_event_at, excluded.last_event_at),
           events = o.events + excluded.events,
           last_seq = greatest(o.last_seq, excluded.last_seq);
$$;

RESET check_function_bodies;
REVOKE EXECUTE ON FUNCTION hub.mother_rollup(text[], bigint[], bigint[]) FROM PUBLIC;

-- Retention: minutes for 7 days, hours for 90 (the runner calls this).
CREATE FUNCTION hub.mother_prune(p_minutes interval DEFAULT '7 days',
                                 p_hours interval DEFAULT '90 days')
RETURNS void
LANGUAGE sql
AS $$
    DELETE FROM mother.minutes WHERE minute < now() - p_minutes;
    DELETE FROM mother.minute_users WHERE minute < now() - p_minutes;
    DELETE FROM mother.hours WHERE hour < now() - p_hours;
    DELETE FROM mother.hour_users WHERE hour < now() - p_hours;
$$;

-- The public interface of the mother's history (docs/mother.md).
CREATE VIEW mother.org_activity AS
SELECT org, minute, type, events FROM mother.minutes;

CREATE VIEW mother.network_activity AS
SELECT minute, sum(events)::bigint AS events, count(DISTINCT org)::bigint AS orgs
  FROM mother.minutes GROUP BY minute;

CREATE VIEW mother.org_activity_hourly AS
SELECT org, hour, type, events FROM mother.hours;

CREATE VIEW mother.network_activity_hourly AS
SELECT hour, sum(events)::bigint AS events, count(DISTINCT org)::bigint AS orgs
  FROM mother.hours GROUP BY hour;

CREATE VIEW mother.org_users AS
SELECT org, minute, count(*)::bigint AS users FROM mother.minute_users GROUP BY org, minute;

CREATE VIEW mother.org_users_hourly AS
SELECT org, hour, count(*)::bigint AS users FROM mother.hour_users GROUP BY org, hour;

CREATE VIEW mother.org_summary AS
SELECT org, first_event_at, last_event_at, events, last_seq FROM mother.orgs;

SELECT hub.register_projection('mother', 'hub.mother_rollup(text[], bigint[], bigint[])'::regprocedure,
                               NULL, 'mother', NULL, 'batch');
