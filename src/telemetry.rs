//! Logging and metrics. One process-wide [`Metrics`] registry, labels of low
//! cardinality only (entity, outcome, status: never a sync or record id).

use crate::config::LogFormat;
use prometheus::{
    Counter, Encoder, Gauge, GaugeVec, HistogramOpts, HistogramVec, IntCounter, IntCounterVec,
    IntGauge, Opts, Registry, TextEncoder,
};
use std::sync::LazyLock;
use tracing_subscriber::EnvFilter;

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
    /// Panics caught while processing a chunk (the chunk was failed, the process lives).
    pub chunk_panics: IntCounter,
    /// Seconds since each entity's watermark (refreshed at every scrape).
    pub watermark_age: GaugeVec,
    /// Running syncs whose chunks have not moved for `ETL_STALE_SYNC_SECS`.
    pub stalled_syncs: IntGauge,
    /// Resident memory of this process, from /proc.
    pub resident_memory: Gauge,
    /// CPU time of this process, from /proc.
    pub cpu_seconds: Counter,
}

impl Metrics {
    fn new() -> Metrics {
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
        let resident_memory = Gauge::new(
            "process_resident_memory_bytes",
            "Resident memory size in bytes.",
        )
        .expect("valid metric");
        let cpu_seconds = Counter::new(
            "process_cpu_seconds_total",
            "Total user and system CPU time spent in seconds.",
        )
        .expect("valid metric");
        for m in [
            Box::new(watermark_age.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(stalled_syncs.clone()),
            Box::new(resident_memory.clone()),
            Box::new(cpu_seconds.clone()),
        ] {
            registry.register(m).expect("unique metric");
        }
        // Every label combination that can occur starts at zero, so dashboards and alerts
        // see a series before its first event.
        for e in crate::domain::EntityKind::ALL {
            let e = e.as_str();
            for o in ["success", "failed"] {
                records.with_label_values(&[e, o]);
            }
            for o in [
                "settled",
                "duplicate",
                "aborted",
                "requeued",
                "republished",
                "dead_letter",
            ] {
                chunks.with_label_values(&[e, o]);
            }
            records_planned.with_label_values(&[e]);
            transform_warnings.with_label_values(&[e]);
            chunk_seconds.with_label_values(&[e]);
        }
        for endpoint in ["/etl/customers", "/etl/officers", "/etl/sync"] {
            for class in ["2xx", "4xx", "5xx", "network"] {
                http_responses.with_label_values(&[endpoint, class]);
            }
            http_seconds.with_label_values(&[endpoint]);
        }
        for r in ["status_429", "status_5xx", "status_408", "network"] {
            http_retries.with_label_values(&[r]);
        }
        for t in ["full", "incremental"] {
            sync_seconds.with_label_values(&[t]);
            for st in ["completed", "partial_success", "failed"] {
                syncs.with_label_values(&[t, st]);
            }
        }
        for r in ["busy", "duplicate", "invalid"] {
            plans_skipped.with_label_values(&[r]);
        }
        Metrics {
            registry,
            watermark_age,
            stalled_syncs,
            resident_memory,
            cpu_seconds,
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
            chunk_panics,
        }
    }

    /// Refreshes what is read rather than counted: process memory and CPU from /proc.
    pub fn refresh_process(&self) {
        if let Ok(status) = std::fs::read_to_string("/proc/self/status")
            && let Some(kb) = status
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        {
            self.resident_memory.set(kb * 1024.0);
        }
        if let Ok(stat) = std::fs::read_to_string("/proc/self/stat") {
            // Fields after the command name (which may hold spaces) start at its ')'.
            let fields: Vec<&str> = stat
                .rsplit_once(')')
                .map(|(_, rest)| rest.split_whitespace().collect())
                .unwrap_or_default();
            // utime and stime are fields 14 and 15 of the line, in clock ticks (100 Hz).
            if let (Some(u), Some(s)) = (fields.get(11), fields.get(12))
                && let (Ok(u), Ok(s)) = (u.parse::<f64>(), s.parse::<f64>())
            {
                let total = (u + s) / 100.0;
                let delta = total - self.cpu_seconds.get();
                if delta > 0.0 {
                    self.cpu_seconds.inc_by(delta);
                }
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

/// The process-wide metrics.
pub static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);
