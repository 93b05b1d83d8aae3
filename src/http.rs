//! `/metrics`, `/healthz` and `/readyz` of every long-running process.

use crate::queue::amqp::Broker;
use crate::telemetry::METRICS;
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
    pub broker: Option<Broker>,
    /// Set by the consuming loop while its consumer is running.
    pub consuming: Arc<AtomicBool>,
    /// `ETL_STALE_SYNC_SECS`, for the stalled-syncs gauge.
    pub stale_after_secs: f64,
}

async fn metrics(
    State(r): State<Readiness>,
) -> (StatusCode, [(&'static str, &'static str); 1], String) {
    // State gauges are read from the database (and the dead-letter depth from the
    // broker) at scrape time; if they do not answer, the last values stay (and /readyz
    // says why).
    let read = async {
        METRICS.refresh_state(&r.pool, r.stale_after_secs).await;
        if let Some(b) = &r.broker
            && let Ok(n) = b.queue_depth(&b.topology.dead).await
        {
            METRICS.dead_letters.set(i64::from(n));
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(2), read).await;
    (
        StatusCode::OK,
        [("content-type", "text/plain; version=0.0.4")],
        METRICS.render(),
    )
}

async fn readyz(State(r): State<Readiness>) -> (StatusCode, String) {
    let db = tokio::time::timeout(
        Duration::from_secs(2),
        sqlx::query_scalar::<_, i32>("SELECT 1").fetch_one(&r.pool),
    )
    .await
    .map(|x| x.is_ok())
    .unwrap_or(false);
    let broker = r.broker.as_ref().is_none_or(|b| b.is_connected());
    let consuming = r.consuming.load(Ordering::SeqCst);
    let body = format!("database: {db}\nbroker: {broker}\nconsumer: {consuming}\n");
    if db && broker && consuming {
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

/// Binds `addr` and serves in a background task; returns the bound address.
pub async fn serve(addr: SocketAddr, readiness: Readiness) -> anyhow::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot serve metrics on {addr}: {e}"))?;
    let bound = listener.local_addr()?;
    let app = router(readiness);
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "metrics server stopped");
        }
    });
    tracing::info!(%bound, "serving /metrics, /healthz, /readyz");
    Ok(bound)
}
