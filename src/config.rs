//! Every setting, typed and validated at start-up. Secrets are kept in
//! [`SecretString`] and URLs are only ever printed through [`redact_url`].

use crate::domain::EntityKind;
use secrecy::{ExposeSecret, SecretString};
use std::net::SocketAddr;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{name}: {problem}")]
    Invalid { name: &'static str, problem: String },
}

fn invalid(name: &'static str, problem: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        name,
        problem: problem.into(),
    }
}

/// How the analytics client retries transient failures (SPEC.md section 4).
#[derive(Debug, Clone)]
pub struct RetrySettings {
    /// First backoff delay (`ETL_RETRY_INITIAL_MS`).
    pub initial: Duration,
    /// Largest single delay (`ETL_RETRY_MAX_INTERVAL_SECS`).
    pub max_interval: Duration,
    /// The deadline of one chunk in the analytics client, for all its requests: retries,
    /// `Retry-After` waits and the halving of refused batches (`ETL_RETRY_MAX_ELAPSED_SECS`).
    pub max_elapsed: Duration,
}

/// Where and how to reach the analytics API.
#[derive(Clone)]
pub struct ApiSettings {
    /// Base URL, without a trailing slash (`ANALYTICS_API_URL`).
    pub base_url: url::Url,
    /// Bearer key (`ANALYTICS_API_KEY` or the file named by `ANALYTICS_API_KEY_FILE`).
    pub key: SecretString,
    /// Per-request timeout (`ETL_HTTP_TIMEOUT_SECS`).
    pub timeout: Duration,
    /// Extra CA certificates (PEM text, read and checked at start-up from the file named
    /// by `ANALYTICS_CA_FILE`) trusted besides the system roots.
    pub ca_pem: Option<String>,
    /// Gzip request bodies, with `Content-Encoding: gzip` (`ANALYTICS_GZIP`).
    pub gzip: bool,
    pub retry: RetrySettings,
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
    pub api: ApiSettings,
    pub chunk_sizes: ChunkSizes,
    /// Watermark used when an entity has never been synced (`ETL_DEFAULT_LOOKBACK_DAYS`).
    pub default_lookback: chrono::Duration,
    /// Subtracted from the watermark to catch rows committed late (`ETL_INCREMENTAL_OVERLAP_SECS`).
    pub incremental_overlap: chrono::Duration,
    /// A sync whose chunks have not moved for this long is stalled (`ETL_STALE_SYNC_SECS`).
    pub stale_sync_after: Duration,
    /// Chunks a worker processes at once; also its AMQP prefetch (`ETL_WORKER_CONCURRENCY`).
    pub worker_concurrency: u16,
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

pub const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/loansync";
pub const DEFAULT_AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
pub const DEFAULT_API_URL: &str = "http://127.0.0.1:8088";
/// The key the local stub API accepts by default; never a production secret.
pub const DEFAULT_STUB_KEY: &str = "loansync-local-dev-key";

impl Settings {
    /// Reads the process environment.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(|k| std::env::var(k).ok())
    }

    /// Reads settings through `get`, so tests can pass their own environment.
    ///
    /// Every variable has a range; a value outside it, a value that does not parse, or a
    /// variable set to an empty string is refused with an error naming the variable (an
    /// unset variable takes its default). Nothing here panics, whatever the input.
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
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

        let key = value_or_file(g, "ANALYTICS_API_KEY", "ANALYTICS_API_KEY_FILE")?
            .map(|(k, _)| k)
            .unwrap_or_else(|| DEFAULT_STUB_KEY.to_string());
        if key.is_empty() {
            return Err(invalid("ANALYTICS_API_KEY", "the key is empty"));
        }
        // It travels in an `Authorization` header: refuse what a header cannot carry now,
        // rather than failing every request later. The key itself is never echoed.
        if !key.bytes().all(|b| (0x21..=0x7e).contains(&b)) {
            return Err(invalid(
                "ANALYTICS_API_KEY",
                "the key holds spaces, control or non-ASCII characters, which an HTTP header cannot carry",
            ));
        }
        let api_url = get("ANALYTICS_API_URL")?.unwrap_or_else(|| DEFAULT_API_URL.into());
        let base_url = url::Url::parse(api_url.trim().trim_end_matches('/'))
            .map_err(|e| invalid("ANALYTICS_API_URL", format!("not a URL: {e}")))?;
        if !matches!(base_url.scheme(), "http" | "https") {
            return Err(invalid("ANALYTICS_API_URL", "must be http:// or https://"));
        }
        let allow_plaintext = boolean(g, "ANALYTICS_ALLOW_PLAINTEXT", false)?;
        if base_url.scheme() == "http" && !is_loopback(&base_url) && !allow_plaintext {
            return Err(invalid(
                "ANALYTICS_API_URL",
                format!(
                    "{} is plain http:// to a host that is not loopback: the API key and every record \
                     would cross the network unencrypted. Use https://, or set ANALYTICS_ALLOW_PLAINTEXT=true \
                     if the network itself is trusted",
                    redact_url(base_url.as_str())
                ),
            ));
        }

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

