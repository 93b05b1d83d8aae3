//! Process one chunk into an outcome ([`process_chunk`]), and the one loop that feeds it
//! from a [`Consumer`] ([`run`]): RabbitMQ's ([`run_amqp`]) or the in-memory queue's
//! ([`run_memory`]).
//!
//! Per chunk: read the ledger (a settled chunk is a duplicate and is only acked), load
//! and transform the rows, POST one batch, then settle in one transaction (counters,
//! error rows, resolutions, fingerprints; finalization when it was the sync's last
//! chunk). The message is acked only after that commit. A settle that keeps failing
//! after the POST succeeded goes back to the queue as a settle job carrying the API's
//! answer ([`crate::domain::SettleJob`]): it is retried as a settle, never as a chunk.

use crate::domain::FailedRecord;
use crate::domain::{ChunkAnswer, ChunkJob, SettleJob, WorkerMessage};
use crate::failure::{Classify, Failure};
use crate::ledger::plan::Attempt;
use crate::ledger::settle::{ChunkResult, Settled};
use crate::ledger::states::FinalStatus;
use crate::ledger::{self};
use crate::queue::amqp::Broker;
use crate::queue::memory::MemoryQueue;
use crate::queue::{Consumer, Disposition, QueueError, REQUEUE_PAUSE};
use crate::sink::{AnalyticsClient, Batch, FatalError};
use crate::source;
use crate::telemetry::{Event, Metrics, Requeue, Telemetry};
use sqlx::PgPool;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use tracing::Instrument;

/// What a worker needs to process chunks.
pub struct WorkerContext {
    pub pool: PgPool,
    pub client: AnalyticsClient,
    /// Starts of one chunk after which it is settled as failed and dead-lettered.
    pub delivery_limit: u32,
    /// How long a chunk is held while PostgreSQL is unreachable before it goes back to
    /// the queue (see [`crate::db::through_outage`]); also how long a settle after a
    /// successful POST is retried before it goes back as a settle job.
    pub db_outage_wait: Duration,
    /// The registry this worker counts in.
    pub telemetry: Telemetry,
    /// The form of the fingerprint upsert its settles use, learned per entity.
    pub upsert: ledger::settle::FingerprintUpsert,
}

/// How one chunk ended.
#[derive(Debug, Clone, PartialEq)]
pub enum ChunkOutcome {
    /// Sent and settled by this worker; `finished` when it closed the sync.
    Settled {
        succeeded: usize,
        failed: usize,
        finished: Option<FinalStatus>,
    },
    /// Settled before (a redelivered or duplicated job): nothing sent, nothing counted.
    Duplicate,
    /// The API refused the credentials: the sync was failed and its chunks settled.
    Aborted,
    /// Started more often than the delivery limit: settled as failed records.
    GaveUp { reason: String },
    /// The API answered but the settle kept failing: the answer goes back to the queue
    /// as a settle job (`error`: the last settle failure).
    SettleDeferred { job: Box<SettleJob>, error: String },
}

