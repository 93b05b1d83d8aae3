//! The sync lifecycle: claiming the one active-sync slot ([`begin_sync`], [`begin_pending`]),
//! the [`PlanningLock`], pending requests and their coalescing, and the takeover of syncs
//! whose planner is gone.

use super::clock;
use super::sql::*;
use super::{Purpose, RequestStatus, SyncState, decode_error};
use crate::domain::{EntityKind, SyncType};
use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgPool};

/// What [`begin_sync`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Begin {
    /// A new sync was claimed; its history row is `pending`.
    Started {
        sync_id: String,
        window_hi: DateTime<Utc>,
    },
    /// The request id names a sync that was claimed but never finished planning (its
    /// planner died): plan it again.
    Replan {
        sync_id: String,
        window_hi: DateTime<Utc>,
    },
    /// The request id names a sync already planned: nothing new is planned. `running`
    /// tells whether its chunks may still need publishing.
    Duplicate { sync_id: String, running: bool },
    /// Another sync is planning or running.
    Busy { active_sync_id: String },
    /// Another sync is running: the request is kept (`again`: it was pending already)
    /// and will be planned when the slot frees.
    Pending { request_id: String, again: bool },
    /// The window's end cannot be bounded now (see [`clock::Unbounded`]); nothing claimed.
    Unbounded(clock::Unbounded),
}

/// The key of the session advisory lock held while a sync is claimed and planned.
pub const PLANNING_LOCK_KEY: i64 = 0x4C53_504C;

/// Held by whoever claims and plans a sync (planner, single-process mode, `errors retry`,
/// `abandon`): a session advisory lock on a connection of its own, taken out of the pool.
/// Dropping it closes that connection, which releases the lock; so does the death of the
/// process, since PostgreSQL ends the session with its socket.
#[derive(Debug)]
pub struct PlanningLock {
    conn: Option<sqlx::PgConnection>,
    /// The backend (`pg_backend_pid()`) the lock was granted to.
    backend_pid: i32,
}

impl PlanningLock {
    /// Waits until no other session plans (planning takes seconds; a wait longer than
    /// the connection's `lock_timeout` is an error, and the request is tried again).
    pub async fn acquire(pool: &PgPool) -> sqlx::Result<PlanningLock> {
        let mut conn = pool.acquire().await?.detach();
        let backend_pid = crate::db::pooling::advisory_lock(&mut conn, PLANNING_LOCK_KEY).await?;
        Ok(PlanningLock {
            conn: Some(conn),
            backend_pid,
        })
    }

    /// Whether the lock is still this session's: fails, fatally, behind a transaction
    /// pooler ([`crate::db::pooling::verify_session_lock`]). The planner calls it before
    /// it claims anything.
    pub async fn verify(&mut self, pool: &PgPool) -> anyhow::Result<()> {
        let conn = self
            .conn
            .as_mut()
            .ok_or_else(|| anyhow::anyhow!("the planning lock was released"))?;
        crate::db::pooling::verify_session_lock(conn, self.backend_pid, PLANNING_LOCK_KEY, pool)
            .await
    }

    /// Releases the lock and closes its connection.
    pub async fn release(mut self) {
        if let Some(mut conn) = self.conn.take() {
            let _ = sqlx::query("SELECT pg_advisory_unlock($1)")
                .bind(PLANNING_LOCK_KEY)
                .execute(&mut conn)
                .await;
            let _ = sqlx::Connection::close(conn).await;
        }
    }
}

/// What a new sync is: its type, entities, purpose and, for a backfill, its bounds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncSpec {
    pub sync_type: SyncType,
    pub entities: Vec<EntityKind>,
    pub purpose: Purpose,
    /// A backfill's lower bound (`trigger --since`); with [`Purpose::Backfill`] only.
    pub since: Option<DateTime<Utc>>,
    /// A backfill's upper bound (`trigger --until`); the window's end is never later
    /// than the cap of [`clock::window_hi`] either.
    pub until: Option<DateTime<Utc>>,
}

