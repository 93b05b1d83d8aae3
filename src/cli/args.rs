//! The command line's definitions (clap): every command, its flags and their help.
//! Turning flags into what the application layer takes is here too
//! ([`SyncSelection::request`], and the dev-tools' configurations); nothing runs here.

#[cfg(feature = "dev-tools")]
use crate::config::Settings;
use crate::domain::{EntityKind, PlanRequest, SyncType};
use chrono::{DateTime, Utc};
use clap::{Args, Parser, Subcommand};

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
    /// The planning request these flags ask for, with `trigger`'s request id and backfill
    /// window (`sync` has neither).
    pub fn request(
        self,
        request_id: Option<String>,
        since: Option<DateTime<Utc>>,
        until: Option<DateTime<Utc>>,
    ) -> PlanRequest {
        PlanRequest {
            sync_type: if self.full {
                SyncType::Full
            } else {
                SyncType::Incremental
            },
            entities: (!self.entities.is_empty()).then_some(self.entities),
            request_id,
            since,
            until,
            sweep: self.sweep,
        }
    }
}

/// `--dry-run` and `--ids`, on `sync` and `trigger` alike (README "Dry run").
#[derive(Args, Debug, Clone, Copy)]
pub struct DryRunArgs {
    /// Plan exactly what the real run would, and print per entity the records it would
    /// send: new (never delivered), changed (fingerprint differs), unchanged (a sweep skips
    /// them; any other sync sends them) and, for a sweep, deleted. Sends, publishes and
    /// writes nothing (one read-only transaction; no history row, no watermark moved).
    #[arg(long)]
    pub dry_run: bool,
    /// With --dry-run: list the ids of each kind.
    #[arg(long, requires = "dry_run")]
    pub ids: bool,
}

