//! One HTTP call to the analytics API and what its answer means. Never retries.

use crate::domain::FailedRecord;
use crate::telemetry::labels::HttpClass;
use crate::telemetry::{Event, Metrics};
use bytes::Bytes;
use std::time::Duration;

/// The most of a response body loansync reads; a larger one is a failure.
pub const MAX_RESPONSE_BYTES: usize = 1024 * 1024;
/// The most of an API `message` (bytes) or `details` (bytes of its JSON text) kept: it
/// is copied into every failed record of a part, into error rows and into logs.
pub const MAX_API_TEXT: usize = 4 * 1024;
/// The most of an API `error_code` kept (the width of `error_code` in error rows).
pub const MAX_ERROR_CODE_CHARS: usize = 100;

/// What one request came to.
#[derive(Debug, Clone)]
pub enum Answer {
    /// `200`: every record not in `rejected` (each with the API's own `details`) succeeded.
    Accepted {
        rejected: Vec<FailedRecord>,
        body: serde_json::Value,
    },
    /// `400` / `413` / `422`: the whole batch was refused.
    Refused {
        status: u16,
        error_code: String,
        message: String,
        body: serde_json::Value,
    },
    /// `401` / `403`: the credentials are wrong.
    Unauthorized { status: u16, message: String },
    /// Not retried: another status, a body that breaks the contract, or a refused TLS
    /// certificate (`status` is `None` then).
    Failed {
        status: Option<u16>,
        error_code: String,
        message: String,
        body: serde_json::Value,
    },
}

/// A failure worth retrying (`408`, `429`, `5xx`, timeouts, connection errors).
#[derive(Debug, Clone)]
pub struct Transient {
    pub status: Option<u16>,
    /// `HTTP_<status>` or `NETWORK_ERROR`.
    pub error_code: String,
    pub message: String,
    pub retry_after: Option<Duration>,
    pub body: serde_json::Value,
    /// No answer came within `ETL_HTTP_TIMEOUT_SECS`: backpressure, as a 429 is.
    pub timed_out: bool,
}

impl Transient {
    /// The API asked to slow down: 429, 503, or no answer in time.
    pub fn is_backpressure(&self) -> bool {
        matches!(self.status, Some(429 | 503)) || self.timed_out
    }
}

/// Sends one body; its answer is counted in `metrics`.
pub async fn send(
    http: &reqwest::Client,
    url: &str,
    bearer: &str,
    idempotency_key: &str,
    body: Bytes,
    endpoint: &'static str,
    metrics: &Metrics,
) -> Result<Answer, Transient> {
    let started = std::time::Instant::now();
    let answer = send_inner(http, url, bearer, idempotency_key, body).await;
    let class = match &answer {
        Err(t) => HttpClass::of(t.status),
        Ok(Answer::Accepted { .. }) => HttpClass::Success,
        Ok(Answer::Refused { status, .. } | Answer::Unauthorized { status, .. }) => {
            HttpClass::of(Some(*status))
        }
        Ok(Answer::Failed { status, .. }) => HttpClass::of(*status),
    };
    Event::HttpResponse {
        endpoint,
        class,
        seconds: started.elapsed().as_secs_f64(),
    }
    .emit(metrics);
    answer
}

