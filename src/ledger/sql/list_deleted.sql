-- `ledger::list_deleted` (reads.rs).
SELECT entity::text AS entity, id, detected_at, sync_id::text AS sync_id FROM loansync_deleted
WHERE $1::text IS NULL OR entity = $1 ORDER BY entity, id LIMIT $2
