-- `ledger::set_watermark` (watermarks.rs).
UPDATE etl_folder_etlsynchistory SET status = 'completed', completed_at = now(),
duration_seconds = 0, sync_start_date = $2, sync_end_date = $3, error_message = $4
WHERE sync_id = $1
