//! The `loansync` command line: parse, set up telemetry, call the application layer
//! ([`crate::app`]), print, map to an exit code.
//!
//! Exit codes: 0 success (for `sync`: the sync `completed`); 1 an error (configuration,
//! connection, ...); 2 a usage error; the outcomes of a sync are
//! [`app::EXIT_PARTIAL`], [`app::EXIT_FAILED`], [`app::EXIT_BUSY`] and
//! [`app::EXIT_TIMEOUT`] (README "Exit codes").

use crate::app::sync::{Started, Work};
use crate::app::{self, EXIT_BUSY};
use crate::config::Settings;
use crate::domain::{EntityKind, PlanRequest, SyncType};
use crate::ledger;
use crate::planner::{self, PlanOutcome};
use crate::{db, telemetry};
use clap::{Args, Parser, Subcommand};
use std::process::ExitCode;
use std::sync::Arc;

#[derive(Parser, Debug)]
#[command(
    name = "loansync",
    version,
    about = "Keeps the analytics platform in sync with the lending database.",
    after_long_help = crate::config::env::env_help()
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Args, Debug, Clone)]
pub struct SyncSelection {
    /// A full sync (every row that passes the filters) instead of an incremental one.
    #[arg(long)]
    pub full: bool,
    /// Only these entities (repeatable); all four when absent.
    #[arg(long = "entity", value_name = "E")]
    pub entities: Vec<EntityKind>,
    /// A sweep: send what timestamps miss (records whose fingerprint differs from what
    /// was delivered, or never delivered) and record deleted ids (`deletes list`).
    /// Moves no watermark.
    #[arg(long, conflicts_with = "full")]
    pub sweep: bool,
}

