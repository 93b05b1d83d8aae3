//! The adaptive request concurrency controller (AIMD on the observed round-trip time,
//! after Vector's `adaptive_concurrency`, RFC 1858), pure: it is fed the times of
//! requests and their answers and says what the limit is; it reads no clock and
//! sleeps never, so its tests are deterministic.
//!
//! * RTT: the mean of the answers of the current interval is compared with an EWMA of
//!   past intervals (α 0.4) and its deviation.
//! * +1 when, during the interval, the limit was reached, no answer was backpressure
//!   and the interval's RTT was at most the past mean.
//! * ×0.9 (rounded down, at least 1 less, never below 1) on backpressure (429, 503, a
//!   timeout) or when the interval's RTT reached the past mean + 2.5 deviations.
//! * Re-evaluated at most once per past mean RTT: an interval ends with the first answer
//!   after that much time.

use std::time::Duration;

/// The EWMA's weight of a new point.
pub const ALPHA: f64 = 0.4;
/// How many deviations above the mean an RTT counts as congestion.
pub const DEVIATION_SCALE: f64 = 2.5;
/// The factor of a decrease.
pub const DECREASE: f64 = 0.9;
/// RTTs within this fraction of each other are equal (floating-point sums).
const EPSILON: f64 = 1e-9;

/// An exponentially weighted mean and variance.
#[derive(Debug, Clone, Copy, Default)]
pub struct Ewma {
    state: Option<(f64, f64)>,
}

impl Ewma {
    /// Adds a point.
    pub fn update(&mut self, x: f64) {
        self.state = Some(match self.state {
            None => (x, 0.0),
            Some((mean, variance)) => {
                let difference = x - mean;
                let increment = ALPHA * difference;
                (
                    mean + increment,
                    (1.0 - ALPHA) * (variance + difference * increment),
                )
            }
        });
    }

    pub fn mean(&self) -> Option<f64> {
        self.state.map(|(m, _)| m)
    }

    pub fn deviation(&self) -> Option<f64> {
        self.state.map(|(_, v)| v.max(0.0).sqrt())
    }
}

/// What one answer was, for the controller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Response {
    /// An answer whose RTT counts (2xx, a refused batch, …).
    Answered,
    /// The API asked to slow down (429, 503) or did not answer in time: a decrease.
    Backpressure,
    /// Another failure (a connection refused, …): its RTT says nothing of the API's load.
    Other,
}

/// A change of the limit, from the old to the new value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Change {
    pub from: usize,
    pub to: usize,
}

/// The controller of one worker's limit, in `[1, max]`. Times are durations since any
/// fixed origin the caller keeps (a monotonic clock's start).
#[derive(Debug, Clone)]
pub struct Controller {
    limit: usize,
    max: usize,
    /// The RTTs of past intervals.
    past: Ewma,
    /// The sum and count of this interval's RTTs (seconds).
    current: (f64, u32),
    reached_limit: bool,
    backpressure: bool,
    /// When the interval ends (none before the first answer).
    next_update: Option<Duration>,
}

impl Controller {
    /// A controller starting at `initial`, within `[1, max]`.
    pub fn new(initial: usize, max: usize) -> Controller {
        let max = max.max(1);
        Controller {
            limit: initial.clamp(1, max),
            max,
            past: Ewma::default(),
            current: (0.0, 0),
            reached_limit: false,
            backpressure: false,
            next_update: None,
        }
    }

    pub fn limit(&self) -> usize {
        self.limit
    }

    /// The past mean RTT (seconds), once known.
    pub fn mean_rtt(&self) -> Option<f64> {
        self.past.mean()
    }

    /// A request started; `in_flight` counts it. Reaching the limit allows an increase.
    pub fn on_start(&mut self, in_flight: usize) {
        if in_flight >= self.limit {
            self.reached_limit = true;
        }
    }

