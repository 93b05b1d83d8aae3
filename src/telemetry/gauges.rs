//! The state gauges: what PostgreSQL holds, read when `/metrics` is scraped.

use super::Metrics;
use super::labels::RecordOutcome;
use crate::domain::SyncType;
use crate::ledger::FinalStatus;
use sqlx::PgPool;

impl Metrics {
    /// Refreshes the gauges that are state in PostgreSQL, read at scrape time so that
    /// every process shows the same and a new pod shows it at once: watermark ages,
    /// stalled syncs, the last sync of each type, pending planning requests. A query
    /// that fails leaves its gauges as they were (and `/readyz` says why).
    pub async fn refresh_state(&self, pool: &PgPool, stale_after_secs: f64) {
        if let Ok(ages) = crate::ledger::watermark_ages(pool).await {
            for w in ages {
                if w.entity.parse::<crate::domain::EntityKind>().is_ok() {
                    self.watermark_age
                        .with_label_values(&[&w.entity])
                        .set(w.age_seconds);
                }
            }
        }
        if let Ok(stalled) = crate::ledger::stalled_count(pool, stale_after_secs).await {
            self.stalled_syncs.set(stalled);
        }
        if let Ok(rows) = crate::ledger::last_syncs(pool).await {
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
        if let Ok(rows) = crate::ledger::last_successes(pool).await {
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
        let pending = crate::ledger::pending_counts(pool).await;
        let pending = match pending {
            Ok(rows) => Some(rows),
            Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("42P01") => {
                Some(Vec::new())
            }
            Err(_) => None,
        };
        if let Some(rows) = pending {
            for t in SyncType::ALL.map(SyncType::as_str) {
                let n = rows
                    .iter()
                    .find(|r| r.sync_type == t)
                    .map_or(0, |r| r.count);
                self.pending_requests.with_label_values(&[t]).set(n);
            }
        }
        // The table comes with the sweep migration; before it, nothing was found deleted.
        let deleted = match crate::ledger::deleted_counts(pool).await {
            Ok(rows) => Some(rows),
            Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("42P01") => {
                Some(Vec::new())
            }
            Err(_) => None,
        };
        if let Some(rows) = deleted {
            for e in crate::domain::EntityKind::ALL {
                let n = rows
                    .iter()
                    .find(|r| r.entity == e.as_str())
                    .map_or(0, |r| r.count);
                self.deleted_records.with_label_values(&[e.as_str()]).set(n);
            }
        }
    }
}
