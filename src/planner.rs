//! Plan one sync: claim the active-sync slot, enumerate each entity's ids in its window,
//! write the chunk ledger and the totals in one transaction, then publish one chunk job
//! per chunk (confirmed). Only after that may the planning message be acked.

use crate::config::Settings;
use crate::domain::{EntityKind, PlanRequest, SyncType, SyncWindow};
use crate::ledger::{self, Begin, FinalStatus, PlanTotals, Purpose};
use crate::queue::amqp::Broker;
use crate::queue::{ChunkPublisher, Disposition};
use crate::source;
use crate::telemetry::METRICS;
use chrono::{DateTime, Utc};
use sqlx::PgPool;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// What planning a message did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PlanOutcome {
    /// A sync was planned and its chunks published. `finished` is set when there was
    /// nothing to send and the sync completed at once.
    Planned {
        sync_id: String,
        totals: PlanTotals,
        finished: Option<FinalStatus>,
    },
    /// The request id was seen before; its chunks were (re)published if still unsettled.
    Duplicate { sync_id: String, republished: usize },
    /// Another sync is planning or running; nothing was planned.
    Busy { active_sync_id: String },
}

/// Plans the sync `req` asks for and publishes its chunks through `publisher`.
pub async fn plan_sync(
    pool: &PgPool,
    settings: &Settings,
    req: &PlanRequest,
    publisher: &dyn ChunkPublisher,
) -> anyhow::Result<PlanOutcome> {
    plan(
        pool,
        settings,
        req.sync_type,
        &req.entity_set(),
        req.request_id.as_deref(),
        Purpose::Sync,
        publisher,
    )
    .await
}

/// Plans a retry of the unresolved error rows of `entities` (all four when empty): a
/// new sync that re-delivers those records and moves no watermark (SPEC.md section 3).
pub async fn plan_retry(
    pool: &PgPool,
    settings: &Settings,
    entities: &[EntityKind],
    publisher: &dyn ChunkPublisher,
) -> anyhow::Result<PlanOutcome> {
    let entities = if entities.is_empty() {
        EntityKind::ALL.to_vec()
    } else {
        EntityKind::ALL
            .into_iter()
            .filter(|e| entities.contains(e))
            .collect()
    };
    plan(
        pool,
        settings,
        SyncType::Incremental,
        &entities,
        None,
        Purpose::Retry,
        publisher,
    )
    .await
}

async fn plan(
    pool: &PgPool,
    settings: &Settings,
    sync_type: SyncType,
    entities: &[EntityKind],
    request_id: Option<&str>,
    purpose: Purpose,
    publisher: &dyn ChunkPublisher,
) -> anyhow::Result<PlanOutcome> {
    anyhow::ensure!(!entities.is_empty(), "the planning message names no entity");
    let begin = ledger::begin_sync(pool, sync_type, entities, request_id, purpose).await?;
    let (sync_id, window_hi) = match begin {
        Begin::Started { sync_id, window_hi } => (sync_id, window_hi),
        Begin::Replan { sync_id, window_hi } => {
            tracing::warn!(%sync_id, "planning again a sync whose planner stopped half-way");
            (sync_id, window_hi)
        }
        Begin::Duplicate { sync_id, running } => {
            METRICS
                .plans_skipped
                .with_label_values(&["duplicate"])
                .inc();
            // A planner that died after committing the plan but before every chunk was
            // published: publish the unsettled ones again (workers count a chunk once).
            let republished = if running {
                let jobs = ledger::unsettled_chunks(pool, &sync_id).await?;
                publisher.publish_chunks(&jobs).await?;
                jobs.len()
            } else {
                0
            };
            tracing::info!(%sync_id, republished, "repeated request_id: nothing new planned");
            return Ok(PlanOutcome::Duplicate {
                sync_id,
                republished,
            });
        }
        Begin::Busy { active_sync_id } => {
            METRICS.plans_skipped.with_label_values(&["busy"]).inc();
            tracing::warn!(%active_sync_id, "another sync is in progress: this planning message is not run");
            return Ok(PlanOutcome::Busy { active_sync_id });
        }
    };

    let (totals, finished) = write_ledger(
        pool, settings, &sync_id, sync_type, entities, purpose, window_hi,
    )
    .await?;
    for (entity, n) in &totals.records {
        METRICS
            .records_planned
            .with_label_values(&[entity.as_str()])
            .inc_by(*n as u64);
    }
    if let Some(status) = finished {
        METRICS
            .syncs
            .with_label_values(&[sync_type.as_str(), status.as_str()])
            .inc();
    }
    let jobs = ledger::unsettled_chunks(pool, &sync_id).await?;
    publisher.publish_chunks(&jobs).await?;
    tracing::info!(%sync_id, %sync_type, purpose = purpose.as_str(), chunks = jobs.len(), records = ?totals.records, "sync planned");
    Ok(PlanOutcome::Planned {
        sync_id,
        totals,
        finished,
    })
}

/// The window of one entity: from its watermark (less the overlap) to `hi`.
fn window_for(
    settings: &Settings,
    sync_type: SyncType,
    watermark: Option<DateTime<Utc>>,
    hi: DateTime<Utc>,
) -> SyncWindow {
    match sync_type {
        SyncType::Full => SyncWindow { lo: None, hi },
        SyncType::Incremental => {
            let from = watermark.unwrap_or(hi - settings.default_lookback);
            SyncWindow {
                lo: Some(from - settings.incremental_overlap),
                hi,
            }
        }
    }
}

