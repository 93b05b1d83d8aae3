//! The analytics client against the stub API (and a hostile server) on loopback ports.

use crate::pipeline::KEY;
use crate::pipeline::stub;
use loansync::config::{ApiSettings, RetrySettings};
use loansync::domain::{EntityKind, Record, SyncType};
use loansync::sink::{AnalyticsClient, Batch, FatalError};
use loansync::stub_api::Faults;
use std::time::{Duration, Instant};

fn records(ids: impl IntoIterator<Item = i64>) -> Vec<Record> {
    ids.into_iter()
        .map(|id| Record {
            id,
            json: serde_json::value::to_raw_value(&serde_json::json!({"id": id, "name": "Ọlá"}))
                .unwrap(),
        })
        .collect()
}

fn client(url: &str, key: &str, max_elapsed: Duration) -> AnalyticsClient {
    client_with(url, key, max_elapsed, false)
}

fn client_with(url: &str, key: &str, max_elapsed: Duration, gzip: bool) -> AnalyticsClient {
    AnalyticsClient::new(&ApiSettings {
        base_url: url::Url::parse(url).unwrap(),
        key: key.to_string().into(),
        timeout: Duration::from_secs(5),
        ca_pem: None,
        gzip,
        retry: RetrySettings {
            initial: Duration::from_millis(10),
            max_interval: Duration::from_millis(1500),
            max_elapsed,
        },
    })
    .unwrap()
}

fn batch(records: &[Record]) -> Batch<'_> {
    Batch {
        sync_id: "s-1",
        sync_type: SyncType::Full,
        entity: EntityKind::Loan,
        chunk: 0,
        records,
    }
}

#[tokio::test]
async fn a_refused_batch_is_halved_down_to_the_bad_record() {
    let s = stub(Faults {
        refuse_ids: vec![37],
        ..Default::default()
    })
    .await;
    let recs = records(1..=100);
    let r = client(&s.url(), KEY, Duration::from_secs(2))
        .deliver(&batch(&recs))
        .await
        .unwrap();
    assert_eq!(r.succeeded.len(), 99);
    assert_eq!(r.failed.len(), 1);
    assert_eq!(r.failed[0].id, 37);
    assert_eq!(r.failed[0].error_code, "RECORD_REFUSED");
    assert_eq!(r.failed[0].details["http_status"], 422);
    // One request per level that holds the bad record, plus its sibling halves:
    // 1 + 2 * ceil(log2(100)) = 15.
    assert_eq!(r.requests, 15, "requests sent while halving");
    assert_eq!(s.received().ids(EntityKind::Loan).len(), 99);
}

#[tokio::test]
async fn transient_failures_are_retried_with_the_same_idempotency_key() {
    let s = stub(Faults {
        fail_next: 3,
        fail_next_status: 503,
        ..Default::default()
    })
    .await;
    let recs = records(1..=10);
    let r = client(&s.url(), KEY, Duration::from_secs(5))
        .deliver(&batch(&recs))
        .await
        .unwrap();
    assert_eq!(r.succeeded.len(), 10);
    assert_eq!((r.requests, r.retries), (4, 3));
    let keys = s.received().idempotency_keys;
    assert_eq!(
        keys.len(),
        1,
        "only the successful attempt reaches validation"
    );
    assert_eq!(keys[0], "s-1:loan:0:0-10");
}

