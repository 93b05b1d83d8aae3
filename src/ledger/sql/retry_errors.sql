-- Records that failed again in a retry sync: their open error rows get retry_count + 1 and
-- last_retry_at; a record with no open row (resolved by hand meanwhile) gets a new one.
WITH f AS (
    SELECT f.entity_id, f.error_code, f.error_message, d.details
    FROM unnest($2::text[], $3::text[], $4::text[]) WITH ORDINALITY AS f(entity_id, error_code, error_message, n)
    JOIN jsonb_array_elements($5::jsonb) WITH ORDINALITY AS d(details, n) USING (n)
), bumped AS (
    UPDATE etl_folder_etlsyncerror e
    SET retry_count = e.retry_count + 1, last_retry_at = now(),
        error_code = f.error_code, error_message = f.error_message, error_details = f.details
    FROM f
    WHERE e.entity_type = $1 AND e.entity_id = f.entity_id AND NOT e.resolved
    RETURNING e.entity_id
)
INSERT INTO etl_folder_etlsyncerror (
    entity_type, entity_id, error_code, error_message, error_details,
    created_at, retry_count, last_retry_at, resolved, resolved_at, sync_history_id
)
SELECT $1, f.entity_id, f.error_code, f.error_message, f.details, now(), 1, now(), false, NULL, $6
FROM f WHERE f.entity_id NOT IN (SELECT entity_id FROM bumped)
