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
mod tests {
    use super::*;
    use crate::config::DbTimeouts;
    use crate::config::test_support::{TempFile, settings};
    use secrecy::ExposeSecret;
    use std::time::Duration;

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
        let readme = include_str!("../../README.md");
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
        assert_eq!(s.api().unwrap().key.expose_secret(), "s3cret");
        std::fs::remove_file(path).unwrap();
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
        assert_eq!(s.api().unwrap().retry.max_elapsed, Duration::ZERO);
        assert_eq!(s.db_outage_wait, Duration::ZERO);
        assert_eq!(s.incremental_overlap, chrono::Duration::zero());
        assert_eq!(s.shutdown_grace, Duration::ZERO);
        assert_eq!(s.default_lookback, chrono::Duration::days(36500));
        assert_eq!(s.worker_concurrency, 256);
        assert_eq!(s.db_pool_size, 2);
        assert_eq!(s.metrics_addr, None);
        assert!(s.api().unwrap().gzip);
        // The largest lookback, from today, is still a date.
        assert!(
            chrono::Utc::now()
                .checked_sub_signed(s.default_lookback)
                .is_some()
        );
    }
}
