//! Sync history, chunk ledger, counters, error rows and watermarks.
//!
//! Every write that decides what a sync counted happens here, each in one transaction:
//! * [`begin_sync`] claims the single active-sync slot and writes the `pending` history row;
//! * [`write_plan`] writes the chunk ledger, the `total_*` counters and `in_progress`;
//! * [`settle_chunk`] settles one chunk exactly once, on its own `loansync_chunk` row
//!   (counts, outcome, the API's answer), with its error rows and resolutions; then,
//!   after the commit, finalizes the sync when no chunk is left unsettled
//!   ([`finalize_if_settled`], exactly one finalizer) or rolls its history counters up
//!   from the chunk rows about once a second ([`roll_up`], never waited for);
//! * [`finalize`] sets the history counters exactly from the chunk rows, the status,
//!   duration and watermarks; [`finalize_settled`] is its safety net (housekeeping, the
//!   next planner) for a settler that died between its commit and its finalize;
//! * [`abort_sync`] fails a sync fast (rejected credentials): the unsent chunks are
//!   settled as failed records, without error rows;
//! * [`abandon_sync`] ends a sync by hand (`loansync abandon`);
//! * [`prune_chunks`] drops finished syncs' chunk id lists after the retention.
//!
//! Whoever claims and plans a sync holds the [`PlanningLock`] (a session advisory lock):
//! a `planning` sync nobody holds it for lost its planner, and the next planner abandons
//! it ([`begin_sync`]), so a killed process never blocks later syncs.
//!
//! The settle transaction locks its own chunk row only: settles of different chunks of a
//! sync never wait for each other. Lock order, for every transaction that takes more than
//! one of these rows: chunk rows, then the `loansync_sync` row, then the history row.
//! [`finalize_if_settled`] and [`roll_up`] take the sync row first (the roll-up with
//! `SKIP LOCKED`: it never waits for it); [`abort_sync`] and [`abandon_sync`] settle the
//! chunks first.

pub mod clock;
mod sql;

use crate::domain::{EntityKind, SyncType, SyncWindow};
use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::{PgConnection, PgPool, Row};
use std::sync::LazyLock;

use sql::*;

/// Why a sync exists: a regular sync moves watermarks, a retry of error rows does not.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Purpose {
    Sync,
    Retry,
    /// A bounded window asked for by hand (`trigger --since`); moves no watermark.
    Backfill,
    /// What timestamps miss (`trigger --sweep`): the records whose fingerprint differs
    /// from the delivered one; moves no watermark, records deleted ids.
    Sweep,
}

impl Purpose {
    pub fn as_str(self) -> &'static str {
        match self {
            Purpose::Sync => "sync",
            Purpose::Retry => "retry",
            Purpose::Backfill => "backfill",
            Purpose::Sweep => "sweep",
        }
    }
}

/// The final status written to `etl_folder_etlsynchistory.status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinalStatus {
    Completed,
    PartialSuccess,
    Failed,
}

impl FinalStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            FinalStatus::Completed => "completed",
            FinalStatus::PartialSuccess => "partial_success",
            FinalStatus::Failed => "failed",
        }
    }
}

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

/// A `planning` sync whose planner is gone: no session holds the [`PlanningLock`].
/// The same predicate in `status`, the stalled gauge and [`begin_sync`]'s takeover.
const PLANNER_GONE_SQL: &str = "NOT EXISTS (SELECT 1 FROM pg_locks l \
     WHERE l.locktype = 'advisory' AND l.granted AND l.classid = 0 AND l.objid = 1280528460 \
       AND l.objsubid = 1 AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()))";

/// Whether the sync row `s` is stalled: running with no chunk settled for `stale_param`
/// seconds (the newest `settled_at` of its chunks, or the start of the run), or planning
/// with its planner gone.
fn stalled_sql(stale_param: &str) -> String {
    format!(
        "((s.state = 'running' AND GREATEST(s.last_progress_at, \
               (SELECT max(c.settled_at) FROM loansync_chunk c WHERE c.sync_id = s.sync_id)) \
             < now() - make_interval(secs => {stale_param})) \
          OR (s.state = 'planning' AND {PLANNER_GONE_SQL}))"
    )
}

/// How many syncs are stalled now (the `etl_stalled_syncs` gauge).
pub async fn stalled_count(pool: &PgPool, stale_after_secs: f64) -> sqlx::Result<i64> {
    static SQL: LazyLock<String> = LazyLock::new(|| {
        format!(
            "SELECT count(*) FROM loansync_sync s WHERE {}",
            stalled_sql("$1")
        )
    });
    sqlx::query_scalar(SQL.as_str())
        .bind(stale_after_secs)
        .fetch_one(pool)
        .await
}

/// Held by whoever claims and plans a sync (planner, single-process mode, `errors retry`,
/// `abandon`): a session advisory lock on a connection of its own, taken out of the pool.
/// Dropping it closes that connection, which releases the lock; so does the death of the
/// process, since PostgreSQL ends the session with its socket.
#[derive(Debug)]
pub struct PlanningLock {
    conn: Option<sqlx::PgConnection>,
}

