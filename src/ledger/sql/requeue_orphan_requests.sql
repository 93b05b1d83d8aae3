-- `ledger::lifecycle::abandon_orphan`: the requests a sync whose planner died served are
-- pending again (anonymous ones too: their messages were acked when they were recorded),
-- unless they were claimed `$2` times already; those stay with the failed sync, answered.
UPDATE loansync_request SET state = 'pending', sync_id = NULL, planned_at = NULL
WHERE sync_id = $1 AND plan_attempts < $2
RETURNING request_id
