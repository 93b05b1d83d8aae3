//! `loansync check`: can this installation work? The settings, PostgreSQL and the grants
//! of `deploy/sql/grants.sql`, no transaction pooler in the way, the embedded
//! migrations, invalid indexes, how the sync window's end is capped, the broker's queues
//! and the analytics API's key, each ok / failed / skipped with a line a person can act on. And `loansync probe`: one GET, for healthchecks in an image without curl.
//!
//! Every check has a deadline, so a dependency that hangs fails its check instead of
//! hanging the command. Nothing here prints a secret: URLs are redacted, keys never shown.

use crate::config::{ConfigError, DbTimeouts, Settings};
use crate::queue::amqp::BrokerHealth;
use crate::redact::{redact_text, redact_url};
use crate::sink::AnalyticsClient;
use crate::sink::service::Answer;
use secrecy::ExposeSecret;
use std::time::Duration;

/// The checks `--skip` can name (`config` always runs: nothing else can without it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum CheckName {
    Database,
    Pooling,
    Migrations,
    Indexes,
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

const ALL: [(&str, Option<CheckName>); 8] = [
    ("config", None),
    ("database", Some(CheckName::Database)),
    ("pooling", Some(CheckName::Pooling)),
    ("migrations", Some(CheckName::Migrations)),
    ("indexes", Some(CheckName::Indexes)),
    ("window", Some(CheckName::Window)),
    ("broker", Some(CheckName::Broker)),
    ("api", Some(CheckName::Api)),
];

/// The checks that need PostgreSQL, in order.
const DB_CHECKS: [(&str, CheckName); 5] = [
    ("database", CheckName::Database),
    ("pooling", CheckName::Pooling),
    ("migrations", CheckName::Migrations),
    ("indexes", CheckName::Indexes),
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

/// The kind of object a grant is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum On {
    Schema,
    Table,
    Sequence,
}

/// One `GRANT` of `deploy/sql/grants.sql`.
struct Grant {
    privileges: &'static [&'static str],
    on: On,
    names: &'static [&'static str],
}

/// Django's source tables (read only; `loansync migrate` never creates them).
const SOURCE_TABLES: &[&str] = &[
    "accounts_customuser",
    "ajo_ajouser",
    "loans_ajoloan",
    "loans_ajoloanrepayment",
    "loans_ajoloanschedule",
];

/// What `deploy/sql/grants.sql` grants, statement by statement (a unit test keeps the
/// two the same).
const GRANTS: &[Grant] = &[
    Grant {
        privileges: &["USAGE"],
        on: On::Schema,
        names: &["public"],
    },
    Grant {
        privileges: &["SELECT"],
        on: On::Table,
        names: SOURCE_TABLES,
    },
    Grant {
        privileges: &["SELECT", "INSERT", "UPDATE"],
        on: On::Table,
        names: &[
            "etl_folder_etlsynchistory",
            "etl_folder_etlsyncerror",
            "etl_folder_etllastsync",
        ],
    },
    Grant {
        privileges: &["USAGE"],
        on: On::Sequence,
        names: &[
            "etl_folder_etlsynchistory_id_seq",
            "etl_folder_etlsyncerror_id_seq",
            "etl_folder_etllastsync_id_seq",
        ],
    },
    Grant {
        privileges: &["SELECT", "INSERT", "UPDATE", "DELETE"],
        on: On::Table,
        names: &[
            "loansync_sync",
            "loansync_sync_entity",
            "loansync_chunk",
            "loansync_xid_clock",
            "loansync_request",
            "loansync_delivered",
            "loansync_deleted",
        ],
    },
    Grant {
        privileges: &["SELECT"],
        on: On::Table,
        names: &["loansync_pending_request"],
    },
    Grant {
        privileges: &["SELECT"],
        on: On::Table,
        names: &["_sqlx_migrations"],
    },
];

