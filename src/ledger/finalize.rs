//! Finalizing a sync exactly once: after the settle that leaves no chunk unsettled
//! ([`after_settle`]), or by the safety net ([`finalize_settled`]); the counters set from
//! the chunk rows, the books verified ([`books::verify`]), the status, the duration and
//! the watermarks of a successful regular sync.

use super::books;
use super::history::sum_of;
use super::lifecycle::{self, RowLock};
use super::reads::decode_error;
use super::rollup::{ROLL_UP_DUE_SQL, roll_up, roll_up_counters, roll_up_now};
use super::sql::UPSERT_WATERMARK;
use super::states::{FinalStatus, HistoryStatus, Purpose, SyncState};
use crate::domain::{EntityKind, SyncType};
use sqlx::{PgConnection, PgPool, Row};
use std::sync::LazyLock;

/// An SQL expression: whether any chunk of the sync `sync` (an SQL expression) is
/// unsettled. It reads the partial index of unsettled chunks from its newest end
/// (highest entity, then seq): chunks are settled about in the order they were
/// planned, so the newest are the last to go and one is found at once. An `EXISTS` read
/// it from the oldest end and walked over the index entries of every chunk settled so
/// far (their entries stay in the partial index until a vacuum): 59 buffers a settle
/// on dataset M, O(chunks) a settle and O(chunks²) a sync.
pub(crate) fn any_unsettled_sql(sync: &str) -> String {
    format!(
        "((SELECT c.seq FROM loansync_chunk c WHERE c.sync_id = {sync} AND c.settled_at IS NULL \
           ORDER BY c.entity DESC, c.seq DESC LIMIT 1) IS NOT NULL)"
    )
}

/// What a settler does after its settle committed, without waiting for other settlers:
/// one read (no lock) says whether any chunk of the sync is unsettled and whether the
/// counters are due for a roll-up. The last settler to commit always sees every chunk
/// settled (its read starts after every other settle committed) and finalizes
/// ([`finalize_if_settled`]; when several see it, exactly one does). Otherwise a due
/// roll-up is tried, skipped at once if another settler is doing it.
///
/// Returns the final status when this call finalized the sync. Failures are logged,
/// not returned (the chunk is settled): whatever was not done here is done by the
/// planner's housekeeping, the next planner or the end of a single-process sync
/// ([`finalize_settled`]).
pub async fn after_settle(pool: &PgPool, sync_id: &str) -> Option<FinalStatus> {
    static SQL: LazyLock<String> = LazyLock::new(|| {
        format!(
            "SELECT s.state = 'running', {}, {ROLL_UP_DUE_SQL} \
             FROM loansync_sync s WHERE s.sync_id = $1",
            any_unsettled_sql("s.sync_id")
        )
    });
    let looked: sqlx::Result<Option<(bool, bool, bool)>> = sqlx::query_as(SQL.as_str())
        .bind(sync_id)
        .fetch_optional(pool)
        .await;
    let outcome = match looked {
        Ok(Some((true, false, _))) => finalize_if_settled(pool, sync_id).await,
        Ok(Some((true, true, true))) => roll_up(pool, sync_id).await.map(|_| None),
        Ok(_) => Ok(None),
        Err(e) => Err(e),
    };
    outcome.unwrap_or_else(|e| {
        tracing::warn!(%sync_id, error = %e, "after a settle: could not finalize or roll up the sync; \
                       the planner's housekeeping does it");
        None
    })
}

/// Finalizes a running sync whose chunks are all settled, exactly once: locks its
/// `loansync_sync` row, checks that it is still running and that no chunk is unsettled
/// (under that lock, so a second finalizer finds it `done` and does nothing), then
/// [`finalize`]. `None` when it is not running or a chunk is still unsettled.
pub async fn finalize_if_settled(
    pool: &PgPool,
    sync_id: &str,
) -> sqlx::Result<Option<FinalStatus>> {
    let mut tx = pool.begin().await?;
    let state = lifecycle::load_sync(&mut tx, sync_id, RowLock::Update)
        .await?
        .map(|s| s.state);
    static UNSETTLED: LazyLock<String> =
        LazyLock::new(|| format!("SELECT {}", any_unsettled_sql("$1")));
    let unsettled: bool = sqlx::query_scalar(UNSETTLED.as_str())
        .bind(sync_id)
        .fetch_one(&mut *tx)
        .await?;
    if state != Some(SyncState::Running) || unsettled {
        tx.rollback().await?;
        return Ok(None);
    }
    let status = finalize(&mut tx, sync_id).await?;
    fail::fail_point!("ledger::finalize::before_commit");
    tx.commit().await?;
    Ok(Some(status))
}

