//! The gate every request of a worker to the analytics API passes: at most `limit`
//! requests in flight, where the limit is the fixed concurrency or the adaptive
//! controller's ([`super::arc`]), never above the worker's share ([`super::share`]) of
//! the fleet's total (the cap `ANALYTICS_MAX_IN_FLIGHT`, and in adaptive mode the
//! fleet's adapted limit); and no request while the fleet is paused.
//!
//! The [`Board`] (one row in PostgreSQL) holds what the fleet shares; each worker reads
//! it at most every [`PAUSE_REFRESH`], when it has requests to send, and writes it only
//! on the events below, never per request.
//! * Adaptive mode: backpressure (429, 503, a timeout) on a request started under the
//!   fleet limit's current generation lowers the fleet's limit ×0.9 (from what the live
//!   workers allow together, the first time), at most every [`LOWER_EVERY`]: one round of
//!   429s lowers it once, and every worker's share follows at its next read. Until the lowered limit is known, the
//!   worker starts no request in place of the one pushed back. A worker whose share held
//!   it back raises the fleet's limit by one, at most every [`RAISE_EVERY`] and not
//!   within [`PROBE_HOLD`] of a lowering (the board enforces both for the fleet), so the
//!   fleet probes the API's capacity about once per [`PROBE_HOLD`] and sits at it between
//!   probes. A 503 with `Retry-After` (the API unavailable, not busy) pauses the fleet.
//! * Fixed mode: a `Retry-After` (or a burst of 429s without one) pauses this worker at
//!   once and every worker through the board.

use super::arc::{Change, Controller, Response};
use super::share::{Membership, guard_for};
use crate::telemetry::Telemetry;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;
use tokio::sync::Notify;
use tokio::time::Instant;

/// The fleet's pause is read at most this often per worker.
pub const PAUSE_REFRESH: Duration = Duration::from_millis(250);
/// Backpressure answers without `Retry-After` within [`BURST_WINDOW`] that make a burst.
pub const BURST: usize = 3;
pub const BURST_WINDOW: Duration = Duration::from_secs(1);
/// No lowering of the fleet's limit within this long of the last (the board's rule):
/// every worker reads a lowering (at most [`PAUSE_REFRESH`] later) before the answers
/// to its old limit can lower it again.
pub const LOWER_EVERY: Duration = Duration::from_millis(300);
/// No raise of the fleet's limit within this long of a lowering (the board's rule).
pub const PROBE_HOLD: Duration = Duration::from_secs(3);
/// The fleet's limit is raised at most this often (the board's rule).
pub const RAISE_EVERY: Duration = Duration::from_secs(1);
/// After this long without a lowering, a raise adds a quarter of the limit, not 1.
pub const QUIET: Duration = Duration::from_secs(10);

/// How a worker's limit is chosen (`ETL_WORKER_CONCURRENCY_MODE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConcurrencyMode {
    /// `ETL_WORKER_CONCURRENCY` requests at most, as chunks in flight.
    Fixed,
    /// Follows the API's answers within `[1, ETL_WORKER_MAX_CONCURRENCY]`.
    Adaptive,
}

impl ConcurrencyMode {
    pub fn as_str(self) -> &'static str {
        match self {
            ConcurrencyMode::Fixed => "fixed",
            ConcurrencyMode::Adaptive => "adaptive",
        }
    }
}

/// How a gate is set up.
#[derive(Debug, Clone)]
pub struct GateSettings {
    pub mode: ConcurrencyMode,
    /// The fixed limit, and the adaptive one's start.
    pub initial: usize,
    /// The adaptive limit's largest value.
    pub max: usize,
    /// The longest pause a `Retry-After` asks of the fleet (`ETL_RETRY_MAX_INTERVAL_SECS`).
    pub max_pause: Duration,
    /// The pause after a burst of backpressure answers without `Retry-After`
    /// (`ETL_RETRY_INITIAL_MS`).
    pub burst_pause: Duration,
    /// Requests in flight across every worker (`ANALYTICS_MAX_IN_FLIGHT`).
    pub fleet_cap: Option<u32>,
}

/// The fleet's adapted limit on requests in flight, as the board holds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FleetLimit {
    /// `None`: no limit (each worker's own controller alone).
    pub limit: Option<u32>,
    /// Bumped by every change; a change names the generation it saw.
    pub generation: i64,
}

