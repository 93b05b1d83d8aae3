//! The sweep's bucket digests: which id buckets of an entity may hold something to send,
//! found in one pass over the tables instead of reading, fingerprinting and comparing
//! every record (anti-entropy by ranges, as Cassandra's and Riak's Merkle trees compare
//! ranges of keys before keys).
//!
//! A bucket is the ids `[b << BUCKET_BITS, (b + 1) << BUCKET_BITS)`. Its digest is the
//! XOR of one 64-bit hash per row version the bucket's records are built from
//! (`digest_<entity>.sql`: the entity's rows, selected or not, and every row a record
//! joins or aggregates, each hashed with the record's id and the row's `xmin`) and per
//! `loansync_delivered` row of the bucket (its id and `xmin`), XORed with [`version`] (the
//! statements the records and digests are built from). PostgreSQL writes a new row
//! version with a new `xmin` for every INSERT and UPDATE, whether it touches
//! `date_modified` or changes any value; a DELETE removes a term; a settle that writes a
//! new fingerprint, or removes one, changes the delivered term. So while a bucket's
//! digest is the one stored when a sweep last found it clean (every selected record
//! delivered with its current fingerprint, no delivered record gone), its records are
//! the ones that were compared then, and the sweep skips it.
//!
//! Why a digest stored from a statement earlier than the comparison (the planning
//! transaction is READ COMMITTED) is still safe: it is stored only when the later
//! comparison found the bucket clean. If the bucket was not clean at the digest's
//! snapshot, some row version of that snapshot was replaced or removed before the
//! comparison's (a difference does not resolve itself: a fingerprint written, a row
//! changed or deleted), and a replaced or removed version never comes back (a new
//! version takes a new transaction id), so no later state has that digest again.
//!
//! A false "unchanged" needs two different sets of versions whose 64-bit XORs agree
//! (about 2^-64 a changed bucket), or a row rewritten with the very transaction id it
//! had, 2^32 transactions later (transaction ids wrap), with nothing else in its bucket
//! written meanwhile. A dump and restore, or a `pg_repack`, gives every row a new
//! version: the next sweep compares every bucket once, as a first sweep does.

use crate::domain::EntityKind;
use sqlx::PgConnection;

/// A bucket holds the ids that agree above their lowest `BUCKET_BITS` bits (1,024 ids):
/// a changed row costs its bucket's comparison (its ids read and fingerprinted) on the
/// next sweep; a smaller bucket means more digests to compute and store.
pub const BUCKET_BITS: u32 = 10;

const ROWS_OFFICER: &str = include_str!("sql/digest_officer.sql");
const ROWS_CUSTOMER: &str = include_str!("sql/digest_customer.sql");
const ROWS_LOAN: &str = include_str!("sql/digest_loan.sql");
const ROWS_REPAYMENT: &str = include_str!("sql/digest_repayment.sql");

/// Every bucket's digest now in one slice of ids (`$3` to `$4`, whole buckets) and whether
/// it is the stored one, in one statement: the source's terms (`digest_<entity>.sql`) and
/// the delivered ones grouped by bucket and XORed with `$2` ([`version`]), fully joined
/// with `loansync_sweep_digest` (`$1` the entity). A bucket with no row now and a stored
/// digest comes back with none.
macro_rules! stale_sql {
    ($rows:literal) => {
        concat!(
            "WITH src AS (\n",
            include_str!($rows),
            "\n), cur AS (\
               SELECT b, bit_xor(h) # $2 AS x FROM (\
                 SELECT b, h FROM src WHERE b IS NOT NULL \
                 UNION ALL \
                 SELECT d.id >> 10, hashint8extended(d.id, hashint8extended(d.xmin::text::int8, 11)) \
                 FROM loansync_delivered d WHERE d.entity = $1 AND d.id BETWEEN $3 AND $4\
               ) u GROUP BY b), \
             old AS (SELECT bucket, digest FROM loansync_sweep_digest \
                     WHERE entity = $1 AND bucket BETWEEN $3 >> 10 AND $4 >> 10) \
             SELECT COALESCE(cur.b, old.bucket) AS bucket, cur.x AS digest, \
                    cur.x IS NOT DISTINCT FROM old.digest AS unchanged \
             FROM cur FULL JOIN old ON old.bucket = cur.b ORDER BY 1"
        )
    };
}