impl PlanningLock {
    /// Waits until no other session plans (planning takes seconds; a wait longer than
    /// the connection's `lock_timeout` is an error, and the request is tried again).
    pub async fn acquire(pool: &PgPool) -> sqlx::Result<PlanningLock> {
        let mut conn = pool.acquire().await?.detach();
        sqlx::query("SELECT pg_advisory_lock($1)")
            .bind(PLANNING_LOCK_KEY)
            .execute(&mut conn)
            .await?;
        Ok(PlanningLock { conn: Some(conn) })
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
        let known: Option<KnownRequest> = sqlx::query_as(
            "SELECT r.state AS req_state, r.sync_id::text AS sync_id, s.state AS sync_state, s.window_hi \
                 FROM loansync_request r \
                 LEFT JOIN loansync_sync s USING (sync_id) WHERE r.request_id = $1 FOR UPDATE OF r",
        )
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
            return Ok(match (req_state.as_str(), sync_id, sync_state.as_deref()) {
                ("pending", _, _) => Begin::Pending {
                    request_id: rid.to_string(),
                    again: true,
                },
                (_, Some(sync_id), Some("planning")) => Begin::Replan {
                    sync_id,
                    window_hi: window_hi.unwrap_or_else(Utc::now),
                },
                (_, sync_id, state) => Begin::Duplicate {
                    sync_id: sync_id.unwrap_or_default(),
                    running: state == Some("running"),
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
            insert_request(&mut tx, rid, spec, "pending", None).await?;
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
        insert_request(&mut tx, rid, spec, "planned", Some(&sync_id)).await?;
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
    let pending: Vec<PendingRequest> = sqlx::query_as(
        "SELECT request_id, sync_type::text, entities, since, until, sweep FROM loansync_request \
         WHERE state = 'pending' ORDER BY received_at, request_id FOR UPDATE",
    )
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
    sqlx::query(
        "UPDATE loansync_request SET state = 'planned', sync_id = $2, planned_at = now() \
         WHERE request_id = ANY($1)",
    )
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
    sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM loansync_request WHERE state = 'pending') \
            AND NOT EXISTS (SELECT 1 FROM loansync_sync WHERE state <> 'done')",
    )
    .fetch_one(pool)
    .await
}

/// The pending requests, oldest first: request id, sync type, received at, and for a
/// backfill its lower bound.
pub async fn pending_requests(
    pool: &PgPool,
) -> sqlx::Result<Vec<(String, String, DateTime<Utc>, Option<DateTime<Utc>>)>> {
    sqlx::query_as(
        "SELECT request_id, CASE WHEN sweep THEN 'sweep' ELSE sync_type::text END, received_at, since \
         FROM loansync_request WHERE state = 'pending' ORDER BY received_at, request_id",
    )
    .fetch_all(pool)
    .await
}

/// A request known to the ledger, as [`begin_sync`] finds it.
#[derive(Debug, sqlx::FromRow)]
struct KnownRequest {
    req_state: String,
    sync_id: Option<String>,
    sync_state: Option<String>,
    window_hi: Option<DateTime<Utc>>,
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
    sqlx::query(
        "INSERT INTO loansync_sync (sync_id, request_id, sync_type, purpose, entities, state, window_hi, since) \
         VALUES ($1, $2, $3, $4, $5, 'planning', $6, $7)",
    )
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
    state: &str,
    sync_id: Option<&str>,
) -> sqlx::Result<()> {
    let names: Vec<&str> = spec.entities.iter().map(|e| e.as_str()).collect();
    sqlx::query(
        "INSERT INTO loansync_request (request_id, sync_type, entities, since, until, state, sync_id, planned_at, sweep) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, CASE WHEN $7::text IS NULL THEN NULL ELSE now() END, $8)",
    )
    .bind(request_id)
    .bind(spec.sync_type.as_str())
    .bind(&names)
    .bind(spec.since)
    .bind(spec.until)
    .bind(state)
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
/// counters (nothing was planned), the slot and its request id freed. With `requeue`
/// (a takeover by the next planner, not an operator's abandon), the requests it served
/// are pending again, so that none is lost.
async fn abandon_orphan(
    conn: &mut PgConnection,
    sync_id: &str,
    reason: &str,
    requeue: bool,
) -> sqlx::Result<()> {
    if requeue {
        sqlx::query(
            // A request without an id of its own is not: its planning message, unacked,
            // comes back from the broker as a new request.
            "UPDATE loansync_request SET state = 'pending', sync_id = NULL, planned_at = NULL \
             WHERE sync_id = $1 AND request_id NOT LIKE 'anonymous-%'",
        )
        .bind(sync_id)
        .execute(&mut *conn)
        .await?;
    }
    sqlx::query(
        "UPDATE etl_folder_etlsynchistory SET status = 'failed', completed_at = now(), \
         duration_seconds = EXTRACT(EPOCH FROM (now() - started_at))::float8, error_message = $2 \
         WHERE sync_id = $1",
    )
    .bind(sync_id)
    .bind(reason)
    .execute(&mut *conn)
    .await?;
    sqlx::query(
        "UPDATE loansync_sync SET state = 'done', request_id = NULL, finished_at = now(), \
         chunks_remaining = 0 WHERE sync_id = $1",
    )
    .bind(sync_id)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// The watermark of an entity: `etl_folder_etllastsync.last_sync_timestamp`.
pub async fn watermark(
    conn: &mut PgConnection,
    entity: EntityKind,
) -> sqlx::Result<Option<DateTime<Utc>>> {
    sqlx::query_scalar(
        "SELECT last_sync_timestamp FROM etl_folder_etllastsync WHERE entity_type = $1",
    )
    .bind(entity.as_str())
    .fetch_optional(conn)
    .await
}

/// Totals of a planned sync, per entity.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct PlanTotals {
    pub records: Vec<(EntityKind, i64)>,
    pub chunks: i64,
}

/// A keyset page of the ids with unresolved error rows (for `loansync errors retry`).
pub async fn next_unresolved_ids(
    conn: &mut PgConnection,
    entity: EntityKind,
    after: i64,
    limit: i64,
) -> sqlx::Result<Vec<i64>> {
    sqlx::query_scalar(
        "SELECT DISTINCT id FROM ( \
             SELECT CASE WHEN entity_id ~ '^[0-9]{1,18}$' THEN entity_id::int8 END AS id \
             FROM etl_folder_etlsyncerror WHERE entity_type = $1 AND NOT resolved) e \
         WHERE id > $2 ORDER BY id LIMIT $3",
    )
    .bind(entity.as_str())
    .bind(after)
    .bind(limit)
    .fetch_all(conn)
    .await
}

/// Records ids a sweep found gone from the source (or no longer selected): a row each
/// in `loansync_deleted` (detected again: its time and sync move), and the delivered
/// fingerprint removed, so that a row that comes back is sent again. In the planning
/// transaction. Returns how many ids.
pub async fn record_deleted(
    conn: &mut PgConnection,
    sync_id: &str,
    entity: EntityKind,
    ids: &[i64],
) -> sqlx::Result<u64> {
    if ids.is_empty() {
        return Ok(0);
    }
    sqlx::query(
        "INSERT INTO loansync_deleted (entity, id, sync_id) SELECT $1, unnest($2::int8[]), $3 \
         ON CONFLICT (entity, id) DO UPDATE SET detected_at = now(), sync_id = EXCLUDED.sync_id",
    )
    .bind(entity.as_str())
    .bind(ids)
    .bind(sync_id)
    .execute(&mut *conn)
    .await?;
    sqlx::query("DELETE FROM loansync_delivered WHERE entity = $1 AND id = ANY($2::int8[])")
        .bind(entity.as_str())
        .bind(ids)
        .execute(&mut *conn)
        .await?;
    Ok(ids.len() as u64)
}

/// One deleted record, as `loansync deletes list` shows it.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct DeletedRow {
    pub entity: String,
    pub id: i64,
    pub detected_at: DateTime<Utc>,
    pub sync_id: String,
}

/// Deleted records found by sweeps, by entity and id, optionally of one entity.
pub async fn list_deleted(
    pool: &PgPool,
    entity: Option<EntityKind>,
    limit: i64,
) -> sqlx::Result<Vec<DeletedRow>> {
    sqlx::query_as(
        "SELECT entity::text AS entity, id, detected_at, sync_id::text AS sync_id FROM loansync_deleted \
         WHERE $1::text IS NULL OR entity = $1 ORDER BY entity, id LIMIT $2",
    )
    .bind(entity.map(|e| e.as_str()))
    .bind(limit)
    .fetch_all(pool)
    .await
}

/// How many deleted records sweeps found, per entity (entities with none are absent).
pub async fn deleted_counts(pool: &PgPool) -> sqlx::Result<Vec<(String, i64)>> {
    sqlx::query_as(
        "SELECT entity::text, count(*) FROM loansync_deleted GROUP BY entity ORDER BY entity",
    )
    .fetch_all(pool)
    .await
}

/// One error row, as `loansync errors list` shows it.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct ErrorRow {
    pub id: i32,
    pub sync_id: String,
    pub entity_type: String,
    pub entity_id: String,
    pub error_code: Option<String>,
    pub error_message: String,
    pub error_details: Option<serde_json::Value>,
    pub created_at: DateTime<Utc>,
    pub retry_count: i32,
    pub last_retry_at: Option<DateTime<Utc>>,
    pub resolved: bool,
    pub resolved_at: Option<DateTime<Utc>>,
}

/// Error rows, newest first, filtered by sync, entity and resolution.
pub async fn list_errors(
    pool: &PgPool,
    sync_id: Option<&str>,
    entity: Option<EntityKind>,
    unresolved_only: bool,
    limit: i64,
) -> sqlx::Result<Vec<ErrorRow>> {
    sqlx::query_as(
        "SELECT e.id, h.sync_id::text AS sync_id, e.entity_type::text AS entity_type, e.entity_id::text AS entity_id, \
                e.error_code::text AS error_code, e.error_message, e.error_details, e.created_at, e.retry_count, \
                e.last_retry_at, e.resolved, e.resolved_at \
         FROM etl_folder_etlsyncerror e JOIN etl_folder_etlsynchistory h ON h.id = e.sync_history_id \
         WHERE ($1::text IS NULL OR h.sync_id = $1) AND ($2::text IS NULL OR e.entity_type = $2) \
           AND (NOT $3 OR NOT e.resolved) \
         ORDER BY e.created_at DESC, e.id DESC LIMIT $4",
    )
    .bind(sync_id)
    .bind(entity.map(|e| e.as_str()))
    .bind(unresolved_only)
    .bind(limit)
    .fetch_all(pool)
    .await
}

/// Marks error rows resolved by hand; returns how many were open.
pub async fn resolve_errors(pool: &PgPool, ids: &[i32]) -> sqlx::Result<u64> {
    Ok(sqlx::query(
        "UPDATE etl_folder_etlsyncerror SET resolved = true, resolved_at = now() \
         WHERE id = ANY($1) AND NOT resolved",
    )
    .bind(ids)
    .execute(pool)
    .await?
    .rows_affected())
}

/// Records one entity's window and its chunks in the ledger.
pub async fn insert_chunk(
    conn: &mut PgConnection,
    sync_id: &str,
    entity: EntityKind,
    seq: i32,
    ids: &[i64],
) -> sqlx::Result<()> {
    sqlx::query("INSERT INTO loansync_chunk (sync_id, entity, seq, ids) VALUES ($1, $2, $3, $4)")
        .bind(sync_id)
        .bind(entity.as_str())
        .bind(seq)
        .bind(ids)
        .execute(conn)
        .await?;
    Ok(())
}

pub async fn insert_sync_entity(
    conn: &mut PgConnection,
    sync_id: &str,
    entity: EntityKind,
    window: &SyncWindow,
    planned: i64,
) -> sqlx::Result<()> {
    sqlx::query(
        "INSERT INTO loansync_sync_entity (sync_id, entity, window_lo, window_hi, planned) \
         VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(sync_id)
    .bind(entity.as_str())
    .bind(window.lo)
    .bind(window.hi)
    .bind(planned as i32)
    .execute(conn)
    .await?;
    Ok(())
}

/// Locks the sync's row and checks that it is still `planning`, then removes what a dead
/// planner may have left of its plan, so it can be planned again. Returns false (and
/// touches nothing) when the sync is planned already: a ledger another planner committed
/// is never cleared or rewritten.
pub async fn clear_plan(conn: &mut PgConnection, sync_id: &str) -> sqlx::Result<bool> {
    let state: Option<String> =
        sqlx::query_scalar("SELECT state FROM loansync_sync WHERE sync_id = $1 FOR UPDATE")
            .bind(sync_id)
            .fetch_optional(&mut *conn)
            .await?;
    if state.as_deref() != Some("planning") {
        return Ok(false);
    }
    sqlx::query("DELETE FROM loansync_chunk WHERE sync_id = $1")
        .bind(sync_id)
        .execute(&mut *conn)
        .await?;
    sqlx::query("DELETE FROM loansync_sync_entity WHERE sync_id = $1")
        .bind(sync_id)
        .execute(&mut *conn)
        .await?;
    Ok(true)
}

/// Writes the totals and moves the sync to `in_progress` (or finalizes it at once when
/// there is nothing to send). Runs inside the planning transaction.
pub async fn write_plan(
    conn: &mut PgConnection,
    sync_id: &str,
    totals: &PlanTotals,
    window_lo: Option<DateTime<Utc>>,
    window_hi: DateTime<Utc>,
) -> sqlx::Result<Option<FinalStatus>> {
    let total = |e: EntityKind| {
        totals
            .records
            .iter()
            .find(|(k, _)| *k == e)
            .map(|(_, n)| *n as i32)
            .unwrap_or(0)
    };
    sqlx::query(
        "UPDATE etl_folder_etlsynchistory SET status = 'in_progress', \
         total_loans = $2, total_repayments = $3, total_customers = $4, total_officers = $5, \
         sync_start_date = $6, sync_end_date = $7 WHERE sync_id = $1",
    )
    .bind(sync_id)
    .bind(total(EntityKind::Loan))
    .bind(total(EntityKind::Repayment))
    .bind(total(EntityKind::Customer))
    .bind(total(EntityKind::Officer))
    .bind(window_lo)
    .bind(window_hi)
    .execute(&mut *conn)
    .await?;
    sqlx::query(
        "UPDATE loansync_sync SET state = 'running', chunks_total = $2, chunks_remaining = $2, \
         last_progress_at = now() WHERE sync_id = $1",
    )
    .bind(sync_id)
    .bind(totals.chunks as i32)
    .execute(&mut *conn)
    .await?;
    if totals.chunks == 0 {
        return finalize(conn, sync_id).await.map(Some);
    }
    Ok(None)
}

/// The ledger's view of one chunk, read by a worker before it does any work.
#[derive(Debug, Clone)]
pub struct ChunkState {
    pub ids: Vec<i64>,
    pub settled: bool,
    pub sync_type: SyncType,
    pub purpose: Purpose,
    pub history_id: i32,
    /// How many workers started on this chunk, this one included.
    pub attempts: i32,
}

/// Reads a chunk and counts the attempt. `None` when the ledger has no such chunk.
pub async fn start_chunk(
    pool: &PgPool,
    sync_id: &str,
    entity: EntityKind,
    seq: i32,
) -> sqlx::Result<Option<ChunkState>> {
    let row = sqlx::query(
        "UPDATE loansync_chunk c SET attempts = c.attempts + 1 \
         FROM loansync_sync s, etl_folder_etlsynchistory h \
         WHERE c.sync_id = $1 AND c.entity = $2 AND c.seq = $3 \
           AND s.sync_id = c.sync_id AND h.sync_id = c.sync_id \
         RETURNING c.ids, c.settled_at IS NOT NULL, s.sync_type, s.purpose, h.id, c.attempts",
    )
    .bind(sync_id)
    .bind(entity.as_str())
    .bind(seq)
    .fetch_optional(pool)
    .await?;
    Ok(row.map(|r| {
        let sync_type: String = r.get(2);
        let purpose: String = r.get(3);
        ChunkState {
            ids: r.get(0),
            settled: r.get(1),
            sync_type: if sync_type == "full" {
                SyncType::Full
            } else {
                SyncType::Incremental
            },
            purpose: match purpose.as_str() {
                "retry" => Purpose::Retry,
                "backfill" => Purpose::Backfill,
                "sweep" => Purpose::Sweep,
                _ => Purpose::Sync,
            },
            history_id: r.get(4),
            attempts: r.get(5),
        }
    }))
}

/// Where a planning request is: `pending` or `planned`, the sync serving it, and
/// whether that sync has finished.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestState {
    pub state: String,
    pub sync_id: Option<String>,
    pub finished: bool,
}

/// [`RequestState`] of a request id; `None` until a planner has taken the request.
pub async fn request_state(pool: &PgPool, request_id: &str) -> sqlx::Result<Option<RequestState>> {
    let row: Option<(String, Option<String>, Option<String>)> = sqlx::query_as(
        "SELECT r.state, r.sync_id::text, s.state FROM loansync_request r \
         LEFT JOIN loansync_sync s USING (sync_id) WHERE r.request_id = $1",
    )
    .bind(request_id)
    .fetch_optional(pool)
    .await?;
    Ok(row.map(|(state, sync_id, sync_state)| RequestState {
        state,
        finished: sync_state.as_deref() == Some("done"),
        sync_id,
    }))
}

/// One entity's watermark, as `loansync watermark show` prints it.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct Watermark {
    pub entity: String,
    pub last_sync_timestamp: DateTime<Utc>,
    pub last_sync_id: String,
    pub updated_at: DateTime<Utc>,
}

