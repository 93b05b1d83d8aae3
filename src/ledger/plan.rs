//! Writing a sync's plan: the chunk ledger, the per-entity windows, the totals, and a
//! chunk's start by a worker.

use super::sql::*;
use super::{FinalStatus, HistoryStatus, Purpose, SyncState, finalize};
use crate::domain::{EntityKind, SyncType, SyncWindow};
use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::{PgConnection, PgPool};
use std::sync::LazyLock;

/// Totals of a planned sync, per entity.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct PlanTotals {
    pub records: Vec<(EntityKind, i64)>,
    pub chunks: i64,
}

/// Records ids a sweep found gone from the source (or no longer selected): a row each
/// in `loansync_deleted` (detected again: its time and sync move), and the delivered
/// fingerprint removed, so that a row that comes back is sent again. In the planning
/// transaction. Returns how many ids.
pub async fn record_deleted(
    conn: &mut PgConnection,
    sync_id: &str,
    entity: EntityKind,
    ids: &[i64],
) -> sqlx::Result<u64> {
    if ids.is_empty() {
        return Ok(0);
    }
    sqlx::query(RECORD_DELETED)
        .bind(entity.as_str())
        .bind(ids)
        .bind(sync_id)
        .execute(&mut *conn)
        .await?;
    sqlx::query("DELETE FROM loansync_delivered WHERE entity = $1 AND id = ANY($2::int8[])")
        .bind(entity.as_str())
        .bind(ids)
        .execute(&mut *conn)
        .await?;
    Ok(ids.len() as u64)
}

/// Records one entity's window and its chunks in the ledger.
pub async fn insert_chunk(
    conn: &mut PgConnection,
    sync_id: &str,
    entity: EntityKind,
    seq: i32,
    ids: &[i64],
) -> sqlx::Result<()> {
    sqlx::query("INSERT INTO loansync_chunk (sync_id, entity, seq, ids) VALUES ($1, $2, $3, $4)")
        .bind(sync_id)
        .bind(entity.as_str())
        .bind(seq)
        .bind(ids)
        .execute(conn)
        .await?;
    Ok(())
}

pub async fn insert_sync_entity(
    conn: &mut PgConnection,
    sync_id: &str,
    entity: EntityKind,
    window: &SyncWindow,
    planned: i64,
) -> sqlx::Result<()> {
    sqlx::query(INSERT_SYNC_ENTITY)
        .bind(sync_id)
        .bind(entity.as_str())
        .bind(window.lo)
        .bind(window.hi)
        .bind(planned as i32)
        .execute(conn)
        .await?;
    Ok(())
}

/// Locks the sync's row and checks that it is still `planning`, then removes what a dead
/// planner may have left of its plan, so it can be planned again. Returns false (and
/// touches nothing) when the sync is planned already: a ledger another planner committed
/// is never cleared or rewritten.
pub async fn clear_plan(conn: &mut PgConnection, sync_id: &str) -> sqlx::Result<bool> {
    let state: Option<String> =
        sqlx::query_scalar("SELECT state FROM loansync_sync WHERE sync_id = $1 FOR UPDATE")
            .bind(sync_id)
            .fetch_optional(&mut *conn)
            .await?;
    if state.as_deref() != Some(SyncState::Planning.as_str()) {
        return Ok(false);
    }
    sqlx::query("DELETE FROM loansync_chunk WHERE sync_id = $1")
        .bind(sync_id)
        .execute(&mut *conn)
        .await?;
    sqlx::query("DELETE FROM loansync_sync_entity WHERE sync_id = $1")
        .bind(sync_id)
        .execute(&mut *conn)
        .await?;
    Ok(true)
}

/// Writes the totals and moves the sync to `in_progress` (or finalizes it at once when
/// there is nothing to send). Runs inside the planning transaction.
pub async fn write_plan(
    conn: &mut PgConnection,
    sync_id: &str,
    totals: &PlanTotals,
    window_lo: Option<DateTime<Utc>>,
    window_hi: DateTime<Utc>,
) -> sqlx::Result<Option<FinalStatus>> {
    static SQL: LazyLock<String> = LazyLock::new(|| {
        let totals: Vec<String> = EntityKind::ALL
            .iter()
            .enumerate()
            .map(|(i, e)| format!("{} = ${}", e.history_columns().total, i + 5))
            .collect();
        format!(
            "UPDATE etl_folder_etlsynchistory SET status = $2, sync_start_date = $3, \
             sync_end_date = $4, {} WHERE sync_id = $1",
            totals.join(", ")
        )
    });
    let mut q = sqlx::query(SQL.as_str())
        .bind(sync_id)
        .bind(HistoryStatus::InProgress.as_str())
        .bind(window_lo)
        .bind(window_hi);
    for e in EntityKind::ALL {
        let total = totals
            .records
            .iter()
            .find(|(k, _)| *k == e)
            .map(|(_, n)| *n as i32)
            .unwrap_or(0);
        q = q.bind(total);
    }
    q.execute(&mut *conn).await?;
    sqlx::query(START_RUNNING)
        .bind(sync_id)
        .bind(totals.chunks as i32)
        .bind(SyncState::Running.as_str())
        .execute(&mut *conn)
        .await?;
    if totals.chunks == 0 {
        return finalize(conn, sync_id).await.map(Some);
    }
    Ok(None)
}

/// The ledger's view of one chunk, read by a worker before it does any work.
#[derive(Debug, Clone)]
pub struct ChunkState {
    pub ids: Vec<i64>,
    pub settled: bool,
    pub sync_type: SyncType,
    pub purpose: Purpose,
    pub history_id: i32,
    /// How many workers started on this chunk, this one included.
    pub attempts: i32,
}

/// Reads a chunk and counts the attempt. `None` when the ledger has no such chunk.
pub async fn start_chunk(
    pool: &PgPool,
    sync_id: &str,
    entity: EntityKind,
    seq: i32,
) -> sqlx::Result<Option<ChunkState>> {
    let row: Option<StartedChunk> = sqlx::query_as(START_CHUNK)
        .bind(sync_id)
        .bind(entity.as_str())
        .bind(seq)
        .fetch_optional(pool)
        .await?;
    row.map(|r| {
        Ok(ChunkState {
            ids: r.ids,
            settled: r.settled,
            sync_type: r
                .sync_type
                .parse()
                .map_err(|e: String| sqlx::Error::Decode(e.into()))?,
            purpose: r.purpose.parse().map_err(super::reads::decode_error)?,
            history_id: r.history_id,
            attempts: r.attempts,
        })
    })
    .transpose()
}

/// The row [`start_chunk`] reads.
#[derive(Debug, sqlx::FromRow)]
struct StartedChunk {
    ids: Vec<i64>,
    settled: bool,
    sync_type: String,
    purpose: String,
    history_id: i32,
    attempts: i32,
}
