//! `loansync check`: can this installation work? The settings, PostgreSQL and the grants
//! of `deploy/sql/grants.sql`, no transaction pooler in the way, the embedded
//! migrations, invalid indexes, the source schema (every column loansync reads, with its
//! type), how the sync window's end is capped, the broker's queues
//! and the analytics API's key, each ok / failed / skipped with a line a person can act
//! on. And `loansync probe`: one GET, for healthchecks in an image without curl.
//!
//! Every check has a deadline, so a dependency that hangs fails its check instead of
//! hanging the command. Nothing here prints a secret: URLs are redacted, keys never shown.
//!
//! The files: this one (the report and the order of the checks), `database` (the
//! checks of PostgreSQL: reachable with its grants, pooling, migrations, indexes, the
//! source schema, the window cap), `services` (the broker, the analytics API, `probe`).

mod database;
mod services;

pub use services::probe;

use database::{database, indexes, migrations, pooling, schema, window};
use services::{api, broker};

use crate::config::{ConfigError, DbTimeouts, Settings};
use crate::redact::redact_text;
use secrecy::ExposeSecret;
use std::time::Duration;

/// The checks `--skip` can name (`config` always runs: nothing else can without it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum CheckName {
    Database,
    Pooling,
    Migrations,
    Indexes,
    Schema,
    Window,
    Broker,
    Api,
}

/// What one check came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Ok,
    Failed,
    Skipped,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Failed => "failed",
            Outcome::Skipped => "skipped",
        }
    }
}

/// One line of the report.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CheckResult {
    pub name: &'static str,
    pub result: Outcome,
    pub detail: String,
}

impl CheckResult {
    fn new(name: &'static str, result: Outcome, detail: impl Into<String>) -> Self {
        CheckResult {
            name,
            result,
            // Library errors may quote a URL: never print its credentials.
            detail: redact_text(&detail.into()),
        }
    }
}

/// Every check, in order.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(transparent)]
pub struct Report(pub Vec<CheckResult>);

impl Report {
    /// 0 when nothing failed, 1 otherwise.
    pub fn exit_code(&self) -> u8 {
        u8::from(self.0.iter().any(|c| c.result == Outcome::Failed))
    }

    pub fn get(&self, name: &str) -> Option<&CheckResult> {
        self.0.iter().find(|c| c.name == name)
    }

    /// `check  result  detail`, one line per check.
    pub fn render_table(&self) -> String {
        let mut out = format!("{:<11} {:<8} {}\n", "check", "result", "detail");
        for c in &self.0 {
            out.push_str(&format!(
                "{:<11} {:<8} {}\n",
                c.name,
                c.result.as_str(),
                c.detail
            ));
        }
        out
    }

    pub fn render_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_else(|_| "[]".into())
    }
}

const ALL: [(&str, Option<CheckName>); 9] = [
    ("config", None),
    ("database", Some(CheckName::Database)),
    ("pooling", Some(CheckName::Pooling)),
    ("migrations", Some(CheckName::Migrations)),
    ("indexes", Some(CheckName::Indexes)),
    ("schema", Some(CheckName::Schema)),
    ("window", Some(CheckName::Window)),
    ("broker", Some(CheckName::Broker)),
    ("api", Some(CheckName::Api)),
];

/// The checks that need PostgreSQL, in order.
const DB_CHECKS: [(&str, CheckName); 6] = [
    ("database", CheckName::Database),
    ("pooling", CheckName::Pooling),
    ("migrations", CheckName::Migrations),
    ("indexes", CheckName::Indexes),
    ("schema", CheckName::Schema),
    ("window", CheckName::Window),
];

/// The report when the settings did not load: `config` failed, every other skipped.
pub fn config_failed(e: &ConfigError) -> Report {
    Report(
        ALL.iter()
            .map(|(name, _)| match name {
                &"config" => CheckResult::new(name, Outcome::Failed, e.to_string()),
                _ => CheckResult::new(name, Outcome::Skipped, "the configuration did not load"),
            })
            .collect(),
    )
}

