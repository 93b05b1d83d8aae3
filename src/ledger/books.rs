//! The books of a sync, verified at finalize rather than assumed: for every entity,
//! `success + failed == total` (the history's counters, just set from the chunk rows,
//! against the plan's total), and the error rows written for the sync are one per failed
//! record, each for a record of the sync's chunks. A sync failed fast (rejected
//! credentials) has its aborted chunks' records failed without error rows; a retry sync
//! updates the rows of the syncs that first failed (SPEC.md section 3): for those, the
//! error rows are not compared, only the counts.
//!
//! A mismatch does not stop the finalize (the sync ends with the status its counts give,
//! its watermarks moved as usual): it is logged at error level with the sync id, written
//! in the history's `error_message`, and recorded in `loansync_sync.books_unbalanced`,
//! which `etl_books_unbalanced_total{entity}` counts at scrape time.

use crate::domain::EntityKind;
use sqlx::PgConnection;
use std::sync::LazyLock;

/// One entity's books of a sync that did not balance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unbalanced {
    pub entity: EntityKind,
    /// The history's `total_*`: records planned.
    pub planned: i64,
    pub succeeded: i64,
    pub failed: i64,
    /// Records failed with an error row expected (all failed but an aborted chunk's);
    /// `None` when error rows are not compared (a retry sync).
    pub expected_error_rows: Option<i64>,
    /// Distinct records with an error row of this sync.
    pub error_rows: i64,
    /// Of those, records that are in none of the sync's chunks that failed records.
    pub stray_error_rows: i64,
}

impl std::fmt::Display for Unbalanced {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: {} planned, {} succeeded + {} failed",
            self.entity, self.planned, self.succeeded, self.failed
        )?;
        if let Some(expected) = self.expected_error_rows {
            write!(
                f,
                ", error rows for {} records (expected {expected})",
                self.error_rows
            )?;
        }
        if self.stray_error_rows > 0 {
            write!(
                f,
                ", {} of them for records not in the sync",
                self.stray_error_rows
            )?;
        }
        Ok(())
    }
}

/// Per entity: the history's total, success, failed; the failed records of chunks
/// that were not aborted; the distinct records with an error row of this sync. $1 the
/// sync id.
static COUNTS_SQL: LazyLock<String> = LazyLock::new(|| {
    let values: Vec<String> = EntityKind::ALL
        .iter()
        .map(|e| {
            let c = e.history_columns();
            format!(
                "('{}', h.{}::int8, h.{}::int8, h.{}::int8)",
                e.as_str(),
                c.total,
                c.success,
                c.failed
            )
        })
        .collect();
    format!(
        "WITH h AS (SELECT * FROM etl_folder_etlsynchistory WHERE sync_id = $1), \
         c AS (SELECT entity, coalesce(sum(failed) FILTER (WHERE outcome IS DISTINCT FROM 'aborted'), 0)::int8 AS failed \
               FROM loansync_chunk WHERE sync_id = $1 AND settled_at IS NOT NULL GROUP BY entity), \
         r AS (SELECT entity_type AS entity, count(DISTINCT entity_id)::int8 AS n \
               FROM etl_folder_etlsyncerror WHERE sync_history_id = (SELECT id FROM h) GROUP BY entity_type) \
         SELECT v.entity, v.total, v.success, v.failed, coalesce(c.failed, 0), coalesce(r.n, 0) \
         FROM h CROSS JOIN LATERAL (VALUES {}) v (entity, total, success, failed) \
         LEFT JOIN c ON c.entity = v.entity LEFT JOIN r ON r.entity = v.entity",
        values.join(", ")
    )
});

/// The distinct records with an error row of the sync (history id $2) and entity $3 that
/// are in none of its chunks that failed records ($1 the sync id). Run only when there
/// are error rows; it reads the id lists of the chunks with failures only, not the whole
/// sync's.
const STRAY_SQL: &str = "\
WITH ids AS (SELECT DISTINCT unnest(ids)::text AS id FROM loansync_chunk \
             WHERE sync_id = $1 AND entity = $3 AND failed > 0), \
     e AS (SELECT DISTINCT entity_id FROM etl_folder_etlsyncerror WHERE sync_history_id = $2 AND entity_type = $3) \
SELECT count(*)::int8 FROM e LEFT JOIN ids ON ids.id = e.entity_id WHERE ids.id IS NULL";

/// The entities whose books do not balance, in the caller's transaction (the finalize,
/// after the counters were set from the chunk rows). `compare_error_rows`: false for a
/// retry sync.
pub async fn verify(
    conn: &mut PgConnection,
    sync_id: &str,
    compare_error_rows: bool,
) -> sqlx::Result<Vec<Unbalanced>> {
    let rows: Vec<(String, i64, i64, i64, i64, i64)> = sqlx::query_as(COUNTS_SQL.as_str())
        .bind(sync_id)
        .fetch_all(&mut *conn)
        .await?;
    let history_id: Option<i32> = if rows.iter().any(|r| r.5 > 0) {
        sqlx::query_scalar("SELECT id FROM etl_folder_etlsynchistory WHERE sync_id = $1")
            .bind(sync_id)
            .fetch_optional(&mut *conn)
            .await?
    } else {
        None
    };
    let mut out = Vec::new();
    for (entity, planned, succeeded, failed, expected, error_rows) in rows {
        let entity: EntityKind = entity
            .parse()
            .map_err(|e: crate::domain::UnknownEntity| sqlx::Error::Decode(e.to_string().into()))?;
        let stray_error_rows = match history_id {
            Some(id) if error_rows > 0 => {
                sqlx::query_scalar(STRAY_SQL)
                    .bind(sync_id)
                    .bind(id)
                    .bind(entity.as_str())
                    .fetch_one(&mut *conn)
                    .await?
            }
            _ => 0,
        };
        let rows_off = compare_error_rows && (error_rows != expected || stray_error_rows > 0);
        if succeeded + failed != planned || rows_off {
            out.push(Unbalanced {
                entity,
                planned,
                succeeded,
                failed,
                expected_error_rows: compare_error_rows.then_some(expected),
                error_rows,
                stray_error_rows,
            });
        }
    }
    Ok(out)
}

/// What the history's `error_message` gets when the books did not balance.
pub fn message(unbalanced: &[Unbalanced]) -> Option<String> {
    (!unbalanced.is_empty()).then(|| {
        let each: Vec<String> = unbalanced.iter().map(Unbalanced::to_string).collect();
        format!(
            "books unbalanced at finalize ({}); see loansync's log for this sync id",
            each.join("; ")
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unbalanced_books_are_said_with_their_numbers() {
        let u = Unbalanced {
            entity: EntityKind::Loan,
            planned: 10,
            succeeded: 7,
            failed: 2,
            expected_error_rows: Some(2),
            error_rows: 1,
            stray_error_rows: 0,
        };
        assert_eq!(
            u.to_string(),
            "loan: 10 planned, 7 succeeded + 2 failed, error rows for 1 records (expected 2)"
        );
        let m = message(&[u]).unwrap();
        assert!(
            m.starts_with("books unbalanced at finalize (loan: 10 planned"),
            "{m}"
        );
        assert_eq!(message(&[]), None);
        let retry = Unbalanced {
            entity: EntityKind::Officer,
            planned: 3,
            succeeded: 1,
            failed: 1,
            expected_error_rows: None,
            error_rows: 0,
            stray_error_rows: 0,
        };
        assert_eq!(
            retry.to_string(),
            "officer: 3 planned, 1 succeeded + 1 failed"
        );
    }
}
