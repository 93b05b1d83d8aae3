//! The ledger's larger statements, kept in `.sql` files beside this module.

pub(crate) const INSERT_HISTORY: &str = include_str!("sql/insert_history.sql");
pub(crate) const ROLL_UP_COUNTERS: &str = include_str!("sql/roll_up_counters.sql");
pub(crate) const INSERT_ERRORS: &str = include_str!("sql/insert_errors.sql");
pub(crate) const RETRY_ERRORS: &str = include_str!("sql/retry_errors.sql");
pub(crate) const RESOLVE_ERRORS: &str = include_str!("sql/resolve_errors.sql");
pub(crate) const UPSERT_WATERMARK: &str = include_str!("sql/upsert_watermark.sql");
pub(crate) const WINDOW_HI: &str = include_str!("sql/window_hi.sql");
pub(crate) const SAMPLE_XID_CLOCK: &str = include_str!("sql/sample_xid_clock.sql");
