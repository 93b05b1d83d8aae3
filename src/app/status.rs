//! `loansync status`: the recent syncs with what else waits (deleted records sweeps
//! found, pending planning requests), or one sync with its per-entity progress.

use super::error::AppError;
use super::report::{Report, progress_table};
use crate::ledger::lifecycle::PendingEntry;
use crate::ledger::{
    self,
    reads::{DeletedCount, EntityProgress, OldestUnsent, SyncSummary},
    states::SyncState,
};
use sqlx::PgPool;
use std::time::Duration;

/// What `loansync status` shows.
#[derive(Debug, Clone)]
pub enum StatusReport {
    /// `status SYNC_ID`: one sync and its per-entity counters.
    Sync {
        sync: SyncSummary,
        entities: Vec<EntityProgress>,
    },
    /// `status`: the recent syncs, newest first, and the facts of the installation an
    /// operator looks at beside them.
    Recent {
        syncs: Vec<SyncSummary>,
        /// Deleted records sweeps found, per entity (not sent: the API has no delete).
        deleted: Vec<DeletedCount>,
        /// Planning requests waiting for the active sync to end.
        pending: Vec<PendingEntry>,
        /// Per entity with a watermark and a modification time, the age of the oldest
        /// source change not yet sent (`etl_oldest_unsent_change_seconds`).
        unsent: Vec<OldestUnsent>,
        /// The live workers' limits on requests to the analytics API, and its RTT.
        workers: Vec<LiveWorker>,
        /// The fleet's adapted limit and pause (`loansync_api_pause`).
        board: FleetBoard,
    },
}

/// The board the workers share: the fleet's adapted limit and the API's pause.
#[derive(Debug, Clone, Default, serde::Serialize, sqlx::FromRow)]
pub struct FleetBoard {
    /// Requests in flight across the adaptive workers (none: each worker's own limit).
    pub fleet_limit: Option<i32>,
    /// Seconds since it was last lowered (backpressure), if ever.
    pub lowered_ago_seconds: Option<f64>,
    /// Seconds the fleet stays paused.
    pub paused_seconds: f64,
}

/// The board as it is now.
pub async fn fleet_board(pool: &PgPool) -> Result<FleetBoard, sqlx::Error> {
    let board: Option<FleetBoard> = sqlx::query_as(
        "SELECT fleet_limit,
                extract(epoch FROM now() - lowered_at)::float8 AS lowered_ago_seconds,
                greatest(extract(epoch FROM paused_until - now()), 0)::float8 AS paused_seconds
         FROM loansync_api_pause WHERE id = 1",
    )
    .fetch_optional(pool)
    .await?;
    Ok(board.unwrap_or_default())
}

/// A live worker as its last heartbeat recorded it (`loansync_worker`).
#[derive(Debug, Clone, serde::Serialize, sqlx::FromRow)]
pub struct LiveWorker {
    pub worker_id: String,
    pub mode: String,
    /// Its own limit (fixed, or the adaptive controller's).
    pub concurrency_limit: i32,
    pub in_flight: i32,
    /// Its share of `ANALYTICS_MAX_IN_FLIGHT` (none: no cap).
    pub fleet_share: Option<i32>,
    /// The API's RTT as it sees it, in ms.
    pub rtt_ms: Option<f64>,
    /// Seconds since its heartbeat.
    pub age_seconds: f64,
}

/// The workers whose heartbeat has not expired, by id.
pub async fn live_workers(pool: &PgPool) -> Result<Vec<LiveWorker>, sqlx::Error> {
    sqlx::query_as(
        "SELECT worker_id, mode, concurrency_limit, in_flight, fleet_share, rtt_ms,
                extract(epoch FROM now() - beat_at)::float8 AS age_seconds
         FROM loansync_worker WHERE expires_at > now() ORDER BY worker_id",
    )
    .fetch_all(pool)
    .await
}

