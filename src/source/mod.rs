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
//! Never-send columns (SPEC.md section 5) are never selected: the `rows_*.sql`
//! statements name their columns one by one, and customers' BVN / NIN only leave the
//! database as the booleans `has_bvn` / `has_nin`.

pub mod columns;
pub mod digest;

use crate::domain::{EntityKind, Record, SyncType, SyncWindow};
use crate::transform::{self, Transformed};
use sqlx::postgres::PgRow;
use sqlx::{PgConnection, PgPool};

const IDS_OFFICER: &str = include_str!("sql/ids_officer.sql");
const IDS_CUSTOMER_FULL: &str = include_str!("sql/ids_customer_full.sql");
const IDS_CUSTOMER_INCREMENTAL: &str = include_str!("sql/ids_customer_incremental.sql");
const IDS_LOAN_FULL: &str = include_str!("sql/ids_loan_full.sql");
const IDS_LOAN_INCREMENTAL: &str = include_str!("sql/ids_loan_incremental.sql");
const IDS_REPAYMENT_FULL: &str = include_str!("sql/ids_repayment_full.sql");
const IDS_REPAYMENT_INCREMENTAL: &str = include_str!("sql/ids_repayment_incremental.sql");

/// One chunk's rows: `rows_<entity>.sql` with the chunk's ids, in id order. Their
/// fingerprints are computed by loansync ([`fingerprint`]) and carried by the records.
macro_rules! load_sql {
    ($rows:literal, $alias:literal) => {
        concat!(
            "SELECT x.* FROM (\n",
            include_str!($rows),
            "WHERE ",
            $alias,
            ".id = ANY($1::int8[])\n) x\nORDER BY x.id"
        )
    };
}

/// One page of a sweep, in one statement (one snapshot): the rows now of the page's ids
/// (`$4`, the full sync's selection in `($1, $2]`), fully joined with what was delivered
/// in `($1, $2]` (`$3` the entity). Each output row is the source row (all NULL when the
/// id is gone) followed by the delivered `d_id` and `d_fingerprint` (NULL when never
/// delivered); [`sweep_page`] fingerprints the source columns and compares.
macro_rules! sweep_sql {
    ($rows:literal, $alias:literal) => {
        concat!(
            "WITH src AS (\n",
            include_str!($rows),
            "WHERE ",
            $alias,
            ".id = ANY($4::int8[])\n), \
             dl AS (SELECT d.id, d.fingerprint FROM loansync_delivered d \
                    WHERE d.entity = $3 AND d.id > $1 AND d.id <= $2) \
             SELECT s.*, dl.id AS d_id, dl.fingerprint AS d_fingerprint \
             FROM src s FULL JOIN dl ON dl.id = s.id ORDER BY COALESCE(s.id, dl.id)"
        )
    };
}

/// The fingerprint of a record: SHA-256, cut to 16 bytes (a uuid), of the values of the
/// columns it is built from (`rows_*.sql`, the first `columns` of `row`) exactly as
/// PostgreSQL sent them (binary format: a float is its 8 bytes, a timestamp its
/// microseconds, whatever the session's `TimeZone` or `extra_float_digits`), each
/// preceded by a NULL marker and its length. The same statement text feeds the chunk
/// loader ([`load_chunk`]) and the sweep ([`sweep_page`]), so a record's fingerprint at
/// delivery and now compare equal exactly when nothing it is built from changed.
/// Computed here rather than with `md5(row::text)` in the statement: turning every
/// column to text cost PostgreSQL (the lending application's own database) 8 µs per
/// repayment and 12 µs per loan; hashing the bytes costs loansync well under 1 µs.
/// Never-send columns are not selected, so they are not in it either.
///
/// The marked values are laid end to end in one buffer and hashed at once: three small
/// `update`s per column cost more than the hashing itself (3.5 % of a worker's CPU).
pub fn fingerprint(row: &PgRow, columns: usize) -> Result<uuid::Uuid, sqlx::Error> {
    use sha2::Digest;
    use sqlx::{Row, ValueRef};
    let mut buf = Vec::with_capacity(1024);
    for i in 0..columns {
        let value = row.try_get_raw(i)?;
        if value.is_null() {
            buf.push(0u8);
        } else {
            let bytes = value.as_bytes().map_err(sqlx::Error::Decode)?;
            buf.push(1u8);
            buf.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
            buf.extend_from_slice(bytes);
        }
    }
    let digest = sha2::Sha256::digest(&buf);
    let mut out = [0u8; 16];
    out.copy_from_slice(&digest[..16]);
    Ok(uuid::Uuid::from_bytes(out))
}