        Ok(Settings {
            database_url: database_url.trim().to_string().into(),
            amqp_url: amqp_url.trim().to_string().into(),
            amqp_ca_pem,
            queue_prefix,
            api: ApiSettings {
                base_url,
                key: key.into(),
                timeout,
                ca_pem: api_ca_pem,
                gzip: boolean(g, "ANALYTICS_GZIP", false)?,
                retry,
            },
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

    /// The database URL with its password replaced, for logs and messages.
    pub fn database_url_redacted(&self) -> String {
        redact_url(self.database_url.expose_secret())
    }

    /// The AMQP URL with its password replaced, for logs and messages.
    pub fn amqp_url_redacted(&self) -> String {
        redact_url(self.amqp_url.expose_secret())
    }
}

const DAY: i128 = 86_400;

/// One environment variable: its name, default, range and meaning. [`ENV_VARS`] is the
/// one source of truth for the numbers' defaults and ranges (the parser reads them from
/// it), for `loansync --help`'s environment section, and for README's configuration
/// table (a test compares them).
#[derive(Debug, Clone, Copy)]
pub struct EnvVar {
    pub name: &'static str,
    /// The default as shown ("–": none); for numbers, the value the parser uses.
    pub default: &'static str,
    /// Accepted whole numbers, inclusive; `None` for what is not a number.
    pub range: Option<(i128, i128)>,
    pub help: &'static str,
}

const fn var(name: &'static str, default: &'static str, help: &'static str) -> EnvVar {
    EnvVar {
        name,
        default,
        range: None,
        help,
    }
}

const fn int(
    name: &'static str,
    default: &'static str,
    lo: i128,
    hi: i128,
    help: &'static str,
) -> EnvVar {
    EnvVar {
        name,
        default,
        range: Some((lo, hi)),
        help,
    }
}

/// Every setting loansync reads.
pub const ENV_VARS: &[EnvVar] = &[
    var(
        "DATABASE_URL",
        DEFAULT_DATABASE_URL,
        "the Django database (source and ETL tables), URL form",
    ),
    var(
        "DATABASE_URL_FILE",
        "–",
        "file holding the database URL (when DATABASE_URL is unset)",
    ),
    var("AMQP_URL", DEFAULT_AMQP_URL, "RabbitMQ (amqps:// for TLS)"),
    var(
        "AMQP_URL_FILE",
        "–",
        "file holding the AMQP URL (when AMQP_URL is unset)",
    ),
    var(
        "AMQP_CA_FILE",
        "–",
        "extra CA certificates (PEM) for an amqps:// broker",
    ),
    var(
        "ETL_QUEUE_PREFIX",
        "etl",
        "queue names are <prefix>.plan, <prefix>.chunks, <prefix>.dead",
    ),
    var(
        "ANALYTICS_API_URL",
        DEFAULT_API_URL,
        "base URL of the analytics API",
    ),
    var(
        "ANALYTICS_ALLOW_PLAINTEXT",
        "false",
        "allow plain http:// to a host that is not loopback",
    ),
    var(
        "ANALYTICS_API_KEY",
        "the local stub's development key",
        "bearer key",
    ),
    var(
        "ANALYTICS_API_KEY_FILE",
        "–",
        "file holding the key (when ANALYTICS_API_KEY is unset)",
    ),
    var(
        "ANALYTICS_CA_FILE",
        "–",
        "extra CA certificates (PEM) for an https:// API",
    ),
    var("ANALYTICS_GZIP", "false", "gzip request bodies"),
    int(
        "ETL_BATCH_SIZE_CUSTOMERS",
        "500",
        1,
        10_000,
        "records per customer chunk",
    ),
    int(
        "ETL_BATCH_SIZE_OFFICERS",
        "500",
        1,
        10_000,
        "records per officer chunk",
    ),
    int(
        "ETL_BATCH_SIZE_LOANS",
        "100",
        1,
        10_000,
        "records per loan chunk",
    ),
    int(
        "ETL_BATCH_SIZE_REPAYMENTS",
        "200",
        1,
        10_000,
        "records per repayment chunk",
    ),
    int(
        "ETL_DEFAULT_LOOKBACK_DAYS",
        "30",
        1,
        36_500,
        "an entity never synced starts this far back",
    ),
    int(
        "ETL_INCREMENTAL_OVERLAP_SECS",
        "120",
        0,
        7 * DAY,
        "subtracted from the watermark to catch rows committed late",
    ),
    int(
        "ETL_STALE_SYNC_SECS",
        "900",
        1,
        7 * DAY,
        "a running sync with no chunk settled for this long is stalled",
    ),
    int(
        "ETL_RETRY_INITIAL_MS",
        "500",
        1,
        60_000,
        "first retry delay",
    ),
    int(
        "ETL_RETRY_MAX_INTERVAL_SECS",
        "30",
        1,
        3_600,
        "largest retry delay (also caps Retry-After)",
    ),
    int(
        "ETL_RETRY_MAX_ELAPSED_SECS",
        "300",
        0,
        DAY,
        "deadline of one chunk in the API client (0: no retries)",
    ),
    int(
        "ETL_BROKER_CONSUMER_TIMEOUT_SECS",
        "1800",
        60,
        7 * DAY,
        "the broker's consumer_timeout; a chunk's worst case must stay below it",
    ),
    int(
        "ETL_HTTP_TIMEOUT_SECS",
        "30",
        1,
        600,
        "timeout of one HTTP request",
    ),
    int(
        "ETL_WORKER_CONCURRENCY",
        "4",
        1,
        256,
        "chunks in flight per worker (its AMQP prefetch)",
    ),
    int(
        "ETL_DELIVERY_LIMIT",
        "5",
        1,
        100,
        "starts of one chunk before it is settled as failed and dead-lettered",
    ),
    int(
        "ETL_DB_POOL_SIZE",
        "concurrency + 2",
        2,
        1_000,
        "database connections per process",
    ),
    int(
        "ETL_SHUTDOWN_GRACE_SECS",
        "30",
        0,
        3_600,
        "time given to chunks in flight on SIGTERM",
    ),
    int(
        "ETL_DB_OUTAGE_WAIT_SECS",
        "300",
        0,
        DAY,
        "how long a message is held while PostgreSQL does not answer",
    ),
    int(
        "ETL_DB_STATEMENT_TIMEOUT_SECS",
        "60",
        0,
        DAY,
        "statement_timeout of every pooled connection (0: off)",
    ),
    int(
        "ETL_DB_LOCK_TIMEOUT_SECS",
        "30",
        0,
        DAY,
        "lock_timeout of every pooled connection (0: off)",
    ),
    int(
        "ETL_DB_IDLE_IN_TX_TIMEOUT_SECS",
        "60",
        0,
        DAY,
        "idle_in_transaction_session_timeout (0: off)",
    ),
    int(
        "ETL_DB_ACQUIRE_TIMEOUT_SECS",
        "5",
        1,
        600,
        "longest wait for a pooled database connection",
    ),
    int(
        "ETL_PUBLISH_CONFIRM_TIMEOUT_SECS",
        "30",
        1,
        3_600,
        "longest wait for a publisher confirm",
    ),
    int(
        "ETL_CHUNK_RETENTION_DAYS",
        "7",
        1,
        3_650,
        "finished syncs' chunk id lists are deleted after this long",
    ),
    var(
        "METRICS_ADDR",
        "off",
        "host:port serving /metrics, /healthz, /readyz",
    ),
    var("RUST_LOG", "info", "log filter"),
    var("LOG_FORMAT", "text", "json for one JSON object per line"),
];

/// The environment section of `loansync --help`, from [`ENV_VARS`].
pub fn env_help() -> String {
    let mut out =
        String::from("Environment (every setting; README \"Configuration\" says more):\n");
    for v in ENV_VARS {
        let range = v
            .range
            .map(|(lo, hi)| format!(", {lo}..={hi}"))
            .unwrap_or_default();
        out.push_str(&format!(
            "  {:<34} {} [default: {}{range}]\n",
            v.name, v.help, v.default
        ));
    }
    out
}

/// The range of a numeric variable of [`ENV_VARS`].
fn range_of(name: &'static str) -> std::ops::RangeInclusive<i128> {
    match ENV_VARS
        .iter()
        .find(|v| v.name == name)
        .and_then(|v| v.range)
    {
        Some((lo, hi)) => lo..=hi,
        // Not reached: every numeric variable is in the table (a unit test checks it).
        None => 0..=0,
    }
}

/// A whole number with the default and range of [`ENV_VARS`].
fn num_env<T>(get: &Lookup, name: &'static str) -> Result<T, ConfigError>
where
    T: TryFrom<i128>,
{
    let default = ENV_VARS
        .iter()
        .find(|v| v.name == name)
        .and_then(|v| v.default.parse::<i128>().ok())
        .and_then(|d| T::try_from(d).ok())
        .ok_or_else(|| invalid(name, "has no numeric default in ENV_VARS (a bug)"))?;
    num(get, name, default, range_of(name))
}

type Lookup<'a> = dyn Fn(&'static str) -> Result<Option<String>, ConfigError> + 'a;

/// A whole number in `range` (unset: `default`). The error gives the range, and never
/// panics however large or negative the text.
fn num<T>(
    get: &Lookup,
    name: &'static str,
    default: T,
    range: std::ops::RangeInclusive<i128>,
) -> Result<T, ConfigError>
where
    T: TryFrom<i128>,
{
    let Some(v) = get(name)? else {
        return Ok(default);
    };
    let (lo, hi) = (*range.start(), *range.end());
    let n: i128 = v.trim().parse().map_err(|_| {
        invalid(
            name,
            format!("{v:?} is not a whole number (expected {lo} to {hi})"),
        )
    })?;
    if !range.contains(&n) {
        return Err(invalid(
            name,
            format!("{n} is out of range (expected {lo} to {hi})"),
        ));
    }
    T::try_from(n).map_err(|_| invalid(name, format!("{n} is out of range")))
}

/// The value of `name`, or else the contents of the file named by `file_name` (a
/// mounted secret), trimmed; `None` when neither is set. Also says which variable it
/// came from, for error messages. An unreadable or empty file is an error naming
/// `file_name`; the contents are never part of an error.
fn value_or_file(
    get: &Lookup,
    name: &'static str,
    file_name: &'static str,
) -> Result<Option<(String, &'static str)>, ConfigError> {
    if let Some(v) = get(name)? {
        return Ok(Some((v, name)));
    }
    let Some(path) = get(file_name)? else {
        return Ok(None);
    };
    let path = path.trim();
    let text = std::fs::read_to_string(path)
        .map_err(|e| invalid(file_name, format!("cannot read {path}: {e}")))?;
    let value = text.trim();
    if value.is_empty() {
        return Err(invalid(
            file_name,
            format!("{path} is empty; it must hold the value of {name}"),
        ));
    }
    Ok(Some((value.to_string(), file_name)))
}

/// `true`/`false` (also `1`/`0`, `yes`/`no`, `on`/`off`, any case).
fn boolean(get: &Lookup, name: &'static str, default: bool) -> Result<bool, ConfigError> {
    match get(name)?.map(|v| v.trim().to_ascii_lowercase()) {
        None => Ok(default),
        Some(v) if matches!(v.as_str(), "1" | "true" | "yes" | "on") => Ok(true),
        Some(v) if matches!(v.as_str(), "0" | "false" | "no" | "off") => Ok(false),
        Some(v) => Err(invalid(name, format!("{v:?} is not true or false"))),
    }
}

/// A host that never leaves the machine: 127.0.0.0/8, ::1, `localhost`.
fn is_loopback(u: &url::Url) -> bool {
    match u.host() {
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => {
            ip.is_loopback() || ip.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
        Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        None => false,
    }
}

/// The query parameters sqlx's PostgreSQL driver understands. It ignores any other, with a
/// log line that prints the value: a misspelt `sslmode` would silently leave TLS off, and a
/// libpq-only `sslpassword` would be logged. Both are refused instead.
const PG_PARAMETERS: &[&str] = &[
    "sslmode",
    "ssl-mode",
    "sslrootcert",
    "ssl-root-cert",
    "ssl-ca",
    "sslcert",
    "ssl-cert",
    "sslkey",
    "ssl-key",
    "statement-cache-capacity",
    "host",
    "hostaddr",
    "port",
    "dbname",
    "user",
    "password",
    "application_name",
    "options",
];

/// `DATABASE_URL` as sqlx will read it: the URL form only (sqlx does not take libpq's
/// `host=… password=…` strings), known parameters only. The error never holds the password.
fn check_database_url(raw: &str) -> Result<(), String> {
    const FORM: &str =
        "postgres://USER:PASSWORD@HOST:5432/DBNAME?sslmode=verify-full&sslrootcert=/path/to/ca.pem";
    let u = match url::Url::parse(raw) {
        Ok(u) => u,
        Err(_) if raw.contains('=') && !raw.contains("://") => {
            return Err(format!(
                "this looks like a libpq key/value string; loansync's driver takes the URL form only: {FORM}"
            ));
        }
        Err(e) => return Err(format!("not a URL ({e}); expected {FORM}")),
    };
    if !matches!(u.scheme(), "postgres" | "postgresql") {
        return Err(format!(
            "the scheme is {:?}; expected postgres:// or postgresql://",
            u.scheme()
        ));
    }
    for (k, v) in u.query_pairs() {
        // The CA file is read when connecting: check it now, like ANALYTICS_CA_FILE.
        if matches!(k.as_ref(), "sslrootcert" | "ssl-root-cert" | "ssl-ca") {
            crate::tls::read_ca_pem(&v).map_err(|e| format!("{k}: {e}"))?;
        }
        let known =
            PG_PARAMETERS.contains(&k.as_ref()) || (k.starts_with("options[") && k.ends_with(']'));
        if !known {
            return Err(format!(
                "unknown parameter {k:?} (the driver would ignore it); known: {}",
                PG_PARAMETERS.join(", ")
            ));
        }
    }
    <sqlx::postgres::PgConnectOptions as std::str::FromStr>::from_str(raw)
        .map(drop)
        .map_err(|e| redact_text(&e.to_string()))
}

/// `AMQP_URL` as lapin will read it. The error never holds the password (lapin's own
/// error for a URL without `//` quotes the whole URL, so that case is caught first).
fn check_amqp_url(raw: &str) -> Result<(), String> {
    const FORM: &str = "amqp://USER:PASSWORD@HOST:5672/VHOST (or amqps://)";
    let u = url::Url::parse(raw).map_err(|e| format!("not a URL ({e}); expected {FORM}"))?;
    if u.cannot_be_a_base() || !u.has_host() {
        return Err(format!("not a URL with a host; expected {FORM}"));
    }
    if !matches!(u.scheme(), "amqp" | "amqps") {
        return Err(format!("the scheme is {:?}; expected {FORM}", u.scheme()));
    }
    raw.parse::<lapin::uri::AMQPUri>()
        .map(drop)
        .map_err(|e| redact_text(&e))
}

/// Query parameters and key/value pairs whose value is hidden: `password`, `passwd`,
/// `pwd`, `sslpassword`, `token`, `key`, `secret`, `api_key`, … (any case, any name
/// containing one of these words).
fn is_credential_key(k: &str) -> bool {
    let k = k.to_ascii_lowercase();
    [
        "pass",
        "pwd",
        "secret",
        "token",
        "key",
        "auth",
        "credential",
        "signature",
    ]
    .iter()
    .any(|w| k.contains(w))
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

/// A URL fit to print: the password of its user info and the value of every
/// credential-like query parameter become `***`. A libpq key/value string has its
/// credential values hidden the same way; any other text that is not a URL is hidden whole.
pub fn redact_url(raw: &str) -> String {
    match url::Url::parse(raw) {
        Ok(mut u) => {
            if u.password().is_some() {
                let _ = u.set_password(Some("***"));
            }
            if u.query_pairs().any(|(k, _)| is_credential_key(&k)) {
                let pairs: Vec<(String, String)> = u
                    .query_pairs()
                    .map(|(k, v)| {
                        let v = if is_credential_key(&k) {
                            "***".to_string()
                        } else {
                            v.into_owned()
                        };
                        (k.into_owned(), v)
                    })
                    .collect();
                u.query_pairs_mut().clear().extend_pairs(pairs);
            }
            u.to_string()
        }
        Err(_) if raw.contains('=') && !raw.contains("://") => redact_key_values(raw),
        Err(_) => "<unparseable url>".to_string(),
    }
}

/// `host=db password='a b' user=x` → `host=db password=*** user=x`.
fn redact_key_values(raw: &str) -> String {
    let mut out = String::with_capacity(raw.len());
    let mut rest = raw;
    while let Some(eq) = rest.find('=') {
        let (before, after) = rest.split_at(eq);
        // The key is the last word before '='.
        let key = before
            .rsplit(|c: char| c.is_whitespace())
            .next()
            .unwrap_or_default()
            .trim();
        out.push_str(before);
        out.push('=');
        let after = &after[1..];
        // The value: a quoted string (with \' escapes) or up to the next whitespace.
        let end = if let Some(quoted) = after.strip_prefix('\'') {
            let mut escaped = false;
            quoted
                .char_indices()
                .find(|&(_, c)| {
                    let close = c == '\'' && !escaped;
                    escaped = c == '\\' && !escaped;
                    close
                })
                .map_or(after.len(), |(i, _)| i + 2)
        } else {
            after.find(char::is_whitespace).unwrap_or(after.len())
        };
        if is_credential_key(key) {
            out.push_str("***");
        } else {
            out.push_str(&after[..end]);
        }
        rest = &after[end..];
    }
    out.push_str(rest);
    out
}

/// Free text (an error message, a log line) with every URL in it passed through
/// [`redact_url`] and every `password=…`-like pair hidden, for text that came from a
/// library and may quote a URL.
pub fn redact_text(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find("://") {
        // Back to the start of the scheme.
        let start = rest[..i]
            .rfind(|c: char| !(c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.')))
            .map_or(0, |j| j + 1);
        let end = i + rest[i..]
            .find(|c: char| c.is_whitespace() || matches!(c, '\'' | '"' | '<' | '>' | '`' | ')'))
            .unwrap_or(rest.len() - i);
        out.push_str(&redact_key_values(&rest[..start]));
        if start == i {
            // "://" without a scheme: not a URL, hide what follows up to the separator.
            out.push_str("<hidden>");
        } else {
            out.push_str(&redact_url(&rest[start..end]));
        }
        rest = &rest[end..];
    }
    out.push_str(&redact_key_values(rest));
    out
}

impl std::fmt::Debug for ApiSettings {
    /// The URL is printed redacted (it may carry credentials), the key not at all.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiSettings")
            .field("base_url", &redact_url(self.base_url.as_str()))
            .field("key", &self.key)
            .field("timeout", &self.timeout)
            .field("ca_pem", &self.ca_pem.as_ref().map(|_| "<pem>"))
            .field("gzip", &self.gzip)
            .field("retry", &self.retry)
            .finish()
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn env_vars_are_the_one_table_of_defaults_ranges_and_docs() {
        let defaults = settings(&[]).unwrap();
        // Numeric defaults parse and sit inside their ranges.
        for v in ENV_VARS {
            if let (Some((lo, hi)), Ok(d)) = (v.range, v.default.parse::<i128>()) {
                assert!((lo..=hi).contains(&d), "{}", v.name);
            }
        }
        // The parser uses the table: the bounds are accepted, one past them refused.
        for v in ENV_VARS.iter().filter(|v| v.range.is_some()) {
            let (lo, hi) = v.range.unwrap();
            for ok in [lo, hi] {
                if v.name == "ETL_BROKER_CONSUMER_TIMEOUT_SECS" && ok == lo {
                    continue; // below every chunk's worst case: refused by the cross-check
                }
                let text = ok.to_string();
                let r = settings(&[(v.name, text.as_str())]);
                let cross = r.as_ref().err().map(|e| e.to_string()).unwrap_or_default();
                // Another variable's cross-check may refuse an extreme value; the range
                // check itself never does.
                assert!(
                    !cross.starts_with(&format!("{}: {ok} is out of range", v.name)),
                    "{cross}"
                );
            }
            for bad in [lo - 1, hi + 1] {
                let text = bad.to_string();
                let e = settings(&[(v.name, text.as_str())])
                    .unwrap_err()
                    .to_string();
                assert!(e.starts_with(v.name), "{e}");
            }
        }
        assert_eq!(
            defaults.db_timeouts.statement,
            DbTimeouts::default().statement
        );
        assert_eq!(defaults.db_timeouts.lock, DbTimeouts::default().lock);
        assert_eq!(
            defaults.db_timeouts.idle_in_transaction,
            DbTimeouts::default().idle_in_transaction
        );
        assert_eq!(defaults.db_timeouts.acquire, DbTimeouts::default().acquire);
        let help = env_help();
        for v in ENV_VARS {
            assert!(help.contains(v.name), "{}", v.name);
        }
    }

    #[test]
    fn readme_documents_every_variable_with_the_same_default() {
        let readme = include_str!("../README.md");
        for v in ENV_VARS {
            let row = readme
                .lines()
                .find(|l| l.starts_with(&format!("| `{}` |", v.name)))
                .unwrap_or_else(|| {
                    panic!("README's configuration table has no row for {}", v.name)
                });
            if let (Some((lo, hi)), true) = (v.range, v.default.parse::<i128>().is_ok()) {
                assert!(
                    row.contains(&format!("| `{}` |", v.default)),
                    "README's default for {} differs from ENV_VARS ({}): {row}",
                    v.name,
                    v.default
                );
                assert!(
                    row.contains(&format!("{lo}–{hi}")),
                    "README's range for {} is not {lo}–{hi}: {row}",
                    v.name
                );
            }
        }
    }
    use super::*;
    use std::collections::HashMap;

    fn settings(pairs: &[(&str, &str)]) -> Result<Settings, ConfigError> {
        let m: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Settings::from_lookup(|k| m.get(k).cloned())
    }

    #[test]
    fn defaults_follow_the_spec() {
        let s = settings(&[]).unwrap();
        assert_eq!(s.chunk_sizes.loans, 100);
        assert_eq!(s.chunk_sizes.repayments, 200);
        assert_eq!(s.chunk_sizes.customers, 500);
        assert_eq!(s.chunk_sizes.officers, 500);
        assert_eq!(s.api.retry.initial, Duration::from_millis(500));
        assert_eq!(s.api.retry.max_interval, Duration::from_secs(30));
        assert_eq!(s.api.retry.max_elapsed, Duration::from_secs(300));
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
            chunk_worst_case(&s.api.retry, s.api.timeout, s.db_outage_wait),
            Duration::from_secs(300 + 100 + 300 + 30)
        );
        // Just under and just at the consumer timeout.
        assert!(settings(&[("ETL_BROKER_CONSUMER_TIMEOUT_SECS", "661")]).is_ok());
        assert!(settings(&[("ETL_BROKER_CONSUMER_TIMEOUT_SECS", "660")]).is_err());
    }

    #[test]
    fn bad_numbers_name_the_variable() {
        let err = settings(&[("ETL_BATCH_SIZE_LOANS", "lots")]).unwrap_err();
        assert!(err.to_string().starts_with("ETL_BATCH_SIZE_LOANS"), "{err}");
        assert!(settings(&[("ETL_BATCH_SIZE_LOANS", "0")]).is_err());
        assert!(settings(&[("ETL_QUEUE_PREFIX", "a b")]).is_err());
    }

    #[test]
    fn key_file_is_read_and_trimmed() {
        let path = std::env::temp_dir().join(format!("loansync-key-{}", uuid::Uuid::new_v4()));
        std::fs::write(&path, "s3cret\n").unwrap();
        let s = settings(&[("ANALYTICS_API_KEY_FILE", path.to_str().unwrap())]).unwrap();
        assert_eq!(s.api.key.expose_secret(), "s3cret");
        std::fs::remove_file(path).unwrap();
    }

    /// A temporary file holding `text`, removed when dropped.
    struct TempFile(std::path::PathBuf);

    impl TempFile {
        fn new(text: &str) -> TempFile {
            let path =
                std::env::temp_dir().join(format!("loansync-secret-{}", uuid::Uuid::new_v4()));
            std::fs::write(&path, text).unwrap();
            TempFile(path)
        }

        fn path(&self) -> &str {
            self.0.to_str().unwrap()
        }
    }

    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    #[test]
    fn url_files_are_read_and_trimmed_when_the_plain_variable_is_unset() {
        let db = TempFile::new("  postgres://app:hunter2@db:5432/lending\n");
        let mq = TempFile::new("amqp://loansync:hunter2@mq:5672/%2f\n\n");
        let s = settings(&[
            ("DATABASE_URL_FILE", db.path()),
            ("AMQP_URL_FILE", mq.path()),
        ])
        .unwrap();
        assert_eq!(
            s.database_url.expose_secret(),
            "postgres://app:hunter2@db:5432/lending"
        );
        assert_eq!(
            s.amqp_url.expose_secret(),
            "amqp://loansync:hunter2@mq:5672/%2f"
        );
        assert!(!format!("{s:?}").contains("hunter2"));
        // The plain variable wins over the file.
        let s = settings(&[
            ("DATABASE_URL", "postgres://u@plain/x"),
            ("DATABASE_URL_FILE", db.path()),
            ("AMQP_URL", "amqp://guest@plain:5672/%2f"),
            ("AMQP_URL_FILE", mq.path()),
        ])
        .unwrap();
        assert_eq!(s.database_url.expose_secret(), "postgres://u@plain/x");
        assert_eq!(s.amqp_url.expose_secret(), "amqp://guest@plain:5672/%2f");
    }

    #[test]
    fn unreadable_empty_or_invalid_url_files_name_the_variable_without_the_secret() {
        let empty = TempFile::new(" \n\t\n");
        let bad_db = TempFile::new("mysql://u:hunter2@db/x\n");
        let bad_mq = TempFile::new("http://guest:hunter2@h:5672\n");
        let dir = std::env::temp_dir();
        for var in [
            "DATABASE_URL_FILE",
            "AMQP_URL_FILE",
            "ANALYTICS_API_KEY_FILE",
        ] {
            for (path, what) in [
                ("/nonexistent/loansync/secret", "cannot read /nonexistent"),
                (empty.path(), "is empty"),
                (dir.to_str().unwrap(), "cannot read"),
            ] {
                let err = settings(&[(var, path)]).unwrap_err().to_string();
                assert!(err.starts_with(&format!("{var}: ")), "{var}={path}: {err}");
                assert!(err.contains(what), "{var}={path}: {err}");
            }
        }
        for (var, file) in [("DATABASE_URL_FILE", &bad_db), ("AMQP_URL_FILE", &bad_mq)] {
            let err = settings(&[(var, file.path())]).unwrap_err().to_string();
            assert!(err.starts_with(&format!("{var}: ")), "{err}");
            assert!(!err.contains("hunter2"), "{err}");
        }
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

    /// Zero is accepted where it means something, and the bounds themselves are in range.
    #[test]
    fn zero_and_the_bounds_are_accepted_where_they_mean_something() {
        let s = settings(&[
            ("ETL_RETRY_MAX_ELAPSED_SECS", "0"),
            ("ETL_DB_OUTAGE_WAIT_SECS", "0"),
            ("ETL_INCREMENTAL_OVERLAP_SECS", "0"),
            ("ETL_SHUTDOWN_GRACE_SECS", "0"),
            ("ETL_DEFAULT_LOOKBACK_DAYS", "36500"),
            ("ETL_WORKER_CONCURRENCY", "256"),
            ("ETL_BATCH_SIZE_LOANS", "10000"),
            ("ETL_DB_POOL_SIZE", " 2 "),
            ("METRICS_ADDR", ""),
            ("ANALYTICS_GZIP", "TRUE"),
        ])
        .unwrap();
        assert_eq!(s.api.retry.max_elapsed, Duration::ZERO);
        assert_eq!(s.db_outage_wait, Duration::ZERO);
        assert_eq!(s.incremental_overlap, chrono::Duration::zero());
        assert_eq!(s.shutdown_grace, Duration::ZERO);
        assert_eq!(s.default_lookback, chrono::Duration::days(36500));
        assert_eq!(s.worker_concurrency, 256);
        assert_eq!(s.db_pool_size, 2);
        assert_eq!(s.metrics_addr, None);
        assert!(s.api.gzip);
        // The largest lookback, from today, is still a date.
        assert!(
            chrono::Utc::now()
                .checked_sub_signed(s.default_lookback)
                .is_some()
        );
    }

    #[test]
    fn plain_http_to_a_remote_host_needs_the_allow_variable() {
        for local in [
            "http://127.0.0.1:8088",
            "http://127.1.2.3",
            "http://localhost:8088/api",
            "http://LOCALHOST",
            "http://[::1]:8088",
            "https://analytics.example.com",
            "https://10.0.0.5",
        ] {
            settings(&[("ANALYTICS_API_URL", local)]).unwrap_or_else(|e| panic!("{local}: {e}"));
        }
        for remote in [
            "http://stub:8088",
            "http://10.0.0.5",
            "http://analytics.example.com",
            "http://[2001:db8::1]",
            "http://localhost.example.com",
            "http://user:hunter2@analytics.example.com",
        ] {
            let err = settings(&[("ANALYTICS_API_URL", remote)])
                .unwrap_err()
                .to_string();
            assert!(err.starts_with("ANALYTICS_API_URL: "), "{err}");
            assert!(err.contains("ANALYTICS_ALLOW_PLAINTEXT=true"), "{err}");
            assert!(!err.contains("hunter2"), "{err}");
            let s = settings(&[
                ("ANALYTICS_API_URL", remote),
                ("ANALYTICS_ALLOW_PLAINTEXT", "true"),
            ])
            .unwrap();
            assert_eq!(s.api.base_url.scheme(), "http");
            assert!(!format!("{s:?}").contains("hunter2"));
        }
        let err = settings(&[
            ("ANALYTICS_API_URL", "http://stub:8088"),
            ("ANALYTICS_ALLOW_PLAINTEXT", "false"),
        ])
        .unwrap_err();
        assert!(
            err.to_string().contains("ANALYTICS_ALLOW_PLAINTEXT"),
            "{err}"
        );
    }

    #[test]
    fn every_url_form_is_redacted() {
        let cases = [
            (
                "postgres://app:hunter2@db:5432/x",
                "postgres://app:***@db:5432/x",
            ),
            (
                "postgresql://app:hunter2@db/x?sslmode=verify-full",
                "postgresql://app:***@db/x?sslmode=verify-full",
            ),
            (
                "postgres://app@db/x?password=hunter2&sslmode=require",
                "postgres://app@db/x?password=***&sslmode=require",
            ),
            (
                "postgres://db/x?user=app&PassWord=hunter2",
                "postgres://db/x?user=app&PassWord=***",
            ),
            (
                "postgres://db/x?sslpassword=hunter2",
                "postgres://db/x?sslpassword=***",
            ),
            (
                "postgres://db/x?passwd=hunter2",
                "postgres://db/x?passwd=***",
            ),
            ("postgres://db/x?pwd=hunter2", "postgres://db/x?pwd=***"),
            (
                "amqp://guest:hunter2@h:5672/%2f",
                "amqp://guest:***@h:5672/%2f",
            ),
            (
                "amqps://loansync:hunter2@h/%2f?heartbeat=30",
                "amqps://loansync:***@h/%2f?heartbeat=30",
            ),
            ("amqp://guest@h:5672/%2f", "amqp://guest@h:5672/%2f"),
            (
                "https://u:hunter2@api.example.com/v1",
                "https://u:***@api.example.com/v1",
            ),
            (
                "http://api.example.com/v1?key=hunter2&page=2",
                "http://api.example.com/v1?key=***&page=2",
            ),
            (
                "https://api.example.com/?token=hunter2&API_KEY=hunter2&secret=hunter2&access_token=hunter2",
                "https://api.example.com/?token=***&API_KEY=***&secret=***&access_token=***",
            ),
            (
                "host=db user=app password=hunter2 dbname=x",
                "host=db user=app password=*** dbname=x",
            ),
            (
                "host=db password='hunter2 with \\' quote' sslmode=verify-full",
                "host=db password=*** sslmode=verify-full",
            ),
            ("postgres://u:hunter2@[::1", "<unparseable url>"),
        ];
        for (raw, want) in cases {
            assert_eq!(redact_url(raw), want, "{raw}");
            assert!(!redact_url(raw).contains("hunter2"));
        }
    }

    #[test]
    fn urls_inside_text_are_redacted() {
        let text = "error sending request for url (http://api.example.com/loans?key=hunter2): \
                    tried amqp://guest:hunter2@h/%2f and 'postgres://u:hunter2@db/x', password=hunter2";
        let r = redact_text(text);
        assert!(!r.contains("hunter2"), "{r}");
        assert!(r.contains("http://api.example.com/loans?key=***)"), "{r}");
        assert!(r.contains("amqp://guest:***@h/%2f and"), "{r}");
        assert!(r.contains("'postgres://u:***@db/x'"), "{r}");
        assert!(r.ends_with("password=***"), "{r}");
        assert_eq!(redact_text("no url here"), "no url here");
    }

    #[test]
    fn connection_strings_are_checked_at_start_up_without_echoing_the_password() {
        // libpq key/value strings are not taken by sqlx: refused with the URL form shown.
        let err = settings(&[("DATABASE_URL", "host=db user=app password=hunter2 dbname=x")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("key/value"), "{err}");
        assert!(err.contains("postgres://"), "{err}");
        assert!(!err.contains("hunter2"), "{err}");
        // A parameter sqlx would ignore (and log, value included) is refused.
        let err = settings(&[("DATABASE_URL", "postgres://u@db/x?sslpassword=hunter2")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("sslpassword"), "{err}");
        assert!(!err.contains("hunter2"), "{err}");
        // What the deploy examples use is accepted, once the CA file is there.
        let example = "postgres://loansync:hunter2@postgres.lending.svc:5432/lending?sslmode=verify-full&sslrootcert=";
        let err = settings(&[(
            "DATABASE_URL",
            &format!("{example}/nonexistent/loansync/db-ca.pem"),
        )])
        .unwrap_err()
        .to_string();
        assert!(
            err.starts_with("DATABASE_URL: sslrootcert: cannot read /nonexistent"),
            "{err}"
        );
        assert!(!err.contains("hunter2"), "{err}");
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = ca
            .self_signed(&rcgen::KeyPair::generate().unwrap())
            .unwrap()
            .pem();
        let path = std::env::temp_dir().join(format!("loansync-db-ca-{}", uuid::Uuid::new_v4()));
        std::fs::write(&path, ca).unwrap();
        settings(&[("DATABASE_URL", &format!("{example}{}", path.display()))]).unwrap();
        std::fs::remove_file(path).unwrap();
        settings(&[(
            "AMQP_URL",
            "amqps://loansync:hunter2@rabbitmq.messaging.svc:5671/%2f",
        )])
        .unwrap();
        let err = settings(&[("AMQP_URL", "amqp:hunter2")])
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("AMQP_URL: "), "{err}");
        assert!(!err.contains("hunter2"), "{err}");
    }

    #[test]
    fn the_api_url_never_shows_in_debug_with_its_credentials() {
        let s = settings(&[(
            "ANALYTICS_API_URL",
            "https://u:hunter2@api.example.com/v1?key=hunter2",
        )])
        .unwrap();
        let debug = format!("{s:?}");
        assert!(!debug.contains("hunter2"), "{debug}");
        assert!(debug.contains("api.example.com"), "{debug}");
    }
}
