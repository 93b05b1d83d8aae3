//! Writing a sync's plan: the chunk ledger, the per-entity windows, the totals, and a
//! chunk's start by a worker.

use super::finalize::finalize;
use super::sql::*;
use super::states::{FinalStatus, HistoryStatus, Purpose};
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

/// One keyset page of the ids with unresolved error rows (for `loansync errors retry`),
/// in the numbering of [`insert_chunks`] (`$1` after, `$2` limit, `$5` the last id, `$6`
/// the entity).
pub const UNRESOLVED_PAGE_SQL: &str = "SELECT DISTINCT id FROM ( \
     SELECT CASE WHEN entity_id ~ '^[0-9]{1,18}$' THEN entity_id::int8 END AS id \
     FROM etl_folder_etlsyncerror WHERE entity_type = $6 AND NOT resolved) e \
     WHERE id > $1 AND id <= $5 ORDER BY id LIMIT $2";

/// How many keyset pages (chunks) [`insert_chunks`] writes per statement: each statement
/// stays well inside `ETL_DB_STATEMENT_TIMEOUT_SECS` whatever the table's size. Debug
/// builds (every test) take 3, so that the tests' small syncs go through several
/// statements too.
const CHUNKS_PER_STATEMENT: i32 = if cfg!(debug_assertions) { 3 } else { 500 };

/// Chunk numbers (seq) of one part of an entity's plan start at `part * PART_SEQ_STRIDE`:
/// the parts of an entity are written side by side, each numbering its own chunks, so
/// an entity's seqs are dense within a part and have gaps between parts. Nothing reads
/// meaning into a seq beyond identifying its chunk (the Idempotency-Key comes from the
/// records' ids, SPEC.md section 4). 2^24 chunks a part: 1.6 billion records at 100 a
/// chunk, and 127 parts fit in an `int4`.
pub const PART_SEQ_STRIDE: i32 = 1 << 24;

/// One part of an entity's selection: the ids in `(after, upto]`, its chunks numbered
/// from `first_seq`. [`Part::WHOLE`] is the whole selection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Part {
    pub first_seq: i32,
    pub after: i64,
    pub upto: i64,
}

impl Part {
    /// Every id > 0 (the source's ids are serial, from 1), chunks from seq 0.
    pub const WHOLE: Part = Part {
        first_seq: 0,
        after: 0,
        upto: i64::MAX,
    };

    /// `parts` parts of about equal width over the ids `[min, max]`: part `k` numbers
    /// its chunks from `k * PART_SEQ_STRIDE`; the first starts where [`Part::WHOLE`]
    /// does and the last has no upper bound, so together they cover exactly the ids the
    /// whole would, rows added meanwhile included (and, as it, no id below 1).
    pub fn split(min: i64, max: i64, parts: i32) -> Vec<Part> {
        let parts = parts.clamp(1, 127);
        let (lo, span) = (i128::from(min) - 1, i128::from(max) - i128::from(min) + 1);
        if parts == 1 || span < i128::from(parts) {
            return vec![Part::WHOLE];
        }
        let bound = |k: i32| (lo + span * i128::from(k) / i128::from(parts)) as i64;
        (0..parts)
            .map(|k| Part {
                first_seq: k * PART_SEQ_STRIDE,
                after: if k == 0 { 0 } else { bound(k).max(0) },
                upto: if k == parts - 1 {
                    i64::MAX
                } else {
                    bound(k + 1)
                },
            })
            .collect()
    }
}

/// How [`insert_chunks`] reads a selection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Paging {
    /// A keyset page per chunk, each page its own descent of an id index: a selection
    /// read in id order (a full sync's).
    Keyset,
    /// A statement's chunks as one page of `size` × [`CHUNKS_PER_STATEMENT`] ids, cut
    /// into chunks: for a selection whose every page would read all of it again (a
    /// window's range of a time index, sorted by id for each page; a retry's error rows).
    /// Measured on dataset M, the loans of 1,000 changed repayments (996 loans, 10
    /// chunks): 4.7-7.4 ms, where page after page took 16-35 ms. Not for a full
    /// selection: numbering 100,000 ids in one statement took 126-140 ms, page after page
    /// 28-32 ms.
    OnePass,
}

