//! The registry: every metric loansync exports, registered with every label
//! combination at zero.

use super::labels::{self, ChunkOutcome, HttpClass, RecordOutcome, RetryReason, SkipReason};
use crate::domain::{EntityKind, SyncType};
use crate::ledger::FinalStatus;
use prometheus::{
    Encoder, GaugeVec, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

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
}

impl Metrics {
    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}