/// What a read of the board finds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BoardState {
    /// How much longer the fleet is paused (zero: not paused).
    pub pause: Duration,
    pub fleet: FleetLimit,
}

/// Where the fleet's pause and limit are kept (PostgreSQL's `loansync_api_pause`).
#[async_trait::async_trait]
pub trait Board: Send + Sync {
    /// The fleet's pause and limit now.
    async fn read(&self) -> Result<BoardState, String>;
    /// Pauses the fleet for `pause` from now, unless it is paused longer already.
    async fn raise_pause(&self, pause: Duration) -> Result<(), String>;
    /// Lowers the fleet's limit ×0.9 if its generation is still `seen`; returns it as it
    /// is after.
    async fn lower_limit(&self, seen: i64) -> Result<FleetLimit, String>;
    /// Raises the fleet's limit if its generation is still `seen` and the board's timing
    /// allows ([`PROBE_HOLD`], [`RAISE_EVERY`], [`QUIET`]); returns it as it is after.
    async fn raise_limit(&self, seen: i64) -> Result<FleetLimit, String>;
}

/// No permit could be had before the chunk's deadline.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("no request slot to the analytics API came free before the chunk's deadline")]
pub struct GateTimeout;

struct State {
    controller: Option<Controller>,
    fixed: usize,
    cap: Option<u32>,
    /// The fleet's adapted limit as last read from or written to the board (adaptive).
    fleet: FleetLimit,
    /// This worker's views of the fleet (`None`: not in a fleet: no share).
    membership: Option<Membership>,
    /// After backpressure: no request starts while this many are in flight, until then.
    hold: Option<(Instant, usize)>,
    lowering: bool,
    raising: bool,
    /// A request waited for a share smaller than this worker's own limit.
    held_back: bool,
    last_backpressure: Option<Instant>,
    last_raise: Option<Instant>,
    in_flight: usize,
    /// No request starts before this (this worker's and the fleet's pause).
    paused_until: Option<Instant>,
    /// When the board was last read, and whether a read is under way.
    board_read: Option<Instant>,
    reading: bool,
    /// The end of the pause last written to the board by this worker.
    board_until: Option<Instant>,
    /// Recent backpressure answers without `Retry-After`.
    recent: VecDeque<Instant>,
    /// The last RTT observed (seconds).
    last_rtt: Option<f64>,
}

impl State {
    fn own(&self) -> usize {
        self.controller
            .as_ref()
            .map_or(self.fixed, Controller::limit)
    }

    /// The fleet's total this worker takes its share of: the cap and, in adaptive mode,
    /// the fleet's adapted limit, the least of them.
    fn total(&self) -> Option<u32> {
        let adapted = self.controller.as_ref().and(self.fleet.limit);
        match (self.cap, adapted) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn rtt(&self) -> Option<f64> {
        self.controller
            .as_ref()
            .and_then(Controller::mean_rtt)
            .or(self.last_rtt)
    }

    fn guard(&self) -> Duration {
        guard_for(self.rtt().and_then(|r| Duration::try_from_secs_f64(r).ok()))
    }

    fn share(&self, now: Instant) -> Option<usize> {
        let total = self.total()?;
        let membership = self.membership.as_ref()?;
        Some(membership.share(total, now, self.guard()))
    }

    fn limit(&self, now: Instant) -> usize {
        let mut limit = self.own();
        if let Some(share) = self.share(now) {
            limit = limit.min(share);
        }
        if let Some((until, level)) = self.hold
            && now < until
        {
            limit = limit.min(level);
        }
        limit
    }

    /// The fleet's limit `seen` replaces what this worker knew, unless it is older.
    fn learn(&mut self, seen: FleetLimit) {
        if seen.generation >= self.fleet.generation {
            if seen.generation > self.fleet.generation {
                self.hold = None;
            }
            self.fleet = seen;
        }
    }
}

/// The gate of one worker (see the module).
pub struct Gate {
    state: Arc<Mutex<State>>,
    /// Notified when a request ends or the limit changes.
    freed: Arc<Notify>,
    origin: Instant,
    settings: GateSettings,
    board: OnceLock<Arc<dyn Board>>,
    telemetry: Telemetry,
}

/// A request in flight; [`Permit::done`] says how it ended (dropped: as `Other`).
#[derive(Debug)]
pub struct Permit<'a> {
    gate: &'a Gate,
    started: Instant,
    /// The fleet limit's generation when the request started.
    generation: i64,
    done: bool,
}

