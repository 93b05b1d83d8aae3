//! Plan one sync: claim the active-sync slot, enumerate each entity's ids in its window,
//! write the chunk ledger (the entities side by side) and then the totals, then publish
//! one chunk job per chunk (confirmed). Only after that may the planning message be acked.

use crate::config::Settings;
use crate::domain::{EntityKind, PlanRequest, SyncType, SyncWindow};
use crate::failure::{Classified, Failure};
use crate::ledger::{self, Begin, FinalStatus, PlanTotals, Purpose};
use crate::queue::amqp::Broker;
use crate::queue::{ChunkPublisher, Consumer, Disposition};
use crate::source;
use crate::telemetry::{Event, Telemetry};
use chrono::{DateTime, Utc};
use futures::{StreamExt, TryStreamExt};
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
    /// Another sync is planning or running; nothing was planned (single-process mode).
    Busy { active_sync_id: String },
    /// Another sync is running: the request is kept and planned when the slot frees
    /// (the planner's messages). `again`: it was pending already.
    Pending { request_id: String, again: bool },
}

/// What a planning request asks for.
pub fn spec_of(req: &PlanRequest) -> ledger::SyncSpec {
    let backfill = req.since.is_some();
    ledger::SyncSpec {
        sync_type: if backfill || req.sweep {
            SyncType::Incremental
        } else {
            req.sync_type
        },
        entities: req.entity_set(),
        purpose: if req.sweep {
            Purpose::Sweep
        } else if backfill {
            Purpose::Backfill
        } else {
            Purpose::Sync
        },
        since: req.since,
        until: req.until,
    }
}

/// Plans the sync `req` asks for and publishes its chunks through `publisher`; another
/// sync in progress makes it [`PlanOutcome::Busy`] (single-process mode).
pub async fn plan_sync(
    pool: &PgPool,
    settings: &Settings,
    req: &PlanRequest,
    publisher: &dyn ChunkPublisher,
) -> anyhow::Result<PlanOutcome> {
    plan(
        pool,
        settings,
        &spec_of(req),
        req.request_id.as_deref(),
        false,
        publisher,
    )
    .await
}

/// Plans a planning message from the queue: as [`plan_sync`], except that a request that
/// finds another sync running is kept, durably, and planned when the slot frees
/// ([`plan_pending`]). A request without an id gets one (`anonymous-<uuid>`, a prefix
/// that marks it as such), so that it can be kept and followed.
pub async fn plan_message(
    pool: &PgPool,
    settings: &Settings,
    req: &PlanRequest,
    publisher: &dyn ChunkPublisher,
) -> anyhow::Result<PlanOutcome> {
    let request_id = req
        .request_id
        .clone()
        .unwrap_or_else(|| format!("anonymous-{}", uuid::Uuid::new_v4()));
    plan(
        pool,
        settings,
        &spec_of(req),
        Some(&request_id),
        true,
        publisher,
    )
    .await
}

/// Plans the pending requests once the slot is free (coalesced, see
/// [`ledger::begin_pending`]). `None` when there is nothing to plan now.
pub async fn plan_pending(
    pool: &PgPool,
    settings: &Settings,
    publisher: &dyn ChunkPublisher,
) -> anyhow::Result<Option<PlanOutcome>> {
    if !ledger::pending_ready(pool).await? {
        return Ok(None);
    }
    let mut lock = ledger::PlanningLock::acquire(pool).await?;
    lock.verify(pool).await?;
    let outcome = async {
        let Some((spec, served, begin)) = ledger::begin_pending(pool, &lock).await? else {
            return Ok(None);
        };
        tracing::info!(requests = ?served, sync_type = %spec.sync_type, purpose = spec.purpose.as_str(), "planning pending requests");
        plan_claimed(pool, settings, &spec, begin, publisher)
            .await
            .map(Some)
    }
    .await;
    lock.release().await;
    outcome
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
    let spec = ledger::SyncSpec {
        sync_type: SyncType::Incremental,
        entities,
        purpose: Purpose::Retry,
        since: None,
        until: None,
    };
    plan(pool, settings, &spec, None, false, publisher).await
}