/// The status of the sync `sync_id` (an error when there is none), or of the `limit`
/// most recent syncs; a sync counts as stalled after `stale_after` without progress.
pub async fn status(
    pool: &PgPool,
    stale_after: Duration,
    sync_id: Option<&str>,
    limit: i64,
) -> Result<StatusReport, AppError> {
    let stale = stale_after.as_secs() as i64;
    let mut syncs = ledger::reads::recent_syncs(pool, sync_id, limit, stale).await?;
    let Some(id) = sync_id else {
        return Ok(StatusReport::Recent {
            syncs,
            deleted: ledger::reads::deleted_counts(pool).await?,
            pending: ledger::lifecycle::pending_requests(pool).await?,
            unsent: ledger::reads::oldest_unsent(pool).await?,
            workers: live_workers(pool).await?,
            board: fleet_board(pool).await?,
        });
    };
    if syncs.is_empty() {
        return Err(AppError::refused(format!("no sync {id}")));
    }
    Ok(StatusReport::Sync {
        sync: syncs.swap_remove(0),
        entities: ledger::reads::entity_progress(pool, id).await?,
    })
}

/// As JSON, `{sync, entities}` for one sync (through a [`serde_json::Value`], so with its
/// keys sorted, as it has always been printed), the array of syncs for the recent ones.
impl serde::Serialize for StatusReport {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        #[derive(serde::Serialize)]
        struct One<'a> {
            sync: &'a SyncSummary,
            entities: &'a [EntityProgress],
        }
        match self {
            StatusReport::Sync { sync, entities } => serde_json::to_value(One { sync, entities })
                .map_err(serde::ser::Error::custom)?
                .serialize(serializer),
            StatusReport::Recent { syncs, .. } => syncs.serialize(serializer),
        }
    }
}

impl Report for StatusReport {
    /// 0: a status is shown whatever the syncs' outcomes.
    fn exit_code(&self) -> u8 {
        0
    }

    fn render(&self) -> String {
        match self {
            StatusReport::Sync { sync, entities } => render_sync(sync, entities),
            StatusReport::Recent {
                syncs,
                deleted,
                pending,
                unsent,
                workers,
                board,
            } => render_recent(syncs, deleted, pending, unsent) + &render_workers(workers, board),
        }
    }
}

fn render_sync(s: &SyncSummary, entities: &[EntityProgress]) -> String {
    let date = |d: Option<chrono::DateTime<chrono::Utc>>| {
        d.map(|d| d.to_rfc3339()).unwrap_or_else(|| "-".into())
    };
    let mut out = format!(
        "sync {}  {}  {}{}\n",
        s.sync_id,
        s.sync_type,
        s.status,
        stalled_hint(s)
    );
    out.push_str(&format!(
        "window   {} .. {}\n",
        date(s.sync_start_date),
        date(s.sync_end_date)
    ));
    if let (Some(t), Some(r)) = (s.chunks_total, s.chunks_remaining) {
        out.push_str(&format!("chunks   {} of {} settled\n", t - r, t));
    }
    if let Some(d) = s.duration_seconds {
        out.push_str(&format!("duration {d:.2}s\n"));
    }
    if let Some(m) = &s.error_message {
        out.push_str(&format!("error    {m}\n"));
    }
    out.push_str(&progress_table(entities, ["total", "success", "failed"]));
    out
}

/// What `status` says after a stalled sync, and what to do about it.
fn stalled_hint(s: &SyncSummary) -> &'static str {
    let state = s.state.as_deref().and_then(|st| st.parse().ok());
    match (s.stalled, state) {
        (false, _) => "",
        (true, Some(SyncState::Planning)) => {
            "  (STALLED: its planner is gone; the next sync abandons it, or run `loansync abandon`)"
        }
        (true, _) => "  (STALLED: run `loansync resume`, or `loansync abandon` to end it)",
    }
}

