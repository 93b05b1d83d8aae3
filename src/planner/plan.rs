//! Claiming and planning a sync: the claim (in this process, or for the pending
//! requests), the chunk ledger written from the sync's stored row (the entities' parts
//! side by side, the totals last), and the chunk jobs published from the ledger.

use super::housekeeping::{finalize_settled, heal};
use super::sweep::plan_sweep;
use super::{PlanError, PlanOutcome, spec_of};
use crate::config::Settings;
use crate::domain::{EntityKind, PlanRequest, SyncType, SyncWindow};
use crate::failure::{Classify, Failure};
use crate::ledger::lifecycle::{self, Claim, PendingClaim, PlanningLock, SyncRow};
use crate::ledger::{
    self,
    lifecycle::RowLock,
    plan::PlanTotals,
    states::{FinalStatus, Purpose},
};
use crate::queue::ChunkPublisher;
use crate::source;
use crate::telemetry::Event;
use chrono::{DateTime, Utc};
use futures::{StreamExt, TryStreamExt};
use sqlx::PgPool;

/// Plans the sync `req` asks for in this process and publishes its chunks through
/// `publisher` (single-process mode); another sync in progress makes it
/// [`PlanOutcome::Busy`].
pub async fn plan_sync(
    pool: &PgPool,
    settings: &Settings,
    req: &PlanRequest,
    publisher: &dyn ChunkPublisher,
) -> Result<PlanOutcome, PlanError> {
    plan_now(
        pool,
        settings,
        &spec_of(req),
        req.request_id.as_deref(),
        publisher,
    )
    .await
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
) -> Result<Option<PlanOutcome>, PlanError> {
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
) -> Result<Option<PlanOutcome>, PlanError> {
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

/// Plans a retry of the unresolved error rows of `entities` (all four when empty): a
/// new sync that re-delivers those records and moves no watermark (SPEC.md section 3).
pub async fn plan_retry(
    pool: &PgPool,
    settings: &Settings,
    entities: &[EntityKind],
    publisher: &dyn ChunkPublisher,
) -> Result<PlanOutcome, PlanError> {
    let entities = if entities.is_empty() {
        EntityKind::ALL.to_vec()
    } else {
        EntityKind::ALL
            .into_iter()
            .filter(|e| entities.contains(e))
            .collect()
    };
    let spec = ledger::lifecycle::SyncSpec {
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
    spec: &ledger::lifecycle::SyncSpec,
    request_id: Option<&str>,
    publisher: &dyn ChunkPublisher,
) -> Result<PlanOutcome, PlanError> {
    if spec.entities.is_empty() {
        return Err(PlanError::Invalid(
            "the planning request names no entity".into(),
        ));
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
            Claim::Unbounded(why) => Err(PlanError::from(why)),
        }
    })
    .await
}

