//! The application layer: what the commands, the demo and the tests run. A file a
//! concern; each command's outcome is a report type that renders itself as text and
//! JSON and knows its exit code, so the command line only parses, calls, and prints.
//!
//! * [`services`]: "run a planner", "run a worker": connect, reconnect with backoff,
//!   the metrics/health server, shutdown signals.
//! * [`sync`]: "run a sync in this process" (`sync`, `resume --in-process`,
//!   `errors retry --in-process`, the demo, the tests), returning a [`SyncReport`].
//! * [`wait`]: "wait for a request's sync to finish" (`trigger --wait`, the demo).
//! * [`dryrun`]: "what would this sync send" (`sync --dry-run`, `trigger --dry-run`),
//!   computed here in one read-only transaction; nothing published, sent or written.
//! * [`report`]: [`Report`] (text, JSON, exit code: what every command prints),
//!   [`SyncReport`] and [`RequestReport`], the exit codes of outcomes, and the per-entity
//!   progress table ([`report::progress_table`]) every report of a sync prints.
//! * [`trigger`]: a planning request built from `trigger`'s flags, checked as a planner
//!   checks one ([`crate::domain::PlanRequest::validate`]), and published.
//! * [`status`]: [`status::StatusReport`], the recent syncs with the deleted records and
//!   pending requests beside them, or one sync's per-entity progress.
//! * [`errors`]: error rows listed ([`errors::ErrorsReport`]), resolved, and retried in
//!   a new sync, published or worked here ([`errors::RetryReport`]).
//! * [`watermarks`]: the watermarks shown ([`watermarks::WatermarkReport`]) and one moved
//!   by hand ([`watermarks::WatermarkSetReport`]).
//! * [`abandon`]: a sync ended by hand ([`abandon::AbandonReport`]).
//! * [`resume`]: a stalled sync's chunks published again ([`resume::ResumeReport`]).
//! * [`deletes`]: the records sweeps found deleted ([`deletes::DeletesReport`]).
//!
//! Abandoning a sync and moving a watermark hold the planning lock
//! ([`crate::ledger::lifecycle::with_planning_lock`]) as a planner does, so neither
//! races a sync being planned.
//!
//! It uses the domain modules (planner, worker, queue, ledger, ...) and is used by the
//! command line and the demo; it uses neither.

pub mod abandon;
pub mod deletes;
pub mod dryrun;
pub mod error;
pub mod errors;
pub mod report;
pub mod resume;
pub mod services;
pub mod status;
pub mod sync;
pub mod trigger;
pub mod wait;
pub mod watermarks;

pub use error::AppError;
pub use report::{
    EXIT_BUSY, EXIT_FAILED, EXIT_PARTIAL, EXIT_TIMEOUT, Report, RequestReport, SyncReport,
    summarize,
};
pub use services::{
    run_planner, run_planner_process, run_planner_with, run_worker, run_worker_process,
    run_worker_with,
};
pub use sync::{InProcess, Started, Work, sync_in_process};
pub use wait::wait_for_request;

use crate::config::Settings;
use crate::queue::amqp::{Broker, BrokerHealth, BrokerOptions};
use crate::sink::AnalyticsClient;
use crate::worker::WorkerContext;
use secrecy::ExposeSecret;
use tokio_util::sync::CancellationToken;

/// Connects to the broker of `settings`.
pub async fn connect_broker(settings: &Settings) -> Result<Broker, crate::queue::QueueError> {
    connect_broker_with(
        settings,
        BrokerHealth::with_telemetry(settings.telemetry.clone()),
    )
    .await
}

/// Connects to the broker of `settings`, reporting the connection's state to `health`.
pub async fn connect_broker_with(
    settings: &Settings,
    health: BrokerHealth,
) -> Result<Broker, crate::queue::QueueError> {
    Broker::connect_with(
        settings.amqp_url.expose_secret(),
        &settings.queue_prefix,
        // The broker's own limit sits above loansync's, so that loansync settles a
        // chunk that keeps failing (and says why) before the broker drops it.
        crate::queue::amqp::broker_delivery_limit(settings.delivery_limit),
        settings.amqp_ca_pem.as_deref(),
        BrokerOptions {
            confirm_timeout: settings.publish_confirm_timeout,
            health,
        },
    )
    .await
}

/// Builds a worker's context from the settings.
pub fn worker_context(settings: &Settings, pool: sqlx::PgPool) -> Result<WorkerContext, AppError> {
    let api = settings.api()?;
    let gate = crate::sink::gate::Gate::new(
        crate::sink::gate::GateSettings {
            mode: settings.concurrency.mode,
            // Adaptive: from 1, as Vector's controller, up by the API's answers.
            initial: match settings.concurrency.mode {
                crate::sink::gate::ConcurrencyMode::Fixed => {
                    usize::from(settings.worker_concurrency)
                }
                crate::sink::gate::ConcurrencyMode::Adaptive => 1,
            },
            max: usize::from(settings.concurrency.max),
            max_pause: api.retry.max_interval,
            burst_pause: api.retry.initial,
            fleet_cap: settings.concurrency.fleet_cap,
        },
        settings.telemetry.clone(),
    );
    Ok(WorkerContext {
        pool,
        client: AnalyticsClient::new(api)?
            .with_telemetry(settings.telemetry.clone())
            .with_gate(std::sync::Arc::new(gate)),
        delivery_limit: settings.delivery_limit,
        renew_at: std::sync::atomic::AtomicU32::new(settings.delivery_limit),
        db_outage_wait: settings.db_outage_wait,
        telemetry: settings.telemetry.clone(),
        upsert: crate::ledger::settle::FingerprintUpsert::adaptive(),
    })
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
    tracing::info!("shutdown requested");
}

/// A token cancelled on SIGTERM or Ctrl-C.
pub fn on_shutdown_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        shutdown_signal().await;
        t.cancel();
    });
    token
}