const STALE_OFFICER: &str = stale_sql!("sql/digest_officer.sql");
const STALE_CUSTOMER: &str = stale_sql!("sql/digest_customer.sql");
const STALE_LOAN: &str = stale_sql!("sql/digest_loan.sql");
const STALE_REPAYMENT: &str = stale_sql!("sql/digest_repayment.sql");

/// The last id a slice must reach: the entity's table's largest id, a delivered one's or
/// a stored bucket's last (the rows a record joins or aggregates belong, by their foreign
/// key, to an id of the entity's table). `$1` the entity.
macro_rules! top_sql {
    ($table:literal) => {
        concat!(
            "SELECT greatest((SELECT max(id)::int8 FROM ",
            $table,
            "), (SELECT max(id) FROM loansync_delivered WHERE entity = $1), \
             (SELECT (max(bucket) + 1) * 1024 - 1 FROM loansync_sweep_digest WHERE entity = $1), 0)"
        )
    };
}

/// A slice of ids, read in one statement: its buckets' digests are computed and compared
/// together. 2^20 ids (1,024 buckets) keep each statement far inside
/// `ETL_DB_STATEMENT_TIMEOUT_SECS` whatever the table's size (dataset M's 1 M repayments
/// are one slice: 125 ms); debug builds (every test) take 2 buckets, so that the tests'
/// small tables are read in several slices too.
pub const SLICE_BITS: u32 = if cfg!(debug_assertions) { 11 } else { 20 };

// A slice holds whole buckets.
const _: () = assert!(SLICE_BITS >= BUCKET_BITS);

/// Per entity, the digest statement and the statement of the last id to reach.
fn entity_statements(entity: EntityKind) -> (&'static str, &'static str) {
    match entity {
        EntityKind::Officer => (STALE_OFFICER, top_sql!("accounts_customuser")),
        EntityKind::Customer => (STALE_CUSTOMER, top_sql!("ajo_ajouser")),
        EntityKind::Loan => (STALE_LOAN, top_sql!("loans_ajoloan")),
        EntityKind::Repayment => (STALE_REPAYMENT, top_sql!("loans_ajoloanrepayment")),
    }
}

/// The statements, named (for `source::statements`).
pub(super) fn statements() -> Vec<(String, &'static str)> {
    EntityKind::ALL
        .into_iter()
        .flat_map(|e| {
            let (stale, top) = entity_statements(e);
            [
                (format!("digest {e}"), stale),
                (format!("digest top {e}"), top),
            ]
        })
        .collect()
}

/// A bucket whose digest differs from the stored one (or has none stored).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StaleBucket {
    pub bucket: i64,
    /// Its digest now; `None` when nothing is in it any more (its stored digest goes).
    pub digest: Option<i64>,
}

impl StaleBucket {
    /// The ids `(after, upto]` the bucket covers.
    pub fn ids(&self) -> (i64, i64) {
        bucket_ids(self.bucket, self.bucket)
    }
}

/// The ids `(after, upto]` that buckets `first..=last` cover.
pub fn bucket_ids(first: i64, last: i64) -> (i64, i64) {
    (
        (first << BUCKET_BITS) - 1,
        last.checked_add(1)
            .and_then(|n| n.checked_mul(1 << BUCKET_BITS))
            .map_or(i64::MAX, |n| n - 1),
    )
}

/// The bucket of an id.
pub fn bucket_of(id: i64) -> i64 {
    id >> BUCKET_BITS
}

/// What the digests are built from, as a number XORed into every digest: the statements
/// that build the records (their fingerprints) and the digests. A release that changes
/// what a record is built from changes it, and its first sweep compares every bucket.
pub fn version(entity: EntityKind) -> i64 {
    use sha2::Digest;
    let rows = match entity {
        EntityKind::Officer => ROWS_OFFICER,
        EntityKind::Customer => ROWS_CUSTOMER,
        EntityKind::Loan => ROWS_LOAN,
        EntityKind::Repayment => ROWS_REPAYMENT,
    };
    let (stale, _) = entity_statements(entity);
    let mut h = sha2::Sha256::new();
    h.update(super::record_statement(entity));
    h.update(rows);
    h.update(stale);
    let d = h.finalize();
    i64::from_le_bytes(d[..8].try_into().expect("8 bytes"))
}