async fn write_ledger(
    pool: &PgPool,
    settings: &Settings,
    sync_id: &str,
    sync_type: SyncType,
    entities: &[EntityKind],
    purpose: Purpose,
    hi: DateTime<Utc>,
) -> anyhow::Result<(PlanTotals, Option<FinalStatus>)> {
    let mut tx = pool.begin().await?;
    ledger::clear_plan(&mut tx, sync_id).await?;
    let mut totals = PlanTotals::default();
    let mut earliest_lo: Option<DateTime<Utc>> = None;
    for &entity in entities {
        let window = match purpose {
            Purpose::Sync => {
                let watermark = ledger::watermark(&mut tx, entity).await?;
                window_for(settings, sync_type, watermark, hi)
            }
            Purpose::Retry => SyncWindow { lo: None, hi },
        };
        if let Some(lo) = window.lo {
            earliest_lo = Some(earliest_lo.map_or(lo, |e| e.min(lo)));
        }
        let size = i64::from(settings.chunk_sizes.for_entity(entity));
        let (mut after, mut seq, mut planned) = (0i64, 0i32, 0i64);
        loop {
            // Keyset pagination: one page is one chunk; memory never grows with the table.
            let ids = match purpose {
                Purpose::Sync => {
                    source::next_ids(&mut tx, entity, sync_type, &window, after, size).await?
                }
                Purpose::Retry => ledger::next_unresolved_ids(&mut tx, entity, after, size).await?,
            };
            let Some(&last) = ids.last() else { break };
            ledger::insert_chunk(&mut tx, sync_id, entity, seq, &ids).await?;
            planned += ids.len() as i64;
            seq += 1;
            after = last;
            if (ids.len() as i64) < size {
                break;
            }
        }
        ledger::insert_sync_entity(&mut tx, sync_id, entity, &window, planned).await?;
        totals.records.push((entity, planned));
        totals.chunks += i64::from(seq);
    }
    let finished = ledger::write_plan(&mut tx, sync_id, &totals, earliest_lo, hi).await?;
    tx.commit().await?;
    Ok((totals, finished))
}

/// Parses a planning message body; `Err` carries a reason fit for the dead-letter header.
pub fn parse_plan(body: &[u8]) -> Result<PlanRequest, String> {
    serde_json::from_slice::<PlanRequest>(body)
        .map_err(|e| format!("invalid planning message: {e}"))
        .and_then(|r| {
            if r.entities.as_ref().is_some_and(|e| e.is_empty()) {
                Err("invalid planning message: `entities` is empty".to_string())
            } else {
                Ok(r)
            }
        })
}

/// Re-publishes the unsettled chunks of a stalled sync from the ledger.
pub async fn resume(
    pool: &PgPool,
    sync_id: &str,
    publisher: &dyn ChunkPublisher,
) -> anyhow::Result<usize> {
    let jobs = ledger::unsettled_chunks(pool, sync_id).await?;
    publisher.publish_chunks(&jobs).await?;
    Ok(jobs.len())
}

/// Consumes `<prefix>.plan` one message at a time until `shutdown` resolves. Each message
/// is acked only after its sync is planned and its chunks are published (confirmed);
/// one that cannot be parsed is dead-lettered with the reason; a transient failure
/// (database down) sends it back to the queue.
pub async fn run_amqp(
    pool: PgPool,
    settings: Arc<Settings>,
    broker: Broker,
    consuming: Arc<AtomicBool>,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let queue = broker.topology.plan.clone();
    let tag = format!("loansync-planner-{}", uuid::Uuid::new_v4().simple());
    let mut consumer = broker.consume(&queue, 1, &tag).await?;
    consuming.store(true, Ordering::SeqCst);
    tracing::info!(%queue, "planner consuming");
    tokio::pin!(shutdown);
    let result = loop {
        let delivery = tokio::select! {
            _ = &mut shutdown => break Ok(()),
            next = consumer.next() => match next {
                Some(Ok(d)) => d,
                Some(Err(e)) => break Err(e.context("planning consumer failed")),
                None => break Err(anyhow::anyhow!("the broker cancelled the planning consumer")),
            },
        };
        let disposition = match parse_plan(delivery.body()) {
            Err(reason) => {
                METRICS.plans_skipped.with_label_values(&["invalid"]).inc();
                tracing::error!(%reason, "dead-lettering a planning message");
                Disposition::DeadLetter(reason)
            }
            Ok(req) => match crate::db::through_outage(
                &pool,
                settings.db_outage_wait,
                "the planning message",
                || plan_sync(&pool, &settings, &req, &broker),
            )
            .await
            {
                Ok(_) => Disposition::Ack,
                Err(e) => {
                    tracing::error!(error = %format!("{e:#}"), "planning failed: the message goes back to the queue");
                    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                    // Unreachable PostgreSQL: put back without spending a delivery.
                    if crate::db::is_reachable(&pool).await {
                        Disposition::Requeue
                    } else {
                        Disposition::Republish
                    }
                }
            },
        };
        if let Err(e) = delivery.settle(&broker, &queue, disposition).await {
            tracing::warn!(error = %format!("{e:#}"), "could not settle a planning message");
        }
    };
    consuming.store(false, Ordering::SeqCst);
    consumer.close().await;
    broker.close().await;
    result
}
