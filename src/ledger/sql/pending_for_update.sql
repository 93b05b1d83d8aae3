-- `ledger::begin_pending` (lifecycle.rs).
SELECT request_id, sync_type::text, entities, since, until, sweep FROM loansync_request
WHERE state = 'pending' ORDER BY received_at, request_id FOR UPDATE
