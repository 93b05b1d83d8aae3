//! The registry, built from one table: each row of `metrics! { … }` below is one
//! metric, and the only place it is defined: the [`Metrics`] field events update, its
//! kind (the field's type), its name, help, labels, buckets and series as exported.

use super::labels::{self, ChunkOutcomeLabel, Label};
use prometheus::core::Collector;
use prometheus::proto::MetricType;
use prometheus::{
    Encoder, Gauge, GaugeVec, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// One row of the table: a metric as exported (its kind is its field's type).
#[derive(Debug, Clone, Copy)]
pub(super) struct Def {
    pub(super) name: &'static str,
    pub(super) help: &'static str,
    pub(super) labels: &'static [Label],
    /// A histogram's bucket bounds (none for the other kinds).
    pub(super) buckets: &'static [f64],
    pub(super) series: Series,
}

/// When a metric's series come to be.
#[derive(Debug, Clone, Copy)]
pub(super) enum Series {
    /// At start, at zero: every combination of its labels' values, and the `also`
    /// combinations, so dashboards and alerts see a series before its first event.
    AtZero {
        also: &'static [&'static [&'static str]],
    },
    /// When first set: the values are known only then (queue names), or a zero would
    /// say something false (a watermark zero seconds old).
    WhenSet,
}

/// Defines [`Metrics`] (a field per row) and [`TABLE`] (the rows, in the same order)
/// from the rows given; `series` is [`Series::AtZero`] with no `also` unless a row says.
macro_rules! metrics {
    ($(
        $(#[doc = $doc:literal])*
        $field:ident: $ty:ident {
            name: $name:literal,
            help: $help:literal,
            labels: [$($label:ident),*],
            $(buckets: [$($bucket:literal),*],)?
            $(series: $series:expr,)?
        }
    )*) => {
        /// Every metric loansync exports. Events update them ([`super::Event`]); the
        /// state gauges are set at scrape time ([`Metrics::refresh_state`]); nothing
        /// else does.
        pub struct Metrics {
            registry: Registry,
            $($(#[doc = $doc])* pub(super) $field: $ty,)*
        }

        /// Every metric loansync exports, a row each, in the order of [`Metrics`]'s fields.
        pub(super) const TABLE: &[Def] = &[$(
            Def {
                name: $name,
                help: $help,
                labels: &[$(labels::$label),*],
                buckets: &[$($($bucket),*)?],
                series: metrics!(@series $($series)?),
            },
        )*];

        impl Metrics {
            /// A registry with the metric of each row of [`TABLE`] and its series.
            fn from_table() -> Metrics {
                let registry = Registry::new();
                let mut rows = TABLE.iter();
                $(let $field = register::<$ty>(rows.next().expect("a row per field"), &registry);)*
                Metrics { registry, $($field,)* }
            }
        }
    };
    (@series) => { Series::AtZero { also: &[] } };
    (@series $series:expr) => { $series };
}

metrics! {
    /// Records settled, by entity and outcome (`success`, `failed`).
    records: IntCounterVec {
        name: "etl_records_total",
        help: "Records settled, by entity and outcome.",
        labels: [ENTITY, RECORD_OUTCOME],
    }
    /// Records planned, by entity.
    records_planned: IntCounterVec {
        name: "etl_records_planned_total",
        help: "Records planned, by entity.",
        labels: [ENTITY],
    }
    /// Chunks handled by workers, by entity and outcome (`settled`, `duplicate`,
    /// `aborted`, `requeued`, `republished` (put back while PostgreSQL was unreachable,
    /// not counted by the broker), `dead_letter`). A chunk message that names no entity
    /// can only be dead-lettered.
    chunks: IntCounterVec {
        name: "etl_chunks_total",
        help: "Chunk jobs handled, by entity and outcome.",
        labels: [ENTITY, CHUNK_OUTCOME],
        series: Series::AtZero {
            also: &[&[labels::UNKNOWN_ENTITY, ChunkOutcomeLabel::DeadLetter.as_str()]],
        },
    }
    /// Time from receiving a chunk to its commit, by entity.
    chunk_seconds: HistogramVec {
        name: "etl_chunk_duration_seconds",
        help: "Time to process one chunk, from delivery to commit.",
        labels: [ENTITY],
        buckets: [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 120.0],
    }
    /// Chunks being worked on right now.
    chunks_in_flight: IntGauge {
        name: "etl_chunks_in_flight",
        help: "Chunks being processed now.",
        labels: [],
    }
    /// Panics caught while processing a chunk (the chunk was failed, the process lives).
    chunk_panics: IntCounter {
        name: "etl_chunk_panics_total",
        help: "Panics caught while processing a chunk; the chunk's records were failed.",
        labels: [],
    }
    /// Transform warnings (NaN or infinite numbers sent as null), by entity.
    transform_warnings: IntCounterVec {
        name: "etl_transform_warnings_total",
        help: "Values that could not be represented (NaN, infinity) and were sent as null.",
        labels: [ENTITY],
    }
    /// Per accepted record, seconds from the source change that selected it (its
    /// `date_modified`, a loan's schedule row or repayment too) to the API's
    /// acknowledgement, by entity (officers have no change time).
    record_lag: HistogramVec {
        name: "etl_record_lag_seconds",
        help: "Seconds from a record's source change to the analytics API's acknowledgement, by entity.",
        labels: [ENTITY],
        buckets: [1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0, 21600.0, 86400.0, 604800.0],
    }
    /// Answers of the analytics API, by endpoint and status class (`2xx`, `4xx`, `5xx`,
    /// `network` for no answer).
    http_responses: IntCounterVec {
        name: "etl_http_responses_total",
        help: "Answers of the analytics API, by endpoint and status class.",
        labels: [ENDPOINT, STATUS_CLASS],
    }
    /// Request durations, by endpoint.
    http_seconds: HistogramVec {
        name: "etl_http_request_duration_seconds",
        help: "Duration of one request to the analytics API.",
        labels: [ENDPOINT],
        buckets: [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0],
    }
    /// Retries, by reason (`status_429`, `status_5xx`, `status_408`, `network`).
    http_retries: IntCounterVec {
        name: "etl_http_retries_total",
        help: "Requests to the analytics API that were retried, by reason.",
        labels: [RETRY_REASON],
    }
    /// Finished syncs, by type and final status.
    syncs: IntCounterVec {
        name: "etl_syncs_total",
        help: "Syncs finished, by type and final status.",
        labels: [SYNC_TYPE, STATUS],
    }
    /// Durations of finished syncs, by type.
    sync_seconds: HistogramVec {
        name: "etl_sync_duration_seconds",
        help: "Duration of finished syncs, from planning to the last chunk.",
        labels: [SYNC_TYPE],
        buckets: [1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0, 21600.0],
    }
    /// Id buckets a sweep went through, by entity and outcome (`unchanged`: skipped by
    /// its digest; `clean` / `changed`: compared record by record).
    sweep_buckets: IntCounterVec {
        name: "etl_sweep_buckets_total",
        help: "Id buckets a sweep went through, by entity and outcome (unchanged: skipped by its digest).",
        labels: [ENTITY, BUCKET_OUTCOME],
    }
    /// Planning messages that planned nothing, by reason (`queued`, `busy`,
    /// `duplicate`, `invalid`).
    plans_skipped: IntCounterVec {
        name: "etl_plans_skipped_total",
        help: "Planning messages that planned nothing, by reason.",
        labels: [SKIP_REASON],
    }
    /// Times a chunk or planning message was held while PostgreSQL did not answer.
    db_outage_waits: IntCounter {
        name: "etl_db_outage_waits_total",
        help: "Times a chunk or planning message was held while PostgreSQL did not answer.",
        labels: [],
    }
    /// `connection.blocked` notices received from RabbitMQ (memory or disk alarm).
    broker_blocked_total: IntCounter {
        name: "etl_broker_blocked_total",
        help: "connection.blocked notices from RabbitMQ (a memory or disk alarm holds publishers).",
        labels: [],
    }
    /// Broker connections of this process blocked right now.
    broker_blocked: IntGauge {
        name: "etl_broker_blocked",
        help: "Broker connections of this process that RabbitMQ has blocked now.",
        labels: [],
    }
    /// Publishes, confirms or acks that got no answer within the confirm timeout.
    broker_timeouts: IntCounter {
        name: "etl_broker_timeouts_total",
        help: "Publishes, confirms or acks with no answer within ETL_PUBLISH_CONFIRM_TIMEOUT_SECS.",
        labels: [],
    }
    /// Arguments of each queue whose value on the broker differs from what this process
    /// declares (the queue is used as the broker has it), as of the last declaration.
    queue_arguments_mismatch: IntGaugeVec {
        name: "etl_queue_arguments_mismatch",
        help: "Arguments of the queue whose value on RabbitMQ differs from what this process declares (0: all match); the queue is used as the broker has it.",
        labels: [QUEUE],
        series: Series::WhenSet,
    }
    /// Per entity, seconds since the oldest source change after its watermark (the
    /// change waiting longest to be sent; 0 when none waits), read at scrape time from the
    /// time indexes. Officers have no modification time: no series.
    oldest_unsent_change: GaugeVec {
        name: "etl_oldest_unsent_change_seconds",
        help: "Seconds since the oldest source change after the entity's watermark (0: none waits); read at scrape time.",
        labels: [ENTITY],
        series: Series::WhenSet,
    }
    /// Differences between the source schema and the columns loansync reads, found by
    /// this process's last check before planning (0: none; a sync is refused otherwise).
    source_schema_drift: IntGauge {
        name: "etl_source_schema_drift",
        help: "Differences between the source schema and the columns loansync reads, found by the last check before planning (0: none; syncs are refused otherwise).",
        labels: [],
    }
    /// The running loansync's version: always 1.
    build_info: IntGaugeVec {
        name: "loansync_build_info",
        help: "The running loansync's version; always 1.",
        labels: [VERSION],
    }
    /// The worker's limit on its requests in flight to the analytics API: the fixed
    /// concurrency or the adaptive controller's, within its share of the fleet-wide cap.
    api_limit: IntGauge {
        name: "etl_api_concurrency_limit",
        help: "Requests to the analytics API this worker allows in flight now (fixed, or the adaptive controller's, within its share of ANALYTICS_MAX_IN_FLIGHT).",
        labels: [],
    }
    /// The fleet's adapted limit as this worker knows it (adaptive mode; 0: none).
    api_fleet_limit: IntGauge {
        name: "etl_api_fleet_limit",
        help: "The fleet's adapted limit on requests to the analytics API in flight, as this worker last read it (adaptive mode; 0: no limit, each worker's controller alone).",
        labels: [],
    }
    /// The worker's requests to the analytics API in flight now.
    api_in_flight: IntGauge {
        name: "etl_api_in_flight",
        help: "Requests to the analytics API in flight now.",
        labels: [],
    }
    /// The API's round-trip time as the worker's controller averages it (EWMA).
    api_rtt: Gauge {
        name: "etl_api_rtt_seconds",
        help: "The analytics API's round-trip time, averaged (EWMA, alpha 0.4) by the adaptive controller, else the last observed.",
        labels: [],
    }
    /// Answers that asked to slow down, by reason (`status_429`, `status_5xx` for 503,
    /// `network` for a timeout).
    api_backpressure: IntCounterVec {
        name: "etl_api_backpressure_total",
        help: "Answers of the analytics API that asked to slow down (429, 503, timeouts), by reason.",
        labels: [RETRY_REASON],
    }
    // The state gauges, set at scrape time from PostgreSQL and the broker
    // (`Metrics::refresh_state`).
    /// Seconds since each entity's watermark.
    watermark_age: GaugeVec {
        name: "etl_watermark_age_seconds",
        help: "Seconds since the entity's last-sync watermark.",
        labels: [ENTITY],
        series: Series::WhenSet,
    }
    /// Running syncs whose chunks have not moved for `ETL_STALE_SYNC_SECS`.
    stalled_syncs: IntGauge {
        name: "etl_stalled_syncs",
        help: "Running syncs with no chunk settled for ETL_STALE_SYNC_SECS.",
        labels: [],
    }
    /// The last finished sync of each type, one-hot by status.
    last_sync_status: IntGaugeVec {
        name: "etl_last_sync_status",
        help: "The status of the last finished sync of each type (1 for its status, 0 for the others).",
        labels: [SYNC_TYPE, STATUS],
    }
    /// When the last finished sync of each type ended (0: none yet).
    last_sync_completed: GaugeVec {
        name: "etl_last_sync_completed_timestamp_seconds",
        help: "When the last finished sync of each type ended, in Unix seconds (0: none yet).",
        labels: [SYNC_TYPE],
    }
    /// When the last sync of each type that delivered and moved the watermarks
    /// (`completed` or `partial_success`) ended (0: none yet).
    last_successful_sync: GaugeVec {
        name: "etl_last_successful_sync_timestamp_seconds",
        help: "When the last completed or partial_success sync of each type ended, in Unix seconds (0: none yet).",
        labels: [SYNC_TYPE],
    }
    /// Records of the last finished sync of each type, by outcome.
    last_sync_records: IntGaugeVec {
        name: "etl_last_sync_records",
        help: "Records of the last finished sync of each type, by outcome.",
        labels: [SYNC_TYPE, RECORD_OUTCOME],
    }
    /// Planning requests waiting for the running sync to end, by type.
    pending_requests: IntGaugeVec {
        name: "etl_pending_requests",
        help: "Planning requests kept until the running sync ends, by type.",
        labels: [SYNC_TYPE],
    }
    /// Messages waiting in the dead-letter queue `<prefix>.dead`.
    dead_letters: IntGauge {
        name: "etl_dead_letter_messages",
        help: "Messages waiting in the dead-letter queue <prefix>.dead.",
        labels: [],
    }
    /// Finished syncs whose books did not balance at finalize (success + failed !=
    /// total, or error rows that do not match the failed records), by entity: read from
    /// `loansync_sync.books_unbalanced` at scrape time, so every pod counts the same.
    /// No series until the first read, so a pod that cannot read it yet shows no drop.
    books_unbalanced: IntCounterVec {
        name: "etl_books_unbalanced_total",
        help: "Finished syncs whose books did not balance at finalize (success + failed != total, or error rows not matching the failed records), by entity; read from PostgreSQL.",
        labels: [ENTITY],
        series: Series::WhenSet,
    }
    /// Delivered records that sweeps found deleted from the source (or no longer
    /// selected), by entity: `loansync_deleted`. Not sent: the analytics API has no
    /// delete.
    deleted_records: IntGaugeVec {
        name: "etl_deleted_records",
        help: "Delivered records a sweep found deleted from the source or no longer selected (not sent: the API has no delete), by entity.",
        labels: [ENTITY],
    }
}

impl Metrics {
    /// A new registry with every metric of [`TABLE`], every label combination at zero,
    /// and the process's own (`process_*`). The binary uses one per process
    /// ([`super::Telemetry::global`]); a test makes its own.
    pub fn new() -> Metrics {
        let m = Metrics::from_table();
        m.build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        // process_resident_memory_bytes, process_cpu_seconds_total, open fds, start time.
        m.registry
            .register(Box::new(
                prometheus::process_collector::ProcessCollector::for_self(),
            ))
            .expect("unique metric");
        m
    }

    /// A worker's gate to the analytics API: its limit, requests in flight and the RTT
    /// (`None`: none observed yet).
    pub fn api_gate(
        &self,
        limit: usize,
        in_flight: usize,
        rtt: Option<f64>,
        fleet_limit: Option<u32>,
    ) {
        self.api_limit.set(i64::try_from(limit).unwrap_or(i64::MAX));
        self.api_fleet_limit.set(fleet_limit.map_or(0, i64::from));
        self.api_in_flight
            .set(i64::try_from(in_flight).unwrap_or(i64::MAX));
        if let Some(rtt) = rtt {
            self.api_rtt.set(rtt);
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }

    /// The value of one series as `/metrics` exports it: the metric's `name` and every
    /// label of the series (in any order). `None` when there is no such series, or it
    /// is a histogram's.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let family = self
            .registry
            .gather()
            .into_iter()
            .find(|f| f.name() == name)?;
        let series = family.get_metric().iter().find(|m| {
            let pairs = m.get_label();
            pairs.len() == labels.len()
                && labels
                    .iter()
                    .all(|(k, v)| pairs.iter().any(|p| p.name() == *k && p.value() == *v))
        })?;
        match family.get_field_type() {
            MetricType::COUNTER => Some(series.get_counter().get_value()),
            MetricType::GAUGE => Some(series.get_gauge().get_value()),
            _ => None,
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

/// A type of metric a row can have: how it is built from the row, and how one of its
/// series is created at zero.
pub(super) trait Family: Collector + Clone + 'static {
    fn from_row(row: &Def) -> prometheus::Result<Self>;
    /// Creates the series with these label values, at zero (without labels: there).
    fn create(&self, values: &[&str]);
}

/// The metric of `row`, registered in `registry` with its series. The table is
/// constant: a row that cannot be registered is a bug the tests find.
fn register<F: Family>(row: &Def, registry: &Registry) -> F {
    let family = F::from_row(row).unwrap_or_else(|e| panic!("metric {}: {e}", row.name));
    registry
        .register(Box::new(family.clone()))
        .unwrap_or_else(|e| panic!("metric {}: {e}", row.name));
    if let Series::AtZero { also } = row.series {
        for values in combinations(row.labels) {
            family.create(&values);
        }
        for values in also {
            family.create(values);
        }
    }
    family
}

/// Every combination of the labels' values, in the labels' order (one, empty, for no
/// labels; none when a label's values are not known).
pub(super) fn combinations(labels: &[Label]) -> Vec<Vec<&'static str>> {
    let mut all = vec![Vec::new()];
    for label in labels {
        let values = label.values.map_or_else(Vec::new, |values| values());
        all = all
            .iter()
            .flat_map(|head| {
                values.iter().map(move |v| {
                    let mut c = head.clone();
                    c.push(*v);
                    c
                })
            })
            .collect();
    }
    all
}

fn opts(row: &Def) -> Opts {
    Opts::new(row.name, row.help)
}

fn label_names(row: &Def) -> Vec<&'static str> {
    row.labels.iter().map(|l| l.name).collect()
}

/// A metric without labels: a row that gives it some is refused.
fn unlabelled(row: &Def) -> prometheus::Result<()> {
    if row.labels.is_empty() {
        Ok(())
    } else {
        Err(prometheus::Error::Msg(format!(
            "{} has labels: it needs a vector type",
            row.name
        )))
    }
}

impl Family for IntCounter {
    fn from_row(row: &Def) -> prometheus::Result<Self> {
        unlabelled(row)?;
        IntCounter::with_opts(opts(row))
    }
    fn create(&self, _: &[&str]) {}
}

impl Family for IntGauge {
    fn from_row(row: &Def) -> prometheus::Result<Self> {
        unlabelled(row)?;
        IntGauge::with_opts(opts(row))
    }
    fn create(&self, _: &[&str]) {}
}

impl Family for Gauge {
    fn from_row(row: &Def) -> prometheus::Result<Self> {
        unlabelled(row)?;
        Gauge::with_opts(opts(row))
    }
    fn create(&self, _: &[&str]) {}
}

impl Family for IntCounterVec {
    fn from_row(row: &Def) -> prometheus::Result<Self> {
        IntCounterVec::new(opts(row), &label_names(row))
    }
    fn create(&self, values: &[&str]) {
        self.with_label_values(values);
    }
}

impl Family for IntGaugeVec {
    fn from_row(row: &Def) -> prometheus::Result<Self> {
        IntGaugeVec::new(opts(row), &label_names(row))
    }
    fn create(&self, values: &[&str]) {
        self.with_label_values(values);
    }
}

impl Family for GaugeVec {
    fn from_row(row: &Def) -> prometheus::Result<Self> {
        GaugeVec::new(opts(row), &label_names(row))
    }
    fn create(&self, values: &[&str]) {
        self.with_label_values(values);
    }
}

impl Family for HistogramVec {
    fn from_row(row: &Def) -> prometheus::Result<Self> {
        let opts = HistogramOpts::new(row.name, row.help).buckets(row.buckets.to_vec());
        HistogramVec::new(opts, &label_names(row))
    }
    fn create(&self, values: &[&str]) {
        self.with_label_values(values);
    }
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}
