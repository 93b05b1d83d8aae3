//! The connection pool and the embedded migrations.

use crate::config::Settings;
use secrecy::ExposeSecret;
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use std::str::FromStr;
use std::time::Duration;

/// loansync's migrations, embedded in the binary.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Opens a pool sized for this process. Connections lazily reconnect after an outage.
pub async fn connect(settings: &Settings) -> anyhow::Result<PgPool> {
    connect_url(settings.database_url.expose_secret(), settings.db_pool_size).await
}

pub async fn connect_url(url: &str, size: u32) -> anyhow::Result<PgPool> {
    let opts = PgConnectOptions::from_str(url)
        .map_err(|e| anyhow::anyhow!("DATABASE_URL is not valid: {e}"))?
        .application_name("loansync");
    let pool = PgPoolOptions::new()
        .max_connections(size.max(2))
        .acquire_timeout(Duration::from_secs(10))
        .connect_with(opts)
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "cannot connect to PostgreSQL at {}: {e}",
                crate::config::redact_url(url)
            )
        })?;
    Ok(pool)
}

/// Applies loansync's migrations. Safe to run repeatedly and on a database where
/// Django already created the ETL tables.
pub async fn migrate(pool: &PgPool) -> anyhow::Result<()> {
    MIGRATOR.run(pool).await?;
    Ok(())
}

/// True when PostgreSQL answers `SELECT 1` within two seconds.
pub async fn is_reachable(pool: &PgPool) -> bool {
    matches!(
        tokio::time::timeout(
            Duration::from_secs(2),
            sqlx::query_scalar::<_, i32>("SELECT 1").fetch_one(pool),
        )
        .await,
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
    // makes `max_wait` a bound (config::chunk_worst_case counts on it).
    matches!(tokio::time::timeout(max_wait, probing).await, Ok(Ok(())))
}

/// Runs `op` until it succeeds, fails while PostgreSQL answers, or PostgreSQL has been
/// unreachable for `max_wait` in all. A failure during a database outage (a restart, a
/// failover) is tried again once the database answers, instead of handing the message
/// back to the broker: a redelivery would count against the queue's delivery limit.
pub async fn through_outage<T, E, F, Fut>(
    pool: &PgPool,
    max_wait: Duration,
    what: &str,
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
        crate::telemetry::METRICS.db_outage_waits.inc();
        tracing::warn!(error = %format!("{err:#}"), wait_secs = left.as_secs(), "PostgreSQL does not answer: {what} waits for it");
        if !wait_until_reachable(pool, left).await {
            return Err(err);
        }
        tracing::info!("PostgreSQL answers again: {what} goes on");
    }
}