async fn plan(
    pool: &PgPool,
    settings: &Settings,
    spec: &ledger::SyncSpec,
    request_id: Option<&str>,
    queue_if_busy: bool,
    publisher: &dyn ChunkPublisher,
) -> anyhow::Result<PlanOutcome> {
    if spec.entities.is_empty() {
        return Err(Classified::permanent("the planning message names no entity").into());
    }
    // Held until the plan is committed and published: a planner that dies meanwhile
    // releases it with its session, and the next one takes its claim over.
    let mut lock = ledger::PlanningLock::acquire(pool).await?;
    // Never behind a transaction pooler: the lock would not be this session's.
    lock.verify(pool).await?;
    // A running sync whose last settler died before finalizing it would hold the slot
    // for nothing: finalized first.
    finalize_settled(pool, &settings.telemetry).await;
    let outcome = async {
        let begin = ledger::begin_sync(pool, &lock, spec, request_id, queue_if_busy).await?;
        plan_claimed(pool, settings, spec, begin, publisher).await
    }
    .await;
    lock.release().await;
    outcome
}

/// Everything after the claim: the ledger, the totals, the chunk jobs.
async fn plan_claimed(
    pool: &PgPool,
    settings: &Settings,
    spec: &ledger::SyncSpec,
    begin: Begin,
    publisher: &dyn ChunkPublisher,
) -> anyhow::Result<PlanOutcome> {
    let (sync_type, purpose) = (spec.sync_type, spec.purpose);
    let (sync_id, window_hi) = match begin {
        Begin::Started { sync_id, window_hi } => (sync_id, window_hi),
        Begin::Replan { sync_id, window_hi } => {
            tracing::warn!(%sync_id, "planning again a sync whose planner stopped half-way");
            (sync_id, window_hi)
        }
        Begin::Duplicate { sync_id, running } => {
            // A planner that died after committing the plan but before every chunk was
            // published: publish the unsettled ones again (workers count a chunk once).
            let republished = if running {
                publish_unsettled(pool, &sync_id, publisher).await?
            } else {
                0
            };
            settings.telemetry.emit(Event::PlanDuplicate {
                sync_id: &sync_id,
                republished,
            });
            return Ok(PlanOutcome::Duplicate {
                sync_id,
                republished,
            });
        }
        Begin::Busy { active_sync_id } => {
            settings.telemetry.emit(Event::PlanBusy {
                active_sync_id: &active_sync_id,
            });
            return Ok(PlanOutcome::Busy { active_sync_id });
        }
        Begin::Pending { request_id, again } => {
            settings.telemetry.emit(Event::PlanPending {
                request_id: &request_id,
                again,
            });
            return Ok(PlanOutcome::Pending { request_id, again });
        }
        Begin::Unbounded(why) => return Err(why.into()),
    };
    let started = std::time::Instant::now();
    let (totals, finished) = write_ledger(pool, settings, &sync_id, spec, window_hi).await?;
    let ledger_ms = started.elapsed().as_millis() as u64;
    for &(entity, n) in &totals.records {
        settings.telemetry.emit(Event::RecordsPlanned {
            entity,
            records: n as u64,
        });
    }
    if let Some(status) = finished {
        settings
            .telemetry
            .emit(Event::SyncFinishedAtPlanning { sync_type, status });
    }
    let chunks = publish_unsettled(pool, &sync_id, publisher).await?;
    let publish_ms = started.elapsed().as_millis() as u64 - ledger_ms;
    tracing::info!(%sync_id, %sync_type, purpose = purpose.as_str(), chunks, records = ?totals.records, ledger_ms, publish_ms, "sync planned");
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
            // Checked: out-of-range settings are refused at start-up, but a date that
            // cannot be computed must never panic. Year 1 is before any row anyway.
            let year_one = DateTime::<Utc>::from_timestamp(-62_135_596_800, 0).unwrap_or(hi);
            let from = watermark.unwrap_or_else(|| {
                hi.checked_sub_signed(settings.default_lookback)
                    .unwrap_or(year_one)
            });
            SyncWindow {
                lo: Some(
                    from.checked_sub_signed(settings.incremental_overlap)
                        .unwrap_or(year_one),
                ),
                hi,
            }
        }
    }
}

