-- `ledger::lifecycle::record_request` (`$6` pending, `$7` NULL) and `claim` (`$6`
-- planned, `$7` the sync). A repeated id inserts nothing and returns no row.
INSERT INTO loansync_request (request_id, sync_type, entities, since, until, state, sync_id,
                              planned_at, sweep, plan_attempts)
VALUES ($1, $2, $3, $4, $5, $6, $7, CASE WHEN $7::text IS NULL THEN NULL ELSE now() END, $8,
        CASE WHEN $7::text IS NULL THEN 0 ELSE 1 END)
ON CONFLICT (request_id) DO NOTHING
RETURNING request_id
