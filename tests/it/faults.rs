//! Faults: a worker killed mid-chunk, a chunk that keeps failing, an API outage longer
//! than the retry budget. Each ends with every planned record settled exactly once.

use crate::harness::{
    assert_books_balance, assert_delivered_all, expected_full, history, seeded_db, settings_for,
    small, wait_syncs_finished,
};
use crate::harness::{full_request, stub};
use crate::support::{amqp_url, wait_for};
use loansync::domain::EntityKind;
use loansync::planner::{self, PlanOutcome};
use loansync::queue::amqp::Broker;
use loansync::queue::memory::MemoryQueue;
use loansync::stub_api::Faults;
use loansync::worker::{self, ChunkOutcome};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

/// After a worker was killed with `abandoned` chunks started and unsettled: the broker
/// redelivers them to a new worker, the sync completes, every id arrived and each
/// record is counted once.
async fn a_new_worker_finishes_exactly(
    db: &crate::support::TestDb,
    settings: &loansync::config::Settings,
    stub: &loansync::stub_api::StubHandle,
    broker: Broker,
    abandoned: i64,
) {
    let stop = tokio_util::sync::CancellationToken::new();
    let ctx = Arc::new(loansync::app::worker_context(settings, db.pool.clone()).unwrap());
    let b = Broker::connect(&amqp_url(), &settings.queue_prefix, 7)
        .await
        .unwrap();
    let w = tokio::spawn(worker::run_amqp(
        ctx,
        b,
        3,
        Duration::from_secs(5),
        Arc::new(AtomicBool::new(false)),
        stop.clone().cancelled_owned(),
    ));
    let h = wait_syncs_finished(&db.pool, 1).await;
    assert_eq!(h[0].status, "completed");
    let redone: i64 = sqlx::query_scalar("SELECT count(*) FROM loansync_chunk WHERE attempts > 1")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert!(
        redone >= abandoned,
        "the abandoned chunks were processed again"
    );
    let expected = expected_full(&db.pool).await;
    for e in EntityKind::ALL {
        assert_eq!(stub.received().ids(e), expected[&e], "{e}");
        let (total, ok, failed) = h[0].counts(e);
        assert_eq!((ok, failed), (total, 0), "{e}: counted once");
    }
    assert_books_balance(&db.pool).await;
    stop.cancel();
    w.await.unwrap().unwrap();
    broker.delete_topology().await.unwrap();
    broker.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_killed_after_the_post_before_the_commit_loses_nothing() {
    let db = seeded_db(small()).await;
    let stub = stub(Faults::default()).await;
    let settings = settings_for(&db, &stub.url(), &[]);
    let broker = Broker::connect(&amqp_url(), &settings.queue_prefix, 7)
        .await
        .unwrap();
    planner::plan_sync(&db.pool, &settings, &full_request(), &broker)
        .await
        .unwrap();
    // Holding the table of delivered fingerprints (which a settle writes; settles share
    // no row any more) makes every settle wait after its POST was answered: the worker
    // has delivered, and has not committed.
    let mut hold = db.pool.begin().await.unwrap();
    sqlx::query("LOCK TABLE loansync_delivered IN EXCLUSIVE MODE")
        .execute(&mut *hold)
        .await
        .unwrap();
    let mut child = crate::harness::worker_process(&db, &settings, &stub.url())
        .env("ETL_WORKER_CONCURRENCY", "3")
        .spawn()
        .unwrap();
    wait_for(
        "settles waiting after their POST",
        Duration::from_secs(30),
        || async {
            let waiting: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_stat_activity \
             WHERE datname = current_database() AND wait_event_type = 'Lock'",
            )
            .fetch_one(&db.pool)
            .await
            .unwrap();
            waiting >= 3
        },
    )
    .await;
    let answered = stub.received().status_count(200);
    assert!(answered >= 3, "the POSTs were answered: {answered}");
    child.start_kill().unwrap(); // SIGKILL
    child.wait().await.unwrap();
    hold.rollback().await.unwrap();
    let (abandoned, settled): (i64, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE attempts > 0 AND settled_at IS NULL), \
                count(*) FILTER (WHERE settled_at IS NOT NULL) FROM loansync_chunk",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(settled, 0, "no settle committed before the kill");
    assert!(abandoned >= 3, "{abandoned}");
    a_new_worker_finishes_exactly(&db, &settings, &stub, broker, abandoned).await;
    // The delivered-but-unsettled bodies were sent again under the same Idempotency-Key,
    // and the API counted each record once.
    let received = stub.received();
    let mut seen = std::collections::HashMap::<&str, u32>::new();
    for k in &received.idempotency_keys {
        *seen.entry(k.as_str()).or_default() += 1;
    }
    let resent = seen.values().filter(|&&n| n > 1).count();
    assert!(resent >= 3, "{resent} bodies sent again with their key");
    assert!(
        received
            .accepted
            .values()
            .flat_map(|m| m.values())
            .all(|&n| n == 1),
        "a record accepted twice"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_killed_mid_chunk_loses_nothing() {
    let db = seeded_db(small()).await;
    // Slow answers keep chunks in flight (POST sent, not yet committed) when the kill lands.
    let stub = stub(Faults {
        slow_rate: 1.0,
        slow_ms: 800,
        ..Default::default()
    })
    .await;
    let settings = settings_for(&db, &stub.url(), &[]);
    let broker = Broker::connect(&amqp_url(), &settings.queue_prefix, 7)
        .await
        .unwrap();
    planner::plan_sync(&db.pool, &settings, &full_request(), &broker)
        .await
        .unwrap();
    let mut child = crate::harness::worker_process(&db, &settings, &stub.url())
        .env("ETL_WORKER_CONCURRENCY", "3")
        .spawn()
        .unwrap();
    wait_for("chunks in flight", Duration::from_secs(30), || async {
        let n: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM loansync_chunk WHERE attempts > 0 AND settled_at IS NULL",
        )
        .fetch_one(&db.pool)
        .await
        .unwrap();
        n >= 2
    })
    .await;
    child.start_kill().unwrap(); // SIGKILL
    child.wait().await.unwrap();
    let abandoned: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM loansync_chunk WHERE attempts > 0 AND settled_at IS NULL",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert!(
        abandoned >= 1,
        "the kill landed after everything was settled"
    );

    stub.set_faults(Faults::default());
    a_new_worker_finishes_exactly(&db, &settings, &stub, broker, abandoned).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_chunk_that_keeps_failing_is_settled_as_failed_and_dead_lettered() {
    let db = seeded_db(small()).await;
    let stub = stub(Faults::default()).await;
    let settings = settings_for(&db, &stub.url(), &[("ETL_DELIVERY_LIMIT", "3")]);
    let queue = MemoryQueue::new();
    let PlanOutcome::Planned { .. } =
        planner::plan_sync(&db.pool, &settings, &full_request(), &queue)
            .await
            .unwrap()
    else {
        panic!("not planned")
    };
    // One loan chunk has crashed its workers three times already.
    sqlx::query("UPDATE loansync_chunk SET attempts = 3 WHERE entity = 'loan' AND seq = 0")
        .execute(&db.pool)
        .await
        .unwrap();
    let ctx = loansync::app::worker_context(&settings, db.pool.clone()).unwrap();
    let mut gave_up = 0;
    while let Some(job) = queue.try_pop() {
        let d = worker::handle_message(&ctx, &serde_json::to_vec(&job).unwrap()).await;
        if job.entity == EntityKind::Loan && job.seq == 0 {
            let loansync::queue::Disposition::DeadLetter(reason) = d else {
                panic!("the failing chunk was not dead-lettered: {d:?}")
            };
            assert!(reason.contains("ETL_DELIVERY_LIMIT"), "{reason}");
            gave_up += 1;
            // A later delivery of the same job is only acked.
            assert_eq!(
                worker::process_chunk(&ctx, &job).await.unwrap(),
                ChunkOutcome::Duplicate
            );
        } else {
            assert_eq!(d, loansync::queue::Disposition::Ack);
        }
    }
    assert_eq!(gave_up, 1);
    let h = history(&db.pool).await;
    assert_eq!(h[0].status, "partial_success");
    let codes: Vec<String> = sqlx::query_scalar(
        "SELECT DISTINCT error_code::text FROM etl_folder_etlsyncerror WHERE entity_type = 'loan'",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(codes, vec!["CHUNK_GAVE_UP".to_string()]);
    assert_eq!(
        h[0].counts(EntityKind::Loan).2,
        20,
        "the chunk's 20 loans failed"
    );
    assert_books_balance(&db.pool).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_api_outage_longer_than_the_budget_fails_records_that_a_retry_delivers() {
    let db = seeded_db(small()).await;
    let stub = stub(Faults {
        fail_next: 1_000_000,
        fail_next_status: 503,
        ..Default::default()
    })
    .await;
    let settings = settings_for(&db, &stub.url(), &[("ETL_RETRY_MAX_ELAPSED_SECS", "1")]);
    let s = db.full_sync_in_process(&settings).await;
    assert_eq!(s.exit_code(), loansync::app::EXIT_FAILED, "{}", s.render());
    let codes: Vec<String> =
        sqlx::query_scalar("SELECT DISTINCT error_code::text FROM etl_folder_etlsyncerror")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    // Each chunk fails with the API's status once its retries use the budget up; a chunk
    // that waited for a request slot past its budget (a loaded machine: the retries of
    // the others hold the slots) fails unsent, as CHUNK_DEADLINE.
    assert!(codes.contains(&"HTTP_503".to_string()), "{codes:?}");
    assert!(
        codes
            .iter()
            .all(|c| c == "HTTP_503" || c == "CHUNK_DEADLINE"),
        "{codes:?}"
    );
    let marks: i64 = sqlx::query_scalar("SELECT count(*) FROM etl_folder_etllastsync")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(marks, 0, "a failed sync moves no watermark");

    // The API is back: `errors retry` delivers every record and resolves every row.
    stub.set_faults(Faults::default());
    let queue = MemoryQueue::new();
    planner::plan_retry(&db.pool, &settings, &[], &queue)
        .await
        .unwrap();
    worker::run_memory(
        Arc::new(loansync::app::worker_context(&settings, db.pool.clone()).unwrap()),
        queue,
        2,
    )
    .await;
    let open: i64 =
        sqlx::query_scalar("SELECT count(*) FROM etl_folder_etlsyncerror WHERE NOT resolved")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(open, 0);
    let expected = expected_full(&db.pool).await;
    assert_delivered_all(&stub.received(), &expected);
    assert_eq!(history(&db.pool).await[1].status, "completed");
    assert_books_balance(&db.pool).await;
}
