//! One chunk job processed: its ledger row read (and its attempt counted), its rows
//! loaded and transformed (unreadable ones failed one by one), one batch POSTed, and the
//! answer settled ([`super::settle`]).

use super::settle::settle;
use super::{
    CHUNK_GAVE_UP, ChunkError, ChunkOutcome, RECORD_UNREADABLE, SOURCE_ROW_MISSING, WorkerContext,
};
use crate::domain::{ChunkAnswer, ChunkJob, FailedRecord, SettleJob};
use crate::failure::Failure;
use crate::ledger;
use crate::ledger::plan::Attempt;
use crate::sink::{Batch, FatalError};
use crate::source;
use crate::telemetry::Event;

/// True for source errors that a new attempt cannot cure ([`Failure::Permanent`]):
/// decoding or type errors, data exceptions.
pub fn is_permanent(e: &sqlx::Error) -> bool {
    Failure::of_sqlx(e) == Failure::Permanent
}

/// The message of a caught panic.
pub(super) fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
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
    let mut acked_at = unix_now();
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
                acked_at = unix_now();
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
    // Each accepted record's lag, from the change that selected it to the API's answer;
    // observed once the settle commits (a settle deferred to a settle job observes none).
    let lags = record_lags(&loaded, &answer.succeeded, acked_at);
    let outcome = settle(ctx, job, &state, answer).await?;
    if matches!(outcome, ChunkOutcome::Settled { .. }) && !lags.is_empty() {
        ctx.telemetry.emit(Event::RecordsAcknowledged {
            entity: job.entity,
            lags: &lags,
        });
    }
    Ok(outcome)
}

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Seconds from each accepted record's change time (loaded with it) to `acked_at` (Unix
/// seconds): never negative (a clock ahead of the database's is no lag); records with no
/// change time (officers) have none.
fn record_lags(loaded: &source::LoadedChunk, accepted: &[i64], acked_at: f64) -> Vec<f64> {
    accepted
        .iter()
        .filter_map(|&id| loaded.changed_at_of(id))
        .filter(|t| t.is_finite())
        .map(|t| (acked_at - t).max(0.0))
        .collect()
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
