-- Moves an entity's watermark to the end of a finished sync's window.
INSERT INTO etl_folder_etllastsync (entity_type, last_sync_timestamp, last_sync_id, updated_at)
VALUES ($1, $2, $3, now())
ON CONFLICT (entity_type) DO UPDATE
SET last_sync_timestamp = EXCLUDED.last_sync_timestamp,
    last_sync_id = EXCLUDED.last_sync_id,
    updated_at = now()
