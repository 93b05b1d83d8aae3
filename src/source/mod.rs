//! Reading the Django tables: which ids a sync selects ([`next_ids`], keyset pages in
//! id order, so memory never depends on the table's size), and one chunk's rows with
//! their related rows ([`load_chunk`], one query per chunk, whatever its size). The SQL
//! lives in `sql/` beside this file.

use crate::domain::{EntityKind, Record, SyncType, SyncWindow};
use crate::transform::{self, Transformed};
use sqlx::{PgConnection, PgPool};

const IDS_OFFICER: &str = include_str!("sql/ids_officer.sql");
const IDS_CUSTOMER: &str = include_str!("sql/ids_customer.sql");
const IDS_LOAN_FULL: &str = include_str!("sql/ids_loan_full.sql");
const IDS_LOAN_INCREMENTAL: &str = include_str!("sql/ids_loan_incremental.sql");
const IDS_REPAYMENT_FULL: &str = include_str!("sql/ids_repayment_full.sql");
const IDS_REPAYMENT_INCREMENTAL: &str = include_str!("sql/ids_repayment_incremental.sql");
const LOAD_OFFICER: &str = include_str!("sql/load_officer.sql");
const LOAD_CUSTOMER: &str = include_str!("sql/load_customer.sql");
const LOAD_LOAN: &str = include_str!("sql/load_loan.sql");
const LOAD_REPAYMENT: &str = include_str!("sql/load_repayment.sql");

/// One keyset page of the ids a sync selects (SPEC.md section 2): ascending, all
/// greater than `after`, at most `limit`. A full sync has no time bound; an
/// incremental one takes rows with `window.lo <= t < window.hi`.
pub async fn next_ids(
    conn: &mut PgConnection,
    entity: EntityKind,
    sync_type: SyncType,
    window: &SyncWindow,
    after: i64,
    limit: i64,
) -> Result<Vec<i64>, sqlx::Error> {
    let incremental = sync_type == SyncType::Incremental;
    let sql = match (entity, incremental) {
        (EntityKind::Officer, _) => IDS_OFFICER,
        (EntityKind::Customer, _) => IDS_CUSTOMER,
        (EntityKind::Loan, false) => IDS_LOAN_FULL,
        (EntityKind::Loan, true) => IDS_LOAN_INCREMENTAL,
        (EntityKind::Repayment, false) => IDS_REPAYMENT_FULL,
        (EntityKind::Repayment, true) => IDS_REPAYMENT_INCREMENTAL,
    };
    // The window parameters ($3, $4) are bound only to the statements that use them.
    let mut q = sqlx::query_scalar::<_, i64>(sql).bind(after).bind(limit);
    let windowed = matches!(
        (entity, incremental),
        (EntityKind::Customer, _) | (EntityKind::Loan, true) | (EntityKind::Repayment, true)
    );
    if windowed {
        // A NULL lower bound (customers on a full sync) selects without a time filter.
        let lo = incremental.then(|| {
            window
                .lo
                .unwrap_or(chrono::DateTime::<chrono::Utc>::UNIX_EPOCH)
        });
        q = q.bind(lo).bind(window.hi);
    }
    q.fetch_all(conn).await
}

/// The records of one chunk.
#[derive(Debug, Default)]
pub struct LoadedChunk {
    /// In ascending id order.
    pub records: Vec<Record>,
    /// Requested ids whose row no longer exists (deleted since planning).
    pub missing: Vec<i64>,
    /// Values sent as `null` for being NaN or infinite.
    pub warnings: u32,
}

/// Loads the rows with these ids (whatever their filter state now), with their related
/// rows, in one query, and transforms them.
pub async fn load_chunk(
    pool: &PgPool,
    entity: EntityKind,
    ids: &[i64],
) -> Result<LoadedChunk, sqlx::Error> {
    let mut out = Transformed::default();
    let mut push = |(r, w): (Record, u32)| {
        out.records.push(r);
        out.warnings += w;
    };
    match entity {
        EntityKind::Officer => {
            for row in sqlx::query_as::<_, transform::officer::OfficerRow>(LOAD_OFFICER)
                .bind(ids)
                .fetch_all(pool)
                .await?
            {
                push(transform::officer::transform(row));
            }
        }
        EntityKind::Customer => {
            for row in sqlx::query_as::<_, transform::customer::CustomerRow>(LOAD_CUSTOMER)
                .bind(ids)
                .fetch_all(pool)
                .await?
            {
                push(transform::customer::transform(row));
            }
        }
        EntityKind::Loan => {
            for row in sqlx::query_as::<_, transform::loan::LoanRow>(LOAD_LOAN)
                .bind(ids)
                .fetch_all(pool)
                .await?
            {
                push(transform::loan::transform(row));
            }
        }
        EntityKind::Repayment => {
            for row in sqlx::query_as::<_, transform::repayment::RepaymentRow>(LOAD_REPAYMENT)
                .bind(ids)
                .fetch_all(pool)
                .await?
            {
                push(transform::repayment::transform(row));
            }
        }
    }
    let missing = if out.records.len() == ids.len() {
        Vec::new()
    } else {
        let found: std::collections::HashSet<i64> = out.records.iter().map(|r| r.id).collect();
        ids.iter()
            .copied()
            .filter(|id| !found.contains(id))
            .collect()
    };
    Ok(LoadedChunk {
        records: out.records,
        missing,
        warnings: out.warnings,
    })
}
