-- `ledger::record_deleted` (plan.rs).
INSERT INTO loansync_deleted (entity, id, sync_id) SELECT $1, unnest($2::int8[]), $3
ON CONFLICT (entity, id) DO UPDATE SET detected_at = now(), sync_id = EXCLUDED.sync_id
