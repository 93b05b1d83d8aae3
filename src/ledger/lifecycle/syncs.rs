//! Syncs through their states: claimed (`planning`), planned (`running`, then published),
//! finished (`done`); and the takeover of a sync whose planner died.

use super::lock::PlanningLock;
use super::requests::{self, PendingRequest, RequestState};
use crate::domain::{EntityKind, SyncType};
use crate::ledger::reads::decode_error;
use crate::ledger::sql::{
    FAIL_ORPHAN_HISTORY, INSERT_HISTORY, INSERT_SYNC, LOAD_SYNC, MARK_PLANNED,
    REQUEUE_ORPHAN_REQUESTS,
};
use crate::ledger::{
    clock,
    states::RequestStatus,
    states::{Purpose, SyncState},
};
use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgPool};

/// What a sync is: its type, entities, purpose and, for a backfill, its bounds. Stored
/// in its `loansync_sync` row when it is claimed; everything after the claim plans from
/// that row ([`load_sync`]), never from the message that asked for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncSpec {
    pub sync_type: SyncType,
    pub entities: Vec<EntityKind>,
    pub purpose: Purpose,
    /// A backfill's lower bound (`trigger --since`); with [`Purpose::Backfill`] only.
    pub since: Option<DateTime<Utc>>,
    /// A backfill's upper bound (`trigger --until`); the window's end is never later
    /// than the cap of [`clock::window_hi`] either. Folded into the stored `window_hi`.
    pub until: Option<DateTime<Utc>>,
}

/// A sync as the ledger stores it (`loansync_sync`), decoded once, here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncRow {
    pub sync_id: String,
    pub state: SyncState,
    /// What to plan; `until` is `None` (it is folded into `window_hi`).
    pub spec: SyncSpec,
    /// The end of every entity's window (exclusive), fixed at the claim.
    pub window_hi: DateTime<Utc>,
    /// Every chunk job was published (confirmed); meaningful while `running`.
    pub published: bool,
}

/// How a transaction holds the sync row it reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RowLock {
    /// A plain read.
    None,
    /// `FOR UPDATE`: the transaction that changes its state.
    Update,
    /// `FOR KEY SHARE`: the parts of a plan written side by side, each checking the sync
    /// is still `planning`; an abandon (`FOR UPDATE`) waits for them.
    KeyShare,
}

impl RowLock {
    fn clause(self) -> &'static str {
        match self {
            RowLock::None => "",
            RowLock::Update => " FOR UPDATE",
            RowLock::KeyShare => " FOR KEY SHARE",
        }
    }
}

#[derive(sqlx::FromRow)]
struct StoredSync {
    sync_id: String,
    state: String,
    sync_type: String,
    purpose: String,
    entities: Vec<String>,
    window_hi: DateTime<Utc>,
    since: Option<DateTime<Utc>>,
    published: bool,
}

/// The entities named in `names`, in [`EntityKind::ALL`]'s order; an unknown name is a
/// decode error.
pub(crate) fn decode_entities(names: &[String]) -> sqlx::Result<Vec<EntityKind>> {
    let mut set = Vec::with_capacity(names.len());
    for n in names {
        set.push(
            n.parse::<EntityKind>()
                .map_err(|e| sqlx::Error::Decode(Box::new(e)))?,
        );
    }
    Ok(EntityKind::ALL
        .into_iter()
        .filter(|e| set.contains(e))
        .collect())
}

impl TryFrom<StoredSync> for SyncRow {
    type Error = sqlx::Error;

    fn try_from(r: StoredSync) -> sqlx::Result<SyncRow> {
        Ok(SyncRow {
            state: r.state.parse().map_err(decode_error)?,
            spec: SyncSpec {
                sync_type: r
                    .sync_type
                    .parse()
                    .map_err(|e: String| sqlx::Error::Decode(e.into()))?,
                entities: decode_entities(&r.entities)?,
                purpose: r.purpose.parse().map_err(decode_error)?,
                since: r.since,
                until: None,
            },
            sync_id: r.sync_id,
            window_hi: r.window_hi,
            published: r.published,
        })
    }
}

/// The sync `sync_id` as stored, held as `lock` says; `None` when there is none.
pub async fn load_sync(
    conn: &mut PgConnection,
    sync_id: &str,
    lock: RowLock,
) -> sqlx::Result<Option<SyncRow>> {
    let sql = format!("{LOAD_SYNC}{}", lock.clause());
    let row: Option<StoredSync> = sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(sync_id)
        .fetch_optional(conn)
        .await?;
    row.map(SyncRow::try_from).transpose()
}

