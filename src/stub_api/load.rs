//! How the stub behaves under load, as a shared API with a capacity of its own does:
//! every request in the handler is counted (the most seen at once is kept, so tests can
//! assert a fleet-wide cap), a rate limit and a capacity answer 429 with `Retry-After`
//! beyond them, or, with `capacity_queue`, requests wait for a free slot, and the time a
//! request is served for can grow with the number being served.

use super::{AppState, lock};
use std::time::{Duration, Instant};

/// What the load model decided for one request.
pub(super) enum Admission {
    /// Served: hold the guard until the answer is written.
    Served(Serving),
    /// Refused by the rate limit or the capacity: 429 with `Retry-After`.
    Refused,
}

/// A request counted in flight (from its arrival to its answer).
pub(super) struct InFlight {
    state: AppState,
}

impl InFlight {
    /// Counts a request that arrived, and the most seen at once.
    pub(super) fn arrive(state: &AppState) -> InFlight {
        let mut s = lock(state);
        s.in_flight += 1;
        let now = s.in_flight;
        let max = &mut s.received.max_in_flight;
        *max = (*max).max(now);
        s.received.first_arrival.get_or_insert_with(unix_now);
        InFlight {
            state: state.clone(),
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut s = lock(&self.state);
        s.in_flight -= 1;
        s.received.last_answer = Some(unix_now());
    }
}

/// Now, in Unix seconds.
fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// A request being served (it holds one slot of the capacity).
pub(super) struct Serving {
    state: AppState,
}

impl Drop for Serving {
    fn drop(&mut self) {
        let notify = {
            let mut s = lock(&self.state);
            s.serving -= 1;
            s.slot_freed.clone()
        };
        notify.notify_one();
    }
}

/// Admits a request: the rate limit first, then the capacity (refused, or waited for
/// with `capacity_queue`); then the service time (`latency_ms`, plus
/// `latency_per_request_ms` for each other request being served).
pub(super) async fn admit(state: &AppState) -> Admission {
    loop {
        match try_admit(state) {
            Step::Refused => return Admission::Refused,
            Step::Serve(service) => {
                let serving = Serving {
                    state: state.clone(),
                };
                if service > 0 {
                    tokio::time::sleep(Duration::from_millis(service)).await;
                }
                return Admission::Served(serving);
            }
            // A slot freed after the check left a permit in `notify`: not missed.
            Step::Queue(notify) => notify.notified().await,
        }
    }
}

/// What [`try_admit`] decided.
enum Step {
    Refused,
    /// Holds a slot now (counted in `serving`); served for this many ms.
    Serve(u64),
    /// Wait for a slot to free.
    Queue(std::sync::Arc<tokio::sync::Notify>),
}

fn try_admit(state: &AppState) -> Step {
    let mut s = lock(state);
    let f = s.faults.clone();
    if f.rate_limit > 0.0 && !s.take_token(f.rate_limit) {
        s.received.rate_limited += 1;
        return Step::Refused;
    }
    if f.capacity == 0 || s.serving < f.capacity {
        let others = s.serving as u64;
        s.serving += 1;
        return Step::Serve(f.latency_ms + f.latency_per_request_ms * others);
    }
    if !f.capacity_queue {
        s.received.over_capacity += 1;
        return Step::Refused;
    }
    Step::Queue(s.slot_freed.clone())
}

/// A token bucket refilled at `rate` per second, holding at most a second's worth
/// (and at least one).
#[derive(Debug)]
pub(super) struct Bucket {
    tokens: f64,
    refilled: Instant,
}

impl Default for Bucket {
    fn default() -> Self {
        Bucket {
            tokens: 1.0,
            refilled: Instant::now(),
        }
    }
}

impl Bucket {
    /// Takes a token if there is one.
    pub(super) fn take(&mut self, rate: f64) -> bool {
        let now = Instant::now();
        let burst = rate.max(1.0);
        let elapsed = now.saturating_duration_since(self.refilled).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate).min(burst);
        self.refilled = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}
