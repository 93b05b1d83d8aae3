//! Every setting, typed and validated at start-up: [`Settings`], read from the
//! environment by [`Settings::from_env`]. Secrets are kept in [`SecretString`] and URLs
//! are only ever printed through [`crate::redact`].
//!
//! [`env`](mod@env) holds the table of variables and their parsers, `api.rs` the
//! analytics API's settings (and the `dev-tools` build's defaults for them), `urls.rs`
//! the URL checks.

mod api;
mod concurrency;
pub mod env;
#[cfg(test)]
mod test_support;
mod urls;

use crate::domain::EntityKind;
use crate::redact::redact_url;
pub use api::{ApiSettings, RetrySettings};
pub use concurrency::ConcurrencySettings;
use env::{
    DEFAULT_AMQP_URL, DEFAULT_DATABASE_URL, Lookup, boolean, num, num_env, range_of, value_or_file,
};
use secrecy::{ExposeSecret, SecretString};
use std::net::SocketAddr;
use std::time::Duration;
use urls::{check_amqp_url, check_database_url};

#[derive(Debug, Clone, thiserror::Error)]
pub enum ConfigError {
    /// A variable's value is refused.
    #[error("{name}: {problem}")]
    Invalid { name: &'static str, problem: String },
    /// Variables a command needs are unset, and this build has no default for them: the
    /// analytics API's URL and key without the `dev-tools` feature.
    #[error(
        "{} {} not set, and this build (without `dev-tools`) has no default for {}",
        .names.join(" and "),
        if .names.len() == 1 { "is" } else { "are" },
        if .names.len() == 1 { "it" } else { "them" }
    )]
    Unset { names: Vec<&'static str> },
}

fn invalid(name: &'static str, problem: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        name,
        problem: problem.into(),
    }
}

/// Chunk sizes per entity (`ETL_BATCH_SIZE_*`).
#[derive(Debug, Clone, Copy)]
pub struct ChunkSizes {
    pub customers: u32,
    pub officers: u32,
    pub loans: u32,
    pub repayments: u32,
}

impl ChunkSizes {
    pub fn for_entity(&self, e: EntityKind) -> u32 {
        match e {
            EntityKind::Customer => self.customers,
            EntityKind::Officer => self.officers,
            EntityKind::Loan => self.loans,
            EntityKind::Repayment => self.repayments,
        }
    }
}

impl Default for ChunkSizes {
    fn default() -> Self {
        ChunkSizes {
            customers: 500,
            officers: 500,
            loans: 100,
            repayments: 200,
        }
    }
}

/// Limits set on every pooled PostgreSQL connection, so that a stuck statement, a held
/// lock or a forgotten transaction cannot wedge a worker (see `db`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DbTimeouts {
    /// `statement_timeout` of every statement (`ETL_DB_STATEMENT_TIMEOUT_SECS`, 0 = none).
    pub statement: Duration,
    /// `lock_timeout`: longest wait for one lock (`ETL_DB_LOCK_TIMEOUT_SECS`, 0 = none).
    pub lock: Duration,
    /// `idle_in_transaction_session_timeout` (`ETL_DB_IDLE_IN_TX_TIMEOUT_SECS`, 0 = none).
    pub idle_in_transaction: Duration,
    /// Longest wait for a pooled connection (`ETL_DB_ACQUIRE_TIMEOUT_SECS`).
    pub acquire: Duration,
}

impl Default for DbTimeouts {
    fn default() -> Self {
        DbTimeouts {
            statement: Duration::from_secs(60),
            lock: Duration::from_secs(30),
            idle_in_transaction: Duration::from_secs(60),
            acquire: Duration::from_secs(5),
        }
    }
}

pub use crate::telemetry::LogFormat;

