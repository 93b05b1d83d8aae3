//! Reading the environment: the [`ENV_VARS`] table (every variable, its default, range
//! and help), `loansync --help`'s environment section, and the parsers of numbers,
//! booleans and `*_FILE` secrets the settings are built with.

use super::{ConfigError, invalid};

pub const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/loansync";
pub const DEFAULT_AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// The defaults `--help` and README show for the analytics API's URL and key: the local
/// stub's in a `dev-tools` build, none in the production build (see [`super::api`]).
#[cfg(feature = "dev-tools")]
const API_URL_SHOWN: &str = super::api::DEFAULT_API_URL;
#[cfg(feature = "dev-tools")]
const API_KEY_SHOWN: &str = "the local stub's development key";
#[cfg(not(feature = "dev-tools"))]
const API_URL_SHOWN: &str = "none: required to call the API";
#[cfg(not(feature = "dev-tools"))]
const API_KEY_SHOWN: &str = API_URL_SHOWN;

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
        API_URL_SHOWN,
        "base URL of the analytics API",
    ),
    var(
        "ANALYTICS_ALLOW_PLAINTEXT",
        "false",
        "allow plain http:// to a host that is not loopback",
    ),
    var("ANALYTICS_API_KEY", API_KEY_SHOWN, "bearer key"),
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
        "chunks in flight per worker (its AMQP prefetch) in fixed mode",
    ),
    var(
        "ETL_WORKER_CONCURRENCY_MODE",
        "fixed",
        "fixed or adaptive: requests in flight to the API per worker follow its answers",
    ),
    int(
        "ETL_WORKER_MAX_CONCURRENCY",
        "32",
        1,
        256,
        "adaptive mode: the most requests in flight per worker (its AMQP prefetch)",
    ),
    int(
        "ANALYTICS_MAX_IN_FLIGHT",
        "0",
        0,
        100_000,
        "requests in flight to the API across all workers, shared (0: no cap)",
    ),
    int(
        "ETL_WORKER_HEARTBEAT_SECS",
        "5",
        1,
        300,
        "a worker records itself live this often; gone after 3 silent",
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
pub(super) fn range_of(name: &'static str) -> std::ops::RangeInclusive<i128> {
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
pub(super) fn num_env<T>(get: &Lookup, name: &'static str) -> Result<T, ConfigError>
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

pub(super) type Lookup<'a> = dyn Fn(&'static str) -> Result<Option<String>, ConfigError> + 'a;

/// A whole number in `range` (unset: `default`). The error gives the range, and never
/// panics however large or negative the text.
pub(super) fn num<T>(
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
pub(super) fn value_or_file(
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
pub(super) fn boolean(
    get: &Lookup,
    name: &'static str,
    default: bool,
) -> Result<bool, ConfigError> {
    match get(name)?.map(|v| v.trim().to_ascii_lowercase()) {
        None => Ok(default),
        Some(v) if matches!(v.as_str(), "1" | "true" | "yes" | "on") => Ok(true),
        Some(v) if matches!(v.as_str(), "0" | "false" | "no" | "off") => Ok(false),
        Some(v) => Err(invalid(name, format!("{v:?} is not true or false"))),
    }
}

#[cfg(test)]
mod tests;
