//! Connecting to RabbitMQ (TLS, the connection's events, the topology, the confirming
//! publish channel), bounding each wait by the confirm timeout, and reconnecting with
//! backoff.

use super::health::BrokerHealth;
use super::topology::{ArgumentMismatch, declare_topology};
use crate::failure::Classify;
use crate::queue::{QueueError, Topology};
use crate::telemetry::Event;
use futures::StreamExt;
use lapin::options::ConfirmSelectOptions;
use lapin::tcp::OwnedTLSConfig;
use lapin::types::{LongString, ShortString};
use lapin::{Channel, Connection, ConnectionProperties};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// How a [`Broker`] behaves beyond its URL.
#[derive(Clone, Debug)]
pub struct BrokerOptions {
    /// Longest wait for the broker to confirm a publish, or to take an ack or a requeue
    /// (`ETL_PUBLISH_CONFIRM_TIMEOUT_SECS`).
    pub confirm_timeout: Duration,
    /// Where this connection reports its state (shared with `/readyz`).
    pub health: BrokerHealth,
}

impl Default for BrokerOptions {
    fn default() -> Self {
        BrokerOptions {
            confirm_timeout: Duration::from_secs(30),
            health: BrokerHealth::default(),
        }
    }
}

/// A connection to RabbitMQ with the topology declared and a confirming publish channel.
#[derive(Clone)]
pub struct Broker {
    pub(super) conn: Arc<Connection>,
    /// Confirm-mode channel used only for publishing.
    pub(super) publish_channel: Channel,
    pub topology: Topology,
    pub(super) confirm_timeout: Duration,
    pub(super) health: BrokerHealth,
    /// Arguments of existing queues that differ from what was declared.
    pub(super) mismatches: Arc<Vec<ArgumentMismatch>>,
}

impl Broker {
    /// Connects, declares the three queues and opens the publish channel.
    pub async fn connect(
        url: &str,
        prefix: &str,
        delivery_limit: u32,
    ) -> Result<Broker, QueueError> {
        Self::connect_with_ca(url, prefix, delivery_limit, None).await
    }

    /// [`Broker::connect`], trusting the CA certificates of `ca_pem` (PEM text, from
    /// `AMQP_CA_FILE`) besides the system roots when `url` is `amqps://`. The broker's
    /// certificate is always checked.
    pub async fn connect_with_ca(
        url: &str,
        prefix: &str,
        delivery_limit: u32,
        ca_pem: Option<&str>,
    ) -> Result<Broker, QueueError> {
        Self::connect_with(
            url,
            prefix,
            delivery_limit,
            ca_pem,
            BrokerOptions::default(),
        )
        .await
    }

    /// [`Broker::connect_with_ca`] with a confirm timeout, reporting its state (blocked,
    /// connected) to `opts.health`.
    pub async fn connect_with(
        url: &str,
        prefix: &str,
        delivery_limit: u32,
        ca_pem: Option<&str>,
        opts: BrokerOptions,
    ) -> Result<Broker, QueueError> {
        let tls = OwnedTLSConfig {
            cert_chain: ca_pem.map(str::to_owned),
            ..OwnedTLSConfig::default()
        };
        let conn = Connection::connect_with_config(
            url,
            ConnectionProperties::default()
                .with_connection_name(LongString::from(format!("loansync-{prefix}"))),
            tls,
            lapin::runtime::default_runtime()?,
        )
        .await
        .map_err(|e| {
            let at = crate::redact::redact_url(url);
            match crate::tls::certificate_refused(&e) {
                // The reason is all the chain below would say (three times over).
                Some(reason) => QueueError::Refused {
                    at,
                    reason: format!(
                        "the broker's TLS certificate was refused ({reason}); if a private CA \
                         signed it, name that CA's PEM file in AMQP_CA_FILE"
                    ),
                },
                None => QueueError::Connect { at, source: e },
            }
        })?;
        let health = opts.health;
        // Blocked / unblocked notices, for /readyz and the metrics. The stream ends with
        // the connection.
        let mut events = conn.events_listener();
        let watcher = health.clone();
        tokio::spawn(async move {
            while let Some(event) = events.next().await {
                watcher.on_event(&event);
            }
        });
        let topology = Topology::new(prefix);
        let mismatches =
            declare_topology(&conn, &topology, delivery_limit, health.telemetry()).await?;
        let publish_channel = conn.create_channel().await?;
        publish_channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        health.set_connected(true);
        let conn = Arc::new(conn);
        health.set_current(&conn, &topology.dead);
        Ok(Broker {
            conn,
            publish_channel,
            topology,
            confirm_timeout: opts.confirm_timeout,
            health,
            mismatches: Arc::new(mismatches),
        })
    }

