-- `ledger::begin_pending` (lifecycle.rs).
UPDATE loansync_request SET state = 'planned', sync_id = $2, planned_at = now()
WHERE request_id = ANY($1)