/// How a request ended, for the gate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ended {
    pub response: Response,
    /// The server's `Retry-After`.
    pub retry_after: Option<Duration>,
    /// The API said it is unavailable (503), not merely busy.
    pub unavailable: bool,
}

impl Ended {
    pub fn new(response: Response) -> Ended {
        Ended {
            response,
            retry_after: None,
            unavailable: false,
        }
    }
}

impl Permit<'_> {
    /// The request ended as `ended` says.
    pub fn done(mut self, ended: Ended) {
        self.done = true;
        self.gate.release(self.started, self.generation, ended);
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.gate
                .release(self.started, self.generation, Ended::new(Response::Other));
        }
    }
}

fn lock(state: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|p| p.into_inner())
}

impl Gate {
    pub fn new(settings: GateSettings, telemetry: Telemetry) -> Gate {
        let controller = (settings.mode == ConcurrencyMode::Adaptive)
            .then(|| Controller::new(settings.initial, settings.max));
        let gate = Gate {
            state: Arc::new(Mutex::new(State {
                controller,
                fixed: settings.initial.max(1),
                cap: settings.fleet_cap,
                fleet: FleetLimit::default(),
                membership: None,
                hold: None,
                lowering: false,
                raising: false,
                held_back: false,
                last_backpressure: None,
                last_raise: None,
                in_flight: 0,
                paused_until: None,
                board_read: None,
                reading: false,
                board_until: None,
                recent: VecDeque::new(),
                last_rtt: None,
            })),
            freed: Arc::new(Notify::new()),
            origin: Instant::now(),
            settings,
            board: OnceLock::new(),
            telemetry,
        };
        gate.publish(&gate.lock());
        gate
    }

    /// Shares pauses and the fleet's limit with the fleet through `board` from now on
    /// (set once).
    pub fn set_board(&self, board: Arc<dyn Board>) {
        let _ = self.board.set(board);
    }

    pub fn mode(&self) -> ConcurrencyMode {
        self.settings.mode
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        lock(&self.state)
    }

    /// Requests allowed in flight now.
    pub fn limit(&self) -> usize {
        self.lock().limit(Instant::now())
    }

    /// What the worker's own controller (or the fixed setting) allows, before the share.
    pub fn own_limit(&self) -> usize {
        self.lock().own()
    }

    pub fn in_flight(&self) -> usize {
        self.lock().in_flight
    }

    /// The API's mean RTT as the controller sees it, else the last one observed.
    pub fn rtt(&self) -> Option<Duration> {
        self.lock()
            .rtt()
            .and_then(|r| Duration::try_from_secs_f64(r).ok())
    }

    /// This worker's share of the fleet's total now (`None`: no total, or no fleet).
    pub fn share(&self) -> Option<usize> {
        self.lock().share(Instant::now())
    }

    /// The fleet's adapted limit as this worker knows it.
    pub fn fleet_limit(&self) -> FleetLimit {
        self.lock().fleet
    }

    /// This worker's views of the fleet, from its heartbeats.
    pub fn set_membership(&self, membership: Membership) {
        let mut s = self.lock();
        s.membership = Some(membership);
        self.publish(&s);
        drop(s);
        self.freed.notify_waiters();
    }

