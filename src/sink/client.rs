//! Delivers one chunk: the retry policy around [`service::send`], the halving of
//! refused batches down to the records refused alone, and fail-fast on 401/403.

use super::arc::Response;
use super::encoder;
use super::gate::{Ended, Gate, GateTimeout};
use super::retry;
use super::service::{self, Answer, Transient};
use crate::config::ApiSettings;
use crate::domain::{EntityKind, Record, SyncType};
use crate::telemetry::{Event, Telemetry};
use backon::Retryable;
use bytes::Bytes;
use secrecy::{ExposeSecret, SecretString};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

/// The last response kept for `api_response` is cut to this size.
pub const MAX_KEPT_RESPONSE: usize = 64 * 1024;
/// The part of a response body kept in an error row's details.
const EXCERPT: usize = 1000;

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("ANALYTICS_CA_FILE: {0}")]
    CaPem(String),
    #[error("cannot build the HTTP client: {0}")]
    Client(String),
}

/// The sync cannot go on: its remaining chunks must not be sent.
#[derive(Debug, thiserror::Error)]
pub enum FatalError {
    #[error("the analytics API refused the credentials (HTTP {status}): {message}")]
    Unauthorized { status: u16, message: String },
}

/// One chunk to deliver.
#[derive(Debug, Clone, Copy)]
pub struct Batch<'a> {
    pub sync_id: &'a str,
    pub sync_type: SyncType,
    pub entity: EntityKind,
    pub chunk: i32,
    pub records: &'a [Record],
}

use crate::domain::FailedRecord;

/// How a chunk's delivery went. Every record of the batch is in exactly one list.
#[derive(Debug, Clone, Default)]
pub struct DeliveryReport {
    pub succeeded: Vec<i64>,
    pub failed: Vec<FailedRecord>,
    /// The last response body (at most 64 KiB of it).
    pub last_response: Option<serde_json::Value>,
    /// HTTP requests sent, retries included.
    pub requests: u32,
    /// Requests that were retries of an earlier one.
    pub retries: u32,
}

/// The analytics API client, built once per process; cheap to clone.
#[derive(Clone)]
pub struct AnalyticsClient {
    inner: Arc<Inner>,
    /// The registry answers and retries are counted in.
    telemetry: Telemetry,
    /// The worker's gate every request passes (`None`: no limit of its own, as in
    /// `loansync check`).
    gate: Option<Arc<Gate>>,
}

struct Inner {
    http: reqwest::Client,
    /// The API's base URL; an endpoint's path is appended to its path, its query kept.
    base: url::Url,
    key: SecretString,
    retry: crate::config::RetrySettings,
    /// Request bodies are gzipped (`ANALYTICS_GZIP`).
    gzip: bool,
}

impl AnalyticsClient {
    pub fn new(api: &ApiSettings) -> Result<Self, SinkError> {
        let mut builder = reqwest::Client::builder()
            .timeout(api.timeout)
            .connect_timeout(api.timeout.min(std::time::Duration::from_secs(10)))
            .pool_idle_timeout(std::time::Duration::from_secs(60))
            .tcp_keepalive(std::time::Duration::from_secs(30))
            .user_agent(concat!("loansync/", env!("CARGO_PKG_VERSION")));
        if let Some(pem) = &api.ca_pem {
            let certs = reqwest::Certificate::from_pem_bundle(pem.as_bytes())
                .map_err(|e| SinkError::CaPem(e.to_string()))?;
            // reqwest alone would skip text holding no certificate, and the API's
            // certificate would then be refused on every request.
            if certs.is_empty() {
                return Err(SinkError::CaPem("no PEM certificate in it".into()));
            }
            for cert in certs {
                builder = builder.add_root_certificate(cert);
            }
        }
        if api.gzip {
            // Every request of this client is a POST of a body that `send_part` gzips.
            let mut headers = reqwest::header::HeaderMap::new();
            headers.insert(
                reqwest::header::CONTENT_ENCODING,
                reqwest::header::HeaderValue::from_static("gzip"),
            );
            builder = builder.default_headers(headers);
        }
        let http = builder
            .build()
            .map_err(|e| SinkError::Client(e.to_string()))?;
        Ok(AnalyticsClient {
            inner: Arc::new(Inner {
                http,
                base: api.base_url.clone(),
                key: api.key.clone(),
                retry: api.retry.clone(),
                gzip: api.gzip,
            }),
            telemetry: Telemetry::global(),
            gate: None,
        })
    }