/// A role name as SQL would need it written.
fn quote_ident(name: &str) -> String {
    let plain = name
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if plain {
        name.to_string()
    } else {
        format!("\"{}\"", name.replace('"', "\"\""))
    }
}

/// Reachable, and the role holds every grant of `deploy/sql/grants.sql`. Tables that
/// do not exist yet are left to `migrations` (Django's own tables excepted).
async fn database(pool: &sqlx::PgPool, at: &str) -> Result<String, String> {
    let e = |e: sqlx::Error| format!("{e}");
    let (role, superuser): (String, bool) = sqlx::query_as(
        "SELECT current_user::text, (SELECT rolsuper FROM pg_roles WHERE rolname = current_user)",
    )
    .fetch_one(pool)
    .await
    .map_err(e)?;
    let mut missing: Vec<String> = Vec::new();
    let mut absent_sources: Vec<&str> = Vec::new();
    let mut checked = 0;
    for g in GRANTS {
        for name in g.names {
            let mut lacking = Vec::new();
            for privilege in g.privileges {
                let (exists, has): (bool, Option<bool>) = match g.on {
                    On::Schema => sqlx::query_as(
                        "SELECT n.oid IS NOT NULL, has_schema_privilege(n.oid, $2) \
                         FROM (SELECT (SELECT oid FROM pg_namespace WHERE nspname = $1) AS oid) n",
                    ),
                    On::Table => sqlx::query_as(
                        "SELECT to_regclass($1) IS NOT NULL, \
                         has_table_privilege(to_regclass($1)::oid, $2)",
                    ),
                    On::Sequence => sqlx::query_as(
                        "SELECT to_regclass($1) IS NOT NULL, \
                         has_sequence_privilege(to_regclass($1)::oid, $2)",
                    ),
                }
                .bind(*name)
                .bind(*privilege)
                .fetch_one(pool)
                .await
                .map_err(e)?;
                if !exists {
                    if SOURCE_TABLES.contains(name) && !absent_sources.contains(name) {
                        absent_sources.push(name);
                    }
                    break;
                }
                checked += 1;
                if has != Some(true) {
                    lacking.push(*privilege);
                }
            }
            if !lacking.is_empty() {
                let on = match g.on {
                    On::Schema => "SCHEMA ",
                    On::Table => "",
                    On::Sequence => "SEQUENCE ",
                };
                missing.push(format!(
                    "GRANT {} ON {on}{name} TO {};",
                    lacking.join(", "),
                    quote_ident(&role)
                ));
            }
        }
    }
    let mut problems = Vec::new();
    if !absent_sources.is_empty() {
        problems.push(format!(
            "Django's table(s) {} do not exist: does DATABASE_URL point at the lending database?",
            absent_sources.join(", ")
        ));
    }
    if !missing.is_empty() {
        problems.push(format!(
            "role {role} lacks {} grant(s) of deploy/sql/grants.sql; as the tables' owner run: {}",
            missing.len(),
            missing.join(" ")
        ));
    }
    if !problems.is_empty() {
        return Err(format!("{at}: {}", problems.join("; ")));
    }
    Ok(format!(
        "{at} as {role}{}: {checked} privileges of deploy/sql/grants.sql held",
        if superuser { " (superuser)" } else { "" }
    ))
}

/// Each connection keeps a server session of its own: no transaction pooler between
/// loansync and PostgreSQL ([`crate::db::pooling::detect`]), which the planning lock
/// cannot work through.
async fn pooling(pool: &sqlx::PgPool) -> Result<String, String> {
    let seen = crate::db::pooling::detect(pool)
        .await
        .map_err(|e| format!("{e:#}"))?;
    let [a, b] = seen.backends;
    Ok(format!(
        "two connections kept their own server sessions (backends {a} and {b}) over {} \
         transactions: no transaction pooler",
        seen.transactions
    ))
}

