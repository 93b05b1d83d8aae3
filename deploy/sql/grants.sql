-- The least-privilege role loansync runs as (planner, workers, triggers, status).
--
-- Run once per database, as the owner of Django's tables, AFTER `loansync migrate`
-- (which runs as that owner: it creates the ETL tables when Django has not, loansync's
-- own `loansync_*` tables, and indexes on Django's tables, which needs ownership):
--
--   psql "$OWNER_DATABASE_URL" -v ON_ERROR_STOP=1 -f deploy/sql/grants.sql
--
-- then set DATABASE_URL of the planner and workers to this role. The role name is
-- `loansync`; change it below if yours differs. No superuser is needed.
--
-- The sync window's end (SPEC.md section 2, README "Window") is capped at the start of
-- every open transaction whose pg_stat_activity.xact_start the role can read. With the
-- grants below alone it reads only its own sessions'; other roles' transactions are
-- then capped at their first write (through backend_xid, which every role reads, and
-- loansync's xid clock), and one case stays open: a row stamped with a time taken
-- before its transaction's first write (now() in a transaction that read first) and
-- committed after a sync was planned can be missed. `loansync check` (`window`) and the
-- planner's start-up log say so. To close it, also run, as a superuser or another role
-- that may grant it (the tables' owner usually may not, so it is not among the GRANTs
-- below):
--
--   GRANT pg_read_all_stats TO loansync;
--
-- It lets the role read every session's statistics, other sessions' query text included
-- (loansync reads only xact_start, state and backend_type of pg_stat_activity).
-- CREATE ROLE loansync LOGIN PASSWORD '…';   -- or however your roles are managed

GRANT USAGE ON SCHEMA public TO loansync;

-- Django's source tables: read only.
GRANT SELECT ON accounts_customuser, ajo_ajouser, loans_ajoloan, loans_ajoloanrepayment,
    loans_ajoloanschedule TO loansync;

-- The ETL tables the Django application reads: loansync writes them.
GRANT SELECT, INSERT, UPDATE ON etl_folder_etlsynchistory, etl_folder_etlsyncerror,
    etl_folder_etllastsync TO loansync;
GRANT USAGE ON SEQUENCE etl_folder_etlsynchistory_id_seq, etl_folder_etlsyncerror_id_seq,
    etl_folder_etllastsync_id_seq TO loansync;

-- loansync's own tables (DELETE: pruning the chunk ledger and the xid clock).
GRANT SELECT, INSERT, UPDATE, DELETE ON loansync_sync, loansync_sync_entity, loansync_chunk,
    loansync_xid_clock, loansync_request TO loansync;
GRANT SELECT ON loansync_pending_request TO loansync;
-- The sweep's records: what was delivered (fingerprints) and what was found deleted.
GRANT SELECT, INSERT, UPDATE, DELETE ON loansync_delivered, loansync_deleted,
    loansync_sweep_digest TO loansync;

-- Adaptive concurrency: the live workers (heartbeats) and the API's fleet-wide pause.
GRANT SELECT, INSERT, UPDATE, DELETE ON loansync_worker TO loansync;
GRANT SELECT, INSERT, UPDATE ON loansync_api_pause TO loansync;

-- `loansync status` and the migrate Job's check read the migration history.
GRANT SELECT ON _sqlx_migrations TO loansync;
