//! `sync --dry-run` and `trigger --dry-run`: what the sync asked for would send now,
//! computed in this process against the database ([`planner::dry_run`]), in one
//! read-only transaction. Both commands do the same: nothing is published (`trigger
//! --dry-run` does not connect to the broker), sent, or written.

use super::error::AppError;
use super::report::Report;
use crate::config::Settings;
use crate::domain::PlanRequest;
use crate::planner::{self, DryRun, EntityDryRun};
use sqlx::PgPool;

/// The dry run of `req`; `ids` keeps every id for the report.
pub async fn dry_run(
    pool: &PgPool,
    settings: &Settings,
    req: &PlanRequest,
    ids: bool,
) -> Result<DryRun, AppError> {
    Ok(planner::dry_run(pool, settings, req, ids).await?)
}

/// What each column counts, under the table: the semantics a reader needs.
fn legend(sweep: bool) -> &'static str {
    if sweep {
        "a sweep sends new (never delivered) and changed (fingerprint differs from the \
         delivered one) records and skips the unchanged; deleted: delivered ids gone from \
         the source or no longer selected, recorded, not sent\n"
    } else {
        "this sync sends every selected record: new (never delivered), changed (fingerprint \
         differs from the delivered one) and unchanged (sent again all the same); a sweep \
         would skip the unchanged. Deletes: only a sweep looks for them\n"
    }
}

fn ids_line(entity: &EntityDryRun, what: &str, ids: &[i64]) -> String {
    let list: Vec<String> = ids.iter().map(i64::to_string).collect();
    format!(
        "{} {what} ({}): {}\n",
        entity.entity.as_str(),
        ids.len(),
        list.join(" ")
    )
}

impl Report for DryRun {
    /// A dry run succeeded when it could compute the plan, whatever it found.
    fn exit_code(&self) -> u8 {
        0
    }

    fn render(&self) -> String {
        let sweep = self.kind == "sweep";
        let mut out = format!(
            "dry run of a {} sync, window end {}: nothing was sent, published or written\n",
            self.kind,
            self.window_hi
                .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
        );
        if let Some(active) = &self.busy_with {
            out.push_str(&format!(
                "note: sync {active} is in progress: `loansync sync` would not run now (exit 12); \
                 a triggered request would wait for it\n"
            ));
        }
        out.push_str(&format!(
            "{:<10} {:<20} {:>10} {:>10} {:>10} {:>10} {:>10}\n",
            "entity", "window from", "would send", "new", "changed", "unchanged", "deleted"
        ));
        for e in &self.entities {
            let from = e.window_lo.map_or_else(
                || "-".to_string(),
                |lo| lo.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            );
            let deleted = e.deleted.map_or_else(|| "-".to_string(), |d| d.to_string());
            out.push_str(&format!(
                "{:<10} {from:<20} {:>10} {:>10} {:>10} {:>10} {deleted:>10}\n",
                e.entity.as_str(),
                e.would_send,
                e.new,
                e.changed,
                e.unchanged
            ));
        }
        out.push_str(&format!("total would send: {}\n", self.would_send()));
        out.push_str(legend(sweep));
        for e in &self.entities {
            if let Some(ids) = &e.ids {
                for (what, list) in [
                    ("new", &ids.new),
                    ("changed", &ids.changed),
                    ("unchanged", &ids.unchanged),
                    ("deleted", &ids.deleted),
                ] {
                    if !list.is_empty() {
                        out.push_str(&ids_line(e, what, list));
                    }
                }
            }
        }
        out
    }
}
