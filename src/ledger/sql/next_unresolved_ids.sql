-- `ledger::next_unresolved_ids` (errors.rs).
SELECT DISTINCT id FROM (
SELECT CASE WHEN entity_id ~ '^[0-9]{1,18}$' THEN entity_id::int8 END AS id
FROM etl_folder_etlsyncerror WHERE entity_type = $1 AND NOT resolved) e
WHERE id > $2 ORDER BY id LIMIT $3
