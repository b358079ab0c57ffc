-- Database per org: which database holds which org, and moving an org
-- between databases while it is live (hub.store.registry, hub.store.moves,
-- docs/tenancy.md).
--
-- 1. hub.org_databases (in the control database, HUB_DATABASE_URL): the
--    orgs that live in a database of their own.  An org without a row lives
--    in the control database.  Every node reads it once a second.
-- 2. hub.org_moves: a move in progress, one per org at most (the primary
--    key is what refuses a second move of the same org), and the step it
--    reached, so that an interrupted move can be resumed or rolled back.
-- 3. hub.org_seq.moved_to: set in the database an org is leaving, from the
--    moment its writes are frozen.  hub.append_event() then refuses the
--    org's events with SQLSTATE HB001 (the hub retries them where the org
--    lives now; a trigger's write fails), so no event of the org can land
--    in a database that is no longer its own.
--
-- Every database the hub uses (control and tenants) gets the same
-- migrations; the registry tables stay empty outside the control database.

CREATE TABLE hub.org_databases (
    org text PRIMARY KEY CHECK (octet_length(org) BETWEEN 1 AND 200),
    -- The DSN the nodes connect with (it may carry a password: the API and
    -- logs show hub.store.registry.display_name() of it instead).
    dsn text NOT NULL CHECK (dsn ~ '^postgres(ql)?://'),
    added_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE hub.org_moves (
    org text PRIMARY KEY,
    -- NULL: the control database.
    source text,
    target text,
    step text NOT NULL CHECK (step IN ('copying', 'frozen', 'switched')),
    started_at timestamptz NOT NULL DEFAULT now(),
    frozen_at timestamptz,
    switched_at timestamptz,
    CHECK (source IS DISTINCT FROM target)
);

ALTER TABLE hub.org_seq ADD COLUMN moved_to text;

CREATE OR REPLACE FUNCTION hub.append_event(org text, kind text, type text, payload jsonb)
RETURNS hub.events
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    next_seq bigint;
    ev hub.events;
    note text;
BEGIN
    -- The WHERE makes an org that is leaving this database take no seq: a
    -- writer that waited on the row lock while the move froze the org
    -- finds moved_to set when it gets the row, and gets no seq either.
    INSERT INTO hub.org_seq AS s (org, seq) VALUES (append_event.org, 1)
    ON CONFLICT ON CONSTRAINT org_seq_pkey DO UPDATE SET seq = s.seq + 1
    WHERE s.moved_to IS NULL
    RETURNING s.seq INTO next_seq;
    IF next_seq IS NULL THEN
        RAISE EXCEPTION 'hub: org % is moving or has moved to another database; '
                        'write to the database that holds it now', append_event.org
            USING ERRCODE = 'HB001';
    END IF;

    -- clock_timestamp(), read after the seq lock is taken, makes created_at
    -- ascend with seq within an org (now() is the transaction's start).
    INSERT INTO hub.events (org, seq, kind, type, payload, created_at)
    VALUES (append_event.org, next_seq, coalesce(append_event.kind, 'event'),
            append_event.type, coalesce(append_event.payload, 'null'::jsonb),
            clock_timestamp())
    RETURNING * INTO ev;

    note := jsonb_build_object(
        'org', ev.org, 'seq', ev.seq, 'id', ev.id, 'kind', ev.kind,
        'type', ev.type, 'created_at', extract(epoch FROM ev.created_at),
        'payload', ev.payload)::text;
    IF octet_length(note) > 7000 THEN
        note := jsonb_build_object('org', ev.org, 'seq', ev.seq, 'ref', true)::text;
    END IF;
    PERFORM pg_notify('hub_events', note);
    RETURN ev;
END
$$;

REVOKE EXECUTE ON FUNCTION hub.append_event(text, text, text, jsonb) FROM PUBLIC;

-- An org that has left this database is no longer projected here (its
-- rollups and checkpoints are deleted by the move's cleanup).
CREATE OR REPLACE VIEW hub.projection_lag AS
SELECT p.name AS projection, p.target_schema AS target, s.org, s.seq AS head,
       coalesce(c.seq, 0) AS seq, s.seq - coalesce(c.seq, 0) AS lag,
       c.applied, c.error, c.error_seq, c.error_at, c.updated_at
  FROM hub.projections p
 CROSS JOIN hub.org_seq s
  LEFT JOIN hub.projection_checkpoints c
    ON c.projection = p.name AND c.target = p.target_schema AND c.org = s.org
 WHERE s.moved_to IS NULL;
