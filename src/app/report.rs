//! What a command reports ([`Report`]: text, JSON and an exit code); what a sync run in
//! this process ([`SyncReport`]) and a wait for a request ([`RequestReport`]) report; the
//! exit codes of outcomes; the per-entity progress table ([`progress_table`]) every
//! report of a sync prints.

use super::error::AppError;
use crate::ledger::{self, states::FinalStatus};

// Exit codes (README "Exit codes"): 0 success, 1 an error, 2 a usage error (clap's);
// the outcomes of a sync are above 9 so that no script mistakes one for the other.
/// The sync ended `partial_success` (`sync`, `resume --in-process`, `errors retry
/// --in-process`, `trigger --wait`).
pub const EXIT_PARTIAL: u8 = 10;
/// The sync ended `failed`.
pub const EXIT_FAILED: u8 = 11;
/// The sync did not run: another sync was in progress (single-process mode only; a
/// planner keeps such a request and runs it later).
pub const EXIT_BUSY: u8 = 12;
/// `trigger --wait`: the sync had not finished when `--timeout` ran out (it goes on).
pub const EXIT_TIMEOUT: u8 = 13;

/// What a command reports: text for people, JSON for scripts (`--json`), and the exit
/// code the command ends with. The command line prints every outcome through this.
pub trait Report: serde::Serialize {
    /// The report as text.
    fn render(&self) -> String;

    /// The exit code of the command that reports this.
    fn exit_code(&self) -> u8;

    /// The report as pretty-printed JSON.
    fn json(&self) -> serde_json::Result<String> {
        serde_json::to_string_pretty(self)
    }

    /// Prints the report: its text on stdout, or, with `json`, its JSON.
    fn print(&self, json: bool) -> Result<(), AppError> {
        if json {
            println!("{}", self.json()?);
        } else {
            print!("{}", self.render());
        }
        Ok(())
    }
}

/// What a sync reports (`loansync sync` and the other in-process runs).
#[derive(Debug, Clone, serde::Serialize)]
pub struct SyncReport {
    pub sync_id: Option<String>,
    pub status: Option<FinalStatus>,
    pub busy_with: Option<String>,
    pub progress: Vec<ledger::reads::EntityProgress>,
    pub seconds: f64,
    /// The history row's status as it stands (`in_progress` while it runs).
    #[serde(skip)]
    pub history_status: String,
}

impl SyncReport {
    /// The report of a sync that did not run because `active` was in progress.
    pub fn busy(active: String, seconds: f64) -> Self {
        SyncReport {
            sync_id: None,
            status: None,
            busy_with: Some(active),
            progress: Vec::new(),
            seconds,
            history_status: String::new(),
        }
    }

    /// 0 completed, [`EXIT_PARTIAL`], [`EXIT_FAILED`], [`EXIT_BUSY`] when it did not run,
    /// 1 when it has not finished.
    pub fn exit_code(&self) -> u8 {
        match self.status {
            Some(FinalStatus::Completed) => 0,
            Some(FinalStatus::PartialSuccess) => EXIT_PARTIAL,
            Some(FinalStatus::Failed) => EXIT_FAILED,
            None if self.busy_with.is_some() => EXIT_BUSY,
            None => 1,
        }
    }

    /// The report as text.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if let Some(active) = &self.busy_with {
            out.push_str(&format!(
                "another sync is in progress ({active}); nothing was run.\n\
                 If `loansync status` shows it stalled, finish it with \
                 `loansync resume {active}` (add --in-process when there is no broker).\n"
            ));
            return out;
        }
        let sent: i64 = self
            .progress
            .iter()
            .map(|p| i64::from(p.success + p.failed))
            .sum();
        out.push_str(&format!(
            "sync {} {} in {:.2}s ({:.0} records/s)\n",
            self.sync_id.as_deref().unwrap_or("-"),
            self.status.map(|s| s.as_str()).unwrap_or("unfinished"),
            self.seconds,
            sent as f64 / self.seconds.max(1e-9)
        ));
        out.push_str(&progress_table(
            &self.progress,
            ["planned", "sent", "failed"],
        ));
        out
    }
}

/// A sync's per-entity counters as a table, one line an entity, under `headings` for
/// the total, success and failed columns: a sync's report calls them planned, sent and
/// failed, `loansync status SYNC_ID` total, success and failed.
pub fn progress_table(progress: &[ledger::reads::EntityProgress], headings: [&str; 3]) -> String {
    let [total, success, failed] = headings;
    let mut out = format!("{:<10} {total:>10} {success:>10} {failed:>10}\n", "entity");
    for p in progress {
        out.push_str(&format!(
            "{:<10} {:>10} {:>10} {:>10}\n",
            p.entity.as_str(),
            p.total,
            p.success,
            p.failed
        ));
    }
    out
}

/// What `trigger --wait` saw of its request.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RequestReport {
    pub request_id: String,
    /// `pending` (waiting for the slot), `planned`, or `unseen` (no planner took it yet).
    pub request_state: String,
    pub timed_out: bool,
    pub sync: Option<SyncReport>,
}

