//! Reading the Django tables: which ids a sync selects ([`next_ids`], keyset pages in
//! id order, so memory never depends on the table's size), and one chunk's rows with
//! their related rows ([`load_chunk`]: ONE query per chunk, whatever its size and the
//! entity: related rows and aggregates are joined in SQL). The SQL lives in `sql/`
//! beside this file, one static statement per entity and sync type.
//!
//! Every statement orders by the table's own `id` column (`ORDER BY t.id`), never by the
//! `id::int8` output column: ordering by the cast would defeat the primary key index and
//! sort the whole selection on every keyset page.
//!
//! Never-send columns (SPEC.md section 5) are never selected: the `load_*.sql`
//! statements name their columns one by one, and customers' BVN / NIN only leave the
//! database as the booleans `has_bvn` / `has_nin`.

use crate::domain::{EntityKind, Record, SyncType, SyncWindow};
use crate::transform::{self, Transformed};
use sqlx::{PgConnection, PgPool};

const IDS_OFFICER: &str = include_str!("sql/ids_officer.sql");
const IDS_CUSTOMER_FULL: &str = include_str!("sql/ids_customer_full.sql");
const IDS_CUSTOMER_INCREMENTAL: &str = include_str!("sql/ids_customer_incremental.sql");
const IDS_LOAN_FULL: &str = include_str!("sql/ids_loan_full.sql");
const IDS_LOAN_INCREMENTAL: &str = include_str!("sql/ids_loan_incremental.sql");
const IDS_REPAYMENT_FULL: &str = include_str!("sql/ids_repayment_full.sql");
const IDS_REPAYMENT_INCREMENTAL: &str = include_str!("sql/ids_repayment_incremental.sql");
const LOAD_OFFICER: &str = include_str!("sql/load_officer.sql");
const LOAD_CUSTOMER: &str = include_str!("sql/load_customer.sql");
const LOAD_LOAN: &str = include_str!("sql/load_loan.sql");
const LOAD_REPAYMENT: &str = include_str!("sql/load_repayment.sql");

/// The id-enumeration statement of an entity and sync type, and whether it takes the
/// window (`$3` = lo, NULL for no lower bound; `$4` = hi) after `$1` = after, `$2` = limit.
fn ids_sql(entity: EntityKind, sync_type: SyncType) -> (&'static str, bool) {
    match (entity, sync_type) {
        // Officers have no modification time: incremental selects the same set as full.
        (EntityKind::Officer, _) => (IDS_OFFICER, false),
        (EntityKind::Customer, SyncType::Full) => (IDS_CUSTOMER_FULL, false),
        (EntityKind::Customer, SyncType::Incremental) => (IDS_CUSTOMER_INCREMENTAL, true),
        (EntityKind::Loan, SyncType::Full) => (IDS_LOAN_FULL, false),
        (EntityKind::Loan, SyncType::Incremental) => (IDS_LOAN_INCREMENTAL, true),
        (EntityKind::Repayment, SyncType::Full) => (IDS_REPAYMENT_FULL, false),
        (EntityKind::Repayment, SyncType::Incremental) => (IDS_REPAYMENT_INCREMENTAL, true),
    }
}

/// Keyset page of ids in the sync's selection, ascending, ids > after.
///
/// The selections of SPEC.md section 2: a full sync has no time bound at all (neither
/// `lo` nor `hi`); an incremental one takes rows with `window.lo <= t < window.hi`
/// (a `None` lo is no lower bound): customers by `date_modified`; loans by their own
/// `date_modified`, a schedule row's `date_modified`, or a repayment's `date_created` or
/// `date_modified` (their aggregates changed); repayments by `date_created` or
/// `date_modified`. At most `limit` ids; an empty page means the selection is exhausted.
///
/// A windowed statement is run unprepared (`persistent(false)`: PostgreSQL's unnamed
/// statement, planned with the window's values every time). Whether a page is best read
/// from the time indexes (a narrow window) or by walking the id index with the window as
/// a filter (a wide one: the first sync's lookback, a long backfill) depends on those
/// values; a cached generic plan cannot see them and, on dataset M, read the whole
/// 30-day window for every page (0.55 s a page instead of 1.4 ms). Planning costs
/// about 1 ms a page.
pub async fn next_ids(
    conn: &mut PgConnection,
    entity: EntityKind,
    sync_type: SyncType,
    window: &SyncWindow,
    after: i64,
    limit: i64,
) -> Result<Vec<i64>, sqlx::Error> {
    if limit <= 0 {
        return Ok(Vec::new());
    }
    let (sql, windowed) = ids_sql(entity, sync_type);
    let mut q = sqlx::query_scalar::<_, i64>(sql).bind(after).bind(limit);
    if windowed {
        q = q.bind(window.lo).bind(window.hi).persistent(false);
    }
    q.fetch_all(conn).await
}

