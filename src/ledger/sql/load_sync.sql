-- `ledger::lifecycle::load_sync`: a sync as the state machine reads it (decoded into
-- `SyncRow` at once).
SELECT sync_id::text AS sync_id, state, sync_type::text AS sync_type, purpose, entities,
       window_hi, since, published_at IS NOT NULL AS published
FROM loansync_sync WHERE sync_id = $1
