//! The `loansync` command line: parse, set up telemetry, dispatch, map to an exit code.
//!
//! Exit codes: 0 success (for `sync`: the sync `completed`); 1 an error (configuration,
//! connection, ...); 2 `sync` ended `partial_success`; 3 `sync` ended `failed`;
//! 4 `sync` did not run because another sync is in progress.

use crate::config::Settings;
use crate::domain::{EntityKind, PlanRequest, SyncType};
use crate::ledger::{self, FinalStatus};
use crate::planner::{self, PlanOutcome};
use crate::queue::amqp::{Broker, BrokerHealth, BrokerOptions};
use crate::queue::memory::MemoryQueue;
use crate::sink::AnalyticsClient;
use crate::worker::{self, WorkerContext};
use crate::{db, http, stub_api, telemetry};
use clap::{Args, Parser, Subcommand};
use secrecy::ExposeSecret;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use tokio_util::sync::CancellationToken;

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

#[derive(Parser, Debug)]
#[command(
    name = "loansync",
    version,
    about = "Keeps the analytics platform in sync with the lending database.",
    after_long_help = crate::config::env_help()
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
    StubApi(StubArgs),
    /// Fill a database holding the Django source schema with synthetic data.
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
    /// deploy/sql/grants.sql, the migrations, invalid indexes, the broker's queues, the
    /// analytics API's key. Exit 0 when nothing failed, 1 otherwise.
    Check {
        /// Print a JSON array of `{name, result, detail}` instead of a table.
        #[arg(long)]
        json: bool,
        /// Skip these checks (comma-separated): database, migrations, indexes, broker, api.
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
    // The demo prints its own progress, and `check` its report: their logs only speak
    // of trouble unless asked.
    let default_filter = if matches!(cli.command, Command::Demo(_) | Command::Check { .. }) {
        "warn"
    } else {
        "info"
    };
    telemetry::init_logging(settings.log_format, default_filter);
    let runtime = match runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    match runtime.block_on(run(cli.command, settings)) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            // Library errors may quote a URL: never print its credentials.
            let e = crate::config::redact_text(&format!("{e:#}"));
            tracing::error!(error = %e, "loansync failed");
            eprintln!("loansync: {e}");
            ExitCode::from(1)
        }
    }
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

/// Resolves on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
    tracing::info!("shutdown requested");
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
            let pool = db::connect(&settings).await?;
            let consuming = Arc::new(AtomicBool::new(false));
            let health = BrokerHealth::default();
            start_http(&settings, &pool, &consuming, &health).await?;
            run_planner_with(
                pool,
                settings.clone(),
                consuming,
                health,
                on_shutdown_signal(),
            )
            .await?;
            Ok(0)
        }
        Command::Worker => {
            let pool = db::connect(&settings).await?;
            let consuming = Arc::new(AtomicBool::new(false));
            let health = BrokerHealth::default();
            start_http(&settings, &pool, &consuming, &health).await?;
            run_worker_with(
                pool,
                settings.clone(),
                consuming,
                health,
                on_shutdown_signal(),
            )
            .await?;
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
            let broker = connect_broker(&settings).await?;
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
                    let waited = wait_for_request(&pool, &request_id, timeout).await?;
                    if json {
                        println!("{}", serde_json::to_string_pretty(&waited)?);
                    } else {
                        print!("{}", waited.render());
                    }
                    Ok(waited.exit_code())
                }
            }
        }
        Command::Sync { selection, json } => {
            let pool = db::connect(&settings).await?;
            let summary =
                sync_in_process_with(&pool, &settings, &selection.request(None), !json).await?;
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
            let queue = MemoryQueue::new();
            let n = planner::resume(&pool, &sync_id, &queue).await?;
            eprintln!("working {n} unsettled chunks of sync {sync_id} in this process");
            let ctx = Arc::new(worker_context(&settings, pool.clone())?);
            worker::run_memory(ctx, queue, settings.worker_concurrency).await;
            planner::finalize_settled(&pool).await;
            let summary = summarize(&pool, sync_id).await?;
            summary.print(json)?;
            Ok(summary.exit_code())
        }
        Command::Resume { sync_id, json, .. } => {
            let pool = db::connect(&settings).await?;
            let broker = connect_broker(&settings).await?;
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
            let lock = ledger::PlanningLock::acquire(&pool).await?;
            let done = ledger::abandon_sync(&pool, &lock, &sync_id, &reason).await;
            lock.release().await;
            match done? {
                ledger::Abandoned::NotActive { state } => anyhow::bail!(
                    "sync {sync_id} is not planning or running ({}): nothing to abandon",
                    state.as_deref().unwrap_or("no such sync")
                ),
                how => {
                    let what = match how {
                        ledger::Abandoned::Planning => "it had not been planned: nothing was sent",
                        _ => {
                            "its unsettled records failed with SYNC_ABANDONED; `loansync errors retry` delivers them"
                        }
                    };
                    println!("abandoned sync {sync_id}: {what}");
                    let summary = summarize(&pool, sync_id).await?;
                    print!("{}", summary.render());
                    Ok(0)
                }
            }
        }
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
        Command::StubApi(args) => {
            let cfg = stub_api::StubConfig {
                api_key: args
                    .key
                    .unwrap_or_else(|| settings.api.key.expose_secret().to_string()),
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
            stub_api::run_standalone(cfg, args.addr, shutdown_signal()).await?;
            Ok(0)
        }
    }
}