/// Why a chunk could not be processed now. Each says what the caller does.
#[derive(Debug, thiserror::Error)]
pub enum ChunkError {
    /// The message names no chunk of the ledger: it can never succeed (dead-letter).
    #[error("no chunk {0} in the ledger")]
    Unknown(String),
    /// Processing the chunk panicked: its records are settled as failed with this code
    /// and the message is dead-lettered.
    #[error("permanent failure ({code}): {reason}")]
    Permanent { code: &'static str, reason: String },
    /// The chunk could not even be read from the ledger: no attempt was counted. Put
    /// back without spending a delivery (transient), or dead-lettered unsettled when
    /// the ledger's row cannot be read at all (permanent).
    #[error("cannot start the chunk: {0}")]
    NotStarted(#[source] sqlx::Error),
    /// Reading the source rows failed for a reason that is not the rows' own (the
    /// database, a privilege): put back, the attempt counted.
    #[error("cannot read the source rows: {0}")]
    Source(#[source] sqlx::Error),
    /// Writing the ledger failed (settling, aborting): put back, or dead-lettered
    /// unsettled when the write can never succeed. Never a record's failure.
    #[error("cannot write the ledger: {0}")]
    Ledger(#[source] sqlx::Error),
}

impl Classify for ChunkError {
    /// What this error means for the chunk: decided by type, never by text.
    fn failure(&self) -> Failure {
        match self {
            ChunkError::Unknown(_) | ChunkError::Permanent { .. } => Failure::Permanent,
            ChunkError::NotStarted(e) | ChunkError::Ledger(e) => Failure::of_sqlx(e),
            // Unreadable rows never get here (they fail one by one in `load_isolating`).
            ChunkError::Source(e) => match Failure::of_sqlx(e) {
                Failure::Permanent => Failure::Transient,
                other => other,
            },
        }
    }
}

/// Error code of records whose source row cannot be read (decoded) as it is.
pub const RECORD_UNREADABLE: &str = "RECORD_UNREADABLE";
/// Error code of records of a chunk whose processing panicked.
pub const WORKER_PANIC: &str = "WORKER_PANIC";
/// Error code of records of a chunk started more often than `ETL_DELIVERY_LIMIT`.
pub const CHUNK_GAVE_UP: &str = "CHUNK_GAVE_UP";
/// Error code of records whose row was deleted after the sync was planned.
pub const SOURCE_ROW_MISSING: &str = "SOURCE_ROW_MISSING";

/// True for source errors that a new attempt cannot cure ([`Failure::Permanent`]):
/// decoding or type errors, data exceptions.
pub fn is_permanent(e: &sqlx::Error) -> bool {
    Failure::of_sqlx(e) == Failure::Permanent
}

/// The message of a caught panic.
fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".to_string())
}

/// The same failure for every id of a chunk.
fn fail_every(
    ids: &[i64],
    code: &str,
    message: &str,
    details: serde_json::Value,
) -> Vec<FailedRecord> {
    ids.iter()
        .map(|&id| FailedRecord {
            id,
            error_code: code.to_string(),
            message: message.to_string(),
            details: details.clone(),
        })
        .collect()
}

/// Why rows could not be loaded.
enum LoadFailure {
    /// These rows cannot be read as they are (decode error or a panic while decoding or
    /// transforming them).
    Unreadable(String),
    /// Anything else (the database is down, a lock timed out): try the chunk again.
    Other(sqlx::Error),
}

/// Loads and transforms rows, catching panics and telling unreadable rows apart.
async fn load_guarded(
    ctx: &WorkerContext,
    entity: crate::domain::EntityKind,
    ids: &[i64],
) -> Result<source::LoadedChunk, LoadFailure> {
    use futures::FutureExt;
    match std::panic::AssertUnwindSafe(source::load_chunk(&ctx.pool, entity, ids))
        .catch_unwind()
        .await
    {
        Ok(Ok(loaded)) => Ok(loaded),
        Ok(Err(e)) if is_permanent(&e) => Err(LoadFailure::Unreadable(e.to_string())),
        Ok(Err(e)) => Err(LoadFailure::Other(e)),
        Err(panic) => {
            ctx.telemetry.emit(Event::ChunkPanicked);
            Err(LoadFailure::Unreadable(format!(
                "reading the row panicked: {}",
                panic_message(&*panic)
            )))
        }
    }
}

/// Loads a chunk. When its rows cannot all be read (a value that cannot be decoded,
/// such as an `infinity` timestamp, which panics inside the decoder), loads them one by
/// one: the readable ones go on, the others are returned as `RECORD_UNREADABLE`
/// failures.
async fn load_isolating(
    ctx: &WorkerContext,
    job: &ChunkJob,
    ids: &[i64],
) -> Result<(source::LoadedChunk, Vec<FailedRecord>), ChunkError> {
    let reason = match load_guarded(ctx, job.entity, ids).await {
        Ok(loaded) => return Ok((loaded, Vec::new())),
        Err(LoadFailure::Other(e)) => return Err(ChunkError::Source(e)),
        Err(LoadFailure::Unreadable(reason)) => reason,
    };
    tracing::warn!(%reason, "a chunk's rows cannot all be read: loading them one by one");
    let mut all = source::LoadedChunk::default();
    let mut unreadable = Vec::new();
    for &id in ids {
        match load_guarded(ctx, job.entity, &[id]).await {
            Ok(one) => all.extend(one),
            Err(LoadFailure::Other(e)) => return Err(ChunkError::Source(e)),
            Err(LoadFailure::Unreadable(reason)) => {
                tracing::error!(id, %reason, "source row cannot be read: its record fails");
                unreadable.push(FailedRecord {
                    id,
                    error_code: RECORD_UNREADABLE.into(),
                    message: format!("the source row cannot be read: {reason}"),
                    details: serde_json::json!({}),
                });
            }
        }
    }
    Ok((all, unreadable))
}

/// Reads a chunk from the ledger (counting the attempt as `attempt` says); `Ok(None)`
/// when the chunk needs no work: settled before, or its sync finished and pruned.
async fn read_chunk(
    ctx: &WorkerContext,
    job: &ChunkJob,
    attempt: Attempt,
) -> Result<Option<ledger::plan::ChunkState>, ChunkError> {
    let state = ledger::plan::start_chunk(&ctx.pool, &job.sync_id, job.entity, job.seq, attempt)
        .await
        .map_err(ChunkError::NotStarted)?;
    match state {
        Some(state) if state.settled => Ok(None),
        Some(state) => Ok(Some(state)),
        // A late copy of a chunk of a finished sync whose ledger was pruned: counted once.
        None => match ledger::lifecycle::sync_finished(&ctx.pool, &job.sync_id).await {
            Ok(true) => Ok(None),
            Ok(false) => Err(ChunkError::Unknown(format!(
                "{}/{}/{}",
                job.sync_id, job.entity, job.seq
            ))),
            Err(e) => Err(ChunkError::NotStarted(e)),
        },
    }
}

/// Processes one chunk job end to end.
pub async fn process_chunk(
    ctx: &WorkerContext,
    job: &ChunkJob,
) -> Result<ChunkOutcome, ChunkError> {
    let Some(state) = read_chunk(ctx, job, Attempt::Count).await? else {
        return Ok(ChunkOutcome::Duplicate);
    };
    fail::fail_point!("worker::chunk_started");
    if state.attempts > ctx.delivery_limit as i32 {
        let reason = format!(
            "chunk started {} times without settling (ETL_DELIVERY_LIMIT {})",
            state.attempts - 1,
            ctx.delivery_limit
        );
        let answer = ChunkAnswer {
            failed: fail_every(
                &state.ids,
                CHUNK_GAVE_UP,
                &reason,
                serde_json::json!({ "attempts": state.attempts - 1 }),
            ),
            ..ChunkAnswer::default()
        };
        return match settle(ctx, job, &state, answer).await? {
            ChunkOutcome::Settled { .. } => Ok(ChunkOutcome::GaveUp { reason }),
            other => Ok(other),
        };
    }

    let (loaded, unreadable) = load_isolating(ctx, job, &state.ids).await?;
    if loaded.warnings > 0 {
        ctx.telemetry.emit(Event::TransformWarnings {
            entity: job.entity,
            warnings: loaded.warnings,
        });
    }
    let mut answer = ChunkAnswer {
        failed: fail_every(
            &loaded.missing,
            SOURCE_ROW_MISSING,
            "the row was deleted from the source table after the sync was planned",
            serde_json::json!({}),
        ),
        ..ChunkAnswer::default()
    };
    answer.failed.extend(unreadable);
    if !loaded.records.is_empty() {
        let batch = Batch {
            sync_id: &job.sync_id,
            sync_type: state.sync_type,
            entity: job.entity,
            chunk: job.seq,
            records: &loaded.records,
        };
        match ctx.client.deliver(&batch).await {
            Ok(report) => {
                answer.failed.extend(report.failed);
                answer.succeeded = report.succeeded;
                answer.api_response = report.last_response;
            }
            Err(FatalError::Unauthorized { status, message }) => {
                let reason = format!(
                    "the analytics API refused the credentials (HTTP {status}): {message}. \
                     Check ANALYTICS_API_KEY / ANALYTICS_API_KEY_FILE, then run the sync again"
                );
                tracing::error!(
                    status,
                    "analytics API refused the credentials: failing the sync"
                );
                let body = serde_json::json!({ "http_status": status, "message": message });
                ledger::end::abort_sync(&ctx.pool, &job.sync_id, &reason, Some(&body))
                    .await
                    .map_err(ChunkError::Ledger)?;
                return Ok(ChunkOutcome::Aborted);
            }
        }
    }
    fail::fail_point!("worker::after_post");
    // What the platform now holds of each accepted record: the fingerprint loaded with
    // it, written in the settle transaction (a rejected record keeps its old one, so the
    // next sweep sends it again).
    answer.delivered = answer
        .succeeded
        .iter()
        .filter_map(|&id| loaded.fingerprint_of(id).map(|fp| (id, fp)))
        .collect();
    settle(ctx, job, &state, answer).await
}

/// Settles a settle job: the API's answer to a chunk whose settle failed before. No
/// attempt is counted and nothing is sent.
pub async fn process_settle(
    ctx: &WorkerContext,
    job: &SettleJob,
) -> Result<ChunkOutcome, ChunkError> {
    let chunk = job.chunk();
    let Some(state) = read_chunk(ctx, &chunk, Attempt::Read).await? else {
        return Ok(ChunkOutcome::Duplicate);
    };
    settle(ctx, &chunk, &state, job.answer.clone()).await
}

/// The first pause between two tries of a settle after a successful POST; it doubles
/// up to [`SETTLE_RETRY_MAX_DELAY`].
const SETTLE_RETRY_FIRST_DELAY: Duration = Duration::from_millis(100);
const SETTLE_RETRY_MAX_DELAY: Duration = Duration::from_secs(5);

/// Settles `answer` for a chunk: tries the settle transaction again while it fails
/// transiently, for up to `db_outage_wait` (the POST's answer is kept: nothing is sent
/// again); if it still fails, the answer goes back to the queue as a settle job
/// ([`ChunkOutcome::SettleDeferred`]). A settle that fails permanently (a value
/// PostgreSQL refuses) is tried once more without any text the API wrote; only if that
/// fails too is it an error.
async fn settle(
    ctx: &WorkerContext,
    job: &ChunkJob,
    state: &ledger::plan::ChunkState,
    answer: ChunkAnswer,
) -> Result<ChunkOutcome, ChunkError> {
    use backon::Retryable;
    // While PostgreSQL is unreachable, wait for it (counted as an outage wait, as a
    // chunk's processing does); while it answers but the settle fails (a lock timeout,
    // a serialization failure), try again with a backoff.
    let attempt = |answer: &ChunkAnswer| {
        let answer = answer.clone();
        async move {
            crate::db::through_outage(
                &ctx.pool,
                ctx.db_outage_wait,
                "the settle",
                &ctx.telemetry,
                || settle_once(ctx, job, state, &answer),
            )
            .await
        }
    };
    let policy = backon::ExponentialBuilder::default()
        .with_min_delay(SETTLE_RETRY_FIRST_DELAY)
        .with_max_delay(SETTLE_RETRY_MAX_DELAY)
        .with_total_delay(Some(ctx.db_outage_wait))
        .without_max_times()
        .with_jitter();
    let tried = (|| attempt(&answer))
        .retry(policy)
        .when(|e: &sqlx::Error| Failure::of_sqlx(e) == Failure::Transient)
        .notify(|e, delay| {
            tracing::warn!(error = %e, delay_ms = delay.as_millis() as u64, "the settle failed after the API answered; trying the settle again");
        })
        .await;
    match tried {
        Ok(outcome) => Ok(outcome),
        Err(e) if Failure::of_sqlx(&e) == Failure::Permanent => {
            tracing::error!(error = %e, "the settle was refused: settling again without the API's text");
            settle_once(ctx, job, state, &without_api_text(&answer))
                .await
                .map_err(ChunkError::Ledger)
        }
        Err(e) if Failure::of_sqlx(&e) == Failure::Fatal => Err(ChunkError::Ledger(e)),
        Err(e) => Ok(ChunkOutcome::SettleDeferred {
            job: Box::new(SettleJob {
                sync_id: job.sync_id.clone(),
                entity: job.entity,
                seq: job.seq,
                answer,
            }),
            error: e.to_string(),
        }),
    }
}

/// The answer with nothing the API wrote: codes, messages and details replaced by plain
/// words, no response body. What is settled when PostgreSQL refuses the API's text.
fn without_api_text(answer: &ChunkAnswer) -> ChunkAnswer {
    ChunkAnswer {
        failed: answer
            .failed
            .iter()
            .map(|f| FailedRecord {
                id: f.id,
                error_code: "API_TEXT_UNSTORABLE".into(),
                message: "the analytics API refused this record; its answer could not be stored"
                    .into(),
                details: serde_json::json!({}),
            })
            .collect(),
        api_response: None,
        ..answer.clone()
    }
}

async fn settle_once(
    ctx: &WorkerContext,
    job: &ChunkJob,
    state: &ledger::plan::ChunkState,
    answer: &ChunkAnswer,
) -> sqlx::Result<ChunkOutcome> {
    let result = ChunkResult {
        sync_id: &job.sync_id,
        entity: job.entity,
        seq: job.seq,
        history_id: state.history_id,
        purpose: state.purpose,
        succeeded: &answer.succeeded,
        delivered: &answer.delivered,
        failed: &answer.failed,
        api_response: answer.api_response.as_ref(),
        upsert: &ctx.upsert,
    };
    match ledger::settle::settle_chunk(&ctx.pool, &result).await? {
        Settled::Already => Ok(ChunkOutcome::Duplicate),
        Settled::Now(finished) => {
            ctx.telemetry.emit(Event::RecordsSettled {
                entity: job.entity,
                succeeded: answer.succeeded.len(),
                failed: answer.failed.len(),
            });
            if let Some(status) = finished {
                let seconds = ledger::reads::history_outcome(&ctx.pool, &job.sync_id)
                    .await
                    .ok()
                    .and_then(|o| o.duration_seconds);
                ctx.telemetry.emit(Event::SyncFinished {
                    sync_type: state.sync_type,
                    status,
                    seconds,
                });
            }
            Ok(ChunkOutcome::Settled {
                succeeded: answer.succeeded.len(),
                failed: answer.failed.len(),
                finished,
            })
        }
    }
}

/// Parses and processes one message body, and says what to do with the message.
pub async fn handle_message(ctx: &WorkerContext, body: &[u8]) -> Disposition {
    let message = match WorkerMessage::parse(body) {
        Ok(m) => m,
        Err(reason) => {
            ctx.telemetry
                .emit(Event::ChunkUnparsable { reason: &reason });
            return Disposition::DeadLetter(reason);
        }
    };
    let job = message.chunk();
    let span =
        tracing::info_span!("chunk", sync_id = %job.sync_id, entity = %job.entity, chunk = job.seq);
    let disposition = handle_job(ctx, &job, &message).instrument(span).await;
    fail::fail_point!("worker::before_ack");
    disposition
}

/// Runs a chunk's processing, turning a panic into a permanent `WORKER_PANIC` failure
/// (counted in `metrics`).
pub async fn contain_panic<T>(
    metrics: &Metrics,
    work: impl std::future::Future<Output = Result<T, ChunkError>>,
) -> Result<T, ChunkError> {
    use futures::FutureExt;
    std::panic::AssertUnwindSafe(work)
        .catch_unwind()
        .await
        .unwrap_or_else(|panic| {
            Event::ChunkPanicked.emit(metrics);
            Err(ChunkError::Permanent {
                code: WORKER_PANIC,
                reason: format!("processing the chunk panicked: {}", panic_message(&*panic)),
            })
        })
}

async fn handle_job(ctx: &WorkerContext, job: &ChunkJob, message: &WorkerMessage) -> Disposition {
    let started = Instant::now();
    let in_flight = ctx.telemetry.chunk_in_flight();
    // A panic anywhere in the chunk's processing is contained here, the one place both
    // the RabbitMQ loop and the in-memory loop go through: the chunk fails, the process
    // goes on.
    let result = contain_panic(
        &ctx.telemetry,
        crate::db::through_outage(
            &ctx.pool,
            ctx.db_outage_wait,
            "the chunk",
            &ctx.telemetry,
            || async {
                match message {
                    WorkerMessage::Chunk(job) => process_chunk(ctx, job).await,
                    WorkerMessage::Settle(settle) => process_settle(ctx, settle).await,
                }
            },
        ),
    )
    .await;
    drop(in_flight);
    let entity = job.entity;
    let seconds = || started.elapsed().as_secs_f64();
    let emit = |event| ctx.telemetry.emit(event);
    match result {
        Ok(ChunkOutcome::Settled {
            succeeded, failed, ..
        }) => {
            emit(Event::ChunkSettled {
                entity,
                succeeded,
                failed,
                seconds: seconds(),
            });
            Disposition::Ack
        }
        Ok(ChunkOutcome::Duplicate) => {
            emit(Event::ChunkDuplicate {
                entity,
                seconds: seconds(),
            });
            Disposition::Ack
        }
        Ok(ChunkOutcome::Aborted) => {
            emit(Event::ChunkAborted {
                entity,
                seconds: seconds(),
            });
            Disposition::Ack
        }
        Ok(ChunkOutcome::GaveUp { reason }) => {
            emit(Event::ChunkDeadLettered {
                entity,
                code: Some(CHUNK_GAVE_UP),
                reason: &reason,
                settled: true,
                seconds: seconds(),
            });
            Disposition::DeadLetter(reason)
        }
        Ok(ChunkOutcome::SettleDeferred { job, error }) => match serde_json::to_vec(&job) {
            Ok(body) => {
                emit(Event::ChunkRequeued {
                    entity,
                    cause: Requeue::SettleDeferred { error: &error },
                    seconds: seconds(),
                });
                Disposition::Replace(body)
            }
            // Not expected (every field serializes); the chunk is then delivered again.
            Err(e) => {
                emit(Event::ChunkRequeued {
                    entity,
                    cause: Requeue::Transient { error: &e },
                    seconds: seconds(),
                });
                Disposition::Republish
            }
        },
        Err(ChunkError::Unknown(what)) => {
            let reason = format!("chunk job names no chunk of the ledger: {what}");
            emit(Event::ChunkDeadLettered {
                entity,
                code: None,
                reason: &reason,
                settled: false,
                seconds: seconds(),
            });
            Disposition::DeadLetter(reason)
        }
        Err(ChunkError::Permanent { code, reason }) => {
            match fail_chunk(ctx, job, code, &reason).await {
                Ok(()) => {
                    emit(Event::ChunkDeadLettered {
                        entity,
                        code: Some(code),
                        reason: &reason,
                        settled: true,
                        seconds: seconds(),
                    });
                    Disposition::DeadLetter(format!("{code}: {reason}"))
                }
                Err(e) if e.failure() == Failure::Permanent => {
                    // Settling it as failed cannot succeed either: requeued, it would
                    // come back forever. Its sync stays unfinished (stalled) until an
                    // operator abandons it.
                    let reason = format!("{code}: {reason}; not settled: {e}");
                    emit(Event::ChunkDeadLettered {
                        entity,
                        code: Some(code),
                        reason: &reason,
                        settled: false,
                        seconds: seconds(),
                    });
                    Disposition::DeadLetter(reason)
                }
                Err(e) if e.failure() == Failure::Fatal => {
                    emit(Event::ChunkFatal {
                        entity,
                        code: Some(code),
                        error: &e,
                        seconds: seconds(),
                    });
                    Disposition::Republish
                }
                Err(e) => {
                    emit(Event::ChunkRequeued {
                        entity,
                        cause: Requeue::NotSettled {
                            code,
                            reason: &reason,
                            error: &e,
                        },
                        seconds: seconds(),
                    });
                    Disposition::Republish
                }
            }
        }
        Err(e) => match e.failure() {
            Failure::Permanent => {
                // The ledger's own rows cannot be read or written as they are: no retry
                // can help, and the records are not at fault. Left unsettled: the sync
                // shows stalled until an operator abandons it.
                let reason = format!("the ledger refuses this chunk: {e}");
                emit(Event::ChunkDeadLettered {
                    entity,
                    code: None,
                    reason: &reason,
                    settled: false,
                    seconds: seconds(),
                });
                Disposition::DeadLetter(reason)
            }
            Failure::Fatal => {
                // Not the chunk's fault: put back without spending a delivery.
                emit(Event::ChunkFatal {
                    entity,
                    code: None,
                    error: &e,
                    seconds: seconds(),
                });
                Disposition::Republish
            }
            Failure::Transient => {
                // Put back without spending a broker delivery: the ledger's own attempt
                // count (when it was counted) is what gives up on a chunk.
                if matches!(e, ChunkError::NotStarted(_)) {
                    emit(Event::ChunkRepublished {
                        entity,
                        error: &e,
                        wait_secs: ctx.db_outage_wait.as_secs(),
                        seconds: seconds(),
                    });
                } else {
                    emit(Event::ChunkRequeued {
                        entity,
                        cause: Requeue::Transient { error: &e },
                        seconds: seconds(),
                    });
                }
                Disposition::Republish
            }
        },
    }
}

/// Settles every record of a chunk that cannot succeed as failed with `code`, so that
/// the books balance and `loansync errors retry` can send them once fixed. The attempt
/// that met the failure was counted already: this one is not.
pub async fn fail_chunk(
    ctx: &WorkerContext,
    job: &ChunkJob,
    code: &str,
    reason: &str,
) -> Result<(), ChunkError> {
    let Some(state) = read_chunk(ctx, job, Attempt::Read).await? else {
        return Ok(());
    };
    let answer = ChunkAnswer {
        failed: fail_every(&state.ids, code, reason, serde_json::json!({})),
        ..ChunkAnswer::default()
    };
    match settle(ctx, job, &state, answer).await? {
        ChunkOutcome::SettleDeferred { error, .. } => Err(ChunkError::Ledger(
            sqlx::Error::Protocol(format!("the settle kept failing: {error}")),
        )),
        _ => Ok(()),
    }
}

/// The worker loop: takes chunk jobs from `consumer` and works at most `concurrency` of
/// them at once, settling each delivery with its [`Disposition`], until `shutdown`
/// resolves, the consumer is lost (an error: the caller reconnects) or its queue says
/// the work is over (the in-memory queue, once empty with nothing in flight). On
/// shutdown it stops taking chunks and gives the ones in flight `grace` to finish;
/// unfinished ones go back to the queue.
pub async fn run(
    ctx: Arc<WorkerContext>,
    consumer: &mut dyn Consumer,
    concurrency: u16,
    grace: Duration,
    consuming: &AtomicBool,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), QueueError> {
    let concurrency = usize::from(concurrency.max(1));
    consuming.store(true, Ordering::SeqCst);
    let mut in_flight = tokio::task::JoinSet::new();
    tokio::pin!(shutdown);
    let result = loop {
        tokio::select! {
            _ = &mut shutdown => break Ok(()),
            Some(done) = in_flight.join_next(), if !in_flight.is_empty() => {
                if let Err(e) = done { tracing::error!(error = %e, "chunk task panicked"); }
            }
            next = consumer.next(), if in_flight.len() < concurrency => {
                match next {
                    Some(Ok(delivery)) => {
                        let ctx = ctx.clone();
                        in_flight.spawn(async move {
                            let disposition = handle_message(&ctx, delivery.body()).await;
                            if let Err(e) = delivery.settle(disposition).await {
                                tracing::warn!(error = %format!("{e:#}"), "could not settle a delivery: the broker will redeliver it");
                            }
                        });
                    }
                    Some(Err(e)) => break Err(e),
                    // The queue's work is over; nothing is in flight any more.
                    None => break Ok(()),
                }
            }
        }
    };
    consuming.store(false, Ordering::SeqCst);
    if result.is_err() {
        // The connection is gone: what is in flight cannot be settled on it.
        in_flight.abort_all();
        return result;
    }
    if !in_flight.is_empty() {
        tracing::info!(
            in_flight = in_flight.len(),
            "shutting down: finishing chunks in flight"
        );
    }
    let drained = tokio::time::timeout(grace, async {
        while in_flight.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            left = in_flight.len(),
            "grace period over: unfinished chunks go back to the queue"
        );
        in_flight.abort_all();
    }
    consumer.close().await;
    result
}

/// [`run`] over `<prefix>.chunks` on `broker`, with at most `concurrency` chunks in
/// flight (`basic_qos`); closes the connection when it ends.
pub async fn run_amqp(
    ctx: Arc<WorkerContext>,
    broker: Broker,
    concurrency: u16,
    grace: Duration,
    consuming: Arc<AtomicBool>,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), QueueError> {
    let queue = broker.topology.chunks.clone();
    let tag = format!("loansync-worker-{}", uuid::Uuid::new_v4().simple());
    let mut consumer = broker
        .consumer(&queue, concurrency, &tag, REQUEUE_PAUSE)
        .await?;
    tracing::info!(%queue, concurrency, "worker consuming");
    run(ctx, &mut consumer, concurrency, grace, &consuming, shutdown).await?;
    broker.close().await;
    Ok(())
}

/// [`run`] over the in-memory queue with `concurrency` chunks at once, until the queue
/// is empty and nothing is in flight. A job that fails transiently goes back to the end
/// of the queue after the queue's pause.
pub async fn run_memory(ctx: Arc<WorkerContext>, queue: MemoryQueue, concurrency: u16) {
    let mut consumer = queue.consumer();
    let consuming = AtomicBool::new(false);
    // The in-memory consumer is never lost and there is no shutdown: this ends when the
    // queue's work is over.
    let ended = run(
        ctx,
        &mut consumer,
        concurrency,
        Duration::MAX,
        &consuming,
        std::future::pending::<()>(),
    )
    .await;
    if let Err(e) = ended {
        tracing::error!(error = %format!("{e:#}"), "the in-memory worker loop failed");
    }
}

impl std::fmt::Debug for WorkerContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerContext").finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_panic_becomes_a_permanent_worker_panic() {
        let metrics = Metrics::new();
        let r: Result<(), ChunkError> = contain_panic(&metrics, async {
            let v: Vec<i32> = Vec::new();
            #[allow(clippy::indexing_slicing)]
            let _ = v[3];
            Ok(())
        })
        .await;
        match r {
            Err(ChunkError::Permanent { code, reason }) => {
                assert_eq!(code, WORKER_PANIC);
                assert!(reason.contains("index out of bounds"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(metrics.value("etl_chunk_panics_total", &[]), Some(1.0));
        let ok: Result<u8, ChunkError> = contain_panic(&metrics, async { Ok(7) }).await;
        assert_eq!(ok.unwrap(), 7);
    }

    #[test]
    fn a_ledger_failure_is_never_a_record_failure() {
        let decode = || sqlx::Error::ColumnDecode {
            index: "date_created".into(),
            source: "out of range".into(),
        };
        assert!(is_permanent(&decode()));
        // The ledger's own decode failure: the chunk is dead-lettered unsettled, its
        // records are not at fault.
        assert_eq!(ChunkError::Ledger(decode()).failure(), Failure::Permanent);
        assert_eq!(
            ChunkError::NotStarted(decode()).failure(),
            Failure::Permanent
        );
        // Source errors that are not the rows' own are tried again.
        assert_eq!(ChunkError::Source(decode()).failure(), Failure::Transient);
        let io = || sqlx::Error::Io(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        assert_eq!(ChunkError::Ledger(io()).failure(), Failure::Transient);
        assert_eq!(ChunkError::NotStarted(io()).failure(), Failure::Transient);
        let config = sqlx::Error::Configuration("no password".into());
        assert_eq!(ChunkError::Source(config).failure(), Failure::Fatal);
    }
}
