-- Broadcast from the database (../shared/protocol/AUTHORIZATION.md, section 3):
-- realtime.send() and realtime.broadcast_changes() as Supabase has them, and
-- the trigger that hands their rows of realtime.messages to the hub.
--
-- Reuse, never replace: on a Supabase database both functions exist already
-- and are kept exactly as they are (their bodies, owners and grants).  The
-- trigger below works for rows inserted by Supabase's own realtime.send too.
--
-- Like every migration this file runs in one transaction
-- (hub/store/migrate.py).

-- 1. realtime.send() and realtime.broadcast_changes(), when missing.  Same
-- signatures and behaviour as Supabase's: send adds an "id" (a new uuid) to
-- a payload that has none, inserts a 'broadcast' row with the caller's rights
-- (so the INSERT policies of realtime.messages apply) and never raises: an
-- error becomes a WARNING.  broadcast_changes is for row triggers only.
DO $functions$
BEGIN
    IF to_regprocedure('realtime.send(jsonb, text, text, boolean)') IS NULL THEN
        CREATE FUNCTION realtime.send(payload jsonb, event text, topic text,
                                      private boolean DEFAULT true)
        RETURNS void
        LANGUAGE plpgsql
        AS $send$
        DECLARE
            generated_id uuid;
            final_payload jsonb;
        BEGIN
            BEGIN
                generated_id := gen_random_uuid();
                IF payload ? 'id' THEN
                    final_payload := payload;
                ELSE
                    final_payload := jsonb_set(payload, '{id}', to_jsonb(generated_id));
                END IF;

                -- What the INSERT policies read with realtime.topic().
                PERFORM set_config('realtime.topic', topic, true);

                INSERT INTO realtime.messages (id, payload, event, topic, private, extension)
                VALUES (generated_id, final_payload, event, topic, private, 'broadcast');
            EXCEPTION
                WHEN OTHERS THEN
                    RAISE WARNING 'ErrorSendingBroadcastMessage: %', SQLERRM;
            END;
        END;
        $send$;
    END IF;

    IF to_regprocedure('realtime.broadcast_changes(text, text, text, text, text, record, record, text)') IS NULL THEN
        CREATE FUNCTION realtime.broadcast_changes(topic_name text, event_name text,
                                                   operation text, table_name text,
                                                   table_schema text, new record,
                                                   old record, level text DEFAULT 'ROW')
        RETURNS void
        LANGUAGE plpgsql
        AS $changes$
        DECLARE
            row_data jsonb := '{}'::jsonb;
        BEGIN
            IF level = 'STATEMENT' THEN
                RAISE EXCEPTION 'function can only be triggered for each row, not for each statement';
            END IF;
            IF operation = 'INSERT' OR operation = 'UPDATE' OR operation = 'DELETE' THEN
                row_data := jsonb_build_object('old_record', old, 'record', new,
                                               'operation', operation, 'table', table_name,
                                               'schema', table_schema);
                PERFORM realtime.send(row_data, event_name, topic_name, true);
            ELSE
                RAISE EXCEPTION 'Unexpected operation type: %', operation;
            END IF;
        EXCEPTION
            WHEN OTHERS THEN
                RAISE EXCEPTION 'Failed to process the row: %', SQLERRM;
        END;
        $changes$;
    END IF;
END
$functions$;

-- 2. The relay: every committed 'broadcast' row reaches the hub.
--
-- * topic org:<id> (the hub's org grammar exactly; org:<id>:<name> is not
--   durable): the row becomes a durable org event through hub.append_event()
--   (seq, history, replay, announced on hub_events), and nothing else.
-- * any other topic: NOTIFY hub_broadcasts with
--     {"id", "topic", "event", "private", "payload"}
--   or, when that would not fit well under NOTIFY's 8000-byte limit,
--     {"id", "topic", "inserted_at", "ref": true}
--   and the hub reads the row by its key.
--
-- NOTIFY and the append are transactional: a rolled-back row (the hub's
-- authorization probes are always rolled back) is never announced.  Rows
-- without an event name (the probes have none) cannot be delivered as a
-- broadcast and are skipped by the trigger's WHEN clause, so the probes pay
-- nothing for the relay.
--
-- SECURITY DEFINER: hub.append_event() is the hub's own; the trigger runs it
-- for whoever inserted the row (the INSERT policies of realtime.messages
-- decide who may send on an org:<id> topic).
CREATE FUNCTION hub.realtime_broadcast_relay()
RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    note text;
BEGIN
    IF NEW.topic COLLATE "C" ~ '^org:[A-Za-z0-9][A-Za-z0-9_-]{0,63}$' THEN
        -- The hub's event type rule: 1 to 255 bytes (hub.protocol.is_event_name).
        IF octet_length(NEW.event) > 255 THEN
            RAISE WARNING 'hub: broadcast on % not stored: its event name is longer than 255 bytes',
                NEW.topic;
            RETURN NULL;
        END IF;
        PERFORM hub.append_event(substr(NEW.topic, 5), 'event', NEW.event, NEW.payload);
        RETURN NULL;
    END IF;

    note := jsonb_build_object('id', NEW.id, 'topic', NEW.topic, 'event', NEW.event,
                               'private', coalesce(NEW.private, false),
                               'payload', NEW.payload)::text;
    IF octet_length(note) > 7500 THEN
        note := jsonb_build_object('id', NEW.id, 'topic', NEW.topic,
                                   'inserted_at', NEW.inserted_at, 'ref', true)::text;
        IF octet_length(note) > 7500 THEN
            RAISE WARNING 'hub: broadcast on %... not announced: its topic is too long',
                left(NEW.topic, 64);
            RETURN NULL;
        END IF;
    END IF;
    PERFORM pg_notify('hub_broadcasts', note);
    RETURN NULL;
END
$$;

REVOKE EXECUTE ON FUNCTION hub.realtime_broadcast_relay() FROM PUBLIC;

-- The trigger, once: a row trigger on the partitioned table applies to every
-- partition, present and future.  On a Supabase database the hub's role may
-- not own realtime.messages: that degrades to a WARNING naming the SQL an
-- administrator should run.
DO $relay$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_catalog.pg_trigger
                WHERE tgrelid = 'realtime.messages'::regclass
                  AND tgname = 'hub_broadcast_relay') THEN
        RETURN;
    END IF;
    BEGIN
        CREATE TRIGGER hub_broadcast_relay
            AFTER INSERT ON realtime.messages
            FOR EACH ROW
            WHEN (NEW.extension = 'broadcast' AND NEW.event IS NOT NULL)
            EXECUTE FUNCTION hub.realtime_broadcast_relay();
    EXCEPTION
        WHEN insufficient_privilege THEN
            RAISE WARNING 'hub migrate could not create the trigger on realtime.messages: %', SQLERRM
                USING HINT = 'An administrator should run: CREATE TRIGGER hub_broadcast_relay '
                             'AFTER INSERT ON realtime.messages FOR EACH ROW '
                             'WHEN (NEW.extension = ''broadcast'' AND NEW.event IS NOT NULL) '
                             'EXECUTE FUNCTION hub.realtime_broadcast_relay();';
    END;
END
$relay$;
