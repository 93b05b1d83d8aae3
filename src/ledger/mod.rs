//! Sync history, chunk ledger, counters, error rows and watermarks.
//!
//! Every write that decides what a sync counted happens here, each in one transaction:
//! * [`begin_sync`] claims the single active-sync slot and writes the `pending` history row;
//! * [`write_plan`] writes the chunk ledger, the `total_*` counters and `in_progress`;
//! * [`settle_chunk`] settles one chunk exactly once, on its own `loansync_chunk` row
//!   (counts, outcome, the API's answer), with its error rows and resolutions; then,
//!   after the commit, finalizes the sync when no chunk is left unsettled
//!   ([`finalize_if_settled`], exactly one finalizer) or rolls its history counters up
//!   from the chunk rows about once a second ([`roll_up`], never waited for);
//! * [`finalize`] sets the history counters exactly from the chunk rows, the status,
//!   duration and watermarks; [`finalize_settled`] is its safety net (housekeeping, the
//!   next planner) for a settler that died between its commit and its finalize;
//! * [`abort_sync`] fails a sync fast (rejected credentials): the unsent chunks are
//!   settled as failed records, without error rows;
//! * [`abandon_sync`] ends a sync by hand (`loansync abandon`);
//! * [`prune_chunks`] drops finished syncs' chunk id lists after the retention.
//!
//! Whoever claims and plans a sync holds the [`PlanningLock`] (a session advisory lock):
//! a `planning` sync nobody holds it for lost its planner, and the next planner abandons
//! it ([`begin_sync`]), so a killed process never blocks later syncs.
//!
//! The settle transaction locks its own chunk row only: settles of different chunks of a
//! sync never wait for each other. Lock order, for every transaction that takes more than
//! one of these rows: chunk rows, then the `loansync_sync` row, then the history row.
//! [`finalize_if_settled`] and [`roll_up`] take the sync row first (the roll-up with
//! `SKIP LOCKED`: it never waits for it); [`abort_sync`] and [`abandon_sync`] settle the
//! chunks first.

//!
//! The files, by concern: [`lifecycle`] (claiming a sync, requests, the planning lock),
//! [`plan`] (the chunk ledger a planner writes, a chunk's start), [`errors`] (error rows),
//! [`watermarks`], [`reads`] (what commands, metrics and the demo show), [`states`] (the
//! states and outcomes as enums); settling, finalizing and progress are here.

pub mod clock;
pub mod errors;
pub mod history;
pub mod lifecycle;
pub mod plan;
pub mod reads;
mod sql;
pub mod states;
pub mod watermarks;

pub use errors::*;
pub use history::{HistoryColumns, sum_of};
pub use lifecycle::{PlanningLock, RowLock, SyncSpec, sync_finished, sync_state};
pub use plan::*;
pub use reads::*;
pub use states::*;
pub use watermarks::*;

use crate::domain::{EntityKind, SyncType};
use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::{PgConnection, PgPool, Row};
use std::sync::LazyLock;
use std::sync::atomic::{AtomicBool, Ordering};

use lifecycle::PLANNER_GONE_SQL;
use sql::*;

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

/// One record that failed, as it will be written to `etl_folder_etlsyncerror`.
pub use crate::domain::FailedRecord;

/// What a worker learned about one chunk, to be settled in one transaction.
#[derive(Debug, Clone)]
pub struct ChunkResult<'a> {
    pub sync_id: &'a str,
    pub entity: EntityKind,
    pub seq: i32,
    pub history_id: i32,
    pub purpose: Purpose,
    pub succeeded: &'a [i64],
    /// The fingerprint of each accepted record (see `source::LoadedChunk`), written to
    /// `loansync_delivered`: what the platform now holds.
    pub delivered: &'a [(i64, uuid::Uuid)],
    pub failed: &'a [FailedRecord],
    /// The last response body of the API for this chunk (already truncated).
    pub api_response: Option<&'a serde_json::Value>,
    /// Which form of the fingerprint upsert to use, and where to learn for the next one.
    pub upsert: &'a FingerprintUpsert,
}