async fn send_inner(
    http: &reqwest::Client,
    url: &str,
    bearer: &str,
    idempotency_key: &str,
    body: Bytes,
) -> Result<Answer, Transient> {
    let response = match http
        .post(url)
        .bearer_auth(bearer)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .header("Idempotency-Key", idempotency_key)
        .body(body)
        .send()
        .await
    {
        Ok(response) => response,
        Err(e) => return certificate_refused(&e).ok_or_else(|| network(e, url)),
    };
    let status = response.status().as_u16();
    let retry_after = super::retry::parse_retry_after(
        response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok()),
    );
    let raw = match read_bounded(response).await {
        Ok(Some(raw)) => raw,
        Ok(None) => {
            return Ok(Answer::Failed {
                status: Some(status),
                error_code: "RESPONSE_TOO_LARGE".into(),
                message: format!("the response body exceeded {MAX_RESPONSE_BYTES} bytes"),
                body: serde_json::json!({ "http_status": status }),
            });
        }
        Err(e) => return Err(network(e, url)),
    };
    let (json, body) = read_body(&raw);
    let field = |k: &str| {
        json.as_ref()
            .and_then(|j| j.get(k))
            .and_then(|v| v.as_str())
            .map(|v| match k {
                "error_code" => error_code(v),
                _ => bounded_text(v),
            })
    };
    Ok(match status {
        200..=299 => match json.as_ref().and_then(parse_accepted) {
            Some(rejected) => Answer::Accepted { rejected, body },
            None => Answer::Failed {
                status: Some(status),
                error_code: "INVALID_RESPONSE".into(),
                message: "the API answered 2xx with a body that is not {\"accepted\": n, \"rejected\": [...]}".into(),
                body,
            },
        },
        400 | 413 | 422 => Answer::Refused {
            status,
            error_code: field("error_code").unwrap_or_else(|| format!("HTTP_{status}")),
            message: field("message").unwrap_or_else(|| format!("the API refused the batch with HTTP {status}")),
            body,
        },
        401 | 403 => Answer::Unauthorized {
            status,
            message: field("message").unwrap_or_else(|| format!("HTTP {status}")),
        },
        408 | 429 | 500..=599 => {
            return Err(Transient {
                status: Some(status),
                error_code: format!("HTTP_{status}"),
                message: field("message").unwrap_or_else(|| format!("the API answered HTTP {status}")),
                retry_after,
                body,
                timed_out: false,
            });
        }
        _ => Answer::Failed {
            status: Some(status),
            error_code: format!("HTTP_{status}"),
            message: field("message").unwrap_or_else(|| format!("the API answered HTTP {status}")),
            body,
        },
    })
}

/// The API's TLS certificate was refused. Not retried: the same certificate would be
/// refused again until someone trusts its CA (`ANALYTICS_CA_FILE`) or fixes it.
fn certificate_refused(e: &reqwest::Error) -> Option<Answer> {
    let reason = crate::tls::certificate_refused(e)?;
    tracing::error!(
        %reason,
        "the analytics API's TLS certificate was refused; its records fail without retries"
    );
    Some(Answer::Failed {
        status: None,
        error_code: "TLS_CERTIFICATE_REFUSED".into(),
        message: format!(
            "the analytics API's TLS certificate was refused ({reason}); if a private CA signed it, \
             name that CA's PEM file in ANALYTICS_CA_FILE, then retry these records"
        ),
        body: serde_json::Value::Null,
    })
}

/// A transport failure, described without anything secret: reqwest's own text quotes the
/// request URL (query string included), so the URL is dropped from it and named here
/// through [`redact_url`](crate::redact::redact_url); the rest of the chain says why.
fn network(e: reqwest::Error, url: &str) -> Transient {
    let timed_out = e.is_timeout();
    let what = if timed_out {
        "the request timed out"
    } else if e.is_connect() {
        "could not connect to the API"
    } else {
        "the connection failed"
    };
    let e = e.without_url();
    let mut why = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        why.push_str(": ");
        why.push_str(&s.to_string());
        source = s.source();
    }
    Transient {
        status: None,
        error_code: "NETWORK_ERROR".into(),
        message: crate::redact::redact_text(&format!(
            "{what} ({}): {why}",
            crate::redact::redact_url(url)
        )),
        retry_after: None,
        body: serde_json::Value::Null,
        timed_out,
    }
}