/// Every entity's watermark (entities never synced have none).
pub async fn watermarks(pool: &PgPool) -> sqlx::Result<Vec<Watermark>> {
    sqlx::query_as(
        "SELECT entity_type::text AS entity, last_sync_timestamp, last_sync_id::text AS last_sync_id, updated_at \
         FROM etl_folder_etllastsync ORDER BY entity_type",
    )
    .fetch_all(pool)
    .await
}

/// What [`set_watermark`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatermarkSet {
    /// Moved; the audit row in the history has this sync id.
    Moved {
        from: Option<DateTime<Utc>>,
        audit_sync_id: String,
    },
    /// Not moved: a sync is planning or running (its end would overwrite it).
    Busy { active_sync_id: String },
}

/// Sets an entity's watermark by hand, audited in the history: a row of its own
/// (`incremental`, `completed`, no records, the window from the old watermark to the new
/// one, `error_message` saying who moved it and why) that the watermark row names as
/// its last sync. Refused while a sync is active. The caller holds the [`PlanningLock`].
pub async fn set_watermark(
    pool: &PgPool,
    _lock: &PlanningLock,
    entity: EntityKind,
    to: DateTime<Utc>,
    reason: &str,
) -> sqlx::Result<WatermarkSet> {
    let mut tx = pool.begin().await?;
    let active: Option<String> =
        sqlx::query_scalar("SELECT sync_id::text FROM loansync_sync WHERE state <> 'done' LIMIT 1")
            .fetch_optional(&mut *tx)
            .await?;
    if let Some(active_sync_id) = active {
        return Ok(WatermarkSet::Busy { active_sync_id });
    }
    let from: Option<DateTime<Utc>> = sqlx::query_scalar(
        "SELECT last_sync_timestamp FROM etl_folder_etllastsync WHERE entity_type = $1 FOR UPDATE",
    )
    .bind(entity.as_str())
    .fetch_optional(&mut *tx)
    .await?;
    let audit_sync_id = format!("watermark-{}", uuid::Uuid::new_v4());
    let message = format!(
        "watermark of {entity} set by hand (loansync watermark set) from {} to {}: {reason}",
        from.map_or_else(|| "none".to_string(), |t| t.to_rfc3339()),
        to.to_rfc3339()
    );
    sqlx::query(INSERT_HISTORY)
        .bind(&audit_sync_id)
        .bind(SyncType::Incremental.as_str())
        .execute(&mut *tx)
        .await?;
    sqlx::query(
        "UPDATE etl_folder_etlsynchistory SET status = 'completed', completed_at = now(), \
         duration_seconds = 0, sync_start_date = $2, sync_end_date = $3, error_message = $4 \
         WHERE sync_id = $1",
    )
    .bind(&audit_sync_id)
    .bind(from)
    .bind(to)
    .bind(&message)
    .execute(&mut *tx)
    .await?;
    sqlx::query(UPSERT_WATERMARK)
        .bind(entity.as_str())
        .bind(to)
        .bind(&audit_sync_id)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    tracing::warn!(%entity, from = ?from, to = %to.to_rfc3339(), %reason, audit_sync_id, "watermark set by hand");
    Ok(WatermarkSet::Moved {
        from,
        audit_sync_id,
    })
}

