//! A local analytics API that implements SPEC.md section 4 faithfully, for tests, the
//! demo and `docker compose`: bearer authentication, body validation (including the
//! never-send keys), idempotency keys, and faults injected on demand.
//!
//! Control endpoints when it runs as its own process: `GET /__stats`, `PUT /__faults`,
//! `GET /healthz`.

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::domain::EntityKind;

mod scan;

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

#[derive(Clone, Copy)]
enum Endpoint {
    Customers,
    Officers,
    Sync,
}

impl Endpoint {
    fn accepts(self, e: EntityKind) -> bool {
        matches!(
            (self, e),
            (Endpoint::Customers, EntityKind::Customer)
                | (Endpoint::Officers, EntityKind::Officer)
                | (Endpoint::Sync, EntityKind::Loan | EntityKind::Repayment)
        )
    }
}

fn error(status: StatusCode, code: &str, message: &str) -> (u16, Value) {
    (
        status.as_u16(),
        json!({ "error_code": code, "message": message }),
    )
}

/// What a fault roll decided for one request.
enum Fault {
    None,
    Status(u16, Option<u64>),
    TooManyRecords(usize),
    Drop,
    Garbage,
}

async fn ingest(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
    endpoint: Endpoint,
) -> Response {
    // Faults first, as a struggling API would.
    let max_records = lock(&state).faults.max_records;
    let too_many = if max_records > 0 {
        decoded(&headers, body.clone())
            .ok()
            .and_then(|(b, _)| serde_json::from_slice::<scan::Envelope>(&b).ok())
            .and_then(|v| match v.records {
                scan::Records::Array(r) => Some(r.len()),
                _ => None,
            })
            .filter(|n| *n > max_records)
    } else {
        None
    };
    let (fault, slow, nul_text) = {
        let mut s = lock(&state);
        let f = s.faults.clone();
        let slow = (f.slow_rate > 0.0 && s.rng.f64() < f.slow_rate).then_some(f.slow_ms);
        let fault = if let Some(n) = too_many {
            Fault::TooManyRecords(n)
        } else if f.fail_next > 0 {
            s.faults.fail_next -= 1;
            Fault::Status(f.fail_next_status.max(100), None)
        } else if f.garbage_next > 0 {
            s.faults.garbage_next -= 1;
            Fault::Garbage
        } else if f.drop_rate > 0.0 && s.rng.f64() < f.drop_rate {
            Fault::Drop
        } else if f.error_5xx_rate > 0.0 && s.rng.f64() < f.error_5xx_rate {
            Fault::Status(503, (f.retry_after_secs > 0).then_some(f.retry_after_secs))
        } else if f.rate_429 > 0.0 && s.rng.f64() < f.rate_429 {
            Fault::Status(429, Some(f.retry_after_secs))
        } else {
            Fault::None
        };
        (fault, slow, f.nul_text)
    };
    if let Some(ms) = slow {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    match fault {
        Fault::None => {}
        Fault::Drop => {
            // A body stream that fails at once: hyper aborts the connection mid-answer.
            let stream = futures::stream::once(async {
                Err::<Bytes, std::io::Error>(std::io::Error::other("dropped by fault injection"))
            });
            return Response::builder()
                .status(200)
                .header("content-length", "64")
                .body(Body::from_stream(stream))
                .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response());
        }
        Fault::Garbage => {
            count(&state, 200);
            let body: &'static [u8] = if nul_text {
                b"<html>\0not json \xff\xfe {\"message\": \"\\ud800\"}</html>"
            } else {
                b"<html>not json</html>"
            };
            return (StatusCode::OK, body).into_response();
        }
        Fault::TooManyRecords(n) => {
            count(&state, 413);
            return (
                StatusCode::PAYLOAD_TOO_LARGE,
                axum::Json(json!({
                    "error_code": "TOO_MANY_RECORDS",
                    "message": nul(&format!("{n} records in one request; at most {max_records}"), nul_text),
                })),
            )
                .into_response();
        }
        Fault::Status(status, retry_after) => {
            count(&state, status);
            let (huge, by_date) = {
                let s = lock(&state);
                (s.faults.huge_text_bytes, s.faults.retry_after_date)
            };
            let code = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            let mut resp = (
                code,
                axum::Json(json!({
                    "error_code": format!("HTTP_{status}"),
                    "message": nul(&padded("injected fault", huge), nul_text),
                })),
            )
                .into_response();
            let value = retry_after.map(|secs| {
                if by_date {
                    httpdate::fmt_http_date(
                        std::time::SystemTime::now() + Duration::from_secs(secs),
                    )
                } else {
                    secs.to_string()
                }
            });
            if let Some(v) = value.and_then(|v| v.parse().ok()) {
                resp.headers_mut().insert("retry-after", v);
            }
            return resp;
        }
    }
    let (status, mut value) = match decoded(&headers, body) {
        Ok((body, gzipped)) => {
            if gzipped {
                lock(&state).received.gzip_requests += 1;
            }
            answer(&state, &headers, &body, endpoint)
        }
        Err((status, error_code, message)) => (
            status,
            json!({"error_code": error_code, "message": message}),
        ),
    };
    if nul_text
        && status != 200
        && let Some(message) = value.get_mut("message")
        && let Some(text) = message.as_str()
    {
        *message = Value::String(nul(text, true));
    }
    count(&state, status);
    (
        StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        axum::Json(value),
    )
        .into_response()
}

