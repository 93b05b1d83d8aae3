-- `ledger::resolve_errors` (errors.rs).
UPDATE etl_folder_etlsyncerror SET resolved = true, resolved_at = now()
WHERE id = ANY($1) AND NOT resolved