/// Whether the sync exists and is finished.
pub async fn sync_finished(pool: &PgPool, sync_id: &str) -> sqlx::Result<bool> {
    let state: Option<String> =
        sqlx::query_scalar("SELECT state FROM loansync_sync WHERE sync_id = $1")
            .bind(sync_id)
            .fetch_optional(pool)
            .await?;
    Ok(state.as_deref() == Some("done"))
}

/// One record that failed, as it will be written to `etl_folder_etlsyncerror`.
#[derive(Debug, Clone)]
pub struct FailedRecord {
    pub id: i64,
    pub error_code: String,
    pub message: String,
    pub details: serde_json::Value,
}

/// What a worker learned about one chunk, to be settled in one transaction.
#[derive(Debug, Clone)]
pub struct ChunkResult<'a> {
    pub sync_id: &'a str,
    pub entity: EntityKind,
    pub seq: i32,
    pub history_id: i32,
    pub purpose: Purpose,
    pub succeeded: &'a [i64],
    /// The fingerprint of each accepted record (see `source::LoadedChunk`), written to
    /// `loansync_delivered`: what the platform now holds.
    pub delivered: &'a [(i64, uuid::Uuid)],
    pub failed: &'a [FailedRecord],
    /// The last response body of the API for this chunk (already truncated).
    pub api_response: Option<&'a serde_json::Value>,
}

/// How settling went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settled {
    /// This call settled the chunk; `Some` when it was the sync's last chunk.
    Now(Option<FinalStatus>),
    /// The chunk was settled before (a redelivery or a duplicate): nothing was counted.
    Already,
}

/// Settles a chunk exactly once ([`settle_chunk_only`]), then, after the commit, looks
/// at the sync ([`after_settle`]): finalizes it when no chunk is left unsettled, else
/// rolls its history counters up when they are a second old. The settle transaction
/// touches no row shared with the other chunks of the sync, so settles of different
/// chunks never wait for each other.
pub async fn settle_chunk(pool: &PgPool, r: &ChunkResult<'_>) -> sqlx::Result<Settled> {
    if !settle_chunk_only(pool, r).await? {
        return Ok(Settled::Already);
    }
    Ok(Settled::Now(after_settle(pool, r.sync_id).await))
}