/// The buckets of `entity` whose digest differs from the stored one, ascending, and how
/// many have the stored one: slice after slice of [`SLICE_BITS`] ids, from id 0 (the
/// source's ids are serial, from 1) to the last id there is.
pub async fn stale_buckets(
    conn: &mut PgConnection,
    entity: EntityKind,
) -> Result<(Vec<StaleBucket>, u64), sqlx::Error> {
    let (sql, top) = entity_statements(entity);
    let top: i64 = sqlx::query_scalar(top)
        .bind(entity.as_str())
        .fetch_one(&mut *conn)
        .await?;
    let version = version(entity);
    let mut stale = Vec::new();
    let mut unchanged = 0;
    let mut first = 0i64;
    while first <= top {
        let last = first.saturating_add((1 << SLICE_BITS) - 1);
        let rows: Vec<(i64, Option<i64>, bool)> = sqlx::query_as(sql)
            .bind(entity.as_str())
            .bind(version)
            .bind(first)
            .bind(last)
            .fetch_all(&mut *conn)
            .await?;
        for (bucket, digest, same) in rows {
            if same {
                unchanged += 1;
            } else {
                stale.push(StaleBucket { bucket, digest });
            }
        }
        first = match last.checked_add(1) {
            Some(next) => next,
            None => break,
        };
    }
    Ok((stale, unchanged))
}

/// Stores the digests of the buckets a sweep compared and found clean (`clean`: bucket
/// and digest), and removes those of the buckets it found something in (`changed`) or
/// that hold nothing now.
pub async fn store(
    conn: &mut PgConnection,
    entity: EntityKind,
    clean: &[(i64, i64)],
    removed: &[i64],
) -> Result<(), sqlx::Error> {
    if !removed.is_empty() {
        sqlx::query(
            "DELETE FROM loansync_sweep_digest WHERE entity = $1 AND bucket = ANY($2::int8[])",
        )
        .bind(entity.as_str())
        .bind(removed)
        .execute(&mut *conn)
        .await?;
    }
    if !clean.is_empty() {
        let (buckets, digests): (Vec<i64>, Vec<i64>) = clean.iter().copied().unzip();
        sqlx::query(
            "INSERT INTO loansync_sweep_digest (entity, bucket, digest) \
             SELECT $1, b, d FROM unnest($2::int8[], $3::int8[]) AS t (b, d) \
             ON CONFLICT (entity, bucket) DO UPDATE SET digest = EXCLUDED.digest, verified_at = now()",
        )
        .bind(entity.as_str())
        .bind(&buckets)
        .bind(&digests)
        .execute(&mut *conn)
        .await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_cover_the_ids_without_gaps() {
        assert_eq!(bucket_ids(0, 0), (-1, 1023));
        assert_eq!(bucket_ids(1, 2), (1023, 3071));
        assert_eq!(bucket_of(1023), 0);
        assert_eq!(bucket_of(1024), 1);
        let last = bucket_of(i64::MAX);
        assert_eq!(bucket_ids(last, last).1, i64::MAX);
        for id in [1i64, 1023, 1024, 5000, 1 << 40] {
            let (after, upto) = StaleBucket {
                bucket: bucket_of(id),
                digest: None,
            }
            .ids();
            assert!(after < id && id <= upto, "{id}");
        }
    }

    #[test]
    fn every_statement_buckets_by_the_same_bits_and_each_version_differs() {
        let shift = format!(">> {BUCKET_BITS}");
        for e in EntityKind::ALL {
            let (sql, top) = entity_statements(e);
            // The source's terms, the delivered ones and the stored buckets, each shifted
            // (or multiplied) by the same bits, each read within the slice.
            assert!(sql.matches(&shift).count() >= 4, "{e}: {sql}");
            assert_eq!(
                sql.matches(">>").count(),
                sql.matches(&shift).count(),
                "{e}"
            );
            assert!(sql.matches("BETWEEN $3").count() >= 3, "{e}: {sql}");
            assert!(top.contains(&format!("* {} - 1", 1 << BUCKET_BITS)), "{e}");
            for s in [sql, top] {
                assert!(!s.contains(';'), "{e}: one statement");
            }
        }
        let versions: std::collections::BTreeSet<i64> =
            EntityKind::ALL.into_iter().map(version).collect();
        assert_eq!(versions.len(), 4);
    }
}