impl SyncSelection {
    fn request(&self, request_id: Option<String>) -> PlanRequest {
        PlanRequest {
            sync_type: if self.full {
                SyncType::Full
            } else {
                SyncType::Incremental
            },
            entities: (!self.entities.is_empty()).then(|| self.entities.clone()),
            request_id,
            since: None,
            until: None,
            sweep: self.sweep,
        }
    }
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Apply loansync's migrations (idempotent; never alters Django's tables).
    Migrate,
    /// Consume planning messages and plan syncs (long-running).
    Planner,
    /// Consume chunk jobs and deliver them (long-running).
    Worker,
    /// Publish a planning message (and, with --wait, wait for its sync's outcome).
    Trigger {
        #[command(flatten)]
        selection: SyncSelection,
        /// Idempotency of the trigger: a repeated id plans nothing new (default: a new
        /// UUID). In a Kubernetes Job, the Job's name (downward API), so that a retried
        /// pod never plans twice.
        #[arg(long, env = "ETL_REQUEST_ID")]
        request_id: Option<String>,
        /// A backfill: rows changed at or after this time (RFC 3339), whatever the
        /// watermarks say. Incremental selection; moves no watermark.
        #[arg(long, value_name = "TS", conflicts_with_all = ["full", "sweep"])]
        since: Option<chrono::DateTime<chrono::Utc>>,
        /// A backfill's end (exclusive, RFC 3339; default: now).
        #[arg(long, value_name = "TS", requires = "since")]
        until: Option<chrono::DateTime<chrono::Utc>>,
        /// Wait until the sync that serves this request has finished, and exit with its
        /// outcome (0 completed, 10 partial_success, 11 failed, 13 timed out).
        #[arg(long)]
        wait: bool,
        /// With --wait: give up waiting after this long (e.g. 90s, 45m, 3h); the sync
        /// goes on.
        #[arg(long, value_name = "DURATION", requires = "wait", value_parser = humantime::parse_duration)]
        timeout: Option<std::time::Duration>,
        /// With --wait: print the outcome as JSON.
        #[arg(long, requires = "wait")]
        json: bool,
    },
    /// Run one sync in this process (planner and workers over an in-memory queue; no broker).
    Sync {
        #[command(flatten)]
        selection: SyncSelection,
        /// Print the outcome as JSON (no progress bars).
        #[arg(long)]
        json: bool,
    },
    /// Show recent syncs, or one sync's per-entity progress.
    Status {
        sync_id: Option<String>,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
        /// How many recent syncs to list.
        #[arg(long, default_value_t = 10)]
        limit: i64,
    },
    /// Re-publish a stalled sync's unsettled chunks from the chunk ledger.
    Resume {
        sync_id: String,
        /// Work the chunks in this process instead (no broker; for single-process installs).
        #[arg(long)]
        in_process: bool,
        /// Print the outcome as JSON.
        #[arg(long)]
        json: bool,
    },
    /// End a sync by hand: its unsettled records fail with SYNC_ABANDONED (error rows,
    /// retryable with `errors retry`), its history row says `failed`, no watermark moves.
    Abandon {
        sync_id: String,
        /// Why, in the history row's error_message.
        #[arg(long, default_value = "abandoned by an operator (loansync abandon)")]
        reason: String,
    },
    /// Run the local analytics API (stub) with optional fault injection.
    #[cfg(feature = "dev-tools")]
    StubApi(StubArgs),
    /// Fill a database holding the Django source schema with synthetic data.
    #[cfg(feature = "dev-tools")]
    Seed {
        /// 1 is 20 users, 1,000 customers, 2,000 loans, 10,000 repayments; 100 is dataset M.
        #[arg(long, default_value_t = 1.0)]
        scale: f64,
        #[arg(long)]
        users: Option<i64>,
        #[arg(long)]
        customers: Option<i64>,
        #[arg(long)]
        loans: Option<i64>,
        #[arg(long)]
        repayments: Option<i64>,
        /// Seed of the generator: the same seed gives the same data.
        #[arg(long, default_value_t = 42)]
        seed: i64,
        /// Empty the source tables first. Refused when they hold rows `loansync seed` did
        /// not write, unless --confirm-database names the database.
        #[arg(long)]
        reset: bool,
        /// With --reset: empty the source tables even if they hold rows the seed did not
        /// write. NAME must be the name of the database DATABASE_URL points at.
        #[arg(long, value_name = "NAME", requires = "reset")]
        confirm_database: Option<String>,
    },
    /// The whole system end to end on this machine's services (see README).
    #[cfg(feature = "dev-tools")]
    Demo(crate::demo::DemoArgs),
    /// See, resolve and retry per-record errors (`etl_folder_etlsyncerror`).
    #[command(subcommand)]
    Errors(ErrorsCommand),
    /// Show or set the watermarks (`etl_folder_etllastsync`).
    #[command(subcommand)]
    Watermark(WatermarkCommand),
    /// Records deleted from the source (or no longer selected) that sweeps found
    /// (`loansync_deleted`); not sent: the analytics API has no delete.
    #[command(subcommand)]
    Deletes(DeletesCommand),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell) to stdout,
    /// e.g. `loansync completions bash > /etc/bash_completion.d/loansync`.
    Completions { shell: clap_complete::Shell },
    /// Check that this installation can work: the settings, PostgreSQL and the grants of
    /// deploy/sql/grants.sql, the migrations, invalid indexes, how the sync window's end
    /// is capped, the broker's queues, the analytics API's key. Exit 0 when nothing failed, 1 otherwise.
    Check {
        /// Print a JSON array of `{name, result, detail}` instead of a table.
        #[arg(long)]
        json: bool,
        /// Skip these checks (comma-separated): database, migrations, indexes, window, broker,
        /// api.
        #[arg(long, value_name = "NAME,...", value_delimiter = ',')]
        skip: Vec<crate::check::CheckName>,
        /// Longest wait of each check (e.g. 5s, 30s); a dependency that does not answer
        /// fails its check.
        #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = humantime::parse_duration)]
        timeout: std::time::Duration,
    },
    /// GET a URL: exit 0 on a 2xx answer, 1 otherwise (a healthcheck for images without
    /// curl). Needs no settings.
    Probe {
        url: String,
        /// Longest wait for the answer (e.g. 2s, 500ms).
        #[arg(long, value_name = "DURATION", default_value = "2s", value_parser = humantime::parse_duration)]
        timeout: std::time::Duration,
    },
}

