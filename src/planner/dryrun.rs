//! A dry run (`sync --dry-run`, `trigger --dry-run`): what the sync a request asks for
//! would send if it were planned now, per entity, split by what was delivered before;
//! computed with the planner's own selection, written nowhere.
//!
//! The same selection as the real run, from the same code: the request's sync
//! ([`spec_of`]), the window's end of a claim ([`lifecycle::window_end`]: `now()` capped
//! at open transactions, a backfill's `until`), each entity's window ([`window_of`]:
//! watermark less the overlap, a backfill's `since`, none for a full sync or a sweep),
//! and the ids of `source::ids_sql` for that entity and type (the statement the planner
//! writes the chunk ledger from), or, for a sweep, the sweep's own pages
//! ([`source::sweep_page`], as [`super::sweep`] plans them). Each page is compared with
//! `loansync_delivered` as a sweep compares ([`source::compare_page`]).
//!
//! Nothing is written: the whole dry run is ONE transaction, `READ ONLY` from its first
//! statement, so PostgreSQL itself refuses any write (SQLSTATE 25006) whatever the code
//! below calls; it claims no slot, writes no history, request, chunk, error or watermark
//! row, samples no clock, takes no lock, publishes nothing and emits no metric. A dry run
//! therefore cannot move the window of the next real run (the drt#978 failure: a dry run
//! that recorded a watermark, so that the next run skipped rows).

use super::plan::window_of;
use super::sweep::SWEEP_PAGE;
use super::{PlanError, spec_of};
use crate::config::Settings;
use crate::domain::{EntityKind, PlanRequest, SyncType, SyncWindow};
use crate::ledger::{lifecycle, states::Purpose};
use crate::source::{self, SweepPage};
use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::{PgConnection, PgPool};

/// What a sync asked for now would send (see the module's documentation).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DryRun {
    /// Always `true`: nothing was sent or written (tells a script this from a sync's
    /// report).
    pub dry_run: bool,
    /// `full`, `incremental`, `sweep` or `backfill`.
    pub kind: &'static str,
    /// The history's `sync_type` the real run would have.
    pub sync_type: SyncType,
    /// The end (exclusive) of every entity's window, as a claim now would fix it.
    pub window_hi: DateTime<Utc>,
    /// The sync in progress, if any: `loansync sync` would not run now (exit 12); a
    /// planner would keep a triggered request until the slot frees.
    pub busy_with: Option<String>,
    pub entities: Vec<EntityDryRun>,
}

impl DryRun {
    /// The records the real run would send, every entity.
    pub fn would_send(&self) -> u64 {
        self.entities.iter().map(|e| e.would_send).sum()
    }
}

/// One entity of a [`DryRun`]. Every selected record is exactly one of `new` (never
/// delivered: no `loansync_delivered` row), `changed` (its fingerprint differs from the
/// delivered one) or `unchanged` (the delivered fingerprint). A full, incremental or
/// backfill sync sends all three (`would_send` = new + changed + unchanged); a sweep
/// sends new and changed only and skips the unchanged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EntityDryRun {
    pub entity: EntityKind,
    /// The window's start (`None`: no lower bound: a full sync, a sweep).
    pub window_lo: Option<DateTime<Utc>>,
    pub window_hi: DateTime<Utc>,
    pub would_send: u64,
    pub new: u64,
    pub changed: u64,
    pub unchanged: u64,
    /// A sweep only (`None` otherwise: other syncs do not look for deletes): the
    /// delivered ids gone from the source or no longer selected, that the sweep would
    /// record in `loansync_deleted` (not sent: the API has no delete).
    pub deleted: Option<u64>,
    /// The ids of each kind, ascending, when asked for (`--ids`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ids: Option<DryRunIds>,
}

/// The ids of an [`EntityDryRun`], each list ascending.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct DryRunIds {
    pub new: Vec<i64>,
    pub changed: Vec<i64>,
    pub unchanged: Vec<i64>,
    pub deleted: Vec<i64>,
}

impl EntityDryRun {
    fn new(entity: EntityKind, window: SyncWindow, sweep: bool, with_ids: bool) -> Self {
        EntityDryRun {
            entity,
            window_lo: window.lo,
            window_hi: window.hi,
            would_send: 0,
            new: 0,
            changed: 0,
            unchanged: 0,
            deleted: sweep.then_some(0),
            ids: with_ids.then(DryRunIds::default),
        }
    }

    /// Counts one compared page (and keeps its ids when asked).
    fn add(&mut self, page: &SweepPage) {
        // `page.changed` holds the new ids too (both ascending).
        let changed: Vec<i64> = page
            .changed
            .iter()
            .copied()
            .filter(|id| page.new.binary_search(id).is_err())
            .collect();
        let (new, unchanged) = (page.new.len() as u64, page.unchanged.len() as u64);
        self.new += new;
        self.changed += changed.len() as u64;
        self.unchanged += unchanged;
        self.would_send += new + changed.len() as u64;
        match &mut self.deleted {
            // A sweep skips what is unchanged and records what is gone.
            Some(deleted) => *deleted += page.gone.len() as u64,
            // Any other sync sends every selected record; `gone` means nothing for a
            // selection narrower than the sweep's.
            None => self.would_send += unchanged,
        }
        if let Some(ids) = &mut self.ids {
            ids.new.extend_from_slice(&page.new);
            ids.changed.extend(changed);
            ids.unchanged.extend_from_slice(&page.unchanged);
            if self.deleted.is_some() {
                ids.deleted.extend_from_slice(&page.gone);
            }
        }
    }
}

