-- The request and sync state machine (issue 22, ledger::lifecycle).

-- When every chunk job of a running sync was published (confirmed). NULL on a running
-- sync: its planner died, or its broker failed, between the plan's commit and the last
-- confirm; the planner's housekeeping publishes its unsettled chunks again (a worker
-- counts a chunk once) and sets it. Syncs running when this migration runs are published
-- once more by the first planner that sees them, which is harmless for the same reason.
ALTER TABLE loansync_sync ADD COLUMN IF NOT EXISTS published_at timestamptz;
UPDATE loansync_sync SET published_at = COALESCE(finished_at, now()) WHERE state = 'done';

-- How many syncs were claimed for a request whose planner then died before the plan
-- committed: each takeover puts the request back to pending, up to a bound, so that a
-- request whose planning keeps killing its planner ends answered (its last sync failed)
-- instead of being claimed forever.
ALTER TABLE loansync_request ADD COLUMN IF NOT EXISTS plan_attempts integer NOT NULL DEFAULT 0;
UPDATE loansync_request SET plan_attempts = 1 WHERE state = 'planned' AND plan_attempts = 0;