/// A sync finalized by [`finalize_settled`] rather than by its last settler.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finalized {
    pub sync_id: String,
    pub sync_type: SyncType,
    pub status: FinalStatus,
}

/// The safety net of the settle: finalizes every running sync whose chunks are all
/// settled (a settler that died between its commit and its finalize leaves one), and
/// rolls up the counters of the others. Run by the planner's housekeeping tick, before
/// a planner claims the slot, at the end of a single-process sync and by `resume`.
pub async fn finalize_settled(pool: &PgPool) -> sqlx::Result<Vec<Finalized>> {
    static SQL: LazyLock<String> = LazyLock::new(|| {
        format!(
            "SELECT s.sync_id::text, s.sync_type::text, {} \
             FROM loansync_sync s WHERE s.state = 'running'",
            any_unsettled_sql("s.sync_id")
        )
    });
    let running: Vec<(String, String, bool)> = sqlx::query_as(SQL.as_str()).fetch_all(pool).await?;
    let mut finalized = Vec::new();
    for (sync_id, sync_type, unsettled) in running {
        if unsettled {
            roll_up_now(pool, &sync_id).await?;
        } else if let Some(status) = finalize_if_settled(pool, &sync_id).await? {
            tracing::info!(%sync_id, status = status.as_str(), "finalized a sync whose chunks were all settled");
            finalized.push(Finalized {
                sync_id,
                sync_type: sync_type
                    .parse()
                    .map_err(|e: String| sqlx::Error::Decode(e.into()))?,
                status,
            });
        }
    }
    Ok(finalized)
}

/// The status a sync ends in, from its record counts: one that already failed fast
/// ([`abort_sync`]) stays failed; none failed is completed; some failed is a partial
/// success, unless none succeeded, which is a failure.
pub(crate) fn final_status(succeeded: i32, failed: i32, already_failed: bool) -> FinalStatus {
    if already_failed {
        FinalStatus::Failed
    } else if failed == 0 {
        FinalStatus::Completed
    } else if succeeded == 0 {
        FinalStatus::Failed
    } else {
        FinalStatus::PartialSuccess
    }
}

