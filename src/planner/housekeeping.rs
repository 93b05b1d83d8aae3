//! What a long-running planner does between messages: samples the xid clock, finalizes
//! running syncs whose chunks are all settled, prunes old chunk id lists, and heals what
//! a dead planner left (its `planning` syncs, its unpublished jobs); and `resume`.

use super::PlanError;
use super::plan::publish_unsettled;
use crate::config::Settings;
use crate::ledger::lifecycle::{self, PlanningLock};
use crate::ledger::{self, states::SyncState};
use crate::queue::ChunkPublisher;
use crate::telemetry::{Event, Telemetry};
use sqlx::PgPool;

/// How often a long-running planner samples the xid clock (the precision of the window
/// cap), finalizes the running syncs whose chunks are all settled and rolls up the
/// others' counters ([`finalize_settled`]) and, every [`PRUNE_EVERY_TICKS`] ticks,
/// prunes old chunk id lists.
pub(super) const HOUSEKEEPING_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

const PRUNE_EVERY_TICKS: u64 = 360;

/// One housekeeping tick; failures are logged and tried again at the next tick.
pub async fn housekeep(pool: &PgPool, settings: &Settings, tick: u64) {
    if let Err(e) = ledger::clock::sample_now(pool).await {
        tracing::debug!(error = %e, "could not sample the xid clock");
    }
    finalize_settled(pool, &settings.telemetry).await;
    if tick.is_multiple_of(PRUNE_EVERY_TICKS) {
        prune(pool, settings).await;
    }
}

/// What a dead planner left, under the planning lock: its `planning` syncs are ended and
/// their requests pending again; the jobs of `running` syncs not all published are
/// published again from the ledger; running syncs whose chunks are all settled are
/// finalized (their last settler died first).
pub(super) async fn heal(
    pool: &PgPool,
    settings: &Settings,
    lock: &PlanningLock,
    publisher: &dyn ChunkPublisher,
) -> Result<(), PlanError> {
    lifecycle::take_over_orphans(pool, lock).await?;
    for sync_id in lifecycle::unpublished(pool, lock).await? {
        let republished = publish_unsettled(pool, &sync_id, publisher).await?;
        lifecycle::mark_published(pool, &sync_id).await?;
        tracing::warn!(%sync_id, republished, "published again the chunk jobs of a sync whose planner stopped before its last confirm");
    }
    finalize_settled(pool, &settings.telemetry).await;
    Ok(())
}

/// Finalizes the running syncs whose chunks are all settled (their last settler died
/// between its commit and its finalize) and rolls up the others' history counters
/// ([`ledger::finalize::finalize_settled`]); failures are logged and tried again later.
pub async fn finalize_settled(pool: &PgPool, telemetry: &Telemetry) {
    match ledger::finalize::finalize_settled(pool).await {
        Ok(finalized) => {
            for f in finalized {
                telemetry.emit(Event::SyncFinished {
                    sync_type: f.sync_type,
                    status: f.status,
                    seconds: None,
                });
            }
        }
        Err(e) => tracing::warn!(error = %e, "could not finalize or roll up the running syncs"),
    }
}

/// Deletes the chunk id lists of syncs finished longer than `ETL_CHUNK_RETENTION_DAYS` ago.
pub async fn prune(pool: &PgPool, settings: &Settings) {
    match ledger::end::prune_chunks(pool, settings.chunk_retention).await {
        Ok(0) => {}
        Ok(n) => tracing::info!(chunks = n, "pruned the chunk ledger of old finished syncs"),
        Err(e) => tracing::warn!(error = %e, "could not prune the chunk ledger"),
    }
}

/// Re-publishes the unsettled chunks of a stalled sync from the ledger.
pub async fn resume(
    pool: &PgPool,
    sync_id: &str,
    publisher: &dyn ChunkPublisher,
) -> Result<usize, PlanError> {
    let refused = match lifecycle::sync_state(pool, sync_id).await? {
        Some(SyncState::Running) => None,
        Some(SyncState::Planning) => Some(format!(
            "sync {sync_id} never finished planning, so it has no chunks to resume. If its \
             planner is gone, the next planner ends it and its requests run again; \
             `loansync abandon {sync_id}` ends it now"
        )),
        Some(SyncState::Done) => Some(format!("sync {sync_id} is finished: nothing to resume")),
        None => Some(format!("no sync {sync_id}")),
    };
    if let Some(why) = refused {
        return Err(PlanError::Invalid(why));
    }
    let n = publish_unsettled(pool, sync_id, publisher).await?;
    if n == 0 {
        // Every chunk settled, the last settler gone before finalizing: finalize now.
        finalize_settled(pool, &Telemetry::global()).await;
    }
    Ok(n)
}
