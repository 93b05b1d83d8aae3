//! The shared services restarted for real mid-sync: PostgreSQL with `pg_ctlcluster`,
//! RabbitMQ with `rabbitmqctl stop_app` / `start_app`. Planner and workers ride it out,
//! `/readyz` reports the outage while it lasts, and the sync completes with exact
//! counters.
//!
//! These tests stop a service every other test needs, so each holds the services lock
//! exclusively ([`crate::support::exclusive_services`]): under `cargo test` and
//! `cargo nextest run` alike, no other test runs while the service is down.
//! A guard starts the service again even when the test fails.

use crate::harness::{
    InProcess, assert_books_balance, expected_full, seeded_db, settings_for, small,
    wait_syncs_finished,
};
use crate::support::{TestDb, amqp_url, exclusive_services, wait_for};
use loansync::domain::{EntityKind, PlanRequest, SyncType};
use loansync::queue::amqp::Broker;
use loansync::stub_api::{Faults, StubHandle};
use loansync::telemetry::Telemetry;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

const OUTAGE_DEADLINE: Duration = Duration::from_secs(60);

fn run(cmd: &str, args: &[&str]) -> bool {
    match Command::new(cmd).args(args).output() {
        Ok(out) if out.status.success() => true,
        Ok(out) => {
            eprintln!(
                "{cmd} {args:?}: {}\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
            false
        }
        Err(e) => {
            eprintln!("{cmd} {args:?}: {e}");
            false
        }
    }
}

/// The PostgreSQL cluster version this machine runs (`ls /etc/postgresql`).
fn pg_version() -> String {
    std::fs::read_dir("/etc/postgresql")
        .expect("/etc/postgresql: this test restarts the local cluster with pg_ctlcluster")
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .max()
        .expect("a PostgreSQL cluster")
}

fn pg_ctl(action: &str) -> bool {
    let version = pg_version();
    let mut args = vec!["--skip-systemctl-redirect", &version, "main", action];
    if action == "stop" {
        args.extend(["-m", "fast"]);
    }
    run("pg_ctlcluster", &args)
}

fn pg_ready() -> bool {
    run("pg_isready", &["-h", "127.0.0.1", "-p", "5432", "-q"])
}

/// Stops PostgreSQL; starts it again when dropped, whatever happened in between.
struct PostgresStopped;

impl PostgresStopped {
    fn stop() -> PostgresStopped {
        assert!(pg_ctl("stop"), "pg_ctlcluster stop");
        PostgresStopped
    }

    async fn start(self) {
        drop(self);
        wait_for(
            "PostgreSQL to accept connections",
            OUTAGE_DEADLINE,
            || async { pg_ready() },
        )
        .await;
    }
}

impl Drop for PostgresStopped {
    fn drop(&mut self) {
        if !pg_ready() {
            pg_ctl("start");
        }
    }
}

/// Stops the RabbitMQ application (the node stays up); starts it again when dropped.
struct RabbitStopped;

impl RabbitStopped {
    fn stop() -> RabbitStopped {
        assert!(run("rabbitmqctl", &["stop_app"]), "rabbitmqctl stop_app");
        RabbitStopped
    }

    fn start(self) {
        drop(self);
    }
}

impl Drop for RabbitStopped {
    fn drop(&mut self) {
        run("rabbitmqctl", &["start_app"]);
        run("rabbitmqctl", &["await_startup"]);
    }
}

/// Publishes a full sync and waits until a few of its chunks are settled.
async fn start_full_sync(db: &TestDb, prefix: &str, request_id: &str) {
    let admin = Broker::connect(&amqp_url(), prefix, 7).await.unwrap();
    let req = PlanRequest {
        sync_type: SyncType::Full,
        entities: None,
        request_id: Some(request_id.into()),
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
        settled_chunks(db).await.is_some_and(|n| n >= 2)
    })
    .await;
}

/// Settled chunks of the ledger; `None` while the database does not answer.
async fn settled_chunks(db: &TestDb) -> Option<i64> {
    sqlx::query_scalar("SELECT count(*) FROM loansync_chunk WHERE settled_at IS NOT NULL")
        .fetch_one(&db.pool)
        .await
        .ok()
}