#[derive(Subcommand, Debug)]
pub enum WatermarkCommand {
    /// Each entity's watermark: where its next incremental sync starts (less the overlap).
    Show {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Move an entity's watermark (e.g. back, to sync a period again through the regular
    /// incremental syncs). Audited: a history row says who moved it, from where, and why.
    /// Refused while a sync is planning or running.
    Set {
        entity: EntityKind,
        /// The new watermark (RFC 3339).
        to: chrono::DateTime<chrono::Utc>,
        /// Why, for the audit row.
        #[arg(long, default_value = "set by an operator")]
        reason: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum DeletesCommand {
    /// List the deleted records, by entity and id.
    List {
        #[arg(long)]
        entity: Option<EntityKind>,
        #[arg(long, default_value_t = 1000)]
        limit: i64,
        /// Print a JSON array of `{entity, id, detected_at, sync_id}`.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum ErrorsCommand {
    /// List error rows, newest first.
    List {
        #[arg(long = "sync")]
        sync_id: Option<String>,
        #[arg(long)]
        entity: Option<EntityKind>,
        /// Only rows not resolved yet.
        #[arg(long)]
        unresolved: bool,
        #[arg(long, default_value_t = 50)]
        limit: i64,
        #[arg(long)]
        json: bool,
    },
    /// Mark error rows resolved by hand (by their `id`).
    Resolve {
        #[arg(required = true)]
        ids: Vec<i32>,
    },
    /// Re-deliver the records of unresolved error rows in a new sync that moves no
    /// watermark; rows that fail again get `retry_count` + 1.
    Retry {
        #[arg(long = "entity", value_name = "E")]
        entities: Vec<EntityKind>,
        /// Work the retry in this process instead of publishing its chunks.
        #[arg(long)]
        in_process: bool,
    },
}

#[cfg(feature = "dev-tools")]
#[derive(Args, Debug)]
pub struct StubArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8088", env = "STUB_ADDR")]
    pub addr: std::net::SocketAddr,
    /// Bearer key it accepts (default: ANALYTICS_API_KEY, else the local development key).
    #[arg(long, env = "ANALYTICS_API_KEY", hide_env_values = true)]
    pub key: Option<String>,
    /// Fraction of requests answered 503.
    #[arg(long, default_value_t = 0.0)]
    pub error_5xx_rate: f64,
    /// Fraction of requests answered 429 with Retry-After.
    #[arg(long = "rate-429", default_value_t = 0.0)]
    pub rate_429: f64,
    /// Retry-After seconds on 429 and 503 answers (0: none on 503s).
    #[arg(long, default_value_t = 1)]
    pub retry_after_secs: u64,
    /// Fraction of requests answered slowly, and how slowly.
    #[arg(long, default_value_t = 0.0)]
    pub slow_rate: f64,
    #[arg(long, default_value_t = 2000)]
    pub slow_ms: u64,
    /// Fraction of connections dropped without an answer.
    #[arg(long, default_value_t = 0.0)]
    pub drop_rate: f64,
    /// Reject (in a 200's `rejected` list) every id divisible by N.
    #[arg(long, default_value_t = 0)]
    pub reject_every_nth: u64,
    /// Refuse (422) any batch holding one of these ids.
    #[arg(long, value_delimiter = ',')]
    pub refuse_ids: Vec<i64>,
    /// Seed of the fault randomness.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    // Needs no settings: it only describes the command line.
    if let Command::Completions { shell } = cli.command {
        clap_complete::generate(
            shell,
            &mut <Cli as clap::CommandFactory>::command(),
            "loansync",
            &mut std::io::stdout(),
        );
        return ExitCode::SUCCESS;
    }
    // A healthcheck needs no settings: it works whatever the environment holds.
    if let Command::Probe { url, timeout } = &cli.command {
        let runtime = match runtime() {
            Ok(rt) => rt,
            Err(code) => return code,
        };
        return ExitCode::from(runtime.block_on(probe(url, *timeout)));
    }
    let settings = match Settings::from_env() {
        Ok(s) => s,
        Err(e) => {
            if let Command::Check { json, .. } = &cli.command {
                // `check` reports a configuration that does not load as its first check.
                print_check(&crate::check::config_failed(&e), *json);
                return ExitCode::from(1);
            }
            eprintln!("loansync: configuration error: {e}");
            return ExitCode::from(1);
        }
    };
    // A build without `dev-tools` has no default API URL or key: a command that calls the
    // API refuses to start without them, before it touches anything.
    if let (Some(command), Err(e)) = (calls_api(&cli.command), settings.api()) {
        eprintln!(
            "loansync: configuration error: {e}; `loansync {command}` calls the analytics API"
        );
        return ExitCode::from(1);
    }
    // The demo prints its own progress, and `check` its report: their logs only speak
    // of trouble unless asked.
    let default_filter = if quiet_logs(&cli.command) {
        "warn"
    } else {
        "info"
    };
    telemetry::init_logging(settings.log_format, default_filter);
    if let Err(e) = crate::failpoints::setup_from_env() {
        eprintln!("loansync: {}: {e}", crate::failpoints::ENV);
        return ExitCode::from(1);
    }
    let runtime = match runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    match runtime.block_on(run(cli.command, settings)) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            // Library errors may quote a URL: never print its credentials.
            let e = crate::redact::redact_text(&format!("{e:#}"));
            tracing::error!(error = %e, "loansync failed");
            eprintln!("loansync: {e}");
            ExitCode::from(1)
        }
    }
}

/// The command as written, when it sends records to the analytics API and so needs its
/// settings ([`Settings::api`]) before it starts. `check` is not one: it reports a missing
/// API setting on its `api` line, which `--skip api` skips.
fn calls_api(command: &Command) -> Option<&'static str> {
    match command {
        Command::Worker => Some("worker"),
        Command::Sync { .. } => Some("sync"),
        Command::Resume {
            in_process: true, ..
        } => Some("resume --in-process"),
        Command::Errors(ErrorsCommand::Retry {
            in_process: true, ..
        }) => Some("errors retry --in-process"),
        #[cfg(feature = "dev-tools")]
        Command::Demo(_) => Some("demo"),
        // The stub takes the key it accepts from the settings, and has no URL to call.
        #[cfg(feature = "dev-tools")]
        Command::StubApi(_) => None,
        #[cfg(feature = "dev-tools")]
        Command::Seed { .. } => None,
        Command::Migrate
        | Command::Planner
        | Command::Trigger { .. }
        | Command::Status { .. }
        | Command::Resume { .. }
        | Command::Abandon { .. }
        | Command::Errors(ErrorsCommand::List { .. } | ErrorsCommand::Resolve { .. })
        | Command::Errors(ErrorsCommand::Retry { .. })
        | Command::Watermark(_)
        | Command::Deletes(_)
        | Command::Completions { .. }
        | Command::Check { .. }
        | Command::Probe { .. } => None,
    }
}