/// The state of the sync `sync_id`; `None` for an unknown id.
pub async fn sync_state(pool: &PgPool, sync_id: &str) -> sqlx::Result<Option<SyncState>> {
    let mut conn = pool.acquire().await?;
    Ok(load_sync(&mut conn, sync_id, RowLock::None)
        .await?
        .map(|s| s.state))
}

/// Whether the sync exists and is finished.
pub async fn sync_finished(pool: &PgPool, sync_id: &str) -> sqlx::Result<bool> {
    Ok(sync_state(pool, sync_id).await? == Some(SyncState::Done))
}

/// Holds the sync row as `lock` says and tells whether the sync is still `planning`:
/// the check before a planner writes part of its plan or its totals.
pub async fn hold_planning(
    conn: &mut PgConnection,
    sync_id: &str,
    lock: RowLock,
) -> sqlx::Result<bool> {
    Ok(load_sync(conn, sync_id, lock)
        .await?
        .is_some_and(|s| s.state == SyncState::Planning))
}

/// The sync holding the one active-sync slot (`planning` or `running`), if any.
pub(crate) async fn active_sync(conn: &mut PgConnection) -> sqlx::Result<Option<String>> {
    sqlx::query_scalar("SELECT sync_id::text FROM loansync_sync WHERE state <> 'done' LIMIT 1")
        .fetch_optional(conn)
        .await
}

/// What [`claim`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// A new sync holds the slot, `planning`; its history row is `pending`.
    Started(SyncRow),
    /// The request id is known: nothing new is claimed.
    Known(RequestState),
    /// Another sync is planning or running.
    Busy { active_sync_id: String },
    /// The window's end cannot be bounded now (see [`clock::Unbounded`]); nothing claimed.
    Unbounded(clock::Unbounded),
}

/// Claims the one active-sync slot for a sync of `spec` in this process (single-process
/// mode, `errors retry`), recording `request_id` (if any) as served by it. The caller
/// holds the [`PlanningLock`] and has taken over the syncs whose planner died
/// ([`take_over_orphans`]).
pub async fn claim(
    pool: &PgPool,
    _lock: &PlanningLock,
    spec: &SyncSpec,
    request_id: Option<&str>,
) -> sqlx::Result<Claim> {
    let mut tx = pool.begin().await?;
    if let Some(rid) = request_id
        && let Some(known) = requests::request_state_in(&mut tx, rid, true).await?
    {
        tx.commit().await?;
        return Ok(Claim::Known(known));
    }
    if let Some(active_sync_id) = active_sync(&mut tx).await? {
        tx.commit().await?;
        return Ok(Claim::Busy { active_sync_id });
    }
    let sync = match insert_claim(&mut tx, spec, request_id).await? {
        Ok(sync) => sync,
        Err(unbounded) => {
            tx.commit().await?;
            return Ok(Claim::Unbounded(unbounded));
        }
    };
    if let Some(rid) = request_id {
        requests::insert(
            &mut tx,
            rid,
            spec,
            RequestStatus::Planned,
            Some(&sync.sync_id),
        )
        .await?;
    }
    tx.commit().await?;
    Ok(Claim::Started(sync))
}

/// What [`claim_pending`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PendingClaim {
    /// A new sync serves these pending requests (oldest first).
    Started { sync: SyncRow, served: Vec<String> },
    /// Requests are pending, but the window's end cannot be bounded now: they stay.
    Unbounded(clock::Unbounded),
}

/// Claims the slot for the pending requests, when it is free: every pending full
/// request and the incremental ones it covers become one full sync; otherwise the oldest
/// sweep or backfill runs alone; otherwise every pending incremental request becomes one
/// incremental sync ([`requests::coalesce`]). `None` when nothing is pending or another
/// sync holds the slot. The caller holds the [`PlanningLock`].
pub async fn claim_pending(
    pool: &PgPool,
    _lock: &PlanningLock,
) -> sqlx::Result<Option<PendingClaim>> {
    let mut tx = pool.begin().await?;
    if active_sync(&mut tx).await?.is_some() {
        tx.commit().await?;
        return Ok(None);
    }
    let pending: Vec<PendingRequest> = requests::pending_for_update(&mut tx).await?;
    let Some((spec, served)) = requests::coalesce(&pending) else {
        tx.commit().await?;
        return Ok(None);
    };
    let sync = match insert_claim(&mut tx, &spec, served.first().map(String::as_str)).await? {
        Ok(sync) => sync,
        Err(unbounded) => {
            tx.commit().await?;
            return Ok(Some(PendingClaim::Unbounded(unbounded)));
        }
    };
    sqlx::query(MARK_PLANNED)
        .bind(&served)
        .bind(&sync.sync_id)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(Some(PendingClaim::Started { sync, served }))
}