async fn connect_broker(settings: &Settings) -> anyhow::Result<Broker> {
    connect_broker_with(settings, BrokerHealth::default()).await
}

/// Connects to the broker of `settings`, reporting the connection's state to `health`.
pub async fn connect_broker_with(
    settings: &Settings,
    health: BrokerHealth,
) -> anyhow::Result<Broker> {
    Broker::connect_with(
        settings.amqp_url.expose_secret(),
        &settings.queue_prefix,
        // The broker's own limit sits above loansync's, so that loansync settles a
        // chunk that keeps failing (and says why) before the broker drops it.
        crate::queue::amqp::broker_delivery_limit(settings.delivery_limit),
        settings.amqp_ca_pem.as_deref(),
        BrokerOptions {
            confirm_timeout: settings.publish_confirm_timeout,
            health,
        },
    )
    .await
}

/// A token cancelled on SIGTERM or Ctrl-C.
fn on_shutdown_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        shutdown_signal().await;
        t.cancel();
    });
    token
}

/// Runs `consume` on a fresh broker connection, and again on a new one whenever the
/// connection is lost (broker restart, network), with exponential backoff, until
/// `shutdown` is cancelled. While disconnected the consumer flag is down, so `/readyz`
/// reports the outage. Chunks in flight on a lost connection are redelivered by the
/// broker; the ledger counts each once.
async fn with_reconnect<F, Fut>(
    settings: &Settings,
    what: &str,
    consuming: &Arc<AtomicBool>,
    health: &BrokerHealth,
    shutdown: CancellationToken,
    mut consume: F,
) -> anyhow::Result<()>
where
    F: FnMut(Broker, CancellationToken) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let first = std::time::Duration::from_millis(500);
    let mut delay = first;
    loop {
        if shutdown.is_cancelled() {
            return Ok(());
        }
        match connect_broker_with(settings, health.clone()).await {
            Ok(broker) => {
                let ended = consume(broker, shutdown.clone()).await;
                health.set_connected(false);
                match ended {
                    Ok(()) => return Ok(()),
                    Err(e) => {
                        delay = first;
                        tracing::warn!(error = %format!("{e:#}"), "{what} lost its broker connection: reconnecting");
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), retry_in_ms = delay.as_millis() as u64, "{what} cannot reach the broker")
            }
        }
        consuming.store(false, std::sync::atomic::Ordering::SeqCst);
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(std::time::Duration::from_secs(30));
    }
}

