//! The worker fleet in PostgreSQL: each worker's heartbeat (`loansync_worker`), from
//! which it takes its share of the fleet-wide cap (`ANALYTICS_MAX_IN_FLIGHT`), and the
//! analytics API's pause shared by every worker (`loansync_api_pause`, the gate's
//! [`Board`]).
//!
//! Shares: the live workers (a heartbeat within three periods) ordered by id; each takes
//! `cap / live`, the first `cap % live` one more, so that the shares add up to the cap.
//! A share that shrinks applies at once; one that grows only once every share computed
//! in the last 1.5 heartbeat periods allows it (a new worker starts at 0): by then every
//! other live worker has beaten, seen the newcomer and given up its part, so the sum of
//! the shares in use never passes the cap while workers come and go.

use crate::config::ConcurrencySettings;
use crate::sink::gate::{Board, Gate};
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
    /// The shares computed lately, with when (see the module).
    shares: Mutex<VecDeque<(Instant, usize)>>,
}

/// A worker's share of `cap` when it is `rank`-th (from 0) of `live` workers.
pub fn share_of(cap: u32, live: u32, rank: u32) -> usize {
    let live = live.max(1);
    (cap / live + u32::from(rank < cap % live)) as usize
}

impl Fleet {
    pub fn new(pool: PgPool, gate: Arc<Gate>, settings: ConcurrencySettings) -> Arc<Fleet> {
        let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "worker".into());
        let worker_id = format!(
            "{host}-{}-{}",
            std::process::id(),
            &uuid::Uuid::new_v4().simple().to_string()[..6]
        );
        let fleet = Arc::new(Fleet {
            pool,
            worker_id,
            settings,
            gate,
            shares: Mutex::new(VecDeque::from([(Instant::now(), 0)])),
        });
        if fleet.settings.fleet_cap.is_some() {
            // Nothing before the first heartbeats say what this worker's share is.
            fleet.gate.set_share(Some(0));
        }
        fleet
    }

    /// Records this worker live and takes its share of the cap, if there is one.
    pub async fn beat(&self) -> Result<(), sqlx::Error> {
        let rtt_ms = self.gate.rtt().map(|d| d.as_secs_f64() * 1000.0);
        let (others, before): (i64, i64) = sqlx::query_as(
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
                    count(*) FILTER (WHERE worker_id < $1)
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
        if let Some(cap) = self.settings.fleet_cap {
            let live = u32::try_from(others + 1).unwrap_or(u32::MAX);
            let rank = u32::try_from(before).unwrap_or(u32::MAX);
            let computed = share_of(cap, live, rank);
            let share = self.settled_share(Instant::now(), computed);
            self.gate.set_share(Some(share));
        }
        Ok(())
    }

    /// The share to use now that `computed` was computed at `now`: the least of the
    /// shares computed in the last 1.5 heartbeat periods, this one included.
    fn settled_share(&self, now: Instant, computed: usize) -> usize {
        let window = self.settings.heartbeat * 3 / 2;
        let mut shares = self.shares.lock().unwrap_or_else(|p| p.into_inner());
        shares.push_back((now, computed));
        while shares.len() > 1 && shares.front().is_some_and(|(at, _)| *at + window < now) {
            shares.pop_front();
        }
        shares.iter().map(|(_, s)| *s).min().unwrap_or(0)
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
}

#[async_trait::async_trait]
impl Board for Fleet {
    async fn read_pause(&self) -> Result<Duration, String> {
        let left: Option<f64> = sqlx::query_scalar(
            "SELECT greatest(extract(epoch FROM paused_until - now()), 0)::float8
             FROM loansync_api_pause WHERE id = 1",
        )
        .fetch_optional(&self.pool)
        .await
        .map_err(|e| e.to_string())?;
        Ok(Duration::try_from_secs_f64(left.unwrap_or(0.0)).unwrap_or_default())
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
}

impl std::fmt::Debug for Fleet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fleet")
            .field("worker_id", &self.worker_id)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::share_of;

    #[test]
    fn shares_add_up_to_the_cap_whatever_the_number_of_workers() {
        for cap in [1u32, 7, 8, 16, 100] {
            for live in 1u32..=12 {
                let shares: Vec<usize> = (0..live).map(|r| share_of(cap, live, r)).collect();
                assert_eq!(shares.iter().sum::<usize>(), cap as usize, "{cap} {live}");
                let (lo, hi) = (shares.iter().min().unwrap(), shares.iter().max().unwrap());
                assert!(hi - lo <= 1, "{cap} {live} {shares:?}");
            }
        }
        assert_eq!(share_of(8, 3, 0), 3);
        assert_eq!(share_of(8, 3, 2), 2);
        assert_eq!(share_of(2, 3, 2), 0);
    }
}
