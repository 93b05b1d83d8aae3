-- `ledger::watermarks` (watermarks.rs).
SELECT entity_type::text AS entity, last_sync_timestamp, last_sync_id::text AS last_sync_id, updated_at
FROM etl_folder_etllastsync ORDER BY entity_type