/// Writes the plan: what a dead planner left is cleared (one transaction); each
/// entity's chunks are written in parts ([`parts_of`]: a large full selection in
/// several id ranges, anything else whole), each part in a transaction of its own, the
/// parts side by side on the pool's connections ([`PLAN_PARALLELISM`] at most, the
/// largest first); and the entities' windows and totals with the move to `running`
/// last, in a transaction that checks the sync is still `planning`. Workers see no chunk
/// before that last commit (the jobs are published after it). A planner that dies
/// half-way leaves the sync `planning` with part of its chunks: the next planner takes
/// the sync over ([`Begin::Replan`]) and clears them first. A sweep is planned in one
/// transaction, entity after entity ([`plan_sweep`]).
async fn write_ledger(
    pool: &PgPool,
    settings: &Settings,
    sync_id: &str,
    spec: &ledger::SyncSpec,
    hi: DateTime<Utc>,
) -> anyhow::Result<(PlanTotals, Option<FinalStatus>)> {
    let mut tx = pool.begin().await?;
    anyhow::ensure!(
        ledger::clear_plan(&mut tx, sync_id).await?,
        "sync {sync_id} is no longer planning: its plan is another planner's"
    );
    let mut planned = Vec::with_capacity(spec.entities.len());
    let mut tx = if spec.purpose == Purpose::Sweep {
        for &entity in &spec.entities {
            let window = window_of(&mut tx, settings, spec, entity, hi).await?;
            let size = i64::from(settings.chunk_sizes.for_entity(entity));
            let (records, chunks) = plan_sweep(&mut tx, sync_id, entity, &window, size).await?;
            planned.push(EntityPlan {
                entity,
                records,
                chunks,
                window,
            });
        }
        tx
    } else {
        let parallelism = plan_parallelism(pool);
        let mut parts = Vec::new();
        for &entity in &spec.entities {
            let window = window_of(&mut tx, settings, spec, entity, hi).await?;
            for (part, chunks) in parts_of(&mut tx, settings, spec, entity, parallelism).await? {
                parts.push((entity, window, part, chunks));
            }
            planned.push(EntityPlan {
                entity,
                records: 0,
                chunks: 0,
                window,
            });
        }
        tx.commit().await?;
        // The largest parts first, so that the last to finish is a small one.
        parts.sort_by_key(|&(_, _, _, chunks)| std::cmp::Reverse(chunks));
        let written: Vec<(EntityKind, i32, i64)> = futures::stream::iter(parts)
            .map(|(entity, window, part, _)| async move {
                let mut tx = pool.begin().await?;
                anyhow::ensure!(
                    ledger::share_planning(&mut tx, sync_id).await?,
                    "sync {sync_id} is no longer planning: its plan is another planner's"
                );
                let size = i64::from(settings.chunk_sizes.for_entity(entity));
                let (page_sql, windowed) = match spec.purpose {
                    Purpose::Retry => (ledger::UNRESOLVED_PAGE_SQL, false),
                    _ => source::ids_sql(entity, spec.sync_type),
                };
                // A window's or a retry's selection is read once a statement; a full
                // selection walks its id index page after page.
                let paging = if windowed || spec.purpose == Purpose::Retry {
                    ledger::Paging::OnePass
                } else {
                    ledger::Paging::Keyset
                };
                let (chunks, records) = ledger::insert_chunks(
                    &mut tx, sync_id, entity, page_sql, size, &window, windowed, paging, part,
                )
                .await?;
                tx.commit().await?;
                anyhow::Ok((entity, chunks, records))
            })
            .buffer_unordered(parallelism)
            .try_collect()
            .await?;
        for (entity, chunks, records) in written {
            if let Some(p) = planned.iter_mut().find(|p| p.entity == entity) {
                p.chunks += chunks;
                p.records += records;
            }
        }
        pool.begin().await?
    };
    anyhow::ensure!(
        ledger::lock_planning(&mut tx, sync_id).await?,
        "sync {sync_id} is no longer planning: its plan is another planner's"
    );
    let mut totals = PlanTotals::default();
    for p in &planned {
        ledger::insert_sync_entity(&mut tx, sync_id, p.entity, &p.window, p.records).await?;
        totals.records.push((p.entity, p.records));
        totals.chunks += i64::from(p.chunks);
    }
    let earliest_lo = planned.iter().filter_map(|p| p.window.lo).min();
    let finished = ledger::write_plan(&mut tx, sync_id, &totals, earliest_lo, hi).await?;
    tx.commit().await?;
    Ok((totals, finished))
}

/// How many parts a planner writes side by side: each takes a connection of the pool,
/// which also holds the planning lock's; one is left over for the rest.
const PLAN_PARALLELISM: usize = 4;

fn plan_parallelism(pool: &PgPool) -> usize {
    let free = (pool.options().get_max_connections() as usize).saturating_sub(2);
    free.clamp(1, PLAN_PARALLELISM)
}