    /// Arguments of the existing queues that differ from what this connection declared
    /// (empty when all match). The queues are used as the broker has them.
    pub fn argument_mismatches(&self) -> &[ArgumentMismatch] {
        &self.mismatches
    }

    /// The state this connection reports to.
    pub fn health(&self) -> &BrokerHealth {
        &self.health
    }

    /// `op`, failed after the confirm timeout: nothing waits forever on a blocked or
    /// silent broker.
    pub(super) async fn bounded<T>(
        &self,
        what: &str,
        op: impl std::future::Future<Output = Result<T, QueueError>>,
    ) -> Result<T, QueueError> {
        match tokio::time::timeout(self.confirm_timeout, op).await {
            Ok(r) => r,
            Err(_) => {
                self.health.telemetry().emit(Event::BrokerTimeout);
                Err(QueueError::Timeout {
                    what: what.to_string(),
                    secs: self.confirm_timeout.as_secs_f64(),
                    blocked: if self.conn.status().blocked() {
                        "; the broker has blocked this connection (memory or disk alarm)"
                    } else {
                        ""
                    },
                })
            }
        }
    }

    pub async fn close(&self) {
        let _ = self.conn.close(200, ShortString::from("bye")).await;
    }
}

/// The first pause before reconnecting, doubled after each failed attempt up to
/// [`RECONNECT_MAX_DELAY`].
pub const RECONNECT_FIRST_DELAY: Duration = Duration::from_millis(500);
/// The longest pause between two connection attempts.
pub const RECONNECT_MAX_DELAY: Duration = Duration::from_secs(30);

/// Runs `consume` on a connection from `connect`, and again on a new one whenever the
/// connection is lost (broker restart, network), with exponential backoff (backon),
/// until `shutdown` is cancelled or `consume` ends without an error, or with a fatal one
/// (a wrong installation, which reconnecting cannot mend). While disconnected
/// the `consuming` flag is down and `health` says so, so that `/readyz` reports the
/// outage. Messages in flight on a lost connection are redelivered by the broker.
pub async fn with_reconnect<C, CF, F, Fut, E>(
    what: &str,
    consuming: &AtomicBool,
    health: &BrokerHealth,
    shutdown: CancellationToken,
    mut connect: C,
    mut consume: F,
) -> Result<(), E>
where
    C: FnMut() -> CF,
    CF: std::future::Future<Output = Result<Broker, QueueError>>,
    F: FnMut(Broker, CancellationToken) -> Fut,
    Fut: std::future::Future<Output = Result<(), E>>,
    E: From<QueueError> + Classify + std::fmt::Display,
{
    use backon::Retryable;
    loop {
        if shutdown.is_cancelled() {
            return Ok(());
        }
        let backoff = backon::ExponentialBuilder::default()
            .with_min_delay(RECONNECT_FIRST_DELAY)
            .with_max_delay(RECONNECT_MAX_DELAY)
            .with_factor(2.0)
            .without_max_times();
        let connecting = (|| connect()).retry(backoff).notify(|e, delay| {
            consuming.store(false, Ordering::SeqCst);
            tracing::warn!(error = %format!("{e:#}"), retry_in_ms = delay.as_millis() as u64, "{what} cannot reach the broker");
        });
        let broker = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            broker = connecting => broker?,
        };
        let ended = consume(broker, shutdown.clone()).await;
        health.set_connected(false);
        consuming.store(false, Ordering::SeqCst);
        match ended {
            Ok(()) => return Ok(()),
            // A wrong installation: reconnecting cannot help, stop.
            Err(e) if e.failure() == crate::failure::Failure::Fatal => {
                return Err(e);
            }
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "{what} lost its broker connection: reconnecting")
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tokio::time::sleep(RECONNECT_FIRST_DELAY) => {}
        }
    }
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker").finish_non_exhaustive()
    }
}
