-- Records delivered successfully: their open error rows, from any sync, are resolved.
UPDATE etl_folder_etlsyncerror SET resolved = true, resolved_at = now()
WHERE entity_type = $1 AND entity_id = ANY($2::text[]) AND NOT resolved