/// The whole configuration of a loansync process.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Source and ETL tables live here (`DATABASE_URL`).
    pub database_url: SecretString,
    /// RabbitMQ (`AMQP_URL`).
    pub amqp_url: SecretString,
    /// Extra CA certificates (PEM text, read and checked at start-up from the file named
    /// by `AMQP_CA_FILE`) trusted besides the system roots for an `amqps://` broker.
    pub amqp_ca_pem: Option<String>,
    /// Queue name prefix, so tenants and tests share a broker (`ETL_QUEUE_PREFIX`).
    pub queue_prefix: String,
    /// The analytics API, or why it is not configured ([`ConfigError::Unset`], only in a
    /// build without `dev-tools`); read it through [`Settings::api()`].
    pub api: Result<ApiSettings, ConfigError>,
    pub chunk_sizes: ChunkSizes,
    /// Watermark used when an entity has never been synced (`ETL_DEFAULT_LOOKBACK_DAYS`).
    pub default_lookback: chrono::Duration,
    /// Subtracted from the watermark to catch rows committed late (`ETL_INCREMENTAL_OVERLAP_SECS`).
    pub incremental_overlap: chrono::Duration,
    /// A sync whose chunks have not moved for this long is stalled (`ETL_STALE_SYNC_SECS`).
    pub stale_sync_after: Duration,
    /// Chunks a worker processes at once; also its AMQP prefetch (`ETL_WORKER_CONCURRENCY`).
    pub worker_concurrency: u16,
    /// The worker's limit on requests to the API: fixed or adaptive, the fleet's cap.
    pub concurrency: ConcurrencySettings,
    /// Deliveries of one message before it is dead-lettered (`ETL_DELIVERY_LIMIT`).
    pub delivery_limit: u32,
    /// The broker's consumer timeout; retries must end well before it (`ETL_BROKER_CONSUMER_TIMEOUT_SECS`).
    pub broker_consumer_timeout: Duration,
    /// Database connections per process (`ETL_DB_POOL_SIZE`, default concurrency + 2).
    pub db_pool_size: u32,
    /// Time given to in-flight chunks on SIGTERM (`ETL_SHUTDOWN_GRACE_SECS`).
    pub shutdown_grace: Duration,
    /// How long a worker (or the planner) holding a message waits for an unreachable
    /// PostgreSQL before handing the message back to the broker (`ETL_DB_OUTAGE_WAIT_SECS`).
    pub db_outage_wait: Duration,
    /// Finished syncs' chunk id lists are deleted after this long; history, counters and
    /// error rows stay (`ETL_CHUNK_RETENTION_DAYS`).
    pub chunk_retention: Duration,
    /// Per-connection PostgreSQL timeouts and the pool's acquire timeout (`ETL_DB_*`).
    pub db_timeouts: DbTimeouts,
    /// How long a publish waits for the broker's confirm before it fails
    /// (`ETL_PUBLISH_CONFIRM_TIMEOUT_SECS`).
    pub publish_confirm_timeout: Duration,
    /// Where `/metrics`, `/healthz`, `/readyz` are served; `None` when empty (`METRICS_ADDR`).
    pub metrics_addr: Option<SocketAddr>,
    pub log_format: LogFormat,
    /// The metrics registry the planner, the workers and the analytics client built from
    /// these settings count in. Not read from the environment: the process-wide registry
    /// (the one `/metrics` serves), unless a test puts a fresh one here.
    pub telemetry: crate::telemetry::Telemetry,
}