/// The end of every restart test: the sync completed, every expected id reached the
/// API, the books balance, and nothing was dead-lettered.
async fn assert_completed_exactly(db: &TestDb, stub: &StubHandle, prefix: &str) {
    let h = wait_syncs_finished(&db.pool, 1).await;
    assert_eq!(h[0].status, "completed", "{:?}", h[0].error_message);
    let expected = expected_full(&db.pool).await;
    let received = stub.received();
    for e in EntityKind::ALL {
        assert_eq!(received.ids(e), expected[&e], "{e}");
    }
    assert_books_balance(&db.pool).await;
    let admin = Broker::connect(&amqp_url(), prefix, 7).await.unwrap();
    let dead = admin.queue_depth(&admin.topology.dead).await.unwrap();
    assert_eq!(dead, 0, "nothing dead-lettered");
    admin.close().await;
}

async fn slow_stub() -> StubHandle {
    crate::harness::stub(Faults {
        slow_rate: 1.0,
        slow_ms: 250,
        ..Default::default()
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgresql_restarted_mid_sync() {
    // Runs alone: every other test's database goes away with PostgreSQL.
    let _alone = exclusive_services().await;
    let db = seeded_db(small()).await;
    let stub = slow_stub().await;
    let settings = Arc::new(settings_for(
        &db,
        &stub.url(),
        &[
            ("ETL_WORKER_CONCURRENCY", "2"),
            ("ETL_DB_OUTAGE_WAIT_SECS", "120"),
        ],
    ));
    let prefix = settings.queue_prefix.clone();
    let running = InProcess::start(&db, &settings).await;
    assert_eq!(running.readyz().await.0, 200);
    start_full_sync(&db, &prefix, "pg-restart-1").await;

    // PostgreSQL goes away mid-sync.
    // The in-process planner and workers count in the process-wide registry.
    let metrics = Telemetry::global();
    let waits = || metrics.value("etl_db_outage_waits_total", &[]);
    let waits_before = waits();
    let stopped = PostgresStopped::stop();
    wait_for(
        "/readyz to report the database",
        OUTAGE_DEADLINE,
        || async {
            let (status, body) = running.readyz().await;
            status == 503 && body.contains("database: false")
        },
    )
    .await;
    // A worker holding a chunk waits for the database rather than requeueing it.
    wait_for("a worker to hold a chunk", OUTAGE_DEADLINE, || async {
        waits() > waits_before
    })
    .await;
    stopped.start().await;

    wait_for("/readyz to recover", OUTAGE_DEADLINE, || async {
        running.readyz().await.0 == 200
    })
    .await;
    assert_completed_exactly(&db, &stub, &prefix).await;
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rabbitmq_restarted_mid_sync() {
    // Runs alone: every other test's queues and connections go away with the broker.
    let _alone = exclusive_services().await;
    let db = seeded_db(small()).await;
    let stub = slow_stub().await;
    let settings = Arc::new(settings_for(
        &db,
        &stub.url(),
        &[("ETL_WORKER_CONCURRENCY", "2")],
    ));
    let prefix = settings.queue_prefix.clone();
    let running = InProcess::start(&db, &settings).await;
    start_full_sync(&db, &prefix, "rabbit-restart-1").await;
    let settled_before = settled_chunks(&db).await.unwrap();

    // The broker application stops mid-sync: every connection and queue goes away.
    let stopped = RabbitStopped::stop();
    wait_for(
        "every consumer to notice the broker is gone",
        OUTAGE_DEADLINE,
        || async { running.consuming.iter().all(|f| !f.load(Ordering::SeqCst)) },
    )
    .await;
    let (status, body) = running.readyz().await;
    assert_eq!(status, 503, "{body}");
    stopped.start();

    wait_for("consumers back", OUTAGE_DEADLINE, || async {
        running.consuming.iter().all(|f| f.load(Ordering::SeqCst))
    })
    .await;
    assert_eq!(running.readyz().await.0, 200);
    assert_completed_exactly(&db, &stub, &prefix).await;
    let settled_after = settled_chunks(&db).await.unwrap();
    assert!(
        settled_after > settled_before,
        "chunks were settled after the restart"
    );
    running.shutdown().await;
}
