//! Ending a sync before its chunks are all settled: failed fast when the API refuses the
//! credentials ([`abort_sync`]), or by hand ([`abandon_sync`]); and pruning the chunk id
//! lists of finished syncs ([`prune_chunks`]).

use super::errors::write_error_rows;
use super::finalize::finalize;
use super::lifecycle::{self, PlanningLock, RowLock};
use super::states::{ChunkSettlement, Purpose, SyncState};
use crate::domain::{EntityKind, FailedRecord};
use sqlx::PgPool;

/// Fails a sync fast (the API refused the credentials): its unsettled chunks are settled
/// as failed records without error rows, so `success + failed == total` still holds, and
/// no watermark moves. Returns false when the sync was already finished.
pub async fn abort_sync(
    pool: &PgPool,
    sync_id: &str,
    reason: &str,
    api_response: Option<&serde_json::Value>,
) -> sqlx::Result<bool> {
    fail_unsettled(pool, sync_id, reason, api_response, Unsettled::Aborted).await
}

/// How [`fail_unsettled`] settles the chunks it finds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Unsettled {
    /// Rejected credentials: failed, no error rows (nothing is wrong with the records).
    Aborted,
    /// Ended by hand: failed with error rows `SYNC_ABANDONED`, so `errors retry` can
    /// deliver them later (a retry sync's records keep their original rows).
    Abandoned,
}

/// The error code of the records of a sync ended by hand.
pub const ABANDONED_CODE: &str = "SYNC_ABANDONED";

/// Settles every unsettled chunk of a running sync as failed and finalizes it `failed`.
/// Locks in the ledger's order (chunks, sync, history): a settle that holds a chunk is
/// waited for, and the chunk it settled is skipped; a roll-up or a finalize that holds
/// the sync row is waited for. The counters are then set from the chunk rows
/// ([`finalize`]), so every chunk counts once. Concurrent calls for one sync are
/// serialized by a transaction advisory lock that settles never take.
async fn fail_unsettled(
    pool: &PgPool,
    sync_id: &str,
    reason: &str,
    api_response: Option<&serde_json::Value>,
    how: Unsettled,
) -> sqlx::Result<bool> {
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended('loansync.fail:' || $1, 0))")
        .bind(sync_id)
        .execute(&mut *tx)
        .await?;
    let state = lifecycle::load_sync(&mut tx, sync_id, RowLock::None)
        .await?
        .map(|s| s.state);
    if state != Some(SyncState::Running) {
        tx.rollback().await?;
        return Ok(false);
    }
    let outcome = match how {
        Unsettled::Aborted => ChunkSettlement::Aborted,
        Unsettled::Abandoned => ChunkSettlement::Abandoned,
    }
    .as_str();
    sqlx::query(
        "UPDATE loansync_chunk SET settled_at = now(), outcome = $2, succeeded = 0, \
                failed = cardinality(ids) WHERE sync_id = $1 AND settled_at IS NULL",
    )
    .bind(sync_id)
    .bind(outcome)
    .execute(&mut *tx)
    .await?;
    if how == Unsettled::Abandoned {
        abandoned_error_rows(&mut tx, sync_id, reason).await?;
    }
    // The sync row, then the history row. A settler that finalized the sync meanwhile
    // (every chunk was settled already) has left it 'done'.
    let still_running = lifecycle::load_sync(&mut tx, sync_id, RowLock::Update)
        .await?
        .is_some_and(|s| s.state == SyncState::Running);
    if !still_running {
        tx.rollback().await?;
        return Ok(false);
    }
    sqlx::query(
        "UPDATE etl_folder_etlsynchistory SET status = 'failed', error_message = $2 WHERE sync_id = $1",
    )
    .bind(sync_id)
    .bind(reason)
    .execute(&mut *tx)
    .await?;
    finalize(&mut tx, sync_id).await?;
    if let Some(body) = api_response {
        // The answer that failed the sync is the last one, whatever the chunks kept.
        sqlx::query("UPDATE etl_folder_etlsynchistory SET api_response = $2 WHERE sync_id = $1")
            .bind(sync_id)
            .bind(body)
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    Ok(true)
}

/// What [`abandon_sync`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Abandoned {
    /// A running sync: its unsettled records were failed with [`ABANDONED_CODE`].
    Running,
    /// A sync still planning whose planner is gone: nothing had been sent.
    Planning,
    /// Nothing to do: the sync is finished (`Some(Done)`) or unknown (`None`).
    NotActive { state: Option<SyncState> },
}