    /// Waits for the fleet's pause to end and for a free slot, until `deadline`: then
    /// [`GateTimeout`] (a slot free at once is taken even after the deadline, so a
    /// chunk with no time for retries still sends its first request).
    pub async fn acquire(&self, deadline: Instant) -> Result<Permit<'_>, GateTimeout> {
        loop {
            self.refresh_board().await;
            let notified = self.freed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let wait_until = {
                let mut s = self.lock();
                let now = Instant::now();
                let limit = s.limit(now);
                match s.paused_until.filter(|until| *until > now) {
                    Some(until) => until.min(deadline),
                    None if s.in_flight < limit => {
                        s.in_flight += 1;
                        let in_flight = s.in_flight;
                        if let Some(c) = s.controller.as_mut() {
                            c.on_start(in_flight);
                        }
                        let generation = s.fleet.generation;
                        self.publish(&s);
                        return Ok(Permit {
                            gate: self,
                            started: now,
                            generation,
                            done: false,
                        });
                    }
                    None => {
                        // Held back by the share while its own limit would allow more:
                        // the fleet's limit may be too low.
                        if s.share(now).is_some_and(|share| share < s.own()) {
                            s.held_back = true;
                        }
                        let turn = s
                            .membership
                            .as_ref()
                            .filter(|_| s.total().is_some())
                            .and_then(|m| m.next_change(now, s.guard()));
                        let hold_end = s.hold.map(|(until, _)| until).filter(|u| *u > now);
                        [Some(deadline), turn, hold_end]
                            .into_iter()
                            .flatten()
                            .min()
                            .unwrap_or(deadline)
                    }
                }
            };
            if Instant::now() >= deadline {
                return Err(GateTimeout);
            }
            // A pause and a turn end by the clock, a slot by a notification; the board
            // is read again meanwhile.
            tokio::select! {
                _ = tokio::time::sleep_until(wait_until.min(Instant::now() + PAUSE_REFRESH)) => {}
                _ = &mut notified => {}
            }
        }
    }

    /// Reads the fleet's pause and limit from the board when the last read is older
    /// than [`PAUSE_REFRESH`] and no other request is reading it.
    async fn refresh_board(&self) {
        let Some(board) = self.board.get() else {
            return;
        };
        {
            let mut s = self.lock();
            let now = Instant::now();
            if s.reading || s.board_read.is_some_and(|at| now < at + PAUSE_REFRESH) {
                return;
            }
            s.reading = true;
        }
        // Reset even when this request is dropped while reading.
        struct Reading<'a>(&'a Gate);
        impl Drop for Reading<'_> {
            fn drop(&mut self) {
                self.0.lock().reading = false;
            }
        }
        let reading = Reading(self);
        let read = board.read().await;
        drop(reading);
        let mut s = self.lock();
        let now = Instant::now();
        s.board_read = Some(now);
        match read {
            Ok(state) => {
                if !state.pause.is_zero() {
                    let until = now + state.pause;
                    s.paused_until = Some(s.paused_until.map_or(until, |u| u.max(until)));
                }
                s.learn(state.fleet);
                self.publish(&s);
            }
            Err(e) => tracing::debug!(error = %e, "could not read the fleet's board"),
        }
    }

    fn release(&self, started: Instant, generation: i64, ended: Ended) {
        let now = Instant::now();
        let rtt = now.saturating_duration_since(started);
        let Ended {
            response,
            retry_after,
            unavailable,
        } = ended;
        let mut s = self.lock();
        s.in_flight = s.in_flight.saturating_sub(1);
        if response == Response::Answered {
            s.last_rtt = Some(rtt.as_secs_f64());
        }
        let change = s
            .controller
            .as_mut()
            .and_then(|c| c.on_response(now - self.origin, rtt, response));
        if let Some(Change { from, to }) = change {
            tracing::debug!(from, to, "adaptive concurrency: the limit moved");
        }
        let adaptive = s.controller.is_some() && self.board.get().is_some();
        let backpressure = response == Response::Backpressure;
        if backpressure {
            s.last_backpressure = Some(now);
        }
        if adaptive && backpressure {
            // Nothing starts in place of the request pushed back until the fleet's
            // lowered limit is known (or a board read's time has passed).
            s.hold = Some((now + PAUSE_REFRESH, s.in_flight));
            if generation == s.fleet.generation && !s.lowering {
                s.lowering = true;
                self.change_fleet_limit(generation, Direction::Lower);
            }
        } else if adaptive
            && response == Response::Answered
            && s.held_back
            && !s.raising
            && s.fleet.limit.is_some()
            && s.cap
                .is_none_or(|cap| s.fleet.limit.is_some_and(|l| l < cap))
            && s.last_backpressure.is_none_or(|at| now >= at + PROBE_HOLD)
            && s.last_raise.is_none_or(|at| now >= at + RAISE_EVERY)
        {
            s.raising = true;
            s.held_back = false;
            s.last_raise = Some(now);
            self.change_fleet_limit(s.fleet.generation, Direction::Raise);
        }
        let pause = if !backpressure {
            None
        } else if adaptive {
            // Busy: the fleet's limit falls. Unavailable for a while: the fleet waits.
            retry_after
                .filter(|_| unavailable)
                .map(|d| d.min(self.settings.max_pause))
        } else {
            match retry_after {
                Some(d) => Some(d.min(self.settings.max_pause)),
                None => {
                    s.recent.push_back(now);
                    while s.recent.front().is_some_and(|t| *t + BURST_WINDOW < now) {
                        s.recent.pop_front();
                    }
                    (s.recent.len() >= BURST).then(|| {
                        s.recent.clear();
                        self.settings.burst_pause
                    })
                }
            }
        };
        if let Some(pause) = pause.filter(|p| !p.is_zero()) {
            let until = now + pause;
            s.paused_until = Some(s.paused_until.map_or(until, |u| u.max(until)));
            // The board is written only when this pause ends later than what this worker
            // wrote last: a burst of 429s writes the row once.
            let newer = s
                .board_until
                .is_none_or(|b| until > b + Duration::from_millis(100));
            if let (true, Some(board)) = (newer, self.board.get()) {
                s.board_until = Some(until);
                let board = board.clone();
                tokio::spawn(async move {
                    if let Err(e) = board.raise_pause(pause).await {
                        tracing::warn!(error = %e, "could not pause the fleet");
                    }
                });
            }
            tracing::info!(
                pause_ms = pause.as_millis() as u64,
                "the analytics API asked to slow down: requests paused"
            );
        }
        self.publish(&s);
        drop(s);
        self.freed.notify_waiters();
    }

    /// Lowers or raises the fleet's limit on the board in the background; what the board
    /// answers becomes this worker's view at once.
    fn change_fleet_limit(&self, seen: i64, direction: Direction) {
        let Some(board) = self.board.get().cloned() else {
            return;
        };
        let (state, freed, telemetry) = (
            self.state.clone(),
            self.freed.clone(),
            self.telemetry.clone(),
        );
        tokio::spawn(async move {
            let answer = match direction {
                Direction::Lower => board.lower_limit(seen).await,
                Direction::Raise => board.raise_limit(seen).await,
            };
            let mut s = lock(&state);
            // A lowering learnt ends the hold (`State::learn`); one refused leaves it to
            // its end.
            match direction {
                Direction::Lower => s.lowering = false,
                Direction::Raise => s.raising = false,
            }
            match answer {
                Ok(fleet) => {
                    let before = s.fleet;
                    s.learn(fleet);
                    if s.fleet != before {
                        tracing::debug!(
                            from = ?before.limit,
                            to = ?s.fleet.limit,
                            "adaptive concurrency: the fleet's limit moved"
                        );
                    }
                }
                Err(e) => tracing::warn!(error = %e, "could not change the fleet's limit"),
            }
            publish(&telemetry, &s);
            drop(s);
            freed.notify_waiters();
        });
    }

    /// Sets the gauges from `s`.
    fn publish(&self, s: &State) {
        publish(&self.telemetry, s);
    }
}

