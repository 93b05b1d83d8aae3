//! Error rows (`etl_folder_etlsyncerror`): listed, resolved by hand, paged for a retry.

use super::sql::*;
use crate::domain::EntityKind;
use crate::domain::FailedRecord;
use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::{PgConnection, PgPool};

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

/// Writes the error rows of `failed` records of `entity` for the sync whose history row
/// is `history_id`: one new row each; in a retry sync (`retry`), a record's open row is
/// bumped instead (retry_count + 1, last_retry_at, the new error) and only records with
/// none get a new row (retry_count 1). Codes are cut to the column's 100 characters.
pub async fn write_error_rows(
    conn: &mut PgConnection,
    entity: EntityKind,
    failed: &[FailedRecord],
    history_id: i32,
    retry: bool,
) -> sqlx::Result<()> {
    if failed.is_empty() {
        return Ok(());
    }
    let ids: Vec<String> = failed.iter().map(|f| f.id.to_string()).collect();
    let codes: Vec<String> = failed
        .iter()
        .map(|f| f.error_code.chars().take(100).collect())
        .collect();
    let messages: Vec<&str> = failed.iter().map(|f| f.message.as_str()).collect();
    let details: Vec<&serde_json::Value> = failed.iter().map(|f| &f.details).collect();
    let (new, retry_count) = if retry {
        let bumped: Vec<String> = sqlx::query_scalar(RETRY_ERRORS)
            .bind(entity.as_str())
            .bind(&ids)
            .bind(&codes)
            .bind(&messages)
            .bind(sqlx::types::Json(&details))
            .fetch_all(&mut *conn)
            .await?;
        let bumped: std::collections::HashSet<&str> = bumped.iter().map(String::as_str).collect();
        let new: Vec<usize> = (0..ids.len())
            .filter(|&i| !bumped.contains(ids[i].as_str()))
            .collect();
        if new.is_empty() {
            return Ok(());
        }
        (Some(new), 1)
    } else {
        (None, 0)
    };
    let pick = |i: &usize| new.as_ref().is_none_or(|n| n.contains(i));
    let keep: Vec<usize> = (0..ids.len()).filter(|i| pick(i)).collect();
    sqlx::query(INSERT_ERRORS)
        .bind(entity.as_str())
        .bind(keep.iter().map(|&i| ids[i].as_str()).collect::<Vec<_>>())
        .bind(keep.iter().map(|&i| codes[i].as_str()).collect::<Vec<_>>())
        .bind(keep.iter().map(|&i| messages[i]).collect::<Vec<_>>())
        .bind(sqlx::types::Json(
            keep.iter().map(|&i| details[i]).collect::<Vec<_>>(),
        ))
        .bind(history_id)
        .bind(retry_count)
        .execute(&mut *conn)
        .await?;
    Ok(())
}
