//! Error rows (`etl_folder_etlsyncerror`): listed, resolved by hand, paged for a retry.

use crate::domain::EntityKind;
use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::{PgConnection, PgPool};

/// A keyset page of the ids with unresolved error rows (for `loansync errors retry`).
pub async fn next_unresolved_ids(
    conn: &mut PgConnection,
    entity: EntityKind,
    after: i64,
    limit: i64,
) -> sqlx::Result<Vec<i64>> {
    sqlx::query_scalar(
        "SELECT DISTINCT id FROM ( \
             SELECT CASE WHEN entity_id ~ '^[0-9]{1,18}$' THEN entity_id::int8 END AS id \
             FROM etl_folder_etlsyncerror WHERE entity_type = $1 AND NOT resolved) e \
         WHERE id > $2 ORDER BY id LIMIT $3",
    )
    .bind(entity.as_str())
    .bind(after)
    .bind(limit)
    .fetch_all(conn)
    .await
}

/// One error row, as `loansync errors list` shows it.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct ErrorRow {
    pub id: i32,
    pub sync_id: String,
    pub entity_type: String,
    pub entity_id: String,
    pub error_code: Option<String>,
    pub error_message: String,
    pub error_details: Option<serde_json::Value>,
    pub created_at: DateTime<Utc>,
    pub retry_count: i32,
    pub last_retry_at: Option<DateTime<Utc>>,
    pub resolved: bool,
    pub resolved_at: Option<DateTime<Utc>>,
}

/// Error rows, newest first, filtered by sync, entity and resolution.
pub async fn list_errors(
    pool: &PgPool,
    sync_id: Option<&str>,
    entity: Option<EntityKind>,
    unresolved_only: bool,
    limit: i64,
) -> sqlx::Result<Vec<ErrorRow>> {
    sqlx::query_as(
        "SELECT e.id, h.sync_id::text AS sync_id, e.entity_type::text AS entity_type, e.entity_id::text AS entity_id, \
                e.error_code::text AS error_code, e.error_message, e.error_details, e.created_at, e.retry_count, \
                e.last_retry_at, e.resolved, e.resolved_at \
         FROM etl_folder_etlsyncerror e JOIN etl_folder_etlsynchistory h ON h.id = e.sync_history_id \
         WHERE ($1::text IS NULL OR h.sync_id = $1) AND ($2::text IS NULL OR e.entity_type = $2) \
           AND (NOT $3 OR NOT e.resolved) \
         ORDER BY e.created_at DESC, e.id DESC LIMIT $4",
    )
    .bind(sync_id)
    .bind(entity.map(|e| e.as_str()))
    .bind(unresolved_only)
    .bind(limit)
    .fetch_all(pool)
    .await
}

/// Marks error rows resolved by hand; returns how many were open.
pub async fn resolve_errors(pool: &PgPool, ids: &[i32]) -> sqlx::Result<u64> {
    Ok(sqlx::query(
        "UPDATE etl_folder_etlsyncerror SET resolved = true, resolved_at = now() \
         WHERE id = ANY($1) AND NOT resolved",
    )
    .bind(ids)
    .execute(pool)
    .await?
    .rows_affected())
}