const LOAD_OFFICER: &str = load_sql!("sql/rows_officer.sql", "u");
const LOAD_CUSTOMER: &str = load_sql!("sql/rows_customer.sql", "c");
const LOAD_LOAN: &str = load_sql!("sql/rows_loan.sql", "l");
const LOAD_REPAYMENT: &str = load_sql!("sql/rows_repayment.sql", "p");
const SWEEP_OFFICER: &str = sweep_sql!("sql/rows_officer.sql", "u");
const SWEEP_CUSTOMER: &str = sweep_sql!("sql/rows_customer.sql", "c");
const SWEEP_LOAN: &str = sweep_sql!("sql/rows_loan.sql", "l");
const SWEEP_REPAYMENT: &str = sweep_sql!("sql/rows_repayment.sql", "p");

/// Every statement that reads the source tables, named: the id enumerations, the chunk
/// loaders, the sweep's pages and the planner's id span. What `columns::SOURCE_COLUMNS`
/// must cover (the integration tests prepare each against the fixture schema).
pub fn statements() -> Vec<(String, &'static str)> {
    let mut out = Vec::new();
    for e in EntityKind::ALL {
        for t in [SyncType::Full, SyncType::Incremental] {
            out.push((format!("ids {e} {t}"), ids_sql(e, t).0));
        }
        let (load, sweep) = match e {
            EntityKind::Officer => (LOAD_OFFICER, SWEEP_OFFICER),
            EntityKind::Customer => (LOAD_CUSTOMER, SWEEP_CUSTOMER),
            EntityKind::Loan => (LOAD_LOAN, SWEEP_LOAN),
            EntityKind::Repayment => (LOAD_REPAYMENT, SWEEP_REPAYMENT),
        };
        out.push((format!("load {e}"), load));
        out.push((format!("sweep {e}"), sweep));
        out.push((format!("id span {e}"), id_span_sql(e)));
    }
    out.extend(digest::statements());
    out
}

/// The statement a record of `entity` is built from (its chunk loader's).
fn record_statement(entity: EntityKind) -> &'static str {
    match entity {
        EntityKind::Officer => LOAD_OFFICER,
        EntityKind::Customer => LOAD_CUSTOMER,
        EntityKind::Loan => LOAD_LOAN,
        EntityKind::Repayment => LOAD_REPAYMENT,
    }
}

