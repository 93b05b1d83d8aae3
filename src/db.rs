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