/// The end of the window of a sync of `spec` claimed now: [`clock::window_hi`], and a
/// backfill's `until` when it is earlier. What a claim stores and what a dry run
/// (`planner::dry_run`) plans with. Reads only; run it before the transaction writes.
pub async fn window_end(
    conn: &mut PgConnection,
    spec: &SyncSpec,
) -> sqlx::Result<Result<DateTime<Utc>, clock::Unbounded>> {
    Ok(clock::window_hi(conn)
        .await?
        .map(|hi| spec.until.map_or(hi, |until| until.min(hi))))
}

/// The claim itself, in the caller's transaction: the window's end, the history row
/// (`pending`), a sample of the xid clock, the `planning` row holding the slot. Returns
/// the sync as stored.
async fn insert_claim(
    tx: &mut PgConnection,
    spec: &SyncSpec,
    request_id: Option<&str>,
) -> sqlx::Result<Result<SyncRow, clock::Unbounded>> {
    let window_hi = match window_end(&mut *tx, spec).await? {
        Ok(hi) => hi,
        Err(unbounded) => return Ok(Err(unbounded)),
    };
    let sync_id = uuid::Uuid::new_v4().to_string();
    sqlx::query(INSERT_HISTORY)
        .bind(&sync_id)
        .bind(spec.sync_type.as_str())
        .execute(&mut *tx)
        .await?;
    clock::sample(&mut *tx).await?;
    let names: Vec<&str> = spec.entities.iter().map(|e| e.as_str()).collect();
    sqlx::query(INSERT_SYNC)
        .bind(&sync_id)
        .bind(request_id)
        .bind(spec.sync_type.as_str())
        .bind(spec.purpose.as_str())
        .bind(&names)
        .bind(window_hi)
        .bind(spec.since)
        .execute(&mut *tx)
        .await?;
    Ok(Ok(SyncRow {
        sync_id,
        state: SyncState::Planning,
        spec: SyncSpec {
            until: None,
            ..spec.clone()
        },
        window_hi,
        published: false,
    }))
}

/// `planning` → `running`: the plan's last transaction, which holds the sync row
/// ([`hold_planning`] with [`RowLock::Update`]), records how many chunks it has.
pub(crate) async fn start_running(
    conn: &mut PgConnection,
    sync_id: &str,
    chunks: i64,
) -> sqlx::Result<()> {
    sqlx::query(
        "UPDATE loansync_sync SET state = $2, chunks_total = $3, chunks_remaining = $3, \
         last_progress_at = now() WHERE sync_id = $1 AND state = $4",
    )
    .bind(sync_id)
    .bind(SyncState::Running.as_str())
    .bind(i32::try_from(chunks).unwrap_or(i32::MAX))
    .bind(SyncState::Planning.as_str())
    .execute(conn)
    .await?;
    Ok(())
}

/// A `running` sync's chunk jobs were all published (confirmed): the housekeeping of
/// [`unpublished`] leaves it alone from now on.
pub async fn mark_published(pool: &PgPool, sync_id: &str) -> sqlx::Result<()> {
    sqlx::query("UPDATE loansync_sync SET published_at = now() WHERE sync_id = $1")
        .bind(sync_id)
        .execute(pool)
        .await?;
    Ok(())
}

/// The `running` syncs whose chunk jobs were not all published: their planner died, or
/// its broker failed, after the plan committed. The caller holds the [`PlanningLock`],
/// so nobody is publishing them now.
pub async fn unpublished(pool: &PgPool, _lock: &PlanningLock) -> sqlx::Result<Vec<String>> {
    sqlx::query_scalar(
        "SELECT sync_id::text FROM loansync_sync WHERE state = 'running' AND published_at IS NULL",
    )
    .fetch_all(pool)
    .await
}