/// Ends a sync by hand (`loansync abandon`): unsettled chunks settled as failed with
/// [`ABANDONED_CODE`] and error rows, history `failed` with `reason`, no watermark moved,
/// books balanced. The caller holds the [`PlanningLock`], so a `planning` sync here has
/// no live planner; the requests it served stay with it, answered by its failure.
pub async fn abandon_sync(
    pool: &PgPool,
    _lock: &PlanningLock,
    sync_id: &str,
    reason: &str,
) -> sqlx::Result<Abandoned> {
    match lifecycle::sync_state(pool, sync_id).await? {
        Some(SyncState::Planning) => {
            if lifecycle::fail_planning(pool, sync_id, reason).await? {
                Ok(Abandoned::Planning)
            } else {
                Ok(Abandoned::NotActive {
                    state: lifecycle::sync_state(pool, sync_id).await?,
                })
            }
        }
        Some(SyncState::Running) => {
            if fail_unsettled(pool, sync_id, reason, None, Unsettled::Abandoned).await? {
                Ok(Abandoned::Running)
            } else {
                Ok(Abandoned::NotActive {
                    state: Some(SyncState::Done),
                })
            }
        }
        state => Ok(Abandoned::NotActive { state }),
    }
}

/// Deletes the chunk ledger (id lists) of syncs finished more than `retention` ago; the
/// sync, its history row, counters and error rows stay. Returns the chunk rows deleted.
pub async fn prune_chunks(pool: &PgPool, retention: std::time::Duration) -> sqlx::Result<u64> {
    let mut tx = pool.begin().await?;
    let deleted = sqlx::query(
        "WITH old AS (UPDATE loansync_sync SET chunks_pruned_at = now() \
                      WHERE state = 'done' AND chunks_pruned_at IS NULL \
                        AND finished_at < now() - make_interval(secs => $1) RETURNING sync_id) \
         DELETE FROM loansync_chunk c USING old WHERE c.sync_id = old.sync_id",
    )
    .bind(retention.as_secs_f64())
    .execute(&mut *tx)
    .await?
    .rows_affected();
    tx.commit().await?;
    Ok(deleted)
}

/// The error rows of a sync ended by hand: one per record of its abandoned chunks, with
/// [`ABANDONED_CODE`], so that `errors retry` can deliver them later (a retry sync's own
/// records keep their original rows). Chunk after chunk, a page at a time: memory stays
/// bounded whatever the sync's size.
async fn abandoned_error_rows(
    conn: &mut sqlx::PgConnection,
    sync_id: &str,
    reason: &str,
) -> sqlx::Result<()> {
    let retry_sync: Option<(String, i32)> = sqlx::query_as(
        "SELECT s.purpose, h.id FROM loansync_sync s \
         JOIN etl_folder_etlsynchistory h USING (sync_id) WHERE s.sync_id = $1",
    )
    .bind(sync_id)
    .fetch_optional(&mut *conn)
    .await?;
    let Some((purpose, history_id)) = retry_sync else {
        return Ok(());
    };
    if purpose == Purpose::Retry.as_str() {
        return Ok(());
    }
    let details = serde_json::json!({ "abandoned": true });
    let mut after = (String::new(), -1i32);
    loop {
        let page: Vec<(String, i32, Vec<i64>)> = sqlx::query_as(
            "SELECT entity::text, seq, ids FROM loansync_chunk \
             WHERE sync_id = $1 AND outcome = $2 AND (entity, seq) > ($3::varchar, $4) \
             ORDER BY entity, seq LIMIT 100",
        )
        .bind(sync_id)
        .bind(ChunkSettlement::Abandoned.as_str())
        .bind(&after.0)
        .bind(after.1)
        .fetch_all(&mut *conn)
        .await?;
        let Some(last) = page.last() else {
            return Ok(());
        };
        after = (last.0.clone(), last.1);
        for (entity, _, ids) in &page {
            let entity: EntityKind = entity
                .parse()
                .map_err(|e| sqlx::Error::Decode(Box::new(e)))?;
            let failed: Vec<FailedRecord> = ids
                .iter()
                .map(|&id| FailedRecord {
                    id,
                    error_code: ABANDONED_CODE.into(),
                    message: reason.into(),
                    details: details.clone(),
                })
                .collect();
            write_error_rows(&mut *conn, entity, &failed, history_id, false).await?;
        }
    }
}