/// Which form of the fingerprint upsert a settle uses ([`record_delivered`]), per entity.
///
/// Both forms write the same rows. The plain upsert (`ON CONFLICT … DO UPDATE … WHERE`
/// the fingerprint changed) is the cheaper one for new and changed records; on a record
/// delivered again unchanged it still locks the existing row, which writes a WAL record
/// and dirties the row's page. The skipping form first leaves out the records whose
/// fingerprint is there already (`NOT EXISTS`, one index probe each): measured on dataset
/// M, 35–45 % less time on unchanged records and 18–33 % more on new ones
/// (bench/REPORT.md), so it pays when fewer than about half the records changed.
///
/// A worker learns which form to use from its last settle of the entity: either form
/// reports how many rows it wrote (the new and changed records), and the next settle of
/// the entity skips when fewer than half were written. A first sync stays plain; a full
/// sync of unchanged records skips from a worker's second chunk of the entity on.
#[derive(Debug)]
pub struct FingerprintUpsert {
    /// Whether the next settle skips, per entity (in [`EntityKind::ALL`]'s order).
    skip: [AtomicBool; 4],
    /// Whether settles update `skip`; a fixed form (tests, benchmarks) does not learn.
    learns: bool,
}

impl FingerprintUpsert {
    /// Learning, starting with the plain form: a worker's.
    pub const fn adaptive() -> Self {
        Self::new(false, true)
    }

    /// The plain upsert always.
    pub fn plain() -> &'static Self {
        static PLAIN: FingerprintUpsert = FingerprintUpsert::new(false, false);
        &PLAIN
    }

    /// The skipping form always.
    pub fn skipping() -> &'static Self {
        static SKIPPING: FingerprintUpsert = FingerprintUpsert::new(true, false);
        &SKIPPING
    }

    const fn new(skip: bool, learns: bool) -> Self {
        Self {
            skip: [
                AtomicBool::new(skip),
                AtomicBool::new(skip),
                AtomicBool::new(skip),
                AtomicBool::new(skip),
            ],
            learns,
        }
    }

    fn slot(&self, entity: EntityKind) -> &AtomicBool {
        let i = match entity {
            EntityKind::Officer => 0,
            EntityKind::Customer => 1,
            EntityKind::Loan => 2,
            EntityKind::Repayment => 3,
        };
        &self.skip[i]
    }

    /// Whether the next settle of `entity` leaves out the unchanged records first.
    pub fn skips(&self, entity: EntityKind) -> bool {
        self.slot(entity).load(Ordering::Relaxed)
    }

    /// A settle of `entity` wrote `written` of `delivered` fingerprint rows.
    fn learn(&self, entity: EntityKind, written: u64, delivered: usize) {
        if self.learns {
            self.slot(entity).store(
                written.saturating_mul(2) < delivered as u64,
                Ordering::Relaxed,
            );
        }
    }
}

impl Default for FingerprintUpsert {
    fn default() -> Self {
        Self::adaptive()
    }
}

/// How settling went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settled {
    /// This call settled the chunk; `Some` when it was the sync's last chunk.
    Now(Option<FinalStatus>),
    /// The chunk was settled before (a redelivery or a duplicate): nothing was counted.
    Already,
}

/// Settles a chunk exactly once ([`settle_chunk_only`]), then, after the commit, looks
/// at the sync ([`after_settle`]): finalizes it when no chunk is left unsettled, else
/// rolls its history counters up when they are a second old. The settle transaction
/// touches no row shared with the other chunks of the sync, so settles of different
/// chunks never wait for each other.
pub async fn settle_chunk(pool: &PgPool, r: &ChunkResult<'_>) -> sqlx::Result<Settled> {
    if !settle_chunk_only(pool, r).await? {
        return Ok(Settled::Already);
    }
    fail::fail_point!("ledger::settle::after_commit");
    Ok(Settled::Now(after_settle(pool, r.sync_id).await))
}

