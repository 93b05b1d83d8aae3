//! Settling a chunk exactly once: its counts, outcome and the API's answer on its own
//! `loansync_chunk` row, its error rows, the resolutions of its delivered records' open
//! error rows, and their fingerprints; then, after the commit, the sync looked at
//! ([`crate::ledger::finalize::after_settle`]).

use super::finalize::after_settle;
use super::sql::RESOLVE_ERRORS;
use super::states::{FinalStatus, Purpose};
use crate::domain::{EntityKind, FailedRecord};
use sqlx::{PgConnection, PgPool};
use std::sync::atomic::{AtomicBool, Ordering};

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
/// planner's housekeeping and the next planner ([`super::finalize::finalize_settled`]) for a settler that
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
    super::errors::write_error_rows(
        &mut tx,
        r.entity,
        r.failed,
        r.history_id,
        r.purpose == Purpose::Retry,
    )
    .await?;
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
