-- `ledger::start_chunk` (plan.rs): a chunk as a worker reads it, its attempt counted
-- when `$4` is 1 (a delivery of the chunk), not when 0 (a settle job, a chunk failed
-- after a panic: the attempt that met it was counted already).
UPDATE loansync_chunk c SET attempts = c.attempts + $4
FROM loansync_sync s, etl_folder_etlsynchistory h
WHERE c.sync_id = $1 AND c.entity = $2 AND c.seq = $3
AND s.sync_id = c.sync_id AND h.sync_id = c.sync_id
RETURNING c.ids, c.settled_at IS NOT NULL AS settled, s.sync_type::text AS sync_type,
s.purpose::text AS purpose, h.id AS history_id, c.attempts
