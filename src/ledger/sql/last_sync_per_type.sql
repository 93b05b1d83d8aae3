-- The last finished regular sync (not an error retry) of each type: type, status, end
-- time (epoch seconds), records succeeded, records failed. `started_at DESC` uses
-- Django's index; one sync runs at a time, so the last started is the last finished.
SELECT t.sync_type, l.status, EXTRACT(EPOCH FROM l.completed_at)::float8 AS completed_at,
       l.succeeded::int8 AS succeeded, l.failed::int8 AS failed
FROM (VALUES ('full'), ('incremental')) AS t(sync_type)
CROSS JOIN LATERAL (
    SELECT h.status, h.completed_at,
           h.loans_success + h.repayments_success + h.customers_success + h.officers_success AS succeeded,
           h.loans_failed + h.repayments_failed + h.customers_failed + h.officers_failed AS failed
    FROM etl_folder_etlsynchistory h LEFT JOIN loansync_sync s USING (sync_id)
    WHERE h.sync_type = t.sync_type AND h.completed_at IS NOT NULL
      AND h.status IN ('completed', 'partial_success', 'failed')
      AND s.purpose = 'sync'
    ORDER BY h.started_at DESC LIMIT 1) l