/// Everything after the claim, from the sync's stored row: the ledger, the totals, the
/// chunk jobs. A failure that planning again cannot cure (permanent or fatal) fails the
/// sync, which answers its requests; any other leaves it `planning`, to the next
/// takeover, which puts its requests back. A failure to publish leaves it `running`
/// and not published, to the planner's housekeeping ([`super::plan_pending`]).
async fn plan_claimed(
    pool: &PgPool,
    settings: &Settings,
    claimed: &SyncRow,
    publisher: &dyn ChunkPublisher,
) -> Result<PlanOutcome, PlanError> {
    fail::fail_point!("planner::claimed");
    let sync_id = claimed.sync_id.as_str();
    let mut conn = pool.acquire().await?;
    let sync = lifecycle::load_sync(&mut conn, sync_id, RowLock::None)
        .await?
        .filter(|s| s.state == ledger::states::SyncState::Planning)
        .ok_or_else(|| PlanError::Superseded(sync_id.to_string()))?;
    drop(conn);
    let started = std::time::Instant::now();
    let written = match check_source_schema(pool, settings).await {
        Ok(()) => write_ledger(pool, settings, &sync).await,
        Err(e) => Err(e),
    };
    let (totals, finished) = match written {
        Ok(written) => written,
        Err(e) => {
            if e.failure() != Failure::Transient {
                let reason = format!("planning cannot succeed: {e:#}");
                if let Err(failing) = lifecycle::fail_planning(pool, sync_id, &reason).await {
                    tracing::warn!(%sync_id, error = %failing, "could not fail the sync; the next planner takes it over");
                }
            }
            tracing::warn!(%sync_id, error = %e, "planning failed");
            return Err(e);
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

/// The source columns loansync reads are there with the types it reads them as
/// ([`source::columns::drift`], one query of `information_schema`): a schema that
/// drifted fails the sync with a message naming each difference, before any row is read,
/// instead of failing every record of it one by one. `etl_source_schema_drift` says how
/// many differences this check found.
async fn check_source_schema(pool: &PgPool, settings: &Settings) -> Result<(), PlanError> {
    let mut conn = pool.acquire().await?;
    let drifts = source::columns::drift(&mut conn).await?;
    let message = (!drifts.is_empty()).then(|| source::columns::drift_message(&drifts));
    settings.telemetry.emit(Event::SourceSchemaChecked {
        differences: drifts.len(),
        message: message.as_deref(),
    });
    match message {
        None => Ok(()),
        Some(m) => Err(PlanError::SchemaDrift(m)),
    }
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
) -> Result<(PlanTotals, Option<FinalStatus>), PlanError> {
    let (sync_id, spec, hi) = (sync.sync_id.as_str(), &sync.spec, sync.window_hi);
    let mut tx = pool.begin().await?;
    if !lifecycle::hold_planning(&mut tx, sync_id, RowLock::Update).await? {
        return Err(PlanError::Superseded(sync_id.to_string()));
    }
    let mut planned = Vec::with_capacity(spec.entities.len());
    let mut tx = if spec.purpose == Purpose::Sweep {
        for &entity in &spec.entities {
            let window = window_of(&mut tx, settings, spec, entity, hi).await?;
            let size = i64::from(settings.chunk_sizes.for_entity(entity));
            let (records, chunks, buckets) =
                plan_sweep(&mut tx, sync_id, entity, &window, size).await?;
            settings.telemetry.emit(Event::SweepBuckets {
                entity,
                unchanged: buckets.unchanged,
                clean: buckets.clean,
                changed: buckets.changed,
            });
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
                if !lifecycle::hold_planning(&mut tx, sync_id, RowLock::KeyShare).await? {
                    return Err(PlanError::Superseded(sync_id.to_string()));
                }
                let size = i64::from(settings.chunk_sizes.for_entity(entity));
                let (page_sql, windowed) = match spec.purpose {
                    Purpose::Retry => (ledger::plan::UNRESOLVED_PAGE_SQL, false),
                    _ => source::ids_sql(entity, spec.sync_type),
                };
                // A window's or a retry's selection is read once a statement; a full
                // selection walks its id index page after page.
                let paging = if windowed || spec.purpose == Purpose::Retry {
                    ledger::plan::Paging::OnePass
                } else {
                    ledger::plan::Paging::Keyset
                };
                let (chunks, records) = ledger::plan::insert_chunks(
                    &mut tx, sync_id, entity, page_sql, size, &window, windowed, paging, part,
                )
                .await?;
                fail::fail_point!("planner::part_written");
                tx.commit().await?;
                Ok::<_, PlanError>((entity, chunks, records))
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
    if !lifecycle::hold_planning(&mut tx, sync_id, RowLock::Update).await? {
        return Err(PlanError::Superseded(sync_id.to_string()));
    }
    let mut totals = PlanTotals::default();
    for p in &planned {
        ledger::plan::insert_sync_entity(&mut tx, sync_id, p.entity, &p.window, p.records).await?;
        totals.records.push((p.entity, p.records));
        totals.chunks += i64::from(p.chunks);
    }
    let earliest_lo = planned.iter().filter_map(|p| p.window.lo).min();
    let finished = ledger::plan::write_plan(&mut tx, sync_id, &totals, earliest_lo, hi).await?;
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
/// statements of [`ledger::plan::insert_chunks`]. Debug builds (every test) take 4, so that
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
    spec: &ledger::lifecycle::SyncSpec,
    entity: EntityKind,
    parallelism: usize,
) -> Result<Vec<(ledger::plan::Part, i64)>, PlanError> {
    if spec.purpose != Purpose::Sync || spec.sync_type != SyncType::Full {
        return Ok(vec![(ledger::plan::Part::WHOLE, 0)]);
    }
    let Some((min, max)) = source::id_span(conn, entity).await? else {
        return Ok(vec![(ledger::plan::Part::WHOLE, 0)]);
    };
    let size = i128::from(settings.chunk_sizes.for_entity(entity).max(1));
    let chunks = (i128::from(max) - i128::from(min) + 1) / size;
    let parts = (chunks / i128::from(CHUNKS_PER_PART)).clamp(1, parallelism.min(MAX_PARTS) as i128);
    Ok(ledger::plan::Part::split(min, max, parts as i32)
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
pub(super) async fn window_of(
    conn: &mut sqlx::PgConnection,
    settings: &Settings,
    spec: &ledger::lifecycle::SyncSpec,
    entity: EntityKind,
    hi: DateTime<Utc>,
) -> Result<SyncWindow, PlanError> {
    Ok(match spec.purpose {
        Purpose::Sync => {
            let watermark = ledger::watermarks::watermark(&mut *conn, entity).await?;
            window_for(settings, spec.sync_type, watermark, hi)
        }
        Purpose::Retry | Purpose::Sweep => SyncWindow { lo: None, hi },
        Purpose::Backfill => SyncWindow { lo: spec.since, hi },
    })
}

/// How many chunk jobs the planner reads from the ledger and publishes at a time.
const PUBLISH_PAGE: i64 = 1_000;

/// Publishes the unsettled chunks of a sync, in publishing order, a page of
/// [`PUBLISH_PAGE`] at a time (each page confirmed before the next is read): the planner
/// never holds every job of a sync. Returns how many were published.
pub(super) async fn publish_unsettled(
    pool: &PgPool,
    sync_id: &str,
    publisher: &dyn ChunkPublisher,
) -> Result<usize, PlanError> {
    let (mut after, mut published) = (None, 0);
    loop {
        let (jobs, next) =
            ledger::plan::unsettled_chunks_page(pool, sync_id, after.as_ref(), PUBLISH_PAGE)
                .await?;
        publisher
            .publish_chunks(&jobs)
            .await
            .map_err(PlanError::Publish)?;
        published += jobs.len();
        match next {
            Some(key) => after = Some(key),
            None => return Ok(published),
        }
    }
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
}
