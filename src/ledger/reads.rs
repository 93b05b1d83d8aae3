//! Read models: what the commands, the metrics and the demo show of the ETL tables.

use super::sql::*;
use super::{HistoryStatus, UnknownValue};
use crate::domain::EntityKind;
use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgPool;

/// One deleted record, as `loansync deletes list` shows it.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct DeletedRow {
    pub entity: String,
    pub id: i64,
    pub detected_at: DateTime<Utc>,
    pub sync_id: String,
}

/// Deleted records found by sweeps, by entity and id, optionally of one entity.
pub async fn list_deleted(
    pool: &PgPool,
    entity: Option<EntityKind>,
    limit: i64,
) -> sqlx::Result<Vec<DeletedRow>> {
    sqlx::query_as(LIST_DELETED)
        .bind(entity.map(|e| e.as_str()))
        .bind(limit)
        .fetch_all(pool)
        .await
}

/// How many deleted records sweeps found, per entity (entities with none are absent).
pub async fn deleted_counts(pool: &PgPool) -> sqlx::Result<Vec<DeletedCount>> {
    sqlx::query_as(
        "SELECT entity::text AS entity, count(*) AS count FROM loansync_deleted GROUP BY entity ORDER BY entity",
    )
    .fetch_all(pool)
    .await
}

/// How many deleted records sweeps found for one entity.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct DeletedCount {
    pub entity: String,
    pub count: i64,
}

/// A sync's history row, as far as its outcome goes.
#[derive(Debug, Clone, PartialEq)]
pub struct HistoryOutcome {
    /// `None` when the row holds a status loansync does not write.
    pub status: Option<HistoryStatus>,
    pub duration_seconds: Option<f64>,
}

/// The status and duration of a sync's history row.
pub async fn history_outcome(pool: &PgPool, sync_id: &str) -> sqlx::Result<HistoryOutcome> {
    let (status, duration_seconds): (String, Option<f64>) = sqlx::query_as(
        "SELECT status::text, duration_seconds FROM etl_folder_etlsynchistory WHERE sync_id = $1",
    )
    .bind(sync_id)
    .fetch_one(pool)
    .await?;
    Ok(HistoryOutcome {
        status: status.parse().ok(),
        duration_seconds,
    })
}

/// A value the ledger cannot read as one of its enums: a decode error (permanent).
pub(crate) fn decode_error(e: UnknownValue) -> sqlx::Error {
    sqlx::Error::Decode(Box::new(e))
}

/// One entity's watermark age (seconds since its `last_sync_timestamp`).
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct WatermarkAge {
    pub entity: String,
    pub age_seconds: f64,
}

/// Every watermark's age, for the `etl_watermark_age_seconds` gauge.
pub async fn watermark_ages(pool: &PgPool) -> sqlx::Result<Vec<WatermarkAge>> {
    sqlx::query_as(WATERMARK_AGES).fetch_all(pool).await
}

/// The last finished regular sync of one type (see `sql/last_sync_per_type.sql`).
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct LastSync {
    pub sync_type: String,
    pub status: String,
    /// Epoch seconds.
    pub completed_at: Option<f64>,
    pub succeeded: i64,
    pub failed: i64,
}

/// The last finished regular sync of each type (types with none are absent).
pub async fn last_syncs(pool: &PgPool) -> sqlx::Result<Vec<LastSync>> {
    sqlx::query_as(LAST_SYNC_PER_TYPE).fetch_all(pool).await
}

/// When the last regular sync of one type that moved the watermarks ended.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct LastSuccess {
    pub sync_type: String,
    /// Epoch seconds.
    pub completed_at: Option<f64>,
}

/// The last successful regular sync of each type (types with none are absent).
pub async fn last_successes(pool: &PgPool) -> sqlx::Result<Vec<LastSuccess>> {
    sqlx::query_as(LAST_SUCCESS_PER_TYPE).fetch_all(pool).await
}

/// How many planning requests wait, for one sync type.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct PendingCount {
    pub sync_type: String,
    pub count: i64,
}

/// Pending planning requests per sync type (`loansync_pending_request`).
pub async fn pending_counts(pool: &PgPool) -> sqlx::Result<Vec<PendingCount>> {
    sqlx::query_as(
        "SELECT sync_type::text AS sync_type, count(*) AS count FROM loansync_pending_request GROUP BY 1",
    )
    .fetch_all(pool)
    .await
}