/// Writes the chunks of one part of an entity inside PostgreSQL, [`CHUNKS_PER_STATEMENT`]
/// chunks a statement: pages of `page_sql` (one statement selecting one id column,
/// ascending, ids > `$1` and <= `$5`, at most `$2`; `$3` / `$4` the window's lo / hi when
/// it takes them, `$6` the entity) read as `paging` says, each chunk `size` ids (seq
/// `part.first_seq`, then the next, ...), exactly as paging from the planner would: a
/// chunk shorter than `size` (or none) is the last. The ids never come to the planner:
/// its memory does not grow with the table. Returns the chunks and the ids written.
///
/// `custom_plan`: run as PostgreSQL's unnamed statement, planned with the window's
/// values (see `source::next_ids`).
#[allow(clippy::too_many_arguments)]
pub async fn insert_chunks(
    conn: &mut PgConnection,
    sync_id: &str,
    entity: EntityKind,
    page_sql: &str,
    size: i64,
    window: &SyncWindow,
    custom_plan: bool,
    paging: Paging,
    part: Part,
) -> sqlx::Result<(i32, i64)> {
    let size = size.max(1);
    // $2: the page's limit; $7: the first chunk's seq; $8: how many chunks at most; $9:
    // the sync; $10: the chunk size.
    let chunks_sql = match paging {
        Paging::Keyset => {
            let next = page_sql.replace("$1", "g.ids[cardinality(g.ids)]");
            format!(
                "WITH RECURSIVE page (seq, ids) AS (\n\
                     SELECT $7::int4, ARRAY(\n{page_sql}\n)\n\
                     UNION ALL\n\
                     SELECT g.seq + 1, ARRAY(\n{next}\n) FROM page g \
                     WHERE cardinality(g.ids) = $10 AND g.seq + 1 < $7 + $8\n\
                 )"
            )
        }
        Paging::OnePass => format!(
            "WITH sel AS (\n\
                 SELECT s.id, (row_number() OVER (ORDER BY s.id) - 1) / $10 AS k \
                 FROM (\n{page_sql}\n) s\n\
             ), page AS (\n\
                 SELECT $7::int4 + k::int4 AS seq, array_agg(id ORDER BY id) AS ids \
                 FROM sel GROUP BY k\n\
             )"
        ),
    };
    let sql = format!(
        "{chunks_sql}, ins AS (\n\
             INSERT INTO loansync_chunk (sync_id, entity, seq, ids) \
             SELECT $9, $6, seq, ids FROM page WHERE cardinality(ids) > 0 \
             RETURNING seq, cardinality(ids) AS n, ids[cardinality(ids)] AS last\n\
         )\n\
         SELECT count(*)::int4, COALESCE(sum(n), 0)::int8, \
                (array_agg(last ORDER BY seq DESC))[1], (array_agg(n ORDER BY seq DESC))[1] \
         FROM ins"
    );
    let (mut after, mut chunks, mut ids) = (part.after, 0i32, 0i64);
    loop {
        // A part never numbers into the next part's seqs.
        let room = PART_SEQ_STRIDE - chunks;
        if room == 0 {
            return Err(sqlx::Error::Protocol(format!(
                "{entity}: more than {PART_SEQ_STRIDE} chunks in one part of the plan"
            )));
        }
        let cap = CHUNKS_PER_STATEMENT.min(room);
        let limit = match paging {
            Paging::Keyset => size,
            Paging::OnePass => size * i64::from(cap),
        };
        let (written, n, last, last_len): (i32, i64, Option<i64>, Option<i32>) =
            sqlx::query_as(sqlx::AssertSqlSafe(sql.clone()))
                .bind(after)
                .bind(limit)
                .bind(window.lo)
                .bind(window.hi)
                .bind(part.upto)
                .bind(entity.as_str())
                .bind(part.first_seq + chunks)
                .bind(cap)
                .bind(sync_id)
                .bind(size)
                .persistent(!custom_plan)
                .fetch_one(&mut *conn)
                .await?;
        chunks += written;
        ids += n;
        match last {
            // Stopped at the cap on a full page: the selection may go on.
            Some(last) if written == cap && i64::from(last_len.unwrap_or(0)) == size => {
                after = last
            }
            _ => return Ok((chunks, ids)),
        }
    }
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
    super::lifecycle::start_running(&mut *conn, sync_id, totals.chunks).await?;
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

/// Whether reading a chunk counts an attempt on it ([`start_chunk`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attempt {
    /// A delivery of the chunk job: it counts against `ETL_DELIVERY_LIMIT`.
    Count,
    /// A settle job or the failing of a chunk whose attempt was counted: it does not.
    Read,
}

