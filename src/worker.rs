//! Process one chunk into an outcome ([`process_chunk`]), and the one loop that feeds it
//! from a [`Consumer`] ([`run`]): RabbitMQ's ([`run_amqp`]) or the in-memory queue's
//! ([`run_memory`]).
//!
//! Per chunk: read the ledger (a settled chunk is a duplicate and is only acked), load
//! and transform the rows, POST one batch, then settle in one transaction (counters,
//! error rows, resolutions, and finalization when it was the sync's last chunk). The
//! message is acked only after that commit.

use crate::domain::ChunkJob;
use crate::failure::Failure;
use crate::ledger::{self, ChunkResult, FailedRecord, FinalStatus, Settled};
use crate::queue::amqp::Broker;
use crate::queue::memory::MemoryQueue;
use crate::queue::{Consumer, Disposition, REQUEUE_PAUSE};
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
    /// the queue (see [`crate::db::through_outage`]).
    pub db_outage_wait: Duration,
    /// The registry this worker counts in.
    pub telemetry: Telemetry,
    /// The form of the fingerprint upsert its settles use, learned per entity.
    pub upsert: ledger::FingerprintUpsert,
}

/// How one chunk ended.
#[derive(Debug, Clone, PartialEq, Eq)]
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
}

/// Why a chunk could not be processed now.
#[derive(Debug, thiserror::Error)]
pub enum ChunkError {
    /// The message names no chunk of the ledger: it can never succeed.
    #[error("no chunk {0} in the ledger")]
    Unknown(String),
    /// Trying again cannot help (a value the database returns that cannot be decoded,
    /// a type mismatch): the chunk's records are settled as failed with this code.
    #[error("permanent failure ({code}): {reason}")]
    Permanent { code: &'static str, reason: String },
    /// The database (or another dependency) failed: try again later.
    #[error("transient failure: {0:#}")]
    Transient(#[from] anyhow::Error),
    /// The installation is wrong (credentials, privileges, a missing table): no chunk
    /// can succeed until it is fixed. The chunk goes back untouched.
    #[error("fatal failure: {0:#}")]
    Fatal(anyhow::Error),
}

/// Error code of records whose source row cannot be read (decoded) as it is.
pub const RECORD_UNREADABLE: &str = "RECORD_UNREADABLE";
/// Error code of records of a chunk whose processing panicked.
pub const WORKER_PANIC: &str = "WORKER_PANIC";

/// True for errors that a new attempt cannot cure ([`Failure::Permanent`]): decoding
/// or type errors, data exceptions and constraint violations.
pub fn is_permanent(e: &sqlx::Error) -> bool {
    Failure::of_sqlx(e) == Failure::Permanent
}

/// Decided by the error's type ([`Failure::of_sqlx`]): a permanent error fails the
/// chunk's records (`RECORD_UNREADABLE`), a fatal one stops the chunk untouched, and
/// anything else is tried again.
impl From<sqlx::Error> for ChunkError {
    fn from(e: sqlx::Error) -> Self {
        match Failure::of_sqlx(&e) {
            Failure::Permanent => ChunkError::Permanent {
                code: RECORD_UNREADABLE,
                reason: e.to_string(),
            },
            Failure::Fatal => ChunkError::Fatal(e.into()),
            Failure::Transient => ChunkError::Transient(e.into()),
        }
    }
}

/// The message of a caught panic.
fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".to_string())
}

/// Why rows could not be loaded.
enum LoadFailure {
    /// These rows cannot be read as they are (decode error or a panic while decoding or
    /// transforming them).
    Unreadable(String),
    /// Anything else (the database is down, a lock timed out): try the chunk again.
    Other(ChunkError),
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
        Ok(Err(e)) => Err(LoadFailure::Other(ChunkError::from(e))),
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
        Err(LoadFailure::Other(e)) => return Err(e),
        Err(LoadFailure::Unreadable(reason)) => reason,
    };
    tracing::warn!(%reason, "a chunk's rows cannot all be read: loading them one by one");
    let mut all = source::LoadedChunk::default();
    let mut unreadable = Vec::new();
    for &id in ids {
        match load_guarded(ctx, job.entity, &[id]).await {
            Ok(one) => all.extend(one),
            Err(LoadFailure::Other(e)) => return Err(e),
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

/// Processes one chunk job end to end.
pub async fn process_chunk(
    ctx: &WorkerContext,
    job: &ChunkJob,
) -> Result<ChunkOutcome, ChunkError> {
    let Some(state) = ledger::start_chunk(&ctx.pool, &job.sync_id, job.entity, job.seq).await?
    else {
        // A late copy of a chunk of a finished sync whose ledger was pruned: counted once.
        if ledger::sync_finished(&ctx.pool, &job.sync_id).await? {
            return Ok(ChunkOutcome::Duplicate);
        }
        return Err(ChunkError::Unknown(format!(
            "{}/{}/{}",
            job.sync_id, job.entity, job.seq
        )));
    };
    if state.settled {
        return Ok(ChunkOutcome::Duplicate);
    }
    if state.attempts > ctx.delivery_limit as i32 {
        let reason = format!(
            "chunk started {} times without settling (ETL_DELIVERY_LIMIT {})",
            state.attempts - 1,
            ctx.delivery_limit
        );
        let failures: Vec<FailedRecord> = state
            .ids
            .iter()
            .map(|&id| FailedRecord {
                id,
                error_code: "CHUNK_GAVE_UP".into(),
                message: reason.clone(),
                details: serde_json::json!({ "attempts": state.attempts - 1 }),
            })
            .collect();
        settle(ctx, job, &state, &[], &[], &failures, None).await?;
        return Ok(ChunkOutcome::GaveUp { reason });
    }

    let (loaded, unreadable) = load_isolating(ctx, job, &state.ids).await?;
    if loaded.warnings > 0 {
        ctx.telemetry.emit(Event::TransformWarnings {
            entity: job.entity,
            warnings: loaded.warnings,
        });
    }
    let mut failures: Vec<FailedRecord> = loaded
        .missing
        .iter()
        .map(|&id| FailedRecord {
            id,
            error_code: "SOURCE_ROW_MISSING".into(),
            message: "the row was deleted from the source table after the sync was planned".into(),
            details: serde_json::json!({}),
        })
        .collect();
    failures.extend(unreadable);
    let (succeeded, api_response) = if loaded.records.is_empty() {
        (Vec::new(), None)
    } else {
        let batch = Batch {
            sync_id: &job.sync_id,
            sync_type: state.sync_type,
            entity: job.entity,
            chunk: job.seq,
            records: &loaded.records,
        };
        match ctx.client.deliver(&batch).await {
            Ok(report) => {
                failures.extend(report.failed);
                (report.succeeded, report.last_response)
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
                ledger::abort_sync(&ctx.pool, &job.sync_id, &reason, Some(&body)).await?;
                return Ok(ChunkOutcome::Aborted);
            }
        }
    };
    // What the platform now holds of each accepted record: the fingerprint loaded with
    // it, written in the settle transaction (a rejected record keeps its old one, so the
    // next sweep sends it again).
    let delivered: Vec<(i64, uuid::Uuid)> = succeeded
        .iter()
        .filter_map(|&id| loaded.fingerprint_of(id).map(|fp| (id, fp)))
        .collect();
    settle(
        ctx,
        job,
        &state,
        &succeeded,
        &delivered,
        &failures,
        api_response.as_ref(),
    )
    .await
}

async fn settle(
    ctx: &WorkerContext,
    job: &ChunkJob,
    state: &ledger::ChunkState,
    succeeded: &[i64],
    delivered: &[(i64, uuid::Uuid)],
    failures: &[FailedRecord],
    api_response: Option<&serde_json::Value>,
) -> Result<ChunkOutcome, ChunkError> {
    let result = ChunkResult {
        sync_id: &job.sync_id,
        entity: job.entity,
        seq: job.seq,
        history_id: state.history_id,
        purpose: state.purpose,
        succeeded,
        delivered,
        failed: failures,
        api_response,
        upsert: &ctx.upsert,
    };
    match ledger::settle_chunk(&ctx.pool, &result).await? {
        Settled::Already => Ok(ChunkOutcome::Duplicate),
        Settled::Now(finished) => {
            ctx.telemetry.emit(Event::RecordsSettled {
                entity: job.entity,
                succeeded: succeeded.len(),
                failed: failures.len(),
            });
            if let Some(status) = finished {
                let seconds = ledger::history_outcome(&ctx.pool, &job.sync_id)
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
                succeeded: succeeded.len(),
                failed: failures.len(),
                finished,
            })
        }
    }
}

/// Parses and processes one message body, and says what to do with the message.
pub async fn handle_message(ctx: &WorkerContext, body: &[u8]) -> Disposition {
    let job: ChunkJob = match serde_json::from_slice(body) {
        Ok(j) => j,
        Err(e) => {
            let reason = format!("invalid chunk job: {e}");
            ctx.telemetry
                .emit(Event::ChunkUnparsable { reason: &reason });
            return Disposition::DeadLetter(reason);
        }
    };
    let span =
        tracing::info_span!("chunk", sync_id = %job.sync_id, entity = %job.entity, chunk = job.seq);
    handle_job(ctx, &job).instrument(span).await
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

async fn handle_job(ctx: &WorkerContext, job: &ChunkJob) -> Disposition {
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
            || process_chunk(ctx, job),
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
                code: None,
                reason: &reason,
                settled: true,
                seconds: seconds(),
            });
            Disposition::DeadLetter(reason)
        }
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
                Err(ChunkError::Transient(e)) => {
                    emit(Event::ChunkRequeued {
                        entity,
                        cause: Requeue::NotSettled {
                            code,
                            reason: &reason,
                            error: &e,
                        },
                        seconds: seconds(),
                    });
                    Disposition::Requeue
                }
                Err(ChunkError::Fatal(e)) => {
                    emit(Event::ChunkFatal {
                        entity,
                        code: Some(code),
                        error: &e,
                        seconds: seconds(),
                    });
                    Disposition::Republish
                }
                Err(e) => {
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
            }
        }
        Err(ChunkError::Fatal(e)) => {
            // Not the chunk's fault: put back without spending a delivery.
            emit(Event::ChunkFatal {
                entity,
                code: None,
                error: &e,
                seconds: seconds(),
            });
            Disposition::Republish
        }
        Err(ChunkError::Transient(e)) => {
            if crate::db::is_reachable(&ctx.pool).await {
                emit(Event::ChunkRequeued {
                    entity,
                    cause: Requeue::Transient { error: &e },
                    seconds: seconds(),
                });
                Disposition::Requeue
            } else {
                // Not worked on at all: put back without spending a delivery.
                emit(Event::ChunkRepublished {
                    entity,
                    error: &e,
                    wait_secs: ctx.db_outage_wait.as_secs(),
                    seconds: seconds(),
                });
                Disposition::Republish
            }
        }
    }
}