/// `text`, padded with `.` to `len` bytes when it is shorter.
fn padded(text: &str, len: usize) -> String {
    let mut out = text.to_string();
    if out.len() < len {
        out.push(' ');
        out.extend(std::iter::repeat_n('.', len - out.len()));
    }
    out
}

fn count(state: &AppState, status: u16) {
    *lock(state).received.statuses.entry(status).or_default() += 1;
}

/// The most a gzipped body may inflate to.
const MAX_INFLATED_BYTES: u64 = 64 * 1024 * 1024;

/// The body as sent, inflated when it came with `Content-Encoding: gzip`; says whether
/// it was. Other encodings are refused (`415`), a bad or oversized stream too.
fn decoded(headers: &HeaderMap, body: Bytes) -> Result<(Bytes, bool), (u16, &'static str, String)> {
    let encoding = headers
        .get("content-encoding")
        .and_then(|v| v.to_str().ok())
        .map(|v| v.trim().to_ascii_lowercase());
    match encoding.as_deref() {
        None | Some("identity") => Ok((body, false)),
        Some("gzip") => {
            use std::io::Read;
            let mut out = Vec::with_capacity(body.len() * 4);
            flate2::read::GzDecoder::new(&body[..])
                .take(MAX_INFLATED_BYTES + 1)
                .read_to_end(&mut out)
                .map_err(|e| {
                    (
                        400,
                        "BAD_ENCODING",
                        format!("the body is not valid gzip: {e}"),
                    )
                })?;
            if out.len() as u64 > MAX_INFLATED_BYTES {
                return Err((
                    413,
                    "PAYLOAD_TOO_LARGE",
                    format!("the body inflates beyond {MAX_INFLATED_BYTES} bytes"),
                ));
            }
            Ok((Bytes::from(out), true))
        }
        Some(other) => Err((
            415,
            "UNSUPPORTED_ENCODING",
            format!("Content-Encoding {other:?} is not supported"),
        )),
    }
}

