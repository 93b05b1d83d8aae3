-- `ledger::abandon_orphan` (lifecycle.rs).
UPDATE etl_folder_etlsynchistory SET status = 'failed', completed_at = now(),
duration_seconds = EXTRACT(EPOCH FROM (now() - started_at))::float8, error_message = $2
WHERE sync_id = $1