/// The settle transaction alone: marks the chunk settled with its counts and the API's
/// answer (only if it was not: the `settled_at IS NULL` guard), writes one error row per
/// failed record, resolves the open error rows of the records delivered, and writes their
/// fingerprints. Returns false (and changes nothing) when the chunk was settled before.
/// It does not finalize: [`settle_chunk`] does that after the commit, and so do the
/// planner's housekeeping and the next planner ([`finalize_settled`]) for a settler that
/// died in between.
pub async fn settle_chunk_only(pool: &PgPool, r: &ChunkResult<'_>) -> sqlx::Result<bool> {
    let mut tx = pool.begin().await?;
    let marked = sqlx::query(
        "UPDATE loansync_chunk SET settled_at = now(), outcome = 'delivered', succeeded = $4, failed = $5, \
         api_response = $6 WHERE sync_id = $1 AND entity = $2 AND seq = $3 AND settled_at IS NULL",
    )
    .bind(r.sync_id)
    .bind(r.entity.as_str())
    .bind(r.seq)
    .bind(r.succeeded.len() as i32)
    .bind(r.failed.len() as i32)
    .bind(r.api_response)
    .execute(&mut *tx)
    .await?;
    if marked.rows_affected() == 0 {
        tx.rollback().await?;
        return Ok(false);
    }
    if !r.failed.is_empty() {
        record_failures(&mut tx, r).await?;
    }
    if !r.succeeded.is_empty() {
        let ids: Vec<String> = r.succeeded.iter().map(|i| i.to_string()).collect();
        sqlx::query(RESOLVE_ERRORS)
            .bind(r.entity.as_str())
            .bind(&ids)
            .execute(&mut *tx)
            .await?;
    }
    if !r.delivered.is_empty() {
        record_delivered(&mut tx, r).await?;
    }
    fail::fail_point!("ledger::settle::before_commit");
    tx.commit().await?;
    Ok(true)
}