/// The settle transaction alone: marks the chunk settled with its counts and the API's
/// answer (only if it was not: the `settled_at IS NULL` guard), writes one error row per
/// failed record, resolves the open error rows of the records delivered, and writes their
/// fingerprints. Returns false (and changes nothing) when the chunk was settled before.
/// It does not finalize: [`settle_chunk`] does that after the commit, and so do the
/// planner's housekeeping and the next planner ([`finalize_settled`]) for a settler that
/// died in between.
pub async fn settle_chunk_only(pool: &PgPool, r: &ChunkResult<'_>) -> sqlx::Result<bool> {
    let mut tx = pool.begin().await?;
    let marked = sqlx::query(
        "UPDATE loansync_chunk SET settled_at = now(), outcome = 'delivered', succeeded = $4, failed = $5, \
         api_response = $6 WHERE sync_id = $1 AND entity = $2 AND seq = $3 AND settled_at IS NULL",
    )
    .bind(r.sync_id)
    .bind(r.entity.as_str())
    .bind(r.seq)
    .bind(r.succeeded.len() as i32)
    .bind(r.failed.len() as i32)
    .bind(r.api_response)
    .execute(&mut *tx)
    .await?;
    if marked.rows_affected() == 0 {
        tx.rollback().await?;
        return Ok(false);
    }
    if !r.failed.is_empty() {
        record_failures(&mut tx, r).await?;
    }
    if !r.succeeded.is_empty() {
        let ids: Vec<String> = r.succeeded.iter().map(|i| i.to_string()).collect();
        sqlx::query(RESOLVE_ERRORS)
            .bind(r.entity.as_str())
            .bind(&ids)
            .execute(&mut *tx)
            .await?;
    }
    if !r.delivered.is_empty() {
        record_delivered(&mut tx, r).await?;
    }
    tx.commit().await?;
    Ok(true)
}

/// How often, at most, the history counters of a running sync are rolled up from its
/// chunk rows by the settlers ([`roll_up`]).
pub const ROLL_UP_EVERY_SQL: &str = "interval '1 second'";

/// What a settler does after its settle committed, without waiting for other settlers:
/// one read (no lock) says whether any chunk of the sync is unsettled and whether the
/// counters are due for a roll-up. The last settler to commit always sees every chunk
/// settled (its read starts after every other settle committed) and finalizes
/// ([`finalize_if_settled`]; when several see it, exactly one does). Otherwise a due
/// roll-up is tried, skipped at once if another settler is doing it.
///
/// Returns the final status when this call finalized the sync. Failures are logged,
/// not returned (the chunk is settled): whatever was not done here is done by the
/// planner's housekeeping, the next planner or the end of a single-process sync
/// ([`finalize_settled`]).
pub async fn after_settle(pool: &PgPool, sync_id: &str) -> Option<FinalStatus> {
    static SQL: LazyLock<String> = LazyLock::new(|| {
        format!(
            "SELECT s.state = 'running', \
                    EXISTS (SELECT 1 FROM loansync_chunk c WHERE c.sync_id = s.sync_id AND c.settled_at IS NULL), \
                    s.rolled_up_at IS NULL OR s.rolled_up_at < now() - {ROLL_UP_EVERY_SQL} \
             FROM loansync_sync s WHERE s.sync_id = $1"
        )
    });
    let looked: sqlx::Result<Option<(bool, bool, bool)>> = sqlx::query_as(SQL.as_str())
        .bind(sync_id)
        .fetch_optional(pool)
        .await;
    let outcome = match looked {
        Ok(Some((true, false, _))) => finalize_if_settled(pool, sync_id).await,
        Ok(Some((true, true, true))) => roll_up(pool, sync_id).await.map(|_| None),
        Ok(_) => Ok(None),
        Err(e) => Err(e),
    };
    outcome.unwrap_or_else(|e| {
        tracing::warn!(%sync_id, error = %e, "after a settle: could not finalize or roll up the sync; \
                       the planner's housekeeping does it");
        None
    })
}

/// Rolls a running sync's history counters up from its chunk rows, if nobody did in the
/// last second: takes the `loansync_sync` row with `SKIP LOCKED` (a settler that does not
/// get it goes on at once), sets the counters to the sums ([`ROLL_UP_COUNTERS`]: absolute
/// values, idempotent) and `rolled_up_at`. Returns whether it rolled up.
pub async fn roll_up(pool: &PgPool, sync_id: &str) -> sqlx::Result<bool> {
    static SQL: LazyLock<String> = LazyLock::new(|| {
        format!(
            "SELECT 1 FROM loansync_sync WHERE sync_id = $1 AND state = 'running' \
               AND (rolled_up_at IS NULL OR rolled_up_at < now() - {ROLL_UP_EVERY_SQL}) \
             FOR UPDATE SKIP LOCKED"
        )
    });
    roll_up_if(pool, sync_id, SQL.as_str()).await
}

/// [`roll_up`] whatever the time of the last one (the planner's housekeeping, tests);
/// still `SKIP LOCKED`.
pub async fn roll_up_now(pool: &PgPool, sync_id: &str) -> sqlx::Result<bool> {
    roll_up_if(
        pool,
        sync_id,
        "SELECT 1 FROM loansync_sync WHERE sync_id = $1 AND state = 'running' FOR UPDATE SKIP LOCKED",
    )
    .await
}

async fn roll_up_if(pool: &PgPool, sync_id: &str, lock_sql: &str) -> sqlx::Result<bool> {
    let mut tx = pool.begin().await?;
    let got: Option<i32> = sqlx::query_scalar(sqlx::AssertSqlSafe(lock_sql))
        .bind(sync_id)
        .fetch_optional(&mut *tx)
        .await?;
    if got.is_none() {
        tx.rollback().await?;
        return Ok(false);
    }
    roll_up_counters(&mut tx, sync_id).await?;
    sqlx::query("UPDATE loansync_sync SET rolled_up_at = now() WHERE sync_id = $1")
        .bind(sync_id)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(true)
}

/// Sets the history counters (and `api_response`) from the chunk rows, in the caller's
/// transaction. The caller holds the `loansync_sync` row (lock order: chunk rows, then
/// the sync row, then the history row).
async fn roll_up_counters(conn: &mut PgConnection, sync_id: &str) -> sqlx::Result<()> {
    sqlx::query(ROLL_UP_COUNTERS)
        .bind(sync_id)
        .execute(conn)
        .await?;
    Ok(())
}