/// About how many chunks a part of a full selection holds at least: a part is a few
/// statements of [`ledger::insert_chunks`]. Debug builds (every test) take 4, so that
/// the tests' small full syncs are written in parts too.
const CHUNKS_PER_PART: i64 = if cfg!(debug_assertions) { 4 } else { 1_000 };

/// At most how many parts one entity is written in. Measured on this 2-core machine
/// (dataset M's 5,000 repayment chunks, the statements alone): one writer 0.67-0.84 s,
/// two 0.42-0.44 s, four 0.67-0.69 s (they contend for the cores and the WAL).
const MAX_PARTS: usize = 2;

/// The parts one entity's chunks are written in, each with about how many chunks it
/// holds (the order they are written in: the largest first). A full sync's selection is
/// the whole table (less a flag or two): its id range is split into parts of about
/// equal width, as many as the table's id span holds [`CHUNKS_PER_PART`] chunks, up to
/// [`MAX_PARTS`] and `parallelism`. On dataset M the repayments' 5,000 chunks were one
/// writer's 0.55 s, most of the ledger's time. Any other selection (a window, a retry's
/// error rows) is small or has no known span: it is written whole, counted as none.
async fn parts_of(
    conn: &mut sqlx::PgConnection,
    settings: &Settings,
    spec: &ledger::SyncSpec,
    entity: EntityKind,
    parallelism: usize,
) -> anyhow::Result<Vec<(ledger::Part, i64)>> {
    if spec.purpose != Purpose::Sync || spec.sync_type != SyncType::Full {
        return Ok(vec![(ledger::Part::WHOLE, 0)]);
    }
    let Some((min, max)) = source::id_span(conn, entity).await? else {
        return Ok(vec![(ledger::Part::WHOLE, 0)]);
    };
    let size = i128::from(settings.chunk_sizes.for_entity(entity).max(1));
    let chunks = (i128::from(max) - i128::from(min) + 1) / size;
    let parts = (chunks / i128::from(CHUNKS_PER_PART)).clamp(1, parallelism.min(MAX_PARTS) as i128);
    Ok(ledger::Part::split(min, max, parts as i32)
        .into_iter()
        .map(|p| {
            // The part's ids within the span: the last part's bound is open.
            let (lo, hi) = (
                i128::from(p.after.max(min.saturating_sub(1))),
                i128::from(p.upto.min(max)),
            );
            (
                p,
                i64::try_from((hi - lo).max(0) / size).unwrap_or(i64::MAX),
            )
        })
        .collect())
}

/// One entity's part of a plan.
struct EntityPlan {
    entity: EntityKind,
    records: i64,
    chunks: i32,
    window: SyncWindow,
}

/// One entity's window: for a regular sync from its watermark ([`window_for`]); a retry
/// or a sweep has no lower bound, a backfill starts at its `since`.
async fn window_of(
    conn: &mut sqlx::PgConnection,
    settings: &Settings,
    spec: &ledger::SyncSpec,
    entity: EntityKind,
    hi: DateTime<Utc>,
) -> anyhow::Result<SyncWindow> {
    Ok(match spec.purpose {
        Purpose::Sync => {
            let watermark = ledger::watermark(&mut *conn, entity).await?;
            window_for(settings, spec.sync_type, watermark, hi)
        }
        Purpose::Retry | Purpose::Sweep => SyncWindow { lo: None, hi },
        Purpose::Backfill => SyncWindow { lo: spec.since, hi },
    })
}

/// How many ids of the source a sweep compares per statement: a keyset page of the full
/// sync's selection (memory stays bounded whatever the table's size).
const SWEEP_PAGE: i64 = 20_000;