impl Settings {
    /// Reads the process environment.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(|k| std::env::var(k).ok())
    }

    /// Reads settings through `get`, so tests can pass their own environment.
    ///
    /// Every variable has a range; a value outside it, a value that does not parse, or a
    /// variable set to an empty string is refused with an error naming the variable (an
    /// unset variable takes its default; the API URL and key have none without
    /// `dev-tools`, see [`Settings::api()`]). Nothing here panics, whatever the input.
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        Self::from_lookup_with(get, api::DEV_DEFAULTS)
    }

    /// [`Settings::from_lookup`] with `api_defaults` for an unset API URL and key instead
    /// of this build's, so that unit tests can read settings as either build does.
    fn from_lookup_with(
        get: impl Fn(&str) -> Option<String>,
        api_defaults: Option<api::DevDefaults>,
    ) -> Result<Self, ConfigError> {
        // A variable set but empty is a mistake (a template not filled in), not a request
        // for the default: refuse it. METRICS_ADDR alone documents empty as "off".
        let get = |k: &'static str| -> Result<Option<String>, ConfigError> {
            match get(k) {
                Some(v) if v.trim().is_empty() && k != "METRICS_ADDR" => {
                    Err(invalid(k, "is set but empty; unset it to use the default"))
                }
                Some(v) if v.trim().is_empty() => Ok(None),
                v => Ok(v),
            }
        };
        let g: &Lookup = &get;

        let endpoint = api::endpoint(g, api_defaults)?;

        let retry = RetrySettings {
            initial: Duration::from_millis(num_env(g, "ETL_RETRY_INITIAL_MS")?),
            max_interval: Duration::from_secs(num_env(g, "ETL_RETRY_MAX_INTERVAL_SECS")?),
            // 0: no retries at all.
            max_elapsed: Duration::from_secs(num_env(g, "ETL_RETRY_MAX_ELAPSED_SECS")?),
        };
        // 0 would time every request out at once.
        let timeout = Duration::from_secs(num_env(g, "ETL_HTTP_TIMEOUT_SECS")?);
        // 0: a message is handed back to the broker as soon as PostgreSQL fails to answer.
        let db_outage_wait = Duration::from_secs(num_env(g, "ETL_DB_OUTAGE_WAIT_SECS")?);
        let broker_consumer_timeout =
            Duration::from_secs(num_env(g, "ETL_BROKER_CONSUMER_TIMEOUT_SECS")?);
        // A chunk is acked only after its POST (with every retry) and its commit. If one
        // chunk could outlast the broker's consumer timeout, the broker would close the
        // channel under a working worker and redeliver the chunk: refuse that now. (The
        // ranges above keep this sum far from overflowing.)
        let worst_case = chunk_worst_case(&retry, timeout, db_outage_wait);
        if worst_case >= broker_consumer_timeout {
            return Err(invalid(
                "ETL_RETRY_MAX_ELAPSED_SECS",
                format!(
                    "one chunk could be held for up to {}s, which outlasts the broker's consumer timeout of {}s \
                     (ETL_BROKER_CONSUMER_TIMEOUT_SECS): ETL_DB_OUTAGE_WAIT_SECS ({}s) + ETL_RETRY_MAX_ELAPSED_SECS ({}s) \
                     + ETL_HTTP_TIMEOUT_SECS ({}s) + {}s for its database work; lower one of these, or raise the broker's consumer_timeout",
                    worst_case.as_secs(),
                    broker_consumer_timeout.as_secs(),
                    db_outage_wait.as_secs(),
                    retry.max_elapsed.as_secs(),
                    timeout.as_secs(),
                    CHUNK_DB_ALLOWANCE.as_secs(),
                ),
            ));
        }
        if retry.max_interval < retry.initial {
            return Err(invalid(
                "ETL_RETRY_INITIAL_MS",
                "must not be above ETL_RETRY_MAX_INTERVAL_SECS",
            ));
        }

        let chunk_sizes = ChunkSizes {
            customers: num_env(g, "ETL_BATCH_SIZE_CUSTOMERS")?,
            officers: num_env(g, "ETL_BATCH_SIZE_OFFICERS")?,
            loans: num_env(g, "ETL_BATCH_SIZE_LOANS")?,
            repayments: num_env(g, "ETL_BATCH_SIZE_REPAYMENTS")?,
        };
        let worker_concurrency: u16 = num_env(g, "ETL_WORKER_CONCURRENCY")?;
        let concurrency = concurrency::read(g)?;
        let queue_prefix = get("ETL_QUEUE_PREFIX")?.unwrap_or_else(|| "etl".into());
        if !queue_prefix
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
        {
            return Err(invalid(
                "ETL_QUEUE_PREFIX",
                "only letters, digits, '.', '-' and '_' are allowed",
            ));
        }
        // Queue names are at most 255 bytes; leave room for the suffixes.
        if queue_prefix.len() > 200 {
            return Err(invalid(
                "ETL_QUEUE_PREFIX",
                format!("{} characters; at most 200", queue_prefix.len()),
            ));
        }
        let metrics_addr = match get("METRICS_ADDR")? {
            None => None,
            Some(v) if v.trim() == "off" => None,
            Some(v) => Some(
                v.trim()
                    .parse()
                    .map_err(|_| invalid("METRICS_ADDR", format!("{v:?} is not host:port")))?,
            ),
        };
        let log_format = match get("LOG_FORMAT")?.as_deref().map(str::trim) {
            None | Some("text") => LogFormat::Text,
            Some("json") => LogFormat::Json,
            Some(other) => {
                return Err(invalid(
                    "LOG_FORMAT",
                    format!("{other:?}: use json or text"),
                ));
            }
        };
        let ca_pem = |name: &'static str| -> Result<Option<String>, ConfigError> {
            get(name)?
                .map(|path| crate::tls::read_ca_pem(&path).map_err(|e| invalid(name, e)))
                .transpose()
        };
        let api_ca_pem = ca_pem("ANALYTICS_CA_FILE")?;
        let amqp_ca_pem = ca_pem("AMQP_CA_FILE")?;
        // The broker's own limit is this plus two (a quorum queue's delivery-limit).
        let delivery_limit: u32 = num_env(g, "ETL_DELIVERY_LIMIT")?;
        // Each chunk in flight holds a connection, and the pool never goes below two.
        let db_pool_size: u32 = num(
            g,
            "ETL_DB_POOL_SIZE",
            u32::from(worker_concurrency) + 2,
            range_of("ETL_DB_POOL_SIZE"),
        )?;
        let (database_url, from) = value_or_file(g, "DATABASE_URL", "DATABASE_URL_FILE")?
            .unwrap_or_else(|| (DEFAULT_DATABASE_URL.into(), "DATABASE_URL"));
        check_database_url(database_url.trim()).map_err(|e| invalid(from, e))?;
        let (amqp_url, from) = value_or_file(g, "AMQP_URL", "AMQP_URL_FILE")?
            .unwrap_or_else(|| (DEFAULT_AMQP_URL.into(), "AMQP_URL"));
        check_amqp_url(amqp_url.trim()).map_err(|e| invalid(from, e))?;

        let retention_days: u32 = num_env(g, "ETL_CHUNK_RETENTION_DAYS")?;
        let chunk_retention = Duration::from_secs(u64::from(retention_days) * 86_400);
        // 0 turns a PostgreSQL timeout off; the pool's acquire timeout must be positive.
        let db_timeouts = DbTimeouts {
            statement: Duration::from_secs(num_env(g, "ETL_DB_STATEMENT_TIMEOUT_SECS")?),
            lock: Duration::from_secs(num_env(g, "ETL_DB_LOCK_TIMEOUT_SECS")?),
            idle_in_transaction: Duration::from_secs(num_env(g, "ETL_DB_IDLE_IN_TX_TIMEOUT_SECS")?),
            acquire: Duration::from_secs(num_env(g, "ETL_DB_ACQUIRE_TIMEOUT_SECS")?),
        };
        let publish_confirm_timeout =
            Duration::from_secs(num_env(g, "ETL_PUBLISH_CONFIRM_TIMEOUT_SECS")?);

        let gzip = boolean(g, "ANALYTICS_GZIP", false)?;

        Ok(Settings {
            database_url: database_url.trim().to_string().into(),
            amqp_url: amqp_url.trim().to_string().into(),
            amqp_ca_pem,
            queue_prefix,
            api: endpoint.map(|(base_url, key)| ApiSettings {
                base_url,
                key,
                timeout,
                ca_pem: api_ca_pem,
                gzip,
                retry,
            }),
            chunk_sizes,
            // 0 would make the first incremental sync of an entity send nothing; a full
            // sync is the way to send everything. 100 years keeps date arithmetic in range.
            default_lookback: chrono::Duration::days(num_env(g, "ETL_DEFAULT_LOOKBACK_DAYS")?),
            // 0: no overlap (the window's upper bound already waits for open transactions).
            incremental_overlap: chrono::Duration::seconds(num_env(
                g,
                "ETL_INCREMENTAL_OVERLAP_SECS",
            )?),
            stale_sync_after: Duration::from_secs(num_env(g, "ETL_STALE_SYNC_SECS")?),
            worker_concurrency,
            concurrency,
            delivery_limit,
            broker_consumer_timeout,
            db_pool_size,
            // 0: on SIGTERM, chunks in flight are handed back to the broker at once.
            shutdown_grace: Duration::from_secs(num_env(g, "ETL_SHUTDOWN_GRACE_SECS")?),
            db_outage_wait,
            chunk_retention,
            db_timeouts,
            publish_confirm_timeout,
            metrics_addr,
            log_format,
            telemetry: crate::telemetry::Telemetry::global(),
        })
    }

    /// Chunks a worker takes at once (its AMQP prefetch): `ETL_WORKER_CONCURRENCY` in
    /// fixed mode, `ETL_WORKER_MAX_CONCURRENCY` in adaptive mode, where the gate, not
    /// the prefetch, limits the requests in flight.
    pub fn worker_prefetch(&self) -> u16 {
        prefetch(self.worker_concurrency, &self.concurrency)
    }

    /// The analytics API's settings, or the error naming what is missing: only in a build
    /// without `dev-tools` (no default URL or key), when `ANALYTICS_API_URL` or the key
    /// is unset. Only what calls the API asks for them, so that the commands that never do
    /// (`planner`, `status`, `trigger`, `migrate`, …) run without them; the command line
    /// refuses a command that calls the API before it starts (`cli::calls_api`).
    pub fn api(&self) -> Result<&ApiSettings, ConfigError> {
        self.api.as_ref().map_err(Clone::clone)
    }

    /// The database URL with its password replaced, for logs and messages.
    pub fn database_url_redacted(&self) -> String {
        redact_url(self.database_url.expose_secret())
    }

    /// The AMQP URL with its password replaced, for logs and messages.
    pub fn amqp_url_redacted(&self) -> String {
        redact_url(self.amqp_url.expose_secret())
    }
}

