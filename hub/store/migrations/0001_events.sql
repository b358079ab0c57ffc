-- The event store: one append-only log per org with gap-free seqs.
--
-- hub.org_seq holds each org's last seq.  hub.append_event() takes the next
-- one with an upsert whose row lock lasts until commit: a second writer to
-- the same org waits there, so seqs are gap-free (a rolled-back writer
-- releases its number together with the lock) and become visible in seq
-- order (seq 11 cannot commit before seq 10).

CREATE SCHEMA IF NOT EXISTS hub;

CREATE TABLE hub.org_seq (
    org text PRIMARY KEY,
    seq bigint NOT NULL
);

CREATE TABLE hub.events (
    gid bigserial NOT NULL,
    org text NOT NULL CHECK (octet_length(org) BETWEEN 1 AND 200),
    seq bigint NOT NULL,
    id uuid NOT NULL DEFAULT gen_random_uuid(),
    kind text NOT NULL DEFAULT 'event' CHECK (kind IN ('event', 'change')),
    type text NOT NULL,
    payload jsonb NOT NULL DEFAULT 'null',
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (org, seq)
);

-- read_since(): an org's events from a point in time.
CREATE INDEX events_org_created_at ON hub.events (org, created_at);

-- The NOTIFY payload on channel 'hub_events' is a JSON object:
--   the whole event, when it fits well under the 8000-byte limit:
--     {"org", "seq", "id", "kind", "type", "created_at" (Unix seconds), "payload"}
--   otherwise a reference that the listener resolves by key:
--     {"org", "seq", "ref": true}
CREATE FUNCTION hub.append_event(org text, kind text, type text, payload jsonb)
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
    INSERT INTO hub.org_seq AS s (org, seq) VALUES (append_event.org, 1)
    ON CONFLICT ON CONSTRAINT org_seq_pkey DO UPDATE SET seq = s.seq + 1
    RETURNING s.seq INTO next_seq;

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

-- Apps append through the hub or through tracked tables, not directly.
REVOKE EXECUTE ON FUNCTION hub.append_event(text, text, text, jsonb) FROM PUBLIC;