/// The id-enumeration statement of an entity and sync type, and whether it takes the
/// window (`$3` = lo, NULL for no lower bound; `$4` = hi) after `$1` = after, `$2` = limit;
/// `$5` is the last id it may select (the upper end of a part of the plan).
/// One keyset page; the planner writes the chunks of a sync from it, page after page in
/// one statement (`ledger::plan::insert_chunks`).
pub fn ids_sql(entity: EntityKind, sync_type: SyncType) -> (&'static str, bool) {
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

/// The lowest and highest id in an entity's source table (`None` when it is empty): the
/// planner splits a large full selection into parts of about equal id width
/// (`ledger::plan::Part::split`). Two reads of the primary key index.
pub async fn id_span(
    conn: &mut PgConnection,
    entity: EntityKind,
) -> Result<Option<(i64, i64)>, sqlx::Error> {
    let (min, max): (Option<i64>, Option<i64>) =
        sqlx::query_as(id_span_sql(entity)).fetch_one(conn).await?;
    Ok(min.zip(max))
}

fn id_span_sql(entity: EntityKind) -> &'static str {
    match entity {
        EntityKind::Officer => "SELECT min(id)::int8, max(id)::int8 FROM accounts_customuser",
        EntityKind::Customer => "SELECT min(id)::int8, max(id)::int8 FROM ajo_ajouser",
        EntityKind::Loan => "SELECT min(id)::int8, max(id)::int8 FROM loans_ajoloan",
        EntityKind::Repayment => "SELECT min(id)::int8, max(id)::int8 FROM loans_ajoloanrepayment",
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
    next_ids_within(conn, entity, sync_type, window, after, limit, i64::MAX).await
}

/// [`next_ids`] of the ids up to `upto` (inclusive).
pub async fn next_ids_within(
    conn: &mut PgConnection,
    entity: EntityKind,
    sync_type: SyncType,
    window: &SyncWindow,
    after: i64,
    limit: i64,
    upto: i64,
) -> Result<Vec<i64>, sqlx::Error> {
    if limit <= 0 {
        return Ok(Vec::new());
    }
    let (sql, windowed) = ids_sql(entity, sync_type);
    // $3 / $4 are bound (typed) whether the statement reads them or not: $5, the last id
    // of a part of the plan (or of a sweep's bucket), comes after them.
    sqlx::query_scalar::<_, i64>(sql)
        .bind(after)
        .bind(limit)
        .bind(window.lo)
        .bind(window.hi)
        .bind(upto)
        .persistent(!windowed)
        .fetch_all(conn)
        .await
}

/// The records of one chunk.
#[derive(Debug, Default)]
pub struct LoadedChunk {
    /// In ascending id order, each with its fingerprint (see [`fingerprint`]): written
    /// to `loansync_delivered` when the API accepts the record.
    pub records: Vec<Record>,
    /// Requested ids whose row no longer exists (deleted since planning), ascending.
    pub missing: Vec<i64>,
    /// Values sent as `null` for being NaN or infinite.
    pub warnings: u32,
}

impl LoadedChunk {
    /// The fingerprint loaded with the record `id`.
    pub fn fingerprint_of(&self, id: i64) -> Option<uuid::Uuid> {
        self.records
            .binary_search_by_key(&id, |r| r.id)
            .ok()
            .and_then(|i| self.records.get(i))
            .map(|r| r.fingerprint)
    }

    /// The change time (Unix seconds) loaded with the record `id`: the newest of the
    /// times that select it (`changed_at` of `rows_*.sql`); `None` for officers.
    pub fn changed_at_of(&self, id: i64) -> Option<f64> {
        self.records
            .binary_search_by_key(&id, |r| r.id)
            .ok()
            .and_then(|i| self.records.get(i))
            .and_then(|r| r.changed_at)
    }

    /// Adds another load's records (the one-by-one loading of a chunk), keeping them in
    /// id order.
    pub fn extend(&mut self, other: LoadedChunk) {
        self.records.extend(other.records);
        if !self.records.is_sorted_by_key(|r| r.id) {
            self.records.sort_by_key(|r| r.id);
        }
        self.missing.extend(other.missing);
        self.warnings += other.warnings;
    }
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
            load_rows(pool, LOAD_OFFICER, ids, transform::officer::transform).await?
        }
        EntityKind::Customer => {
            load_rows(pool, LOAD_CUSTOMER, ids, transform::customer::transform).await?
        }
        EntityKind::Loan => load_rows(pool, LOAD_LOAN, ids, transform::loan::transform).await?,
        EntityKind::Repayment => {
            load_rows(pool, LOAD_REPAYMENT, ids, transform::repayment::transform).await?
        }
    };
    let missing = missing_ids(ids, &out.records);
    Ok(LoadedChunk {
        records: out.records,
        missing,
        warnings: out.warnings,
    })
}

/// Runs one chunk's statement: the rows (decoded as `R`), transformed, each record
/// carrying the fingerprint of its row.
async fn load_rows<R>(
    pool: &PgPool,
    sql: &'static str,
    ids: &[i64],
    f: impl Fn(R) -> (Record, u32),
) -> Result<Transformed, sqlx::Error>
where
    R: for<'r> sqlx::FromRow<'r, sqlx::postgres::PgRow>,
{
    use sqlx::Row;
    let rows = sqlx::query(sql).bind(ids).fetch_all(pool).await?;
    let mut decoded = Vec::with_capacity(rows.len());
    for row in &rows {
        // The last column is `changed_at`, not part of the record (see `rows_*.sql`).
        let last = row.len() - 1;
        let changed_at: Option<f64> = row.try_get(last)?;
        decoded.push((fingerprint(row, last)?, changed_at, R::from_row(row)?));
    }
    Ok(collect(decoded, f))
}

/// What one page of a sweep found (see [`sweep_page`]), or of any other selection
/// compared with what was delivered ([`compare_page`]).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SweepPage {
    /// Selected ids whose fingerprint differs from the delivered one, or that were never
    /// delivered: to be sent. Ascending.
    pub changed: Vec<i64>,
    /// Of [`SweepPage::changed`], the ids never delivered (no `loansync_delivered` row).
    /// Ascending.
    pub new: Vec<i64>,
    /// Selected ids whose fingerprint is the delivered one: a sweep skips them. Ascending.
    pub unchanged: Vec<i64>,
    /// Delivered ids that are gone from the source or no longer selected. Ascending.
    pub gone: Vec<i64>,
    /// Where the page ended (inclusive): the next page starts after it. `None` when this
    /// was the last page (it covered every id above `after`).
    pub last: Option<i64>,
}

/// One keyset page of a sweep: the next `limit` ids of the full sync's selection after
/// `after`, their fingerprints computed now (set-based, one statement) and compared with
/// `loansync_delivered` over the same id range ([`compare_page`]). The last page's range
/// is open above, so that delivered ids above the source's largest one are found gone too.
pub async fn sweep_page(
    conn: &mut PgConnection,
    entity: EntityKind,
    window: &SyncWindow,
    after: i64,
    limit: i64,
) -> Result<SweepPage, sqlx::Error> {
    sweep_page_within(conn, entity, window, after, limit, i64::MAX).await
}