/// Time allowed for one chunk's own database work: the pool acquisitions of its start,
/// its load and its settle (at most 10 s each, see `db::connect_url`), and the
/// pause before a failed chunk is handed back.
pub const CHUNK_DB_ALLOWANCE: Duration = Duration::from_secs(30);

/// The longest a worker can hold one chunk's message before acking or returning it.
///
/// The analytics client gives a chunk one deadline, `max_elapsed`, for every request
/// of it (retries, `Retry-After` waits, halving), starts none after it, and a request
/// started before it lasts at most `timeout`. A chunk that meets an unreachable
/// PostgreSQL is held and run again for up to `db_outage_wait`
/// (`db::through_outage`), so the last run may start just before that wait
/// ends, and then take a whole chunk's time again.
pub fn chunk_worst_case(
    retry: &RetrySettings,
    timeout: Duration,
    db_outage_wait: Duration,
) -> Duration {
    db_outage_wait + retry.max_elapsed + timeout + CHUNK_DB_ALLOWANCE
}

/// See [`Settings::worker_prefetch`].
fn prefetch(worker_concurrency: u16, c: &ConcurrencySettings) -> u16 {
    match c.mode {
        crate::sink::gate::ConcurrencyMode::Fixed => worker_concurrency,
        crate::sink::gate::ConcurrencyMode::Adaptive => c.max,
    }
}

