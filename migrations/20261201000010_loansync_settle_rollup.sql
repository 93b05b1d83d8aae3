-- Settles that never wait for each other (issue 12): a chunk's settle writes its own
-- `loansync_chunk` row (counts, outcome, the API's answer) and no shared row. The history
-- row's counters are rolled up from the chunk rows, at most about once a second while a
-- sync runs and exactly at finalize; the last chunk is found by looking for unsettled
-- chunks after the commit (`loansync_chunk_unsettled`, the partial index
-- `(sync_id) WHERE settled_at IS NULL` of the ledger's first migration).

-- The last response body of the analytics API for this chunk (already cut to 64 KiB);
-- the newest one settled becomes the history's `api_response`.
ALTER TABLE loansync_chunk ADD COLUMN api_response jsonb;

-- When the history counters were last rolled up from the chunk rows (NULL: never). The
-- roll-up takes this row with SKIP LOCKED: a settler that does not get it does not wait.
ALTER TABLE loansync_sync ADD COLUMN rolled_up_at timestamptz;

-- `chunks_remaining` and `last_progress_at` are no longer maintained per settle: the
-- unsettled chunks are counted, and the progress is the newest `settled_at`, from the
-- chunk rows of the running sync (read by `status` and the stalled gauge, not per settle).