/// The dry run of `req` (see the module's documentation): `with_ids` keeps every id
/// (memory grows with the selection; without it only counts are kept). Refused as a
/// planner refuses the request ([`PlanRequest::validate`]); an unbounded window's end
/// ([`crate::ledger::clock::Unbounded`]) is the error a real run would meet.
pub async fn dry_run(
    pool: &PgPool,
    settings: &Settings,
    req: &PlanRequest,
    with_ids: bool,
) -> Result<DryRun, PlanError> {
    req.validate()
        .map_err(|e| PlanError::Invalid(e.to_string()))?;
    let spec = spec_of(req);
    if spec.entities.is_empty() {
        return Err(PlanError::Invalid(
            "the planning request names no entity".into(),
        ));
    }
    let mut tx = pool.begin().await?;
    // The transaction's first statement: every write in it is refused by PostgreSQL,
    // and every entity is read from one snapshot.
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        .execute(&mut *tx)
        .await?;
    // As a sweep's planning transaction (see `sweep::plan_sweep`).
    sqlx::query("SET LOCAL jit = off").execute(&mut *tx).await?;
    let busy_with = lifecycle::active_sync(&mut tx).await?;
    let hi = lifecycle::window_end(&mut tx, &spec).await??;
    let mut entities = Vec::with_capacity(spec.entities.len());
    for &entity in &spec.entities {
        let window = window_of(&mut tx, settings, &spec, entity, hi).await?;
        entities.push(entity_dry_run(&mut tx, &spec, entity, window, with_ids).await?);
    }
    tx.rollback().await?;
    let kind = match spec.purpose {
        Purpose::Sweep => "sweep",
        Purpose::Backfill => "backfill",
        Purpose::Sync | Purpose::Retry => spec.sync_type.as_str(),
    };
    tracing::info!(kind, records = ?entities.iter().map(|e| (e.entity, e.would_send)).collect::<Vec<_>>(), "dry run: nothing sent, nothing written");
    Ok(DryRun {
        dry_run: true,
        kind,
        sync_type: spec.sync_type,
        window_hi: hi,
        busy_with,
        entities,
    })
}

/// One entity, page after page: a sweep's pages as the sweep reads them, any other
/// selection's keyset pages of its planning statement, each compared with what was
/// delivered.
async fn entity_dry_run(
    conn: &mut PgConnection,
    spec: &lifecycle::SyncSpec,
    entity: EntityKind,
    window: SyncWindow,
    with_ids: bool,
) -> Result<EntityDryRun, PlanError> {
    let sweep = spec.purpose == Purpose::Sweep;
    let mut out = EntityDryRun::new(entity, window, sweep, with_ids);
    let mut after = 0i64;
    loop {
        let page = if sweep {
            source::sweep_page(&mut *conn, entity, &window, after, SWEEP_PAGE).await?
        } else {
            let ids = source::next_ids(
                &mut *conn,
                entity,
                spec.sync_type,
                &window,
                after,
                SWEEP_PAGE,
            )
            .await?;
            source::compare_page(&mut *conn, entity, after, &ids, SWEEP_PAGE).await?
        };
        out.add(&page);
        match page.last {
            Some(last) => after = last,
            None => return Ok(out),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn window() -> SyncWindow {
        SyncWindow {
            lo: None,
            hi: DateTime::<Utc>::from_timestamp(1_800_000_000, 0).unwrap(),
        }
    }

    fn page() -> SweepPage {
        SweepPage {
            changed: vec![1, 2, 5, 8],
            new: vec![2, 8],
            unchanged: vec![3, 4],
            gone: vec![6, 7, 9],
            last: None,
        }
    }

    #[test]
    fn a_full_or_incremental_dry_run_sends_the_unchanged_too_and_has_no_deletes() {
        let mut e = EntityDryRun::new(EntityKind::Loan, window(), false, true);
        e.add(&page());
        assert_eq!(
            (e.would_send, e.new, e.changed, e.unchanged, e.deleted),
            (6, 2, 2, 2, None)
        );
        let ids = e.ids.unwrap();
        assert_eq!(
            (ids.new, ids.changed, ids.unchanged, ids.deleted),
            (vec![2, 8], vec![1, 5], vec![3, 4], vec![])
        );
    }

    #[test]
    fn a_sweep_dry_run_skips_the_unchanged_and_counts_the_deleted() {
        let mut e = EntityDryRun::new(EntityKind::Loan, window(), true, false);
        e.add(&page());
        e.add(&page());
        assert_eq!(
            (e.would_send, e.new, e.changed, e.unchanged, e.deleted),
            (8, 4, 4, 4, Some(6))
        );
        assert_eq!(e.ids, None);
    }
}