    /// This client, passing every request of [`AnalyticsClient::deliver`] through `gate`.
    pub fn with_gate(mut self, gate: Arc<Gate>) -> Self {
        self.gate = Some(gate);
        self
    }

    /// The gate its requests pass, if any.
    pub fn gate(&self) -> Option<&Arc<Gate>> {
        self.gate.as_ref()
    }

    /// This client, counting its answers and retries in `telemetry` (the process-wide
    /// registry by default).
    pub fn with_telemetry(mut self, telemetry: Telemetry) -> Self {
        self.telemetry = telemetry;
        self
    }

    /// Delivers one chunk. Never panics on any response.
    ///
    /// The chunk has one deadline, `ETL_RETRY_MAX_ELAPSED_SECS` from now, for all its
    /// requests: retries, `Retry-After` waits and the halving of refused batches alike.
    /// No request starts after it, so a chunk spends at most that plus one request
    /// (`ETL_HTTP_TIMEOUT_SECS`) here. A part whose retries the deadline ends fails with
    /// its last status; once that happened, or the deadline passed, the parts not sent
    /// yet fail with `CHUNK_DEADLINE`. The first request is always sent.
    pub async fn deliver(&self, batch: &Batch<'_>) -> Result<DeliveryReport, FatalError> {
        let url = endpoint_url(&self.inner.base, batch.entity.endpoint());
        let deadline = tokio::time::Instant::now() + self.inner.retry.max_elapsed;
        let mut report = DeliveryReport::default();
        // Ranges of record indexes still to send, with the status that refused the
        // batch they were halved from; a refused range is split in halves.
        let mut todo: Vec<(usize, usize, Option<u16>)> = vec![(0, batch.records.len(), None)];
        // Set once the deadline ended a part's retries, or passed.
        let mut spent = false;
        while let Some((start, end, refused_by)) = todo.pop() {
            if start >= end {
                continue;
            }
            let part = &batch.records[start..end];
            if report.requests > 0 && (spent || tokio::time::Instant::now() >= deadline) {
                if !spent {
                    tracing::warn!(
                        requests = report.requests,
                        "the chunk's deadline passed: the records not sent yet fail"
                    );
                    spent = true;
                }
                let message = format!(
                    "not sent: the chunk's time in the analytics client \
                     (ETL_RETRY_MAX_ELAPSED_SECS, {}s) ran out{}",
                    self.inner.retry.max_elapsed.as_secs(),
                    match refused_by {
                        Some(status) => format!(
                            " while its batch, refused with HTTP {status}, was being halved"
                        ),
                        None => String::new(),
                    }
                );
                // Not sent alone: no attempt of their own.
                let details = details(refused_by, "", 0, serde_json::json!({}));
                fail_all(&mut report, part, "CHUNK_DEADLINE", &message, &details);
                continue;
            }
            let (outcome, attempts) = self.send_part(batch, &url, part, deadline).await;
            report.requests += attempts;
            report.retries += attempts.saturating_sub(1);
            match outcome {
                Ok(Answer::Accepted { rejected, body }) => {
                    let ids: std::collections::HashSet<i64> =
                        part.iter().map(|rec| rec.id).collect();
                    let mut refused: std::collections::HashMap<i64, FailedRecord> =
                        std::collections::HashMap::new();
                    // One log line for all of them: a hostile answer may list thousands.
                    let (mut strangers, mut example) = (0usize, None);
                    for r in rejected {
                        if ids.contains(&r.id) {
                            refused.insert(r.id, r);
                        } else {
                            strangers += 1;
                            example.get_or_insert(r.id);
                        }
                    }
                    if let Some(id) = example {
                        tracing::warn!(
                            count = strangers,
                            example_id = id,
                            "the API rejected ids that were not in the batch; ignored"
                        );
                    }
                    let text = if refused.is_empty() {
                        String::new()
                    } else {
                        excerpt(&body)
                    };
                    for rec in part {
                        match refused.remove(&rec.id) {
                            None => report.succeeded.push(rec.id),
                            Some(r) => report.failed.push(FailedRecord {
                                id: rec.id,
                                error_code: r.error_code,
                                message: r.message,
                                details: details(Some(200), &text, attempts, r.details),
                            }),
                        }
                    }
                    report.last_response = Some(kept(body));
                }
                Ok(Answer::Refused {
                    status,
                    error_code,
                    message,
                    body,
                }) => {
                    if part.len() > 1 {
                        let mid = start + part.len() / 2;
                        // Pushed second half first, so the first half is sent first.
                        todo.push((mid, end, Some(status)));
                        todo.push((start, mid, Some(status)));
                    } else {
                        let details = details(
                            Some(status),
                            &excerpt(&body),
                            attempts,
                            serde_json::json!({}),
                        );
                        report.failed.push(FailedRecord {
                            id: part[0].id,
                            error_code,
                            message,
                            details,
                        });
                    }
                    report.last_response = Some(kept(body));
                }
                Ok(Answer::Unauthorized { status, message }) => {
                    return Err(FatalError::Unauthorized { status, message });
                }
                Ok(Answer::Failed {
                    status,
                    error_code,
                    message,
                    body,
                }) => {
                    let details = details(status, &excerpt(&body), attempts, serde_json::json!({}));
                    fail_all(&mut report, part, &error_code, &message, &details);
                    report.last_response = Some(kept(body));
                }
                Err(t) => {
                    spent = true;
                    tracing::warn!(
                        status = ?t.status,
                        attempts,
                        code = %t.error_code,
                        "the chunk's retry budget is spent: the records of this request fail"
                    );
                    let message = format!("{} (after {attempts} attempts)", t.message);
                    let details =
                        details(t.status, &excerpt(&t.body), attempts, serde_json::json!({}));
                    fail_all(&mut report, part, &t.error_code, &message, &details);
                    if !t.body.is_null() {
                        report.last_response = Some(kept(t.body));
                    }
                }
            }
        }
        Ok(report)
    }

