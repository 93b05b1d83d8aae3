//! `/metrics`, `/healthz` and `/readyz` of every long-running process.

use crate::queue::amqp::BrokerHealth;
use crate::telemetry::Telemetry;
use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use sqlx::PgPool;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// What `/readyz` checks.
#[derive(Clone)]
pub struct Readiness {
    pub pool: PgPool,
    /// The process's broker connection (across reconnections); `None` in a process
    /// without a broker.
    pub broker: Option<BrokerHealth>,
    /// Set by the consuming loop while its consumer is running.
    pub consuming: Arc<AtomicBool>,
    /// `ETL_STALE_SYNC_SECS`, for the stalled-syncs gauge.
    pub stale_after_secs: f64,
    /// The registry `/metrics` serves (the process's, [`Telemetry::global`], in the
    /// binary).
    pub telemetry: Telemetry,
}

async fn metrics(
    State(r): State<Readiness>,
) -> (StatusCode, [(&'static str, &'static str); 1], String) {
    // The state gauges are read from the database (and the dead-letter depth from the
    // broker) at scrape time; what does not answer within two seconds keeps its last
    // value (a database that does not answer shows on /readyz).
    let read = r
        .telemetry
        .refresh_state(&r.pool, r.stale_after_secs, r.broker.as_ref());
    let _ = tokio::time::timeout(Duration::from_secs(2), read).await;
    (
        StatusCode::OK,
        [("content-type", "text/plain; version=0.0.4")],
        r.telemetry.render(),
    )
}

async fn readyz(State(r): State<Readiness>) -> (StatusCode, String) {
    let db = crate::db::is_reachable(&r.pool).await;
    let consuming = r.consuming.load(Ordering::SeqCst);
    readiness_report(db, r.broker.as_ref(), consuming)
}

/// The answer of `/readyz`: 200 only when the database answers, the broker connection
/// is up and not blocked (a blocked connection cannot publish, ack or dead-letter), and
/// the consumer runs.
pub fn readiness_report(
    db: bool,
    broker: Option<&BrokerHealth>,
    consuming: bool,
) -> (StatusCode, String) {
    let broker_ok = broker.is_none_or(|b| b.is_ready());
    let broker_state = broker.map_or("none", |b| b.describe());
    let body =
        format!("database: {db}\nbroker: {broker_ok} ({broker_state})\nconsumer: {consuming}\n");
    if db && broker_ok && consuming {
        (StatusCode::OK, body)
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, body)
    }
}

/// The router, for tests and for [`serve`].
pub fn router(readiness: Readiness) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(readiness)
}

/// `METRICS_ADDR` cannot be served (taken, not this host's).
#[derive(Debug, thiserror::Error)]
#[error("cannot serve metrics on {addr}: {source}")]
pub struct ServeError {
    pub addr: SocketAddr,
    #[source]
    pub source: std::io::Error,
}

/// Binds `addr` and serves in a background task; returns the bound address.
pub async fn serve(addr: SocketAddr, readiness: Readiness) -> Result<SocketAddr, ServeError> {
    let failed = |source| ServeError { addr, source };
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(failed)?;
    let bound = listener.local_addr().map_err(failed)?;
    let app = router(readiness);
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "metrics server stopped");
        }
    });
    tracing::info!(%bound, "serving /metrics, /healthz, /readyz");
    Ok(bound)
}

impl std::fmt::Debug for Readiness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Readiness").finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_blocked_or_lost_broker_makes_readyz_fail_and_is_counted() {
        let telemetry = Telemetry::fresh();
        let health = BrokerHealth::with_telemetry(telemetry.clone());
        let (code, body) = readiness_report(true, Some(&health), true);
        assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        assert!(body.contains("broker: false (disconnected)"), "{body}");

        health.set_connected(true);
        let (code, body) = readiness_report(true, Some(&health), true);
        assert_eq!(code, StatusCode::OK, "{body}");

        health.on_event(&lapin::Event::ConnectionBlocked("low on memory".into()));
        let (code, body) = readiness_report(true, Some(&health), true);
        assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        assert!(body.contains("broker: false (blocked)"), "{body}");
        assert_eq!(telemetry.value("etl_broker_blocked_total", &[]), Some(1.0));
        assert_eq!(telemetry.value("etl_broker_blocked", &[]), Some(1.0));
        assert!(telemetry.render().contains("etl_broker_blocked_total 1"));

        // A repeated notice is the same episode.
        health.on_event(&lapin::Event::ConnectionBlocked("low on memory".into()));
        assert_eq!(telemetry.value("etl_broker_blocked_total", &[]), Some(1.0));
        assert_eq!(telemetry.value("etl_broker_blocked", &[]), Some(1.0));

        health.on_event(&lapin::Event::ConnectionUnblocked);
        assert_eq!(telemetry.value("etl_broker_blocked", &[]), Some(0.0));
        let (code, body) = readiness_report(true, Some(&health), true);
        assert_eq!(code, StatusCode::OK, "{body}");

        // Losing the connection while blocked: not ready, and the gauge goes back.
        health.on_event(&lapin::Event::ConnectionBlocked("disk".into()));
        health.set_connected(false);
        assert!(!health.is_blocked());
        assert_eq!(telemetry.value("etl_broker_blocked", &[]), Some(0.0));
        assert_eq!(telemetry.value("etl_broker_blocked_total", &[]), Some(2.0));
        let (code, _) = readiness_report(true, Some(&health), true);
        assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
    }

    #[test]
    fn a_process_without_broker_needs_database_and_consumer() {
        assert_eq!(readiness_report(true, None, true).0, StatusCode::OK);
        assert_eq!(
            readiness_report(false, None, true).0,
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(
            readiness_report(true, None, false).0,
            StatusCode::SERVICE_UNAVAILABLE
        );
    }
}