/// [`sweep_page`] of the ids up to `upto` (inclusive): the page's range is `(after, upto]`
/// when it is the last page of that range.
pub async fn sweep_page_within(
    conn: &mut PgConnection,
    entity: EntityKind,
    window: &SyncWindow,
    after: i64,
    limit: i64,
    upto: i64,
) -> Result<SweepPage, sqlx::Error> {
    let ids = next_ids_within(
        &mut *conn,
        entity,
        SyncType::Full,
        window,
        after,
        limit,
        upto,
    )
    .await?;
    compare_page_within(conn, entity, after, &ids, limit, upto).await
}

/// Compares `ids`, one keyset page of a selection ([`next_ids`]: ascending, all above
/// `after`, a full page when it holds `limit`), with `loansync_delivered`: the rows now,
/// fingerprinted as the chunk loader does, fully joined with the delivered ids in the
/// page's range (`(after, last]`; open above for the last page), in one statement (one
/// snapshot). [`SweepPage::gone`] is meaningful for the full selection only (a sweep's):
/// for a narrower one it also holds the delivered ids in the range it did not select.
pub async fn compare_page(
    conn: &mut PgConnection,
    entity: EntityKind,
    after: i64,
    ids: &[i64],
    limit: i64,
) -> Result<SweepPage, sqlx::Error> {
    compare_page_within(conn, entity, after, ids, limit, i64::MAX).await
}

/// [`compare_page`] of a selection's ids up to `upto`: the last page's range is
/// `(after, upto]`.
pub async fn compare_page_within(
    conn: &mut PgConnection,
    entity: EntityKind,
    after: i64,
    ids: &[i64],
    limit: i64,
    upto: i64,
) -> Result<SweepPage, sqlx::Error> {
    use sqlx::Row;
    let last = match ids.last() {
        Some(&last) if ids.len() as i64 >= limit => Some(last),
        _ => None,
    };
    let sql = match entity {
        EntityKind::Officer => SWEEP_OFFICER,
        EntityKind::Customer => SWEEP_CUSTOMER,
        EntityKind::Loan => SWEEP_LOAN,
        EntityKind::Repayment => SWEEP_REPAYMENT,
    };
    let rows = sqlx::query(sql)
        .bind(after)
        .bind(last.unwrap_or(upto))
        .bind(entity.as_str())
        .bind(ids)
        .fetch_all(&mut *conn)
        .await?;
    let mut page = SweepPage {
        last,
        ..SweepPage::default()
    };
    for row in rows {
        // The source's columns (the last, `changed_at`, not fingerprinted), then `d_id`
        // and `d_fingerprint`.
        let columns = row.len() - 2;
        let id: Option<i64> = row.try_get(0)?;
        let delivered: Option<uuid::Uuid> = row.try_get(columns + 1)?;
        match id {
            None => page.gone.push(row.try_get(columns)?),
            Some(id) if delivered != Some(fingerprint(&row, columns - 1)?) => {
                page.changed.push(id);
                if delivered.is_none() {
                    page.new.push(id);
                }
            }
            Some(id) => page.unchanged.push(id),
        }
    }
    Ok(page)
}

/// Transforms decoded rows, each with the fingerprint of its row, into records.
fn collect<R>(
    rows: Vec<(uuid::Uuid, Option<f64>, R)>,
    f: impl Fn(R) -> (Record, u32),
) -> Transformed {
    let mut out = Transformed {
        records: Vec::with_capacity(rows.len()),
        warnings: 0,
    };
    for (fingerprint, changed_at, row) in rows {
        let (mut record, warnings) = f(row);
        record.fingerprint = fingerprint;
        record.changed_at = changed_at;
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
            fingerprint: uuid::Uuid::nil(),
            changed_at: None,
            json: crate::domain::RecordJson::encode(&id).unwrap(),
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
            assert!(
                !sql.contains("md5("),
                "fingerprints are computed by loansync"
            );
            // No ordering by the output column (aggregates may add rows in id order).
            assert!(
                !sql.lines()
                    .any(|l| l.trim_start().starts_with("ORDER BY id")),
                "{sql}"
            );
        }
        for sql in [SWEEP_OFFICER, SWEEP_CUSTOMER, SWEEP_LOAN, SWEEP_REPAYMENT] {
            let sql = code(sql);
            assert_eq!(sql.matches(';').count(), 0);
            assert!(sql.contains("= ANY($4::int8[])"));
            assert!(sql.contains("dl.id AS d_id, dl.fingerprint AS d_fingerprint"));
        }
    }
}