    /// `loansync check`: POSTs a batch of no records (`sync_id` `loansync-check`) to the
    /// officers endpoint, once, with the key and an `Idempotency-Key`: the contract's own
    /// request, which changes nothing on the API's side. No retries.
    pub async fn check_key(&self) -> Result<Answer, Transient> {
        let entity = EntityKind::Officer;
        let check = Batch {
            sync_id: "loansync-check",
            sync_type: SyncType::Incremental,
            entity,
            chunk: 0,
            records: &[],
        };
        let (body, key) = self.request(&check, &[]);
        service::send(
            &self.inner.http,
            &endpoint_url(&self.inner.base, entity.endpoint()),
            self.inner.key.expose_secret(),
            &key,
            body,
            entity.endpoint(),
            &self.telemetry,
        )
        .await
    }

    /// The request for `part` of `batch`: its body (gzipped with `ANALYTICS_GZIP`) and its
    /// `Idempotency-Key`, the same on every retry of the same body.
    fn request(&self, batch: &Batch<'_>, part: &[Record]) -> (Bytes, String) {
        let json = encoder::body(
            batch.sync_id,
            batch.sync_type,
            batch.entity,
            batch.chunk,
            part,
        );
        let body = Bytes::from(if self.inner.gzip {
            encoder::gzip(&json)
        } else {
            json
        });
        (
            body,
            encoder::idempotency_key(batch.sync_id, batch.entity, part),
        )
    }

    /// Sends one part of a chunk, retrying transient failures until the chunk's
    /// `deadline` would pass before the next attempt. Returns the answer (or the last
    /// transient failure) and the attempts made.
    async fn send_part(
        &self,
        batch: &Batch<'_>,
        url: &str,
        part: &[Record],
        deadline: tokio::time::Instant,
    ) -> (Result<Answer, Transient>, u32) {
        let (body, key) = self.request(batch, part);
        let attempts = AtomicU32::new(0);
        let max_interval = self.inner.retry.max_interval;
        let result = (|| async {
            // The gate: the fleet's pause, then a free slot, until the deadline.
            let permit = match &self.gate {
                Some(gate) => Some(gate.acquire(deadline).await.map_err(gate_timeout)?),
                None => None,
            };
            attempts.fetch_add(1, Ordering::Relaxed);
            let answer = service::send(
                &self.inner.http,
                url,
                self.inner.key.expose_secret(),
                &key,
                body.clone(),
                batch.entity.endpoint(),
                &self.telemetry,
            )
            .await;
            let ended = match &answer {
                Err(t) if t.is_backpressure() => {
                    self.telemetry
                        .emit(Event::ApiBackpressure { status: t.status });
                    Ended {
                        response: Response::Backpressure,
                        retry_after: t.retry_after,
                        unavailable: t.status == Some(503),
                    }
                }
                Err(t) if t.status.is_none() => Ended::new(Response::Other),
                Ok(Answer::Failed { status: None, .. }) => Ended::new(Response::Other),
                _ => Ended::new(Response::Answered),
            };
            if let Some(permit) = permit {
                permit.done(ended);
            }
            answer
        })
        .retry(retry::policy(&self.inner.retry))
        .sleep(tokio::time::sleep)
        .adjust(|t: &Transient, d| {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            retry::next_delay(d, t.retry_after, max_interval, left)
        })
        .notify(|t: &Transient, d| {
            self.telemetry.emit(Event::HttpRetry {
                status: t.status,
                code: &t.error_code,
                delay: d,
            });
        })
        .await;
        (result, attempts.load(Ordering::Relaxed))
    }
}

