//! Plan syncs: planning messages become requests, recorded as pending the moment they
//! arrive ([`record_message`]); under the planning lock, the planner takes over what a
//! dead planner left ([`plan_pending`]), claims the slot for the pending requests,
//! enumerates each entity's ids in its window, writes the chunk ledger (the entities side
//! by side) and then the totals, then publishes one chunk job per chunk (confirmed).
//! The request and sync states are [`ledger::lifecycle`]'s.

use crate::config::Settings;
use crate::domain::{EntityKind, PlanRequest, SyncType, SyncWindow};
use crate::failure::{Classified, Failure};
use crate::ledger::lifecycle::{self, Claim, PendingClaim, PlanningLock, Recorded, SyncRow};
use crate::ledger::{self, FinalStatus, PlanTotals, Purpose, RowLock};
use crate::queue::amqp::Broker;
use crate::queue::{ChunkPublisher, Consumer, Disposition};
use crate::source;
use crate::telemetry::{Event, Telemetry};
use chrono::{DateTime, Utc};
use futures::{StreamExt, TryStreamExt};
use sqlx::PgPool;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// What planning did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PlanOutcome {
    /// A sync was planned and its chunks published. `finished` is set when there was
    /// nothing to send and the sync completed at once.
    Planned {
        sync_id: String,
        totals: PlanTotals,
        finished: Option<FinalStatus>,
    },
    /// The request id was seen before and a sync serves it: nothing new is planned.
    Duplicate { sync_id: String },
    /// Another sync is planning or running; nothing was planned (single-process mode).
    Busy { active_sync_id: String },
    /// The request id was seen before and is pending: a planner plans it when the slot
    /// frees (single-process mode does not plan another's request).
    Pending { request_id: String },
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

/// Plans the sync `req` asks for in this process and publishes its chunks through
/// `publisher` (single-process mode); another sync in progress makes it
/// [`PlanOutcome::Busy`].
pub async fn plan_sync(
    pool: &PgPool,
    settings: &Settings,
    req: &PlanRequest,
    publisher: &dyn ChunkPublisher,
) -> anyhow::Result<PlanOutcome> {
    plan_now(
        pool,
        settings,
        &spec_of(req),
        req.request_id.as_deref(),
        publisher,
    )
    .await
}

/// The request id of a planning message: its own, or `anonymous-<uuid>` for a message
/// without one (a prefix that marks it as such), so that it can be kept and followed.
pub fn request_id_of(req: &PlanRequest) -> String {
    req.request_id
        .clone()
        .unwrap_or_else(|| format!("anonymous-{}", uuid::Uuid::new_v4()))
}

/// Records a planning message as a pending request ([`lifecycle::record_request`]):
/// nothing waits on a lock or a clock, so the message is acked at once; the planner then
/// plans what is pending ([`plan_pending`]).
pub async fn record_message(
    pool: &PgPool,
    telemetry: &Telemetry,
    req: &PlanRequest,
) -> anyhow::Result<Recorded> {
    let spec = spec_of(req);
    if spec.entities.is_empty() {
        return Err(Classified::permanent("the planning message names no entity").into());
    }
    let request_id = request_id_of(req);
    let recorded = lifecycle::record_request(pool, &request_id, &spec).await?;
    match &recorded {
        Recorded::New => telemetry.emit(Event::RequestRecorded {
            request_id: &request_id,
        }),
        Recorded::Known(known) => telemetry.emit(Event::PlanDuplicate {
            request_id: &request_id,
            sync_id: known.sync_id.as_deref(),
        }),
    }
    Ok(recorded)
}

/// Under the planning lock, if no other planner holds it and there is work
/// ([`lifecycle::planning_work`]): takes over the syncs whose planner died, publishes
/// again the jobs of running syncs not all published, finalizes running syncs whose
/// chunks are all settled, then claims the slot for the pending requests and plans them
/// (coalesced, see [`lifecycle::claim_pending`]). `None` when nothing was planned.
pub async fn plan_pending(
    pool: &PgPool,
    settings: &Settings,
    publisher: &dyn ChunkPublisher,
) -> anyhow::Result<Option<PlanOutcome>> {
    if !lifecycle::planning_work(pool).await? {
        return Ok(None);
    }
    let Some(lock) = PlanningLock::try_acquire(pool).await? else {
        return Ok(None);
    };
    let outcome = planning_pass(pool, settings, &lock, publisher).await;
    lock.release().await;
    outcome
}

