//! Logging and metrics. What happens is emitted as an [`Event`] (its log line and its
//! metric, defined once, in [`events`]) into a [`Metrics`] registry carried by the
//! components that emit as a [`Telemetry`] handle: the process-wide one
//! ([`Telemetry::global`]) in the binary, a fresh one ([`Telemetry::fresh`]) in a test
//! that asserts exact values. Labels are of low cardinality only (entity, outcome,
//! status: never a sync or record id), each an enum of [`labels`] whose values are all
//! pre-created at zero.

pub mod events;
pub mod labels;

pub use events::{Event, Requeue};

use crate::domain::{EntityKind, SyncType};
use crate::ledger::FinalStatus;
use labels::{ChunkOutcome, HttpClass, RecordOutcome, RetryReason, SkipReason};
use prometheus::{
    Encoder, GaugeVec, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};
use sqlx::PgPool;
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

/// Every metric loansync exports.
pub struct Metrics {
    pub registry: Registry,
    /// Records settled, by entity and outcome (`success`, `failed`).
    pub records: IntCounterVec,
    /// Records planned, by entity.
    pub records_planned: IntCounterVec,
    /// Chunks handled by workers, by entity and outcome (`settled`, `duplicate`,
    /// `aborted`, `requeued`, `republished` (put back while PostgreSQL was unreachable,
    /// not counted by the broker), `dead_letter`).
    pub chunks: IntCounterVec,
    /// Time from receiving a chunk to its commit, by entity.
    pub chunk_seconds: HistogramVec,
    /// Answers of the analytics API, by endpoint and status class (`2xx`, `4xx`, `5xx`,
    /// `network` for no answer).
    pub http_responses: IntCounterVec,
    /// Request durations, by endpoint.
    pub http_seconds: HistogramVec,
    /// Retries, by reason (`status_429`, `status_5xx`, `status_408`, `network`).
    pub http_retries: IntCounterVec,
    /// Durations of finished syncs, by type.
    pub sync_seconds: HistogramVec,
    /// Finished syncs, by type and final status.
    pub syncs: IntCounterVec,
    /// Planning messages that planned nothing, by reason (`busy`, `duplicate`, `invalid`).
    pub plans_skipped: IntCounterVec,
    /// Transform warnings (NaN or infinite numbers sent as null), by entity.
    pub transform_warnings: IntCounterVec,
    /// Chunks being worked on right now.
    pub chunks_in_flight: IntGauge,
    /// Times a chunk or planning message was held while PostgreSQL did not answer.
    pub db_outage_waits: IntCounter,
    /// `connection.blocked` notices received from RabbitMQ (memory or disk alarm).
    pub broker_blocked_total: IntCounter,
    /// Broker connections of this process blocked right now.
    pub broker_blocked: IntGauge,
    /// Publishes, confirms or acks that got no answer within the confirm timeout.
    pub broker_timeouts: IntCounter,
    /// Arguments of each queue whose value on the broker differs from what this process
    /// declares (the queue is used as the broker has it), as of the last declaration.
    pub queue_arguments_mismatch: IntGaugeVec,
    /// Panics caught while processing a chunk (the chunk was failed, the process lives).
    pub chunk_panics: IntCounter,
    /// Seconds since each entity's watermark (refreshed at every scrape).
    pub watermark_age: GaugeVec,
    /// Running syncs whose chunks have not moved for `ETL_STALE_SYNC_SECS`.
    pub stalled_syncs: IntGauge,
    /// State read from the ETL tables at scrape time (see [`Metrics::refresh_state`]):
    /// the last finished sync of each type, one-hot by status.
    pub last_sync_status: IntGaugeVec,
    /// When the last finished sync of each type ended (0: none yet).
    pub last_sync_completed: GaugeVec,
    /// When the last sync of each type that delivered and moved the watermarks
    /// (`completed` or `partial_success`) ended (0: none yet).
    pub last_successful_sync: GaugeVec,
    /// Records of the last finished sync of each type, by outcome.
    pub last_sync_records: IntGaugeVec,
    /// Planning requests waiting for the running sync to end, by type.
    pub pending_requests: IntGaugeVec,
    /// Messages waiting in the dead-letter queue `<prefix>.dead`.
    pub dead_letters: IntGauge,
    /// Delivered records that sweeps found deleted from the source (or no longer
    /// selected), by entity: `loansync_deleted`, read at scrape time. Not sent: the
    /// analytics API has no delete.
    pub deleted_records: IntGaugeVec,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    /// A new registry with every metric, every label combination at zero. The binary
    /// uses one per process ([`Telemetry::global`]); a test makes its own.
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric");
            c
        };
        let records = counter(
            "etl_records_total",
            "Records settled, by entity and outcome.",
            &["entity", "outcome"],
        );
        let records_planned = counter(
            "etl_records_planned_total",
            "Records planned, by entity.",
            &["entity"],
        );
        let chunks = counter(
            "etl_chunks_total",
            "Chunk jobs handled, by entity and outcome.",
            &["entity", "outcome"],
        );
        let http_responses = counter(
            "etl_http_responses_total",
            "Answers of the analytics API, by endpoint and status class.",
            &["endpoint", "status_class"],
        );
        let http_retries = counter(
            "etl_http_retries_total",
            "Requests to the analytics API that were retried, by reason.",
            &["reason"],
        );
        let syncs = counter(
            "etl_syncs_total",
            "Syncs finished, by type and final status.",
            &["sync_type", "status"],
        );
        let plans_skipped = counter(
            "etl_plans_skipped_total",
            "Planning messages that planned nothing, by reason.",
            &["reason"],
        );
        let transform_warnings = counter(
            "etl_transform_warnings_total",
            "Values that could not be represented (NaN, infinity) and were sent as null.",
            &["entity"],
        );
        let chunk_seconds = HistogramVec::new(
            HistogramOpts::new(
                "etl_chunk_duration_seconds",
                "Time to process one chunk, from delivery to commit.",
            )
            .buckets(vec![
                0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 120.0,
            ]),
            &["entity"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(chunk_seconds.clone()))
            .expect("unique metric");
        let histogram = |name: &str, help: &str, label: &str, buckets: Vec<f64>| {
            let h = HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), &[label])
                .expect("valid metric");
            registry
                .register(Box::new(h.clone()))
                .expect("unique metric");
            h
        };
        let http_seconds = histogram(
            "etl_http_request_duration_seconds",
            "Duration of one request to the analytics API.",
            "endpoint",
            vec![
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
            ],
        );
        let sync_seconds = histogram(
            "etl_sync_duration_seconds",
            "Duration of finished syncs, from planning to the last chunk.",
            "sync_type",
            vec![
                1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0, 21600.0,
            ],
        );
        let chunks_in_flight =
            IntGauge::new("etl_chunks_in_flight", "Chunks being processed now.").expect("valid");
        registry
            .register(Box::new(chunks_in_flight.clone()))
            .expect("unique metric");
        let db_outage_waits = IntCounter::new(
            "etl_db_outage_waits_total",
            "Times a chunk or planning message was held while PostgreSQL did not answer.",
        )
        .expect("valid metric");
        registry
            .register(Box::new(db_outage_waits.clone()))
            .expect("unique metric");
        let int_counter = |name: &str, help: &str| {
            let c = IntCounter::new(name, help).expect("valid metric");
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric");
            c
        };
        let broker_blocked_total = int_counter(
            "etl_broker_blocked_total",
            "connection.blocked notices from RabbitMQ (a memory or disk alarm holds publishers).",
        );
        let broker_timeouts = int_counter(
            "etl_broker_timeouts_total",
            "Publishes, confirms or acks with no answer within ETL_PUBLISH_CONFIRM_TIMEOUT_SECS.",
        );
        let chunk_panics = int_counter(
            "etl_chunk_panics_total",
            "Panics caught while processing a chunk; the chunk's records were failed.",
        );
        let broker_blocked = IntGauge::new(
            "etl_broker_blocked",
            "Broker connections of this process that RabbitMQ has blocked now.",
        )
        .expect("valid metric");
        registry
            .register(Box::new(broker_blocked.clone()))
            .expect("unique metric");
        let queue_arguments_mismatch = IntGaugeVec::new(
            Opts::new(
                "etl_queue_arguments_mismatch",
                "Arguments of the queue whose value on RabbitMQ differs from what this process declares (0: all match); the queue is used as the broker has it.",
            ),
            &["queue"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(queue_arguments_mismatch.clone()))
            .expect("unique metric");
        let watermark_age = GaugeVec::new(
            Opts::new(
                "etl_watermark_age_seconds",
                "Seconds since the entity's last-sync watermark.",
            ),
            &["entity"],
        )
        .expect("valid metric");
        let stalled_syncs = IntGauge::new(
            "etl_stalled_syncs",
            "Running syncs with no chunk settled for ETL_STALE_SYNC_SECS.",
        )
        .expect("valid metric");
        let last_sync_status = IntGaugeVec::new(
            Opts::new(
                "etl_last_sync_status",
                "The status of the last finished sync of each type (1 for its status, 0 for the others).",
            ),
            &["sync_type", "status"],
        )
        .expect("valid metric");
        let last_sync_completed = GaugeVec::new(
            Opts::new(
                "etl_last_sync_completed_timestamp_seconds",
                "When the last finished sync of each type ended, in Unix seconds (0: none yet).",
            ),
            &["sync_type"],
        )
        .expect("valid metric");
        let last_successful_sync = GaugeVec::new(
            Opts::new(
                "etl_last_successful_sync_timestamp_seconds",
                "When the last completed or partial_success sync of each type ended, in Unix seconds (0: none yet).",
            ),
            &["sync_type"],
        )
        .expect("valid metric");
        let last_sync_records = IntGaugeVec::new(
            Opts::new(
                "etl_last_sync_records",
                "Records of the last finished sync of each type, by outcome.",
            ),
            &["sync_type", "outcome"],
        )
        .expect("valid metric");
        let pending_requests = IntGaugeVec::new(
            Opts::new(
                "etl_pending_requests",
                "Planning requests kept until the running sync ends, by type.",
            ),
            &["sync_type"],
        )
        .expect("valid metric");
        let dead_letters = IntGauge::new(
            "etl_dead_letter_messages",
            "Messages waiting in the dead-letter queue <prefix>.dead.",
        )
        .expect("valid metric");
        let deleted_records = IntGaugeVec::new(
            Opts::new(
                "etl_deleted_records",
                "Delivered records a sweep found deleted from the source or no longer selected (not sent: the API has no delete), by entity.",
            ),
            &["entity"],
        )
        .expect("valid metric");
        let build_info = IntGaugeVec::new(
            Opts::new(
                "loansync_build_info",
                "The running loansync's version; always 1.",
            ),
            &["version"],
        )
        .expect("valid metric");
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        for m in [
            Box::new(watermark_age.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(stalled_syncs.clone()),
            Box::new(last_sync_status.clone()),
            Box::new(last_sync_completed.clone()),
            Box::new(last_successful_sync.clone()),
            Box::new(last_sync_records.clone()),
            Box::new(pending_requests.clone()),
            Box::new(dead_letters.clone()),
            Box::new(deleted_records.clone()),
            Box::new(build_info),
            // process_resident_memory_bytes, process_cpu_seconds_total, open fds, start time.
            Box::new(prometheus::process_collector::ProcessCollector::for_self()),
        ] {
            registry.register(m).expect("unique metric");
        }
        // Every label combination that can occur starts at zero, so dashboards and alerts
        // see a series before its first event.
        for e in EntityKind::ALL.map(EntityKind::as_str) {
            for o in RecordOutcome::ALL.map(RecordOutcome::as_str) {
                records.with_label_values(&[e, o]);
            }
            for o in ChunkOutcome::ALL.map(ChunkOutcome::as_str) {
                chunks.with_label_values(&[e, o]);
            }
            records_planned.with_label_values(&[e]);
            deleted_records.with_label_values(&[e]);
            transform_warnings.with_label_values(&[e]);
            chunk_seconds.with_label_values(&[e]);
        }
        // A chunk message that names no entity can only be dead-lettered.
        chunks.with_label_values(&[labels::UNKNOWN_ENTITY, ChunkOutcome::DeadLetter.as_str()]);
        for endpoint in labels::endpoints() {
            for class in HttpClass::ALL.map(HttpClass::as_str) {
                http_responses.with_label_values(&[endpoint, class]);
            }
            http_seconds.with_label_values(&[endpoint]);
        }
        for r in RetryReason::ALL.map(RetryReason::as_str) {
            http_retries.with_label_values(&[r]);
        }
        for t in SyncType::ALL.map(SyncType::as_str) {
            sync_seconds.with_label_values(&[t]);
            for st in FinalStatus::ALL.iter().map(|s| s.as_str()) {
                syncs.with_label_values(&[t, st]);
                last_sync_status.with_label_values(&[t, st]);
            }
            last_sync_completed.with_label_values(&[t]);
            last_successful_sync.with_label_values(&[t]);
            for o in RecordOutcome::ALL.map(RecordOutcome::as_str) {
                last_sync_records.with_label_values(&[t, o]);
            }
            pending_requests.with_label_values(&[t]);
        }
        for r in SkipReason::ALL.map(SkipReason::as_str) {
            plans_skipped.with_label_values(&[r]);
        }
        Metrics {
            registry,
            watermark_age,
            stalled_syncs,
            last_sync_status,
            last_sync_completed,
            last_successful_sync,
            last_sync_records,
            pending_requests,
            dead_letters,
            deleted_records,
            records,
            records_planned,
            chunks,
            chunk_seconds,
            http_responses,
            http_seconds,
            http_retries,
            sync_seconds,
            syncs,
            plans_skipped,
            transform_warnings,
            chunks_in_flight,
            db_outage_waits,
            broker_blocked_total,
            broker_blocked,
            broker_timeouts,
            queue_arguments_mismatch,
            chunk_panics,
        }
    }

    /// Refreshes the gauges that are state in PostgreSQL, read at scrape time so that
    /// every process shows the same and a new pod shows it at once: watermark ages,
    /// stalled syncs, the last sync of each type, pending planning requests. A query
    /// that fails leaves its gauges as they were (and `/readyz` says why).
    pub async fn refresh_state(&self, pool: &PgPool, stale_after_secs: f64) {
        if let Ok(ages) = crate::ledger::watermark_ages(pool).await {
            for w in ages {
                if w.entity.parse::<crate::domain::EntityKind>().is_ok() {
                    self.watermark_age
                        .with_label_values(&[&w.entity])
                        .set(w.age_seconds);
                }
            }
        }
        if let Ok(stalled) = crate::ledger::stalled_count(pool, stale_after_secs).await {
            self.stalled_syncs.set(stalled);
        }
        if let Ok(rows) = crate::ledger::last_syncs(pool).await {
            // A type with no finished sync yet shows zeros.
            for t in SyncType::ALL.map(SyncType::as_str) {
                let (status, at, ok, failed) = rows
                    .iter()
                    .find(|r| r.sync_type == t)
                    .map_or(("", None, 0, 0), |r| {
                        (r.status.as_str(), r.completed_at, r.succeeded, r.failed)
                    });
                for st in FinalStatus::ALL.iter().map(|s| s.as_str()) {
                    self.last_sync_status
                        .with_label_values(&[t, st])
                        .set(i64::from(st == status));
                }
                self.last_sync_completed
                    .with_label_values(&[t])
                    .set(at.unwrap_or(0.0));
                self.last_sync_records
                    .with_label_values(&[t, RecordOutcome::Success.as_str()])
                    .set(ok);
                self.last_sync_records
                    .with_label_values(&[t, RecordOutcome::Failed.as_str()])
                    .set(failed);
            }
        }
        if let Ok(rows) = crate::ledger::last_successes(pool).await {
            for t in SyncType::ALL.map(SyncType::as_str) {
                let at = rows
                    .iter()
                    .find(|r| r.sync_type == t)
                    .and_then(|r| r.completed_at);
                self.last_successful_sync
                    .with_label_values(&[t])
                    .set(at.unwrap_or(0.0));
            }
        }
        // The table comes with the pending-request migration; before it, nothing waits.
        let pending = crate::ledger::pending_counts(pool).await;
        let pending = match pending {
            Ok(rows) => Some(rows),
            Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("42P01") => {
                Some(Vec::new())
            }
            Err(_) => None,
        };
        if let Some(rows) = pending {
            for t in SyncType::ALL.map(SyncType::as_str) {
                let n = rows
                    .iter()
                    .find(|r| r.sync_type == t)
                    .map_or(0, |r| r.count);
                self.pending_requests.with_label_values(&[t]).set(n);
            }
        }
        // The table comes with the sweep migration; before it, nothing was found deleted.
        let deleted = match crate::ledger::deleted_counts(pool).await {
            Ok(rows) => Some(rows),
            Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("42P01") => {
                Some(Vec::new())
            }
            Err(_) => None,
        };
        if let Some(rows) = deleted {
            for e in crate::domain::EntityKind::ALL {
                let n = rows
                    .iter()
                    .find(|r| r.entity == e.as_str())
                    .map_or(0, |r| r.count);
                self.deleted_records.with_label_values(&[e.as_str()]).set(n);
            }
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
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

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl std::fmt::Debug for InFlight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InFlight").finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::time::Duration;

    /// Every sample of the exposition but the process collector's and the histogram
    /// buckets: `name{labels}` → value.
    fn samples(m: &Metrics) -> BTreeMap<String, f64> {
        m.render()
            .lines()
            .filter(|l| !l.starts_with('#') && !l.starts_with("process_"))
            .filter(|l| !l.contains("_bucket{"))
            .filter_map(|l| {
                let (key, value) = l.rsplit_once(' ')?;
                Some((key.to_string(), value.parse().ok()?))
            })
            .collect()
    }

    /// The samples `events`, emitted in order into a fresh registry, changed.
    fn changes(events: Vec<Event<'_>>) -> BTreeMap<String, f64> {
        let m = Metrics::new();
        let before = samples(&m);
        for e in events {
            e.emit(&m);
        }
        let after = samples(&m);
        assert_eq!(
            before.keys().collect::<Vec<_>>(),
            after.keys().collect::<Vec<_>>(),
            "an event created a series that was not there from the start"
        );
        after
            .into_iter()
            .filter(|(k, v)| before.get(k) != Some(v))
            .collect()
    }

    fn expect(pairs: &[(&str, f64)]) -> BTreeMap<String, f64> {
        pairs.iter().map(|(k, v)| ((*k).to_string(), *v)).collect()
    }

    #[test]
    fn each_event_updates_exactly_its_metric() {
        let e = EntityKind::Loan;
        let error = anyhow::anyhow!("connection refused");
        let chunk = |outcome: &str| {
            expect(&[
                (
                    &format!("etl_chunks_total{{entity=\"loan\",outcome=\"{outcome}\"}}"),
                    1.0,
                ),
                ("etl_chunk_duration_seconds_count{entity=\"loan\"}", 1.0),
                ("etl_chunk_duration_seconds_sum{entity=\"loan\"}", 0.25),
            ])
        };
        let cases: Vec<(Vec<Event<'_>>, BTreeMap<String, f64>)> = vec![
            (
                vec![Event::RecordsSettled {
                    entity: e,
                    succeeded: 3,
                    failed: 1,
                }],
                expect(&[
                    (
                        "etl_records_total{entity=\"loan\",outcome=\"success\"}",
                        3.0,
                    ),
                    ("etl_records_total{entity=\"loan\",outcome=\"failed\"}", 1.0),
                ]),
            ),
            (
                vec![Event::SyncFinished {
                    sync_type: SyncType::Full,
                    status: FinalStatus::PartialSuccess,
                    seconds: Some(12.0),
                }],
                expect(&[
                    (
                        "etl_syncs_total{status=\"partial_success\",sync_type=\"full\"}",
                        1.0,
                    ),
                    ("etl_sync_duration_seconds_count{sync_type=\"full\"}", 1.0),
                    ("etl_sync_duration_seconds_sum{sync_type=\"full\"}", 12.0),
                ]),
            ),
            (
                vec![Event::SyncFinished {
                    sync_type: SyncType::Incremental,
                    status: FinalStatus::Failed,
                    seconds: None,
                }],
                expect(&[(
                    "etl_syncs_total{status=\"failed\",sync_type=\"incremental\"}",
                    1.0,
                )]),
            ),
            (
                vec![Event::SyncFinishedAtPlanning {
                    sync_type: SyncType::Incremental,
                    status: FinalStatus::Completed,
                }],
                expect(&[(
                    "etl_syncs_total{status=\"completed\",sync_type=\"incremental\"}",
                    1.0,
                )]),
            ),
            (
                vec![Event::ChunkSettled {
                    entity: e,
                    succeeded: 10,
                    failed: 2,
                    seconds: 0.25,
                }],
                chunk("settled"),
            ),
            (
                vec![Event::ChunkDuplicate {
                    entity: e,
                    seconds: 0.25,
                }],
                chunk("duplicate"),
            ),
            (
                vec![Event::ChunkAborted {
                    entity: e,
                    seconds: 0.25,
                }],
                chunk("aborted"),
            ),
            (
                vec![Event::ChunkDeadLettered {
                    entity: e,
                    code: Some("RECORD_UNREADABLE"),
                    reason: "bad row",
                    settled: true,
                    seconds: 0.25,
                }],
                chunk("dead_letter"),
            ),
            (
                vec![Event::ChunkDeadLettered {
                    entity: e,
                    code: None,
                    reason: "no such chunk",
                    settled: false,
                    seconds: 0.25,
                }],
                chunk("dead_letter"),
            ),
            (
                vec![Event::ChunkRequeued {
                    entity: e,
                    cause: Requeue::Transient { error: &error },
                    seconds: 0.25,
                }],
                chunk("requeued"),
            ),
            (
                vec![Event::ChunkRequeued {
                    entity: e,
                    cause: Requeue::NotSettled {
                        code: "WORKER_PANIC",
                        reason: "boom",
                        error: &error,
                    },
                    seconds: 0.25,
                }],
                chunk("requeued"),
            ),
            (
                vec![Event::ChunkRepublished {
                    entity: e,
                    error: &error,
                    wait_secs: 30,
                    seconds: 0.25,
                }],
                chunk("republished"),
            ),
            (
                vec![Event::ChunkUnparsable { reason: "not json" }],
                expect(&[(
                    "etl_chunks_total{entity=\"unknown\",outcome=\"dead_letter\"}",
                    1.0,
                )]),
            ),
            (
                vec![Event::ChunkPanicked],
                expect(&[("etl_chunk_panics_total", 1.0)]),
            ),
            (
                vec![Event::TransformWarnings {
                    entity: EntityKind::Repayment,
                    warnings: 4,
                }],
                expect(&[("etl_transform_warnings_total{entity=\"repayment\"}", 4.0)]),
            ),
            (
                vec![Event::HttpResponse {
                    endpoint: "/etl/customers",
                    class: HttpClass::ServerError,
                    seconds: 0.5,
                }],
                expect(&[
                    (
                        "etl_http_responses_total{endpoint=\"/etl/customers\",status_class=\"5xx\"}",
                        1.0,
                    ),
                    (
                        "etl_http_request_duration_seconds_count{endpoint=\"/etl/customers\"}",
                        1.0,
                    ),
                    (
                        "etl_http_request_duration_seconds_sum{endpoint=\"/etl/customers\"}",
                        0.5,
                    ),
                ]),
            ),
            (
                vec![
                    Event::HttpRetry {
                        status: Some(429),
                        code: "HTTP_429",
                        delay: Duration::from_millis(100),
                    },
                    Event::HttpRetry {
                        status: None,
                        code: "NETWORK_ERROR",
                        delay: Duration::from_millis(100),
                    },
                ],
                expect(&[
                    ("etl_http_retries_total{reason=\"status_429\"}", 1.0),
                    ("etl_http_retries_total{reason=\"network\"}", 1.0),
                ]),
            ),
            (
                vec![Event::RecordsPlanned {
                    entity: EntityKind::Officer,
                    records: 7,
                }],
                expect(&[("etl_records_planned_total{entity=\"officer\"}", 7.0)]),
            ),
            (
                vec![Event::PlanDuplicate {
                    request_id: "r1",
                    sync_id: Some("s1"),
                }],
                expect(&[("etl_plans_skipped_total{reason=\"duplicate\"}", 1.0)]),
            ),
            (
                vec![Event::PlanBusy {
                    active_sync_id: "s1",
                }],
                expect(&[("etl_plans_skipped_total{reason=\"busy\"}", 1.0)]),
            ),
            (
                // Recorded, then planned from the pending requests.
                vec![Event::RequestRecorded { request_id: "r1" }],
                expect(&[("etl_plans_skipped_total{reason=\"queued\"}", 1.0)]),
            ),
            (
                vec![Event::PlanInvalid { reason: "not json" }],
                expect(&[("etl_plans_skipped_total{reason=\"invalid\"}", 1.0)]),
            ),
            (
                vec![Event::DbOutageWait {
                    what: "the chunk",
                    error: &error,
                    wait_secs: 60,
                }],
                expect(&[("etl_db_outage_waits_total", 1.0)]),
            ),
            (
                vec![Event::BrokerBlocked { reason: "memory" }],
                expect(&[
                    ("etl_broker_blocked_total", 1.0),
                    ("etl_broker_blocked", 1.0),
                ]),
            ),
            (
                // Blocked then unblocked: one episode counted, nothing blocked now.
                vec![
                    Event::BrokerBlocked { reason: "memory" },
                    Event::BrokerUnblocked,
                ],
                expect(&[("etl_broker_blocked_total", 1.0)]),
            ),
            (
                vec![Event::BrokerTimeout],
                expect(&[("etl_broker_timeouts_total", 1.0)]),
            ),
        ];
        for (events, expected) in cases {
            assert_eq!(changes(events), expected);
        }
    }

    #[test]
    fn every_series_exists_at_zero_from_the_start() {
        let m = Metrics::new();
        let s = samples(&m);
        let zero = |key: String| assert_eq!(s.get(&key), Some(&0.0), "{key}");
        for e in EntityKind::ALL.map(EntityKind::as_str) {
            for o in RecordOutcome::ALL.map(RecordOutcome::as_str) {
                zero(format!(
                    "etl_records_total{{entity=\"{e}\",outcome=\"{o}\"}}"
                ));
            }
            for o in ChunkOutcome::ALL.map(ChunkOutcome::as_str) {
                zero(format!(
                    "etl_chunks_total{{entity=\"{e}\",outcome=\"{o}\"}}"
                ));
            }
            zero(format!("etl_records_planned_total{{entity=\"{e}\"}}"));
            zero(format!("etl_transform_warnings_total{{entity=\"{e}\"}}"));
            zero(format!("etl_deleted_records{{entity=\"{e}\"}}"));
            zero(format!(
                "etl_chunk_duration_seconds_count{{entity=\"{e}\"}}"
            ));
        }
        zero("etl_chunks_total{entity=\"unknown\",outcome=\"dead_letter\"}".into());
        for endpoint in labels::endpoints() {
            for c in HttpClass::ALL.map(HttpClass::as_str) {
                zero(format!(
                    "etl_http_responses_total{{endpoint=\"{endpoint}\",status_class=\"{c}\"}}"
                ));
            }
            zero(format!(
                "etl_http_request_duration_seconds_count{{endpoint=\"{endpoint}\"}}"
            ));
        }
        for r in RetryReason::ALL.map(RetryReason::as_str) {
            zero(format!("etl_http_retries_total{{reason=\"{r}\"}}"));
        }
        for r in SkipReason::ALL.map(SkipReason::as_str) {
            zero(format!("etl_plans_skipped_total{{reason=\"{r}\"}}"));
        }
        for t in SyncType::ALL.map(SyncType::as_str) {
            for st in FinalStatus::ALL.iter().map(|s| s.as_str()) {
                zero(format!(
                    "etl_syncs_total{{status=\"{st}\",sync_type=\"{t}\"}}"
                ));
                zero(format!(
                    "etl_last_sync_status{{status=\"{st}\",sync_type=\"{t}\"}}"
                ));
            }
            for o in RecordOutcome::ALL.map(RecordOutcome::as_str) {
                zero(format!(
                    "etl_last_sync_records{{outcome=\"{o}\",sync_type=\"{t}\"}}"
                ));
            }
            zero(format!(
                "etl_sync_duration_seconds_count{{sync_type=\"{t}\"}}"
            ));
            zero(format!("etl_pending_requests{{sync_type=\"{t}\"}}"));
            zero(format!(
                "etl_last_sync_completed_timestamp_seconds{{sync_type=\"{t}\"}}"
            ));
            zero(format!(
                "etl_last_successful_sync_timestamp_seconds{{sync_type=\"{t}\"}}"
            ));
        }
        for name in [
            "etl_chunks_in_flight",
            "etl_chunk_panics_total",
            "etl_db_outage_waits_total",
            "etl_broker_blocked_total",
            "etl_broker_blocked",
            "etl_broker_timeouts_total",
            "etl_stalled_syncs",
            "etl_dead_letter_messages",
        ] {
            zero(name.into());
        }
    }

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