/// Claims the one active-sync slot for a new sync and writes its `pending` history row.
/// The caller holds the [`PlanningLock`], so a `planning` sync found here has lost its
/// planner: with the same request id it is planned again, otherwise it is abandoned
/// (history `failed`, nothing was sent) and the slot is taken.
///
/// With `queue_if_busy`, a request (with an id) that finds another sync running is kept
/// as pending in `loansync_request`, to be planned when the slot frees ([`begin_pending`]).
pub async fn begin_sync(
    pool: &PgPool,
    _lock: &PlanningLock,
    spec: &SyncSpec,
    request_id: Option<&str>,
    queue_if_busy: bool,
) -> sqlx::Result<Begin> {
    let mut tx = pool.begin().await?;
    if let Some(rid) = request_id {
        let known: Option<KnownRequest> = sqlx::query_as(KNOWN_REQUEST_FOR_UPDATE)
            .bind(rid)
            .fetch_optional(&mut *tx)
            .await?;
        if let Some(KnownRequest {
            req_state,
            sync_id,
            sync_state,
            window_hi,
        }) = known
        {
            let (req_state, sync_state) = states(&req_state, sync_state.as_deref())?;
            return Ok(match (req_state, sync_id, sync_state) {
                (RequestStatus::Pending, _, _) => Begin::Pending {
                    request_id: rid.to_string(),
                    again: true,
                },
                (_, Some(sync_id), Some(SyncState::Planning)) => Begin::Replan {
                    sync_id,
                    window_hi: window_hi.unwrap_or_else(Utc::now),
                },
                (_, sync_id, state) => Begin::Duplicate {
                    sync_id: sync_id.unwrap_or_default(),
                    running: state == Some(SyncState::Running),
                },
            });
        }
    }
    abandon_orphans(&mut tx).await?;
    let active: Option<String> =
        sqlx::query_scalar("SELECT sync_id::text FROM loansync_sync WHERE state <> 'done' LIMIT 1")
            .fetch_optional(&mut *tx)
            .await?;
    if let Some(active_sync_id) = active {
        if let (true, Some(rid)) = (queue_if_busy, request_id) {
            insert_request(&mut tx, rid, spec, RequestStatus::Pending, None).await?;
            tx.commit().await?;
            return Ok(Begin::Pending {
                request_id: rid.to_string(),
                again: false,
            });
        }
        tx.commit().await?;
        return Ok(Begin::Busy { active_sync_id });
    }
    let (sync_id, window_hi) = match claim(&mut tx, spec, request_id).await? {
        Ok(claimed) => claimed,
        Err(unbounded) => {
            tx.commit().await?;
            return Ok(Begin::Unbounded(unbounded));
        }
    };
    if let Some(rid) = request_id {
        insert_request(&mut tx, rid, spec, RequestStatus::Planned, Some(&sync_id)).await?;
    }
    tx.commit().await?;
    Ok(Begin::Started { sync_id, window_hi })
}

/// Claims the slot for the pending requests, when it is free: every pending full request
/// and the incremental ones it covers become one full sync; otherwise the oldest
/// backfill runs alone; otherwise every pending incremental request becomes one
/// incremental sync. `None` when nothing is pending or another sync holds the slot.
pub async fn begin_pending(
    pool: &PgPool,
    _lock: &PlanningLock,
) -> sqlx::Result<Option<(SyncSpec, Vec<String>, Begin)>> {
    let mut tx = pool.begin().await?;
    abandon_orphans(&mut tx).await?;
    let active: Option<String> =
        sqlx::query_scalar("SELECT sync_id::text FROM loansync_sync WHERE state <> 'done' LIMIT 1")
            .fetch_optional(&mut *tx)
            .await?;
    if active.is_some() {
        tx.commit().await?;
        return Ok(None);
    }
    let pending: Vec<PendingRequest> = sqlx::query_as(PENDING_FOR_UPDATE)
        .fetch_all(&mut *tx)
        .await?;
    let Some((spec, served)) = coalesce(&pending) else {
        tx.commit().await?;
        return Ok(None);
    };
    let (sync_id, window_hi) =
        match claim(&mut tx, &spec, served.first().map(String::as_str)).await? {
            Ok(claimed) => claimed,
            Err(unbounded) => {
                tx.commit().await?;
                return Ok(Some((spec, served, Begin::Unbounded(unbounded))));
            }
        };
    sqlx::query(MARK_PLANNED)
        .bind(&served)
        .bind(&sync_id)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(Some((spec, served, Begin::Started { sync_id, window_hi })))
}

