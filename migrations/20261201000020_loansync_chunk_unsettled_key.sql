-- The partial index of unsettled chunks keyed by the whole chunk key (issue 12). Keyed
-- by `sync_id` alone, it is also what PostgreSQL picks for the settle's
-- `UPDATE … WHERE sync_id = $1 AND entity = $2 AND seq = $3 AND settled_at IS NULL`
-- (its predicate matches, and the ledger table's statistics are those of an empty table
-- until it is analyzed): the settle then walked every unsettled chunk of the sync to find
-- its own, O(chunks) per settle and O(chunks²) per sync (95 buffers per settle on dataset
-- S, 0.4 ms). With the full key the same index finds the one row. The sync-wide reads
-- (any chunk unsettled? the next page of unsettled chunks) use its leading column as
-- before. loansync's own table: built under a brief lock, not CONCURRENTLY.
CREATE INDEX loansync_chunk_unsettled_key ON loansync_chunk (sync_id, entity, seq)
    WHERE settled_at IS NULL;
DROP INDEX loansync_chunk_unsettled;
ALTER INDEX loansync_chunk_unsettled_key RENAME TO loansync_chunk_unsettled;