impl RequestReport {
    /// The sync's exit code once it finished; [`EXIT_TIMEOUT`] when the wait ran out
    /// first; 1 otherwise.
    pub fn exit_code(&self) -> u8 {
        match &self.sync {
            Some(s) if s.status.is_some() => s.exit_code(),
            _ if self.timed_out => EXIT_TIMEOUT,
            _ => 1,
        }
    }

    /// The report as text.
    pub fn render(&self) -> String {
        match &self.sync {
            Some(s) if s.status.is_some() => s.render(),
            Some(s) => format!(
                "timed out waiting: request {} is served by sync {} which is still running \
                 (`loansync status {}`)\n",
                self.request_id,
                s.sync_id.as_deref().unwrap_or("-"),
                s.sync_id.as_deref().unwrap_or("")
            ),
            None => format!(
                "timed out waiting: request {} is {} (no sync serves it yet; \
                 `loansync status` shows what runs)\n",
                self.request_id, self.request_state
            ),
        }
    }
}

// The library's callers (the demo, the tests) use these reports' own methods; the
// command line prints them as every other report.
impl Report for SyncReport {
    fn render(&self) -> String {
        SyncReport::render(self)
    }

    fn exit_code(&self) -> u8 {
        SyncReport::exit_code(self)
    }
}

impl Report for RequestReport {
    fn render(&self) -> String {
        RequestReport::render(self)
    }

    fn exit_code(&self) -> u8 {
        RequestReport::exit_code(self)
    }
}

/// A sync's outcome, read back from the history table (its duration is the history's).
pub async fn summarize(pool: &sqlx::PgPool, sync_id: String) -> Result<SyncReport, AppError> {
    let outcome = ledger::reads::history_outcome(pool, &sync_id).await?;
    let history_status = outcome
        .status
        .map_or("?", ledger::states::HistoryStatus::as_str)
        .to_string();
    let status = outcome
        .status
        .and_then(ledger::states::HistoryStatus::final_status);
    let seconds = outcome.duration_seconds;
    Ok(SyncReport {
        progress: ledger::reads::entity_progress(pool, &sync_id).await?,
        sync_id: Some(sync_id),
        status,
        busy_with: None,
        seconds: seconds.unwrap_or(0.0),
        history_status,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(status: Option<FinalStatus>, busy: bool) -> SyncReport {
        SyncReport {
            sync_id: Some("s1".into()),
            status,
            busy_with: busy.then(|| "s0".to_string()),
            progress: Vec::new(),
            seconds: 1.0,
            history_status: String::new(),
        }
    }

    #[test]
    fn a_sync_reports_its_final_status_as_its_exit_code() {
        assert_eq!(report(Some(FinalStatus::Completed), false).exit_code(), 0);
        assert_eq!(
            report(Some(FinalStatus::PartialSuccess), false).exit_code(),
            EXIT_PARTIAL
        );
        assert_eq!(
            report(Some(FinalStatus::Failed), false).exit_code(),
            EXIT_FAILED
        );
        assert_eq!(report(None, true).exit_code(), EXIT_BUSY);
        assert_eq!(report(None, false).exit_code(), 1, "unfinished is an error");
        let busy = report(None, true).render();
        assert!(busy.contains("another sync is in progress (s0)"), "{busy}");
        assert!(
            report(Some(FinalStatus::Completed), false)
                .render()
                .starts_with("sync s1 completed in 1.00s")
        );
    }

    #[test]
    fn the_exit_codes_of_outcomes_are_distinct_and_above_usage_errors() {
        let codes = [EXIT_PARTIAL, EXIT_FAILED, EXIT_BUSY, EXIT_TIMEOUT];
        let distinct: std::collections::BTreeSet<u8> = codes.into_iter().collect();
        assert_eq!(distinct.len(), codes.len());
        assert!(codes.iter().all(|&c| c > 9));
    }

    #[test]
    fn a_wait_reports_the_syncs_outcome_or_a_timeout() {
        let waited = |sync: Option<SyncReport>, timed_out: bool| RequestReport {
            request_id: "r1".into(),
            request_state: "planned".into(),
            timed_out,
            sync,
        };
        let done = waited(
            Some(report(Some(FinalStatus::PartialSuccess), false)),
            false,
        );
        assert_eq!(done.exit_code(), EXIT_PARTIAL);
        // Finished just as the timeout ran out: the outcome wins.
        let late = waited(Some(report(Some(FinalStatus::Completed), false)), true);
        assert_eq!(late.exit_code(), 0);
        let running = waited(Some(report(None, false)), true);
        assert_eq!(running.exit_code(), EXIT_TIMEOUT);
        assert!(
            running
                .render()
                .contains("served by sync s1 which is still running")
        );
        let unseen = waited(None, true);
        assert_eq!(unseen.exit_code(), EXIT_TIMEOUT);
        assert!(unseen.render().contains("request r1 is planned"));
        assert_eq!(waited(None, false).exit_code(), 1);
    }

    #[test]
    fn the_json_report_keeps_its_fields() {
        let json: serde_json::Value =
            serde_json::from_str(&report(Some(FinalStatus::Completed), false).json().unwrap())
                .unwrap();
        let keys: Vec<&str> = json
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(
            keys,
            ["busy_with", "progress", "seconds", "status", "sync_id"],
            "the history status is not part of the JSON"
        );
        assert_eq!(json["status"], "completed");
    }
}