/// Plans one entity of a sweep, in the planning transaction: pages through the full
/// sync's selection, plans chunks (of the usual size) of the ids whose fingerprint
/// differs from the delivered one or that were never delivered, and records the
/// delivered ids that are gone. Returns the records and chunks planned.
async fn plan_sweep(
    tx: &mut sqlx::PgConnection,
    sync_id: &str,
    entity: EntityKind,
    window: &SyncWindow,
    size: i64,
) -> anyhow::Result<(i64, i32)> {
    let size = usize::try_from(size.max(1))?;
    // Each page's statement costs enough for PostgreSQL to JIT-compile it, page after
    // page: the compilation costs more than it saves (about 8 % of a loan page, 20 % of
    // a repayment page on dataset M). For this transaction only.
    sqlx::query("SET LOCAL jit = off").execute(&mut *tx).await?;
    let (mut after, mut seq, mut planned, mut gone) = (0i64, 0i32, 0i64, 0u64);
    let mut pending: Vec<i64> = Vec::with_capacity(size);
    loop {
        let page = source::sweep_page(&mut *tx, entity, window, after, SWEEP_PAGE).await?;
        gone += ledger::record_deleted(&mut *tx, sync_id, entity, &page.gone).await?;
        send_deletes(entity, &page.gone);
        for id in page.changed {
            pending.push(id);
            if pending.len() == size {
                ledger::insert_chunk(&mut *tx, sync_id, entity, seq, &pending).await?;
                planned += pending.len() as i64;
                seq += 1;
                pending.clear();
            }
        }
        match page.last {
            Some(last) => after = last,
            None => break,
        }
    }
    if !pending.is_empty() {
        ledger::insert_chunk(&mut *tx, sync_id, entity, seq, &pending).await?;
        planned += pending.len() as i64;
        seq += 1;
    }
    tracing::info!(%sync_id, %entity, changed = planned, deleted = gone, "swept");
    Ok((planned, seq))
}

/// Where deleted records would be sent to the analytics platform. The API's contract
/// (SPEC.md section 4) has no delete: nothing is sent, and the ids a sweep finds gone
/// are only recorded (`loansync_deleted`, `loansync deletes list`, the
/// `etl_deleted_records` gauge) for someone to act on. Returns how many were sent: none.
/// Once the contract has a delete, this is the one step to change.
fn send_deletes(entity: EntityKind, ids: &[i64]) -> usize {
    if !ids.is_empty() {
        tracing::info!(%entity, deleted = ids.len(), "deleted records found: not sent (the analytics API has no delete)");
    }
    0
}

/// Parses a planning message body; `Err` carries a reason fit for the dead-letter header.
pub fn parse_plan(body: &[u8]) -> Result<PlanRequest, String> {
    serde_json::from_slice::<PlanRequest>(body)
        .map_err(|e| format!("invalid planning message: {e}"))
        .and_then(|r| {
            if r.entities.as_ref().is_some_and(|e| e.is_empty()) {
                Err("invalid planning message: `entities` is empty".to_string())
            } else if r.until.is_some() && r.since.is_none() {
                Err("invalid planning message: `until` without `since`".to_string())
            } else if r.since.is_some() && r.sync_type == SyncType::Full {
                Err(
                    "invalid planning message: a backfill (`since`) is incremental, not full"
                        .to_string(),
                )
            } else if r.sweep && r.sync_type == SyncType::Full {
                Err("invalid planning message: a sweep is incremental, not full".to_string())
            } else if r.sweep && r.since.is_some() {
                Err(
                    "invalid planning message: a sweep compares every record, it takes no `since`"
                        .to_string(),
                )
            } else if let (Some(since), Some(until)) = (r.since, r.until)
                && since >= until
            {
                Err("invalid planning message: `since` is not before `until`".to_string())
            } else {
                Ok(r)
            }
        })
}

/// How often a long-running planner samples the xid clock (the precision of the window
/// cap), finalizes the running syncs whose chunks are all settled and rolls up the
/// others' counters ([`finalize_settled`]) and, every [`PRUNE_EVERY_TICKS`] ticks,
/// prunes old chunk id lists.
const HOUSEKEEPING_EVERY: std::time::Duration = std::time::Duration::from_secs(10);
const PRUNE_EVERY_TICKS: u64 = 360;
/// How often a long-running planner looks for pending requests to plan once the slot is
/// free (a cheap read; the planning lock is taken only when there is work).
const PENDING_EVERY: std::time::Duration = std::time::Duration::from_secs(2);

/// One housekeeping tick; failures are logged and tried again at the next tick.
pub async fn housekeep(pool: &PgPool, settings: &Settings, tick: u64) {
    if let Err(e) = ledger::clock::sample_now(pool).await {
        tracing::debug!(error = %e, "could not sample the xid clock");
    }
    finalize_settled(pool, &settings.telemetry).await;
    if tick.is_multiple_of(PRUNE_EVERY_TICKS) {
        prune(pool, settings).await;
    }
}

