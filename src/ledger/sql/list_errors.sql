-- `ledger::list_errors` (errors.rs).
SELECT e.id, h.sync_id::text AS sync_id, e.entity_type::text AS entity_type, e.entity_id::text AS entity_id,
e.error_code::text AS error_code, e.error_message, e.error_details, e.created_at, e.retry_count,
e.last_retry_at, e.resolved, e.resolved_at
FROM etl_folder_etlsyncerror e JOIN etl_folder_etlsynchistory h ON h.id = e.sync_history_id
WHERE ($1::text IS NULL OR h.sync_id = $1) AND ($2::text IS NULL OR e.entity_type = $2)
AND (NOT $3 OR NOT e.resolved)
ORDER BY e.created_at DESC, e.id DESC LIMIT $4
