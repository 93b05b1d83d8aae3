//! The worker fleet in PostgreSQL: each worker's heartbeat (`loansync_worker`), from
//! which it learns how many workers are live and its rank among them (its share of the
//! fleet's total, [`crate::sink::share`]), and the board every worker shares
//! (`loansync_api_pause`, the gate's [`Board`]): the analytics API's pause and the
//! fleet's adapted limit.
//!
//! A worker keeps the views of the fleet of its last 1.5 heartbeat periods (a newcomer
//! starts with one worth 0) and takes the least share they give: by the time a share
//! grows, every other live worker has beaten, seen the change and given up its part, so
//! the shares in use never add up to more than the total while workers come and go.

use crate::config::ConcurrencySettings;
use crate::sink::gate::{
    Board, BoardState, FleetLimit, Gate, LOWER_EVERY, PROBE_HOLD, QUIET, RAISE_EVERY,
};
use crate::sink::share::{Clock, Membership, View};
use sqlx::PgPool;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// One worker's place in the fleet.
pub struct Fleet {
    pool: PgPool,
    /// `<host>-<pid>-<random>`: unique, and says which pod it is.
    pub worker_id: String,
    settings: ConcurrencySettings,
    gate: Arc<Gate>,
    /// The views of the fleet lately, with when (see the module).
    views: Mutex<VecDeque<(Instant, View)>>,
}

impl Fleet {
    pub fn new(pool: PgPool, gate: Arc<Gate>, settings: ConcurrencySettings) -> Arc<Fleet> {
        let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "worker".into());
        let worker_id = format!(
            "{host}-{}-{}",
            std::process::id(),
            &uuid::Uuid::new_v4().simple().to_string()[..6]
        );
        let now = Instant::now();
        let newcomer = Membership::newcomer(now);
        let fleet = Arc::new(Fleet {
            pool,
            worker_id,
            settings,
            gate,
            views: Mutex::new(newcomer.views.iter().map(|v| (now, *v)).collect()),
        });
        // Nothing of a fleet-wide total before the first heartbeats say what this
        // worker's share is.
        fleet.gate.set_membership(newcomer);
        fleet
    }

    /// Records this worker live and learns its place among the live workers.
    pub async fn beat(&self) -> Result<(), sqlx::Error> {
        let rtt_ms = self.gate.rtt().map(|d| d.as_secs_f64() * 1000.0);
        let (others, before, epoch): (i64, i64, f64) = sqlx::query_as(
            "WITH me AS (
                 INSERT INTO loansync_worker
                     (worker_id, mode, concurrency_limit, in_flight, fleet_share, rtt_ms,
                      expires_at)
                 VALUES ($1, $2, $3, $4, $5, $6, now() + make_interval(secs => $7))
                 ON CONFLICT (worker_id) DO UPDATE SET beat_at = now(),
                     expires_at = EXCLUDED.expires_at, mode = EXCLUDED.mode,
                     concurrency_limit = EXCLUDED.concurrency_limit,
                     in_flight = EXCLUDED.in_flight, fleet_share = EXCLUDED.fleet_share,
                     rtt_ms = EXCLUDED.rtt_ms
                 RETURNING 1)
             SELECT count(*) FILTER (WHERE worker_id <> $1),
                    count(*) FILTER (WHERE worker_id < $1),
                    extract(epoch FROM clock_timestamp())::float8
             FROM loansync_worker
             WHERE expires_at > now() AND worker_id <> $1",
        )
        .bind(&self.worker_id)
        .bind(self.gate.mode().as_str())
        .bind(i32::try_from(self.gate.own_limit()).unwrap_or(i32::MAX))
        .bind(i32::try_from(self.gate.in_flight()).unwrap_or(i32::MAX))
        .bind(
            self.gate
                .share()
                .map(|share| i32::try_from(share).unwrap_or(i32::MAX)),
        )
        .bind(rtt_ms)
        .bind(self.settings.heartbeat_ttl().as_secs_f64())
        .fetch_one(&self.pool)
        .await?;
        let now = Instant::now();
        let view = View {
            live: u32::try_from(others + 1).unwrap_or(u32::MAX),
            rank: u32::try_from(before).unwrap_or(u32::MAX),
            clock: Clock { at: now, epoch },
        };
        let membership = self.settled(now, view);
        self.gate.set_membership(membership);
        Ok(())
    }

    /// The views of the last 1.5 heartbeat periods, `view` (seen at `now`) included.
    fn settled(&self, now: Instant, view: View) -> Membership {
        let window = self.settings.heartbeat * 3 / 2;
        let mut views = self.views.lock().unwrap_or_else(|p| p.into_inner());
        views.push_back((now, view));
        while views.len() > 1 && views.front().is_some_and(|(at, _)| *at + window < now) {
            views.pop_front();
        }
        Membership {
            views: views.iter().map(|(_, v)| *v).collect(),
        }
    }

    /// Heartbeats until `stop`, then removes this worker's row (its share is freed at
    /// once; a worker killed is freed when its row gets older than three periods).
    pub async fn run(self: Arc<Self>, stop: CancellationToken) {
        let _ =
            sqlx::query("DELETE FROM loansync_worker WHERE expires_at < now() - interval '1 day'")
                .execute(&self.pool)
                .await;
        loop {
            if let Err(e) = self.beat().await {
                tracing::warn!(error = %e, "could not record the worker's heartbeat");
            }
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tokio::time::sleep(self.settings.heartbeat) => {}
            }
        }
        if let Err(e) = sqlx::query("DELETE FROM loansync_worker WHERE worker_id = $1")
            .bind(&self.worker_id)
            .execute(&self.pool)
            .await
        {
            tracing::warn!(error = %e, "could not remove the worker's heartbeat row");
        }
    }

    /// Runs `update` (an `UPDATE … WHERE id = 1 AND limit_generation = $1 … RETURNING
    /// fleet_limit, limit_generation`, its other parameters `seconds` from `$2`) and
    /// returns the fleet's limit after it: the updated row, else the row as it is.
    async fn change_limit(
        &self,
        update: &str,
        seen: i64,
        seconds: &[Duration],
    ) -> Result<FleetLimit, String> {
        let sql = format!(
            "WITH changed AS ({update})
             SELECT fleet_limit, limit_generation FROM changed
             UNION ALL
             SELECT fleet_limit, limit_generation FROM loansync_api_pause
             WHERE id = 1 AND NOT EXISTS (SELECT 1 FROM changed)"
        );
        // Built from this module's constants only.
        let mut query = sqlx::query_as(sqlx::AssertSqlSafe(sql)).bind(seen);
        for d in seconds {
            query = query.bind(d.as_secs_f64());
        }
        let row: Option<(Option<i32>, i64)> = query
            .fetch_optional(&self.pool)
            .await
            .map_err(|e| e.to_string())?;
        Ok(fleet_limit(row))
    }
}