/// Whether a request is pending and the slot looks free (read without locks; the
/// claim re-checks under the planning lock).
pub async fn pending_ready(pool: &PgPool) -> sqlx::Result<bool> {
    sqlx::query_scalar(PENDING_READY).fetch_one(pool).await
}

/// A pending planning request, as `loansync status` lists it.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct PendingEntry {
    pub request_id: String,
    /// `full`, `incremental` or `sweep`.
    pub kind: String,
    pub received_at: DateTime<Utc>,
    /// A backfill's lower bound.
    pub since: Option<DateTime<Utc>>,
}

/// The pending requests, oldest first.
pub async fn pending_requests(pool: &PgPool) -> sqlx::Result<Vec<PendingEntry>> {
    sqlx::query_as(PENDING_REQUESTS).fetch_all(pool).await
}

/// A request known to the ledger, as [`begin_sync`] and [`request_state`] find it.
#[derive(Debug, sqlx::FromRow)]
struct KnownRequest {
    req_state: String,
    sync_id: Option<String>,
    sync_state: Option<String>,
    window_hi: Option<DateTime<Utc>>,
}

impl KnownRequest {
    fn states(&self) -> sqlx::Result<(RequestStatus, Option<SyncState>)> {
        states(&self.req_state, self.sync_state.as_deref())
    }
}

/// A request's state and its sync's, read as enums.
fn states(
    req_state: &str,
    sync_state: Option<&str>,
) -> sqlx::Result<(RequestStatus, Option<SyncState>)> {
    let req_state = req_state.parse().map_err(decode_error)?;
    let sync_state = sync_state
        .map(|s| s.parse().map_err(decode_error))
        .transpose()?;
    Ok((req_state, sync_state))
}

/// A pending request, as [`begin_pending`] coalesces it.
#[derive(Debug, Clone, sqlx::FromRow)]
struct PendingRequest {
    request_id: String,
    sync_type: String,
    entities: Vec<String>,
    since: Option<DateTime<Utc>>,
    until: Option<DateTime<Utc>>,
    sweep: bool,
}

/// Which pending requests the next sync serves, and what that sync is (see
/// [`begin_pending`]). Rows: request id, sync type, entities, since, until; oldest first.
fn coalesce(pending: &[PendingRequest]) -> Option<(SyncSpec, Vec<String>)> {
    let entities_of = |names: &[String]| -> Vec<EntityKind> {
        EntityKind::ALL
            .into_iter()
            .filter(|e| names.iter().any(|n| n == e.as_str()))
            .collect()
    };
    let regular = |t: &str| {
        pending
            .iter()
            .filter(move |r| r.sync_type == t && r.since.is_none() && !r.sweep)
            .collect::<Vec<_>>()
    };
    let union = |rows: &[&PendingRequest]| {
        let names: Vec<String> = rows
            .iter()
            .flat_map(|r| r.entities.iter().cloned())
            .collect();
        entities_of(&names)
    };
    let fulls = regular("full");
    if !fulls.is_empty() {
        let entities = union(&fulls);
        let mut served: Vec<String> = fulls.iter().map(|r| r.request_id.clone()).collect();
        // A pending full supersedes the pending incremental requests it covers.
        for r in regular("incremental") {
            if entities_of(&r.entities)
                .iter()
                .all(|e| entities.contains(e))
            {
                served.push(r.request_id.clone());
            }
        }
        let spec = SyncSpec {
            sync_type: SyncType::Full,
            entities,
            purpose: Purpose::Sync,
            since: None,
            until: None,
        };
        return Some((spec, served));
    }
    let oldest = pending.first()?;
    if oldest.sweep {
        // A sweep is a kind of its own, like a backfill: never merged with others.
        let spec = SyncSpec {
            sync_type: SyncType::Incremental,
            entities: entities_of(&oldest.entities),
            purpose: Purpose::Sweep,
            since: None,
            until: None,
        };
        return Some((spec, vec![oldest.request_id.clone()]));
    }
    if oldest.since.is_some() {
        let spec = SyncSpec {
            sync_type: SyncType::Incremental,
            entities: entities_of(&oldest.entities),
            purpose: Purpose::Backfill,
            since: oldest.since,
            until: oldest.until,
        };
        return Some((spec, vec![oldest.request_id.clone()]));
    }
    let incrementals = regular("incremental");
    let spec = SyncSpec {
        sync_type: SyncType::Incremental,
        entities: union(&incrementals),
        purpose: Purpose::Sync,
        since: None,
        until: None,
    };
    Some((
        spec,
        incrementals.iter().map(|r| r.request_id.clone()).collect(),
    ))
}

