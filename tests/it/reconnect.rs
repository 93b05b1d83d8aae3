//! A lost broker connection mid-sync: the broker closes this test's connections (only
//! this test's, by their connection name, so parallel tests are not disturbed); planner
//! and workers reconnect, `/readyz`'s consumer flag drops meanwhile, and the sync
//! completes with exact counters.

use crate::harness::{
    InProcess, assert_books_balance, assert_delivered_all, expected_full, seeded_db, settings_for,
    small, wait_syncs_finished,
};
use crate::support::{amqp_url, wait_for};
use loansync::domain::{PlanRequest, SyncType};
use loansync::queue::amqp::Broker;
use loansync::stub_api::Faults;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

/// The broker-side ids (Erlang pids) of the connections named `loansync-<prefix>`.
fn connections(prefix: &str) -> Vec<String> {
    let out = std::process::Command::new("rabbitmqctl")
        .args(["list_connections", "-q", "pid", "client_properties"])
        .output()
        .expect("rabbitmqctl");
    let name = format!("{{\"connection_name\",\"loansync-{prefix}\"}}");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains(&name))
        .filter_map(|l| l.split('\t').next().map(str::to_string))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn planner_and_workers_reconnect_after_the_broker_drops_them() {
    let db = seeded_db(small()).await;
    let stub = crate::harness::stub(Faults {
        slow_rate: 1.0,
        slow_ms: 300,
        ..Default::default()
    })
    .await;
    let settings = Arc::new(settings_for(
        &db,
        &stub.url(),
        &[("ETL_WORKER_CONCURRENCY", "1")],
    ));
    let prefix = settings.queue_prefix.clone();
    let running = InProcess::start(&db, &settings).await;
    let flags = &running.consuming;
    let admin = Broker::connect(&amqp_url(), &prefix, 7).await.unwrap();
    let req = PlanRequest {
        sync_type: SyncType::Full,
        entities: None,
        request_id: Some("reconnect-1".into()),
        since: None,
        until: None,
        sweep: false,
    };
    admin
        .publish_json(&admin.topology.plan, &[req])
        .await
        .unwrap();
    admin.close().await;
    wait_for("a few chunks settled", Duration::from_secs(30), || async {
        let n: i64 =
            sqlx::query_scalar("SELECT count(*) FROM loansync_chunk WHERE settled_at IS NOT NULL")
                .fetch_one(&db.pool)
                .await
                .unwrap();
        n >= 2
    })
    .await;

    // The broker drops every connection of this test, mid-sync.
    let before = connections(&prefix);
    assert!(before.len() >= 3, "planner and two workers: {before:?}");
    for pid in &before {
        let ok = std::process::Command::new("rabbitmqctl")
            .args(["close_connection", pid, "test: broker outage"])
            .output()
            .unwrap()
            .status
            .success();
        assert!(ok, "could not close {pid}");
    }
    wait_for(
        "the consumers to notice",
        Duration::from_secs(20),
        || async { flags.iter().any(|f| !f.load(Ordering::SeqCst)) },
    )
    .await;

    let h = wait_syncs_finished(&db.pool, 1).await;
    assert_eq!(h[0].status, "completed", "{:?}", h[0].error_message);
    let after = connections(&prefix);
    assert!(
        after.len() >= 3 && after.iter().all(|p| !before.contains(p)),
        "new connections expected: before {before:?}, after {after:?}"
    );
    assert!(
        flags.iter().all(|f| f.load(Ordering::SeqCst)),
        "ready again"
    );
    let expected = expected_full(&db.pool).await;
    let received = stub.received();
    assert_delivered_all(&received, &expected);
    assert_books_balance(&db.pool).await;

    running.shutdown().await;
}
