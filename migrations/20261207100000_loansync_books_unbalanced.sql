-- Books checked at finalize (issue 26): the entities of a sync whose books did not
-- balance when it was finalized (success + failed != total, or error rows that do not
-- match the failed records), NULL when they did. Written by the finalize, in its
-- transaction; read at scrape time for `etl_books_unbalanced_total{entity}`, so every pod
-- shows the same count and a restarted one loses nothing.
ALTER TABLE loansync_sync ADD COLUMN books_unbalanced text[];

CREATE INDEX loansync_sync_books_unbalanced ON loansync_sync (sync_id)
    WHERE books_unbalanced IS NOT NULL;