#[derive(Debug, Clone, Copy)]
enum Direction {
    Lower,
    Raise,
}

/// Sets the gauges from `s`.
fn publish(telemetry: &Telemetry, s: &State) {
    telemetry.api_gate(
        s.limit(Instant::now()),
        s.in_flight,
        s.rtt(),
        s.controller.as_ref().and(s.fleet.limit),
    );
}

impl std::fmt::Debug for Gate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gate").finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sink::share::{Clock, View};

    /// A board in memory with the rules of PostgreSQL's (generation checked).
    #[derive(Default)]
    struct MemoryBoard {
        state: Mutex<BoardState>,
        lowered: Mutex<u32>,
        raised: Mutex<u32>,
        paused: Mutex<Vec<Duration>>,
    }

    #[async_trait::async_trait]
    impl Board for MemoryBoard {
        async fn read(&self) -> Result<BoardState, String> {
            Ok(*self.state.lock().unwrap())
        }
        async fn raise_pause(&self, pause: Duration) -> Result<(), String> {
            self.paused.lock().unwrap().push(pause);
            Ok(())
        }
        async fn lower_limit(&self, seen: i64) -> Result<FleetLimit, String> {
            let mut s = self.state.lock().unwrap();
            if s.fleet.generation == seen {
                let current = s.fleet.limit.unwrap_or(10);
                s.fleet = FleetLimit {
                    limit: Some(((current as f64 * 0.9) as u32).min(current - 1).max(1)),
                    generation: seen + 1,
                };
                *self.lowered.lock().unwrap() += 1;
            }
            Ok(s.fleet)
        }
        async fn raise_limit(&self, seen: i64) -> Result<FleetLimit, String> {
            let mut s = self.state.lock().unwrap();
            if s.fleet.generation == seen {
                s.fleet = FleetLimit {
                    limit: s.fleet.limit.map(|l| l + 1),
                    generation: seen + 1,
                };
                *self.raised.lock().unwrap() += 1;
            }
            Ok(s.fleet)
        }
    }

    fn adaptive_gate(initial: usize) -> (Gate, Arc<MemoryBoard>) {
        let gate = Gate::new(
            GateSettings {
                mode: ConcurrencyMode::Adaptive,
                initial,
                max: 16,
                max_pause: Duration::from_secs(30),
                burst_pause: Duration::from_millis(100),
                fleet_cap: None,
            },
            Telemetry::fresh(),
        );
        let board = Arc::new(MemoryBoard::default());
        gate.set_board(board.clone());
        (gate, board)
    }

    /// Waits (on the paused clock) until the background change has landed.
    async fn settle() {
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
    }

    fn busy(retry_after: u64) -> Ended {
        Ended {
            response: Response::Backpressure,
            retry_after: Some(Duration::from_secs(retry_after)),
            unavailable: false,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn one_round_of_429s_lowers_the_fleets_limit_once_and_pauses_nobody() {
        let (gate, board) = adaptive_gate(10);
        let deadline = Instant::now() + Duration::from_secs(60);
        let permits: Vec<_> = {
            let mut v = Vec::new();
            for _ in 0..4 {
                v.push(gate.acquire(deadline).await.unwrap());
            }
            v
        };
        // Four requests of the same generation pushed back: one lowering (10 → 9).
        for p in permits {
            p.done(busy(1));
        }
        settle().await;
        assert_eq!(*board.lowered.lock().unwrap(), 1);
        assert_eq!(
            gate.fleet_limit(),
            FleetLimit {
                limit: Some(9),
                generation: 1
            }
        );
        assert!(
            board.paused.lock().unwrap().is_empty(),
            "a 429 pauses no one"
        );
        // A request started under the new generation and pushed back lowers it again.
        let p = gate.acquire(deadline).await.unwrap();
        p.done(busy(1));
        settle().await;
        assert_eq!(gate.fleet_limit().limit, Some(8));
        // The API unavailable with a Retry-After: the fleet waits.
        let p = gate.acquire(deadline).await.unwrap();
        p.done(Ended {
            unavailable: true,
            ..busy(2)
        });
        settle().await;
        assert_eq!(
            *board.paused.lock().unwrap(),
            [Duration::from_secs(2)],
            "a 503 with Retry-After pauses the fleet"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_share_of_the_fleets_limit_bounds_the_worker_and_a_held_back_worker_raises_it() {
        let (gate, board) = adaptive_gate(8);
        *board.state.lock().unwrap() = BoardState {
            pause: Duration::ZERO,
            fleet: FleetLimit {
                limit: Some(3),
                generation: 5,
            },
        };
        // Two live workers, this one first: 1 or 2 of 3 by turns.
        let now = Instant::now();
        gate.set_membership(Membership {
            views: vec![View {
                live: 2,
                rank: 0,
                clock: Clock {
                    at: now,
                    epoch: 100.0,
                },
            }],
        });
        let deadline = now + Duration::from_secs(60);
        let first = gate.acquire(deadline).await.unwrap();
        assert_eq!(gate.fleet_limit().limit, Some(3), "read from the board");
        let share = gate.share().unwrap();
        assert!((1..=2).contains(&share), "{share}");
        let mut held = vec![first];
        while held.len() < share {
            held.push(gate.acquire(deadline).await.unwrap());
        }
        // The next request waits for the share, not for its own limit of 8.
        let waiting = tokio::time::timeout(
            Duration::from_millis(50),
            gate.acquire(Instant::now() + Duration::from_secs(60)),
        )
        .await;
        assert!(waiting.is_err(), "the share holds it back");
        // Past the probe's hold, an answer lets the held-back worker raise the limit.
        tokio::time::advance(PROBE_HOLD).await;
        held.pop().unwrap().done(Ended::new(Response::Answered));
        settle().await;
        assert_eq!(*board.raised.lock().unwrap(), 1);
        assert_eq!(gate.fleet_limit().limit, Some(4));
        // No second raise within RAISE_EVERY.
        let p = gate.acquire(deadline).await.unwrap();
        let _ = tokio::time::timeout(
            Duration::from_millis(10),
            gate.acquire(Instant::now() + Duration::from_secs(60)),
        )
        .await;
        p.done(Ended::new(Response::Answered));
        settle().await;
        assert_eq!(*board.raised.lock().unwrap(), 1);
    }
}
