-- `ledger::watermark_ages` (reads.rs).
SELECT entity_type::text AS entity,
EXTRACT(EPOCH FROM now() - last_sync_timestamp)::float8 AS age_seconds
FROM etl_folder_etllastsync