/// Every migration embedded in this binary is applied, successfully, unchanged.
async fn migrations(pool: &sqlx::PgPool) -> Result<String, String> {
    let ours: Vec<&sqlx::migrate::Migration> = crate::db::MIGRATOR
        .iter()
        .filter(|m| !m.migration_type.is_down_migration())
        .collect();
    let exists: bool = sqlx::query_scalar("SELECT to_regclass('_sqlx_migrations') IS NOT NULL")
        .fetch_one(pool)
        .await
        .map_err(|e| e.to_string())?;
    if !exists {
        return Err(format!(
            "not migrated: none of the {} migrations is applied (no _sqlx_migrations table); \
             run `loansync migrate` as the tables' owner",
            ours.len()
        ));
    }
    let applied: Vec<(i64, bool, Vec<u8>)> = sqlx::query_as(
        "SELECT version, success, checksum FROM _sqlx_migrations",
    )
    .fetch_all(pool)
    .await
    .map_err(|e| {
        format!("cannot read _sqlx_migrations ({e}); GRANT SELECT ON _sqlx_migrations to this role")
    })?;
    let name = |m: &sqlx::migrate::Migration| format!("{} {}", m.version, m.description);
    let (mut missing, mut failed, mut changed) = (Vec::new(), Vec::new(), Vec::new());
    for m in &ours {
        match applied.iter().find(|(v, _, _)| *v == m.version) {
            None => missing.push(name(m)),
            Some((_, false, _)) => failed.push(name(m)),
            Some((_, true, sum)) if sum.as_slice() != m.checksum.as_ref() => changed.push(name(m)),
            Some(_) => {}
        }
    }
    let unknown = applied
        .iter()
        .filter(|(v, _, _)| !ours.iter().any(|m| m.version == *v))
        .count();
    let mut problems = Vec::new();
    if !missing.is_empty() {
        problems.push(format!(
            "{} of {} not applied ({}): run `loansync migrate`",
            missing.len(),
            ours.len(),
            missing.join(", ")
        ));
    }
    if !failed.is_empty() {
        problems.push(format!(
            "failed ({}): see the migrate Job's log, fix the cause, run `loansync migrate` again",
            failed.join(", ")
        ));
    }
    if !changed.is_empty() {
        problems.push(format!(
            "applied with a different checksum ({}): this binary's migration differs from the one \
             the database ran; deploy the release that migrated it, or restore the migration",
            changed.join(", ")
        ));
    }
    if !problems.is_empty() {
        return Err(problems.join("; "));
    }
    Ok(format!(
        "all {} migrations applied{}",
        ours.len(),
        if unknown > 0 {
            format!(" ({unknown} more applied by a newer release)")
        } else {
            String::new()
        }
    ))
}

/// No INVALID index (an interrupted `CREATE INDEX CONCURRENTLY`) on the tables loansync uses.
async fn indexes(pool: &sqlx::PgPool) -> Result<String, String> {
    let invalid: Vec<(String, String)> = sqlx::query_as(
        "SELECT c.relname::text, t.relname::text \
         FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid JOIN pg_class t ON t.oid = i.indrelid \
         WHERE NOT i.indisvalid AND pg_table_is_visible(t.oid) \
           AND (t.relname = ANY($1) OR t.relname LIKE 'loansync\\_%' OR t.relname LIKE 'etl\\_folder\\_%') \
         ORDER BY 1",
    )
    .bind(SOURCE_TABLES)
    .fetch_all(pool)
    .await
    .map_err(|e| e.to_string())?;
    if invalid.is_empty() {
        return Ok("no INVALID index on the source, etl_folder_* or loansync_* tables".into());
    }
    Err(format!(
        "INVALID index(es) (an interrupted CREATE INDEX CONCURRENTLY): {}; \
         run {} then `loansync migrate` again",
        invalid
            .iter()
            .map(|(i, t)| format!("{i} on {t}"))
            .collect::<Vec<_>>()
            .join(", "),
        invalid
            .iter()
            .map(|(i, _)| format!("DROP INDEX CONCURRENTLY {};", quote_ident(i)))
            .collect::<Vec<_>>()
            .join(" ")
    ))
}

