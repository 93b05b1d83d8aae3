//! A message turned into a [`Disposition`]: parsed, processed with panics contained,
//! and each outcome or error counted and mapped to ack, republish or dead-letter.

use super::chunk::{fail_chunk, panic_message, process_chunk, process_settle};
use super::{CHUNK_GAVE_UP, ChunkError, ChunkOutcome, WORKER_PANIC, WorkerContext};
use crate::domain::{ChunkJob, WorkerMessage};
use crate::failure::{Classify, Failure};
use crate::queue::Disposition;
use crate::telemetry::{Event, Metrics, Requeue};
use std::time::Instant;
use tracing::Instrument;

/// [`handle_message`] for a message the queue delivered `returned` times before.
///
/// RabbitMQ drops a message returned more than `ETL_DELIVERY_LIMIT` + 2 times (dead-
/// lettered by the broker, not by loansync), which leaves its chunk unsettled in the
/// ledger and its sync running for good (and a queue made with another setting keeps
/// its own limit, lower perhaps: see `WorkerContext::renew_at`). A chunk job is returned
/// without its attempt
/// being counted when a worker dies after receiving it and before starting it, or while
/// it waits for a request slot behind others; workers killed over and over (a crash loop
/// on another chunk, a node draining) can so spend an innocent chunk's deliveries. At
/// `ETL_DELIVERY_LIMIT` returns the job goes back as a fresh copy before any work
/// (counted `requeued`), so only the ledger's attempt count, which counts the starts,
/// ever gives up on a chunk.
pub async fn handle_delivery(ctx: &WorkerContext, body: &[u8], returned: u32) -> Disposition {
    if returned >= ctx.renew_at.load(std::sync::atomic::Ordering::Relaxed)
        && let Ok(message) = WorkerMessage::parse(body)
    {
        ctx.telemetry.emit(Event::ChunkRequeued {
            entity: message.chunk().entity,
            cause: Requeue::Renewed { returned },
            seconds: 0.0,
        });
        return Disposition::Republish;
    }
    // Received, not started: a death here returns the job without counting an attempt.
    fail::fail_point!("worker::received");
    handle_message(ctx, body).await
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
    // Dead-lettered, with its records settled as failed (`settled`) or left unsettled.
    let dead_letter = |code: Option<&str>, reason: String, settled: bool| {
        ctx.telemetry.emit(Event::ChunkDeadLettered {
            entity,
            code,
            reason: &reason,
            settled,
            seconds: seconds(),
        });
        Disposition::DeadLetter(reason)
    };
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
        Ok(ChunkOutcome::GaveUp { reason }) => dead_letter(Some(CHUNK_GAVE_UP), reason, true),
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
        Err(ChunkError::Unknown(what)) => dead_letter(
            None,
            format!("chunk job names no chunk of the ledger: {what}"),
            false,
        ),
        Err(ChunkError::Permanent { code, reason }) => {
            match fail_chunk(ctx, job, code, &reason).await {
                Ok(()) => dead_letter(Some(code), format!("{code}: {reason}"), true),
                Err(e) if e.failure() == Failure::Permanent => {
                    // Settling it as failed cannot succeed either: requeued, it would
                    // come back forever. Its sync stays unfinished (stalled) until an
                    // operator abandons it.
                    dead_letter(
                        Some(code),
                        format!("{code}: {reason}; not settled: {e}"),
                        false,
                    )
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
                dead_letter(None, format!("the ledger refuses this chunk: {e}"), false)
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
}
