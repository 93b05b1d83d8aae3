//! `loansync errors`: the per-record error rows (`etl_folder_etlsyncerror`) listed,
//! resolved by hand, and retried in a new sync.

use super::error::AppError;
use super::report::{EXIT_BUSY, Report, SyncReport};
use super::sync::{Started, Work};
use crate::config::Settings;
use crate::domain::EntityKind;
use crate::ledger::{self, errors::ErrorRow};
use crate::planner::{self, PlanOutcome};
use serde::Serialize;
use sqlx::PgPool;

/// `loansync errors list`: error rows, newest first.
#[derive(Debug, Clone, Serialize)]
#[serde(transparent)]
pub struct ErrorsReport {
    pub rows: Vec<ErrorRow>,
}

/// The error rows of `sync_id` and `entity` (all when `None`), only the unresolved ones
/// with `unresolved_only`, newest first, at most `limit`.
pub async fn list(
    pool: &PgPool,
    sync_id: Option<&str>,
    entity: Option<EntityKind>,
    unresolved_only: bool,
    limit: i64,
) -> Result<ErrorsReport, AppError> {
    Ok(ErrorsReport {
        rows: ledger::errors::list_errors(pool, sync_id, entity, unresolved_only, limit).await?,
    })
}

/// As JSON, the array of rows; as text, a table with messages cut to 100 characters.
impl Report for ErrorsReport {
    fn exit_code(&self) -> u8 {
        0
    }

    fn render(&self) -> String {
        let mut out = format!(
            "{:>7}  {:<10} {:>10}  {:<20} {:>5}  {:<8}  message\n",
            "id", "entity", "entity_id", "code", "tries", "resolved"
        );
        for r in &self.rows {
            out.push_str(&format!(
                "{:>7}  {:<10} {:>10}  {:<20} {:>5}  {:<8}  {}\n",
                r.id,
                r.entity_type,
                r.entity_id,
                r.error_code.as_deref().unwrap_or("-"),
                r.retry_count,
                if r.resolved { "yes" } else { "no" },
                r.error_message.chars().take(100).collect::<String>()
            ));
        }
        out
    }
}

/// `loansync errors resolve`: how many of the error rows asked for were resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ResolveReport {
    pub resolved: u64,
    pub asked: usize,
}

/// Marks the error rows `ids` resolved by hand.
pub async fn resolve(pool: &PgPool, ids: &[i32]) -> Result<ResolveReport, AppError> {
    Ok(ResolveReport {
        resolved: ledger::errors::resolve_errors(pool, ids).await?,
        asked: ids.len(),
    })
}

impl Report for ResolveReport {
    /// 0: rows already resolved, or absent, are no error.
    fn exit_code(&self) -> u8 {
        0
    }

    fn render(&self) -> String {
        format!(
            "resolved {} of {} error rows (the others were already resolved or do not exist)\n",
            self.resolved, self.asked
        )
    }
}

/// `loansync errors retry`: what became of the retry.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum RetryReport {
    /// Planned, its chunks published: workers deliver it.
    Planned {
        sync_id: String,
        /// The records planned, per entity.
        records: Vec<(EntityKind, i64)>,
    },
    /// Planned earlier (the same retry, repeated).
    AlreadyPlanned { sync_id: String },
    /// Nothing planned: another sync is in progress.
    Busy { active_sync_id: String },
    /// Planned and worked in this process (`--in-process`).
    Ran(SyncReport),
}

/// Re-delivers the records of the unresolved error rows of `entities` (all when empty)
/// in a new sync that moves no watermark: published for the workers, or, with
/// `in_process`, worked here.
pub async fn retry(
    pool: &PgPool,
    settings: &Settings,
    entities: Vec<EntityKind>,
    in_process: bool,
) -> Result<RetryReport, AppError> {
    if in_process {
        return Ok(
            match super::sync::start(pool, settings, Work::Retry(entities)).await? {
                Started::Busy(report) => RetryReport::Busy {
                    active_sync_id: report.busy_with.unwrap_or_else(|| "-".into()),
                },
                Started::Running(sync) => RetryReport::Ran(sync.run(false).await?),
            },
        );
    }
    let broker = super::connect_broker(settings).await?;
    let outcome = planner::plan_retry(pool, settings, &entities, &broker).await?;
    broker.close().await;
    match outcome {
        PlanOutcome::Planned {
            sync_id, totals, ..
        } => Ok(RetryReport::Planned {
            sync_id,
            records: totals.records,
        }),
        PlanOutcome::Busy { active_sync_id } => Ok(RetryReport::Busy { active_sync_id }),
        PlanOutcome::Duplicate { sync_id, .. } => Ok(RetryReport::AlreadyPlanned { sync_id }),
        PlanOutcome::Pending { request_id, .. } => Err(AppError::refused(format!(
            "retry {request_id} was queued instead of planned"
        ))),
    }
}

impl Report for RetryReport {
    /// The sync's exit code when it ran here, [`EXIT_BUSY`] when another sync was in
    /// progress, 0 otherwise.
    fn exit_code(&self) -> u8 {
        match self {
            RetryReport::Ran(report) => report.exit_code(),
            RetryReport::Busy { .. } => EXIT_BUSY,
            RetryReport::Planned { .. } | RetryReport::AlreadyPlanned { .. } => 0,
        }
    }

    fn render(&self) -> String {
        match self {
            RetryReport::Planned { sync_id, records } => format!(
                "retry sync {sync_id} planned: {records:?}; workers deliver it (`loansync status {sync_id}`)\n"
            ),
            RetryReport::AlreadyPlanned { sync_id } => {
                format!("retry sync {sync_id} already planned\n")
            }
            RetryReport::Busy { active_sync_id } => {
                format!("another sync is in progress ({active_sync_id}); retry later\n")
            }
            RetryReport::Ran(report) => report.render(),
        }
    }
}