/// How the sync window's end is capped for this role (SPEC.md section 2): at each open
/// transaction's start, or, when the role cannot read other roles' `xact_start`, at
/// their first write. Ok either way; the second with a warning naming the grant that
/// closes the case it leaves open.
async fn window(pool: &sqlx::PgPool) -> Result<String, String> {
    use crate::ledger::clock::{WindowCap, window_cap};
    match window_cap(pool).await.map_err(|e| e.to_string())? {
        cap @ WindowCap::TransactionStart => Ok(cap.to_string()),
        cap @ WindowCap::FirstWrite { .. } => Ok(format!("warning: {cap}")),
    }
}

/// Connects and declares the topology exactly as a planner does.
async fn broker(settings: &Settings) -> Result<String, String> {
    let broker = crate::app::connect_broker_with(
        settings,
        BrokerHealth::with_telemetry(settings.telemetry.clone()),
    )
    .await
    .map_err(|e| format!("{e:#}"))?;
    let t = broker.topology.clone();
    let mut mismatches = broker.argument_mismatches().to_vec();
    // One line per queue and argument: the first difference the broker named.
    let mut seen = std::collections::HashSet::new();
    mismatches.retain(|m| seen.insert((m.queue.clone(), m.argument.clone())));
    broker.close().await;
    // A different broker delivery limit is a supported change (loansync's own limit, in
    // the chunk ledger, applies at once): noted, not failed. Any other difference (queue
    // type, dead-lettering, a length limit…) is not what loansync runs on: failed.
    let (limits, others): (Vec<_>, Vec<_>) = mismatches
        .iter()
        .partition(|m| m.argument == "x-delivery-limit");
    let describe = |ms: &[&crate::queue::amqp::ArgumentMismatch]| {
        ms.iter()
            .map(|m| {
                format!(
                    "{} {}={} (wanted {})",
                    m.queue, m.argument, m.broker, m.wanted
                )
            })
            .collect::<Vec<_>>()
            .join("; ")
    };
    if !others.is_empty() {
        return Err(format!(
            "{}: queues declared with other arguments: {}; re-create them (drained) or see \
             deploy/README.md, \"Changing queue settings\"",
            settings.amqp_url_redacted(),
            describe(&others)
        ));
    }
    let note = if limits.is_empty() {
        String::new()
    } else {
        format!(
            " (the broker's delivery-limit backstop differs: {})",
            describe(&limits)
        )
    };
    Ok(format!(
        "{}: queues {}, {} and {} declared as expected{note}",
        settings.amqp_url_redacted(),
        t.plan,
        t.chunks,
        t.dead
    ))
}

/// The key is accepted: a batch of no records, as the contract allows.
async fn api(settings: &Settings) -> Result<String, String> {
    let api = settings.api().map_err(|e| e.to_string())?;
    let at = redact_url(api.base_url.as_str());
    let client = AnalyticsClient::new(api).map_err(|e| e.to_string())?;
    let status = |s: Option<u16>| s.map_or_else(String::new, |s| format!("HTTP {s}: "));
    match client.check_key().await {
        Ok(Answer::Accepted { .. }) => Ok(format!(
            "{at}: the key was accepted (an empty batch to /etl/officers answered 200)"
        )),
        Ok(Answer::Unauthorized { status, .. }) => Err(format!(
            "{at}: HTTP {status}: the API refused the key (ANALYTICS_API_KEY / ANALYTICS_API_KEY_FILE)"
        )),
        Ok(Answer::Refused {
            status: s,
            error_code,
            message,
            ..
        }) => Err(format!("{at}: HTTP {s} {error_code}: {message}")),
        Ok(Answer::Failed {
            status: s,
            error_code,
            message,
            ..
        }) => Err(format!("{at}: {}{error_code}: {message}", status(s))),
        Err(t) => Err(format!("{at}: {}{}", status(t.status), t.message)),
    }
}