/// Closes a sync whose chunks are all settled: the history counters set exactly from
/// the chunk rows (sums per entity), status, `completed_at`, `duration_seconds`,
/// `error_message`, and the watermarks of a successful regular sync; `state = 'done'`.
/// The caller holds the `loansync_sync` row (or plans the sync in this transaction) and
/// has checked that it is running with no chunk unsettled ([`finalize_if_settled`]).
pub async fn finalize(conn: &mut PgConnection, sync_id: &str) -> sqlx::Result<FinalStatus> {
    roll_up_counters(&mut *conn, sync_id).await?;
    let sync = lifecycle::load_sync(&mut *conn, sync_id, RowLock::None)
        .await?
        .ok_or(sqlx::Error::RowNotFound)?;
    // The records succeeded and failed, then each entity's failed, in the message's
    // order; the column names come from the one mapping.
    const MESSAGE_ORDER: [EntityKind; 4] = [
        EntityKind::Loan,
        EntityKind::Repayment,
        EntityKind::Customer,
        EntityKind::Officer,
    ];
    static SQL: LazyLock<String> = LazyLock::new(|| {
        let failed: Vec<&str> = MESSAGE_ORDER
            .iter()
            .map(|e| e.history_columns().failed)
            .collect();
        format!(
            "SELECT {}, {}, {}, status::text FROM etl_folder_etlsynchistory WHERE sync_id = $1",
            sum_of(|c| c.success),
            sum_of(|c| c.failed),
            failed.join(", ")
        )
    });
    let row = sqlx::query(SQL.as_str())
        .bind(sync_id)
        .fetch_one(&mut *conn)
        .await?;
    let succeeded: i32 = row.get(0);
    let failed: i32 = row.get(1);
    let current: HistoryStatus = row.get::<String, _>(6).parse().map_err(decode_error)?;
    // Already failed fast (abort_sync): it keeps its message.
    let already_failed = current == HistoryStatus::Failed;
    let status = final_status(succeeded, failed, already_failed);
    let message = (!already_failed && failed > 0).then(|| {
        let per_entity: Vec<String> = MESSAGE_ORDER
            .iter()
            .enumerate()
            .map(|(i, e)| (e, row.get::<i32, _>(2 + i)))
            .filter(|(_, n)| *n > 0)
            .map(|(e, n)| format!("{e}: {n}"))
            .collect();
        format!(
            "{failed} of {} records failed ({}); see etl_folder_etlsyncerror for each record's error, \
             and `loansync errors retry` to deliver them again",
            failed + succeeded,
            per_entity.join(", ")
        )
    });
    // The books, verified: a mismatch is logged, said in the history and recorded
    // (`etl_books_unbalanced_total`); the sync still ends with the status of its counts.
    let unbalanced =
        books::verify(&mut *conn, sync_id, sync.spec.purpose != Purpose::Retry).await?;
    if !unbalanced.is_empty() {
        for u in &unbalanced {
            tracing::error!(%sync_id, entity = u.entity.as_str(), planned = u.planned, succeeded = u.succeeded,
                failed = u.failed, error_rows = u.error_rows, expected_error_rows = ?u.expected_error_rows,
                stray_error_rows = u.stray_error_rows, books = %u, "the books of a sync do not balance at finalize");
        }
        let entities: Vec<&str> = unbalanced.iter().map(|u| u.entity.as_str()).collect();
        sqlx::query("UPDATE loansync_sync SET books_unbalanced = $2 WHERE sync_id = $1")
            .bind(sync_id)
            .bind(&entities)
            .execute(&mut *conn)
            .await?;
    }
    sqlx::query(
        "UPDATE etl_folder_etlsynchistory SET status = $2, completed_at = now(), \
         duration_seconds = EXTRACT(EPOCH FROM (now() - started_at))::float8, \
         error_message = NULLIF(concat_ws('; ', COALESCE($3, error_message), $4), '') \
         WHERE sync_id = $1",
    )
    .bind(sync_id)
    .bind(status.as_str())
    .bind(message)
    .bind(books::message(&unbalanced))
    .execute(&mut *conn)
    .await?;
    if status != FinalStatus::Failed && sync.spec.purpose == Purpose::Sync {
        for entity in &sync.spec.entities {
            sqlx::query(UPSERT_WATERMARK)
                .bind(entity.as_str())
                .bind(sync.window_hi)
                .bind(sync_id)
                .execute(&mut *conn)
                .await?;
        }
    }
    lifecycle::finish(&mut *conn, sync_id).await?;
    Ok(status)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_final_status_follows_the_counts() {
        assert_eq!(final_status(10, 0, false), FinalStatus::Completed);
        // Nothing to send is a success, not a failure.
        assert_eq!(final_status(0, 0, false), FinalStatus::Completed);
        assert_eq!(final_status(9, 1, false), FinalStatus::PartialSuccess);
        assert_eq!(final_status(1, 9, false), FinalStatus::PartialSuccess);
        assert_eq!(final_status(0, 3, false), FinalStatus::Failed);
    }

    #[test]
    fn a_sync_that_failed_fast_stays_failed_whatever_its_counts() {
        for (ok, failed) in [(0, 0), (5, 0), (5, 5), (0, 5)] {
            assert_eq!(
                final_status(ok, failed, true),
                FinalStatus::Failed,
                "{ok}/{failed}"
            );
        }
    }
}