#[cfg(test)]
mod tests {
    use super::test_support::settings;
    use super::*;
    use crate::redact::redact_url;

    #[test]
    fn defaults_follow_the_spec() {
        let s = settings(&[]).unwrap();
        assert_eq!(s.chunk_sizes.loans, 100);
        assert_eq!(s.chunk_sizes.repayments, 200);
        assert_eq!(s.chunk_sizes.customers, 500);
        assert_eq!(s.chunk_sizes.officers, 500);
        assert_eq!(s.api().unwrap().retry.initial, Duration::from_millis(500));
        assert_eq!(s.api().unwrap().retry.max_interval, Duration::from_secs(30));
        assert_eq!(s.api().unwrap().retry.max_elapsed, Duration::from_secs(300));
        assert_eq!(s.incremental_overlap, chrono::Duration::seconds(120));
        assert_eq!(s.default_lookback, chrono::Duration::days(30));
        assert_eq!(s.queue_prefix, "etl");
    }

    #[test]
    fn retry_budget_longer_than_consumer_timeout_is_refused() {
        let err = settings(&[
            ("ETL_RETRY_MAX_ELAPSED_SECS", "1800"),
            ("ETL_BROKER_CONSUMER_TIMEOUT_SECS", "1800"),
        ])
        .unwrap_err();
        assert!(err.to_string().contains("consumer timeout"), "{err}");
        // Every term of the worst case is named, with its value.
        let err = settings(&[("ETL_DB_OUTAGE_WAIT_SECS", "1500")])
            .unwrap_err()
            .to_string();
        for name in [
            "ETL_DB_OUTAGE_WAIT_SECS (1500s)",
            "ETL_RETRY_MAX_ELAPSED_SECS (300s)",
            "ETL_HTTP_TIMEOUT_SECS (30s)",
            "ETL_BROKER_CONSUMER_TIMEOUT_SECS",
            "up to 1860s",
        ] {
            assert!(err.contains(name), "{name} missing from: {err}");
        }
        assert!(settings(&[("ETL_HTTP_TIMEOUT_SECS", "1200")]).is_err());
    }