/// Finalizes the running syncs whose chunks are all settled (their last settler died
/// between its commit and its finalize) and rolls up the others' history counters
/// ([`ledger::finalize_settled`]); failures are logged and tried again later.
pub async fn finalize_settled(pool: &PgPool, telemetry: &Telemetry) {
    match ledger::finalize_settled(pool).await {
        Ok(finalized) => {
            for f in finalized {
                telemetry.emit(Event::SyncFinished {
                    sync_type: f.sync_type,
                    status: f.status,
                    seconds: None,
                });
            }
        }
        Err(e) => tracing::warn!(error = %e, "could not finalize or roll up the running syncs"),
    }
}

/// Deletes the chunk id lists of syncs finished longer than `ETL_CHUNK_RETENTION_DAYS` ago.
pub async fn prune(pool: &PgPool, settings: &Settings) {
    match ledger::prune_chunks(pool, settings.chunk_retention).await {
        Ok(0) => {}
        Ok(n) => tracing::info!(chunks = n, "pruned the chunk ledger of old finished syncs"),
        Err(e) => tracing::warn!(error = %e, "could not prune the chunk ledger"),
    }
}

/// Plans what is pending if the slot is free; failures are logged and tried again at the
/// next tick (the requests stay pending in PostgreSQL).
async fn run_pending(pool: &PgPool, settings: &Settings, publisher: &dyn ChunkPublisher) {
    if let Err(e) = plan_pending(pool, settings, publisher).await {
        tracing::warn!(error = %format!("{e:#}"), "could not plan the pending requests; trying again shortly");
    }
}

/// Re-publishes the unsettled chunks of a stalled sync from the ledger.
pub async fn resume(
    pool: &PgPool,
    sync_id: &str,
    publisher: &dyn ChunkPublisher,
) -> anyhow::Result<usize> {
    match ledger::sync_state(pool, sync_id).await? {
        Some(ledger::SyncState::Running) => {}
        Some(ledger::SyncState::Planning) => anyhow::bail!(
            "sync {sync_id} never finished planning, so it has no chunks to resume. If its planner \
             is gone, the next sync abandons it by itself; `loansync abandon {sync_id}` ends it now"
        ),
        Some(ledger::SyncState::Done) => {
            anyhow::bail!("sync {sync_id} is finished: nothing to resume")
        }
        None => anyhow::bail!("no sync {sync_id}"),
    }
    let n = publish_unsettled(pool, sync_id, publisher).await?;
    if n == 0 {
        // Every chunk settled, the last settler gone before finalizing: finalize now.
        finalize_settled(pool, &Telemetry::global()).await;
    }
    Ok(n)
}

/// How many chunk jobs the planner reads from the ledger and publishes at a time.
const PUBLISH_PAGE: i64 = 1_000;

/// Publishes the unsettled chunks of a sync, in publishing order, a page of
/// [`PUBLISH_PAGE`] at a time (each page confirmed before the next is read): the planner
/// never holds every job of a sync. Returns how many were published.
async fn publish_unsettled(
    pool: &PgPool,
    sync_id: &str,
    publisher: &dyn ChunkPublisher,
) -> anyhow::Result<usize> {
    let (mut after, mut published) = (None, 0);
    loop {
        let (jobs, next) =
            ledger::unsettled_chunks_page(pool, sync_id, after.as_ref(), PUBLISH_PAGE).await?;
        publisher.publish_chunks(&jobs).await?;
        published += jobs.len();
        match next {
            Some(key) => after = Some(key),
            None => return Ok(published),
        }
    }
}