/// True for the commands that print their own progress or report.
fn quiet_logs(command: &Command) -> bool {
    #[cfg(feature = "dev-tools")]
    if matches!(command, Command::Demo(_)) {
        return true;
    }
    matches!(command, Command::Check { .. })
}

fn runtime() -> Result<tokio::runtime::Runtime, ExitCode> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| {
            eprintln!("loansync: cannot start the runtime: {e}");
            ExitCode::from(1)
        })
}

fn print_check(report: &crate::check::Report, json: bool) {
    if json {
        println!("{}", report.render_json());
    } else {
        print!("{}", report.render_table());
    }
}

/// `loansync probe`: the status on stdout and 0, or the status or error on stderr and 1.
async fn probe(url: &str, timeout: std::time::Duration) -> u8 {
    match crate::check::probe(url, timeout).await {
        Ok(status) => {
            println!("{status}");
            0
        }
        Err(e) => {
            eprintln!("loansync probe: {e}");
            1
        }
    }
}

async fn run(command: Command, settings: Settings) -> anyhow::Result<u8> {
    let settings = Arc::new(settings);
    match command {
        Command::Migrate => {
            let pool = db::connect(&settings).await?;
            db::migrate(&pool).await?;
            println!("migrations applied to {}", settings.database_url_redacted());
            Ok(0)
        }
        Command::Planner => {
            app::run_planner_process(settings).await?;
            Ok(0)
        }
        Command::Worker => {
            app::run_worker_process(settings).await?;
            Ok(0)
        }
        Command::Trigger {
            selection,
            request_id,
            since,
            until,
            wait,
            timeout,
            json,
        } => {
            let request_id = request_id.unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
            let mut req = selection.request(Some(request_id.clone()));
            req.since = since;
            req.until = until;
            planner::parse_plan(&serde_json::to_vec(&req)?).map_err(anyhow::Error::msg)?;
            // Connect to the database first: a --wait that cannot follow its request
            // publishes nothing.
            let pool = if wait {
                Some(db::connect(&settings).await?)
            } else {
                None
            };
            let broker = app::connect_broker(&settings).await?;
            broker
                .publish_json(&broker.topology.plan, std::slice::from_ref(&req))
                .await?;
            broker.close().await;
            eprintln!(
                "published a {} planning message (request_id {request_id}) to {}",
                if req.since.is_some() {
                    "backfill"
                } else if req.sweep {
                    "sweep"
                } else {
                    req.sync_type.as_str()
                },
                broker.topology.plan
            );
            match pool {
                None => Ok(0),
                Some(pool) => {
                    let waited = app::wait_for_request(
                        &pool,
                        &request_id,
                        timeout,
                        app::wait::WAIT_POLL,
                        None,
                    )
                    .await?;
                    waited.print(json)?;
                    Ok(waited.exit_code())
                }
            }
        }
        Command::Sync { selection, json } => {
            let pool = db::connect(&settings).await?;
            let summary = app::sync::run_in_process(
                &pool,
                &settings,
                Work::Plan(selection.request(None)),
                !json,
            )
            .await?;
            summary.print(json)?;
            Ok(summary.exit_code())
        }
        Command::Status {
            sync_id,
            json,
            limit,
        } => {
            let pool = db::connect(&settings).await?;
            status(&pool, &settings, sync_id.as_deref(), json, limit).await?;
            Ok(0)
        }
        Command::Resume {
            sync_id,
            in_process: true,
            json,
        } => {
            let pool = db::connect(&settings).await?;
            let summary = match app::sync::start(&pool, &settings, Work::Resume(sync_id)).await? {
                Started::Running(sync) => {
                    eprintln!(
                        "working {} unsettled chunks of sync {} in this process",
                        sync.chunks(),
                        sync.sync_id()
                    );
                    sync.run(false).await?
                }
                Started::Busy(report) => report,
            };
            summary.print(json)?;
            Ok(summary.exit_code())
        }
        Command::Resume { sync_id, json, .. } => {
            let pool = db::connect(&settings).await?;
            let broker = app::connect_broker(&settings).await?;
            let n = planner::resume(&pool, &sync_id, &broker).await?;
            broker.close().await;
            if json {
                println!(
                    "{}",
                    serde_json::json!({ "sync_id": sync_id, "republished": n })
                );
            } else {
                println!("re-published {n} unsettled chunks of sync {sync_id}");
            }
            Ok(0)
        }
        Command::Abandon { sync_id, reason } => {
            let pool = db::connect(&settings).await?;
            // A live planner holds the lock while it plans: abandon waits for it, so it
            // never ends a sync that is being planned right now.
            let done = ledger::lifecycle::with_planning_lock(&pool, async |lock| {
                anyhow::Ok(ledger::end::abandon_sync(&pool, lock, &sync_id, &reason).await?)
            })
            .await;
            match done? {
                ledger::end::Abandoned::NotActive { state } => anyhow::bail!(
                    "sync {sync_id} is not planning or running ({}): nothing to abandon",
                    state.map_or("no such sync", |s| s.as_str())
                ),
                how => {
                    let what = match how {
                        ledger::end::Abandoned::Planning => {
                            "it had not been planned: nothing was sent"
                        }
                        _ => {
                            "its unsettled records failed with SYNC_ABANDONED; `loansync errors retry` delivers them"
                        }
                    };
                    println!("abandoned sync {sync_id}: {what}");
                    let summary = app::summarize(&pool, sync_id).await?;
                    print!("{}", summary.render());
                    Ok(0)
                }
            }
        }
        #[cfg(feature = "dev-tools")]
        Command::Seed {
            scale,
            users,
            customers,
            loans,
            repayments,
            seed,
            reset,
            confirm_database,
        } => {
            let pool = db::connect(&settings).await?;
            if reset {
                crate::seed::reset_source(&pool, confirm_database.as_deref()).await?;
            }
            let mut spec = crate::seed::SeedSpec::scale(scale, seed);
            spec.users = users.unwrap_or(spec.users);
            spec.customers = customers.unwrap_or(spec.customers);
            spec.loans = loans.unwrap_or(spec.loans);
            spec.repayments = repayments.unwrap_or(spec.repayments);
            let report = crate::seed::seed(&pool, spec).await?;
            println!("{}", serde_json::to_string_pretty(&report)?);
            Ok(0)
        }
        #[cfg(feature = "dev-tools")]
        Command::Demo(args) => crate::demo::run(args, &settings).await,
        Command::Errors(cmd) => errors(cmd, &settings).await,
        Command::Watermark(cmd) => watermark(cmd, &settings).await,
        Command::Deletes(cmd) => deletes(cmd, &settings).await,
        // Handled in `main`, before any setting is read.
        Command::Completions { .. } => Ok(0),
        Command::Check {
            json,
            skip,
            timeout,
        } => {
            let report = crate::check::run(&settings, &skip, timeout).await;
            print_check(&report, json);
            Ok(report.exit_code())
        }
        Command::Probe { url, timeout } => Ok(probe(&url, timeout).await),
        #[cfg(feature = "dev-tools")]
        Command::StubApi(args) => {
            use crate::stub_api;
            use secrecy::ExposeSecret;
            let cfg = stub_api::StubConfig {
                api_key: match args.key {
                    Some(key) => key,
                    None => settings.api()?.key.expose_secret().to_string(),
                },
                faults: stub_api::Faults {
                    error_5xx_rate: args.error_5xx_rate,
                    rate_429: args.rate_429,
                    retry_after_secs: args.retry_after_secs,
                    slow_rate: args.slow_rate,
                    slow_ms: args.slow_ms,
                    drop_rate: args.drop_rate,
                    reject_every_nth: args.reject_every_nth,
                    refuse_ids: args.refuse_ids,
                    seed: args.seed,
                    ..Default::default()
                },
            };
            println!("stub analytics API listening on http://{}", args.addr);
            stub_api::run_standalone(cfg, args.addr, app::shutdown_signal()).await?;
            Ok(0)
        }
    }
}