#[tokio::test]
async fn retry_after_is_honoured() {
    let s = stub(Faults {
        rate_429: 1.0,
        retry_after_secs: 1,
        ..Default::default()
    })
    .await;
    let recs = records([1]);
    let c = client(&s.url(), KEY, Duration::from_secs(60));
    let clear = tokio::spawn({
        let url = s.url();
        async move {
            // Lift the fault once the first 429 was answered, through the control endpoint.
            let http = reqwest::Client::new();
            loop {
                let stats: serde_json::Value = http
                    .get(format!("{url}/__stats"))
                    .send()
                    .await
                    .unwrap()
                    .json()
                    .await
                    .unwrap();
                if stats["statuses"]["429"].as_u64().unwrap_or(0) >= 1 {
                    http.put(format!("{url}/__faults"))
                        .json(&serde_json::json!({}))
                        .send()
                        .await
                        .unwrap();
                    return;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    });
    let t = Instant::now();
    let r = c.deliver(&batch(&recs)).await.unwrap();
    clear.await.unwrap();
    assert_eq!(r.succeeded, vec![1]);
    assert!(r.retries >= 1);
    // The backoff alone would have waited about 10-20 ms; Retry-After asked for 1 s.
    assert!(
        t.elapsed() >= Duration::from_millis(950),
        "{:?}",
        t.elapsed()
    );
}

#[tokio::test]
async fn a_spent_retry_budget_fails_the_records_with_the_last_status() {
    let s = stub(Faults {
        fail_next: 10_000,
        fail_next_status: 500,
        ..Default::default()
    })
    .await;
    let recs = records(1..=5);
    let r = client(&s.url(), KEY, Duration::from_millis(300))
        .deliver(&batch(&recs))
        .await
        .unwrap();
    assert!(r.succeeded.is_empty());
    assert_eq!(r.failed.len(), 5);
    assert!(r.failed.iter().all(|f| f.error_code == "HTTP_500"));
    assert!(r.requests > 1);
}

#[tokio::test]
async fn dropped_connections_end_as_network_errors() {
    let s = stub(Faults {
        drop_rate: 1.0,
        ..Default::default()
    })
    .await;
    let recs = records(1..=3);
    let r = client(&s.url(), KEY, Duration::from_millis(200))
        .deliver(&batch(&recs))
        .await
        .unwrap();
    assert_eq!(r.failed.len(), 3);
    assert!(
        r.failed.iter().all(|f| f.error_code == "NETWORK_ERROR"),
        "{:?}",
        r.failed[0]
    );
}

#[tokio::test]
async fn wrong_credentials_are_fatal_and_garbage_is_a_clear_failure() {
    let s = stub(Faults {
        garbage_next: 1,
        ..Default::default()
    })
    .await;
    let recs = records(1..=4);
    let r = client(&s.url(), KEY, Duration::from_secs(1))
        .deliver(&batch(&recs))
        .await
        .unwrap();
    assert!(r.failed.iter().all(|f| f.error_code == "INVALID_RESPONSE"));
    assert_eq!(r.failed.len(), 4);
    let err = client(&s.url(), "wrong", Duration::from_secs(1))
        .deliver(&batch(&recs))
        .await
        .unwrap_err();
    assert!(matches!(err, FatalError::Unauthorized { status: 401, .. }));
}

#[tokio::test]
async fn a_huge_response_is_refused_without_reading_it_all() {
    // A hostile server answering 200 with 3 MiB.
    let app = axum::Router::new().route(
        "/etl/sync",
        axum::routing::post(|| async { "x".repeat(3 * 1024 * 1024) }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    let recs = records(1..=2);
    let r = client(&format!("http://{addr}"), KEY, Duration::from_secs(1))
        .deliver(&batch(&recs))
        .await
        .unwrap();
    assert_eq!(r.failed.len(), 2);
    assert!(
        r.failed
            .iter()
            .all(|f| f.error_code == "RESPONSE_TOO_LARGE")
    );
}

#[tokio::test]
async fn gzipped_bodies_are_delivered_and_a_bad_stream_is_refused() {
    let s = stub(Faults {
        refuse_ids: vec![7],
        ..Default::default()
    })
    .await;
    let recs = records(1..=200);
    let r = client_with(&s.url(), KEY, Duration::from_secs(2), true)
        .deliver(&batch(&recs))
        .await
        .unwrap();
    assert_eq!(r.succeeded.len(), 199);
    assert_eq!(r.failed.iter().map(|f| f.id).collect::<Vec<_>>(), vec![7]);
    let got = s.received();
    assert_eq!(got.ids(EntityKind::Loan).len(), 199);
    // Every request, the halving ones included, came gzipped.
    assert_eq!(got.gzip_requests, u64::from(r.requests));
    assert!(r.requests > 1);

    // A body that claims gzip but is not: refused as a whole, nothing accepted.
    let bad = reqwest::Client::new()
        .post(format!("{}/etl/sync", s.url()))
        .bearer_auth(KEY)
        .header("content-type", "application/json")
        .header("content-encoding", "gzip")
        .header("idempotency-key", "bad-gzip")
        .body(r#"{"records":[{"id":1}]}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status().as_u16(), 400);
    let body: serde_json::Value = bad.json().await.unwrap();
    assert_eq!(body["error_code"], "BAD_ENCODING");
    assert_eq!(s.received().ids(EntityKind::Loan).len(), 199);
}