/// The planner process: consumes planning messages until `shutdown`, reconnecting.
pub async fn run_planner(
    pool: sqlx::PgPool,
    settings: Arc<Settings>,
    consuming: Arc<AtomicBool>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    run_planner_with(pool, settings, consuming, BrokerHealth::default(), shutdown).await
}

/// [`run_planner`], reporting the broker connection's state to `health` (`/readyz`).
pub async fn run_planner_with(
    pool: sqlx::PgPool,
    settings: Arc<Settings>,
    consuming: Arc<AtomicBool>,
    health: BrokerHealth,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    with_reconnect(
        &settings,
        "planner",
        &consuming,
        &health,
        shutdown,
        |broker, stop| {
            planner::run_amqp(
                pool.clone(),
                settings.clone(),
                broker,
                consuming.clone(),
                stop.cancelled_owned(),
            )
        },
    )
    .await
}

/// The worker process: consumes chunk jobs until `shutdown`, reconnecting.
pub async fn run_worker(
    pool: sqlx::PgPool,
    settings: Arc<Settings>,
    consuming: Arc<AtomicBool>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    run_worker_with(pool, settings, consuming, BrokerHealth::default(), shutdown).await
}

/// [`run_worker`], reporting the broker connection's state to `health` (`/readyz`).
pub async fn run_worker_with(
    pool: sqlx::PgPool,
    settings: Arc<Settings>,
    consuming: Arc<AtomicBool>,
    health: BrokerHealth,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let ctx = Arc::new(worker_context(&settings, pool)?);
    with_reconnect(
        &settings,
        "worker",
        &consuming,
        &health,
        shutdown,
        |broker, stop| {
            worker::run_amqp(
                ctx.clone(),
                broker,
                settings.worker_concurrency,
                settings.shutdown_grace,
                consuming.clone(),
                stop.cancelled_owned(),
            )
        },
    )
    .await
}

async fn start_http(
    settings: &Settings,
    pool: &sqlx::PgPool,
    consuming: &Arc<AtomicBool>,
    health: &BrokerHealth,
) -> anyhow::Result<()> {
    if let Some(addr) = settings.metrics_addr {
        http::serve(
            addr,
            http::Readiness {
                pool: pool.clone(),
                broker: Some(health.clone()),
                consuming: consuming.clone(),
                stale_after_secs: settings.stale_sync_after.as_secs_f64(),
            },
        )
        .await?;
    }
    Ok(())
}

/// Builds a worker's context from the settings.
pub fn worker_context(settings: &Settings, pool: sqlx::PgPool) -> anyhow::Result<WorkerContext> {
    Ok(WorkerContext {
        pool,
        client: AnalyticsClient::new(&settings.api)
            .map_err(|e| anyhow::anyhow!("cannot build the analytics client: {e}"))?,
        delivery_limit: settings.delivery_limit,
        db_outage_wait: settings.db_outage_wait,
    })
}

/// What `loansync sync` reports.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SyncSummary {
    pub sync_id: Option<String>,
    pub status: Option<FinalStatus>,
    pub busy_with: Option<String>,
    pub progress: Vec<ledger::EntityProgress>,
    pub seconds: f64,
}

impl SyncSummary {
    /// Prints the summary as text, or as JSON with `json`.
    pub fn print(&self, json: bool) -> anyhow::Result<()> {
        if json {
            println!("{}", serde_json::to_string_pretty(self)?);
        } else {
            print!("{}", self.render());
        }
        Ok(())
    }

