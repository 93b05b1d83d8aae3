//! Waiting for the sync that serves a planning request to finish (`trigger --wait`, the
//! demo): the one polling loop over the request and history tables.

use super::error::AppError;
use super::report::{RequestReport, summarize};
use crate::ledger;
use std::time::Duration;

/// How often [`wait_for_request`] looks.
pub const WAIT_POLL: Duration = Duration::from_millis(500);

/// Polls PostgreSQL every `every` until the sync serving `request_id` has finished, or
/// `timeout` has passed (then the report says `timed_out`; the sync goes on). With
/// `watch`, each look is also summarized (the sync's status and per-entity progress)
/// and handed to it, for progress lines.
pub async fn wait_for_request(
    pool: &sqlx::PgPool,
    request_id: &str,
    timeout: Option<Duration>,
    every: Duration,
    mut watch: Option<&mut (dyn FnMut(&RequestReport) + Send)>,
) -> Result<RequestReport, AppError> {
    let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
    let mut ticks = tokio::time::interval(every);
    loop {
        ticks.tick().await;
        let seen = ledger::lifecycle::request_state(pool, request_id).await?;
        let (state, sync_id, finished) = match seen {
            None => ("unseen".to_string(), None, false),
            Some(r) => (r.state.as_str().to_string(), r.sync_id, r.finished),
        };
        let timed_out = deadline.is_some_and(|d| tokio::time::Instant::now() >= d);
        let report_now = finished || timed_out;
        if !report_now && watch.is_none() {
            continue;
        }
        let sync = match sync_id {
            Some(id) => Some(summarize(pool, id).await?),
            None => None,
        };
        let report = RequestReport {
            request_id: request_id.to_string(),
            request_state: state,
            timed_out: timed_out && !finished,
            sync,
        };
        if let Some(w) = watch.as_deref_mut() {
            w(&report);
        }
        if report_now {
            return Ok(report);
        }
    }
}
