//! Logging and metrics. What happens is emitted as an [`Event`] (its log line and its
//! metric, defined once, in [`events`]) into a [`Metrics`] registry carried by the
//! components that emit as a [`Telemetry`] handle: the process-wide one
//! ([`Telemetry::global`]) in the binary, a fresh one ([`Telemetry::fresh`]) in a test
//! that asserts exact values. Each metric is defined once, as a row of the table in
//! `registry.rs` the registry is built from; the state gauges are set when `/metrics`
//! is scraped ([`Metrics::refresh_state`], in `gauges.rs`). Labels are of low
//! cardinality only (entity, outcome, status: never a sync or record id), each a
//! [`labels::Label`] whose values are all pre-created at zero.

pub mod events;
mod gauges;
pub mod labels;
mod registry;
#[cfg(test)]
mod tests;

pub use events::{Event, Requeue};
pub use registry::Metrics;

use prometheus::IntGauge;
use std::sync::{Arc, LazyLock};
use tracing_subscriber::EnvFilter;

/// How log lines are written (`LOG_FORMAT`): text for people, JSON lines for machines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// Installs the tracing subscriber: `RUST_LOG` filters (else `default_filter`), `LOG_FORMAT`
/// picks JSON lines for machines or text for people. Safe to call more than once.
pub fn init_logging(format: LogFormat, default_filter: &str) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

/// The registry a component emits into: cheap to clone, shared by everything that
/// counts in it. [`Default`] is the process-wide registry, the one the binary serves.
#[derive(Clone)]
pub struct Telemetry(Arc<Metrics>);

/// The process-wide registry.
static GLOBAL: LazyLock<Telemetry> = LazyLock::new(|| Telemetry::new(Metrics::new()));

impl Telemetry {
    /// The process-wide registry, the one the binary serves on `/metrics`.
    pub fn global() -> Telemetry {
        GLOBAL.clone()
    }

    /// A handle on `metrics`.
    pub fn new(metrics: Metrics) -> Telemetry {
        Telemetry(Arc::new(metrics))
    }

    /// A handle on a new registry of its own (a test that asserts exact values).
    pub fn fresh() -> Telemetry {
        Telemetry::new(Metrics::new())
    }

    /// Emits `event` into this registry.
    pub fn emit(&self, event: Event<'_>) {
        event.emit(&self.0);
    }

    /// Counts a chunk in flight until the guard is dropped (`etl_chunks_in_flight`).
    pub fn chunk_in_flight(&self) -> InFlight {
        self.0.chunks_in_flight.inc();
        InFlight(self.0.chunks_in_flight.clone())
    }

    /// True when both handles count in the same registry.
    pub fn same(&self, other: &Telemetry) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Default for Telemetry {
    fn default() -> Self {
        Telemetry::global()
    }
}

impl std::ops::Deref for Telemetry {
    type Target = Metrics;
    fn deref(&self) -> &Metrics {
        &self.0
    }
}

impl std::fmt::Debug for Telemetry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let which = if self.same(&GLOBAL) { "global" } else { "own" };
        f.debug_tuple("Telemetry").field(&which).finish()
    }
}

/// A chunk counted in `etl_chunks_in_flight` while this lives.
#[must_use = "the chunk is counted in flight only while the guard lives"]
pub struct InFlight(IntGauge);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.dec();
    }
}

impl std::fmt::Debug for InFlight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InFlight").finish_non_exhaustive()
    }
}

#[cfg(test)]
mod handle_tests {
    use super::*;

    #[test]
    fn registries_are_independent_and_the_global_one_is_shared() {
        let (a, b) = (Telemetry::fresh(), Telemetry::fresh());
        a.emit(Event::ChunkPanicked);
        assert_eq!((a.chunk_panics.get(), b.chunk_panics.get()), (1, 0));
        assert!(!a.same(&b));
        assert!(Telemetry::global().same(&Telemetry::default()));
        assert_eq!(
            format!("{:?}", Telemetry::global()),
            "Telemetry(\"global\")"
        );
        assert_eq!(format!("{a:?}"), "Telemetry(\"own\")");
    }

    #[test]
    fn a_chunk_is_in_flight_while_its_guard_lives() {
        let t = Telemetry::fresh();
        let first = t.chunk_in_flight();
        let second = t.chunk_in_flight();
        assert_eq!(t.chunks_in_flight.get(), 2);
        drop(first);
        assert_eq!(t.chunks_in_flight.get(), 1);
        drop(second);
        assert_eq!(t.chunks_in_flight.get(), 0);
    }
}
