//! The connection pool and the embedded migrations; [`pooling`]: transaction poolers
//! told apart from sessions.

pub mod pooling;

use crate::config::{DbTimeouts, Settings};
use secrecy::ExposeSecret;
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use std::str::FromStr;
use std::time::Duration;

/// loansync's migrations, embedded in the binary.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Why the database could not be reached or prepared.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// The URL cannot be parsed: fix `DATABASE_URL`.
    #[error("DATABASE_URL is not valid: {0}")]
    InvalidUrl(String),
    /// PostgreSQL refused or did not answer (`at`: the redacted URL).
    #[error("cannot connect to PostgreSQL at {at}: {source}")]
    Connect {
        at: String,
        #[source]
        source: sqlx::Error,
    },
    /// A statement failed.
    #[error(transparent)]
    Query(#[from] sqlx::Error),
    /// A migration failed or the database's migrations do not match the binary's.
    #[error("migrating the database: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
}

impl crate::failure::Classify for DbError {
    fn failure(&self) -> crate::failure::Failure {
        use crate::failure::Failure;
        match self {
            DbError::InvalidUrl(_) | DbError::Migrate(_) => Failure::Fatal,
            DbError::Connect { source, .. } | DbError::Query(source) => Failure::of_sqlx(source),
        }
    }
}

/// Opens a pool sized for this process. Connections lazily reconnect after an outage.
/// Every connection carries the limits of `ETL_DB_*` ([`connect_options`]).
pub async fn connect(settings: &Settings) -> Result<PgPool, DbError> {
    connect_url_with(
        settings.database_url.expose_secret(),
        settings.db_pool_size,
        &settings.db_timeouts,
    )
    .await
}

/// [`connect`] for a URL, with the default [`DbTimeouts`].
pub async fn connect_url(url: &str, size: u32) -> Result<PgPool, DbError> {
    connect_url_with(url, size, &DbTimeouts::default()).await
}

/// The connect options of `url` with loansync's session settings: `statement_timeout`,
/// `lock_timeout` and `idle_in_transaction_session_timeout` (per statement, per lock
/// wait, per idle moment inside a transaction; 0 turns one off), and the server's TCP
/// keepalives. They are startup options, so they hold on every pooled connection,
/// reconnected ones included, and `RESET` returns to them.
///
/// sqlx 0.9 offers no client-side TCP keepalive: a connection whose peer vanished
/// without a FIN is noticed through these server-side limits and the server's
/// keepalives (which end the session and free its locks), and on the client through
/// the pool's acquire timeout and [`is_reachable`]'s two-second probe.
pub fn connect_options(url: &str, t: &DbTimeouts) -> Result<PgConnectOptions, DbError> {
    let ms = |d: std::time::Duration| d.as_millis().to_string();
    Ok(PgConnectOptions::from_str(url)
        .map_err(|e| DbError::InvalidUrl(e.to_string()))?
        .application_name("loansync")
        .options([
            ("statement_timeout", ms(t.statement)),
            ("lock_timeout", ms(t.lock)),
            (
                "idle_in_transaction_session_timeout",
                ms(t.idle_in_transaction),
            ),
            ("tcp_keepalives_idle", "30".to_string()),
            ("tcp_keepalives_interval", "10".to_string()),
            ("tcp_keepalives_count", "3".to_string()),
        ]))
}

/// A pool on `url` of `size` connections with the limits `t`.
pub async fn connect_url_with(url: &str, size: u32, t: &DbTimeouts) -> Result<PgPool, DbError> {
    let opts = connect_options(url, t)?;
    let pool = PgPoolOptions::new()
        .max_connections(size.max(2))
        .acquire_timeout(t.acquire)
        .connect_with(opts)
        .await
        .map_err(|source| DbError::Connect {
            at: crate::redact::redact_url(url),
            source,
        })?;
    Ok(pool)
}

/// Applies loansync's migrations. Safe to run repeatedly and on a database where
/// Django already created the ETL tables.
///
/// A migration may build an index on a big table or wait for Django's migrations: it
/// runs without the statement and lock timeouts, on a connection that gets them back
/// (`RESET`) before it returns to the pool.
pub async fn migrate(pool: &PgPool) -> Result<(), DbError> {
    let mut conn = pool.acquire().await?;
    sqlx::raw_sql("SET statement_timeout = 0; SET lock_timeout = 0")
        .execute(&mut *conn)
        .await?;
    let ran = MIGRATOR.run(&mut *conn).await;
    let reset = sqlx::raw_sql("RESET statement_timeout; RESET lock_timeout")
        .execute(&mut *conn)
        .await;
    if ran.is_err() || reset.is_err() {
        // Not handed back with its limits off.
        conn.close_on_drop();
    }
    ran?;
    Ok(())
}

/// True when PostgreSQL answers `SELECT 1` within two seconds. A simple query (one
/// message, no statement prepared), so that it answers through any pooler.
pub async fn is_reachable(pool: &PgPool) -> bool {
    use sqlx::Row;
    let probe = async {
        sqlx::raw_sql("SELECT 1")
            .fetch_one(pool)
            .await?
            .try_get::<i32, _>(0)
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(2), probe).await,
        Ok(Ok(1))
    )
}

/// Waits, with backoff, until PostgreSQL answers again or `max_wait` has passed; says
/// whether it answered.
pub async fn wait_until_reachable(pool: &PgPool, max_wait: Duration) -> bool {
    use backon::Retryable;
    let probe = || async {
        if is_reachable(pool).await {
            Ok(())
        } else {
            Err(())
        }
    };
    let probing = probe.retry(
        backon::ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(200))
            .with_max_delay(Duration::from_secs(5))
            .with_total_delay(Some(max_wait))
            .without_max_times(),
    );
    // The backoff counts only its delays, not the probes (up to 2 s each): the timeout
    // makes `max_wait` a bound (`config::chunk_worst_case` counts on it).
    matches!(tokio::time::timeout(max_wait, probing).await, Ok(Ok(())))
}

/// Runs `op` until it succeeds, fails while PostgreSQL answers, or PostgreSQL has been
/// unreachable for `max_wait` in all. A failure during a database outage (a restart, a
/// failover) is tried again once the database answers, instead of handing the message
/// back to the broker: a redelivery would count against the queue's delivery limit.
/// Each wait is counted in `metrics`.
pub async fn through_outage<T, E, F, Fut>(
    pool: &PgPool,
    max_wait: Duration,
    what: &str,
    metrics: &crate::telemetry::Metrics,
    mut op: F,
) -> Result<T, E>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
    E: std::fmt::Display,
{
    let deadline = tokio::time::Instant::now() + max_wait;
    loop {
        let err = match op().await {
            Ok(v) => return Ok(v),
            Err(e) => e,
        };
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        if left.is_zero() || is_reachable(pool).await {
            return Err(err);
        }
        crate::telemetry::Event::DbOutageWait {
            what,
            error: &err,
            wait_secs: left.as_secs(),
        }
        .emit(metrics);
        if !wait_until_reachable(pool, left).await {
            return Err(err);
        }
        tracing::info!("PostgreSQL answers again: {what} goes on");
    }
}
