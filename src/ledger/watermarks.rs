//! Watermarks (`etl_folder_etllastsync`): read, listed, set by hand.

use super::lifecycle::PlanningLock;
use super::sql::*;
use crate::domain::{EntityKind, SyncType};
use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::{PgConnection, PgPool};

/// The watermark of an entity: `etl_folder_etllastsync.last_sync_timestamp`.
pub async fn watermark(
    conn: &mut PgConnection,
    entity: EntityKind,
) -> sqlx::Result<Option<DateTime<Utc>>> {
    sqlx::query_scalar(
        "SELECT last_sync_timestamp FROM etl_folder_etllastsync WHERE entity_type = $1",
    )
    .bind(entity.as_str())
    .fetch_optional(conn)
    .await
}

/// One entity's watermark, as `loansync watermark show` prints it.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct Watermark {
    pub entity: String,
    pub last_sync_timestamp: DateTime<Utc>,
    pub last_sync_id: String,
    pub updated_at: DateTime<Utc>,
}

/// Every entity's watermark (entities never synced have none).
pub async fn all(pool: &PgPool) -> sqlx::Result<Vec<Watermark>> {
    sqlx::query_as(LIST_WATERMARKS).fetch_all(pool).await
}

/// What [`set_watermark`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatermarkSet {
    /// Moved; the audit row in the history has this sync id.
    Moved {
        from: Option<DateTime<Utc>>,
        audit_sync_id: String,
    },
    /// Not moved: a sync is planning or running (its end would overwrite it).
    Busy { active_sync_id: String },
}

/// Sets an entity's watermark by hand, audited in the history: a row of its own
/// (`incremental`, `completed`, no records, the window from the old watermark to the new
/// one, `error_message` saying who moved it and why) that the watermark row names as
/// its last sync. Refused while a sync is active. The caller holds the [`PlanningLock`].
pub async fn set_watermark(
    pool: &PgPool,
    _lock: &PlanningLock,
    entity: EntityKind,
    to: DateTime<Utc>,
    reason: &str,
) -> sqlx::Result<WatermarkSet> {
    let mut tx = pool.begin().await?;
    let active: Option<String> =
        sqlx::query_scalar("SELECT sync_id::text FROM loansync_sync WHERE state <> 'done' LIMIT 1")
            .fetch_optional(&mut *tx)
            .await?;
    if let Some(active_sync_id) = active {
        return Ok(WatermarkSet::Busy { active_sync_id });
    }
    let from: Option<DateTime<Utc>> = sqlx::query_scalar(
        "SELECT last_sync_timestamp FROM etl_folder_etllastsync WHERE entity_type = $1 FOR UPDATE",
    )
    .bind(entity.as_str())
    .fetch_optional(&mut *tx)
    .await?;
    let audit_sync_id = format!("watermark-{}", uuid::Uuid::new_v4());
    let message = format!(
        "watermark of {entity} set by hand (loansync watermark set) from {} to {}: {reason}",
        from.map_or_else(|| "none".to_string(), |t| t.to_rfc3339()),
        to.to_rfc3339()
    );
    sqlx::query(INSERT_HISTORY)
        .bind(&audit_sync_id)
        .bind(SyncType::Incremental.as_str())
        .execute(&mut *tx)
        .await?;
    sqlx::query(AUDIT_WATERMARK)
        .bind(&audit_sync_id)
        .bind(from)
        .bind(to)
        .bind(&message)
        .execute(&mut *tx)
        .await?;
    sqlx::query(UPSERT_WATERMARK)
        .bind(entity.as_str())
        .bind(to)
        .bind(&audit_sync_id)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    tracing::warn!(%entity, from = ?from, to = %to.to_rfc3339(), %reason, audit_sync_id, "watermark set by hand");
    Ok(WatermarkSet::Moved {
        from,
        audit_sync_id,
    })
}