/// Finalizes a running sync whose chunks are all settled, exactly once: locks its
/// `loansync_sync` row, checks that it is still running and that no chunk is unsettled
/// (under that lock, so a second finalizer finds it `done` and does nothing), then
/// [`finalize`]. `None` when it is not running or a chunk is still unsettled.
pub async fn finalize_if_settled(
    pool: &PgPool,
    sync_id: &str,
) -> sqlx::Result<Option<FinalStatus>> {
    let mut tx = pool.begin().await?;
    let state: Option<String> =
        sqlx::query_scalar("SELECT state FROM loansync_sync WHERE sync_id = $1 FOR UPDATE")
            .bind(sync_id)
            .fetch_optional(&mut *tx)
            .await?;
    let unsettled: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM loansync_chunk WHERE sync_id = $1 AND settled_at IS NULL)",
    )
    .bind(sync_id)
    .fetch_one(&mut *tx)
    .await?;
    if state.as_deref() != Some("running") || unsettled {
        tx.rollback().await?;
        return Ok(None);
    }
    let status = finalize(&mut tx, sync_id).await?;
    tx.commit().await?;
    Ok(Some(status))
}

/// A sync finalized by [`finalize_settled`] rather than by its last settler.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finalized {
    pub sync_id: String,
    pub sync_type: SyncType,
    pub status: FinalStatus,
}

/// The safety net of the settle: finalizes every running sync whose chunks are all
/// settled (a settler that died between its commit and its finalize leaves one), and
/// rolls up the counters of the others. Run by the planner's housekeeping tick, before
/// a planner claims the slot, at the end of a single-process sync and by `resume`.
pub async fn finalize_settled(pool: &PgPool) -> sqlx::Result<Vec<Finalized>> {
    let running: Vec<(String, String, bool)> = sqlx::query_as(
        "SELECT s.sync_id::text, s.sync_type::text, \
                EXISTS (SELECT 1 FROM loansync_chunk c WHERE c.sync_id = s.sync_id AND c.settled_at IS NULL) \
         FROM loansync_sync s WHERE s.state = 'running'",
    )
    .fetch_all(pool)
    .await?;
    let mut finalized = Vec::new();
    for (sync_id, sync_type, unsettled) in running {
        if unsettled {
            roll_up_now(pool, &sync_id).await?;
        } else if let Some(status) = finalize_if_settled(pool, &sync_id).await? {
            tracing::info!(%sync_id, status = status.as_str(), "finalized a sync whose chunks were all settled");
            finalized.push(Finalized {
                sync_id,
                sync_type: if sync_type == "full" {
                    SyncType::Full
                } else {
                    SyncType::Incremental
                },
                status,
            });
        }
    }
    Ok(finalized)
}

/// Writes what the platform now holds of the accepted records: their fingerprints (in
/// the settle transaction, so a settled chunk and its fingerprints commit together). A
/// record delivered again after a sweep found it gone is no longer gone.
async fn record_delivered(conn: &mut PgConnection, r: &ChunkResult<'_>) -> sqlx::Result<()> {
    let (ids, fps): (Vec<i64>, Vec<uuid::Uuid>) = r.delivered.iter().copied().unzip();
    sqlx::query(
        "INSERT INTO loansync_delivered (entity, id, fingerprint, sync_id) \
         SELECT $1, d.id, d.fp, $4 FROM unnest($2::int8[], $3::uuid[]) AS d (id, fp) \
         ON CONFLICT (entity, id) DO UPDATE SET fingerprint = EXCLUDED.fingerprint, \
             sync_id = EXCLUDED.sync_id, delivered_at = now()",
    )
    .bind(r.entity.as_str())
    .bind(&ids)
    .bind(&fps)
    .bind(r.sync_id)
    .execute(&mut *conn)
    .await?;
    sqlx::query("DELETE FROM loansync_deleted WHERE entity = $1 AND id = ANY($2::int8[])")
        .bind(r.entity.as_str())
        .bind(&ids)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

async fn record_failures(conn: &mut PgConnection, r: &ChunkResult<'_>) -> sqlx::Result<()> {
    let ids: Vec<String> = r.failed.iter().map(|f| f.id.to_string()).collect();
    let codes: Vec<String> = r
        .failed
        .iter()
        .map(|f| truncate(&f.error_code, 100))
        .collect();
    let messages: Vec<&str> = r.failed.iter().map(|f| f.message.as_str()).collect();
    let details: Vec<&serde_json::Value> = r.failed.iter().map(|f| &f.details).collect();
    let sql = match r.purpose {
        Purpose::Sync | Purpose::Backfill | Purpose::Sweep => INSERT_ERRORS,
        Purpose::Retry => RETRY_ERRORS,
    };
    sqlx::query(sql)
        .bind(r.entity.as_str())
        .bind(&ids)
        .bind(&codes)
        .bind(&messages)
        .bind(sqlx::types::Json(&details))
        .bind(r.history_id)
        .execute(conn)
        .await?;
    Ok(())
}

fn truncate(s: &str, max_chars: usize) -> String {
    s.chars().take(max_chars).collect()
}

/// Closes a sync whose chunks are all settled: the history counters set exactly from
/// the chunk rows (sums per entity), status, `completed_at`, `duration_seconds`,
/// `error_message`, and the watermarks of a successful regular sync; `state = 'done'`.
/// The caller holds the `loansync_sync` row (or plans the sync in this transaction) and
/// has checked that it is running with no chunk unsettled ([`finalize_if_settled`]).
pub async fn finalize(conn: &mut PgConnection, sync_id: &str) -> sqlx::Result<FinalStatus> {
    roll_up_counters(&mut *conn, sync_id).await?;
    let row = sqlx::query(
        "SELECT h.loans_success + h.repayments_success + h.customers_success + h.officers_success, \
                h.loans_failed + h.repayments_failed + h.customers_failed + h.officers_failed, \
                h.loans_failed, h.repayments_failed, h.customers_failed, h.officers_failed, \
                s.purpose, s.entities, s.window_hi, h.status \
         FROM etl_folder_etlsynchistory h JOIN loansync_sync s USING (sync_id) \
         WHERE sync_id = $1",
    )
    .bind(sync_id)
    .fetch_one(&mut *conn)
    .await?;
    let succeeded: i32 = row.get(0);
    let failed: i32 = row.get(1);
    let purpose: String = row.get(6);
    let entities: Vec<String> = row.get(7);
    let window_hi: DateTime<Utc> = row.get(8);
    let current: String = row.get(9);
    let (status, message) = if current == "failed" {
        // Already failed fast (abort_sync); keep its message.
        (FinalStatus::Failed, None)
    } else if failed == 0 {
        (FinalStatus::Completed, None)
    } else {
        let per_entity: Vec<String> = [
            ("loan", row.get::<i32, _>(2)),
            ("repayment", row.get::<i32, _>(3)),
            ("customer", row.get::<i32, _>(4)),
            ("officer", row.get::<i32, _>(5)),
        ]
        .into_iter()
        .filter(|(_, n)| *n > 0)
        .map(|(e, n)| format!("{e}: {n}"))
        .collect();
        let msg = format!(
            "{failed} of {} records failed ({}); see etl_folder_etlsyncerror for each record's error, \
             and `loansync errors retry` to deliver them again",
            failed + succeeded,
            per_entity.join(", ")
        );
        if succeeded == 0 {
            (FinalStatus::Failed, Some(msg))
        } else {
            (FinalStatus::PartialSuccess, Some(msg))
        }
    };
    sqlx::query(
        "UPDATE etl_folder_etlsynchistory SET status = $2, completed_at = now(), \
         duration_seconds = EXTRACT(EPOCH FROM (now() - started_at))::float8, \
         error_message = COALESCE($3, error_message) WHERE sync_id = $1",
    )
    .bind(sync_id)
    .bind(status.as_str())
    .bind(message)
    .execute(&mut *conn)
    .await?;
    if status != FinalStatus::Failed && purpose == "sync" {
        for entity in &entities {
            sqlx::query(UPSERT_WATERMARK)
                .bind(entity)
                .bind(window_hi)
                .bind(sync_id)
                .execute(&mut *conn)
                .await?;
        }
    }
    sqlx::query(
        "UPDATE loansync_sync SET state = 'done', chunks_remaining = 0, finished_at = now(), \
         rolled_up_at = now() WHERE sync_id = $1",
    )
    .bind(sync_id)
    .execute(&mut *conn)
    .await?;
    Ok(status)
}

/// Fails a sync fast (the API refused the credentials): its unsettled chunks are settled
/// as failed records without error rows, so `success + failed == total` still holds, and
/// no watermark moves. Returns false when the sync was already finished.
pub async fn abort_sync(
    pool: &PgPool,
    sync_id: &str,
    reason: &str,
    api_response: Option<&serde_json::Value>,
) -> sqlx::Result<bool> {
    fail_unsettled(pool, sync_id, reason, api_response, Unsettled::Aborted).await
}

/// How [`fail_unsettled`] settles the chunks it finds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Unsettled {
    /// Rejected credentials: failed, no error rows (nothing is wrong with the records).
    Aborted,
    /// Ended by hand: failed with error rows `SYNC_ABANDONED`, so `errors retry` can
    /// deliver them later (a retry sync's records keep their original rows).
    Abandoned,
}

