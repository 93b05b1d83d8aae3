//! A local analytics API that implements SPEC.md section 4 faithfully, for tests, the
//! demo and `docker compose`: bearer authentication, body validation (including the
//! never-send keys), idempotency keys, and faults injected on demand.
//!
//! Control endpoints when it runs as its own process: `GET /__stats`, `PUT /__faults`,
//! `GET /healthz`.
//!
//! The files: this one (faults, what was received, the running stub and its control
//! endpoints), `ingest` (one request answered: faults first, then the contract),
//! `load` (the capacity, rate limit and service time of an API under load, and the
//! requests counted in flight), `scan` (reading a body's envelope without building it).

mod ingest;
mod load;
mod scan;

use axum::Router;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::routing::{get, post, put};
use ingest::{Endpoint, ingest};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use crate::domain::EntityKind;

/// Faults to inject. Rates are fractions of requests in `0.0..=1.0`.
#[derive(Clone, Default, Debug, Serialize, Deserialize)]
#[serde(default)]
pub struct Faults {
    /// Answer 503 (with `Retry-After` when `retry_after_secs` is set).
    pub error_5xx_rate: f64,
    /// Answer 429 with `Retry-After: retry_after_secs`.
    pub rate_429: f64,
    pub retry_after_secs: u64,
    /// Send `Retry-After` as an HTTP-date (now + `retry_after_secs`) instead of seconds.
    pub retry_after_date: bool,
    /// A batch of more than this many records is refused whole with 413, before any
    /// other fault, as a proxy in front of the API would (0: off).
    pub max_records: usize,
    /// Pad the `message` of injected error answers, and the `message` and `details` of
    /// `rejected` entries, to this many bytes: a hostile or broken API (0: off).
    pub huge_text_bytes: usize,
    /// Sleep `slow_ms` before answering.
    pub slow_rate: f64,
    pub slow_ms: u64,
    /// Close the connection without an answer.
    pub drop_rate: f64,
    /// The next `fail_next` requests answer `fail_next_status` (deterministic).
    pub fail_next: u32,
    pub fail_next_status: u16,
    /// Ids divisible by this are listed in a 200's `rejected` (0: off).
    pub reject_every_nth: u64,
    /// A batch holding any of these ids is refused whole with 422.
    pub refuse_ids: Vec<i64>,
    /// The next `garbage_next` requests answer 200 with a body that is not JSON.
    pub garbage_next: u32,
    /// Put NUL characters (`\u0000`, which PostgreSQL's `text` and `jsonb` refuse) into
    /// the text of answers: `rejected` entries' `message` and `details` (a key and a
    /// value), a `200`'s body (an extra `notes` object), the `message` of error answers;
    /// garbage bodies (`garbage_next`) then also carry a NUL byte, invalid UTF-8 and a
    /// lone surrogate escape.
    pub nul_text: bool,
    pub seed: u64,
    /// Requests served at once (0: no limit), as a shared API's capacity. Beyond it a
    /// request is answered 429 with `Retry-After: retry_after_secs`, or, with
    /// `capacity_queue`, waits for a free slot (its latency grows with the load).
    pub capacity: usize,
    pub capacity_queue: bool,
    /// Every request is served for `latency_ms`, plus `latency_per_request_ms` for each
    /// other request being served when it starts: latency that grows with load.
    pub latency_ms: u64,
    pub latency_per_request_ms: u64,
    /// Requests admitted per second (a token bucket holding a second's worth; 0: no
    /// limit); beyond it 429 with `Retry-After: retry_after_secs`.
    pub rate_limit: f64,
}

/// How the stub is set up.
#[derive(Clone, Debug)]
pub struct StubConfig {
    pub api_key: String,
    pub faults: Faults,
}

/// What the stub has accepted so far.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Received {
    /// Per entity: id → times accepted (once per idempotency key).
    pub accepted: BTreeMap<EntityKind, BTreeMap<i64, u32>>,
    /// Answers by status code.
    pub statuses: BTreeMap<u16, u64>,
    /// Idempotency keys seen, in order.
    pub idempotency_keys: Vec<String>,
    /// Records that carried a never-send key (should stay empty).
    pub forbidden: u64,
    /// Requests whose idempotency key had been answered before for another set of
    /// records: they got that other set's answer (should stay 0).
    pub keys_reused_for_other_records: u64,
    /// Requests whose idempotency key had been answered before for the same records
    /// with other content (another body): they got the answer given to the old content,
    /// which the platform still holds (should stay 0).
    pub keys_reused_for_other_content: u64,
    /// Requests whose body came gzipped (`Content-Encoding: gzip`).
    pub gzip_requests: u64,
    /// The most requests the stub had in its handler at once (every request counted from
    /// its arrival to its answer, refused ones too): what a client-side cap bounds.
    pub max_in_flight: usize,
    /// When the first request arrived and the last one was answered (Unix seconds): the
    /// time the API had work.
    pub first_arrival: Option<f64>,
    pub last_answer: Option<f64>,
    /// Requests answered 429 because `capacity` requests were being served.
    pub over_capacity: u64,
    /// Requests answered 429 by the rate limit.
    pub rate_limited: u64,
    /// Per entity: id → the last record accepted for it, as JSON text: what the platform
    /// holds. Kept only after [`StubHandle::keep_records`] (it costs memory and CPU).
    #[serde(skip)]
    pub records: BTreeMap<EntityKind, BTreeMap<i64, String>>,
    /// Every (sync id, entity, id) accepted, kept with [`Received::records`]: what the
    /// platform took in each sync, to check that loansync counts none of it as failed.
    #[serde(skip)]
    pub accepted_in: BTreeSet<(String, EntityKind, i64)>,
}