fn fleet_limit(row: Option<(Option<i32>, i64)>) -> FleetLimit {
    row.map_or_else(FleetLimit::default, |(limit, generation)| FleetLimit {
        limit: limit.and_then(|l| u32::try_from(l).ok()),
        generation,
    })
}

/// What the live workers allow together (their own limits): the fleet's limit starts
/// there, and goes back to none beyond it.
const LIVE_OWN_LIMITS: &str = "(SELECT coalesce(sum(concurrency_limit), 0)
    FROM loansync_worker WHERE expires_at > now())";

#[async_trait::async_trait]
impl Board for Fleet {
    async fn read(&self) -> Result<BoardState, String> {
        let row: Option<(f64, Option<i32>, i64)> = sqlx::query_as(
            "SELECT greatest(extract(epoch FROM paused_until - now()), 0)::float8,
                    fleet_limit, limit_generation
             FROM loansync_api_pause WHERE id = 1",
        )
        .fetch_optional(&self.pool)
        .await
        .map_err(|e| e.to_string())?;
        Ok(
            row.map_or_else(BoardState::default, |(left, limit, generation)| {
                BoardState {
                    pause: Duration::try_from_secs_f64(left).unwrap_or_default(),
                    fleet: fleet_limit(Some((limit, generation))),
                }
            }),
        )
    }

    async fn raise_pause(&self, pause: Duration) -> Result<(), String> {
        sqlx::query(
            "INSERT INTO loansync_api_pause (id, paused_until)
             VALUES (1, now() + make_interval(secs => $1))
             ON CONFLICT (id) DO UPDATE
             SET paused_until = greatest(loansync_api_pause.paused_until, EXCLUDED.paused_until)",
        )
        .bind(pause.as_secs_f64())
        .execute(&self.pool)
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
    }

    async fn lower_limit(&self, seen: i64) -> Result<FleetLimit, String> {
        // ×0.9 rounded down, at least 1 less, at least 1; from what the live workers
        // allow together when there was no limit. Not twice within LOWER_EVERY: every
        // worker reads the last lowering before the next one can count.
        self.change_limit(
            &format!(
                "UPDATE loansync_api_pause p
                 SET fleet_limit = greatest(1, least(c.current - 1, floor(c.current * 0.9)))::int,
                     limit_generation = p.limit_generation + 1, lowered_at = now()
                 FROM (SELECT coalesce(fleet_limit, greatest({LIVE_OWN_LIMITS}, 2)) AS current
                       FROM loansync_api_pause WHERE id = 1) c
                 WHERE p.id = 1 AND p.limit_generation = $1
                   AND (p.lowered_at IS NULL
                        OR p.lowered_at < now() - make_interval(secs => $2))
                 RETURNING p.fleet_limit, p.limit_generation"
            ),
            seen,
            &[LOWER_EVERY],
        )
        .await
    }

    async fn raise_limit(&self, seen: i64) -> Result<FleetLimit, String> {
        // +1 near the last lowering, +a quarter once the API has been quiet; none once
        // the limit reaches what the live workers allow together.
        self.change_limit(
            &format!(
                "UPDATE loansync_api_pause p
                 SET fleet_limit = CASE WHEN c.raised >= {LIVE_OWN_LIMITS} THEN NULL
                                        ELSE c.raised END,
                     limit_generation = p.limit_generation + 1, raised_at = now()
                 FROM (SELECT fleet_limit + CASE
                           WHEN lowered_at IS NULL
                             OR lowered_at < now() - make_interval(secs => $4)
                           THEN greatest(1, fleet_limit / 4) ELSE 1 END AS raised
                       FROM loansync_api_pause WHERE id = 1) c
                 WHERE p.id = 1 AND p.limit_generation = $1 AND p.fleet_limit IS NOT NULL
                   AND (p.lowered_at IS NULL
                        OR p.lowered_at < now() - make_interval(secs => $2))
                   AND (p.raised_at IS NULL
                        OR p.raised_at < now() - make_interval(secs => $3))
                 RETURNING p.fleet_limit, p.limit_generation"
            ),
            seen,
            &[PROBE_HOLD, RAISE_EVERY, QUIET],
        )
        .await
    }
}

impl std::fmt::Debug for Fleet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fleet")
            .field("worker_id", &self.worker_id)
            .finish_non_exhaustive()
    }
}
