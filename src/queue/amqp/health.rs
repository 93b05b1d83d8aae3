//! What `/readyz` and the metrics know of a process's broker connection.

use super::topology::queue_depth_on;
use crate::telemetry::{Event, Telemetry};
use lapin::Connection;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// What `/readyz` knows of a process's broker connection, kept across reconnections:
/// connected or not, and blocked or not (RabbitMQ sends `connection.blocked` while a
/// memory or disk alarm holds publishers); and the current connection, for the
/// dead-letter depth the metrics read.
#[derive(Clone, Debug, Default)]
pub struct BrokerHealth(Arc<HealthInner>);

#[derive(Debug, Default)]
struct HealthInner {
    connected: AtomicBool,
    blocked: AtomicBool,
    /// The current connection and its dead-letter queue, for the depth gauge read at
    /// scrape time (replaced on every reconnection).
    current: std::sync::Mutex<Option<(Arc<Connection>, String)>>,
    /// Where blocked notices, timeouts and argument mismatches are counted (the
    /// process-wide registry by default).
    telemetry: Telemetry,
}

impl BrokerHealth {
    /// A health that counts in `telemetry` instead of the process-wide registry.
    pub fn with_telemetry(telemetry: Telemetry) -> BrokerHealth {
        BrokerHealth(Arc::new(HealthInner {
            telemetry,
            ..HealthInner::default()
        }))
    }

    /// The registry this connection counts in.
    pub fn telemetry(&self) -> &Telemetry {
        &self.0.telemetry
    }

    pub fn set_connected(&self, up: bool) {
        self.0.connected.store(up, Ordering::SeqCst);
        if !up {
            // A new connection starts unblocked.
            self.set_blocked(false, "");
        }
    }

    /// Records a `connection.blocked` (with the broker's reason) or `connection.unblocked`.
    pub fn set_blocked(&self, blocked: bool, reason: &str) {
        let was = self.0.blocked.swap(blocked, Ordering::SeqCst);
        if blocked && !was {
            self.0.telemetry.emit(Event::BrokerBlocked { reason });
        } else if !blocked && was {
            self.0.telemetry.emit(Event::BrokerUnblocked);
        }
    }

    /// Messages waiting in the dead-letter queue of the current connection; `None`
    /// without a connection or when the broker does not answer.
    pub async fn dead_letter_depth(&self) -> Option<u32> {
        let (conn, queue) = self.0.current.lock().ok()?.clone()?;
        queue_depth_on(&conn, &queue).await.ok()
    }

    pub(super) fn set_current(&self, conn: &Arc<Connection>, dead: &str) {
        if let Ok(mut c) = self.0.current.lock() {
            *c = Some((conn.clone(), dead.to_string()));
        }
    }

    /// Applies a connection event of lapin.
    pub fn on_event(&self, event: &lapin::Event) {
        match event {
            lapin::Event::ConnectionBlocked(reason) => self.set_blocked(true, reason),
            lapin::Event::ConnectionUnblocked => self.set_blocked(false, ""),
            _ => {}
        }
    }

    pub fn is_connected(&self) -> bool {
        self.0.connected.load(Ordering::SeqCst)
    }

    pub fn is_blocked(&self) -> bool {
        self.0.blocked.load(Ordering::SeqCst)
    }

    /// Connected and not blocked.
    pub fn is_ready(&self) -> bool {
        self.is_connected() && !self.is_blocked()
    }

    /// `connected`, `blocked` or `disconnected`, for `/readyz`.
    pub fn describe(&self) -> &'static str {
        match (self.is_connected(), self.is_blocked()) {
            (false, _) => "disconnected",
            (true, true) => "blocked",
            (true, false) => "connected",
        }
    }
}