/// The planner loop: takes planning messages from `consumer` one at a time until
/// `shutdown` resolves, the consumer is lost (an error: the caller reconnects) or its
/// queue says the work is over. Each message is acked only after its sync is planned and
/// its chunks are published to `publisher` (confirmed); one that cannot be parsed is
/// dead-lettered with the reason; a transient failure (database down) sends it back to
/// the queue. Between messages it keeps house and plans pending requests.
pub async fn run(
    pool: &PgPool,
    settings: &Settings,
    consumer: &mut dyn Consumer,
    publisher: &dyn ChunkPublisher,
    consuming: &AtomicBool,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    consuming.store(true, Ordering::SeqCst);
    tokio::pin!(shutdown);
    let mut housekeeping = tokio::time::interval(HOUSEKEEPING_EVERY);
    housekeeping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut pending = tokio::time::interval(PENDING_EVERY);
    pending.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut ticks = 0u64;
    let result = loop {
        let delivery = tokio::select! {
            _ = &mut shutdown => break Ok(()),
            _ = housekeeping.tick() => {
                housekeep(pool, settings, ticks).await;
                ticks += 1;
                continue;
            }
            _ = pending.tick() => {
                run_pending(pool, settings, publisher).await;
                continue;
            }
            next = consumer.next() => match next {
                Some(Ok(d)) => d,
                Some(Err(e)) => break Err(e.context("planning consumer failed")),
                None => break Ok(()),
            },
        };
        let disposition = match parse_plan(delivery.body()) {
            Err(reason) => {
                settings
                    .telemetry
                    .emit(Event::PlanInvalid { reason: &reason });
                Disposition::DeadLetter(reason)
            }
            Ok(req) => match crate::db::through_outage(
                pool,
                settings.db_outage_wait,
                "the planning message",
                &settings.telemetry,
                || plan_message(pool, settings, &req, publisher),
            )
            .await
            {
                Ok(_) => Disposition::Ack,
                // Decided by the error's type: a request that can never be planned is
                // dead-lettered, a wrong installation stops the planner, anything else
                // is tried again.
                Err(e) if Failure::of(&e) == Failure::Permanent => {
                    let reason = format!("planning cannot succeed: {e:#}");
                    tracing::error!(%reason, "dead-lettering a planning message");
                    Disposition::DeadLetter(reason)
                }
                Err(e) if Failure::of(&e) == Failure::Fatal => {
                    tracing::error!(error = %format!("{e:#}"), "fatal: the installation must be fixed (credentials, privileges, migrations); the planner stops and the message goes back to the queue");
                    if let Err(e) = delivery.settle(Disposition::Republish).await {
                        tracing::warn!(error = %format!("{e:#}"), "could not settle a planning message");
                    }
                    break Err(e.context("fatal planning failure"));
                }
                Err(e) => {
                    tracing::error!(error = %format!("{e:#}"), "planning failed: the message goes back to the queue");
                    // Unreachable PostgreSQL: put back without spending a delivery.
                    if crate::db::is_reachable(pool).await {
                        Disposition::Requeue
                    } else {
                        Disposition::Republish
                    }
                }
            },
        };
        if let Err(e) = delivery.settle(disposition).await {
            tracing::warn!(error = %format!("{e:#}"), "could not settle a planning message");
        }
        run_pending(pool, settings, publisher).await;
    };
    consuming.store(false, Ordering::SeqCst);
    consumer.close().await;
    result
}

/// How long a planning message that failed transiently waits before it goes back.
pub const PLAN_REQUEUE_PAUSE: std::time::Duration = std::time::Duration::from_secs(1);

