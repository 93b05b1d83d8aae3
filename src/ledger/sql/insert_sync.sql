-- `ledger::claim` (lifecycle.rs).
INSERT INTO loansync_sync (sync_id, request_id, sync_type, purpose, entities, state, window_hi, since)
VALUES ($1, $2, $3, $4, $5, 'planning', $6, $7)
