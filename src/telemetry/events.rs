//! Everything loansync counts, as events: one definition per event writes its log line
//! (the level, fields and target the emitting module always used) and updates its
//! metric in the registry it is given. A call site says what happened, once:
//!
//! ```ignore
//! Event::ChunkDuplicate { entity, seconds }.emit(&ctx.telemetry);
//! ```

use super::Metrics;
use super::labels::{
    BucketOutcome, ChunkOutcomeLabel, HttpClass, RecordOutcome, RetryReason, SkipReason,
};
use crate::domain::{EntityKind, SyncType};
use crate::ledger::states::FinalStatus;
use std::fmt::Display;
use std::time::Duration;

// The modules the log lines were always written from: `RUST_LOG` filters keep working.
const WORKER: &str = "loansync::worker";
const PLANNER: &str = "loansync::planner";
const CLIENT: &str = "loansync::sink::client";
const DB: &str = "loansync::db";
const AMQP: &str = "loansync::queue::amqp";

/// Why a chunk goes back to the queue after its attempt was counted (outcome
/// `requeued`; it is published again, the broker's delivery count starts over, the
/// ledger's attempt count is what gives up on it).
pub enum Requeue<'a> {
    /// The API answered, but the settle kept failing: the answer goes back as a settle
    /// job, settled by the next worker without sending again.
    SettleDeferred { error: &'a dyn Display },
    /// The database or another dependency failed; it answers.
    Transient { error: &'a dyn Display },
    /// The broker delivered it `returned` times without it being settled (its workers
    /// died holding it): it goes back as a fresh copy before the broker's own limit
    /// drops it unsettled.
    Renewed { returned: u32 },
    /// The chunk cannot succeed (`code`, `reason`), but settling it as failed failed.
    NotSettled {
        code: &'a str,
        reason: &'a str,
        error: &'a dyn Display,
    },
}

/// One thing that happened, with what its log line and its metric need.
pub enum Event<'a> {
    /// A chunk's records were settled (committed): `etl_records_total`.
    RecordsSettled {
        entity: EntityKind,
        succeeded: usize,
        failed: usize,
    },
    /// A sync ended with `status`: `etl_syncs_total`, and `etl_sync_duration_seconds`
    /// when its duration is known.
    SyncFinished {
        sync_type: SyncType,
        status: FinalStatus,
        seconds: Option<f64>,
    },
    /// A sync with nothing to send ended as it was planned: `etl_syncs_total` (its
    /// duration is not observed; the planner's "sync planned" line says the rest).
    SyncFinishedAtPlanning {
        sync_type: SyncType,
        status: FinalStatus,
    },
    /// A worker sent and settled a chunk, in `seconds` from delivery to commit.
    ChunkSettled {
        entity: EntityKind,
        succeeded: usize,
        failed: usize,
        seconds: f64,
    },
    /// A chunk settled before was acked without sending.
    ChunkDuplicate { entity: EntityKind, seconds: f64 },
    /// The API refused the credentials: the chunk's sync was failed.
    ChunkAborted { entity: EntityKind, seconds: f64 },
    /// A chunk was dead-lettered; `settled` when its records were settled as failed
    /// first (with `code`, when the failure has one).
    ChunkDeadLettered {
        entity: EntityKind,
        code: Option<&'a str>,
        reason: &'a str,
        settled: bool,
        seconds: f64,
    },
    /// A chunk message that is no chunk job was dead-lettered (entity `unknown`).
    ChunkUnparsable { reason: &'a str },
    /// A chunk goes back to the broker.
    ChunkRequeued {
        entity: EntityKind,
        cause: Requeue<'a>,
        seconds: f64,
    },
    /// PostgreSQL stayed unreachable for `wait_secs`: the chunk is put back in the queue
    /// without spending a delivery.
    ChunkRepublished {
        entity: EntityKind,
        error: &'a dyn Display,
        wait_secs: u64,
        seconds: f64,
    },
    /// The installation is wrong (credentials, privileges, migrations): the chunk is
    /// put back in the queue untouched, without spending a delivery (`code`: the
    /// failure it was being settled with, if any).
    ChunkFatal {
        entity: EntityKind,
        code: Option<&'a str>,
        error: &'a dyn Display,
        seconds: f64,
    },
    /// A panic was caught while processing a chunk: `etl_chunk_panics_total`.
    ChunkPanicked,
    /// Non-finite numbers were sent as null: `etl_transform_warnings_total`.
    TransformWarnings { entity: EntityKind, warnings: u32 },
    /// One answer (or none: `Network`) of the analytics API, after `seconds`.
    HttpResponse {
        endpoint: &'a str,
        class: HttpClass,
        seconds: f64,
    },
    /// The API asked to slow down (`status` 429 or 503, `None` for a timeout):
    /// `etl_api_backpressure_total`.
    ApiBackpressure { status: Option<u16> },
    /// A request failed transiently (`status`, `None` for no answer) and is retried
    /// after `delay`.
    HttpRetry {
        status: Option<u16>,
        code: &'a str,
        delay: Duration,
    },
    /// A sync planned `records` records of `entity`: `etl_records_planned_total`.
    RecordsPlanned { entity: EntityKind, records: u64 },
    /// A repeated request id planned nothing new (`sync_id`: the sync serving it, if
    /// it is not pending).
    PlanDuplicate {
        request_id: &'a str,
        sync_id: Option<&'a str>,
    },
    /// Another sync is in progress: this one is not run (single-process mode).
    PlanBusy { active_sync_id: &'a str },
    /// A planning request was recorded as pending: it is planned from there, at once
    /// when the slot is free, else when it frees (`etl_plans_skipped_total{reason="queued"}`).
    RequestRecorded { request_id: &'a str },
    /// Requests are pending but the window's end cannot be bounded now: they stay
    /// pending and are tried again (`reason` says which transaction is in the way).
    PlanUnbounded { reason: &'a str },
    /// A planning message that cannot be parsed is dead-lettered.
    PlanInvalid { reason: &'a str },
    /// `what` waits up to `wait_secs` for an unreachable PostgreSQL.
    DbOutageWait {
        what: &'a str,
        error: &'a dyn Display,
        wait_secs: u64,
    },
    /// RabbitMQ blocked a connection of this process (memory or disk alarm).
    BrokerBlocked { reason: &'a str },
    /// RabbitMQ unblocked it.
    BrokerUnblocked,
    /// A publish, confirm or ack got no answer within the confirm timeout.
    BrokerTimeout,
    /// `queue` was declared, and `differing` of its arguments differ on the broker
    /// (`etl_queue_arguments_mismatch`; each difference is logged where it is found,
    /// once per process).
    QueueArgumentsChecked { queue: &'a str, differing: usize },
    /// The API acknowledged records of `entity` and their settle committed: each one's
    /// seconds from its source change to the acknowledgement (`etl_record_lag_seconds`).
    RecordsAcknowledged { entity: EntityKind, lags: &'a [f64] },
    /// A sweep went through an entity's id buckets: `unchanged` skipped by their digest,
    /// `clean` and `changed` compared record by record.
    SweepBuckets {
        entity: EntityKind,
        unchanged: u64,
        clean: u64,
        changed: u64,
    },
    /// The planner compared the source schema with the columns loansync reads:
    /// `differences` found (`etl_source_schema_drift`), `message` naming them.
    SourceSchemaChecked {
        differences: usize,
        message: Option<&'a str>,
    },
}

impl Event<'_> {
    /// Writes the event's log line and updates its metric in `m`.
    pub fn emit(self, m: &Metrics) {
        match self {
            Event::RecordsSettled {
                entity,
                succeeded,
                failed,
            } => {
                m.record_outcome(entity, RecordOutcome::Success)
                    .inc_by(succeeded as u64);
                m.record_outcome(entity, RecordOutcome::Failed)
                    .inc_by(failed as u64);
            }
            Event::SyncFinished {
                sync_type,
                status,
                seconds,
            } => {
                m.syncs
                    .with_label_values(&[sync_type.as_str(), status.as_str()])
                    .inc();
                if let Some(secs) = seconds {
                    m.sync_seconds
                        .with_label_values(&[sync_type.as_str()])
                        .observe(secs);
                }
                tracing::info!(target: WORKER, status = status.as_str(), "sync finished");
            }
            Event::SyncFinishedAtPlanning { sync_type, status } => {
                m.syncs
                    .with_label_values(&[sync_type.as_str(), status.as_str()])
                    .inc();
            }
            Event::ChunkSettled {
                entity,
                succeeded,
                failed,
                seconds,
            } => {
                tracing::debug!(target: WORKER, succeeded, failed, "chunk settled");
                m.chunk_handled(entity, ChunkOutcomeLabel::Settled, seconds);
            }
            Event::ChunkDuplicate { entity, seconds } => {
                tracing::info!(target: WORKER, "chunk already settled: acked without sending");
                m.chunk_handled(entity, ChunkOutcomeLabel::Duplicate, seconds);
            }
            Event::ChunkAborted { entity, seconds } => {
                // Logged where the credentials were refused, with the status.
                m.chunk_handled(entity, ChunkOutcomeLabel::Aborted, seconds);
            }
            Event::ChunkDeadLettered {
                entity,
                code,
                reason,
                settled,
                seconds,
            } => {
                if settled {
                    tracing::error!(target: WORKER, code, %reason, "chunk settled as failed and dead-lettered");
                } else {
                    tracing::error!(target: WORKER, code, %reason, "dead-lettering a chunk message");
                }
                m.chunk_handled(entity, ChunkOutcomeLabel::DeadLetter, seconds);
            }
            Event::ChunkUnparsable { reason } => {
                tracing::error!(target: WORKER, %reason, "dead-lettering a chunk message");
                m.chunks
                    .with_label_values(&[
                        super::labels::UNKNOWN_ENTITY,
                        ChunkOutcomeLabel::DeadLetter.as_str(),
                    ])
                    .inc();
            }
            Event::ChunkRequeued {
                entity,
                cause,
                seconds,
            } => {
                match cause {
                    Requeue::Transient { error } => {
                        tracing::warn!(target: WORKER, error = %format!("{error:#}"), "chunk failed transiently: it will be delivered again");
                    }
                    Requeue::SettleDeferred { error } => {
                        tracing::warn!(target: WORKER, error = %format!("{error:#}"), "the API answered but the settle kept failing: the answer goes back to the queue and is settled later, nothing is sent again");
                    }
                    Requeue::Renewed { returned } => {
                        tracing::warn!(target: WORKER, returned, "a chunk job the broker delivered this often without it being settled (its workers died holding it) goes back as a fresh copy, before the broker's delivery limit drops it");
                    }
                    Requeue::NotSettled {
                        code,
                        reason,
                        error,
                    } => {
                        tracing::warn!(target: WORKER, code, %reason, error = %format!("{error:#}"), "a chunk that cannot succeed could not be settled as failed: it will be delivered again");
                    }
                }
                m.chunk_handled(entity, ChunkOutcomeLabel::Requeued, seconds);
            }
            Event::ChunkRepublished {
                entity,
                error,
                wait_secs,
                seconds,
            } => {
                tracing::warn!(target: WORKER, error = %format!("{error:#}"), wait_secs, "PostgreSQL is still unreachable: the chunk is put back in the queue");
                m.chunk_handled(entity, ChunkOutcomeLabel::Republished, seconds);
            }
            Event::ChunkFatal {
                entity,
                code,
                error,
                seconds,
            } => {
                tracing::error!(target: WORKER, code, error = %format!("{error:#}"), "fatal: the installation must be fixed (credentials, privileges, migrations); the chunk is put back in the queue");
                m.chunk_handled(entity, ChunkOutcomeLabel::Republished, seconds);
            }
            Event::ChunkPanicked => {
                // The panic's message is logged with the failure it becomes.
                m.chunk_panics.inc();
            }
            Event::TransformWarnings { entity, warnings } => {
                m.transform_warnings
                    .with_label_values(&[entity.as_str()])
                    .inc_by(u64::from(warnings));
                tracing::warn!(target: WORKER, warnings, "non-finite numbers sent as null");
            }
            Event::HttpResponse {
                endpoint,
                class,
                seconds,
            } => {
                m.http_responses
                    .with_label_values(&[endpoint, class.as_str()])
                    .inc();
                m.http_seconds
                    .with_label_values(&[endpoint])
                    .observe(seconds);
            }
            Event::ApiBackpressure { status } => {
                m.api_backpressure
                    .with_label_values(&[RetryReason::of(status).as_str()])
                    .inc();
            }
            Event::HttpRetry {
                status,
                code,
                delay,
            } => {
                m.http_retries
                    .with_label_values(&[RetryReason::of(status).as_str()])
                    .inc();
                tracing::warn!(
                    target: CLIENT,
                    status = ?status,
                    code = %code,
                    delay_ms = delay.as_millis() as u64,
                    "analytics API failed transiently; retrying"
                );
            }
            Event::RecordsPlanned { entity, records } => {
                m.records_planned
                    .with_label_values(&[entity.as_str()])
                    .inc_by(records);
            }
            Event::PlanDuplicate {
                request_id,
                sync_id,
            } => {
                m.plan_skipped(SkipReason::Duplicate);
                tracing::info!(target: PLANNER, %request_id, sync_id, "repeated request_id: nothing new planned");
            }
            Event::PlanBusy { active_sync_id } => {
                m.plan_skipped(SkipReason::Busy);
                tracing::warn!(target: PLANNER, %active_sync_id, "another sync is in progress: this sync is not run");
            }
            Event::RequestRecorded { request_id } => {
                m.plan_skipped(SkipReason::Queued);
                tracing::info!(target: PLANNER, %request_id, "planning request recorded as pending");
            }
            Event::PlanUnbounded { reason } => {
                tracing::warn!(target: PLANNER, %reason, "pending requests wait: the window's end cannot be bounded now");
            }
            Event::PlanInvalid { reason } => {
                m.plan_skipped(SkipReason::Invalid);
                tracing::error!(target: PLANNER, %reason, "dead-lettering a planning message");
            }
            Event::DbOutageWait {
                what,
                error,
                wait_secs,
            } => {
                m.db_outage_waits.inc();
                tracing::warn!(target: DB, error = %format!("{error:#}"), wait_secs, "PostgreSQL does not answer: {what} waits for it");
            }
            Event::BrokerBlocked { reason } => {
                m.broker_blocked_total.inc();
                m.broker_blocked.inc();
                tracing::warn!(
                    target: AMQP,
                    reason,
                    "RabbitMQ blocked the connection (memory or disk alarm): publishes wait, and fail after ETL_PUBLISH_CONFIRM_TIMEOUT_SECS"
                );
            }
            Event::BrokerUnblocked => {
                m.broker_blocked.dec();
                tracing::info!(target: AMQP, "RabbitMQ unblocked the connection");
            }
            Event::BrokerTimeout => {
                // The error it becomes says so.
                m.broker_timeouts.inc();
            }
            Event::RecordsAcknowledged { entity, lags } => {
                let h = m.record_lag.with_label_values(&[entity.as_str()]);
                for &lag in lags {
                    h.observe(lag);
                }
            }
            Event::SweepBuckets {
                entity,
                unchanged,
                clean,
                changed,
            } => {
                for (outcome, n) in [
                    (BucketOutcome::Unchanged, unchanged),
                    (BucketOutcome::Clean, clean),
                    (BucketOutcome::Changed, changed),
                ] {
                    m.sweep_buckets
                        .with_label_values(&[entity.as_str(), outcome.as_str()])
                        .inc_by(n);
                }
            }
            Event::SourceSchemaChecked {
                differences,
                message,
            } => {
                m.source_schema_drift
                    .set(i64::try_from(differences).unwrap_or(i64::MAX));
                if let Some(message) = message {
                    tracing::error!(target: PLANNER, differences, %message, "the source schema drifted: the sync fails before reading a row");
                }
            }
            Event::QueueArgumentsChecked { queue, differing } => {
                m.queue_arguments_mismatch
                    .with_label_values(&[queue])
                    .set(i64::try_from(differing).unwrap_or(i64::MAX));
            }
        }
    }
}

impl Metrics {
    fn record_outcome(&self, entity: EntityKind, outcome: RecordOutcome) -> prometheus::IntCounter {
        self.records
            .with_label_values(&[entity.as_str(), outcome.as_str()])
    }

    /// A chunk handled by a worker: its outcome and its time from delivery to the end.
    fn chunk_handled(&self, entity: EntityKind, outcome: ChunkOutcomeLabel, seconds: f64) {
        self.chunks
            .with_label_values(&[entity.as_str(), outcome.as_str()])
            .inc();
        self.chunk_seconds
            .with_label_values(&[entity.as_str()])
            .observe(seconds);
    }

    fn plan_skipped(&self, reason: SkipReason) {
        self.plans_skipped
            .with_label_values(&[reason.as_str()])
            .inc();
    }
}

impl std::fmt::Debug for Requeue<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Requeue").finish_non_exhaustive()
    }
}

impl std::fmt::Debug for Event<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Event").finish_non_exhaustive()
    }
}
