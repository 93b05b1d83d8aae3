//! The analytics client against the stub API (and a hostile server) on loopback ports.

use crate::harness::stub;
use crate::harness::{KEY, seeded_db, settings_for, small};
use crate::support::wait_for;
use loansync::config::{ApiSettings, RetrySettings};
use loansync::domain::{ChunkJob, EntityKind, PlanRequest, Record, SyncType};
use loansync::queue::memory::MemoryQueue;
use loansync::sink::service::MAX_API_TEXT;
use loansync::sink::{AnalyticsClient, Batch, FatalError};
use loansync::stub_api::Faults;
use loansync::worker::{self, ChunkOutcome};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn records(ids: impl IntoIterator<Item = i64>) -> Vec<Record> {
    ids.into_iter()
        .map(|id| Record {
            id,
            fingerprint: uuid::Uuid::from_u128(id as u128),
            changed_at: None,
            json: loansync::domain::RecordJson::encode(
                &serde_json::json!({"id": id, "name": "Ọlá"}),
            )
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
    assert_eq!(
        keys[0],
        loansync::sink::encoder::idempotency_key("s-1", EntityKind::Loan, &recs)
    );
    assert!(keys[0].starts_with("s-1:loan:1-10:10:"), "{}", keys[0]);
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

/// A client whose largest retry interval is `max_interval` (the others use 1.5 s).
fn client_capped(url: &str, max_elapsed: Duration, max_interval: Duration) -> AnalyticsClient {
    AnalyticsClient::new(&ApiSettings {
        base_url: url::Url::parse(url).unwrap(),
        key: KEY.to_string().into(),
        timeout: Duration::from_secs(5),
        ca_pem: None,
        gzip: false,
        retry: RetrySettings {
            initial: Duration::from_millis(10),
            max_interval,
            max_elapsed,
        },
    })
    .unwrap()
}

/// Processes `job` until its POSTs were answered, then kills it before its settle
/// commits: the table of delivered fingerprints, which the settle writes, is held, so
/// the settle waits; then its task and its database session are killed.
async fn die_before_settling(
    pool: &sqlx::PgPool,
    ctx: &Arc<worker::WorkerContext>,
    job: &ChunkJob,
) {
    let mut hold = pool.begin().await.unwrap();
    sqlx::query("LOCK TABLE loansync_delivered IN EXCLUSIVE MODE")
        .execute(&mut *hold)
        .await
        .unwrap();
    let first = tokio::spawn({
        let (ctx, job) = (ctx.clone(), job.clone());
        async move { worker::process_chunk(&ctx, &job).await }
    });
    let waiting = || async {
        sqlx::query_scalar::<_, i32>(
            "SELECT pid FROM pg_stat_activity \
             WHERE datname = current_database() AND wait_event_type = 'Lock'",
        )
        .fetch_optional(pool)
        .await
        .unwrap()
    };
    wait_for(
        "the first attempt's settle to wait",
        Duration::from_secs(30),
        || async { waiting().await.is_some() },
    )
    .await;
    let pid = waiting().await.unwrap();
    first.abort();
    sqlx::query("SELECT pg_terminate_backend($1)")
        .bind(pid)
        .execute(pool)
        .await
        .unwrap();
    hold.rollback().await.unwrap();
}

/// Whether the loan chunk 0 of `sync_id` is settled.
async fn chunk_settled(pool: &sqlx::PgPool, sync_id: &str) -> bool {
    sqlx::query_scalar(
        "SELECT settled_at IS NOT NULL FROM loansync_chunk \
         WHERE sync_id = $1 AND entity = 'loan' AND seq = 0",
    )
    .bind(sync_id)
    .fetch_one(pool)
    .await
    .unwrap()
}

/// Plans a full sync of the loans (8 a chunk) on `queue`; returns its id and the ids of
/// its chunk 0.
async fn plan_loans(
    db: &crate::harness::TestApp,
    settings: &loansync::config::Settings,
    queue: &MemoryQueue,
) -> (String, Vec<i64>) {
    loansync::planner::plan_sync(
        &db.pool,
        settings,
        &PlanRequest {
            sync_type: SyncType::Full,
            entities: Some(vec![EntityKind::Loan]),
            request_id: None,
            since: None,
            until: None,
            sweep: false,
        },
        queue,
    )
    .await
    .unwrap();
    let (sync_id, ids): (String, Vec<i64>) =
        sqlx::query_as("SELECT sync_id, ids FROM loansync_chunk WHERE entity = 'loan' AND seq = 0")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(ids.len(), 8);
    (sync_id, ids)
}

/// A chunk POSTed and accepted, whose settle never committed, comes back after one of
/// its rows changed behind the timestamps (an UPDATE that leaves `date_modified`
/// alone). Its body now carries other content, so it carries another
/// `Idempotency-Key`: an API that replays the answer it gave a key (the stub does)
/// takes the new record, instead of answering with the old record's answer while the
/// worker writes the new fingerprint as delivered, which would hide the change from
/// every later sweep.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_row_changed_between_two_attempts_is_sent_under_a_new_key() {
    let db = seeded_db(small()).await;
    let stub = stub(Faults::default()).await;
    stub.keep_records();
    let settings = settings_for(&db, &stub.url(), &[("ETL_BATCH_SIZE_LOANS", "8")]);
    let queue = MemoryQueue::new();
    let (sync_id, ids) = plan_loans(&db, &settings, &queue).await;
    let job = ChunkJob {
        sync_id: sync_id.clone(),
        entity: EntityKind::Loan,
        seq: 0,
    };
    let ctx = Arc::new(loansync::app::worker_context(&settings, db.pool.clone()).unwrap());

    die_before_settling(&db.pool, &ctx, &job).await;
    let after_first = stub.received();
    assert_eq!(
        (after_first.status_count(200), after_first.requests()),
        (1, 1)
    );
    assert!(!chunk_settled(&db.pool, &sync_id).await);
    let changed = ids[3];
    assert_ne!(
        after_first.latest(EntityKind::Loan)[&changed]["status"],
        "RESTRUCTURED"
    );

    // The row changes; its timestamps do not.
    let stamp = "SELECT date_modified FROM loans_ajoloan WHERE id = $1::int4";
    let modified: chrono::DateTime<chrono::Utc> = sqlx::query_scalar(stamp)
        .bind(changed)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    let done = sqlx::query("UPDATE loans_ajoloan SET status = 'RESTRUCTURED' WHERE id = $1::int4")
        .bind(changed)
        .execute(&db.pool)
        .await
        .unwrap();
    assert_eq!(done.rows_affected(), 1);
    let still: chrono::DateTime<chrono::Utc> = sqlx::query_scalar(stamp)
        .bind(changed)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(modified, still, "no trigger moved the timestamp");

    // The chunk is redelivered.
    let outcome = worker::process_chunk(&ctx, &job).await.unwrap();
    assert!(
        matches!(
            outcome,
            ChunkOutcome::Settled {
                succeeded: 8,
                failed: 0,
                ..
            }
        ),
        "{outcome:?}"
    );
    let got = stub.received();
    assert_eq!(
        got.keys_reused_for_other_content, 0,
        "the changed body went under the key of the old one, and got its answer"
    );
    assert_eq!(got.keys_reused_for_other_records, 0);
    let keys = &got.idempotency_keys;
    assert_eq!(keys.len(), 2, "{keys:?}");
    assert_ne!(keys[0], keys[1]);
    assert!(
        keys[1].starts_with(&format!("{sync_id}:loan:{}-{}:8:", ids[0], ids[7])),
        "{}",
        keys[1]
    );
    // The platform holds the new record.
    assert_eq!(
        got.latest(EntityKind::Loan)[&changed]["status"],
        "RESTRUCTURED"
    );
    assert_eq!(got.accepted[&EntityKind::Loan][&changed], 2);

    // The sync finishes (chunk 0's job, still queued, is a duplicate now), then a sweep
    // finds that what was delivered is what the source holds: nothing to send.
    worker::run_memory(ctx.clone(), queue, 2).await;
    let status: String =
        sqlx::query_scalar("SELECT status FROM etl_folder_etlsynchistory WHERE sync_id = $1")
            .bind(&sync_id)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(status, "completed");
    let before = stub.received();
    let sweep = loansync::app::sync_in_process(
        &db.pool,
        &settings,
        &PlanRequest {
            sync_type: SyncType::Incremental,
            entities: Some(vec![EntityKind::Loan]),
            request_id: None,
            since: None,
            until: None,
            sweep: true,
        },
    )
    .await
    .unwrap();
    assert!(sweep.status.is_some(), "{}", sweep.render());
    let resent = stub.received().ids_sent_since(&before, EntityKind::Loan);
    assert!(resent.is_empty(), "the sweep found differences: {resent:?}");
    assert_eq!(
        stub.received().latest(EntityKind::Loan)[&changed]["status"],
        "RESTRUCTURED"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_row_deleted_between_two_attempts_never_gets_the_answer_of_other_records() {
    let db = seeded_db(small()).await;
    let stub = stub(Faults::default()).await;
    let settings = settings_for(&db, &stub.url(), &[("ETL_BATCH_SIZE_LOANS", "8")]);
    let queue = MemoryQueue::new();
    let (sync_id, ids) = plan_loans(&db, &settings, &queue).await;
    // The API refuses the chunk's last record: the chunk is halved, and the parts
    // without it are accepted (and their answers cached by key, as the stub does).
    stub.set_faults(Faults {
        refuse_ids: vec![ids[7]],
        ..Default::default()
    });
    let job = ChunkJob {
        sync_id: sync_id.clone(),
        entity: EntityKind::Loan,
        seq: 0,
    };
    let ctx = Arc::new(loansync::app::worker_context(&settings, db.pool.clone()).unwrap());

    die_before_settling(&db.pool, &ctx, &job).await;
    let after_first = stub.received();
    // 8 → 422; 0..4 → 200; 4..8 → 422; 4..6 → 200; 6..8 → 422; 6 → 200; 7 → 422.
    assert_eq!(
        (after_first.status_count(200), after_first.status_count(422)),
        (3, 4)
    );
    assert!(
        !chunk_settled(&db.pool, &sync_id).await,
        "the first attempt must not have settled"
    );

    // The chunk's first row is deleted; the second attempt sends 7 records, so every
    // position names other records than in the first attempt.
    let mut tx = db.pool.begin().await.unwrap();
    for sql in [
        "DELETE FROM loans_ajoloanrepayment WHERE ajo_loan_id = $1::int4",
        "DELETE FROM loans_ajoloanschedule WHERE loan_id = $1::int4",
        "DELETE FROM loans_ajoloan WHERE id = $1::int4",
    ] {
        sqlx::query(sql)
            .bind(ids[0])
            .execute(&mut *tx)
            .await
            .unwrap();
    }
    tx.commit().await.unwrap();
    let outcome = worker::process_chunk(&ctx, &job).await.unwrap();
    assert!(
        matches!(
            outcome,
            ChunkOutcome::Settled {
                succeeded: 6,
                failed: 2,
                ..
            }
        ),
        "{outcome:?}"
    );
    let got = stub.received();
    assert_eq!(
        got.keys_reused_for_other_records, 0,
        "a key named two different sets of records, and the second got the first's answer"
    );
    // The second attempt's whole body carries a key of its own.
    let second: Vec<&String> = got.idempotency_keys[after_first.idempotency_keys.len()..]
        .iter()
        .collect();
    assert!(!after_first.idempotency_keys.contains(second[0]));
    assert!(
        second[0].starts_with(&format!("{sync_id}:loan:{}-{}:7:", ids[1], ids[7])),
        "{}",
        second[0]
    );
    // Only records the API accepted are counted as delivered; the refused one fails
    // with the API's code, the deleted one as missing.
    let accepted = got.ids(EntityKind::Loan);
    assert_eq!(accepted, ids[..7].iter().copied().collect());
    let errors: Vec<(String, String)> = sqlx::query_as(
        "SELECT entity_id, error_code FROM etl_folder_etlsyncerror ORDER BY entity_id::int8",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        errors,
        vec![
            (ids[0].to_string(), "SOURCE_ROW_MISSING".to_string()),
            (ids[7].to_string(), "RECORD_REFUSED".to_string()),
        ]
    );
    // Parts resent with the same records as in the first attempt (ids 4..6, then 6)
    // carried the same key and got their cached answer: those records were counted
    // once. (Records 1..3 went again in a body of other records: at least once.)
    let times = &got.accepted[&EntityKind::Loan];
    assert_eq!(
        [times[&ids[4]], times[&ids[5]], times[&ids[6]]],
        [1, 1, 1],
        "{times:?}"
    );
}

#[tokio::test]
async fn a_chunk_ends_within_its_deadline_while_halving_under_retry_after() {
    // Batches are refused (413) down to single records, and single records get 503 with
    // Retry-After: 1. The chunk has 2 s in all, halving included: about two attempts of
    // the first single record fit, and the records left are not sent. (With a budget
    // per request body, each of the 8 records would have had 2 s of 503s.)
    let s = stub(Faults {
        max_records: 1,
        error_5xx_rate: 1.0,
        retry_after_secs: 1,
        ..Default::default()
    })
    .await;
    let recs = records(1..=8);
    let r = client(&s.url(), KEY, Duration::from_secs(2))
        .deliver(&batch(&recs))
        .await
        .unwrap();
    let got = s.received();
    // 8, then 4, then 2 records refused (the first half is sent first); after that
    // the first record used up the deadline, and nothing more is sent.
    assert_eq!(got.status_count(413), 3);
    let singles = got.status_count(503);
    assert!(
        (1..=2).contains(&singles),
        "{singles} single-record requests: a part had more than the chunk's deadline"
    );
    assert_eq!(u64::from(r.requests), got.requests());
    assert!(r.succeeded.is_empty());
    assert_eq!(r.failed.len(), 8);
    let codes: Vec<&str> = r.failed.iter().map(|f| f.error_code.as_str()).collect();
    assert_eq!(codes[0], "HTTP_503", "{codes:?}");
    assert!(
        codes[1..].iter().all(|c| *c == "CHUNK_DEADLINE"),
        "{codes:?}"
    );
    assert_eq!(r.failed[1].details["http_status"], 413);
    assert!(
        r.failed[1].message.contains("ETL_RETRY_MAX_ELAPSED_SECS"),
        "{}",
        r.failed[1].message
    );

    // Retry-After as an HTTP-date counts the same: asked to wait 5 s with 2 s left, the
    // first single record is not retried at all (it would be, every ~10 ms, if the
    // date were not understood).
    let s = stub(Faults {
        max_records: 1,
        error_5xx_rate: 1.0,
        retry_after_secs: 5,
        retry_after_date: true,
        ..Default::default()
    })
    .await;
    let r = client_capped(&s.url(), Duration::from_secs(2), Duration::from_secs(30))
        .deliver(&batch(&recs))
        .await
        .unwrap();
    let got = s.received();
    assert_eq!((got.status_count(413), got.status_count(503)), (3, 1));
    assert_eq!(r.requests, 4);
    assert_eq!(r.failed[0].error_code, "HTTP_503");
    assert!(
        r.failed[1..]
            .iter()
            .all(|f| f.error_code == "CHUNK_DEADLINE")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn huge_api_messages_are_bounded_in_error_rows() {
    let db = seeded_db(small()).await;
    // 1 MB error bodies (just under the 1 MiB read limit) on every request.
    let stub = stub(Faults {
        fail_next: 1_000_000,
        fail_next_status: 500,
        huge_text_bytes: 1_000_000,
        ..Default::default()
    })
    .await;
    let settings = settings_for(
        &db,
        &stub.url(),
        &[
            ("ETL_BATCH_SIZE_REPAYMENTS", "500"),
            ("ETL_RETRY_MAX_ELAPSED_SECS", "1"),
        ],
    );
    let repayments = PlanRequest {
        sync_type: SyncType::Full,
        entities: Some(vec![EntityKind::Repayment]),
        request_id: None,
        since: None,
        until: None,
        sweep: false,
    };
    loansync::app::sync_in_process(&db.pool, &settings, &repayments)
        .await
        .unwrap();
    let sizes = || async {
        sqlx::query_as::<_, (String, i64, i64, i64)>(
            "SELECT error_code, count(*), max(octet_length(error_message))::int8, \
                    max(octet_length(error_details::text))::int8 \
             FROM etl_folder_etlsyncerror GROUP BY 1 ORDER BY 1",
        )
        .fetch_all(&db.pool)
        .await
        .unwrap()
    };
    let rows = sizes().await;
    assert_eq!(rows.len(), 1, "{rows:?}");
    let (code, n, message, details) = rows[0].clone();
    assert_eq!((code.as_str(), n), ("HTTP_500", 420), "{rows:?}");
    assert!(message <= MAX_API_TEXT as i64 + 64, "{rows:?}");
    assert!(details <= 4 * 1024, "{rows:?}");
    let api_response: i64 = sqlx::query_scalar(
        "SELECT max(octet_length(api_response::text))::int8 FROM etl_folder_etlsynchistory",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert!(api_response <= 64 * 1024 + 64, "{api_response}");

    // Rejections in a 200 whose message and details are 80 KB each.
    stub.set_faults(Faults {
        reject_every_nth: 100,
        huge_text_bytes: 80_000,
        ..Default::default()
    });
    loansync::app::sync_in_process(&db.pool, &settings, &repayments)
        .await
        .unwrap();
    let rows = sizes().await;
    let rejected = rows
        .iter()
        .find(|r| r.0 == "VALIDATION_FAILED")
        .unwrap_or_else(|| panic!("no rejection recorded: {rows:?}"));
    assert!(rejected.1 >= 4, "{rows:?}");
    for (_, _, message, details) in &rows {
        assert!(*message <= MAX_API_TEXT as i64 + 64, "{rows:?}");
        assert!(*details <= 12 * 1024, "{rows:?}");
    }
}

/// NUL characters (which PostgreSQL's `text` and `jsonb` refuse) in everything the API
/// writes: rejections' messages and details (a key too), a refused batch's message, the
/// `200` bodies kept as `api_response`. They are stored with U+FFFD instead: the records
/// the API accepted are counted succeeded, the rejected and refused ones failed with
/// the API's code, and none as unreadable. A body that is not JSON, holding a NUL
/// byte, bytes that are not UTF-8 and a lone surrogate escape, fails its records with
/// a clear code and an excerpt that stores.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nul_characters_in_api_text_are_stored_replaced() {
    use std::collections::BTreeSet;
    let db = seeded_db(small()).await;
    let loans = crate::harness::expected_full(&db.pool).await[&EntityKind::Loan].clone();
    let refused = *loans.iter().find(|id| *id % 7 != 0).unwrap();
    let stub = stub(Faults {
        reject_every_nth: 7,
        refuse_ids: vec![refused],
        nul_text: true,
        ..Default::default()
    })
    .await;
    let settings = settings_for(&db, &stub.url(), &[("ETL_BATCH_SIZE_LOANS", "20")]);
    let request = |entity| PlanRequest {
        sync_type: SyncType::Full,
        entities: Some(vec![entity]),
        request_id: None,
        since: None,
        until: None,
        sweep: false,
    };
    let report = loansync::app::sync_in_process(&db.pool, &settings, &request(EntityKind::Loan))
        .await
        .unwrap();
    let failed: BTreeSet<i64> = loans
        .iter()
        .copied()
        .filter(|id| id % 7 == 0 || *id == refused)
        .collect();
    let h = crate::harness::history(&db.pool).await;
    assert_eq!(h.len(), 1);
    assert_eq!(h[0].status, "partial_success", "{}", report.render());
    assert_eq!(
        h[0].counts(EntityKind::Loan),
        (
            loans.len() as i32,
            (loans.len() - failed.len()) as i32,
            failed.len() as i32
        )
    );
    assert_eq!(
        stub.received().ids(EntityKind::Loan),
        loans.difference(&failed).copied().collect()
    );
    let rows: Vec<(String, String, String, serde_json::Value)> = sqlx::query_as(
        "SELECT entity_id, error_code, error_message, error_details \
         FROM etl_folder_etlsyncerror ORDER BY entity_id::int8",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    let ids: BTreeSet<i64> = rows.iter().map(|r| r.0.parse().unwrap()).collect();
    assert_eq!(ids, failed);
    for (id, code, message, details) in &rows {
        if id.parse::<i64>().unwrap() == refused {
            assert_eq!(code, "RECORD_REFUSED");
            assert_eq!(message, &format!("\u{FFFD}record {id} is refused\u{FFFD}"));
            assert_eq!(details["http_status"], 422);
        } else {
            assert_eq!(code, "VALIDATION_FAILED", "{id}: {message}");
            assert_eq!(
                message,
                &format!("\u{FFFD}record {id} failed validation\u{FFFD}")
            );
            assert_eq!(
                details["api_details"]["\u{FFFD}field\u{FFFD}"], "\u{FFFD}value\u{FFFD}",
                "{details}"
            );
        }
    }
    let kept: String =
        sqlx::query_scalar("SELECT api_response::text FROM etl_folder_etlsynchistory")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert!(kept.contains('\u{FFFD}'), "{kept}");
    crate::harness::assert_books_balance(&db.pool).await;

    // Every answer is a body that is not JSON, with a NUL byte in it.
    stub.set_faults(Faults {
        garbage_next: 1_000_000,
        nul_text: true,
        ..Default::default()
    });
    loansync::app::sync_in_process(&db.pool, &settings, &request(EntityKind::Officer))
        .await
        .unwrap();
    let codes: Vec<(String, i64, serde_json::Value)> = sqlx::query_as(
        "SELECT error_code, count(*), min(error_details::text)::jsonb FROM etl_folder_etlsyncerror \
         WHERE entity_type = 'officer' GROUP BY 1",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(codes.len(), 1, "{codes:?}");
    let (code, n, details) = &codes[0];
    assert_eq!(code, "INVALID_RESPONSE");
    assert_eq!(
        *n as usize,
        crate::harness::expected_full(&db.pool).await[&EntityKind::Officer].len()
    );
    let excerpt = details["response_excerpt"].as_str().unwrap();
    assert!(
        excerpt.contains("\u{FFFD}not json \u{FFFD}\u{FFFD}") && excerpt.contains("ud800"),
        "{excerpt}"
    );
    crate::harness::assert_books_balance(&db.pool).await;
}

#[tokio::test]
async fn rejections_of_ids_not_in_the_batch_are_ignored() {
    // A broken API answering 200 with 20,000 rejections for ids it was never sent, and
    // one for a record of the batch.
    let app = axum::Router::new().route(
        "/etl/sync",
        axum::routing::post(|| async {
            let mut rejected: Vec<serde_json::Value> = (0..20_000)
                .map(|i| serde_json::json!({"id": 1_000_000 + i, "error_code": "X"}))
                .collect();
            rejected.push(serde_json::json!({"id": 2, "error_code": "BAD", "message": "no"}));
            axum::Json(serde_json::json!({"accepted": 0, "rejected": rejected}))
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    let recs = records(1..=3);
    let r = client(&format!("http://{addr}"), KEY, Duration::from_secs(1))
        .deliver(&batch(&recs))
        .await
        .unwrap();
    assert_eq!(r.succeeded, vec![1, 3]);
    assert_eq!(r.failed.len(), 1);
    assert_eq!(
        (r.failed[0].id, r.failed[0].error_code.as_str()),
        (2, "BAD")
    );
    assert_eq!(r.requests, 1);
}
