//! Ending a sync before its chunks are all settled: failed fast when the API refuses the
//! credentials ([`abort_sync`]), or by hand ([`abandon_sync`]); and pruning the chunk id
//! lists of finished syncs ([`prune_chunks`]).

use super::finalize::finalize;
use super::lifecycle::{self, PlanningLock, RowLock};
use super::states::{ChunkSettlement, SyncState};
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
        sqlx::query(
            "INSERT INTO etl_folder_etlsyncerror ( \
                 entity_type, entity_id, error_code, error_message, error_details, \
                 created_at, retry_count, last_retry_at, resolved, resolved_at, sync_history_id) \
             SELECT c.entity, u.id::text, $2, $3, jsonb_build_object('abandoned', true), \
                    now(), 0, NULL, false, NULL, h.id \
             FROM loansync_chunk c CROSS JOIN LATERAL unnest(c.ids) AS u(id) \
             JOIN etl_folder_etlsynchistory h ON h.sync_id = c.sync_id \
             JOIN loansync_sync s ON s.sync_id = c.sync_id \
             WHERE c.sync_id = $1 AND c.outcome = 'abandoned' AND s.purpose <> 'retry'",
        )
        .bind(sync_id)
        .bind(ABANDONED_CODE)
        .bind(reason)
        .execute(&mut *tx)
        .await?;
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