async fn planning_pass(
    pool: &PgPool,
    settings: &Settings,
    lock: &PlanningLock,
    publisher: &dyn ChunkPublisher,
) -> anyhow::Result<Option<PlanOutcome>> {
    heal(pool, settings, lock, publisher).await?;
    match lifecycle::claim_pending(pool, lock).await? {
        None => Ok(None),
        Some(PendingClaim::Unbounded(why)) => {
            settings.telemetry.emit(Event::PlanUnbounded {
                reason: &why.to_string(),
            });
            Ok(None)
        }
        Some(PendingClaim::Started { sync, served }) => {
            tracing::info!(sync_id = %sync.sync_id, requests = ?served, sync_type = %sync.spec.sync_type, purpose = sync.spec.purpose.as_str(), "planning pending requests");
            plan_claimed(pool, settings, &sync, publisher)
                .await
                .map(Some)
        }
    }
}

/// What a dead planner left, under the planning lock: its `planning` syncs are ended and
/// their requests pending again; the jobs of `running` syncs not all published are
/// published again from the ledger; running syncs whose chunks are all settled are
/// finalized (their last settler died first).
async fn heal(
    pool: &PgPool,
    settings: &Settings,
    lock: &PlanningLock,
    publisher: &dyn ChunkPublisher,
) -> anyhow::Result<()> {
    lifecycle::take_over_orphans(pool, lock).await?;
    for sync_id in lifecycle::unpublished(pool, lock).await? {
        let republished = publish_unsettled(pool, &sync_id, publisher).await?;
        lifecycle::mark_published(pool, &sync_id).await?;
        tracing::warn!(%sync_id, republished, "published again the chunk jobs of a sync whose planner stopped before its last confirm");
    }
    finalize_settled(pool, &settings.telemetry).await;
    Ok(())
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
    plan_now(pool, settings, &spec, None, publisher).await
}

/// Claims and plans a sync of `spec` now, in this process, holding the planning lock
/// (waiting for it) from the claim to the last confirm: what single-process mode and
/// `errors retry` do.
async fn plan_now(
    pool: &PgPool,
    settings: &Settings,
    spec: &ledger::SyncSpec,
    request_id: Option<&str>,
    publisher: &dyn ChunkPublisher,
) -> anyhow::Result<PlanOutcome> {
    if spec.entities.is_empty() {
        return Err(Classified::permanent("the planning request names no entity").into());
    }
    // Held from the claim to the last confirm: a planner that dies meanwhile releases it
    // with its session, and the next one takes its claim over. Never behind a
    // transaction pooler: taking it verifies it is this session's.
    lifecycle::with_planning_lock(pool, async |lock| {
        lifecycle::take_over_orphans(pool, lock).await?;
        // A running sync whose last settler died before finalizing it would hold the
        // slot for nothing: finalized first.
        finalize_settled(pool, &settings.telemetry).await;
        match lifecycle::claim(pool, lock, spec, request_id).await? {
            Claim::Started(sync) => plan_claimed(pool, settings, &sync, publisher).await,
            Claim::Known(known) => {
                let request_id = request_id.unwrap_or_default().to_string();
                settings.telemetry.emit(Event::PlanDuplicate {
                    request_id: &request_id,
                    sync_id: known.sync_id.as_deref(),
                });
                Ok(match known.sync_id {
                    Some(sync_id) => PlanOutcome::Duplicate { sync_id },
                    None => PlanOutcome::Pending { request_id },
                })
            }
            Claim::Busy { active_sync_id } => {
                settings.telemetry.emit(Event::PlanBusy {
                    active_sync_id: &active_sync_id,
                });
                Ok(PlanOutcome::Busy { active_sync_id })
            }
            Claim::Unbounded(why) => Err(anyhow::Error::from(why)),
        }
    })
    .await
}

