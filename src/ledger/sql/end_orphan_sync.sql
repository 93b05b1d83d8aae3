-- `ledger::abandon_orphan` (lifecycle.rs).
UPDATE loansync_sync SET state = 'done', request_id = NULL, finished_at = now(),
chunks_remaining = 0 WHERE sync_id = $1