/// `loansync probe`: GETs `url`; `Ok` (the status) on a 2xx answer, `Err` (the status
/// or the error) otherwise.
pub async fn probe(url: &str, timeout: Duration) -> Result<String, String> {
    let at = redact_url(url);
    let client = reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(timeout)
        .build()
        .map_err(|e| format!("cannot build the HTTP client: {e}"))?;
    match client.get(url).send().await {
        Ok(r) if r.status().is_success() => Ok(format!("{at}: {}", r.status())),
        Ok(r) => Err(format!("{at}: {}", r.status())),
        Err(e) => {
            let mut text = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                text.push_str(&format!(": {s}"));
                source = s.source();
            }
            Err(redact_text(&format!("{at}: {text}")))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The grants the check asks for are exactly the grants of deploy/sql/grants.sql.
    #[test]
    fn the_grants_checked_are_those_of_the_deploy_file() {
        let file = include_str!("../deploy/sql/grants.sql");
        let sql: String = file
            .lines()
            .map(|l| l.split("--").next().unwrap_or(""))
            .collect::<Vec<_>>()
            .join(" ");
        let mut from_file: Vec<(String, String, String)> = Vec::new();
        for stmt in sql.split(';') {
            let stmt = stmt.split_whitespace().collect::<Vec<_>>().join(" ");
            let Some(rest) = stmt.strip_prefix("GRANT ") else {
                assert!(stmt.is_empty(), "not a GRANT: {stmt}");
                continue;
            };
            let (privs, rest) = rest.split_once(" ON ").unwrap();
            let (objects, role) = rest.rsplit_once(" TO ").unwrap();
            assert_eq!(role, "loansync");
            let (kind, objects) = match objects.split_once(' ') {
                Some((k @ ("SCHEMA" | "SEQUENCE"), o)) => (k, o),
                _ => ("TABLE", objects),
            };
            for p in privs.split(',') {
                for o in objects.split(',') {
                    from_file.push((kind.into(), o.trim().into(), p.trim().into()));
                }
            }
        }
        let mut ours: Vec<(String, String, String)> = Vec::new();
        for g in GRANTS {
            let kind = match g.on {
                On::Schema => "SCHEMA",
                On::Table => "TABLE",
                On::Sequence => "SEQUENCE",
            };
            for p in g.privileges {
                for n in g.names {
                    ours.push((kind.into(), n.to_string(), p.to_string()));
                }
            }
        }
        from_file.sort();
        ours.sort();
        assert_eq!(ours, from_file);
        assert!(ours.len() > 30, "{ours:?}");
    }

    #[test]
    fn role_names_are_quoted_when_sql_needs_it() {
        assert_eq!(quote_ident("loansync"), "loansync");
        assert_eq!(quote_ident("ls_app_1a2b"), "ls_app_1a2b");
        assert_eq!(quote_ident("LoanSync"), "\"LoanSync\"");
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
        assert_eq!(quote_ident("1x"), "\"1x\"");
    }

    #[test]
    fn a_config_failure_fails_config_and_skips_the_rest() {
        let e = Settings::from_lookup(|k| (k == "ETL_BATCH_SIZE_LOANS").then(|| "lots".into()))
            .unwrap_err();
        let r = config_failed(&e);
        assert_eq!(r.exit_code(), 1);
        assert_eq!(r.0[0].name, "config");
        assert_eq!(r.0[0].result, Outcome::Failed);
        assert!(r.0[0].detail.starts_with("ETL_BATCH_SIZE_LOANS: "));
        assert_eq!(r.0.len(), 8);
        assert!(r.0[1..].iter().all(|c| c.result == Outcome::Skipped));
        let json: serde_json::Value = serde_json::from_str(&r.render_json()).unwrap();
        assert_eq!(json[0]["result"], "failed");
        assert_eq!(json[7]["name"], "api");
        assert!(r.render_table().starts_with("check"));
    }
}
