//! One request answered as the analytics API would: injected faults first (as a
//! struggling API's), then the body checked against the contract, the idempotency key
//! honoured, records accepted or rejected.

use super::{Answered, AppState, Received, content_hash, lock, nul, scan};
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use std::collections::BTreeSet;
use std::time::Duration;

use crate::domain::EntityKind;

#[derive(Clone, Copy)]
pub(super) enum Endpoint {
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

pub(super) async fn ingest(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
    endpoint: Endpoint,
) -> Response {
    // Counted in flight until answered; then the load model: the rate limit and the
    // capacity, and the time the request is served for.
    let _in_flight = super::load::InFlight::arrive(&state);
    let _serving = match super::load::admit(&state).await {
        super::load::Admission::Served(serving) => serving,
        super::load::Admission::Refused => {
            let (secs, by_date) = {
                let s = lock(&state);
                (s.faults.retry_after_secs, s.faults.retry_after_date)
            };
            return fault_answer(&state, 429, Some(secs), by_date, 0, false);
        }
    };
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
            let (huge, by_date) = {
                let s = lock(&state);
                (s.faults.huge_text_bytes, s.faults.retry_after_date)
            };
            return fault_answer(&state, status, retry_after, by_date, huge, nul_text);
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

/// An injected error answer: `status`, with `Retry-After` (seconds, or an HTTP-date
/// with `by_date`) when given; its message padded to `huge` bytes, NULs with `nul_text`.
fn fault_answer(
    state: &AppState,
    status: u16,
    retry_after: Option<u64>,
    by_date: bool,
    huge: usize,
    nul_text: bool,
) -> Response {
    count(state, status);
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
            httpdate::fmt_http_date(std::time::SystemTime::now() + Duration::from_secs(secs))
        } else {
            secs.to_string()
        }
    });
    if let Some(v) = value.and_then(|v| v.parse().ok()) {
        resp.headers_mut().insert("retry-after", v);
    }
    resp
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
