-- When the next roll-up of a running sync's history counters is due (issue 12): set by
-- each roll-up from its own duration, so that roll-ups, which read every settled chunk
-- row of the sync, take a bounded share of the database however large the sync is
-- (`ledger::NEXT_ROLL_UP_SQL`). NULL: due now. Nullable without a default: no rewrite.
ALTER TABLE loansync_sync ADD COLUMN IF NOT EXISTS roll_up_due timestamptz;