/// [`run`] over `<prefix>.plan` on `broker`, publishing chunks on the same connection;
/// closes the connection when it ends.
pub async fn run_amqp(
    pool: PgPool,
    settings: Arc<Settings>,
    broker: Broker,
    consuming: Arc<AtomicBool>,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let queue = broker.topology.plan.clone();
    let tag = format!("loansync-planner-{}", uuid::Uuid::new_v4().simple());
    let mut consumer = broker.consumer(&queue, 1, &tag, PLAN_REQUEUE_PAUSE).await?;
    tracing::info!(%queue, "planner consuming");
    let result = run(
        &pool,
        &settings,
        &mut consumer,
        &broker,
        &consuming,
        shutdown,
    )
    .await;
    broker.close().await;
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn settings(pairs: &[(&str, &str)]) -> Settings {
        let m: std::collections::HashMap<&str, &str> = pairs.iter().copied().collect();
        Settings::from_lookup(|k| m.get(k).map(|v| v.to_string())).expect("settings")
    }

    fn at(y: i32, mo: u32, d: u32, h: u32, mi: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(y, mo, d, h, mi, 0).unwrap()
    }

    #[test]
    fn a_full_window_has_no_start_whatever_the_watermark() {
        let s = settings(&[]);
        let hi = at(2024, 5, 1, 12, 0);
        for wm in [None, Some(at(2024, 4, 30, 0, 0))] {
            let w = window_for(&s, SyncType::Full, wm, hi);
            assert_eq!(w, SyncWindow { lo: None, hi });
        }
    }

    #[test]
    fn an_incremental_window_starts_at_the_watermark_less_the_overlap() {
        let s = settings(&[("ETL_INCREMENTAL_OVERLAP_SECS", "120")]);
        assert_eq!(s.incremental_overlap, chrono::Duration::seconds(120));
        let hi = at(2024, 5, 1, 12, 0);
        let w = window_for(&s, SyncType::Incremental, Some(at(2024, 5, 1, 10, 0)), hi);
        assert_eq!(
            w,
            SyncWindow {
                lo: Some(at(2024, 5, 1, 9, 58)),
                hi
            }
        );
    }

    #[test]
    fn without_a_watermark_an_incremental_window_looks_back_the_default() {
        let s = settings(&[
            ("ETL_DEFAULT_LOOKBACK_DAYS", "30"),
            ("ETL_INCREMENTAL_OVERLAP_SECS", "0"),
        ]);
        let hi = at(2024, 5, 31, 12, 0);
        let w = window_for(&s, SyncType::Incremental, None, hi);
        assert_eq!(w.lo, Some(at(2024, 5, 1, 12, 0)));
        assert_eq!(w.hi, hi);
    }

    #[test]
    fn a_window_that_cannot_be_computed_starts_at_year_one_never_panics() {
        let year_one = at(1, 1, 1, 0, 0);
        // The lookback from the earliest date there is cannot be computed.
        let s = settings(&[
            ("ETL_DEFAULT_LOOKBACK_DAYS", "30"),
            ("ETL_INCREMENTAL_OVERLAP_SECS", "0"),
        ]);
        let w = window_for(&s, SyncType::Incremental, None, DateTime::<Utc>::MIN_UTC);
        assert_eq!(w.lo, Some(year_one));
        // Nor can the overlap before the earliest watermark there is.
        let s = settings(&[("ETL_INCREMENTAL_OVERLAP_SECS", "120")]);
        let hi = at(2024, 1, 1, 0, 0);
        let w = window_for(
            &s,
            SyncType::Incremental,
            Some(DateTime::<Utc>::MIN_UTC),
            hi,
        );
        assert_eq!(
            w,
            SyncWindow {
                lo: Some(year_one),
                hi
            }
        );
    }

    #[test]
    fn a_planning_message_parses_with_its_optional_fields() {
        let r = parse_plan(br#"{"sync_type":"full"}"#).unwrap();
        assert_eq!(r.sync_type, SyncType::Full);
        assert_eq!(
            (r.entities, r.request_id, r.since, r.sweep),
            (None, None, None, false)
        );
        let r = parse_plan(
            br#"{"sync_type":"incremental","entities":["loan","officer"],"request_id":"r1",
                 "since":"2024-01-01T00:00:00Z","until":"2024-02-01T00:00:00Z"}"#,
        )
        .unwrap();
        assert_eq!(
            r.entities,
            Some(vec![EntityKind::Loan, EntityKind::Officer])
        );
        assert_eq!(r.request_id.as_deref(), Some("r1"));
        assert_eq!(r.since, Some(at(2024, 1, 1, 0, 0)));
        assert_eq!(r.until, Some(at(2024, 2, 1, 0, 0)));
        let r = parse_plan(br#"{"sync_type":"incremental","sweep":true}"#).unwrap();
        assert!(r.sweep);
    }

    #[test]
    fn a_bad_planning_message_is_refused_with_its_reason() {
        for (body, reason) in [
            (&b"not json"[..], "invalid planning message: "),
            (br#"{"sync_type":"weekly"}"#, "invalid planning message: "),
            (br#"{"sync_type":"full","colour":"red"}"#, "unknown field"),
            (br#"{"sync_type":"full","entities":[]}"#, "`entities` is empty"),
            (
                br#"{"sync_type":"incremental","until":"2024-01-01T00:00:00Z"}"#,
                "`until` without `since`",
            ),
            (
                br#"{"sync_type":"full","since":"2024-01-01T00:00:00Z"}"#,
                "a backfill (`since`) is incremental",
            ),
            (br#"{"sync_type":"full","sweep":true}"#, "a sweep is incremental"),
            (
                br#"{"sync_type":"incremental","sweep":true,"since":"2024-01-01T00:00:00Z"}"#,
                "it takes no `since`",
            ),
            (
                br#"{"sync_type":"incremental","since":"2024-01-02T00:00:00Z","until":"2024-01-02T00:00:00Z"}"#,
                "`since` is not before `until`",
            ),
        ] {
            let err = parse_plan(body).expect_err(&String::from_utf8_lossy(body));
            assert!(err.starts_with("invalid planning message: "), "{err}");
            assert!(err.contains(reason), "{err} lacks {reason}");
        }
    }
}