/// Reads a chunk, counting the attempt as `attempt` says. `None` when the ledger has no
/// such chunk.
pub async fn start_chunk(
    pool: &PgPool,
    sync_id: &str,
    entity: EntityKind,
    seq: i32,
    attempt: Attempt,
) -> sqlx::Result<Option<ChunkState>> {
    let row: Option<StartedChunk> = sqlx::query_as(START_CHUNK)
        .bind(sync_id)
        .bind(entity.as_str())
        .bind(seq)
        .bind(i32::from(attempt == Attempt::Count))
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

#[cfg(test)]
mod tests {
    use super::{PART_SEQ_STRIDE, Part};

    /// The part of `id`, checking it is in exactly one.
    fn owner(parts: &[Part], id: i64) -> Option<usize> {
        let owners: Vec<usize> = (0..parts.len())
            .filter(|&k| id > parts[k].after && id <= parts[k].upto)
            .collect();
        assert!(
            owners.len() <= 1,
            "{id} is in parts {owners:?} of {parts:?}"
        );
        owners.first().copied()
    }

    #[test]
    fn plan_parts_cover_every_positive_id_once_and_number_apart() {
        for (min, max, n) in [
            (1, 1_000_000, 4),
            (1, 10, 3),
            (5, 8, 4),
            (7, 7, 2),
            (-20, 40, 3),
        ] {
            let parts = Part::split(min, max, n);
            assert_eq!(parts[0].after, 0, "{parts:?}");
            assert_eq!(parts.last().unwrap().upto, i64::MAX, "{parts:?}");
            // Every id the whole covers (> 0), in and well past the span, is in one part
            // and none below 1 is.
            for id in (min - 3..=max + 3).chain([max + 1_000_000, i64::MAX]) {
                let whole = id > Part::WHOLE.after; // and every id is <= WHOLE.upto
                assert_eq!(owner(&parts, id).is_some(), whole, "{id} in {parts:?}");
            }
            for (k, p) in parts.iter().enumerate() {
                assert_eq!(p.first_seq, k as i32 * PART_SEQ_STRIDE);
            }
        }
        // Parts of about equal width, in order.
        let parts = Part::split(1, 1_000_000, 4);
        assert_eq!(parts.len(), 4);
        let uppers: Vec<i64> = parts.iter().map(|p| p.upto).collect();
        assert_eq!(uppers, [250_000, 500_000, 750_000, i64::MAX]);
        // Fewer ids than parts, or one part asked: the whole.
        assert_eq!(Part::split(7, 7, 2), [Part::WHOLE]);
        assert_eq!(Part::split(1, 100, 1), [Part::WHOLE]);
        // Extreme spans neither overflow nor exceed the seq room.
        let parts = Part::split(i64::MIN, i64::MAX, 500);
        assert_eq!(parts.len(), 127);
        assert!(
            parts.windows(2).all(|w| w[1].after == w[0].upto.max(0)),
            "{parts:?}"
        );
    }
}
