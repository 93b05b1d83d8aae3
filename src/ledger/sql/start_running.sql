-- `ledger::write_plan` (plan.rs).
UPDATE loansync_sync SET state = $3, chunks_total = $2, chunks_remaining = $2,
last_progress_at = now() WHERE sync_id = $1
