//! A worker's share of a fleet-wide total of requests in flight (the cap
//! `ANALYTICS_MAX_IN_FLIGHT`, the fleet's adapted limit), pure: the gate asks it, the
//! heartbeats feed it.
//!
//! * The live workers, ordered by id, each take `total / live`; the `total % live`
//!   requests left over go to the first ranks. When the total is smaller than the fleet
//!   (8 workers, an API that serves 4) they go to workers in turn instead: in rotation
//!   period `s` (every [`ROTATION`], counted on PostgreSQL's clock so that every worker
//!   counts alike) the worker of rank `r` holds one when `(r + s) % live < total`, so
//!   that no chunk waits in a worker whose share is 0 for good. The shares add up to the
//!   total at every instant. Only in turns can a request that outlives its worker's turn
//!   (slower than the guard below) overlap the next worker's first: the one case where
//!   the fleet can briefly have more in flight than the total, by the requests that
//!   outlived their turn.
//! * A share that shrinks at a period's end shrinks a guard earlier (twice the API's
//!   RTT), so that the requests it started are answered before the next worker's turn
//!   begins; one that grows, grows when the period begins.
//! * Workers come and go: a worker uses the least share of the views of the fleet it
//!   had in the last 1.5 heartbeats (a newcomer starts with a view of its own worth 0),
//!   so by the time a share grows, every other live worker has beaten, seen the change
//!   and given up its part.

use std::time::Duration;
use tokio::time::Instant;

/// How long a rotation period lasts: the left-over requests move on to the next workers.
pub const ROTATION: Duration = Duration::from_secs(2);
/// The guard's bounds.
const GUARD_MIN: Duration = Duration::from_millis(100);
const GUARD_MAX: Duration = Duration::from_millis(500);

/// PostgreSQL's clock as a worker reads it: `epoch` (seconds) at the local instant `at`.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    pub at: Instant,
    pub epoch: f64,
}

impl Clock {
    /// PostgreSQL's epoch at the local instant `t`.
    pub fn epoch_at(&self, t: Instant) -> f64 {
        if t >= self.at {
            self.epoch + (t - self.at).as_secs_f64()
        } else {
            self.epoch - (self.at - t).as_secs_f64()
        }
    }

    /// The local instant of PostgreSQL's epoch `epoch`.
    fn instant_of(&self, epoch: f64) -> Instant {
        let d = epoch - self.epoch;
        if d >= 0.0 {
            self.at + Duration::from_secs_f64(d)
        } else {
            self.at
                .checked_sub(Duration::from_secs_f64(-d))
                .unwrap_or(self.at)
        }
    }
}

/// One heartbeat's view of the fleet: `live` workers, this one `rank`-th (from 0).
/// `live` 0 is a newcomer's view before its first heartbeats: a share of 0.
#[derive(Debug, Clone, Copy)]
pub struct View {
    pub live: u32,
    pub rank: u32,
    pub clock: Clock,
}

/// The rotation period at PostgreSQL's `epoch`.
pub fn period_of(epoch: f64) -> u64 {
    (epoch / ROTATION.as_secs_f64()).floor().max(0.0) as u64
}

/// The share of `total` of the `rank`-th of `live` workers in rotation period `period`.
pub fn share_in(total: u32, live: u32, rank: u32, period: u64) -> usize {
    if live == 0 {
        return 0;
    }
    // Enough for one each: the extra ones stay with the first ranks (a request that
    // outlives its turn could otherwise overlap the next worker's). Fewer than the
    // workers: they go round.
    let turn = if total >= live {
        rank
    } else {
        ((u64::from(rank) + period) % u64::from(live)) as u32
    };
    (total / live + u32::from(turn < total % live)) as usize
}

impl View {
    fn share_at(&self, total: u32, t: Instant) -> usize {
        share_in(
            total,
            self.live,
            self.rank,
            period_of(self.clock.epoch_at(t)),
        )
    }

    /// The next instant after `now` at which this view's share may change: a period's
    /// start or a guard before it.
    fn next_change(&self, now: Instant, guard: Duration) -> Instant {
        let step = ROTATION.as_secs_f64();
        let next = (period_of(self.clock.epoch_at(now)) + 1) as f64 * step;
        let start = self.clock.instant_of(next);
        match start.checked_sub(guard) {
            Some(early) if early > now => early,
            _ => start,
        }
    }
}

/// The views of the fleet a worker had in the last 1.5 heartbeats.
#[derive(Debug, Clone, Default)]
pub struct Membership {
    pub views: Vec<View>,
}

impl Membership {
    /// A newcomer's: a share of 0 until its heartbeats say more.
    pub fn newcomer(now: Instant) -> Membership {
        Membership {
            views: vec![View {
                live: 0,
                rank: 0,
                clock: Clock {
                    at: now,
                    epoch: 0.0,
                },
            }],
        }
    }

    /// This worker's share of `total` at `now`: the least of its views', each the least
    /// of now and a `guard` later (a share about to shrink has shrunk).
    pub fn share(&self, total: u32, now: Instant, guard: Duration) -> usize {
        self.views
            .iter()
            .map(|v| v.share_at(total, now).min(v.share_at(total, now + guard)))
            .min()
            .unwrap_or(0)
    }

