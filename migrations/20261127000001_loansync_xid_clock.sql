-- A clock of transaction ids: (transaction id, time) pairs that loansync samples while it
-- runs (every plan, and every few seconds in a long-running planner). The end of a sync's
-- window is capped at the start of the oldest transaction still open with writes; the
-- role loansync runs as cannot read other roles' `pg_stat_activity.xact_start`, but it
-- can read their `backend_xid`: the newest sample taken before that transaction id was
-- handed out is a time before the transaction's first write (SPEC.md section 2).
CREATE TABLE loansync_xid_clock (
    xid  xid8        PRIMARY KEY,
    -- The same transaction id, 32 bits, for `age()` against `pg_stat_activity.backend_xid`.
    xid32 xid        NOT NULL,
    -- The sampling transaction's start: at or before the moment `xid` was assigned.
    at   timestamptz NOT NULL
);

-- The first sample: any transaction that starts writing from now on can be bounded.
INSERT INTO loansync_xid_clock (xid, xid32, at)
SELECT pg_current_xact_id(), (pg_current_xact_id()::text::bigint % 4294967296)::text::xid, now();

-- A sync whose planner died keeps no slot: who plans holds a session advisory lock, and a
-- 'planning' row nobody holds that lock for is abandoned by the next planner.
-- Finished syncs' chunk id lists are pruned after ETL_CHUNK_RETENTION_DAYS; the counts
-- stay with the sync.
ALTER TABLE loansync_sync ADD COLUMN finished_at timestamptz;
ALTER TABLE loansync_sync ADD COLUMN chunks_pruned_at timestamptz;
UPDATE loansync_sync s SET finished_at = h.completed_at
FROM etl_folder_etlsynchistory h WHERE h.sync_id = s.sync_id AND s.state = 'done';
CREATE INDEX loansync_sync_finished ON loansync_sync (finished_at) WHERE chunks_pruned_at IS NULL;
ALTER TABLE loansync_chunk DROP CONSTRAINT loansync_chunk_outcome_check;
ALTER TABLE loansync_chunk ADD CONSTRAINT loansync_chunk_outcome_check
    CHECK (outcome IN ('delivered', 'aborted', 'dead', 'abandoned'));
