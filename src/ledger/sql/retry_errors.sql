-- `ledger::errors::write_error_rows`: records that failed again in a retry sync: their
-- open error rows get retry_count + 1, last_retry_at and the new error. Returns the ids
-- bumped; the others (resolved by hand meanwhile) get a new row (insert_errors.sql).
-- $1 entity, $2 ids, $3 codes, $4 messages, $5 details (JSON array, same order).
WITH f AS (
    SELECT f.entity_id, f.error_code, f.error_message, d.details
    FROM unnest($2::text[], $3::text[], $4::text[]) WITH ORDINALITY AS f(entity_id, error_code, error_message, n)
    JOIN jsonb_array_elements($5::jsonb) WITH ORDINALITY AS d(details, n) USING (n)
)
UPDATE etl_folder_etlsyncerror e
SET retry_count = e.retry_count + 1, last_retry_at = now(),
    error_code = f.error_code, error_message = f.error_message, error_details = f.details
FROM f
WHERE e.entity_type = $1 AND e.entity_id = f.entity_id AND NOT e.resolved
RETURNING e.entity_id::text