fn render_recent(
    syncs: &[SyncSummary],
    deleted: &[DeletedCount],
    pending: &[PendingEntry],
    unsent: &[OldestUnsent],
) -> String {
    let mut out = format!(
        "{:<36}  {:<11}  {:<15}  {:<20}  {:>9}\n",
        "sync_id", "type", "status", "started", "seconds"
    );
    for s in syncs {
        out.push_str(&format!(
            "{:<36}  {:<11}  {:<15}  {:<20}  {:>9}\n",
            s.sync_id,
            s.sync_type,
            if s.stalled {
                "STALLED"
            } else {
                s.status.as_str()
            },
            s.started_at.format("%Y-%m-%d %H:%M:%S").to_string(),
            s.duration_seconds
                .map(|d| format!("{d:.2}"))
                .unwrap_or_else(|| "-".into())
        ));
    }
    if !unsent.is_empty() {
        let per: Vec<String> = unsent
            .iter()
            .map(|u| {
                if u.age_seconds > 0.0 {
                    let age = Duration::from_secs(u.age_seconds.round() as u64);
                    format!("{}: {} ago", u.entity, humantime::format_duration(age))
                } else {
                    format!("{}: none", u.entity)
                }
            })
            .collect();
        out.push_str(&format!(
            "\noldest change not sent yet (after the watermark): {}\n",
            per.join(", ")
        ));
    }
    if !deleted.is_empty() {
        let per: Vec<String> = deleted
            .iter()
            .map(|d| format!("{}: {}", d.entity, d.count))
            .collect();
        out.push_str(&format!(
            "\ndeleted records found by sweeps (not sent, the API has no delete): {} (`loansync deletes list`)\n",
            per.join(", ")
        ));
    }
    if !pending.is_empty() {
        out.push_str(&format!(
            "\n{} planning request(s) pending, run when the current sync ends (coalesced):\n",
            pending.len()
        ));
        for p in pending {
            let kind = if p.since.is_some() {
                "backfill"
            } else {
                p.kind.as_str()
            };
            out.push_str(&format!(
                "  {:<36}  {kind:<11}  received {}\n",
                p.request_id,
                p.received_at.format("%Y-%m-%d %H:%M:%S")
            ));
        }
    }
    out
}

