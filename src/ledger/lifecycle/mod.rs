//! The lifecycle of planning requests and syncs: the one module that writes their
//! states (`loansync_request.state`, `loansync_sync.state` and `published_at`), each
//! transition one function.
//!
//! ```text
//!  request:  (message) ──record──▶ pending ──claim_pending──▶ planned ─ ─ ▶ answered
//!                                     ▲                          │          (its sync done)
//!                                     └──── take_over_orphans ───┘
//!                                           (its sync's planner died while planning)
//!
//!  sync:     claim / claim_pending ──▶ planning ──start_running──▶ running ──finish──▶ done
//!                                        │                          │ published_at: set by
//!                                        │                          │ mark_published once
//!                                        │                          │ every job is confirmed
//!                                        └── take_over_orphans, ────┴─▶ done (failed)
//!                                            fail_planning, abandon     (abort, abandon)
//! ```
//!
//! The rules every path follows:
//! * A request is recorded (`pending`) and its message acked before anything waits on
//!   the planning lock or the clock ([`record_request`]); planning happens after, from
//!   the pending requests ([`claim_pending`]).
//! * Whoever claims and plans holds the [`PlanningLock`]. Under it, a `planning` sync
//!   has lost its planner: [`take_over_orphans`] ends it (nothing was sent) and puts
//!   each request it served back to pending, anonymous ones included, so that nothing
//!   asked for is lost and nothing is planned from the wrong request.
//! * A sync is planned only from its stored row ([`load_sync`]): type, purpose,
//!   entities, window.
//! * Every failure after a claim either finishes the sync ([`fail_planning`]: planning
//!   cannot succeed) or leaves it to the next takeover, which puts its requests back.
//! * A `running` sync whose jobs were not all published is published again from the
//!   chunk ledger by the planner's housekeeping ([`unpublished`], then
//!   [`mark_published`]): workers count a chunk once, so a second copy is harmless.

mod lock;
mod requests;
mod syncs;

pub use lock::{PLANNER_GONE_SQL, PLANNING_LOCK_KEY, PlanningLock, with_planning_lock};
pub use requests::{
    PendingEntry, Recorded, RequestState, pending_requests, record_request, request_state,
};
pub use syncs::{
    Claim, MAX_PLAN_ATTEMPTS, PendingClaim, RowLock, SyncRow, SyncSpec, claim, claim_pending,
    fail_planning, hold_planning, load_sync, mark_published, sync_finished, sync_state,
    take_over_orphans, unpublished, window_end,
};
pub(crate) use syncs::{active_sync, finish, start_running};

use sqlx::PgPool;
use std::sync::LazyLock;

/// Whether the planner has work under the planning lock, read without taking it: a
/// pending request with the slot free, or a sync whose planner is gone (`planning`, or
/// `running` with jobs not all published). The planner looks every couple of seconds
/// and takes the lock only when this says so.
pub async fn planning_work(pool: &PgPool) -> sqlx::Result<bool> {
    static SQL: LazyLock<String> = LazyLock::new(|| {
        crate::ledger::sql::PENDING_READY.replace("{planner_gone}", PLANNER_GONE_SQL.as_str())
    });
    sqlx::query_scalar(sqlx::AssertSqlSafe(SQL.as_str()))
        .fetch_one(pool)
        .await
}