/// Reads at most [`MAX_RESPONSE_BYTES`]; `None` when the body is larger.
async fn read_bounded(mut r: reqwest::Response) -> Result<Option<Vec<u8>>, reqwest::Error> {
    if r.content_length()
        .is_some_and(|n| n as usize > MAX_RESPONSE_BYTES)
    {
        return Ok(None);
    }
    let mut buf = Vec::new();
    while let Some(chunk) = r.chunk().await? {
        if buf.len() + chunk.len() > MAX_RESPONSE_BYTES {
            return Ok(None);
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(Some(buf))
}

/// A response body as read: its JSON (`None` when it is not JSON) and the body to keep,
/// that JSON or a short excerpt of the bytes, both made storable ([`storable`]): every
/// API text loansync keeps (codes, messages, details, `api_response`) comes from here.
///
/// JSON that escapes a lone surrogate (`"\ud800"`) is not JSON to serde_json (nor to
/// PostgreSQL): such an answer is a body that breaks the contract, kept as an excerpt.
fn read_body(raw: &[u8]) -> (Option<serde_json::Value>, serde_json::Value) {
    match serde_json::from_slice::<serde_json::Value>(raw) {
        Ok(json) => {
            let json = storable(json);
            (Some(json.clone()), json)
        }
        Err(_) => (None, excerpt_value(raw)),
    }
}

/// A body that is not JSON, kept as a short text excerpt: invalid UTF-8 and NUL
/// replaced with U+FFFD.
fn excerpt_value(raw: &[u8]) -> serde_json::Value {
    let text = String::from_utf8_lossy(&raw[..raw.len().min(2048)]);
    serde_json::json!({ "raw": storable_text(&text) })
}

/// What stands in for a character PostgreSQL cannot store.
const REPLACEMENT: &str = "\u{FFFD}";

/// Text as PostgreSQL can store it in `text` and inside `jsonb`: NUL, which both
/// refuse, replaced with U+FFFD. A Rust string holds no other character they refuse
/// (it is valid UTF-8: no surrogate code point; bytes that are not UTF-8 were replaced
/// when the body was read). Borrows when there is nothing to replace.
pub fn storable_text(text: &str) -> std::borrow::Cow<'_, str> {
    if text.contains('\0') {
        std::borrow::Cow::Owned(text.replace('\0', REPLACEMENT))
    } else {
        std::borrow::Cow::Borrowed(text)
    }
}

/// A JSON value from the API as PostgreSQL can store it: every string in it, object
/// keys included, made storable ([`storable_text`]). Allocates only for strings that
/// hold a NUL (and rebuilds only objects with such a key; two keys that then read the
/// same keep the last value). The depth is bounded by serde_json's parser (128).
pub fn storable(mut value: serde_json::Value) -> serde_json::Value {
    make_storable(&mut value);
    value
}

fn make_storable(value: &mut serde_json::Value) {
    use serde_json::Value;
    match value {
        Value::String(text) => {
            if let std::borrow::Cow::Owned(clean) = storable_text(text) {
                *text = clean;
            }
        }
        Value::Array(items) => items.iter_mut().for_each(make_storable),
        Value::Object(map) if map.keys().any(|k| k.contains('\0')) => {
            *map = std::mem::take(map)
                .into_iter()
                .map(|(k, mut v)| {
                    make_storable(&mut v);
                    (storable_text(&k).into_owned(), v)
                })
                .collect();
        }
        Value::Object(map) => map.values_mut().for_each(make_storable),
        Value::Null | Value::Bool(_) | Value::Number(_) => {}
    }
}

/// An API error code as kept: storable, at most [`MAX_ERROR_CODE_CHARS`] characters.
fn error_code(code: &str) -> String {
    storable_text(code)
        .chars()
        .take(MAX_ERROR_CODE_CHARS)
        .collect()
}

/// An API text as kept: storable ([`storable_text`]), whole when it fits in
/// [`MAX_API_TEXT`] bytes, else cut on a character boundary and marked, the mark
/// included in the bound.
pub fn bounded_text(text: &str) -> String {
    let text = storable_text(text);
    if text.len() <= MAX_API_TEXT {
        return text.into_owned();
    }
    let mark = format!(" …[truncated: {} bytes in all]", text.len());
    let mut cut = MAX_API_TEXT.saturating_sub(mark.len());
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    let mut out = String::with_capacity(cut + mark.len());
    out.push_str(&text[..cut]);
    out.push_str(&mark);
    out
}

/// API `details` as kept: storable ([`storable`]), whole when its JSON text fits in
/// [`MAX_API_TEXT`] bytes, else
/// `{"truncated": true, "bytes": n, "excerpt": "<the start of its JSON text>"}`.
pub fn bounded_details(details: &serde_json::Value) -> serde_json::Value {
    let details = storable(details.clone());
    let text = details.to_string();
    if text.len() <= MAX_API_TEXT {
        return details;
    }
    // The excerpt's own escaping may lengthen it: leave room for that and the wrapper.
    let mut cut = MAX_API_TEXT / 2;
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    serde_json::json!({ "truncated": true, "bytes": text.len(), "excerpt": &text[..cut] })
}

/// `{"accepted": n, "rejected": [...]}` → the rejected records; `None` if the shape is off.
fn parse_accepted(v: &serde_json::Value) -> Option<Vec<FailedRecord>> {
    let obj = v.as_object()?;
    obj.get("accepted")?.as_u64()?;
    let list = match obj.get("rejected") {
        None | Some(serde_json::Value::Null) => return Some(Vec::new()),
        Some(l) => l.as_array()?,
    };
    let mut out = Vec::with_capacity(list.len());
    for item in list {
        let id = item.get("id")?.as_i64()?;
        out.push(FailedRecord {
            id,
            error_code: error_code(
                item.get("error_code")
                    .and_then(|c| c.as_str())
                    .unwrap_or("REJECTED"),
            ),
            message: bounded_text(
                item.get("message")
                    .and_then(|m| m.as_str())
                    .unwrap_or("rejected by the analytics API"),
            ),
            details: item
                .get("details")
                .map_or_else(|| serde_json::json!({}), bounded_details),
        });
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn accepted_bodies_are_checked() {
        let r = parse_accepted(
            &json!({"accepted": 2, "rejected": [{"id": 5, "error_code": "X", "message": "m"}]}),
        )
        .unwrap();
        assert_eq!(r[0].id, 5);
        assert_eq!(r[0].error_code, "X");
        assert_eq!(parse_accepted(&json!({"accepted": 1})).unwrap(), vec![]);
        assert!(parse_accepted(&json!({"rejected": []})).is_none());
        assert!(
            parse_accepted(&json!({"accepted": 1, "rejected": [{"error_code": "X"}]})).is_none()
        );
        assert!(parse_accepted(&json!([1, 2])).is_none());
        let defaulted = parse_accepted(&json!({"accepted": 0, "rejected": [{"id": 1}]})).unwrap();
        assert_eq!(defaulted[0].error_code, "REJECTED");
    }

    #[test]
    fn hostile_rejections_are_bounded() {
        let huge = "ü".repeat(300_000);
        let r = parse_accepted(&json!({"accepted": 0, "rejected": [{
            "id": 1, "error_code": "C".repeat(10_000), "message": huge,
            "details": {"why": "\"".repeat(100_000), "n": 1},
        }]}))
        .unwrap();
        assert_eq!(r[0].error_code.len(), MAX_ERROR_CODE_CHARS);
        assert!(r[0].message.len() <= MAX_API_TEXT, "{}", r[0].message.len());
        assert!(r[0].message.starts_with("üü"));
        assert!(
            r[0].message.ends_with("…[truncated: 600000 bytes in all]"),
            "{}",
            &r[0].message[r[0].message.len() - 60..]
        );
        assert_eq!(r[0].details["truncated"], true);
        assert!(r[0].details.to_string().len() <= MAX_API_TEXT + 64);
        // Small ones are kept whole.
        assert_eq!(bounded_text("é ok"), "é ok");
        assert_eq!(bounded_details(&json!({"a": 1})), json!({"a": 1}));
        // Cut on a character boundary whatever the bound falls on.
        for n in MAX_API_TEXT - 3..MAX_API_TEXT + 5 {
            let t = bounded_text(&format!("{}{}", "a".repeat(n % 4), "€".repeat(n)));
            assert!(t.len() <= MAX_API_TEXT);
        }
    }

    /// True when no string of `v`, key or value, holds a NUL.
    fn clean(v: &serde_json::Value) -> bool {
        match v {
            serde_json::Value::String(s) => !s.contains('\0'),
            serde_json::Value::Array(a) => a.iter().all(clean),
            serde_json::Value::Object(m) => m.iter().all(|(k, v)| !k.contains('\0') && clean(v)),
            _ => true,
        }
    }

    #[test]
    fn api_text_is_made_storable() {
        // Plain strings: NUL replaced, the rest kept; bounded as before.
        assert_eq!(storable_text("a\0b\0"), "a\u{FFFD}b\u{FFFD}");
        assert!(matches!(
            storable_text("no nul é"),
            std::borrow::Cow::Borrowed("no nul é")
        ));
        assert_eq!(bounded_text("m\0"), "m\u{FFFD}");
        assert_eq!(error_code("E\0"), "E\u{FFFD}");
        assert!(bounded_text(&"\0".repeat(10_000)).len() <= MAX_API_TEXT);
        // Every string of a value, keys included, at any depth.
        let v = storable(json!({
            "a\0": ["x\0", {"k\0": {"deep\0": "v\0"}}, 1, null, true],
            "ok": "fine",
        }));
        assert!(clean(&v), "{v}");
        assert_eq!(
            v,
            json!({
                "a\u{FFFD}": ["x\u{FFFD}", {"k\u{FFFD}": {"deep\u{FFFD}": "v\u{FFFD}"}}, 1, null, true],
                "ok": "fine",
            })
        );
        // What a rejection keeps.
        let r = parse_accepted(&json!({"accepted": 0, "rejected": [{
            "id": 1, "error_code": "C\0", "message": "m\0", "details": {"w\0": "\0"},
        }]}))
        .unwrap();
        assert_eq!(
            (r[0].error_code.as_str(), r[0].message.as_str()),
            ("C\u{FFFD}", "m\u{FFFD}")
        );
        assert_eq!(r[0].details, json!({"w\u{FFFD}": "\u{FFFD}"}));
    }

    #[test]
    fn bodies_are_read_storable_whatever_their_bytes() {
        // JSON escaping NUL: parsed, made storable.
        let (json, body) = read_body(br#"{"accepted": 1, "rejected": [], "n\u0000": "\u0000"}"#);
        let json = json.unwrap();
        assert_eq!(json["accepted"], 1);
        assert!(clean(&json) && clean(&body), "{body}");
        assert_eq!(body["n\u{FFFD}"], "\u{FFFD}");
        // A lone surrogate is not JSON to serde_json: the body is an excerpt, storable
        // (its escape stays text: a backslash and letters).
        for raw in [
            &br#"{"accepted": 1, "rejected": [{"id": 1, "message": "\ud800"}]}"#[..],
            &br#"{"accepted": 1, "m": "\udc00x"}"#[..],
        ] {
            let (json, body) = read_body(raw);
            assert!(json.is_none(), "{body}");
            assert!(body["raw"].as_str().unwrap().contains("\\ud"), "{body}");
        }
        // Bytes that are not UTF-8, and raw NUL bytes, in a body that is not JSON.
        let (json, body) = read_body(b"<html>\0 \xff\xfe </html>");
        assert!(json.is_none());
        assert!(clean(&body), "{body}");
        assert_eq!(
            body["raw"], "<html>\u{FFFD} \u{FFFD}\u{FFFD} </html>",
            "{body}"
        );
    }
}
