-- `ledger::pending_ready` (lifecycle.rs).
SELECT EXISTS (SELECT 1 FROM loansync_request WHERE state = 'pending')
AND NOT EXISTS (SELECT 1 FROM loansync_sync WHERE state <> 'done')
