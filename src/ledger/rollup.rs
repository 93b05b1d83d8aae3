//! The history row's counters of a running sync, rolled up from its chunk rows about
//! once a second (longer on large syncs), never waited for, and exactly at finalize.

use super::sql::ROLL_UP_COUNTERS;
use sqlx::{PgConnection, PgPool};
use std::sync::LazyLock;

/// Whether a roll-up of the sync `s` is due: never rolled up, or its `roll_up_due` time
/// has passed ([`roll_up_if`] sets it).
pub(super) const ROLL_UP_DUE_SQL: &str = "(s.roll_up_due IS NULL OR s.roll_up_due <= now())";

/// When the next roll-up is due, set by the roll-up itself at its end: a second after
/// it began, or, when a roll-up takes longer than 50 ms, twenty times its own duration
/// later. A roll-up reads every settled chunk row of the sync, so its cost grows with
/// the sync; with a fixed interval its share of the database would grow with the
/// sync's size too (a sync of 50,000 chunks spends 0.3 s a roll-up, a third of a
/// backend). This way roll-ups take at most about 5 % of one backend, whatever the size:
/// Django's admin sees progress every second on small syncs and every few seconds on
/// the largest. `now()` is the roll-up's transaction start, `clock_timestamp()` its end.
const NEXT_ROLL_UP_SQL: &str =
    "now() + greatest(interval '1 second', 20 * (clock_timestamp() - now()))";

/// Rolls a running sync's history counters up from its chunk rows, if one is due (a
/// second after the last, longer on large syncs: [`NEXT_ROLL_UP_SQL`]): takes the `loansync_sync` row with `SKIP LOCKED` (a settler that does not
/// get it goes on at once), sets the counters to the sums ([`ROLL_UP_COUNTERS`]: absolute
/// values, idempotent), `rolled_up_at` and when the next is due. Returns whether it rolled
/// up.
pub async fn roll_up(pool: &PgPool, sync_id: &str) -> sqlx::Result<bool> {
    static SQL: LazyLock<String> = LazyLock::new(|| {
        format!(
            "SELECT 1 FROM loansync_sync s WHERE s.sync_id = $1 AND s.state = 'running' \
               AND {ROLL_UP_DUE_SQL} FOR UPDATE SKIP LOCKED"
        )
    });
    roll_up_if(pool, sync_id, SQL.as_str()).await
}

/// [`roll_up`] whatever the time of the last one (the planner's housekeeping, tests);
/// still `SKIP LOCKED`.
pub async fn roll_up_now(pool: &PgPool, sync_id: &str) -> sqlx::Result<bool> {
    roll_up_if(
        pool,
        sync_id,
        "SELECT 1 FROM loansync_sync WHERE sync_id = $1 AND state = 'running' FOR UPDATE SKIP LOCKED",
    )
    .await
}

async fn roll_up_if(pool: &PgPool, sync_id: &str, lock_sql: &str) -> sqlx::Result<bool> {
    let mut tx = pool.begin().await?;
    let got: Option<i32> = sqlx::query_scalar(sqlx::AssertSqlSafe(lock_sql))
        .bind(sync_id)
        .fetch_optional(&mut *tx)
        .await?;
    if got.is_none() {
        tx.rollback().await?;
        return Ok(false);
    }
    roll_up_counters(&mut tx, sync_id).await?;
    static SET_DUE: LazyLock<String> = LazyLock::new(|| {
        format!(
            "UPDATE loansync_sync SET rolled_up_at = now(), roll_up_due = {NEXT_ROLL_UP_SQL} \
             WHERE sync_id = $1"
        )
    });
    sqlx::query(SET_DUE.as_str())
        .bind(sync_id)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(true)
}

/// Sets the history counters (and `api_response`) from the chunk rows, in the caller's
/// transaction. The caller holds the `loansync_sync` row (lock order: chunk rows, then
/// the sync row, then the history row).
pub(super) async fn roll_up_counters(conn: &mut PgConnection, sync_id: &str) -> sqlx::Result<()> {
    sqlx::query(ROLL_UP_COUNTERS)
        .bind(sync_id)
        .execute(conn)
        .await?;
    Ok(())
}