/// Settles every record of a chunk that cannot succeed as failed with `code`, so that
/// the books balance and `loansync errors retry` can send them once fixed.
pub async fn fail_chunk(
    ctx: &WorkerContext,
    job: &ChunkJob,
    code: &str,
    reason: &str,
) -> Result<(), ChunkError> {
    let Some(state) = ledger::start_chunk(&ctx.pool, &job.sync_id, job.entity, job.seq).await?
    else {
        return Err(ChunkError::Unknown(format!(
            "{}/{}/{}",
            job.sync_id, job.entity, job.seq
        )));
    };
    if state.settled {
        return Ok(());
    }
    let failures: Vec<FailedRecord> = state
        .ids
        .iter()
        .map(|&id| FailedRecord {
            id,
            error_code: code.to_string(),
            message: reason.to_string(),
            details: serde_json::json!({}),
        })
        .collect();
    settle(ctx, job, &state, &[], &[], &failures, None).await?;
    Ok(())
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
) -> anyhow::Result<()> {
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
                    Some(Err(e)) => break Err(e.context("chunk consumer failed")),
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
) -> anyhow::Result<()> {
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
        assert_eq!(metrics.chunk_panics.get(), 1);
        let ok: Result<u8, ChunkError> = contain_panic(&metrics, async { Ok(7) }).await;
        assert_eq!(ok.unwrap(), 7);
    }

    #[test]
    fn decode_errors_are_permanent_and_connection_errors_transient() {
        let decode = sqlx::Error::ColumnDecode {
            index: "date_created".into(),
            source: "out of range".into(),
        };
        assert!(is_permanent(&decode));
        assert!(matches!(
            ChunkError::from(decode),
            ChunkError::Permanent {
                code: RECORD_UNREADABLE,
                ..
            }
        ));
        assert!(!is_permanent(&sqlx::Error::PoolTimedOut));
        let io = sqlx::Error::Io(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        assert!(matches!(ChunkError::from(io), ChunkError::Transient(_)));
        let config = sqlx::Error::Configuration("no password".into());
        assert!(matches!(ChunkError::from(config), ChunkError::Fatal(_)));
    }
}
