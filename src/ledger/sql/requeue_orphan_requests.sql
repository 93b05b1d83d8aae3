-- `ledger::abandon_orphan` (lifecycle.rs).
UPDATE loansync_request SET state = 'pending', sync_id = NULL, planned_at = NULL
WHERE sync_id = $1 AND request_id NOT LIKE 'anonymous-%'