/// The fleet's limits: the sum of what each live worker allows (its own limit within its
/// share of the fleet's total), requests in flight, the API's RTT (the workers' mean),
/// the fleet's adapted limit and pause, then a line per worker.
fn render_workers(workers: &[LiveWorker], board: &FleetBoard) -> String {
    if workers.is_empty() {
        return String::new();
    }
    let allowed = |w: &LiveWorker| {
        w.fleet_share
            .map_or(w.concurrency_limit, |s| s.min(w.concurrency_limit))
    };
    let rtts: Vec<f64> = workers.iter().filter_map(|w| w.rtt_ms).collect();
    let rtt = if rtts.is_empty() {
        "-".to_string()
    } else {
        format!("{:.1} ms", rtts.iter().sum::<f64>() / rtts.len() as f64)
    };
    let mut out = format!(
        "
{} live worker(s): limit {} requests to the API in flight (in flight now {}), API RTT {rtt}
",
        workers.len(),
        workers.iter().map(allowed).sum::<i32>(),
        workers.iter().map(|w| w.in_flight).sum::<i32>(),
    );
    if let Some(limit) = board.fleet_limit {
        out.push_str(&format!(
            "fleet limit {limit} requests in flight (adapted to the API's backpressure{})\n",
            board
                .lowered_ago_seconds
                .map_or(String::new(), |s| format!(", last lowered {s:.0} s ago"))
        ));
    }
    if board.paused_seconds > 0.0 {
        out.push_str(&format!(
            "requests to the API paused for {:.1} s more (Retry-After)\n",
            board.paused_seconds
        ));
    }
    out.push_str(&format!(
        "  {:<32}  {:<8}  {:>5}  {:>5}  {:>9}  {:>9}  {:>6}
",
        "worker", "mode", "limit", "share", "in_flight", "rtt_ms", "beat_s"
    ));
    for w in workers {
        out.push_str(&format!(
            "  {:<32}  {:<8}  {:>5}  {:>5}  {:>9}  {:>9}  {:>6.1}\n",
            w.worker_id,
            w.mode,
            w.concurrency_limit,
            w.fleet_share.map_or("-".into(), |s| s.to_string()),
            w.in_flight,
            w.rtt_ms.map_or("-".into(), |r| format!("{r:.1}")),
            w.age_seconds,
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::EntityKind;

    fn summary(state: &str, stalled: bool) -> SyncSummary {
        let at = chrono::DateTime::parse_from_rfc3339("2026-12-01T10:00:00Z")
            .unwrap()
            .to_utc();
        SyncSummary {
            sync_id: "s1".into(),
            sync_type: "full".into(),
            status: "in_progress".into(),
            started_at: at,
            completed_at: None,
            duration_seconds: None,
            sync_start_date: None,
            sync_end_date: Some(at),
            error_message: None,
            chunks_total: Some(4),
            chunks_remaining: Some(1),
            state: Some(state.into()),
            stalled,
        }
    }

    fn one(state: &str, stalled: bool) -> StatusReport {
        StatusReport::Sync {
            sync: summary(state, stalled),
            entities: vec![EntityProgress {
                entity: EntityKind::Loan,
                total: 30,
                success: 27,
                failed: 3,
            }],
        }
    }

    #[test]
    fn one_sync_shows_its_progress_and_what_to_do_when_stalled() {
        let text = one("running", false).render();
        assert!(text.starts_with("sync s1  full  in_progress\n"), "{text}");
        assert!(text.contains("chunks   3 of 4 settled\n"), "{text}");
        assert!(
            text.contains("entity          total    success     failed\nloan               30         27          3\n"),
            "{text}"
        );
        assert!(
            one("running", true)
                .render()
                .contains("(STALLED: run `loansync resume`")
        );
        assert!(
            one("planning", true)
                .render()
                .contains("(STALLED: its planner is gone")
        );
        let json: serde_json::Value =
            serde_json::from_str(&one("running", false).json().unwrap()).unwrap();
        assert_eq!(json["sync"]["sync_id"], "s1");
        assert_eq!(json["entities"][0]["entity"], "loan");
    }

    #[test]
    fn recent_syncs_show_the_deleted_records_and_pending_requests_beside_them() {
        let received = summary("running", true).started_at;
        let report = StatusReport::Recent {
            syncs: vec![summary("running", true)],
            deleted: vec![DeletedCount {
                entity: "repayment".into(),
                count: 3,
            }],
            pending: vec![PendingEntry {
                request_id: "r1".into(),
                kind: "incremental".into(),
                received_at: received,
                since: Some(received),
            }],
            unsent: vec![
                OldestUnsent {
                    entity: "customer".into(),
                    age_seconds: 1805.2,
                },
                OldestUnsent {
                    entity: "loan".into(),
                    age_seconds: 0.0,
                },
            ],
            workers: vec![
                LiveWorker {
                    worker_id: "w-a".into(),
                    mode: "adaptive".into(),
                    concurrency_limit: 6,
                    in_flight: 3,
                    fleet_share: Some(4),
                    rtt_ms: Some(40.0),
                    age_seconds: 1.0,
                },
                LiveWorker {
                    worker_id: "w-b".into(),
                    mode: "adaptive".into(),
                    concurrency_limit: 3,
                    in_flight: 2,
                    fleet_share: Some(4),
                    rtt_ms: Some(60.0),
                    age_seconds: 2.0,
                },
            ],
            board: FleetBoard {
                fleet_limit: Some(8),
                lowered_ago_seconds: Some(4.2),
                paused_seconds: 0.0,
            },
        };
        let text = report.render();
        assert!(
            text.contains(
                "oldest change not sent yet (after the watermark): customer: 30m 5s ago, loan: none"
            ),
            "{text}"
        );
        assert!(text.contains("s1  "), "{text}");
        assert!(text.contains("  STALLED  "), "{text}");
        assert!(text.contains("sweeps (not sent, the API has no delete): repayment: 3"));
        assert!(text.contains("1 planning request(s) pending"), "{text}");
        // The fleet: each worker's limit within its share (4 + 3), the mean RTT.
        assert!(
            text.contains("2 live worker(s): limit 7 requests to the API in flight (in flight now 5), API RTT 50.0 ms"),
            "{text}"
        );
        assert!(
            text.contains("  w-a  ") && text.contains("adaptive"),
            "{text}"
        );
        assert!(
            text.contains("fleet limit 8 requests in flight (adapted to the API's backpressure, last lowered 4 s ago)"),
            "{text}"
        );
        assert!(!text.contains("paused"), "{text}");
        assert!(
            text.contains("  r1 ") && text.contains("backfill"),
            "{text}"
        );
        // Scripts get the syncs only.
        let json: serde_json::Value = serde_json::from_str(&report.json().unwrap()).unwrap();
        assert_eq!(json.as_array().map(Vec::len), Some(1), "{json}");
    }
}
