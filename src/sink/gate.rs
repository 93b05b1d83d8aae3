//! The gate every request of a worker to the analytics API passes: at most `limit`
//! requests in flight, where the limit is the fixed concurrency or the adaptive
//! controller's ([`super::arc`]), and never above the worker's share of the fleet-wide
//! cap (`ANALYTICS_MAX_IN_FLIGHT`, set by the heartbeat); and no request while the fleet
//! is paused. A `Retry-After` (or a burst of 429s without one) pauses this worker at once
//! and, through the [`Board`] (one row in PostgreSQL, written only then), every worker:
//! each reads the board at most every [`PAUSE_REFRESH`], when it has requests to send.

use super::arc::{Change, Controller, Response};
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
}

/// Where the fleet's pause is kept (PostgreSQL's `loansync_api_pause`).
#[async_trait::async_trait]
pub trait Board: Send + Sync {
    /// How much longer the fleet is paused (zero: not paused).
    async fn read_pause(&self) -> Result<Duration, String>;
    /// Pauses the fleet for `pause` from now, unless it is paused longer already.
    async fn raise_pause(&self, pause: Duration) -> Result<(), String>;
}

/// No permit could be had before the chunk's deadline.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("no request slot to the analytics API came free before the chunk's deadline")]
pub struct GateTimeout;

struct State {
    controller: Option<Controller>,
    fixed: usize,
    /// This worker's share of the fleet-wide cap (`None`: no cap).
    share: Option<usize>,
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
    fn limit(&self) -> usize {
        let own = self
            .controller
            .as_ref()
            .map_or(self.fixed, Controller::limit);
        self.share.map_or(own, |share| own.min(share))
    }
}

/// The gate of one worker (see the module).
pub struct Gate {
    state: Mutex<State>,
    /// Notified when a request ends or the limit changes.
    freed: Notify,
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
    done: bool,
}

impl Permit<'_> {
    /// The request ended: `response` with `retry_after` (the server's `Retry-After`).
    pub fn done(mut self, response: Response, retry_after: Option<Duration>) {
        self.done = true;
        self.gate.release(self.started, response, retry_after);
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.gate.release(self.started, Response::Other, None);
        }
    }
}

impl Gate {
    pub fn new(settings: GateSettings, telemetry: Telemetry) -> Gate {
        let controller = (settings.mode == ConcurrencyMode::Adaptive)
            .then(|| Controller::new(settings.initial, settings.max));
        let gate = Gate {
            state: Mutex::new(State {
                controller,
                fixed: settings.initial.max(1),
                share: None,
                in_flight: 0,
                paused_until: None,
                board_read: None,
                reading: false,
                board_until: None,
                recent: VecDeque::new(),
                last_rtt: None,
            }),
            freed: Notify::new(),
            origin: Instant::now(),
            settings,
            board: OnceLock::new(),
            telemetry,
        };
        gate.publish(&gate.lock());
        gate
    }

    /// Shares pauses with the fleet through `board` from now on (set once).
    pub fn set_board(&self, board: Arc<dyn Board>) {
        let _ = self.board.set(board);
    }

    pub fn mode(&self) -> ConcurrencyMode {
        self.settings.mode
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Requests allowed in flight now.
    pub fn limit(&self) -> usize {
        self.lock().limit()
    }

    /// What the worker's own controller (or the fixed setting) allows, before the share.
    pub fn own_limit(&self) -> usize {
        let s = self.lock();
        s.controller.as_ref().map_or(s.fixed, Controller::limit)
    }

    pub fn in_flight(&self) -> usize {
        self.lock().in_flight
    }

    /// The API's mean RTT as the controller sees it, else the last one observed.
    pub fn rtt(&self) -> Option<Duration> {
        let s = self.lock();
        s.controller
            .as_ref()
            .and_then(Controller::mean_rtt)
            .or(s.last_rtt)
            .map(Duration::from_secs_f64)
    }

    /// This worker's share of the fleet-wide cap in use (`None`: no cap).
    pub fn share(&self) -> Option<usize> {
        self.lock().share
    }

    /// This worker's share of the fleet-wide cap (`None`: no cap).
    pub fn set_share(&self, share: Option<usize>) {
        let mut s = self.lock();
        if s.share != share {
            s.share = share;
            self.publish(&s);
            drop(s);
            self.freed.notify_waiters();
        }
    }

    /// Waits for the fleet's pause to end and for a free slot, until `deadline`: then
    /// [`GateTimeout`] (a slot free at once is taken even after the deadline, so a
    /// chunk with no time for retries still sends its first request).
    pub async fn acquire(&self, deadline: Instant) -> Result<Permit<'_>, GateTimeout> {
        loop {
            self.refresh_pause().await;
            let notified = self.freed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let wait_until = {
                let mut s = self.lock();
                let now = Instant::now();
                match s.paused_until.filter(|until| *until > now) {
                    Some(until) => until.min(deadline),
                    None if s.in_flight < s.limit() => {
                        s.in_flight += 1;
                        let in_flight = s.in_flight;
                        if let Some(c) = s.controller.as_mut() {
                            c.on_start(in_flight);
                        }
                        self.publish(&s);
                        return Ok(Permit {
                            gate: self,
                            started: now,
                            done: false,
                        });
                    }
                    None => deadline,
                }
            };
            if Instant::now() >= deadline {
                return Err(GateTimeout);
            }
            // A pause ends by the clock, a slot by a notification; a pause's end is
            // also checked against the board again.
            tokio::select! {
                _ = tokio::time::sleep_until(wait_until.min(Instant::now() + PAUSE_REFRESH)) => {}
                _ = &mut notified => {}
            }
        }
    }

    /// Reads the fleet's pause from the board when the last read is older than
    /// [`PAUSE_REFRESH`] and no other request is reading it.
    async fn refresh_pause(&self) {
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
        let read = board.read_pause().await;
        drop(reading);
        let mut s = self.lock();
        let now = Instant::now();
        s.board_read = Some(now);
        match read {
            Ok(left) if !left.is_zero() => {
                let until = now + left;
                s.paused_until = Some(s.paused_until.map_or(until, |u| u.max(until)));
            }
            Ok(_) => {}
            Err(e) => tracing::debug!(error = %e, "could not read the fleet's pause"),
        }
    }

    fn release(&self, started: Instant, response: Response, retry_after: Option<Duration>) {
        let now = Instant::now();
        let rtt = now.saturating_duration_since(started);
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
        let pause = if response == Response::Backpressure {
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
        } else {
            None
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

    /// Sets the gauges from `s`.
    fn publish(&self, s: &State) {
        let rtt = s
            .controller
            .as_ref()
            .and_then(Controller::mean_rtt)
            .or(s.last_rtt);
        self.telemetry.api_gate(s.limit(), s.in_flight, rtt);
    }
}

impl std::fmt::Debug for Gate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gate").finish_non_exhaustive()
    }
}