/// Runs every check not in `skip`, each bounded by `timeout`.
pub async fn run(settings: &Settings, skip: &[CheckName], timeout: Duration) -> Report {
    let skipped = |c: CheckName| skip.contains(&c);
    let mut out = vec![CheckResult::new(
        "config",
        Outcome::Ok,
        "the settings load and are in range",
    )];
    let by_flag = || "skipped (--skip)".to_string();

    let needs_db = DB_CHECKS.iter().any(|(_, c)| !skipped(*c));
    let pool = if needs_db {
        Some(connect(settings, timeout).await)
    } else {
        None
    };
    let db_at = settings.database_url_redacted();
    match &pool {
        Some(Ok(pool)) => {
            for (name, check) in DB_CHECKS {
                if skipped(check) {
                    out.push(CheckResult::new(name, Outcome::Skipped, by_flag()));
                    continue;
                }
                let ran = match check {
                    CheckName::Database => bounded(timeout, database(pool, &db_at)).await,
                    CheckName::Pooling => bounded(timeout, pooling(pool)).await,
                    CheckName::Migrations => bounded(timeout, migrations(pool)).await,
                    CheckName::Window => bounded(timeout, window(pool)).await,
                    CheckName::Schema => bounded(timeout, schema(pool)).await,
                    _ => bounded(timeout, indexes(pool)).await,
                };
                out.push(match ran {
                    Ok(detail) => CheckResult::new(name, Outcome::Ok, detail),
                    Err(detail) => CheckResult::new(name, Outcome::Failed, detail),
                });
            }
        }
        other => {
            let why = match other {
                Some(Err(e)) => e.clone(),
                _ => String::new(),
            };
            for (name, check) in DB_CHECKS {
                out.push(if skipped(check) {
                    CheckResult::new(name, Outcome::Skipped, by_flag())
                } else if check == CheckName::Database || skipped(CheckName::Database) {
                    CheckResult::new(name, Outcome::Failed, why.clone())
                } else {
                    CheckResult::new(
                        name,
                        Outcome::Skipped,
                        "PostgreSQL cannot be reached (see database)",
                    )
                });
            }
        }
    }
    if let Some(Ok(pool)) = pool {
        pool.close().await;
    }

    out.push(if skipped(CheckName::Broker) {
        CheckResult::new("broker", Outcome::Skipped, by_flag())
    } else {
        match bounded(timeout, broker(settings)).await {
            Ok(d) => CheckResult::new("broker", Outcome::Ok, d),
            Err(d) => CheckResult::new("broker", Outcome::Failed, d),
        }
    });
    out.push(if skipped(CheckName::Api) {
        CheckResult::new("api", Outcome::Skipped, by_flag())
    } else {
        match bounded(timeout, api(settings)).await {
            Ok(d) => CheckResult::new("api", Outcome::Ok, d),
            Err(d) => CheckResult::new("api", Outcome::Failed, d),
        }
    });
    Report(out)
}

/// `work`, failed with "no answer within …" once `timeout` passes.
async fn bounded(
    timeout: Duration,
    work: impl std::future::Future<Output = Result<String, String>>,
) -> Result<String, String> {
    tokio::time::timeout(timeout, work)
        .await
        .unwrap_or_else(|_| {
            Err(format!(
                "no answer within {} (the check's timeout, --timeout)",
                humantime::format_duration(timeout)
            ))
        })
}

async fn connect(settings: &Settings, timeout: Duration) -> Result<sqlx::PgPool, String> {
    let limits = DbTimeouts {
        acquire: timeout,
        ..settings.db_timeouts
    };
    let url = settings.database_url.expose_secret();
    match tokio::time::timeout(timeout, crate::db::connect_url_with(url, 2, &limits)).await {
        Ok(Ok(pool)) => Ok(pool),
        Ok(Err(e)) => Err(format!("{e:#}")),
        Err(_) => Err(format!(
            "PostgreSQL at {} did not answer within {} (--timeout)",
            settings.database_url_redacted(),
            humantime::format_duration(timeout)
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_config_failure_fails_config_and_skips_the_rest() {
        let e = Settings::from_lookup(|k| (k == "ETL_BATCH_SIZE_LOANS").then(|| "lots".into()))
            .unwrap_err();
        let r = config_failed(&e);
        assert_eq!(r.exit_code(), 1);
        assert_eq!(r.0[0].name, "config");
        assert_eq!(r.0[0].result, Outcome::Failed);
        assert!(r.0[0].detail.starts_with("ETL_BATCH_SIZE_LOANS: "));
        assert_eq!(r.0.len(), 9);
        assert!(r.0[1..].iter().all(|c| c.result == Outcome::Skipped));
        let json: serde_json::Value = serde_json::from_str(&r.render_json()).unwrap();
        assert_eq!(json[0]["result"], "failed");
        assert_eq!(json[8]["name"], "api");
        assert!(r.render_table().starts_with("check"));
    }
}
