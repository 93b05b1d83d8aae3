//! The state gauges: what PostgreSQL (and the broker) hold, read when `/metrics` is
//! scraped, so that every process shows the same and a new pod shows it at once.

use super::Metrics;
use super::labels::RecordOutcome;
use crate::domain::{EntityKind, SyncType};
use crate::ledger::states::FinalStatus;
use crate::queue::amqp::BrokerHealth;
use sqlx::PgPool;

impl Metrics {
    /// Sets every state gauge from where it is kept: watermark ages, stalled syncs,
    /// the last and the last successful sync of each type, pending planning requests,
    /// records found deleted (PostgreSQL), and the dead letters waiting (`broker`'s
    /// current connection, if any). A read that fails leaves its gauges at their last
    /// values; it is logged at debug level, and a database that does not answer shows
    /// on `/readyz` as `database: false`.
    pub async fn refresh_state(
        &self,
        pool: &PgPool,
        stale_after_secs: f64,
        broker: Option<&BrokerHealth>,
    ) {
        if let Some(ages) = read(
            "watermark ages",
            crate::ledger::reads::watermark_ages(pool).await,
        ) {
            for w in ages {
                if w.entity.parse::<EntityKind>().is_ok() {
                    self.watermark_age
                        .with_label_values(&[&w.entity])
                        .set(w.age_seconds);
                }
            }
        }
        let unsent = crate::ledger::reads::oldest_unsent(pool).await;
        if let Some(rows) = read("oldest unsent changes", unsent) {
            for r in rows {
                if r.entity.parse::<EntityKind>().is_ok() {
                    self.oldest_unsent_change
                        .with_label_values(&[&r.entity])
                        .set(r.age_seconds);
                }
            }
        }
        let stalled = crate::ledger::reads::stalled_count(pool, stale_after_secs).await;
        if let Some(stalled) = read("stalled syncs", stalled) {
            self.stalled_syncs.set(stalled);
        }
        if let Some(rows) = read("last syncs", crate::ledger::reads::last_syncs(pool).await) {
            // A type with no finished sync yet shows zeros.
            for t in SyncType::ALL.map(SyncType::as_str) {
                let (status, at, ok, failed) = rows
                    .iter()
                    .find(|r| r.sync_type == t)
                    .map_or(("", None, 0, 0), |r| {
                        (r.status.as_str(), r.completed_at, r.succeeded, r.failed)
                    });
                for st in FinalStatus::ALL.iter().map(|s| s.as_str()) {
                    self.last_sync_status
                        .with_label_values(&[t, st])
                        .set(i64::from(st == status));
                }
                self.last_sync_completed
                    .with_label_values(&[t])
                    .set(at.unwrap_or(0.0));
                self.last_sync_records
                    .with_label_values(&[t, RecordOutcome::Success.as_str()])
                    .set(ok);
                self.last_sync_records
                    .with_label_values(&[t, RecordOutcome::Failed.as_str()])
                    .set(failed);
            }
        }
        let successes = crate::ledger::reads::last_successes(pool).await;
        if let Some(rows) = read("last successful syncs", successes) {
            for t in SyncType::ALL.map(SyncType::as_str) {
                let at = rows
                    .iter()
                    .find(|r| r.sync_type == t)
                    .and_then(|r| r.completed_at);
                self.last_successful_sync
                    .with_label_values(&[t])
                    .set(at.unwrap_or(0.0));
            }
        }
        // The table comes with the pending-request migration; before it, nothing waits.
        let pending = crate::ledger::reads::pending_counts(pool).await;
        if let Some(rows) = read("pending requests", missing_table_is_empty(pending)) {
            for t in SyncType::ALL.map(SyncType::as_str) {
                let n = rows
                    .iter()
                    .find(|r| r.sync_type == t)
                    .map_or(0, |r| r.count);
                self.pending_requests.with_label_values(&[t]).set(n);
            }
        }
        // The table comes with the sweep migration; before it, nothing was found deleted.
        let deleted = crate::ledger::reads::deleted_counts(pool).await;
        if let Some(rows) = read("deleted records", missing_table_is_empty(deleted)) {
            for e in EntityKind::ALL {
                let n = rows
                    .iter()
                    .find(|r| r.entity == e.as_str())
                    .map_or(0, |r| r.count);
                self.deleted_records.with_label_values(&[e.as_str()]).set(n);
            }
        }
        // The column comes with the books migration; before it, no books were checked.
        let books = crate::ledger::reads::books_unbalanced_counts(pool).await;
        if let Some(rows) = read("unbalanced books", missing_column_is_empty(books)) {
            for e in EntityKind::ALL {
                let n = rows
                    .iter()
                    .find(|r| r.entity == e.as_str())
                    .map_or(0, |r| u64::try_from(r.count).unwrap_or(0));
                // A counter read from PostgreSQL: every pod counts the same syncs, and
                // it only grows (the rows are never deleted).
                let counter = self.books_unbalanced.with_label_values(&[e.as_str()]);
                counter.inc_by(n.saturating_sub(counter.get()));
            }
        }
        if let Some(n) = match broker {
            Some(b) => b.dead_letter_depth().await,
            None => None,
        } {
            self.dead_letters.set(i64::from(n));
        }
    }
}

/// No rows when the column does not exist yet (`42703`: a migration not applied yet).
fn missing_column_is_empty<T>(rows: sqlx::Result<Vec<T>>) -> sqlx::Result<Vec<T>> {
    match rows {
        Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("42703") => Ok(Vec::new()),
        other => other,
    }
}

/// The rows read, or `None` (logged) when the read failed.
fn read<T>(what: &str, rows: sqlx::Result<T>) -> Option<T> {
    rows.map_err(|e| tracing::debug!(error = %e, "cannot read the {what} gauge at scrape time"))
        .ok()
}

/// No rows when the table does not exist yet (`42P01`: a migration not applied yet).
fn missing_table_is_empty<T>(rows: sqlx::Result<Vec<T>>) -> sqlx::Result<Vec<T>> {
    match rows {
        Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("42P01") => Ok(Vec::new()),
        other => other,
    }
}
