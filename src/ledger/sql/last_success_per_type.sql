-- The end time of the last regular sync of each type that moved the watermarks (not a
-- retry, a backfill, or a watermark set by hand: loansync_sync.purpose = 'sync').
SELECT h.sync_type::text AS sync_type, EXTRACT(EPOCH FROM max(h.completed_at))::float8 AS completed_at
FROM etl_folder_etlsynchistory h LEFT JOIN loansync_sync s USING (sync_id)
WHERE h.status IN ('completed', 'partial_success') AND s.purpose = 'sync'
GROUP BY h.sync_type