    #[test]
    fn the_worst_case_of_a_chunk_counts_halving_inside_the_deadline() {
        // Halving no longer adds requests beyond the deadline: a long request timeout
        // costs one timeout, not one per level of halving.
        let s = settings(&[("ETL_HTTP_TIMEOUT_SECS", "100")]).unwrap();
        assert_eq!(
            chunk_worst_case(
                &s.api().unwrap().retry,
                s.api().unwrap().timeout,
                s.db_outage_wait
            ),
            Duration::from_secs(300 + 100 + 300 + 30)
        );
        // Just under and just at the consumer timeout.
        assert!(settings(&[("ETL_BROKER_CONSUMER_TIMEOUT_SECS", "661")]).is_ok());
        assert!(settings(&[("ETL_BROKER_CONSUMER_TIMEOUT_SECS", "660")]).is_err());
    }

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact_url("postgres://app:hunter2@db:5432/x"),
            "postgres://app:***@db:5432/x"
        );
        assert_eq!(
            redact_url("amqp://guest@h:5672/%2f"),
            "amqp://guest@h:5672/%2f"
        );
        let s = settings(&[("DATABASE_URL", "postgres://u:pw@h/db")]).unwrap();
        assert!(!s.database_url_redacted().contains("pw"));
        assert!(
            !format!("{s:?}").contains("pw"),
            "Debug must not print secrets"
        );
    }

    /// Every class of bad value, per variable: refused, with the variable named first.
    #[test]
    fn bad_values_are_refused_naming_the_variable() {
        let cases: &[(&str, &str)] = &[
            // empty strings
            ("DATABASE_URL", ""),
            ("ANALYTICS_API_KEY", "  "),
            ("ETL_BATCH_SIZE_LOANS", ""),
            ("LOG_FORMAT", ""),
            // non-numeric
            ("ETL_HTTP_TIMEOUT_SECS", "thirty"),
            ("ETL_WORKER_CONCURRENCY", "4.5"),
            ("ETL_DEFAULT_LOOKBACK_DAYS", "1e3"),
            // negative
            ("ETL_INCREMENTAL_OVERLAP_SECS", "-1"),
            ("ETL_DEFAULT_LOOKBACK_DAYS", "-30"),
            ("ETL_SHUTDOWN_GRACE_SECS", "-5"),
            // zero where zero means nothing sensible
            ("ETL_HTTP_TIMEOUT_SECS", "0"),
            ("ETL_RETRY_INITIAL_MS", "0"),
            ("ETL_RETRY_MAX_INTERVAL_SECS", "0"),
            ("ETL_BATCH_SIZE_CUSTOMERS", "0"),
            ("ETL_BATCH_SIZE_OFFICERS", "0"),
            ("ETL_BATCH_SIZE_LOANS", "0"),
            ("ETL_BATCH_SIZE_REPAYMENTS", "0"),
            ("ETL_WORKER_CONCURRENCY", "0"),
            ("ETL_DELIVERY_LIMIT", "0"),
            ("ETL_DB_POOL_SIZE", "0"),
            ("ETL_DB_POOL_SIZE", "1"),
            ("ETL_DEFAULT_LOOKBACK_DAYS", "0"),
            ("ETL_STALE_SYNC_SECS", "0"),
            ("ETL_BROKER_CONSUMER_TIMEOUT_SECS", "0"),
            // absurd or overflowing
            ("ETL_WORKER_CONCURRENCY", "65536"),
            ("ETL_WORKER_CONCURRENCY", "10000"),
            ("ETL_BATCH_SIZE_LOANS", "10001"),
            ("ETL_DELIVERY_LIMIT", "4294967296"),
            ("ETL_DB_POOL_SIZE", "100000"),
            ("ETL_DEFAULT_LOOKBACK_DAYS", "36501"),
            ("ETL_DEFAULT_LOOKBACK_DAYS", "9223372036854775807"),
            ("ETL_INCREMENTAL_OVERLAP_SECS", "9223372036854775807"),
            ("ETL_HTTP_TIMEOUT_SECS", "18446744073709551615"),
            ("ETL_RETRY_MAX_ELAPSED_SECS", "18446744073709551615"),
            (
                "ETL_DB_OUTAGE_WAIT_SECS",
                "99999999999999999999999999999999999999999",
            ),
            ("ETL_RETRY_INITIAL_MS", "60001"),
            ("ETL_SHUTDOWN_GRACE_SECS", "3601"),
            // words
            ("ANALYTICS_GZIP", "maybe"),
            ("ANALYTICS_ALLOW_PLAINTEXT", "sure"),
            ("LOG_FORMAT", "xml"),
            ("METRICS_ADDR", "localhost"),
            ("ETL_QUEUE_PREFIX", "a b"),
            ("ANALYTICS_API_URL", "ftp://x.example.com"),
            ("ANALYTICS_API_URL", "not a url"),
            ("ANALYTICS_API_KEY", "two words"),
            ("ANALYTICS_API_KEY_FILE", "/nonexistent/loansync-key"),
            ("ANALYTICS_CA_FILE", "/nonexistent/ca.pem"),
            ("AMQP_CA_FILE", "/nonexistent/ca.pem"),
            ("DATABASE_URL", "mysql://u@h/db"),
            ("DATABASE_URL", "postgres://u@h/db?sslmode=sometimes"),
            ("DATABASE_URL", "postgres://u@h/db?ssl_mode=verify-full"),
            ("DATABASE_URL", "postgres://u@h/db?port=http"),
            ("AMQP_URL", "http://guest@h:5672"),
            ("AMQP_URL", "amqp://guest@h:5672/%2f?heartbeat=often"),
        ];
        for (name, value) in cases {
            let err = match settings(&[(name, value)]) {
                Ok(_) => panic!("{name}={value:?} was accepted"),
                Err(e) => e.to_string(),
            };
            assert!(
                err.starts_with(&format!("{name}: ")),
                "{name}={value:?} gave {err:?}"
            );
        }
        // A retry initial delay above the largest interval names the initial delay.
        let err = settings(&[
            ("ETL_RETRY_INITIAL_MS", "5000"),
            ("ETL_RETRY_MAX_INTERVAL_SECS", "2"),
        ])
        .unwrap_err();
        assert!(
            err.to_string().starts_with("ETL_RETRY_INITIAL_MS: "),
            "{err}"
        );
    }
}