/// Everything after the claim, from the sync's stored row: the ledger, the totals, the
/// chunk jobs. A failure that planning again cannot cure (permanent or fatal) fails the
/// sync, which answers its requests; any other leaves it `planning`, to the next
/// takeover, which puts its requests back. A failure to publish leaves it `running`
/// and not published, to the planner's housekeeping ([`plan_pending`]).
async fn plan_claimed(
    pool: &PgPool,
    settings: &Settings,
    claimed: &SyncRow,
    publisher: &dyn ChunkPublisher,
) -> anyhow::Result<PlanOutcome> {
    fail::fail_point!("planner::claimed");
    let sync_id = claimed.sync_id.as_str();
    let mut conn = pool.acquire().await?;
    let sync = lifecycle::load_sync(&mut conn, sync_id, RowLock::None)
        .await?
        .filter(|s| s.state == ledger::SyncState::Planning)
        .ok_or_else(|| anyhow::anyhow!("sync {sync_id} is no longer planning"))?;
    drop(conn);
    let started = std::time::Instant::now();
    let (totals, finished) = match write_ledger(pool, settings, &sync).await {
        Ok(written) => written,
        Err(e) => {
            if Failure::of(&e) != Failure::Transient {
                let reason = format!("planning cannot succeed: {e:#}");
                if let Err(failing) = lifecycle::fail_planning(pool, sync_id, &reason).await {
                    tracing::warn!(%sync_id, error = %failing, "could not fail the sync; the next planner takes it over");
                }
            }
            return Err(e.context(format!("planning sync {sync_id}")));
        }
    };
    let ledger_ms = started.elapsed().as_millis() as u64;
    let (sync_type, purpose) = (sync.spec.sync_type, sync.spec.purpose);
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
    fail::fail_point!("planner::before_publish");
    let chunks = publish_unsettled(pool, sync_id, publisher).await?;
    fail::fail_point!("planner::before_mark_published");
    lifecycle::mark_published(pool, sync_id).await?;
    let publish_ms = (started.elapsed().as_millis() as u64).saturating_sub(ledger_ms);
    tracing::info!(%sync_id, %sync_type, purpose = purpose.as_str(), chunks, records = ?totals.records, ledger_ms, publish_ms, "sync planned");
    Ok(PlanOutcome::Planned {
        sync_id: sync_id.to_string(),
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

/// Writes the plan: the windows are read in a transaction that holds the `planning` sync
/// row; each entity's chunks are written in parts ([`parts_of`]: a large full selection in
/// several id ranges, anything else whole), each part in a transaction of its own, the
/// parts side by side on the pool's connections ([`PLAN_PARALLELISM`] at most, the
/// largest first); and the entities' windows and totals with the move to `running`
/// last, in a transaction that checks the sync is still `planning`. Workers see no chunk
/// before that last commit (the jobs are published after it). A planner that dies
/// half-way leaves the sync `planning` with part of its chunks: the next planner ends it
/// and removes them, and its requests are pending again
/// ([`lifecycle::take_over_orphans`]). A sweep is planned in one
/// transaction, entity after entity ([`plan_sweep`]).
async fn write_ledger(
    pool: &PgPool,
    settings: &Settings,
    sync: &SyncRow,
) -> anyhow::Result<(PlanTotals, Option<FinalStatus>)> {
    let (sync_id, spec, hi) = (sync.sync_id.as_str(), &sync.spec, sync.window_hi);
    let mut tx = pool.begin().await?;
    anyhow::ensure!(
        lifecycle::hold_planning(&mut tx, sync_id, RowLock::Update).await?,
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
                    lifecycle::hold_planning(&mut tx, sync_id, RowLock::KeyShare).await?,
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
                fail::fail_point!("planner::part_written");
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
    fail::fail_point!("planner::before_totals");
    anyhow::ensure!(
        lifecycle::hold_planning(&mut tx, sync_id, RowLock::Update).await?,
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
    fail::fail_point!("planner::totals_before_commit");
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
/// How often a long-running planner looks for planning work (pending requests and a
/// free slot, a dead planner's sync): a cheap read; the planning lock is taken only when
/// there is work ([`lifecycle::planning_work`]).
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

/// When the planner next plans what is pending: at once, or, after a failure, after a
/// pause that doubles with each failure in a row (2 s up to [`PENDING_BACKOFF_MAX`]), so
/// that a failure that keeps coming back (a plan too large for the statement timeout, a
/// broker that refuses publishes) is not tried every tick.
#[derive(Debug, Default)]
struct PendingBackoff {
    failures: u32,
    not_before: Option<tokio::time::Instant>,
}

/// The longest pause between two planning passes that failed.
const PENDING_BACKOFF_MAX: std::time::Duration = std::time::Duration::from_secs(60);

impl PendingBackoff {
    fn due(&self) -> bool {
        self.not_before
            .is_none_or(|t| tokio::time::Instant::now() >= t)
    }

    fn failed(&mut self) -> std::time::Duration {
        self.failures = self.failures.saturating_add(1);
        let pause = PENDING_EVERY
            .saturating_mul(1u32 << self.failures.min(6).saturating_sub(1))
            .min(PENDING_BACKOFF_MAX);
        self.not_before = Some(tokio::time::Instant::now() + pause);
        pause
    }

    fn succeeded(&mut self) {
        *self = PendingBackoff::default();
    }
}

/// Plans what is pending, if it is time ([`PendingBackoff`]); a failure is logged and
/// tried again later (the requests stay pending in PostgreSQL), except a fatal one (the
/// installation must be fixed), which is returned: the planner stops.
async fn run_pending(
    pool: &PgPool,
    settings: &Settings,
    publisher: &dyn ChunkPublisher,
    backoff: &mut PendingBackoff,
) -> anyhow::Result<()> {
    if !backoff.due() {
        return Ok(());
    }
    match plan_pending(pool, settings, publisher).await {
        Ok(_) => {
            backoff.succeeded();
            Ok(())
        }
        Err(e) if Failure::of(&e) == Failure::Fatal => Err(e),
        Err(e) => {
            let pause = backoff.failed();
            tracing::warn!(error = %format!("{e:#}"), retry_in_secs = pause.as_secs(), "could not plan the pending requests; they stay pending");
            Ok(())
        }
    }
}

/// Re-publishes the unsettled chunks of a stalled sync from the ledger.
pub async fn resume(
    pool: &PgPool,
    sync_id: &str,
    publisher: &dyn ChunkPublisher,
) -> anyhow::Result<usize> {
    match lifecycle::sync_state(pool, sync_id).await? {
        Some(ledger::SyncState::Running) => {}
        Some(ledger::SyncState::Planning) => anyhow::bail!(
            "sync {sync_id} never finished planning, so it has no chunks to resume. If its planner \
             is gone, the next planner ends it and its requests run again; `loansync abandon {sync_id}` ends it now"
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
/// queue says the work is over. Each message is acked once its request is recorded as
/// pending ([`record_message`]), before anything waits on the planning lock or the
/// clock: no broker delivery is spent by waiting. One that cannot be parsed is
/// dead-lettered with the reason; one that cannot be recorded now (database down) is
/// published again (a delivery is not spent either). After each message, and every
/// [`PENDING_EVERY`], it plans what is pending ([`plan_pending`]); every
/// [`HOUSEKEEPING_EVERY`] it keeps house.
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
    let mut backoff = PendingBackoff::default();
    let result = loop {
        let delivery = tokio::select! {
            _ = &mut shutdown => break Ok(()),
            _ = housekeeping.tick() => {
                housekeep(pool, settings, ticks).await;
                ticks += 1;
                continue;
            }
            _ = pending.tick() => {
                if let Err(e) = run_pending(pool, settings, publisher, &mut backoff).await {
                    break Err(e.context("fatal planning failure"));
                }
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
                || record_message(pool, &settings.telemetry, &req),
            )
            .await
            {
                Ok(_) => Disposition::Ack,
                // Decided by the error's type: a request that can never be recorded is
                // dead-lettered, a wrong installation stops the planner, anything else
                // goes back without spending a delivery.
                Err(e) if Failure::of(&e) == Failure::Permanent => {
                    let reason = format!("the planning request cannot be recorded: {e:#}");
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
                    tracing::error!(error = %format!("{e:#}"), "could not record a planning request: the message goes back to the queue");
                    Disposition::Republish
                }
            },
        };
        fail::fail_point!("planner::message_before_settle");
        if let Err(e) = delivery.settle(disposition).await {
            tracing::warn!(error = %format!("{e:#}"), "could not settle a planning message");
        }
        if let Err(e) = run_pending(pool, settings, publisher, &mut backoff).await {
            break Err(e.context("fatal planning failure"));
        }
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