/// The error code of the records of a sync ended by hand.
pub const ABANDONED_CODE: &str = "SYNC_ABANDONED";

/// Settles every unsettled chunk of a running sync as failed and finalizes it `failed`.
/// Locks in the ledger's order (chunks, sync, history): a settle that holds a chunk is
/// waited for, and the chunk it settled is skipped; a roll-up or a finalize that holds
/// the sync row is waited for. The counters are then set from the chunk rows
/// ([`finalize`]), so every chunk counts once. Concurrent calls for one sync are
/// serialized by a transaction advisory lock that settles never take.
async fn fail_unsettled(
    pool: &PgPool,
    sync_id: &str,
    reason: &str,
    api_response: Option<&serde_json::Value>,
    how: Unsettled,
) -> sqlx::Result<bool> {
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended('loansync.fail:' || $1, 0))")
        .bind(sync_id)
        .execute(&mut *tx)
        .await?;
    let state: Option<String> =
        sqlx::query_scalar("SELECT state FROM loansync_sync WHERE sync_id = $1")
            .bind(sync_id)
            .fetch_optional(&mut *tx)
            .await?;
    if state.as_deref() != Some("running") {
        tx.rollback().await?;
        return Ok(false);
    }
    let outcome = match how {
        Unsettled::Aborted => "aborted",
        Unsettled::Abandoned => "abandoned",
    };
    sqlx::query(
        "UPDATE loansync_chunk SET settled_at = now(), outcome = $2, succeeded = 0, \
                failed = cardinality(ids) WHERE sync_id = $1 AND settled_at IS NULL",
    )
    .bind(sync_id)
    .bind(outcome)
    .execute(&mut *tx)
    .await?;
    if how == Unsettled::Abandoned {
        sqlx::query(
            "INSERT INTO etl_folder_etlsyncerror ( \
                 entity_type, entity_id, error_code, error_message, error_details, \
                 created_at, retry_count, last_retry_at, resolved, resolved_at, sync_history_id) \
             SELECT c.entity, u.id::text, $2, $3, jsonb_build_object('abandoned', true), \
                    now(), 0, NULL, false, NULL, h.id \
             FROM loansync_chunk c CROSS JOIN LATERAL unnest(c.ids) AS u(id) \
             JOIN etl_folder_etlsynchistory h ON h.sync_id = c.sync_id \
             JOIN loansync_sync s ON s.sync_id = c.sync_id \
             WHERE c.sync_id = $1 AND c.outcome = 'abandoned' AND s.purpose <> 'retry'",
        )
        .bind(sync_id)
        .bind(ABANDONED_CODE)
        .bind(reason)
        .execute(&mut *tx)
        .await?;
    }
    // The sync row, then the history row. A settler that finalized the sync meanwhile
    // (every chunk was settled already) has left it 'done'.
    let still_running: bool = sqlx::query_scalar(
        "SELECT state = 'running' FROM loansync_sync WHERE sync_id = $1 FOR UPDATE",
    )
    .bind(sync_id)
    .fetch_one(&mut *tx)
    .await?;
    if !still_running {
        tx.rollback().await?;
        return Ok(false);
    }
    sqlx::query(
        "UPDATE etl_folder_etlsynchistory SET status = 'failed', error_message = $2 WHERE sync_id = $1",
    )
    .bind(sync_id)
    .bind(reason)
    .execute(&mut *tx)
    .await?;
    finalize(&mut tx, sync_id).await?;
    if let Some(body) = api_response {
        // The answer that failed the sync is the last one, whatever the chunks kept.
        sqlx::query("UPDATE etl_folder_etlsynchistory SET api_response = $2 WHERE sync_id = $1")
            .bind(sync_id)
            .bind(body)
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    Ok(true)
}

/// What [`abandon_sync`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Abandoned {
    /// A running sync: its unsettled records were failed with [`ABANDONED_CODE`].
    Running,
    /// A sync still planning whose planner is gone: nothing had been sent.
    Planning,
    /// Nothing to do: the sync is finished (or unknown).
    NotActive { state: Option<String> },
}

/// Ends a sync by hand (`loansync abandon`): unsettled chunks settled as failed with
/// [`ABANDONED_CODE`] and error rows, history `failed` with `reason`, no watermark moved,
/// books balanced. The caller holds the [`PlanningLock`], so a `planning` sync here has
/// no live planner.
pub async fn abandon_sync(
    pool: &PgPool,
    _lock: &PlanningLock,
    sync_id: &str,
    reason: &str,
) -> sqlx::Result<Abandoned> {
    let state: Option<String> =
        sqlx::query_scalar("SELECT state FROM loansync_sync WHERE sync_id = $1")
            .bind(sync_id)
            .fetch_optional(pool)
            .await?;
    match state.as_deref() {
        Some("planning") => {
            let mut tx = pool.begin().await?;
            let still: Option<String> = sqlx::query_scalar(
                "SELECT state FROM loansync_sync WHERE sync_id = $1 AND state = 'planning' FOR UPDATE",
            )
            .bind(sync_id)
            .fetch_optional(&mut *tx)
            .await?;
            if still.is_none() {
                tx.rollback().await?;
                return Ok(Abandoned::NotActive { state });
            }
            abandon_orphan(&mut tx, sync_id, reason, false).await?;
            tx.commit().await?;
            Ok(Abandoned::Planning)
        }
        Some("running") => {
            if fail_unsettled(pool, sync_id, reason, None, Unsettled::Abandoned).await? {
                Ok(Abandoned::Running)
            } else {
                Ok(Abandoned::NotActive {
                    state: Some("done".into()),
                })
            }
        }
        _ => Ok(Abandoned::NotActive { state }),
    }
}