    pub fn exit_code(&self) -> u8 {
        match self.status {
            Some(FinalStatus::Completed) => 0,
            Some(FinalStatus::PartialSuccess) => EXIT_PARTIAL,
            Some(FinalStatus::Failed) => EXIT_FAILED,
            None if self.busy_with.is_some() => EXIT_BUSY,
            None => 1,
        }
    }

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
        out.push_str(&format!(
            "{:<10} {:>10} {:>10} {:>10}\n",
            "entity", "planned", "sent", "failed"
        ));
        for p in &self.progress {
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
}

/// What `trigger --wait` saw of its request.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Waited {
    pub request_id: String,
    /// `pending` (waiting for the slot), `planned`, or `unseen` (no planner took it yet).
    pub request_state: String,
    pub timed_out: bool,
    pub sync: Option<SyncSummary>,
}

impl Waited {
    pub fn exit_code(&self) -> u8 {
        match &self.sync {
            Some(s) if s.status.is_some() => s.exit_code(),
            _ if self.timed_out => EXIT_TIMEOUT,
            _ => 1,
        }
    }

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

/// Polls PostgreSQL until the sync serving `request_id` has finished, or `timeout`.
async fn wait_for_request(
    pool: &sqlx::PgPool,
    request_id: &str,
    timeout: Option<std::time::Duration>,
) -> anyhow::Result<Waited> {
    let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
    let mut every = tokio::time::interval(std::time::Duration::from_millis(500));
    loop {
        every.tick().await;
        let seen = ledger::request_state(pool, request_id).await?;
        let (state, sync_id, finished) = match seen {
            None => ("unseen".to_string(), None, false),
            Some(r) => (r.state, r.sync_id, r.finished),
        };
        let timed_out = deadline.is_some_and(|d| tokio::time::Instant::now() >= d);
        if finished || timed_out {
            let sync = match sync_id {
                Some(id) => Some(summarize(pool, id).await?),
                None => None,
            };
            return Ok(Waited {
                request_id: request_id.to_string(),
                request_state: state,
                timed_out: !finished,
                sync,
            });
        }
    }
}

/// Single-process mode: plans `req` and works its chunks off an in-memory queue.
pub async fn sync_in_process(
    pool: &sqlx::PgPool,
    settings: &Settings,
    req: &PlanRequest,
) -> anyhow::Result<SyncSummary> {
    sync_in_process_with(pool, settings, req, false).await
}

/// [`sync_in_process`], showing progress on stderr when `progress` is set.
pub async fn sync_in_process_with(
    pool: &sqlx::PgPool,
    settings: &Settings,
    req: &PlanRequest,
    progress: bool,
) -> anyhow::Result<SyncSummary> {
    let started = std::time::Instant::now();
    // Built before planning, so that a client that cannot be built plans no sync.
    let ctx = Arc::new(worker_context(settings, pool.clone())?);
    let queue = MemoryQueue::new();
    let sync_id = match planner::plan_sync(pool, settings, req, &queue).await? {
        PlanOutcome::Planned { sync_id, .. } => sync_id,
        PlanOutcome::Duplicate { sync_id, .. } => sync_id,
        PlanOutcome::Busy { active_sync_id } => {
            return Ok(SyncSummary {
                sync_id: None,
                status: None,
                busy_with: Some(active_sync_id),
                progress: Vec::new(),
                seconds: started.elapsed().as_secs_f64(),
            });
        }
        PlanOutcome::Pending { request_id, .. } => {
            anyhow::bail!("request {request_id} was queued instead of planned in this process")
        }
    };
    let (done, watching) = tokio::sync::watch::channel(false);
    let watcher = progress.then(|| {
        tokio::spawn(crate::progress::watch(
            pool.clone(),
            sync_id.clone(),
            watching,
        ))
    });
    worker::run_memory(ctx, queue, settings.worker_concurrency).await;
    let _ = done.send(true);
    if let Some(w) = watcher {
        let _ = w.await;
    }
    // Single-process installs have no long-running planner: a sync whose last settle
    // committed without its finalize (a connection lost in between) is finalized here,
    // and the chunk ledger is pruned.
    planner::finalize_settled(pool).await;
    planner::prune(pool, settings).await;
    summarize(pool, sync_id).await
}

/// Reads a sync's outcome back from the history table.
/// A sync's outcome, read back from the history table (its duration is the history's).
pub async fn summarize(pool: &sqlx::PgPool, sync_id: String) -> anyhow::Result<SyncSummary> {
    let (status, seconds): (String, Option<f64>) = sqlx::query_as(
        "SELECT status::text, duration_seconds FROM etl_folder_etlsynchistory WHERE sync_id = $1",
    )
    .bind(&sync_id)
    .fetch_one(pool)
    .await?;
    let status = match status.as_str() {
        "completed" => Some(FinalStatus::Completed),
        "partial_success" => Some(FinalStatus::PartialSuccess),
        "failed" => Some(FinalStatus::Failed),
        _ => None,
    };
    Ok(SyncSummary {
        progress: ledger::entity_progress(pool, &sync_id).await?,
        sync_id: Some(sync_id),
        status,
        busy_with: None,
        seconds: seconds.unwrap_or(0.0),
    })
}

/// What `status` says after a stalled sync, and what to do about it.
fn stalled_hint(s: &ledger::SyncSummary) -> &'static str {
    match (s.stalled, s.state.as_deref()) {
        (false, _) => "",
        (true, Some("planning")) => {
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
    let syncs = ledger::recent_syncs(pool, sync_id, limit, stale).await?;
    if let Some(id) = sync_id {
        let Some(s) = syncs.first() else {
            anyhow::bail!("no sync {id}");
        };
        let progress = ledger::entity_progress(pool, id).await?;
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
        let deleted = ledger::deleted_counts(pool).await?;
        if !deleted.is_empty() {
            let per: Vec<String> = deleted.iter().map(|(e, n)| format!("{e}: {n}")).collect();
            println!(
                "\ndeleted records found by sweeps (not sent, the API has no delete): {} (`loansync deletes list`)",
                per.join(", ")
            );
        }
        let pending = ledger::pending_requests(pool).await?;
        if !pending.is_empty() {
            println!(
                "\n{} planning request(s) pending, run when the current sync ends (coalesced):",
                pending.len()
            );
            for (id, sync_type, at, since) in pending {
                let kind = if since.is_some() {
                    "backfill"
                } else {
                    sync_type.as_str()
                };
                println!(
                    "  {id:<36}  {kind:<11}  received {}",
                    at.format("%Y-%m-%d %H:%M:%S")
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
            let rows = ledger::list_deleted(&pool, entity, limit).await?;
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
            let marks = ledger::watermarks(&pool).await?;
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
            let lock = ledger::PlanningLock::acquire(&pool).await?;
            let set = ledger::set_watermark(&pool, &lock, entity, to, &reason).await;
            lock.release().await;
            match set? {
                ledger::WatermarkSet::Moved {
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
                ledger::WatermarkSet::Busy { active_sync_id } => {
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
                ledger::list_errors(&pool, sync_id.as_deref(), entity, unresolved, limit).await?;
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
            let n = ledger::resolve_errors(&pool, &ids).await?;
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
                let queue = MemoryQueue::new();
                let sync_id = match planner::plan_retry(&pool, settings, &entities, &queue).await? {
                    PlanOutcome::Planned { sync_id, .. }
                    | PlanOutcome::Duplicate { sync_id, .. } => sync_id,
                    PlanOutcome::Busy { active_sync_id } => {
                        println!("another sync is in progress ({active_sync_id}); retry later");
                        return Ok(EXIT_BUSY);
                    }
                    PlanOutcome::Pending { request_id, .. } => {
                        anyhow::bail!("retry {request_id} was queued instead of planned")
                    }
                };
                let ctx = Arc::new(worker_context(settings, pool.clone())?);
                worker::run_memory(ctx, queue, settings.worker_concurrency).await;
                let summary = summarize(&pool, sync_id).await?;
                print!("{}", summary.render());
                Ok(summary.exit_code())
            } else {
                let broker = connect_broker(settings).await?;
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
