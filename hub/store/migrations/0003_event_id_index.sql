-- Look an event up by its id within its org: a client that only kept the
-- last event id it saw (realtime-py drops meta.seq) resumes from there.
CREATE INDEX IF NOT EXISTS events_org_id ON hub.events (org, id);
