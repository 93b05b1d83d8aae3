-- `ledger::lifecycle::claim_pending`: the pending requests a new sync serves.
UPDATE loansync_request SET state = 'planned', sync_id = $2, planned_at = now(),
       plan_attempts = plan_attempts + 1
WHERE request_id = ANY($1) AND state = 'pending'
