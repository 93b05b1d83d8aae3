//! `loansync abandon`: a sync ended by hand, under the planning lock.

use super::error::AppError;
use super::report::{Report, SyncReport, summarize};
use crate::ledger::lifecycle::with_planning_lock;
use crate::ledger::{self, end::Abandoned};
use serde::Serialize;
use sqlx::PgPool;

/// What `loansync abandon` did: the sync ended `failed`, and its outcome.
#[derive(Debug, Clone, Serialize)]
pub struct AbandonReport {
    pub sync_id: String,
    /// It was still planning (its planner gone): nothing had been sent. Otherwise it was
    /// running, and its unsettled records failed with `SYNC_ABANDONED`.
    pub was_planning: bool,
    /// The sync's outcome, read back from the history.
    pub sync: SyncReport,
}

/// Ends the sync `sync_id` by hand with `reason` ([`ledger::end::abandon_sync`]); an error
/// when it is not planning or running. Holds the planning lock: a live planner holds it
/// while it plans, so abandon waits for it and never ends a sync being planned.
pub async fn abandon(
    pool: &PgPool,
    sync_id: &str,
    reason: &str,
) -> Result<AbandonReport, AppError> {
    let abandoned = with_planning_lock(pool, async |lock| {
        Ok::<_, AppError>(ledger::end::abandon_sync(pool, lock, sync_id, reason).await?)
    })
    .await?;
    let was_planning = match abandoned {
        Abandoned::NotActive { state } => {
            return Err(AppError::refused(format!(
                "sync {sync_id} is not planning or running ({}): nothing to abandon",
                state.map_or("no such sync", |s| s.as_str())
            )));
        }
        Abandoned::Planning => true,
        Abandoned::Running => false,
    };
    Ok(AbandonReport {
        sync_id: sync_id.to_string(),
        was_planning,
        sync: summarize(pool, sync_id.to_string()).await?,
    })
}

/// As text, what became of the sync's records, then the sync's report.
impl Report for AbandonReport {
    /// 0: the sync was abandoned, whatever its records' outcomes.
    fn exit_code(&self) -> u8 {
        0
    }

    fn render(&self) -> String {
        let what = if self.was_planning {
            "it had not been planned: nothing was sent"
        } else {
            "its unsettled records failed with SYNC_ABANDONED; `loansync errors retry` delivers them"
        };
        format!(
            "abandoned sync {}: {what}\n{}",
            self.sync_id,
            self.sync.render()
        )
    }
}