/// What `status` says after a stalled sync, and what to do about it.
fn stalled_hint(s: &ledger::reads::SyncSummary) -> &'static str {
    let state = s.state.as_deref().and_then(|st| st.parse().ok());
    match (s.stalled, state) {
        (false, _) => "",
        (true, Some(ledger::states::SyncState::Planning)) => {
            "  (STALLED: its planner is gone; the next sync abandons it, or run `loansync abandon`)"
        }
        (true, _) => "  (STALLED: run `loansync resume`, or `loansync abandon` to end it)",
    }
}

async fn status(
    pool: &sqlx::PgPool,
    settings: &Settings,
    sync_id: Option<&str>,
    json: bool,
    limit: i64,
) -> anyhow::Result<()> {
    let stale = settings.stale_sync_after.as_secs() as i64;
    let syncs = ledger::reads::recent_syncs(pool, sync_id, limit, stale).await?;
    if let Some(id) = sync_id {
        let Some(s) = syncs.first() else {
            anyhow::bail!("no sync {id}");
        };
        let progress = ledger::reads::entity_progress(pool, id).await?;
        if json {
            println!(
                "{}",
                serde_json::to_string_pretty(
                    &serde_json::json!({ "sync": s, "entities": progress })
                )?
            );
        } else {
            println!(
                "sync {}  {}  {}{}",
                s.sync_id,
                s.sync_type,
                s.status,
                stalled_hint(s)
            );
            println!(
                "window   {} .. {}",
                s.sync_start_date
                    .map(|d| d.to_rfc3339())
                    .unwrap_or_else(|| "-".into()),
                s.sync_end_date
                    .map(|d| d.to_rfc3339())
                    .unwrap_or_else(|| "-".into())
            );
            if let (Some(t), Some(r)) = (s.chunks_total, s.chunks_remaining) {
                println!("chunks   {} of {} settled", t - r, t);
            }
            if let Some(d) = s.duration_seconds {
                println!("duration {d:.2}s");
            }
            if let Some(m) = &s.error_message {
                println!("error    {m}");
            }
            println!(
                "{:<10} {:>10} {:>10} {:>10}",
                "entity", "total", "success", "failed"
            );
            for p in progress {
                println!(
                    "{:<10} {:>10} {:>10} {:>10}",
                    p.entity.as_str(),
                    p.total,
                    p.success,
                    p.failed
                );
            }
        }
        return Ok(());
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&syncs)?);
    } else {
        println!(
            "{:<36}  {:<11}  {:<15}  {:<20}  {:>9}",
            "sync_id", "type", "status", "started", "seconds"
        );
        for s in syncs {
            println!(
                "{:<36}  {:<11}  {:<15}  {:<20}  {:>9}",
                s.sync_id,
                s.sync_type,
                if s.stalled {
                    "STALLED".to_string()
                } else {
                    s.status.clone()
                },
                s.started_at.format("%Y-%m-%d %H:%M:%S"),
                s.duration_seconds
                    .map(|d| format!("{d:.2}"))
                    .unwrap_or_else(|| "-".into())
            );
        }
        let deleted = ledger::reads::deleted_counts(pool).await?;
        if !deleted.is_empty() {
            let per: Vec<String> = deleted
                .iter()
                .map(|d| format!("{}: {}", d.entity, d.count))
                .collect();
            println!(
                "\ndeleted records found by sweeps (not sent, the API has no delete): {} (`loansync deletes list`)",
                per.join(", ")
            );
        }
        let pending = ledger::lifecycle::pending_requests(pool).await?;
        if !pending.is_empty() {
            println!(
                "\n{} planning request(s) pending, run when the current sync ends (coalesced):",
                pending.len()
            );
            for p in pending {
                let kind = if p.since.is_some() {
                    "backfill"
                } else {
                    p.kind.as_str()
                };
                println!(
                    "  {:<36}  {kind:<11}  received {}",
                    p.request_id,
                    p.received_at.format("%Y-%m-%d %H:%M:%S")
                );
            }
        }
    }
    Ok(())
}