/// Validates and accepts one body (no faults).
fn answer(state: &AppState, headers: &HeaderMap, body: &[u8], endpoint: Endpoint) -> (u16, Value) {
    let mut s = lock(state);
    let auth = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if auth != format!("Bearer {}", s.key) {
        return error(StatusCode::UNAUTHORIZED, "UNAUTHORIZED", "invalid API key");
    }
    let Some(key) = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
    else {
        return error(
            StatusCode::BAD_REQUEST,
            "MISSING_IDEMPOTENCY_KEY",
            "an Idempotency-Key header is required",
        );
    };
    if headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_none_or(|ct| !ct.starts_with("application/json"))
    {
        return error(
            StatusCode::BAD_REQUEST,
            "INVALID_BODY",
            "Content-Type must be application/json",
        );
    }
    s.received.idempotency_keys.push(key.clone());
    let Ok(v) = serde_json::from_slice::<scan::Envelope>(body) else {
        return error(
            StatusCode::BAD_REQUEST,
            "INVALID_BODY",
            "the body is not JSON",
        );
    };
    let (Some(sync_id), Some(sync_type), Some(entity), Some(_chunk), scan::Records::Array(records)) = (
        v.sync_id.as_str(),
        v.sync_type.as_str(),
        v.entity_type.as_str(),
        v.chunk.as_i64(),
        &v.records,
    ) else {
        return error(
            StatusCode::BAD_REQUEST,
            "INVALID_BODY",
            "expected sync_id, sync_type, entity_type, chunk and records",
        );
    };
    if !matches!(sync_type, "full" | "incremental") {
        return error(
            StatusCode::BAD_REQUEST,
            "INVALID_BODY",
            "sync_type must be full or incremental",
        );
    }
    let Ok(entity) = entity.parse::<EntityKind>() else {
        return error(
            StatusCode::UNPROCESSABLE_ENTITY,
            "ENTITY_MISMATCH",
            "unknown entity_type",
        );
    };
    if !endpoint.accepts(entity) {
        return error(
            StatusCode::UNPROCESSABLE_ENTITY,
            "ENTITY_MISMATCH",
            "this endpoint does not take that entity_type",
        );
    }
    let mut ids = Vec::with_capacity(records.len());
    for r in records {
        let (true, Some(id)) = (r.is_object, r.id) else {
            return error(
                StatusCode::UNPROCESSABLE_ENTITY,
                "INVALID_RECORD",
                "every record must be an object with an integer id",
            );
        };
        if r.forbidden {
            s.received.forbidden += 1;
            return error(
                StatusCode::UNPROCESSABLE_ENTITY,
                "FORBIDDEN_FIELD",
                "a record carries a field that must never be sent",
            );
        }
        ids.push(id);
    }
    let content = content_hash(body);
    if let Some(before) = s.answered.get(&key) {
        let answer = (before.status, before.value.clone());
        if before.ids != ids {
            s.received.keys_reused_for_other_records += 1;
        } else if before.content != content {
            s.received.keys_reused_for_other_content += 1;
        }
        return answer;
    }
    if let Some(bad) = ids.iter().find(|id| s.faults.refuse_ids.contains(id)) {
        return error(
            StatusCode::UNPROCESSABLE_ENTITY,
            "RECORD_REFUSED",
            &format!("record {bad} is refused"),
        );
    }
    let nth = s.faults.reject_every_nth;
    let huge = s.faults.huge_text_bytes;
    let nul_text = s.faults.nul_text;
    let mut rejected = Vec::new();
    let keep = s.keep_records;
    let sync_id = sync_id.to_string();
    let received = &mut s.received;
    let accepted_map = received.accepted.entry(entity).or_default();
    for id in &ids {
        if nth > 0 && id.rem_euclid(nth as i64) == 0 {
            let mut details = json!({"rule": "reject_every_nth", "n": nth});
            if huge > 0 {
                details["context"] = Value::String(padded("", huge));
            }
            if nul_text {
                details[nul("field", true)] = Value::String(nul("value", true));
            }
            rejected.push(json!({
                "id": id,
                "error_code": "VALIDATION_FAILED",
                "message": nul(&padded(&format!("record {id} failed validation"), huge), nul_text),
                "details": details,
            }));
        } else {
            *accepted_map.entry(*id).or_default() += 1;
            if keep {
                received.accepted_in.insert((sync_id.clone(), entity, *id));
            }
        }
    }
    if s.keep_records {
        keep_accepted(&mut s.received, entity, body, &rejected);
    }
    let mut value = json!({ "accepted": ids.len() - rejected.len(), "rejected": rejected });
    if nul_text {
        value["notes"] = json!({ nul("batch", true): nul("accepted", true) });
    }
    s.answered.insert(
        key,
        Answered {
            ids,
            content,
            status: 200,
            value: value.clone(),
        },
    );
    (200, value)
}

/// Keeps the records of an accepted body that were not rejected, by id (the last one
/// wins).
fn keep_accepted(received: &mut Received, entity: EntityKind, body: &[u8], rejected: &[Value]) {
    #[derive(serde::Deserialize)]
    struct Body<'a> {
        #[serde(borrow)]
        records: Vec<&'a serde_json::value::RawValue>,
    }
    #[derive(serde::Deserialize)]
    struct Id {
        id: i64,
    }
    let Ok(b) = serde_json::from_slice::<Body>(body) else {
        return;
    };
    let refused: BTreeSet<i64> = rejected.iter().filter_map(|r| r["id"].as_i64()).collect();
    let kept = received.records.entry(entity).or_default();
    for raw in b.records {
        if let Ok(Id { id }) = serde_json::from_str::<Id>(raw.get())
            && !refused.contains(&id)
        {
            kept.insert(id, raw.get().to_string());
        }
    }
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
    StatusCode::NO_CONTENT
}

impl std::fmt::Debug for StubHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StubHandle").finish_non_exhaustive()
    }
}