/// The records of one chunk.
#[derive(Debug, Default)]
pub struct LoadedChunk {
    /// In ascending id order.
    pub records: Vec<Record>,
    /// Requested ids whose row no longer exists (deleted since planning), ascending.
    pub missing: Vec<i64>,
    /// Values sent as `null` for being NaN or infinite.
    pub warnings: u32,
}

/// Loads the rows with these ids (whatever their filter state now), with their related
/// rows, and transforms them.
///
/// Exactly one query per call, whatever the entity and the number of ids: the ids are
/// bound as one array (`= ANY($1::int8[])`) and related rows are joined or aggregated
/// in the same statement. An empty `ids` runs no query.
pub async fn load_chunk(
    pool: &PgPool,
    entity: EntityKind,
    ids: &[i64],
) -> Result<LoadedChunk, sqlx::Error> {
    if ids.is_empty() {
        return Ok(LoadedChunk::default());
    }
    let out = match entity {
        EntityKind::Officer => {
            let rows = sqlx::query_as::<_, transform::officer::OfficerRow>(LOAD_OFFICER)
                .bind(ids)
                .fetch_all(pool)
                .await?;
            collect(rows, transform::officer::transform)
        }
        EntityKind::Customer => {
            let rows = sqlx::query_as::<_, transform::customer::CustomerRow>(LOAD_CUSTOMER)
                .bind(ids)
                .fetch_all(pool)
                .await?;
            collect(rows, transform::customer::transform)
        }
        EntityKind::Loan => {
            let rows = sqlx::query_as::<_, transform::loan::LoanRow>(LOAD_LOAN)
                .bind(ids)
                .fetch_all(pool)
                .await?;
            collect(rows, transform::loan::transform)
        }
        EntityKind::Repayment => {
            let rows = sqlx::query_as::<_, transform::repayment::RepaymentRow>(LOAD_REPAYMENT)
                .bind(ids)
                .fetch_all(pool)
                .await?;
            collect(rows, transform::repayment::transform)
        }
    };
    let missing = missing_ids(ids, &out.records);
    Ok(LoadedChunk {
        records: out.records,
        missing,
        warnings: out.warnings,
    })
}

fn collect<R>(rows: Vec<R>, f: impl Fn(R) -> (Record, u32)) -> Transformed {
    let mut out = Transformed {
        records: Vec::with_capacity(rows.len()),
        warnings: 0,
    };
    for row in rows {
        let (record, warnings) = f(row);
        out.records.push(record);
        out.warnings += warnings;
    }
    // The SQL orders by id; keep the promise even if a statement is edited carelessly.
    if !out.records.is_sorted_by_key(|r| r.id) {
        out.records.sort_by_key(|r| r.id);
    }
    out
}

/// The requested ids with no record, ascending and deduplicated.
fn missing_ids(requested: &[i64], records: &[Record]) -> Vec<i64> {
    let mut missing: Vec<i64> = requested
        .iter()
        .copied()
        .filter(|id| records.binary_search_by_key(id, |r| r.id).is_err())
        .collect();
    missing.sort_unstable();
    missing.dedup();
    missing
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(id: i64) -> Record {
        Record {
            id,
            json: serde_json::value::to_raw_value(&id).unwrap(),
        }
    }

    #[test]
    fn source_missing_ids_are_the_requested_ids_without_a_record() {
        let records = [rec(2), rec(5), rec(9)];
        assert_eq!(missing_ids(&[9, 7, 2, 7, 1], &records), vec![1, 7]);
        assert!(missing_ids(&[5, 2], &records).is_empty());
    }

    /// The statement without its `--` comment lines.
    fn code(sql: &str) -> String {
        sql.lines()
            .filter(|l| !l.trim_start().starts_with("--"))
            .collect::<Vec<_>>()
            .join("\n")
    }

    #[test]
    fn source_every_entity_and_sync_type_has_one_statement() {
        for e in EntityKind::ALL {
            for t in [SyncType::Full, SyncType::Incremental] {
                let (sql, windowed) = ids_sql(e, t);
                let sql = code(sql);
                assert_eq!(sql.matches(';').count(), 0, "{e} {t}: one statement");
                assert_eq!(sql.contains("$4"), windowed, "{e} {t}");
                assert!(
                    sql.contains("id > $1") && sql.contains("LIMIT $2"),
                    "{e} {t}"
                );
                // Full syncs are never bounded by time.
                if t == SyncType::Full {
                    assert!(!sql.contains("date_"), "{e} full has no time filter");
                }
            }
        }
        assert!(!ids_sql(EntityKind::Officer, SyncType::Incremental).1);
        for sql in [LOAD_OFFICER, LOAD_CUSTOMER, LOAD_LOAN, LOAD_REPAYMENT] {
            let sql = code(sql);
            assert_eq!(sql.matches(';').count(), 0);
            assert!(sql.contains("= ANY($1::int8[])"));
            assert!(!sql.contains("ORDER BY id"));
        }
    }
}
