//! `loansync watermark`: the watermarks (`etl_folder_etllastsync`) shown, and one moved
//! by hand under the planning lock.

use super::error::AppError;
use super::report::{EXIT_BUSY, Report};
use crate::domain::EntityKind;
use crate::ledger::lifecycle::with_planning_lock;
use crate::ledger::{
    self,
    watermarks::{Watermark, WatermarkSet},
};
use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgPool;

/// `loansync watermark show`: each entity's watermark; entities never synced have none.
#[derive(Debug, Clone, Serialize)]
#[serde(transparent)]
pub struct WatermarkReport {
    pub marks: Vec<Watermark>,
}

/// Every entity's watermark.
pub async fn show(pool: &PgPool) -> Result<WatermarkReport, AppError> {
    Ok(WatermarkReport {
        marks: ledger::watermarks::all(pool).await?,
    })
}

/// As JSON, the array of watermarks (entities never synced are absent); as text, a line
/// an entity, those never synced saying where their first sync starts.
impl Report for WatermarkReport {
    fn exit_code(&self) -> u8 {
        0
    }

    fn render(&self) -> String {
        let mut out = format!("{:<10}  {:<32}  {:<40}\n", "entity", "watermark", "set by");
        for m in &self.marks {
            out.push_str(&format!(
                "{:<10}  {:<32}  {:<40}\n",
                m.entity,
                m.last_sync_timestamp.to_rfc3339(),
                m.last_sync_id
            ));
        }
        for e in EntityKind::ALL {
            if !self.marks.iter().any(|m| m.entity == e.as_str()) {
                out.push_str(&format!(
                    "{:<10}  {:<32}  (never synced: the next incremental sync starts ETL_DEFAULT_LOOKBACK_DAYS back)\n",
                    e.as_str(),
                    "-"
                ));
            }
        }
        out
    }
}

/// `loansync watermark set`: moved, or refused while a sync is active.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum WatermarkSetReport {
    /// Moved from `from` (none: never synced) to `to`; the history row
    /// `audit_sync_id` records who moved it and why.
    Moved {
        entity: EntityKind,
        from: Option<DateTime<Utc>>,
        to: DateTime<Utc>,
        audit_sync_id: String,
    },
    /// Not moved: the end of the active sync would overwrite it.
    Busy { active_sync_id: String },
}

/// Moves `entity`'s watermark to `to`, audited with `reason`. Holds the planning lock
/// (waiting for a planner that is planning), so no sync starts meanwhile; refused while
/// a sync is planning or running.
pub async fn set(
    pool: &PgPool,
    entity: EntityKind,
    to: DateTime<Utc>,
    reason: &str,
) -> Result<WatermarkSetReport, AppError> {
    let set = with_planning_lock(pool, async |lock| {
        Ok::<_, AppError>(ledger::watermarks::set_watermark(pool, lock, entity, to, reason).await?)
    })
    .await?;
    Ok(match set {
        WatermarkSet::Moved {
            from,
            audit_sync_id,
        } => WatermarkSetReport::Moved {
            entity,
            from,
            to,
            audit_sync_id,
        },
        WatermarkSet::Busy { active_sync_id } => WatermarkSetReport::Busy { active_sync_id },
    })
}

impl Report for WatermarkSetReport {
    /// As text, a move on stdout, a refusal on stderr.
    fn print(&self, json: bool) -> Result<(), AppError> {
        match self {
            _ if json => println!("{}", self.json()?),
            WatermarkSetReport::Moved { .. } => print!("{}", self.render()),
            WatermarkSetReport::Busy { .. } => eprint!("{}", self.render()),
        }
        Ok(())
    }

    /// 0 moved, [`EXIT_BUSY`] refused.
    fn exit_code(&self) -> u8 {
        match self {
            WatermarkSetReport::Moved { .. } => 0,
            WatermarkSetReport::Busy { .. } => EXIT_BUSY,
        }
    }

    fn render(&self) -> String {
        match self {
            WatermarkSetReport::Moved {
                entity,
                from,
                to,
                audit_sync_id,
            } => format!(
                "watermark of {entity} moved from {} to {} (audit: history row {audit_sync_id})\n",
                from.map_or_else(|| "none".to_string(), |t| t.to_rfc3339()),
                to.to_rfc3339()
            ),
            WatermarkSetReport::Busy { active_sync_id } => format!(
                "sync {active_sync_id} is in progress: its end would overwrite the watermark; \
                 set it once `loansync status` shows no sync running\n"
            ),
        }
    }
}