async fn deletes(cmd: DeletesCommand, settings: &Settings) -> anyhow::Result<u8> {
    let pool = db::connect(settings).await?;
    match cmd {
        DeletesCommand::List {
            entity,
            limit,
            json,
        } => {
            let rows = ledger::reads::list_deleted(&pool, entity, limit).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                println!("{:<10} {:>12}  {:<25}  sync", "entity", "id", "detected");
                for r in &rows {
                    println!(
                        "{:<10} {:>12}  {:<25}  {}",
                        r.entity,
                        r.id,
                        r.detected_at.format("%Y-%m-%d %H:%M:%S"),
                        r.sync_id
                    );
                }
                eprintln!(
                    "{} deleted record(s) listed; not sent: the analytics API has no delete",
                    rows.len()
                );
            }
            Ok(0)
        }
    }
}

async fn watermark(cmd: WatermarkCommand, settings: &Settings) -> anyhow::Result<u8> {
    let pool = db::connect(settings).await?;
    match cmd {
        WatermarkCommand::Show { json } => {
            let marks = ledger::watermarks::all(&pool).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&marks)?);
            } else {
                println!("{:<10}  {:<32}  {:<40}", "entity", "watermark", "set by");
                for m in &marks {
                    println!(
                        "{:<10}  {:<32}  {:<40}",
                        m.entity,
                        m.last_sync_timestamp.to_rfc3339(),
                        m.last_sync_id
                    );
                }
                for e in EntityKind::ALL {
                    if !marks.iter().any(|m| m.entity == e.as_str()) {
                        println!(
                            "{:<10}  {:<32}  (never synced: the next incremental sync starts ETL_DEFAULT_LOOKBACK_DAYS back)",
                            e.as_str(),
                            "-"
                        );
                    }
                }
            }
            Ok(0)
        }
        WatermarkCommand::Set { entity, to, reason } => {
            let set = ledger::lifecycle::with_planning_lock(&pool, async |lock| {
                anyhow::Ok(
                    ledger::watermarks::set_watermark(&pool, lock, entity, to, &reason).await?,
                )
            })
            .await;
            match set? {
                ledger::watermarks::WatermarkSet::Moved {
                    from,
                    audit_sync_id,
                } => {
                    println!(
                        "watermark of {entity} moved from {} to {} (audit: history row {audit_sync_id})",
                        from.map_or_else(|| "none".to_string(), |t| t.to_rfc3339()),
                        to.to_rfc3339()
                    );
                    Ok(0)
                }
                ledger::watermarks::WatermarkSet::Busy { active_sync_id } => {
                    eprintln!(
                        "sync {active_sync_id} is in progress: its end would overwrite the watermark; \
                         set it once `loansync status` shows no sync running"
                    );
                    Ok(EXIT_BUSY)
                }
            }
        }
    }
}

