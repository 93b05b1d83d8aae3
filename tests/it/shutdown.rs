//! SIGTERM: a worker process stops taking chunks, finishes the ones in flight, exits 0;
//! nothing is lost and nothing is counted twice.

use crate::harness::{assert_books_balance, seeded_db, settings_for, small, wait_syncs_finished};
use crate::support::{amqp_url, wait_for};
use loansync::queue::amqp::Broker;
use loansync::stub_api::Faults;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_finishes_chunks_in_flight_and_exits_zero() {
    let db = seeded_db(small()).await;
    let stub = crate::harness::stub(Faults {
        slow_rate: 1.0,
        slow_ms: 700,
        ..Default::default()
    })
    .await;
    let settings = settings_for(&db, &stub.url(), &[]);
    let broker = Broker::connect(&amqp_url(), &settings.queue_prefix, 7)
        .await
        .unwrap();
    let req = crate::harness::full_request();
    loansync::planner::plan_sync(&db.pool, &settings, &req, &broker)
        .await
        .unwrap();

    let mut child = crate::harness::worker_process(&db, &settings, &stub.url())
        .env("ETL_WORKER_CONCURRENCY", "2")
        .env("ETL_SHUTDOWN_GRACE_SECS", "20")
        .spawn()
        .expect("worker process");
    // Wait until the worker has chunks in flight (started, not settled).
    wait_for("a chunk in flight", Duration::from_secs(30), || async {
        let n: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM loansync_chunk WHERE attempts > 0 AND settled_at IS NULL",
        )
        .fetch_one(&db.pool)
        .await
        .unwrap();
        n > 0
    })
    .await;
    let in_flight: Vec<(String, i32)> = sqlx::query_as(
        "SELECT entity::text, seq FROM loansync_chunk WHERE attempts > 0 AND settled_at IS NULL",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    let pid = child.id().expect("pid");
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let status = tokio::time::timeout(Duration::from_secs(25), child.wait())
        .await
        .expect("the worker exits within the grace period")
        .unwrap();
    assert!(status.success(), "worker exited with {status:?}");
    // The chunks it had in flight were finished, not abandoned.
    for (entity, seq) in &in_flight {
        let settled: bool = sqlx::query_scalar(
            "SELECT settled_at IS NOT NULL FROM loansync_chunk WHERE entity = $1 AND seq = $2",
        )
        .bind(entity)
        .bind(seq)
        .fetch_one(&db.pool)
        .await
        .unwrap();
        assert!(
            settled,
            "{entity}/{seq} was in flight at SIGTERM and not finished"
        );
    }
    let remaining: i64 =
        sqlx::query_scalar("SELECT count(*) FROM loansync_chunk WHERE settled_at IS NULL")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert!(remaining > 0, "the worker kept taking chunks after SIGTERM");

    // Another worker picks up the rest; each chunk is processed once.
    stub.set_faults(Faults::default());
    let cancel = tokio_util::sync::CancellationToken::new();
    let ctx = Arc::new(loansync::app::worker_context(&settings, db.pool.clone()).unwrap());
    let b = Broker::connect(&amqp_url(), &settings.queue_prefix, 7)
        .await
        .unwrap();
    let w = tokio::spawn(loansync::worker::run_amqp(
        ctx,
        b,
        3,
        Duration::from_secs(5),
        Arc::new(AtomicBool::new(false)),
        cancel.clone().cancelled_owned(),
    ));
    let h = wait_syncs_finished(&db.pool, 1).await;
    assert_eq!(h[0].status, "completed");
    let redone: i64 = sqlx::query_scalar("SELECT count(*) FROM loansync_chunk WHERE attempts > 1")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(redone, 0, "a chunk was processed twice");
    assert_books_balance(&db.pool).await;
    cancel.cancel();
    w.await.unwrap().unwrap();
    broker.delete_topology().await.unwrap();
    broker.close().await;
}
