-- `ledger::insert_request` (lifecycle.rs).
INSERT INTO loansync_request (request_id, sync_type, entities, since, until, state, sync_id, planned_at, sweep)
VALUES ($1, $2, $3, $4, $5, $6, $7, CASE WHEN $7::text IS NULL THEN NULL ELSE now() END, $8)