impl Received {
    /// The ids of `entity` accepted at least once.
    pub fn ids(&self, entity: EntityKind) -> BTreeSet<i64> {
        self.accepted
            .get(&entity)
            .map(|m| m.keys().copied().collect())
            .unwrap_or_default()
    }

    /// Ids of `entity` accepted more often now than in `before`.
    pub fn ids_sent_since(&self, before: &Received, entity: EntityKind) -> BTreeSet<i64> {
        let empty = BTreeMap::new();
        let old = before.accepted.get(&entity).unwrap_or(&empty);
        self.accepted
            .get(&entity)
            .map(|m| {
                m.iter()
                    .filter(|(id, n)| old.get(id).copied().unwrap_or(0) < **n)
                    .map(|(id, _)| *id)
                    .collect()
            })
            .unwrap_or_default()
    }

    /// How many answers had this status.
    pub fn status_count(&self, status: u16) -> u64 {
        self.statuses.get(&status).copied().unwrap_or(0)
    }

    /// The last record accepted for each id of `entity`, parsed (see
    /// [`StubHandle::keep_records`]).
    pub fn latest(&self, entity: EntityKind) -> BTreeMap<i64, Value> {
        self.records
            .get(&entity)
            .map(|m| {
                m.iter()
                    .map(|(id, raw)| (*id, serde_json::from_str(raw).unwrap_or(Value::Null)))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// All requests answered (dropped connections not counted).
    pub fn requests(&self) -> u64 {
        self.statuses.values().sum()
    }
}

struct Shared {
    key: String,
    faults: Faults,
    rng: fastrand::Rng,
    received: Received,
    /// Whether to keep the last record accepted per id ([`Received::records`]).
    keep_records: bool,
    /// Answers already given per idempotency key (a retry of an accepted body gets the
    /// same answer and is not counted twice; so does any body reusing the key, as a
    /// caching API would do).
    answered: HashMap<String, Answered>,
    /// Requests in the handler now, and being served now (holding a slot of `capacity`).
    in_flight: usize,
    serving: usize,
    /// Notified when a slot of `capacity` frees (requests queued for one wait on it).
    slot_freed: Arc<tokio::sync::Notify>,
    /// The rate limit's bucket.
    bucket: load::Bucket,
}

impl Shared {
    fn take_token(&mut self, rate: f64) -> bool {
        self.bucket.take(rate)
    }
}

/// An answer given to an idempotency key, with what it answered.
struct Answered {
    /// The ids of the body, in its order.
    ids: Vec<i64>,
    /// A hash of the body's bytes ([`content_hash`]).
    content: u64,
    status: u16,
    value: Value,
}

/// A hash of a request body as sent (inflated when gzipped). loansync encodes the same
/// records in the same envelope to the same bytes, so a retry of a body has its hash,
/// and a record whose content changed gives another. SipHash with fixed keys: the same
/// within the process, which is as long as the stub's cache lives.
fn content_hash(body: &[u8]) -> u64 {
    use std::hash::Hasher;
    let mut h = std::hash::DefaultHasher::new();
    h.write(body);
    h.finish()
}

/// `text` with NUL characters in it when `on` (the `nul_text` fault).
fn nul(text: &str, on: bool) -> String {
    if on {
        format!("\0{text}\0")
    } else {
        text.to_string()
    }
}

type AppState = Arc<Mutex<Shared>>;

/// A running stub; dropping it (or [`StubHandle::shutdown`]) stops it.
pub struct StubHandle {
    pub addr: SocketAddr,
    state: AppState,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl StubHandle {
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn set_faults(&self, faults: Faults) {
        let mut s = lock(&self.state);
        s.rng = fastrand::Rng::with_seed(faults.seed);
        s.faults = faults;
        // A larger capacity frees slots for the requests queued.
        s.slot_freed.notify_waiters();
    }

    /// Requests in the handler now.
    pub fn in_flight(&self) -> usize {
        lock(&self.state).in_flight
    }

    /// Starts counting [`Received::max_in_flight`] again from the requests in flight now.
    pub fn reset_max_in_flight(&self) {
        let mut s = lock(&self.state);
        s.received.max_in_flight = s.in_flight;
    }

    /// From now on, keep the last record accepted for each id ([`Received::records`]),
    /// so that a test can compare what the platform holds with what the source says.
    pub fn keep_records(&self) {
        lock(&self.state).keep_records = true;
    }

    pub fn received(&self) -> Received {
        lock(&self.state).received.clone()
    }

    pub fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

impl Drop for StubHandle {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

fn lock(state: &AppState) -> std::sync::MutexGuard<'_, Shared> {
    state.lock().unwrap_or_else(|p| p.into_inner())
}

fn router(state: AppState) -> Router {
    Router::new()
        .route(
            "/etl/customers",
            post(|s, h, b| ingest(s, h, b, Endpoint::Customers)),
        )
        .route(
            "/etl/officers",
            post(|s, h, b| ingest(s, h, b, Endpoint::Officers)),
        )
        .route("/etl/sync", post(|s, h, b| ingest(s, h, b, Endpoint::Sync)))
        .route("/__stats", get(stats))
        .route("/__faults", put(set_faults))
        .route("/healthz", get(|| async { "ok\n" }))
        .layer(DefaultBodyLimit::max(16 * 1024 * 1024))
        .with_state(state)
}

/// Binds `addr` (port 0 allowed) and serves in a background task.
pub async fn spawn(cfg: StubConfig, addr: SocketAddr) -> std::io::Result<StubHandle> {
    spawn_on(cfg, tokio::net::TcpListener::bind(addr).await?)
}

/// Serves on `listener` in a background task: a TCP listener, or any other
/// [`axum::serve::Listener`] (the TLS-terminating one of the TLS tests, say).
pub fn spawn_on<L>(cfg: StubConfig, listener: L) -> std::io::Result<StubHandle>
where
    L: axum::serve::Listener<Addr = SocketAddr>,
{
    let addr = listener.local_addr()?;
    let state = Arc::new(Mutex::new(Shared {
        key: cfg.api_key,
        rng: fastrand::Rng::with_seed(cfg.faults.seed),
        faults: cfg.faults,
        received: Received::default(),
        keep_records: false,
        answered: HashMap::new(),
        in_flight: 0,
        serving: 0,
        slot_freed: Arc::new(tokio::sync::Notify::new()),
        bucket: load::Bucket::default(),
    }));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let app = router(state.clone());
    tokio::spawn(async move {
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(async {
                let _ = stopped.await;
            })
            .await;
    });
    Ok(StubHandle {
        addr,
        state,
        stop: Some(stop),
    })
}

/// Runs the stub until `shutdown` resolves (`loansync stub-api`).
pub async fn run_standalone(
    cfg: StubConfig,
    addr: SocketAddr,
    shutdown: impl std::future::Future<Output = ()>,
) -> std::io::Result<()> {
    let handle = spawn(cfg, addr).await?;
    shutdown.await;
    handle.shutdown();
    Ok(())
}

async fn stats(State(state): State<AppState>) -> axum::Json<Value> {
    let s = lock(&state);
    let per_entity: BTreeMap<String, usize> = s
        .received
        .accepted
        .iter()
        .map(|(e, m)| (e.as_str().to_string(), m.len()))
        .collect();
    axum::Json(json!({
        "requests": s.received.requests(),
        "statuses": s.received.statuses,
        "accepted": per_entity,
        "forbidden": s.received.forbidden,
        "keys_reused_for_other_records": s.received.keys_reused_for_other_records,
        "keys_reused_for_other_content": s.received.keys_reused_for_other_content,
        "gzip_requests": s.received.gzip_requests,
        "in_flight": s.in_flight,
        "max_in_flight": s.received.max_in_flight,
        "first_arrival": s.received.first_arrival,
        "last_answer": s.received.last_answer,
        "over_capacity": s.received.over_capacity,
        "rate_limited": s.received.rate_limited,
        "faults": s.faults,
    }))
}

async fn set_faults(
    State(state): State<AppState>,
    axum::Json(f): axum::Json<Faults>,
) -> StatusCode {
    let mut s = lock(&state);
    s.rng = fastrand::Rng::with_seed(f.seed);
    s.faults = f;
    s.slot_freed.notify_waiters();
    StatusCode::NO_CONTENT
}

impl std::fmt::Debug for StubHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StubHandle").finish_non_exhaustive()
    }
}