/// `running` → `done`, in the finalizing transaction (which holds the sync row).
pub(crate) async fn finish(conn: &mut PgConnection, sync_id: &str) -> sqlx::Result<()> {
    sqlx::query(
        "UPDATE loansync_sync SET state = $2, chunks_remaining = 0, finished_at = now(), \
         rolled_up_at = now(), published_at = COALESCE(published_at, now()) WHERE sync_id = $1",
    )
    .bind(sync_id)
    .bind(SyncState::Done.as_str())
    .execute(conn)
    .await?;
    Ok(())
}

/// How many syncs may be claimed for a request whose planner died before its plan
/// committed: a takeover puts the request back to pending while it has been claimed
/// fewer times than this; after that it stays with the failed sync, answered, so that a
/// request whose planning keeps killing its planner does not loop for ever.
pub const MAX_PLAN_ATTEMPTS: i32 = 5;

const ORPHAN_REASON: &str = "its planner stopped while planning (process killed or connection \
     lost): abandoned by the next planner. Nothing was sent and no watermark moved; the \
     planning requests it served are pending again and run when the slot frees";

/// `planning` → `done` for every sync whose planner is gone: the caller holds the
/// [`PlanningLock`], so no live process is planning them. Each is abandoned ([`abandon_orphan`]:
/// history `failed`, nothing was sent) and the requests it served are pending again.
/// Returns the syncs taken over.
pub async fn take_over_orphans(pool: &PgPool, _lock: &PlanningLock) -> sqlx::Result<Vec<String>> {
    let mut tx = pool.begin().await?;
    let orphans: Vec<String> = sqlx::query_scalar(
        "SELECT sync_id::text FROM loansync_sync WHERE state = 'planning' FOR UPDATE",
    )
    .fetch_all(&mut *tx)
    .await?;
    for orphan in &orphans {
        let requeued = abandon_orphan(&mut tx, orphan, ORPHAN_REASON, true).await?;
        tracing::warn!(sync_id = %orphan, requests = ?requeued, "abandoned a sync whose planner stopped while planning; its requests are pending again");
    }
    fail::fail_point!("lifecycle::takeover::before_commit");
    tx.commit().await?;
    Ok(orphans)
}

/// `planning` → `done`, failed with `reason`: planning this sync cannot succeed (the
/// error would come back on every try). Nothing was sent and no watermark moves; the
/// requests it served stay with it, answered by its failure. `false` when the sync was
/// not `planning` any more.
pub async fn fail_planning(pool: &PgPool, sync_id: &str, reason: &str) -> sqlx::Result<bool> {
    let mut tx = pool.begin().await?;
    if !hold_planning(&mut tx, sync_id, RowLock::Update).await? {
        tx.rollback().await?;
        return Ok(false);
    }
    abandon_orphan(&mut tx, sync_id, reason, false).await?;
    tx.commit().await?;
    Ok(true)
}

/// Ends a `planning` sync (its planner is gone, it cannot be planned, or an operator
/// abandons it): history `failed` with `reason`, zero counters (the chunks its planner
/// had committed part by part are removed, no job of them was published), the slot
/// freed. With `requeue` (a takeover), the requests it served are pending again and the
/// sync gives its request id back. Returns the requests put back.
pub(crate) async fn abandon_orphan(
    conn: &mut PgConnection,
    sync_id: &str,
    reason: &str,
    requeue: bool,
) -> sqlx::Result<Vec<String>> {
    let requeued: Vec<String> = if requeue {
        sqlx::query_scalar(REQUEUE_ORPHAN_REQUESTS)
            .bind(sync_id)
            .bind(MAX_PLAN_ATTEMPTS)
            .fetch_all(&mut *conn)
            .await?
    } else {
        Vec::new()
    };
    for table in ["loansync_chunk", "loansync_sync_entity"] {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "DELETE FROM {table} WHERE sync_id = $1"
        )))
        .bind(sync_id)
        .execute(&mut *conn)
        .await?;
    }
    sqlx::query(FAIL_ORPHAN_HISTORY)
        .bind(sync_id)
        .bind(reason)
        .execute(&mut *conn)
        .await?;
    sqlx::query(
        "UPDATE loansync_sync SET state = $2, finished_at = now(), chunks_remaining = 0, \
         request_id = CASE WHEN $3 THEN NULL ELSE request_id END WHERE sync_id = $1",
    )
    .bind(sync_id)
    .bind(SyncState::Done.as_str())
    .bind(requeue)
    .execute(&mut *conn)
    .await?;
    Ok(requeued)
}
