//! Read models: what the commands, the metrics and the demo show of the ETL tables.

use super::lifecycle::PLANNER_GONE_SQL;
use super::sql::*;
use super::states::{HistoryStatus, UnknownValue};
use crate::domain::EntityKind;
use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::{PgPool, Row};
use std::sync::LazyLock;

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

/// How many finished syncs' books did not balance at finalize, per entity (entities with
/// none are absent): `loansync_sync.books_unbalanced`, for `etl_books_unbalanced_total`.
pub async fn books_unbalanced_counts(pool: &PgPool) -> sqlx::Result<Vec<DeletedCount>> {
    sqlx::query_as(
        "SELECT e.entity, count(*) AS count \
         FROM loansync_sync s CROSS JOIN LATERAL unnest(s.books_unbalanced) AS e (entity) \
         WHERE s.books_unbalanced IS NOT NULL GROUP BY e.entity ORDER BY e.entity",
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

/// One entity's oldest source change after its watermark (`sql/oldest_unsent.sql`).
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct OldestUnsent {
    pub entity: String,
    /// Seconds since that change; 0 when no change waits.
    pub age_seconds: f64,
}

/// Per entity with a watermark (officers have no modification time), the age of the
/// oldest source change at or after it: for `etl_oldest_unsent_change_seconds` and
/// `loansync status`. One index probe per time column.
pub async fn oldest_unsent(pool: &PgPool) -> sqlx::Result<Vec<OldestUnsent>> {
    let rows: Vec<(String, Option<f64>)> = sqlx::query_as(super::sql::OLDEST_UNSENT)
        .fetch_all(pool)
        .await?;
    Ok(rows
        .into_iter()
        .map(|(entity, age)| OldestUnsent {
            entity,
            age_seconds: age.unwrap_or(0.0),
        })
        .collect())
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

/// Whether the sync row `s` is stalled: running with no chunk settled for `stale_param`
/// seconds (the newest `settled_at` of its chunks, or the start of the run), or planning
/// with its planner gone.
fn stalled_sql(stale_param: &str) -> String {
    format!(
        "((s.state = 'running' AND GREATEST(s.last_progress_at, \
               (SELECT max(c.settled_at) FROM loansync_chunk c WHERE c.sync_id = s.sync_id)) \
             < now() - make_interval(secs => {stale_param})) \
          OR (s.state = 'planning' AND {planner_gone}))",
        planner_gone = PLANNER_GONE_SQL.as_str()
    )
}

/// How many syncs are stalled now (the `etl_stalled_syncs` gauge).
pub async fn stalled_count(pool: &PgPool, stale_after_secs: f64) -> sqlx::Result<i64> {
    static SQL: LazyLock<String> = LazyLock::new(|| {
        format!(
            "SELECT count(*) FROM loansync_sync s WHERE {}",
            stalled_sql("$1")
        )
    });
    sqlx::query_scalar(SQL.as_str())
        .bind(stale_after_secs)
        .fetch_one(pool)
        .await
}

/// One sync as `loansync status` shows it.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct SyncSummary {
    pub sync_id: String,
    pub sync_type: String,
    pub status: String,
    pub started_at: DateTime<Utc>,
    pub completed_at: Option<DateTime<Utc>>,
    pub duration_seconds: Option<f64>,
    pub sync_start_date: Option<DateTime<Utc>>,
    pub sync_end_date: Option<DateTime<Utc>>,
    pub error_message: Option<String>,
    pub chunks_total: Option<i32>,
    pub chunks_remaining: Option<i32>,
    /// loansync's own state: `planning`, `running` or `done` (none for a sync it did not make).
    pub state: Option<String>,
    /// A running sync whose chunks have not moved for `ETL_STALE_SYNC_SECS`, or a
    /// planning one whose planner is gone.
    pub stalled: bool,
}

/// One entity's counters within a sync.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct EntityProgress {
    pub entity: EntityKind,
    pub total: i32,
    pub success: i32,
    pub failed: i32,
}

/// Per-entity counters of a sync: from the history row, except for a running sync,
/// whose settled chunks are summed (the history row is rolled up about once a second).
pub async fn entity_progress(pool: &PgPool, sync_id: &str) -> sqlx::Result<Vec<EntityProgress>> {
    let r = sqlx::query(
        "SELECT h.total_loans, COALESCE(c.ls, h.loans_success), COALESCE(c.lf, h.loans_failed), \
                h.total_repayments, COALESCE(c.rs, h.repayments_success), COALESCE(c.rf, h.repayments_failed), \
                h.total_customers, COALESCE(c.cs, h.customers_success), COALESCE(c.cf, h.customers_failed), \
                h.total_officers, COALESCE(c.osu, h.officers_success), COALESCE(c.ofa, h.officers_failed) \
         FROM etl_folder_etlsynchistory h \
         LEFT JOIN loansync_sync s ON s.sync_id = h.sync_id AND s.state = 'running' \
         LEFT JOIN LATERAL ( \
             SELECT coalesce(sum(succeeded) FILTER (WHERE entity = 'loan'), 0)::int4 AS ls, \
                    coalesce(sum(failed) FILTER (WHERE entity = 'loan'), 0)::int4 AS lf, \
                    coalesce(sum(succeeded) FILTER (WHERE entity = 'repayment'), 0)::int4 AS rs, \
                    coalesce(sum(failed) FILTER (WHERE entity = 'repayment'), 0)::int4 AS rf, \
                    coalesce(sum(succeeded) FILTER (WHERE entity = 'customer'), 0)::int4 AS cs, \
                    coalesce(sum(failed) FILTER (WHERE entity = 'customer'), 0)::int4 AS cf, \
                    coalesce(sum(succeeded) FILTER (WHERE entity = 'officer'), 0)::int4 AS osu, \
                    coalesce(sum(failed) FILTER (WHERE entity = 'officer'), 0)::int4 AS ofa \
             FROM loansync_chunk WHERE sync_id = s.sync_id AND settled_at IS NOT NULL \
             HAVING s.sync_id IS NOT NULL) c ON true \
         WHERE h.sync_id = $1",
    )
    .bind(sync_id)
    .fetch_one(pool)
    .await?;
    let at = |e: EntityKind, i: usize| EntityProgress {
        entity: e,
        total: r.get(i),
        success: r.get(i + 1),
        failed: r.get(i + 2),
    };
    Ok(vec![
        at(EntityKind::Officer, 9),
        at(EntityKind::Customer, 6),
        at(EntityKind::Loan, 0),
        at(EntityKind::Repayment, 3),
    ])
}

/// Recent syncs, newest first (or one sync when `sync_id` is given).
pub async fn recent_syncs(
    pool: &PgPool,
    sync_id: Option<&str>,
    limit: i64,
    stale_after_secs: i64,
) -> sqlx::Result<Vec<SyncSummary>> {
    static SQL: LazyLock<String> = LazyLock::new(|| {
        format!(
            "SELECT h.sync_id::text, h.sync_type::text, h.status::text, h.started_at, h.completed_at, h.duration_seconds, \
                    h.sync_start_date, h.sync_end_date, h.error_message, s.chunks_total, \
                    CASE WHEN s.state = 'running' THEN (SELECT count(*)::int4 FROM loansync_chunk c \
                         WHERE c.sync_id = s.sync_id AND c.settled_at IS NULL) \
                         WHEN s.sync_id IS NOT NULL THEN 0 END AS chunks_remaining, \
                    s.state::text AS state, COALESCE({}, false) AS stalled \
             FROM etl_folder_etlsynchistory h LEFT JOIN loansync_sync s USING (sync_id) \
             WHERE ($1::text IS NULL OR h.sync_id = $1) ORDER BY h.started_at DESC, h.id DESC LIMIT $2",
            stalled_sql("$3")
        )
    });
    sqlx::query_as(SQL.as_str())
        .bind(sync_id)
        .bind(limit)
        .bind(stale_after_secs as f64)
        .fetch_all(pool)
        .await
}
