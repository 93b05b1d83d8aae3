-- `ledger::errors::write_error_rows`: one error row per failed record, the one statement
-- that writes new rows to etl_folder_etlsyncerror (Django set no defaults: every column
-- is named). $1 entity, $2 ids, $3 codes, $4 messages, $5 details (JSON array, same
-- order), $6 history id, $7 retry_count (0 for a regular sync; 1 for a record that
-- failed again in a retry sync with no open row left: last_retry_at is then set).
INSERT INTO etl_folder_etlsyncerror (
    entity_type, entity_id, error_code, error_message, error_details,
    created_at, retry_count, last_retry_at, resolved, resolved_at, sync_history_id
)
SELECT $1, f.entity_id, f.error_code, f.error_message, d.details,
       now(), $7, CASE WHEN $7 > 0 THEN now() END, false, NULL, $6
FROM unnest($2::text[], $3::text[], $4::text[]) WITH ORDINALITY AS f(entity_id, error_code, error_message, n)
JOIN jsonb_array_elements($5::jsonb) WITH ORDINALITY AS d(details, n) USING (n)