    /// When the share may change next (by the clock alone).
    pub fn next_change(&self, now: Instant, guard: Duration) -> Option<Instant> {
        self.views
            .iter()
            .filter(|v| v.live > 0)
            .map(|v| v.next_change(now, guard))
            .min()
    }
}

/// The guard for an API whose mean RTT is `rtt`: twice it, within 100–500 ms.
pub fn guard_for(rtt: Option<Duration>) -> Duration {
    rtt.map_or(Duration::from_millis(100), |r| r * 2)
        .clamp(GUARD_MIN, GUARD_MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shares_add_up_to_the_total_in_every_period_and_everyone_gets_a_turn() {
        for total in [1u32, 2, 3, 4, 7, 8, 16, 100] {
            for live in 1u32..=12 {
                let mut turns = vec![0usize; live as usize];
                for period in 0..u64::from(live) {
                    let shares: Vec<usize> = (0..live)
                        .map(|r| share_in(total, live, r, period))
                        .collect();
                    assert_eq!(shares.iter().sum::<usize>(), total as usize);
                    let (lo, hi) = (shares.iter().min().unwrap(), shares.iter().max().unwrap());
                    assert!(hi - lo <= 1, "{total} {live} {shares:?}");
                    for (r, s) in shares.iter().enumerate() {
                        turns[r] += s;
                    }
                }
                // Over `live` periods every worker holds a request slot at least once.
                assert!(turns.iter().all(|t| *t >= 1), "{total} {live} {turns:?}");
            }
        }
        // 9 of 4: the first rank holds the extra one, whatever the period.
        assert_eq!(
            (0..4).map(|r| share_in(9, 4, r, 7)).collect::<Vec<_>>(),
            [3, 2, 2, 2]
        );
        // 4 of 8: half the workers hold one each, the other half the next period.
        assert_eq!(
            (0..8).map(|r| share_in(4, 8, r, 0)).collect::<Vec<_>>(),
            [1, 1, 1, 1, 0, 0, 0, 0]
        );
        assert_eq!(share_in(4, 8, 4, 4), 1);
        assert_eq!(share_in(4, 0, 0, 0), 0);
    }

    /// Workers whose clocks differ by less than the guard never hold more than the total
    /// between them, at any instant across several periods.
    #[test]
    fn workers_with_skewed_clocks_never_hold_more_than_the_total() {
        let origin = Instant::now();
        let guard = Duration::from_millis(60);
        for (total, live) in [(4u32, 8u32), (3, 5), (8, 8), (9, 4), (1, 3)] {
            let workers: Vec<Membership> = (0..live)
                .map(|rank| {
                    // Each worker's reading of PostgreSQL's clock is off by up to ±25 ms.
                    let skew = (f64::from(rank % 3) - 1.0) * 0.025;
                    Membership {
                        views: vec![View {
                            live,
                            rank,
                            clock: Clock {
                                at: origin,
                                epoch: 1_000.0 + skew,
                            },
                        }],
                    }
                })
                .collect();
            let mut t = origin;
            while t < origin + ROTATION * 4 {
                let held: usize = workers.iter().map(|m| m.share(total, t, guard)).sum();
                assert!(held <= total as usize, "{total} {live} at {:?}", t - origin);
                t += Duration::from_millis(5);
            }
        }
    }

    #[test]
    fn a_newcomer_holds_nothing_and_an_old_view_holds_a_share_back() {
        let now = Instant::now();
        assert_eq!(Membership::newcomer(now).share(8, now, GUARD_MIN), 0);
        let clock = Clock {
            at: now,
            epoch: 10.0,
        };
        // Seen alone (8), then with a second worker (4): the least holds.
        let m = Membership {
            views: vec![
                View {
                    live: 1,
                    rank: 0,
                    clock,
                },
                View {
                    live: 2,
                    rank: 0,
                    clock,
                },
            ],
        };
        assert_eq!(m.share(8, now, GUARD_MIN), 4);
    }

    #[test]
    fn a_share_about_to_shrink_has_shrunk_a_guard_before_the_period_ends() {
        let now = Instant::now();
        // Period 5 starts at epoch 10.0; rank 0 of 2 with total 1 holds it in even periods.
        let m = Membership {
            views: vec![View {
                live: 2,
                rank: 0,
                clock: Clock {
                    at: now,
                    epoch: 9.0,
                },
            }],
        };
        let guard = Duration::from_millis(100);
        assert_eq!(period_of(9.0), 4);
        assert_eq!(m.share(1, now, guard), 1);
        assert_eq!(m.share(1, now + Duration::from_millis(850), guard), 1);
        assert_eq!(m.share(1, now + Duration::from_millis(950), guard), 0);
        assert_eq!(m.share(1, now + Duration::from_millis(1500), guard), 0);
        // It wakes at the guard before the period's start, then at the start.
        assert_eq!(
            m.next_change(now, guard),
            Some(now + Duration::from_millis(900))
        );
        assert_eq!(
            m.next_change(now + Duration::from_millis(950), guard),
            Some(now + Duration::from_millis(1000))
        );
        assert_eq!(guard_for(None), Duration::from_millis(100));
        assert_eq!(
            guard_for(Some(Duration::from_millis(80))),
            Duration::from_millis(160)
        );
        assert_eq!(
            guard_for(Some(Duration::from_secs(2))),
            Duration::from_millis(500)
        );
    }
}
