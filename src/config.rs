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
#[derive(Debug, Clone)]
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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

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
    /// Where `/metrics`, `/healthz`, `/readyz` are served; `None` when empty (`METRICS_ADDR`).
    pub metrics_addr: Option<SocketAddr>,
    pub log_format: LogFormat,
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
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let get = |k: &str| get(k).filter(|v| !v.trim().is_empty());
        fn num<T: std::str::FromStr>(
            get: &dyn Fn(&str) -> Option<String>,
            name: &'static str,
            default: T,
        ) -> Result<T, ConfigError> {
            match get(name) {
                None => Ok(default),
                Some(v) => v
                    .trim()
                    .parse()
                    .map_err(|_| invalid(name, format!("{v:?} is not a valid number"))),
            }
        }
        let g: &dyn Fn(&str) -> Option<String> = &get;

        let key = match (get("ANALYTICS_API_KEY"), get("ANALYTICS_API_KEY_FILE")) {
            (Some(k), _) => k,
            (None, Some(path)) => std::fs::read_to_string(&path)
                .map_err(|e| invalid("ANALYTICS_API_KEY_FILE", format!("cannot read {path}: {e}")))?
                .trim()
                .to_string(),
            (None, None) => DEFAULT_STUB_KEY.to_string(),
        };
        if key.is_empty() {
            return Err(invalid("ANALYTICS_API_KEY", "the key is empty"));
        }
        let api_url = get("ANALYTICS_API_URL").unwrap_or_else(|| DEFAULT_API_URL.into());
        let base_url = url::Url::parse(api_url.trim_end_matches('/'))
            .map_err(|e| invalid("ANALYTICS_API_URL", e.to_string()))?;
        if !matches!(base_url.scheme(), "http" | "https") {
            return Err(invalid("ANALYTICS_API_URL", "must be http:// or https://"));
        }

        let retry = RetrySettings {
            initial: Duration::from_millis(num(g, "ETL_RETRY_INITIAL_MS", 500u64)?),
            max_interval: Duration::from_secs(num(g, "ETL_RETRY_MAX_INTERVAL_SECS", 30u64)?),
            max_elapsed: Duration::from_secs(num(g, "ETL_RETRY_MAX_ELAPSED_SECS", 300u64)?),
        };
        let timeout = Duration::from_secs(num(g, "ETL_HTTP_TIMEOUT_SECS", 30u64)?);
        let db_outage_wait = Duration::from_secs(num(g, "ETL_DB_OUTAGE_WAIT_SECS", 300u64)?);
        let broker_consumer_timeout =
            Duration::from_secs(num(g, "ETL_BROKER_CONSUMER_TIMEOUT_SECS", 1800u64)?);
        // A chunk is acked only after its POST (with every retry) and its commit. If one
        // chunk could outlast the broker's consumer timeout, the broker would close the
        // channel under a working worker and redeliver the chunk: refuse that now.
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
        if retry.initial.is_zero() || retry.max_interval < retry.initial {
            return Err(invalid(
                "ETL_RETRY_INITIAL_MS",
                "must be positive and not above ETL_RETRY_MAX_INTERVAL_SECS",
            ));
        }

        let chunk_sizes = ChunkSizes {
            customers: num(g, "ETL_BATCH_SIZE_CUSTOMERS", 500u32)?,
            officers: num(g, "ETL_BATCH_SIZE_OFFICERS", 500u32)?,
            loans: num(g, "ETL_BATCH_SIZE_LOANS", 100u32)?,
            repayments: num(g, "ETL_BATCH_SIZE_REPAYMENTS", 200u32)?,
        };
        for (name, v) in [
            ("ETL_BATCH_SIZE_CUSTOMERS", chunk_sizes.customers),
            ("ETL_BATCH_SIZE_OFFICERS", chunk_sizes.officers),
            ("ETL_BATCH_SIZE_LOANS", chunk_sizes.loans),
            ("ETL_BATCH_SIZE_REPAYMENTS", chunk_sizes.repayments),
        ] {
            if !(1..=10_000).contains(&v) {
                return Err(invalid(name, format!("{v} is outside 1..=10000")));
            }
        }
        let worker_concurrency: u16 = num(g, "ETL_WORKER_CONCURRENCY", 4u16)?;
        if worker_concurrency == 0 {
            return Err(invalid("ETL_WORKER_CONCURRENCY", "must be at least 1"));
        }
        let queue_prefix = get("ETL_QUEUE_PREFIX").unwrap_or_else(|| "etl".into());
        if !queue_prefix
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
        {
            return Err(invalid(
                "ETL_QUEUE_PREFIX",
                "only letters, digits, '.', '-' and '_' are allowed",
            ));
        }
        let metrics_addr = match get("METRICS_ADDR") {
            None => None,
            Some(v) if v == "off" => None,
            Some(v) => Some(
                v.parse()
                    .map_err(|_| invalid("METRICS_ADDR", format!("{v:?} is not host:port")))?,
            ),
        };
        let log_format = match get("LOG_FORMAT").as_deref() {
            None | Some("text") => LogFormat::Text,
            Some("json") => LogFormat::Json,
            Some(other) => {
                return Err(invalid(
                    "LOG_FORMAT",
                    format!("{other:?}: use json or text"),
                ));
            }
        };
        let ca_pem = |name: &'static str| {
            get(name)
                .map(|path| crate::tls::read_ca_pem(&path).map_err(|e| invalid(name, e)))
                .transpose()
        };
        let api_ca_pem = ca_pem("ANALYTICS_CA_FILE")?;
        let amqp_ca_pem = ca_pem("AMQP_CA_FILE")?;
        let delivery_limit: u32 = num(g, "ETL_DELIVERY_LIMIT", 5u32)?;
        if delivery_limit == 0 {
            return Err(invalid("ETL_DELIVERY_LIMIT", "must be at least 1"));
        }

        Ok(Settings {
            database_url: get("DATABASE_URL")
                .unwrap_or_else(|| DEFAULT_DATABASE_URL.into())
                .into(),
            amqp_url: get("AMQP_URL")
                .unwrap_or_else(|| DEFAULT_AMQP_URL.into())
                .into(),
            amqp_ca_pem,
            queue_prefix,
            api: ApiSettings {
                base_url,
                key: key.into(),
                timeout,
                ca_pem: api_ca_pem,
                gzip: match get("ANALYTICS_GZIP").map(|v| v.trim().to_ascii_lowercase()) {
                    None => false,
                    Some(v) if matches!(v.as_str(), "1" | "true" | "yes" | "on") => true,
                    Some(v) if matches!(v.as_str(), "0" | "false" | "no" | "off") => false,
                    Some(v) => {
                        return Err(invalid(
                            "ANALYTICS_GZIP",
                            format!("{v:?} is not true or false"),
                        ));
                    }
                },
                retry,
            },
            chunk_sizes,
            default_lookback: chrono::Duration::days(num(g, "ETL_DEFAULT_LOOKBACK_DAYS", 30i64)?),
            incremental_overlap: chrono::Duration::seconds(num(
                g,
                "ETL_INCREMENTAL_OVERLAP_SECS",
                120i64,
            )?),
            stale_sync_after: Duration::from_secs(num(g, "ETL_STALE_SYNC_SECS", 900u64)?),
            worker_concurrency,
            delivery_limit,
            broker_consumer_timeout,
            db_pool_size: num(g, "ETL_DB_POOL_SIZE", u32::from(worker_concurrency) + 2)?,
            shutdown_grace: Duration::from_secs(num(g, "ETL_SHUTDOWN_GRACE_SECS", 30u64)?),
            db_outage_wait,
            metrics_addr,
            log_format,
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

/// Time allowed for one chunk's own database work: the pool acquisitions of its start,
/// its load and its settle (at most 10 s each, see [`crate::db::connect_url`]), and the
/// pause before a failed chunk is handed back.
pub const CHUNK_DB_ALLOWANCE: Duration = Duration::from_secs(30);

/// The longest a worker can hold one chunk's message before acking or returning it.
///
/// The analytics client gives a chunk one deadline, `max_elapsed`, for every request
/// of it (retries, `Retry-After` waits, halving), starts none after it, and a request
/// started before it lasts at most `timeout`. A chunk that meets an unreachable
/// PostgreSQL is held and run again for up to `db_outage_wait`
/// ([`crate::db::through_outage`]), so the last run may start just before that wait
/// ends, and then take a whole chunk's time again.
pub fn chunk_worst_case(
    retry: &RetrySettings,
    timeout: Duration,
    db_outage_wait: Duration,
) -> Duration {
    db_outage_wait + retry.max_elapsed + timeout + CHUNK_DB_ALLOWANCE
}

/// Replaces the password of a URL with `***`; a string that is not a URL is hidden whole.
pub fn redact_url(raw: &str) -> String {
    match url::Url::parse(raw) {
        Ok(mut u) => {
            if u.password().is_some() {
                let _ = u.set_password(Some("***"));
            }
            u.to_string()
        }
        Err(_) => "<unparseable url>".to_string(),
    }
}

#[cfg(test)]
mod tests {
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
}