    /// An answer came at `now` (since the origin), `rtt` after its request started.
    /// Returns the change of the limit when the interval ended and the limit moved.
    pub fn on_response(
        &mut self,
        now: Duration,
        rtt: Duration,
        response: Response,
    ) -> Option<Change> {
        match response {
            Response::Backpressure => self.backpressure = true,
            Response::Answered => {
                self.current.0 += rtt.as_secs_f64();
                self.current.1 += 1;
            }
            Response::Other => {}
        }
        let current = (self.current.1 > 0).then(|| self.current.0 / f64::from(self.current.1));
        let from = self.limit;
        match self.next_update {
            // Inside an interval: only noted.
            Some(next_update) if now < next_update => return None,
            // The first answer: it starts the past and the first interval (as long as
            // its own RTT); backpressure decreases at once.
            None => {
                if self.backpressure {
                    self.limit = decreased(self.limit);
                }
            }
            Some(_) => {
                let past = self.past.mean().zip(self.past.deviation());
                // Means of equal RTTs differ in their last bits: compared within EPSILON.
                let congested = match (current, past) {
                    (Some(c), Some((mean, deviation))) => {
                        c > mean * (1.0 + EPSILON) && c >= mean + DEVIATION_SCALE * deviation
                    }
                    _ => false,
                };
                let quick = match (current, past) {
                    (Some(c), Some((mean, _))) => c <= mean * (1.0 + EPSILON),
                    _ => false,
                };
                if self.limit < self.max && self.reached_limit && !self.backpressure && quick {
                    self.limit += 1;
                } else if self.backpressure || congested {
                    self.limit = decreased(self.limit);
                }
            }
        }
        if let Some(c) = current {
            self.past.update(c);
        }
        let interval = self.past.mean().unwrap_or(rtt.as_secs_f64());
        self.next_update = Some(now + Duration::from_secs_f64(interval));
        self.current = (0.0, 0);
        self.reached_limit = false;
        self.backpressure = false;
        (self.limit != from).then_some(Change {
            from,
            to: self.limit,
        })
    }
}