async fn errors(cmd: ErrorsCommand, settings: &Arc<Settings>) -> anyhow::Result<u8> {
    let pool = db::connect(settings).await?;
    match cmd {
        ErrorsCommand::List {
            sync_id,
            entity,
            unresolved,
            limit,
            json,
        } => {
            let rows =
                ledger::errors::list_errors(&pool, sync_id.as_deref(), entity, unresolved, limit)
                    .await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                println!(
                    "{:>7}  {:<10} {:>10}  {:<20} {:>5}  {:<8}  message",
                    "id", "entity", "entity_id", "code", "tries", "resolved"
                );
                for r in rows {
                    println!(
                        "{:>7}  {:<10} {:>10}  {:<20} {:>5}  {:<8}  {}",
                        r.id,
                        r.entity_type,
                        r.entity_id,
                        r.error_code.as_deref().unwrap_or("-"),
                        r.retry_count,
                        if r.resolved { "yes" } else { "no" },
                        r.error_message.chars().take(100).collect::<String>()
                    );
                }
            }
            Ok(0)
        }
        ErrorsCommand::Resolve { ids } => {
            let n = ledger::errors::resolve_errors(&pool, &ids).await?;
            println!(
                "resolved {n} of {} error rows (the others were already resolved or do not exist)",
                ids.len()
            );
            Ok(0)
        }
        ErrorsCommand::Retry {
            entities,
            in_process,
        } => {
            if in_process {
                match app::sync::start(&pool, settings, Work::Retry(entities)).await? {
                    Started::Busy(report) => {
                        println!(
                            "another sync is in progress ({}); retry later",
                            report.busy_with.as_deref().unwrap_or("-")
                        );
                        Ok(EXIT_BUSY)
                    }
                    Started::Running(sync) => {
                        let summary = sync.run(false).await?;
                        print!("{}", summary.render());
                        Ok(summary.exit_code())
                    }
                }
            } else {
                let broker = app::connect_broker(settings).await?;
                let outcome = planner::plan_retry(&pool, settings, &entities, &broker).await?;
                broker.close().await;
                match outcome {
                    PlanOutcome::Planned {
                        sync_id, totals, ..
                    } => {
                        println!(
                            "retry sync {sync_id} planned: {:?}; workers deliver it (`loansync status {sync_id}`)",
                            totals.records
                        );
                        Ok(0)
                    }
                    PlanOutcome::Busy { active_sync_id } => {
                        println!("another sync is in progress ({active_sync_id}); retry later");
                        Ok(EXIT_BUSY)
                    }
                    PlanOutcome::Duplicate { sync_id, .. } => {
                        println!("retry sync {sync_id} already planned");
                        Ok(0)
                    }
                    PlanOutcome::Pending { request_id, .. } => {
                        anyhow::bail!("retry {request_id} was queued instead of planned")
                    }
                }
            }
        }
    }
}