/// The claim itself, in the caller's transaction: the window's end, the history row
/// (`pending`), a sample of the xid clock, the `planning` row holding the slot.
async fn claim(
    tx: &mut PgConnection,
    spec: &SyncSpec,
    request_id: Option<&str>,
) -> sqlx::Result<Result<(String, DateTime<Utc>), clock::Unbounded>> {
    let window_hi = match clock::window_hi(&mut *tx).await? {
        Ok(hi) => spec.until.map_or(hi, |until| until.min(hi)),
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
    Ok(Ok((sync_id, window_hi)))
}

async fn insert_request(
    tx: &mut PgConnection,
    request_id: &str,
    spec: &SyncSpec,
    state: RequestStatus,
    sync_id: Option<&str>,
) -> sqlx::Result<()> {
    let names: Vec<&str> = spec.entities.iter().map(|e| e.as_str()).collect();
    sqlx::query(INSERT_REQUEST)
        .bind(request_id)
        .bind(spec.sync_type.as_str())
        .bind(&names)
        .bind(spec.since)
        .bind(spec.until)
        .bind(state.as_str())
        .bind(sync_id)
        .bind(spec.purpose == Purpose::Sweep)
        .execute(tx)
        .await?;
    Ok(())
}

/// Abandons every `planning` sync: the caller holds the [`PlanningLock`], so their
/// planners are gone.
async fn abandon_orphans(tx: &mut PgConnection) -> sqlx::Result<()> {
    let orphans: Vec<String> = sqlx::query_scalar(
        "SELECT sync_id::text FROM loansync_sync WHERE state = 'planning' FOR UPDATE",
    )
    .fetch_all(&mut *tx)
    .await?;
    for orphan in &orphans {
        abandon_orphan(&mut *tx, orphan, ORPHAN_REASON, true).await?;
        tracing::warn!(sync_id = %orphan, "abandoned a sync whose planner stopped while planning");
    }
    Ok(())
}

const ORPHAN_REASON: &str = "its planner stopped while planning (process killed or connection \
     lost): abandoned by the next planner. Nothing was sent and no watermark moved; the \
     planning requests it served are pending again and run when the slot frees";

/// Ends a `planning` sync whose planner is gone: history `failed` with `reason`, zero
/// counters (nothing was planned: the chunks its planner had committed entity by entity
/// are removed, no job of them was published), the slot and its request id freed. With `requeue`
/// (a takeover by the next planner, not an operator's abandon), the requests it served
/// are pending again, so that none is lost.
pub(super) async fn abandon_orphan(
    conn: &mut PgConnection,
    sync_id: &str,
    reason: &str,
    requeue: bool,
) -> sqlx::Result<()> {
    if requeue {
        sqlx::query(
            // A request without an id of its own is not: its planning message, unacked,
            // comes back from the broker as a new request.
            REQUEUE_ORPHAN_REQUESTS,
        )
        .bind(sync_id)
        .execute(&mut *conn)
        .await?;
    }
    super::plan::delete_plan(&mut *conn, sync_id).await?;
    sqlx::query(FAIL_ORPHAN_HISTORY)
        .bind(sync_id)
        .bind(reason)
        .execute(&mut *conn)
        .await?;
    sqlx::query(END_ORPHAN_SYNC)
        .bind(sync_id)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// Where a planning request is: `pending` or `planned`, the sync serving it, and
/// whether that sync has finished.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestState {
    pub state: RequestStatus,
    pub sync_id: Option<String>,
    pub finished: bool,
}

/// [`RequestState`] of a request id; `None` until a planner has taken the request.
pub async fn request_state(pool: &PgPool, request_id: &str) -> sqlx::Result<Option<RequestState>> {
    let row: Option<KnownRequest> = sqlx::query_as(KNOWN_REQUEST)
        .bind(request_id)
        .fetch_optional(pool)
        .await?;
    row.map(|r| {
        let (state, sync_state) = r.states()?;
        Ok(RequestState {
            state,
            finished: sync_state == Some(SyncState::Done),
            sync_id: r.sync_id,
        })
    })
    .transpose()
}

/// Whether the sync exists and is finished.
pub async fn sync_finished(pool: &PgPool, sync_id: &str) -> sqlx::Result<bool> {
    Ok(super::sync_state(pool, sync_id).await? == Some(SyncState::Done))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(id: &str, sync_type: &str, entities: &[&str], since: bool) -> PendingRequest {
        PendingRequest {
            request_id: id.into(),
            sync_type: sync_type.into(),
            entities: entities.iter().map(|e| e.to_string()).collect(),
            since: since.then(Utc::now),
            until: None,
            sweep: false,
        }
    }

    #[test]
    fn a_pending_sweep_is_never_merged_with_other_requests() {
        let sweep = |id: &str, entities: &[&str]| PendingRequest {
            sweep: true,
            ..req(id, "incremental", entities, false)
        };
        // Oldest first: the sweep runs alone, for its own entities.
        let pending = [
            sweep("s1", &["loan"]),
            req("i1", "incremental", &["loan", "customer"], false),
            sweep("s2", &["customer"]),
        ];
        let (spec, served) = coalesce(&pending).unwrap();
        assert_eq!(spec.purpose, Purpose::Sweep);
        assert_eq!(spec.sync_type, SyncType::Incremental);
        assert_eq!(spec.entities, vec![EntityKind::Loan]);
        assert_eq!(served, vec!["s1"]);
        // Behind an incremental, the incrementals merge without the sweeps...
        let (spec, served) = coalesce(&pending[1..]).unwrap();
        assert_eq!(
            (spec.purpose, served),
            (Purpose::Sync, vec!["i1".to_string()])
        );
        // ...and a full supersedes incrementals, never a sweep.
        let with_full = [sweep("s1", &["loan"]), req("f1", "full", &["loan"], false)];
        let (spec, served) = coalesce(&with_full).unwrap();
        assert_eq!(
            (spec.sync_type, served),
            (SyncType::Full, vec!["f1".to_string()])
        );
    }

    #[test]
    fn a_pending_full_supersedes_the_incrementals_it_covers() {
        let pending = [
            req("i1", "incremental", &["loan"], false),
            req("f1", "full", &["loan", "customer"], false),
            req("i2", "incremental", &["officer"], false),
            req("f2", "full", &["repayment"], false),
            req("b1", "incremental", &["loan"], true),
        ];
        let (spec, served) = coalesce(&pending).unwrap();
        assert_eq!(spec.sync_type, SyncType::Full);
        assert_eq!(
            spec.entities,
            vec![
                EntityKind::Customer,
                EntityKind::Loan,
                EntityKind::Repayment
            ]
        );
        assert_eq!(
            served,
            vec!["f1", "f2", "i1"],
            "i2 (officer) is not covered"
        );
    }

    #[test]
    fn without_a_full_the_oldest_backfill_runs_alone_else_incrementals_merge() {
        let backfill_first = [
            req("b1", "incremental", &["loan"], true),
            req("i1", "incremental", &["loan"], false),
        ];
        let (spec, served) = coalesce(&backfill_first).unwrap();
        assert_eq!(
            (spec.purpose, served),
            (Purpose::Backfill, vec!["b1".to_string()])
        );
        let incrementals = [
            req("i1", "incremental", &["loan"], false),
            req("b1", "incremental", &["loan"], true),
            req("i2", "incremental", &["officer"], false),
        ];
        let (spec, served) = coalesce(&incrementals).unwrap();
        assert_eq!(spec.purpose, Purpose::Sync);
        assert_eq!(spec.entities, vec![EntityKind::Officer, EntityKind::Loan]);
        assert_eq!(served, vec!["i1", "i2"]);
        assert!(coalesce(&[]).is_none());
    }
}
