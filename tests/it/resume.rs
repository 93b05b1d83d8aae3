//! A stalled sync: its plan is committed but its chunk jobs never reached a worker (the
//! planner died before publishing, the queue was purged). `loansync status` and
//! `etl_stalled_syncs` show it stalled after `ETL_STALE_SYNC_SECS`; `loansync resume`
//! re-publishes its unsettled chunks from the ledger and the sync completes exactly,
//! in single-process mode (`--in-process`) and over RabbitMQ.

use crate::harness::{
    assert_books_balance, assert_delivered_all, expected_full, history, loansync_process,
    seeded_db, settings_for, small, stub, wait_syncs_finished, worker_process,
};
use crate::support::{TestDb, amqp_url, wait_for};
use loansync::config::Settings;
use loansync::domain::{ChunkJob, EntityKind, PlanRequest, SyncType};
use loansync::http::{self, Readiness};
use loansync::queue::amqp::Broker;
use loansync::queue::{ChunkPublisher, QueueError};
use loansync::stub_api::Faults;
use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

/// A broker that is gone: the plan is committed, no chunk job is published.
struct LostBroker;

#[async_trait::async_trait]
impl ChunkPublisher for LostBroker {
    async fn publish_chunks(&self, _jobs: &[ChunkJob]) -> Result<(), QueueError> {
        Err(QueueError::ConsumerLost(
            "connection to the broker lost".into(),
        ))
    }
}

/// Runs `loansync <args>` against this test's database, queues and stub.
async fn loansync(
    db: &TestDb,
    settings: &Settings,
    api_url: &str,
    args: &[&str],
) -> std::process::Output {
    loansync_process(db, settings, api_url)
        .args(args)
        .env("ETL_STALE_SYNC_SECS", "1")
        .output()
        .await
        .expect("run loansync")
}

/// Plans a sync whose chunk jobs are lost on the way to the broker; returns its id.
async fn plan_lost_sync(db: &TestDb, settings: &Settings, sync_type: SyncType) -> String {
    let req = PlanRequest {
        sync_type,
        entities: None,
        request_id: None,
        since: None,
        until: None,
        sweep: false,
    };
    let err = loansync::planner::plan_sync(&db.pool, settings, &req, &LostBroker)
        .await
        .expect_err("publishing fails");
    assert!(format!("{err:#}").contains("broker lost"), "{err:#}");
    sqlx::query_scalar("SELECT sync_id FROM loansync_sync WHERE state = 'running'")
        .fetch_one(&db.pool)
        .await
        .expect("a running sync")
}

/// Waits until `loansync status SYNC_ID --json` reports the sync stalled.
async fn wait_stalled(db: &TestDb, settings: &Settings, api_url: &str, sync_id: &str) {
    wait_for(
        "status to report the sync stalled",
        Duration::from_secs(20),
        || async {
            let out = loansync(db, settings, api_url, &["status", sync_id, "--json"]).await;
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status --json");
            assert_eq!(v["sync"]["status"], "in_progress");
            v["sync"]["stalled"] == true
        },
    )
    .await;
    let table = loansync(db, settings, api_url, &["status"]).await;
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(
        table
            .lines()
            .any(|l| l.starts_with(sync_id) && l.contains("STALLED")),
        "{table}"
    );
}

async fn chunks_of(db: &TestDb, sync_id: &str) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM loansync_chunk WHERE sync_id = $1")
        .bind(sync_id)
        .fetch_one(&db.pool)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stalled_sync_is_shown_and_resume_finishes_it() {
    let db = seeded_db(small()).await;
    let stub = stub(Faults::default()).await;
    let api = stub.url();
    let settings = settings_for(&db, &api, &[("ETL_STALE_SYNC_SECS", "1")]);

    // 1. A full sync loses its chunk jobs: stalled, in `status` and in the metric.
    let first = plan_lost_sync(&db, &settings, SyncType::Full).await;
    wait_stalled(&db, &settings, &api, &first).await;
    let addr = http::serve(
        "127.0.0.1:0".parse().unwrap(),
        Readiness {
            pool: db.pool.clone(),
            broker: None,
            consuming: Arc::new(AtomicBool::new(true)),
            stale_after_secs: 1.0,
            // A registry of its own: the gauge shown is this database's.
            telemetry: loansync::telemetry::Telemetry::fresh(),
        },
    )
    .await
    .unwrap();
    let metrics = reqwest::get(format!("http://{addr}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.lines().any(|l| l == "etl_stalled_syncs 1"),
        "etl_stalled_syncs 1 expected"
    );
    assert!(stub.received().ids(EntityKind::Loan).is_empty());

    // `resume --in-process` works the unsettled chunks in the command itself.
    let out = loansync(&db, &settings, &api, &["resume", &first, "--in-process"]).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    let chunks = chunks_of(&db, &first).await;
    assert!(
        stderr.contains(&format!("working {chunks} unsettled chunks")),
        "{stderr}"
    );
    assert!(stdout.contains("completed"), "{stdout}");
    let h = history(&db.pool).await;
    assert_eq!(
        (h[0].sync_id.as_str(), h[0].status.as_str()),
        (first.as_str(), "completed")
    );
    let expected = expected_full(&db.pool).await;
    let received = stub.received();
    assert_delivered_all(&received, &expected);
    assert_books_balance(&db.pool).await;

    // 2. An incremental sync of changed rows loses its chunk jobs too; `resume`
    // re-publishes them to RabbitMQ and a worker process finishes the sync.
    let changed: BTreeSet<i64> = sqlx::query_scalar(
        "UPDATE loans_ajoloan SET date_modified = now() \
         WHERE id IN (SELECT id FROM loans_ajoloan WHERE is_disbursed ORDER BY id LIMIT 7) \
         RETURNING id::int8",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap()
    .into_iter()
    .collect();
    let before = stub.received();
    let second = plan_lost_sync(&db, &settings, SyncType::Incremental).await;
    wait_stalled(&db, &settings, &api, &second).await;
    let out = loansync(&db, &settings, &api, &["resume", &second]).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let chunks = chunks_of(&db, &second).await;
    assert!(chunks > 0);
    assert!(
        stdout.contains(&format!("re-published {chunks} unsettled chunks")),
        "{stdout}"
    );
    let mut worker = worker_process(&db, &settings, &api).spawn().unwrap();
    let h = wait_syncs_finished(&db.pool, 2).await;
    assert_eq!(
        (h[1].sync_id.as_str(), h[1].status.as_str()),
        (second.as_str(), "completed")
    );
    assert_eq!(
        stub.received().ids_sent_since(&before, EntityKind::Loan),
        changed,
        "exactly the changed loans are sent"
    );
    assert_books_balance(&db.pool).await;
    let after = loansync(&db, &settings, &api, &["status", &second, "--json"]).await;
    let v: serde_json::Value = serde_json::from_slice(&after.stdout).unwrap();
    assert_eq!(v["sync"]["stalled"], false);

    worker.kill().await.unwrap();
    let admin = Broker::connect(&amqp_url(), &settings.queue_prefix, 7)
        .await
        .unwrap();
    admin.delete_topology().await.unwrap();
    admin.close().await;
}