/// `limit` × 0.9, rounded down, so at least 1 less; never below 1.
fn decreased(limit: usize) -> usize {
    ((limit as f64 * DECREASE) as usize).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: fn(u64) -> Duration = Duration::from_millis;

    /// Runs `rounds` intervals of `limit` requests each started at once and answered
    /// after `rtt(limit)`, as an API whose answers depend on the load; returns the
    /// limits after each interval.
    fn drive(
        c: &mut Controller,
        rounds: usize,
        answer: impl Fn(usize) -> (u64, Response),
    ) -> Vec<usize> {
        let mut now = MS(0);
        let mut limits = Vec::new();
        for _ in 0..rounds {
            let n = c.limit();
            for i in 1..=n {
                c.on_start(i);
            }
            let (rtt, response) = answer(n);
            now += MS(rtt);
            for _ in 0..n {
                c.on_response(now, MS(rtt), response);
            }
            limits.push(c.limit());
        }
        limits
    }

    #[test]
    fn the_ewma_follows_its_points_with_alpha_0_4() {
        let mut e = Ewma::default();
        assert_eq!(e.mean(), None);
        e.update(10.0);
        assert_eq!((e.mean(), e.deviation()), (Some(10.0), Some(0.0)));
        e.update(20.0);
        // 10 + 0.4 × 10; variance 0.6 × (0 + 10 × 4).
        assert!((e.mean().unwrap() - 14.0).abs() < 1e-9);
        assert!((e.deviation().unwrap() - 24f64.sqrt()).abs() < 1e-9);
    }

    #[test]
    fn the_limit_rises_by_one_per_interval_while_the_api_keeps_its_rtt() {
        let mut c = Controller::new(1, 10);
        let limits = drive(&mut c, 12, |_| (50, Response::Answered));
        assert_eq!(limits, vec![1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 10, 10]);
    }

    #[test]
    fn the_limit_does_not_rise_when_it_was_not_reached() {
        let mut c = Controller::new(4, 10);
        let mut now = MS(0);
        for _ in 0..10 {
            // Only two requests at once: the limit of 4 is never reached.
            c.on_start(1);
            c.on_start(2);
            now += MS(50);
            c.on_response(now, MS(50), Response::Answered);
            c.on_response(now, MS(50), Response::Answered);
        }
        assert_eq!(c.limit(), 4);
    }

    #[test]
    fn backpressure_multiplies_the_limit_by_0_9_down_to_1() {
        let mut c = Controller::new(20, 32);
        let limits = drive(&mut c, 30, |_| (50, Response::Backpressure));
        // 20 → 18 → 16 → 14 → 12 → 10 → 9 → 8 → … → 1, and it stays at 1.
        assert_eq!(&limits[..8], &[18, 16, 14, 12, 10, 9, 8, 7]);
        assert_eq!(*limits.last().unwrap(), 1);
        assert!(limits.windows(2).all(|w| w[1] <= w[0]));
    }

    #[test]
    fn an_rtt_far_above_the_mean_decreases_the_limit() {
        let mut c = Controller::new(8, 32);
        // Settle the mean and its deviation at about 50 ms with a little noise.
        let mut now = MS(0);
        for i in 0..20u64 {
            let rtt = 48 + (i % 5);
            c.on_start(1);
            now += MS(rtt);
            c.on_response(now, MS(rtt), Response::Answered);
        }
        let before = c.limit();
        now += MS(400);
        let change = c.on_response(now, MS(400), Response::Answered);
        assert_eq!(
            change,
            Some(Change {
                from: before,
                to: decreased(before)
            })
        );
    }

    #[test]
    fn an_api_whose_latency_grows_with_load_keeps_the_limit_far_below_its_ceiling() {
        // Flat latency up to 8 requests at once, then it grows with every request more:
        // the limit goes a little past the knee (an RTT that creeps up moves the mean
        // with it) and no further; without the RTT rule it would climb to 32.
        let mut c = Controller::new(1, 32);
        let limits = drive(&mut c, 300, |n| {
            (
                if n <= 8 { 40 } else { 40 + 20 * (n as u64 - 8) },
                Response::Answered,
            )
        });
        let tail = &limits[200..];
        assert!(tail.iter().all(|l| (6..=14).contains(l)), "{tail:?}");
    }

    #[test]
    fn the_limit_is_reevaluated_at_most_once_per_mean_rtt() {
        let mut c = Controller::new(2, 10);
        c.on_start(1);
        c.on_start(2);
        // The first answer sets the mean (100 ms) and the end of the first interval.
        c.on_response(MS(100), MS(100), Response::Answered);
        c.on_start(2);
        // Before the interval's end: no change, even with backpressure.
        assert_eq!(c.on_response(MS(150), MS(50), Response::Backpressure), None);
        assert_eq!(c.limit(), 2);
        // At its end: the backpressure seen in it decreases.
        assert_eq!(
            c.on_response(MS(200), MS(100), Response::Answered),
            Some(Change { from: 2, to: 1 })
        );
    }

    #[test]
    fn the_limit_stays_within_its_bounds() {
        let mut c = Controller::new(0, 3);
        assert_eq!(c.limit(), 1);
        let limits = drive(&mut c, 10, |_| (10, Response::Answered));
        assert_eq!(*limits.iter().max().unwrap(), 3);
        let mut c = Controller::new(50, 3);
        assert_eq!(c.limit(), 3);
        let limits = drive(&mut c, 10, |_| (10, Response::Backpressure));
        assert_eq!(*limits.iter().min().unwrap(), 1);
        // Failures that are not the API's load leave the limit alone.
        let mut c = Controller::new(3, 3);
        let limits = drive(&mut c, 5, |_| (10, Response::Other));
        assert_eq!(limits, vec![3; 5]);
    }
}