/// A command. Those that run with their settings loaded are [`AppCommand`]s; `main` runs
/// the other three itself: `completions` and `probe` need no settings, and `check`
/// reports settings that do not load as its first check. `--help` lists them in this
/// order.
#[derive(Subcommand, Debug)]
pub enum Command {
    #[command(flatten)]
    App(AppCommand),
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

/// The commands that run with the settings loaded.
#[derive(Subcommand, Debug)]
pub enum AppCommand {
    /// Apply loansync's migrations (idempotent; never alters Django's tables).
    Migrate,
    /// Consume planning messages and plan syncs (long-running).
    Planner,
    /// Consume chunk jobs and deliver them (long-running).
    Worker,
    /// Publish a planning message (and, with --wait, wait for its sync's outcome; with
    /// --dry-run, publish nothing and print what the sync would send).
    #[command(group(clap::ArgGroup::new("outcome").args(["wait", "dry_run"]).multiple(true)))]
    Trigger {
        #[command(flatten)]
        selection: SyncSelection,
        #[command(flatten)]
        dry: DryRunArgs,
        /// Idempotency of the trigger: a repeated id plans nothing new (default: a new
        /// UUID). In a Kubernetes Job, the Job's name (downward API), so that a retried
        /// pod never plans twice.
        #[arg(long, env = "ETL_REQUEST_ID")]
        request_id: Option<String>,
        /// A backfill: rows changed at or after this time (RFC 3339), whatever the
        /// watermarks say. Incremental selection; moves no watermark.
        #[arg(long, value_name = "TS", conflicts_with_all = ["full", "sweep"])]
        since: Option<DateTime<Utc>>,
        /// A backfill's end (exclusive, RFC 3339; default: now).
        #[arg(long, value_name = "TS", requires = "since")]
        until: Option<DateTime<Utc>>,
        /// Wait until the sync that serves this request has finished, and exit with its
        /// outcome (0 completed, 10 partial_success, 11 failed, 13 timed out).
        #[arg(long, conflicts_with = "dry_run")]
        wait: bool,
        /// With --wait: give up waiting after this long (e.g. 90s, 45m, 3h); the sync
        /// goes on.
        #[arg(long, value_name = "DURATION", requires = "wait", value_parser = humantime::parse_duration)]
        timeout: Option<std::time::Duration>,
        /// With --wait or --dry-run: print the outcome as JSON.
        #[arg(long, requires = "outcome")]
        json: bool,
    },
    /// Run one sync in this process (planner and workers over an in-memory queue; no broker).
    Sync {
        #[command(flatten)]
        selection: SyncSelection,
        #[command(flatten)]
        dry: DryRunArgs,
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
    Seed(SeedArgs),
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
        to: DateTime<Utc>,
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
pub struct SeedArgs {
    /// 1 is 20 users, 1,000 customers, 2,000 loans, 10,000 repayments; 100 is dataset M.
    #[arg(long, default_value_t = 1.0)]
    pub scale: f64,
    #[arg(long)]
    pub users: Option<i64>,
    #[arg(long)]
    pub customers: Option<i64>,
    #[arg(long)]
    pub loans: Option<i64>,
    #[arg(long)]
    pub repayments: Option<i64>,
    /// Seed of the generator: the same seed gives the same data.
    #[arg(long, default_value_t = 42)]
    pub seed: i64,
    /// Empty the source tables first. Refused when they hold rows `loansync seed` did
    /// not write, unless --confirm-database names the database.
    #[arg(long)]
    pub reset: bool,
    /// With --reset: empty the source tables even if they hold rows the seed did not
    /// write. NAME must be the name of the database DATABASE_URL points at.
    #[arg(long, value_name = "NAME", requires = "reset")]
    pub confirm_database: Option<String>,
}

#[cfg(feature = "dev-tools")]
impl SeedArgs {
    /// What to seed: `--scale`'s row counts, each overridden by its own flag.
    pub fn spec(&self) -> crate::seed::SeedSpec {
        let mut spec = crate::seed::SeedSpec::scale(self.scale, self.seed);
        spec.users = self.users.unwrap_or(spec.users);
        spec.customers = self.customers.unwrap_or(spec.customers);
        spec.loans = self.loans.unwrap_or(spec.loans);
        spec.repayments = self.repayments.unwrap_or(spec.repayments);
        spec
    }
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
    /// Requests served at once (0: no limit); beyond it 429 with Retry-After, or, with
    /// --capacity-queue, a wait for a free slot (latency grows with the load).
    #[arg(long, default_value_t = 0)]
    pub capacity: usize,
    #[arg(long)]
    pub capacity_queue: bool,
    /// Time each request is served for, in ms.
    #[arg(long, default_value_t = 0)]
    pub latency_ms: u64,
    /// Added to a request's service time for each other request being served (ms).
    #[arg(long, default_value_t = 0)]
    pub latency_per_request_ms: u64,
    /// Requests admitted per second (0: no limit); beyond it 429 with Retry-After.
    #[arg(long, default_value_t = 0.0)]
    pub rate_limit: f64,
}

#[cfg(feature = "dev-tools")]
impl StubArgs {
    /// The stub's configuration: the key it accepts (`--key`, else the settings' API key)
    /// and its faults.
    pub fn config(self, settings: &Settings) -> anyhow::Result<crate::stub_api::StubConfig> {
        use secrecy::ExposeSecret;
        Ok(crate::stub_api::StubConfig {
            api_key: match self.key {
                Some(key) => key,
                None => settings.api()?.key.expose_secret().to_string(),
            },
            faults: crate::stub_api::Faults {
                error_5xx_rate: self.error_5xx_rate,
                rate_429: self.rate_429,
                retry_after_secs: self.retry_after_secs,
                slow_rate: self.slow_rate,
                slow_ms: self.slow_ms,
                drop_rate: self.drop_rate,
                reject_every_nth: self.reject_every_nth,
                refuse_ids: self.refuse_ids,
                seed: self.seed,
                capacity: self.capacity,
                capacity_queue: self.capacity_queue,
                latency_ms: self.latency_ms,
                latency_per_request_ms: self.latency_per_request_ms,
                rate_limit: self.rate_limit,
                ..Default::default()
            },
        })
    }
}