/// No slot of the gate came free before the chunk's deadline: the part is not sent and
/// its records fail as the deadline's (`CHUNK_DEADLINE`).
fn gate_timeout(e: GateTimeout) -> Transient {
    Transient {
        status: None,
        error_code: "CHUNK_DEADLINE".into(),
        message: format!("not sent: {e} (ETL_RETRY_MAX_ELAPSED_SECS)"),
        retry_after: None,
        body: serde_json::Value::Null,
        timed_out: false,
    }
}

/// `base` with `endpoint` appended to its path; a query string on `base` is kept.
fn endpoint_url(base: &url::Url, endpoint: &str) -> String {
    let mut url = base.clone();
    let path = format!("{}{endpoint}", base.path().trim_end_matches('/'));
    url.set_path(&path);
    url.into()
}

/// Every record of `part` fails the same way (`details` built once for the part).
fn fail_all(
    report: &mut DeliveryReport,
    part: &[Record],
    code: &str,
    message: &str,
    details: &serde_json::Value,
) {
    for rec in part {
        report.failed.push(FailedRecord {
            id: rec.id,
            error_code: code.to_string(),
            message: message.to_string(),
            details: details.clone(),
        });
    }
}

/// The start of a response body's JSON text, for an error row's details.
fn excerpt(body: &serde_json::Value) -> String {
    if body.is_null() {
        return String::new();
    }
    let text = body.to_string();
    match text.char_indices().nth(EXCERPT) {
        Some((cut, _)) => text[..cut].to_string(),
        None => text,
    }
}

fn details(
    status: Option<u16>,
    excerpt: &str,
    attempts: u32,
    api_details: serde_json::Value,
) -> serde_json::Value {
    serde_json::json!({
        "http_status": status,
        "response_excerpt": excerpt,
        "attempts": attempts,
        "api_details": api_details,
    })
}

/// A response body as kept in `api_response`: whole when small, else an excerpt.
fn kept(body: serde_json::Value) -> serde_json::Value {
    let text = body.to_string();
    if text.len() <= MAX_KEPT_RESPONSE {
        body
    } else {
        let mut cut = MAX_KEPT_RESPONSE - 64;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        serde_json::json!({ "truncated": true, "excerpt": &text[..cut] })
    }
}

impl std::fmt::Debug for AnalyticsClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AnalyticsClient").finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn large_responses_are_cut_to_64_kib() {
        let big = serde_json::json!({ "x": "é".repeat(100_000) });
        let k = kept(big);
        assert_eq!(k["truncated"], true);
        assert!(k.to_string().len() <= MAX_KEPT_RESPONSE + 64);
        let small = serde_json::json!({"accepted": 1});
        assert_eq!(kept(small.clone()), small);
    }

    #[test]
    fn endpoints_are_appended_to_the_path_keeping_the_query() {
        let at = |base: &str, e: &str| endpoint_url(&url::Url::parse(base).unwrap(), e);
        assert_eq!(at("http://h:1", "/etl/sync"), "http://h:1/etl/sync");
        assert_eq!(
            at("http://h:1/api/", "/etl/sync"),
            "http://h:1/api/etl/sync"
        );
        assert_eq!(
            at("https://u:p@h/api?key=k", "/etl/customers"),
            "https://u:p@h/api/etl/customers?key=k"
        );
    }
}
