//! `loansync resume`: a stalled sync's unsettled chunks published again from the chunk
//! ledger (`resume --in-process` works them here instead: [`super::sync::Work::Resume`]).

use super::error::AppError;
use super::report::Report;
use crate::config::Settings;
use crate::planner;
use serde::Serialize;
use sqlx::PgPool;

/// How many chunks of the sync were published again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ResumeReport {
    pub republished: usize,
    pub sync_id: String,
}

/// Publishes the unsettled chunks of the sync `sync_id` again, for the workers; an error
/// when the sync is not running.
pub async fn republish(
    pool: &PgPool,
    settings: &Settings,
    sync_id: String,
) -> Result<ResumeReport, AppError> {
    let broker = super::connect_broker(settings).await?;
    let republished = planner::resume(pool, &sync_id, &broker).await;
    broker.close().await;
    Ok(ResumeReport {
        republished: republished?,
        sync_id,
    })
}

impl Report for ResumeReport {
    /// One line: `{"republished": N, "sync_id": ...}`.
    fn json(&self) -> serde_json::Result<String> {
        serde_json::to_string(self)
    }

    fn exit_code(&self) -> u8 {
        0
    }

    fn render(&self) -> String {
        format!(
            "re-published {} unsettled chunks of sync {}\n",
            self.republished, self.sync_id
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_json_report_is_one_line_with_its_fields_in_order() {
        let report = ResumeReport {
            republished: 3,
            sync_id: "s1".into(),
        };
        assert_eq!(
            report.json().unwrap(),
            r#"{"republished":3,"sync_id":"s1"}"#
        );
    }
}
