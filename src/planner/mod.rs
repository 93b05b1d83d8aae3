//! Plan syncs: planning messages become requests, recorded as pending the moment they
//! arrive ([`record_message`]); under the planning lock, the planner takes over what a
//! dead planner left ([`plan_pending`]), claims the slot for the pending requests,
//! enumerates each entity's ids in its window, writes the chunk ledger (the entities side
//! by side) and then the totals, then publishes one chunk job per chunk (confirmed).
//! The request and sync states are [`crate::ledger::lifecycle`]'s.
//!
//! The files, by concern: [`request`] (a planning message: parsed, validated, recorded),
//! [`plan`] (claiming and planning a sync, publishing its jobs), [`sweep`] (a sweep's
//! comparison of fingerprints), [`dryrun`] (what a sync would send, computed with the
//! same selection and written nowhere), [`housekeeping`] (what a long-running planner
//! does between messages: the clock, finalizing, pruning, healing a dead planner's
//! syncs, `resume`), [`run`] (the planner loop over a consumer).

mod dryrun;
mod housekeeping;
mod plan;
mod request;
mod run;
mod sweep;

pub use dryrun::{DryRun, DryRunIds, EntityDryRun, dry_run};
pub use housekeeping::{finalize_settled, housekeep, prune, resume};
pub use plan::{plan_pending, plan_retry, plan_sync};
pub use request::{parse_plan, record_message, request_id_of};
pub use run::{PLAN_REQUEUE_PAUSE, run, run_amqp};

use crate::db::pooling::SessionLockError;
use crate::domain::{PlanRequest, SyncType};
use crate::failure::{Classify, Failure};
use crate::ledger::{
    self, clock,
    plan::PlanTotals,
    states::{FinalStatus, Purpose},
};
use crate::queue::QueueError;

/// Why planning failed, and what the caller does about it ([`Classify::failure`]):
/// dead-letter the request or fail its sync (permanent), try later (transient), or stop
/// the planner until the installation is fixed (fatal).
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    /// The request can never be planned as it is.
    #[error("{0}")]
    Invalid(String),
    /// PostgreSQL (the ledger or the source): decided by its SQLSTATE.
    #[error(transparent)]
    Db(#[from] sqlx::Error),
    /// The planning lock: behind a transaction pooler (fatal), or the database.
    #[error(transparent)]
    Lock(#[from] SessionLockError),
    /// The window's end cannot be bounded now: the requests stay pending.
    #[error(transparent)]
    Unbounded(#[from] clock::Unbounded),
    /// The chunk jobs could not all be published: the planner's housekeeping publishes
    /// them again from the ledger.
    #[error("publishing the chunk jobs: {0}")]
    Publish(#[source] QueueError),
    /// The broker connection (connecting, consuming planning messages): reconnect.
    #[error(transparent)]
    Queue(#[from] QueueError),
    /// Another actor (an operator's `abandon`, a planner that took the sync over) ended
    /// the sync while it was being planned.
    #[error("sync {0} is no longer planning: another planner or an operator ended it")]
    Superseded(String),
    /// The source tables differ from what loansync reads (`source::columns`): a column
    /// gone, renamed or retyped, a table missing. The sync fails before any row is read.
    #[error("{0}")]
    SchemaDrift(String),
}

impl Classify for PlanError {
    fn failure(&self) -> Failure {
        match self {
            PlanError::Invalid(_) | PlanError::SchemaDrift(_) => Failure::Permanent,
            PlanError::Db(e) => e.failure(),
            PlanError::Lock(e) => e.failure(),
            // The broker refusing the installation is as fatal here as anywhere.
            PlanError::Publish(e) | PlanError::Queue(e) => e.failure(),
            PlanError::Unbounded(_) | PlanError::Superseded(_) => Failure::Transient,
        }
    }
}

/// What planning did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PlanOutcome {
    /// A sync was planned and its chunks published. `finished` is set when there was
    /// nothing to send and the sync completed at once.
    Planned {
        sync_id: String,
        totals: PlanTotals,
        finished: Option<FinalStatus>,
    },
    /// The request id was seen before and a sync serves it: nothing new is planned.
    Duplicate { sync_id: String },
    /// Another sync is planning or running; nothing was planned (single-process mode).
    Busy { active_sync_id: String },
    /// The request id was seen before and is pending: a planner plans it when the slot
    /// frees (single-process mode does not plan another's request).
    Pending { request_id: String },
}

/// What a planning request asks for.
pub fn spec_of(req: &PlanRequest) -> ledger::lifecycle::SyncSpec {
    let backfill = req.since.is_some();
    ledger::lifecycle::SyncSpec {
        sync_type: if backfill || req.sweep {
            SyncType::Incremental
        } else {
            req.sync_type
        },
        entities: req.entity_set(),
        purpose: if req.sweep {
            Purpose::Sweep
        } else if backfill {
            Purpose::Backfill
        } else {
            Purpose::Sync
        },
        since: req.since,
        until: req.until,
    }
}