/// Deletes the chunk ledger (id lists) of syncs finished more than `retention` ago; the
/// sync, its history row, counters and error rows stay. Returns the chunk rows deleted.
pub async fn prune_chunks(pool: &PgPool, retention: std::time::Duration) -> sqlx::Result<u64> {
    let mut tx = pool.begin().await?;
    let deleted = sqlx::query(
        "WITH old AS (UPDATE loansync_sync SET chunks_pruned_at = now() \
                      WHERE state = 'done' AND chunks_pruned_at IS NULL \
                        AND finished_at < now() - make_interval(secs => $1) RETURNING sync_id) \
         DELETE FROM loansync_chunk c USING old WHERE c.sync_id = old.sync_id",
    )
    .bind(retention.as_secs_f64())
    .execute(&mut *tx)
    .await?
    .rows_affected();
    tx.commit().await?;
    Ok(deleted)
}

/// The chunks of a sync that are not settled yet, in publishing order.
pub async fn unsettled_chunks(
    pool: &PgPool,
    sync_id: &str,
) -> sqlx::Result<Vec<crate::domain::ChunkJob>> {
    let rows: Vec<(String, i32)> = sqlx::query_as(
        "SELECT entity::text, seq FROM loansync_chunk WHERE sync_id = $1 AND settled_at IS NULL ORDER BY entity, seq",
    )
    .bind(sync_id)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .filter_map(|(e, seq)| {
            e.parse().ok().map(|entity| crate::domain::ChunkJob {
                sync_id: sync_id.to_string(),
                entity,
                seq,
            })
        })
        .collect())
}

/// One sync as `loansync status` shows it.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct SyncSummary {
    pub sync_id: String,
    pub sync_type: String,
    pub status: String,
    pub started_at: DateTime<Utc>,
    pub completed_at: Option<DateTime<Utc>>,
    pub duration_seconds: Option<f64>,
    pub sync_start_date: Option<DateTime<Utc>>,
    pub sync_end_date: Option<DateTime<Utc>>,
    pub error_message: Option<String>,
    pub chunks_total: Option<i32>,
    pub chunks_remaining: Option<i32>,
    /// loansync's own state: `planning`, `running` or `done` (none for a sync it did not make).
    pub state: Option<String>,
    /// A running sync whose chunks have not moved for `ETL_STALE_SYNC_SECS`, or a
    /// planning one whose planner is gone.
    pub stalled: bool,
}

/// One entity's counters within a sync.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct EntityProgress {
    pub entity: EntityKind,
    pub total: i32,
    pub success: i32,
    pub failed: i32,
}

/// Per-entity counters of a sync: from the history row, except for a running sync,
/// whose settled chunks are summed (the history row is rolled up about once a second).
pub async fn entity_progress(pool: &PgPool, sync_id: &str) -> sqlx::Result<Vec<EntityProgress>> {
    let r = sqlx::query(
        "SELECT h.total_loans, COALESCE(c.ls, h.loans_success), COALESCE(c.lf, h.loans_failed), \
                h.total_repayments, COALESCE(c.rs, h.repayments_success), COALESCE(c.rf, h.repayments_failed), \
                h.total_customers, COALESCE(c.cs, h.customers_success), COALESCE(c.cf, h.customers_failed), \
                h.total_officers, COALESCE(c.osu, h.officers_success), COALESCE(c.ofa, h.officers_failed) \
         FROM etl_folder_etlsynchistory h \
         LEFT JOIN loansync_sync s ON s.sync_id = h.sync_id AND s.state = 'running' \
         LEFT JOIN LATERAL ( \
             SELECT coalesce(sum(succeeded) FILTER (WHERE entity = 'loan'), 0)::int4 AS ls, \
                    coalesce(sum(failed) FILTER (WHERE entity = 'loan'), 0)::int4 AS lf, \
                    coalesce(sum(succeeded) FILTER (WHERE entity = 'repayment'), 0)::int4 AS rs, \
                    coalesce(sum(failed) FILTER (WHERE entity = 'repayment'), 0)::int4 AS rf, \
                    coalesce(sum(succeeded) FILTER (WHERE entity = 'customer'), 0)::int4 AS cs, \
                    coalesce(sum(failed) FILTER (WHERE entity = 'customer'), 0)::int4 AS cf, \
                    coalesce(sum(succeeded) FILTER (WHERE entity = 'officer'), 0)::int4 AS osu, \
                    coalesce(sum(failed) FILTER (WHERE entity = 'officer'), 0)::int4 AS ofa \
             FROM loansync_chunk WHERE sync_id = s.sync_id AND settled_at IS NOT NULL \
             HAVING s.sync_id IS NOT NULL) c ON true \
         WHERE h.sync_id = $1",
    )
    .bind(sync_id)
    .fetch_one(pool)
    .await?;
    let at = |e: EntityKind, i: usize| EntityProgress {
        entity: e,
        total: r.get(i),
        success: r.get(i + 1),
        failed: r.get(i + 2),
    };
    Ok(vec![
        at(EntityKind::Officer, 9),
        at(EntityKind::Customer, 6),
        at(EntityKind::Loan, 0),
        at(EntityKind::Repayment, 3),
    ])
}

/// Recent syncs, newest first (or one sync when `sync_id` is given).
pub async fn recent_syncs(
    pool: &PgPool,
    sync_id: Option<&str>,
    limit: i64,
    stale_after_secs: i64,
) -> sqlx::Result<Vec<SyncSummary>> {
    static SQL: LazyLock<String> = LazyLock::new(|| {
        format!(
            "SELECT h.sync_id::text, h.sync_type::text, h.status::text, h.started_at, h.completed_at, h.duration_seconds, \
                    h.sync_start_date, h.sync_end_date, h.error_message, s.chunks_total, \
                    CASE WHEN s.state = 'running' THEN (SELECT count(*)::int4 FROM loansync_chunk c \
                         WHERE c.sync_id = s.sync_id AND c.settled_at IS NULL) \
                         WHEN s.sync_id IS NOT NULL THEN 0 END AS chunks_remaining, \
                    s.state::text AS state, COALESCE({}, false) AS stalled \
             FROM etl_folder_etlsynchistory h LEFT JOIN loansync_sync s USING (sync_id) \
             WHERE ($1::text IS NULL OR h.sync_id = $1) ORDER BY h.started_at DESC, h.id DESC LIMIT $2",
            stalled_sql("$3")
        )
    });
    sqlx::query_as(SQL.as_str())
        .bind(sync_id)
        .bind(limit)
        .bind(stale_after_secs as f64)
        .fetch_all(pool)
        .await
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
