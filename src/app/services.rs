//! The long-running processes: a planner and a worker, each consuming its queue over a
//! connection that is re-made with backoff when lost, with the metrics/health server.

use super::error::AppError;
use super::{connect_broker_with, on_shutdown_signal, worker_context};
use crate::config::Settings;
use crate::ledger::clock::WindowCap;
use crate::queue::amqp::{self, BrokerHealth};
use crate::{db, http, ledger, planner, worker};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use tokio_util::sync::CancellationToken;

/// `loansync planner`: connects to PostgreSQL, serves `/metrics` and the health checks,
/// and plans until SIGTERM or Ctrl-C.
pub async fn run_planner_process(settings: Arc<Settings>) -> Result<(), AppError> {
    run_process(settings, run_planner_with).await
}

/// `loansync worker`: connects to PostgreSQL, serves `/metrics` and the health checks,
/// and delivers chunks until SIGTERM or Ctrl-C.
pub async fn run_worker_process(settings: Arc<Settings>) -> Result<(), AppError> {
    run_process(settings, run_worker_with).await
}

/// A long-running process: the pool, the HTTP server, then `run` until a signal.
async fn run_process<F, Fut>(settings: Arc<Settings>, run: F) -> Result<(), AppError>
where
    F: FnOnce(sqlx::PgPool, Arc<Settings>, Arc<AtomicBool>, BrokerHealth, CancellationToken) -> Fut,
    Fut: std::future::Future<Output = Result<(), AppError>>,
{
    let pool = db::connect(&settings).await?;
    let consuming = Arc::new(AtomicBool::new(false));
    let health = BrokerHealth::with_telemetry(settings.telemetry.clone());
    start_http(&settings, &pool, &consuming, &health).await?;
    run(pool, settings, consuming, health, on_shutdown_signal()).await
}

/// The planner: consumes planning messages until `shutdown`, reconnecting.
pub async fn run_planner(
    pool: sqlx::PgPool,
    settings: Arc<Settings>,
    consuming: Arc<AtomicBool>,
    shutdown: CancellationToken,
) -> Result<(), AppError> {
    let health = BrokerHealth::with_telemetry(settings.telemetry.clone());
    run_planner_with(pool, settings, consuming, health, shutdown).await
}

/// [`run_planner`], reporting the broker connection's state to `health` (`/readyz`).
pub async fn run_planner_with(
    pool: sqlx::PgPool,
    settings: Arc<Settings>,
    consuming: Arc<AtomicBool>,
    health: BrokerHealth,
    shutdown: CancellationToken,
) -> Result<(), AppError> {
    // Behind a transaction pooler the planning lock would not be this session's: refuse
    // before taking any message (taking the lock verifies it again, every time).
    match crate::db::pooling::detect(&pool).await {
        Err(e @ crate::db::pooling::SessionLockError::Pooling(_)) => {
            tracing::error!(error = %e, "the planner refuses to start");
            return Err(AppError::Lock(e));
        }
        Err(e) => {
            tracing::warn!(error = %format!("{e:#}"), "could not tell whether a transaction pooler is in the way; the planning lock checks each time it is taken")
        }
        Ok(_) => {}
    }
    log_window_cap(&pool).await;
    amqp::with_reconnect(
        "planner",
        &consuming,
        &health,
        shutdown,
        || connect_broker_with(&settings, health.clone()),
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
    .map_err(AppError::from)
}

/// Says once, at the planner's start, how the sync window's end is capped for its role
/// (SPEC.md section 2): a warning, with the grant, when open transactions of other roles
/// cap it at their first write rather than their start.
async fn log_window_cap(pool: &sqlx::PgPool) {
    match ledger::clock::window_cap(pool).await {
        Ok(cap @ WindowCap::TransactionStart) => {
            tracing::info!(window_cap = "transaction_start", "{cap}")
        }
        Ok(cap @ WindowCap::FirstWrite { .. }) => {
            tracing::warn!(window_cap = "first_write", "{cap}")
        }
        Err(e) => tracing::warn!(
            error = %e,
            "could not tell how the sync window's end is capped (see `loansync check`)"
        ),
    }
}

/// The worker: consumes chunk jobs until `shutdown`, reconnecting.
pub async fn run_worker(
    pool: sqlx::PgPool,
    settings: Arc<Settings>,
    consuming: Arc<AtomicBool>,
    shutdown: CancellationToken,
) -> Result<(), AppError> {
    let health = BrokerHealth::with_telemetry(settings.telemetry.clone());
    run_worker_with(pool, settings, consuming, health, shutdown).await
}

/// [`run_worker`], reporting the broker connection's state to `health` (`/readyz`).
pub async fn run_worker_with(
    pool: sqlx::PgPool,
    settings: Arc<Settings>,
    consuming: Arc<AtomicBool>,
    health: BrokerHealth,
    shutdown: CancellationToken,
) -> Result<(), AppError> {
    let ctx = Arc::new(worker_context(&settings, pool.clone())?);
    // The heartbeat (the share of the fleet-wide cap, `loansync status`) and the API's
    // pause shared with the other workers.
    let fleet_stop = CancellationToken::new();
    let heartbeat = ctx.client.gate().map(|gate| {
        let fleet = worker::fleet::Fleet::new(pool, gate.clone(), settings.concurrency.clone());
        gate.set_board(fleet.clone());
        tracing::info!(
            worker_id = %fleet.worker_id,
            mode = settings.concurrency.mode.as_str(),
            fleet_cap = settings.concurrency.fleet_cap,
            "worker in the fleet"
        );
        tokio::spawn(fleet.run(fleet_stop.clone()))
    });
    let ended = amqp::with_reconnect(
        "worker",
        &consuming,
        &health,
        shutdown,
        || connect_broker_with(&settings, health.clone()),
        |broker, stop| {
            worker::run_amqp(
                ctx.clone(),
                broker,
                settings.worker_prefetch(),
                settings.shutdown_grace,
                consuming.clone(),
                stop.cancelled_owned(),
            )
        },
    )
    .await
    .map_err(AppError::from);
    fleet_stop.cancel();
    if let Some(heartbeat) = heartbeat {
        let _ = heartbeat.await;
    }
    ended
}

/// Serves `/metrics`, `/healthz` and `/readyz` on `METRICS_ADDR`, when set.
async fn start_http(
    settings: &Settings,
    pool: &sqlx::PgPool,
    consuming: &Arc<AtomicBool>,
    health: &BrokerHealth,
) -> Result<(), AppError> {
    if let Some(addr) = settings.metrics_addr {
        http::serve(
            addr,
            http::Readiness {
                pool: pool.clone(),
                broker: Some(health.clone()),
                consuming: consuming.clone(),
                stale_after_secs: settings.stale_sync_after.as_secs_f64(),
                telemetry: settings.telemetry.clone(),
            },
        )
        .await?;
    }
    Ok(())
}
