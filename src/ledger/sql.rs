//! The ledger's larger statements, kept in `.sql` files beside this module.

pub(crate) const INSERT_HISTORY: &str = include_str!("sql/insert_history.sql");
pub(crate) const ROLL_UP_COUNTERS: &str = include_str!("sql/roll_up_counters.sql");
pub(crate) const INSERT_ERRORS: &str = include_str!("sql/insert_errors.sql");
pub(crate) const RETRY_ERRORS: &str = include_str!("sql/retry_errors.sql");
pub(crate) const RESOLVE_ERRORS: &str = include_str!("sql/resolve_errors.sql");
pub(crate) const UPSERT_WATERMARK: &str = include_str!("sql/upsert_watermark.sql");
pub(crate) const WINDOW_HI: &str = include_str!("sql/window_hi.sql");
pub(crate) const WINDOW_CAP: &str = include_str!("sql/window_cap.sql");
pub(crate) const SAMPLE_XID_CLOCK: &str = include_str!("sql/sample_xid_clock.sql");
pub(crate) const LAST_SYNC_PER_TYPE: &str = include_str!("sql/last_sync_per_type.sql");
pub(crate) const LAST_SUCCESS_PER_TYPE: &str = include_str!("sql/last_success_per_type.sql");
pub(crate) const KNOWN_REQUEST: &str = include_str!("sql/known_request.sql");
pub(crate) const KNOWN_REQUEST_FOR_UPDATE: &str =
    concat!(include_str!("sql/known_request.sql"), "FOR UPDATE OF r");
pub(crate) const PENDING_FOR_UPDATE: &str = include_str!("sql/pending_for_update.sql");
pub(crate) const MARK_PLANNED: &str = include_str!("sql/mark_planned.sql");
pub(crate) const PENDING_READY: &str = include_str!("sql/pending_ready.sql");
pub(crate) const PENDING_REQUESTS: &str = include_str!("sql/pending_requests.sql");
pub(crate) const INSERT_SYNC: &str = include_str!("sql/insert_sync.sql");
pub(crate) const INSERT_REQUEST: &str = include_str!("sql/insert_request.sql");
pub(crate) const REQUEUE_ORPHAN_REQUESTS: &str = include_str!("sql/requeue_orphan_requests.sql");
pub(crate) const FAIL_ORPHAN_HISTORY: &str = include_str!("sql/fail_orphan_history.sql");
pub(crate) const END_ORPHAN_SYNC: &str = include_str!("sql/end_orphan_sync.sql");
pub(crate) const RECORD_DELETED: &str = include_str!("sql/record_deleted.sql");
pub(crate) const INSERT_SYNC_ENTITY: &str = include_str!("sql/insert_sync_entity.sql");
pub(crate) const START_RUNNING: &str = include_str!("sql/start_running.sql");
pub(crate) const START_CHUNK: &str = include_str!("sql/start_chunk.sql");
pub(crate) const LIST_ERRORS: &str = include_str!("sql/list_errors.sql");
pub(crate) const RESOLVE_ERRORS_BY_ID: &str = include_str!("sql/resolve_errors_by_id.sql");
pub(crate) const LIST_WATERMARKS: &str = include_str!("sql/list_watermarks.sql");
pub(crate) const AUDIT_WATERMARK: &str = include_str!("sql/audit_watermark.sql");
pub(crate) const LIST_DELETED: &str = include_str!("sql/list_deleted.sql");
pub(crate) const WATERMARK_AGES: &str = include_str!("sql/watermark_ages.sql");
