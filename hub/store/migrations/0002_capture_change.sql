-- Change capture for tracked app tables (hub.store.tracking installs the
-- triggers).  One shared trigger function; TG_ARGV[0] names the org column.
--
-- Each captured row change is appended as an event of kind 'change' and
-- type TG_OP to the row's org, in the writer's transaction, with the payload
--   {"schema", "table", "type", "record", "old_record", "columns",
--    "commit_timestamp"}
-- record is the new row (null for DELETE), old_record the old row (null for
-- INSERT), columns [{"name", "type"}] with pg_type.typname ("int8", "text",
-- "timestamptz"...), commit_timestamp the transaction's timestamp as
-- "YYYY-MM-DDTHH:MM:SS.mmmZ".
--
-- Rows whose org column is NULL are not captured.  An UPDATE that moves a
-- row to another org is split so that neither org sees the other's row: the
-- old org gets a DELETE (old_record = the old row), the new org an INSERT
-- (record = the new row).
--
-- SECURITY DEFINER: the app's roles write their tables without any
-- privilege on the hub schema.
CREATE FUNCTION hub.capture_change()
RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    org_column text := TG_ARGV[0];
    new_record jsonb;
    old_record jsonb;
    new_org text;
    old_org text;
    columns jsonb;
    base jsonb;
BEGIN
    IF TG_OP IN ('INSERT', 'UPDATE') THEN
        new_record := to_jsonb(NEW);
        new_org := new_record ->> org_column;
    END IF;
    IF TG_OP IN ('UPDATE', 'DELETE') THEN
        old_record := to_jsonb(OLD);
        old_org := old_record ->> org_column;
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

-- Whoever may attach this function to a table may append to any org: only
-- the hub's own role (the owner) and roles granted EXECUTE may track.
REVOKE EXECUTE ON FUNCTION hub.capture_change() FROM PUBLIC;