/// Whether a roll-up of the sync `s` is due: never rolled up, or its `roll_up_due` time
/// has passed ([`roll_up_if`] sets it).
const ROLL_UP_DUE_SQL: &str = "(s.roll_up_due IS NULL OR s.roll_up_due <= now())";

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
async fn roll_up_counters(conn: &mut PgConnection, sync_id: &str) -> sqlx::Result<()> {
    sqlx::query(ROLL_UP_COUNTERS)
        .bind(sync_id)
        .execute(conn)
        .await?;
    Ok(())
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

/// Writes what the platform now holds of the accepted records: their fingerprints (in
/// the settle transaction, so a settled chunk and its fingerprints commit together). A
/// record delivered again unchanged keeps its row as it was (`sync_id` and
/// `delivered_at` say when this version was first delivered): a full sync of unchanged
/// records writes no new row version, which PostgreSQL would otherwise have to write
/// and later vacuum, one per record. In the skipping form ([`FingerprintUpsert`]) it does
/// not even lock those rows. A record delivered again after a sweep found it gone is no
/// longer gone.
async fn record_delivered(conn: &mut PgConnection, r: &ChunkResult<'_>) -> sqlx::Result<()> {
    /// The records to write, `$1` the entity: all of them, or (skipping) those whose
    /// fingerprint is not there already.
    macro_rules! upsert {
        ($filter:literal) => {
            concat!(
                "INSERT INTO loansync_delivered (entity, id, fingerprint, sync_id) \
                 SELECT $1, d.id, d.fp, $4 FROM unnest($2::int8[], $3::uuid[]) AS d (id, fp) ",
                $filter,
                " ON CONFLICT (entity, id) DO UPDATE SET fingerprint = EXCLUDED.fingerprint, \
                 sync_id = EXCLUDED.sync_id, delivered_at = now() \
                 WHERE loansync_delivered.fingerprint <> EXCLUDED.fingerprint"
            )
        };
    }
    const PLAIN: &str = upsert!("");
    const SKIPPING: &str = upsert!(
        "WHERE NOT EXISTS (SELECT 1 FROM loansync_delivered x \
         WHERE x.entity = $1 AND x.id = d.id AND x.fingerprint = d.fp)"
    );
    let (ids, fps): (Vec<i64>, Vec<uuid::Uuid>) = r.delivered.iter().copied().unzip();
    let sql = if r.upsert.skips(r.entity) {
        SKIPPING
    } else {
        PLAIN
    };
    let written = sqlx::query(sql)
        .bind(r.entity.as_str())
        .bind(&ids)
        .bind(&fps)
        .bind(r.sync_id)
        .execute(&mut *conn)
        .await?
        .rows_affected();
    r.upsert.learn(r.entity, written, ids.len());
    sqlx::query("DELETE FROM loansync_deleted WHERE entity = $1 AND id = ANY($2::int8[])")
        .bind(r.entity.as_str())
        .bind(&ids)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

async fn record_failures(conn: &mut PgConnection, r: &ChunkResult<'_>) -> sqlx::Result<()> {
    let ids: Vec<String> = r.failed.iter().map(|f| f.id.to_string()).collect();
    let codes: Vec<String> = r
        .failed
        .iter()
        .map(|f| truncate(&f.error_code, 100))
        .collect();
    let messages: Vec<&str> = r.failed.iter().map(|f| f.message.as_str()).collect();
    let details: Vec<&serde_json::Value> = r.failed.iter().map(|f| &f.details).collect();
    let sql = match r.purpose {
        Purpose::Sync | Purpose::Backfill | Purpose::Sweep => INSERT_ERRORS,
        Purpose::Retry => RETRY_ERRORS,
    };
    sqlx::query(sql)
        .bind(r.entity.as_str())
        .bind(&ids)
        .bind(&codes)
        .bind(&messages)
        .bind(sqlx::types::Json(&details))
        .bind(r.history_id)
        .execute(conn)
        .await?;
    Ok(())
}

fn truncate(s: &str, max_chars: usize) -> String {
    s.chars().take(max_chars).collect()
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
    let row = sqlx::query(
        "SELECT h.loans_success + h.repayments_success + h.customers_success + h.officers_success, \
                h.loans_failed + h.repayments_failed + h.customers_failed + h.officers_failed, \
                h.loans_failed, h.repayments_failed, h.customers_failed, h.officers_failed, \
                h.status::text \
         FROM etl_folder_etlsynchistory h WHERE sync_id = $1",
    )
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
        let per_entity: Vec<String> = [
            ("loan", row.get::<i32, _>(2)),
            ("repayment", row.get::<i32, _>(3)),
            ("customer", row.get::<i32, _>(4)),
            ("officer", row.get::<i32, _>(5)),
        ]
        .into_iter()
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
    sqlx::query(
        "UPDATE etl_folder_etlsynchistory SET status = $2, completed_at = now(), \
         duration_seconds = EXTRACT(EPOCH FROM (now() - started_at))::float8, \
         error_message = COALESCE($3, error_message) WHERE sync_id = $1",
    )
    .bind(sync_id)
    .bind(status.as_str())
    .bind(message)
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

/// A page of the chunks of a sync that are not settled yet, in publishing order (entity,
/// then seq), after the key `after` (a keyset on the primary key; `None`: from the
/// first): at most `limit`, and the key to read the next page after (`None` when this
/// page was the last).
pub async fn unsettled_chunks_page(
    pool: &PgPool,
    sync_id: &str,
    after: Option<&(String, i32)>,
    limit: i64,
) -> sqlx::Result<(Vec<crate::domain::ChunkJob>, Option<(String, i32)>)> {
    let (after_entity, after_seq) = after.map_or(("", -1), |(e, s)| (e.as_str(), *s));
    let rows: Vec<(String, i32)> = sqlx::query_as(
        "SELECT entity::text, seq FROM loansync_chunk \
         WHERE sync_id = $1 AND (entity, seq) > ($2::varchar, $3) AND settled_at IS NULL \
         ORDER BY entity, seq LIMIT $4",
    )
    .bind(sync_id)
    .bind(after_entity)
    .bind(after_seq)
    .bind(limit)
    .fetch_all(pool)
    .await?;
    let next = match rows.last() {
        Some(last) if rows.len() as i64 >= limit => Some(last.clone()),
        _ => None,
    };
    let jobs = rows
        .into_iter()
        .filter_map(|(e, seq)| {
            e.parse().ok().map(|entity| crate::domain::ChunkJob {
                sync_id: sync_id.to_string(),
                entity,
                seq,
            })
        })
        .collect();
    Ok((jobs, next))
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
