//! Error rows (`etl_folder_etlsyncerror`): listed, resolved by hand, paged for a retry.

use super::sql::*;
use crate::domain::EntityKind;
use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgPool;

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
    sqlx::query_as(LIST_ERRORS)
        .bind(sync_id)
        .bind(entity.map(|e| e.as_str()))
        .bind(unresolved_only)
        .bind(limit)
        .fetch_all(pool)
        .await
}

/// Marks error rows resolved by hand; returns how many were open.
pub async fn resolve_errors(pool: &PgPool, ids: &[i32]) -> sqlx::Result<u64> {
    Ok(sqlx::query(RESOLVE_ERRORS_BY_ID)
        .bind(ids)
        .execute(pool)
        .await?
        .rows_affected())
}
