-- `ledger::insert_sync_entity` (plan.rs).
INSERT INTO loansync_sync_entity (sync_id, entity, window_lo, window_hi, planned)
VALUES ($1, $2, $3, $4, $5)
