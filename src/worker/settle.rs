//! The API's answer settled: the settle transaction tried again while it fails
//! transiently (the answer kept: nothing is sent again), then, if it still fails, the
//! answer sent back to the queue as a settle job.

use super::{ChunkError, ChunkOutcome, WorkerContext};
use crate::domain::{ChunkAnswer, ChunkJob, FailedRecord, SettleJob};
use crate::failure::Failure;
use crate::ledger;
use crate::ledger::settle::{ChunkResult, Settled};
use crate::telemetry::Event;
use std::time::Duration;

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
pub(super) async fn settle(
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
